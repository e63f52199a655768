"""``nucleo list | config | pretrain | export``: what can be trained, a run's resolved config,
training in this process, and a portable model from a run's checkpoint.

Multi-process training goes through DeepSpeed's launcher: ``deepspeed launch/pretrain.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nucleo.cli.common import UserError, add_out
from nucleo.train.arguments import add_run_arguments, config_from_args


def cmd_list(args: argparse.Namespace) -> int:
    import torch

    from nucleo.core.schema import from_dict, to_dict
    from nucleo.downstream.tasks import TASKS
    from nucleo.train.components import ARCHITECTURES, LOSSES, TOKENIZERS
    from nucleo.train.compute import count_parameters

    tokenizer_vocab = 9
    print("architectures (--arch); parameters for the 9-token char vocabulary:")
    for entry in ARCHITECTURES:
        cfg = entry.config()
        mode = "causal" if getattr(cfg, "causal", True) else "bidirectional"
        print(f"  {entry.name:<14}{entry.summary} [{mode} by default]")
        print(f"  {'':<14}defaults: {to_dict(cfg)}")
        print(f"  {'':<14}{'size':<8}{'d_model':>8}{'layers':>8}{'total':>16}{'non-embedding':>16}")
        for size in getattr(entry.config, "PRESETS", {}):
            preset = from_dict(entry.config, {"size": size})
            with torch.device("meta"):  # exact counts without allocating a billion weights
                counts = count_parameters(entry.cls(preset, vocab_size=tokenizer_vocab))
            print(
                f"  {'':<14}{size:<8}{preset.d_model:>8}{preset.n_layers:>8}"
                f"{counts['total']:>16,}{counts['non_embedding']:>16,}"
            )
    print("losses (--losses):")
    for entry in LOSSES:
        needs = {True: "causal models", False: "bidirectional models", None: "any model"}
        req = needs[getattr(entry.cls, "requires_causal", None)]
        print(f"  {entry.name:<14}{entry.summary}")
        print(
            f"  {'':<14}views: {','.join(entry.cls.views)}; for {req}; "
            f"settings: {to_dict(entry.config())}"
        )
    print("tokenizers (--set data.tokenizer=...):")
    for entry in TOKENIZERS:
        print(f"  {entry.name:<14}{entry.summary}")
    print("tasks (nucleo tasks build NAME):")
    for entry in TASKS:
        print(f"  {entry.name:<24}{entry.summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = config_from_args(args)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nucleo.train.engine import shutdown_distributed
    from nucleo.train.trainer import fit

    cfg = config_from_args(args)
    finished = False
    try:
        fit(cfg, resume=args.resume, model_writer=_write_pyfunc)
        finished = True
    finally:
        shutdown_distributed(together=finished)
    return 0


def _write_pyfunc(export: Path, path: Path, mlflow_model: Any) -> Path:
    """The run's MLflow model: a pyfunc of its export (imported only when one is logged)."""
    from nucleo.downstream.pyfunc import save_pyfunc

    return save_pyfunc(export, path, mlflow_model)


def cmd_export(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizers import build_tokenizer, load_tokenizer, tokenizer_file
    from nucleo.train.checkpoint import complete_tags, damage, latest_intact
    from nucleo.train.config import load_config
    from nucleo.train.export import export_model, state_from_checkpoint

    run_dir = Path(args.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if args.checkpoint:
        tag = args.checkpoint
        problem = damage(ckpt_dir / tag) if tag in complete_tags(ckpt_dir) else "not complete"
        if problem:
            raise UserError(f"{ckpt_dir / tag}: {problem}; choose another --checkpoint")
    else:
        tag = latest_intact(ckpt_dir, lambda line: print(line, file=sys.stderr))
    if tag is None:
        raise UserError(f"{run_dir}: no complete, intact checkpoint under {ckpt_dir}")
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    state = state_from_checkpoint(ckpt_dir, tag, cfg)
    out = Path(args.out) if args.out else run_dir / "export"
    if tokenizer_file(run_dir).is_file():  # the run's own copy (a BPE file may have moved)
        tokenizer = load_tokenizer(run_dir)
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
    export_model(state, cfg, tokenizer, out, {"checkpoint": tag})
    print(f"exported {ckpt_dir / tag} to {out}")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``list``, ``config``, ``pretrain`` and ``export``."""
    p = sub.add_parser("list", help="registered architectures, losses and tokenizers")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("config", help="print the resolved run config")
    add_run_arguments(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("pretrain", help="train in this process (use deepspeed for several)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("export", help="export a checkpoint as a portable model folder")
    p.add_argument("run_dir", help="a run folder (runs/NAME)")
    p.add_argument("--checkpoint", metavar="TAG", help="checkpoint tag, e.g. step_00000300 "
                   "(default: the latest complete one)")  # fmt: skip
    add_out(p, "model folder to write (default: RUN_DIR/export)")
    p.set_defaults(func=cmd_export)
