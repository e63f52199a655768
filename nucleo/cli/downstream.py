"""``nucleo tasks | finetune | generate | evaluate-generation``: tasks, fine-tuning and sampling
(``predict``, ``score`` and ``embed``: nucleo.cli.inference).

    nucleo tasks build NAME --out DIR             a classification task from real genomes
    nucleo finetune TASK --export DIR [--mode full|probe] [--compare]   fine-tune or probe
    nucleo generate EXPORT --out gen.fasta        sample sequences (causal models)
    nucleo evaluate-generation GEN.fasta --real REAL.fasta --out DIR    generated vs real
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nucleo.cli.common import (
    Parser,
    add_batch_size,
    add_device,
    add_out,
    add_shards,
    add_store,
    at_least,
    number,
    positive,
    run,
)
from nucleo.downstream.options import BALANCES, INITS, LAYOUTS, MODES


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


# ----------------------------------------------------------------------------- tasks


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, YAML-parsed value): ``--option test_fraction=0.25``."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. test_fraction=0.25")
    return key, yaml.safe_load(value)


def cmd_tasks_build(args: argparse.Namespace) -> int:
    from nucleo.downstream.tasks import build_task, save_task

    options: dict[str, Any] = {
        "length": args.length,
        "seed": args.seed,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "shards": args.shards,
        "genomes": args.genome,
        "test_genome": args.test_genome,
        "annotations": args.annotations,
        "test_groups": args.test_group,
        **dict(args.option or []),
    }
    task = build_task(args.name, corpus=args.corpus, **options)
    out = save_task(task, args.out, args.layout)
    print(task.describe())
    for key in ("left_out", "skipped", "test_genome", "test_groups"):
        if task.meta.get(key):
            print(f"  {key}: {task.meta[key]}")
    print(f"wrote {out} ({args.layout})")
    return 0


def cmd_tasks_convert(args: argparse.Namespace) -> int:
    from nucleo.downstream.tasks import load_task, save_task

    task = load_task(args.source, args.references)
    out = save_task(task, args.out, args.layout)
    print(task.describe())
    print(f"wrote {out} ({args.layout})")
    return 0


def cmd_tasks_info(args: argparse.Namespace) -> int:
    from nucleo.downstream.tasks import detect_layout, load_task

    task = load_task(args.path, args.references)
    print(f"{args.path} ({detect_layout(args.path)})")
    print(task.describe())
    return 0


# ----------------------------------------------------------------------------- finetune


def _exports(values: Sequence[str]) -> list[tuple[str, str]]:
    """``LABEL=PATH`` or ``PATH`` (label: the run folder's name, or the export's losses)."""
    out = []
    for value in values:
        if "=" in value:
            label, path = value.split("=", 1)
        else:
            path = value
            parent = Path(path).resolve()
            label = parent.parent.name if parent.name == "export" else parent.name
        out.append((label, path))
    return out


def cmd_finetune(args: argparse.Namespace) -> int:
    from nucleo.downstream.finetune import FinetuneConfig, run_seeds, summarize
    from nucleo.downstream.finetune_compare import compare
    from nucleo.train.engine import shutdown_distributed

    exports = _exports(args.export)
    base = FinetuneConfig(
        task=args.task[0],
        export=exports[0][1],
        init=args.init,
        mode=args.mode,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        balance=args.balance,
        rc_conjoin=args.rc_conjoin,
        probe_c=args.probe_c,
        max_tokens=args.max_tokens,
        device=args.device,
        precision=args.precision,
        zero_stage=args.zero_stage,
        out=args.out,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        label=exports[0][0],
        register_as=args.register_as,
        layer=args.layer,
    )
    if not args.compare and (len(args.task) > 1 or len(exports) > 1):
        raise ValueError("several tasks or exports need --compare")
    try:
        if args.compare:
            compare(args.task, exports, base, args.table, scratch=not args.no_scratch)
            if args.table:
                print(f"wrote {args.table} (and {Path(args.table).with_suffix('.json')})")
            return 0
        summary = summarize(run_seeds(base))
        print(
            f"{base.task}: {len(base.seeds)} seed(s): "
            + " | ".join(f"{k} {m:.4f} ± {s:.4f}" for k, (m, s) in summary.items())
        )
        return 0
    finally:
        shutdown_distributed()


# ----------------------------------------------------------------------------- generation


def cmd_generate(args: argparse.Namespace) -> int:
    from data_pipeline.readers import read_sequences
    from nucleo.downstream.generate import generate_to_fasta

    prompts: list[bytes] = []
    if args.prompt:
        prompt = args.prompt.strip().upper().encode()
        bad = set(prompt) - set(b"ACGTN")
        if bad:
            raise ValueError(f"--prompt: {bytes(sorted(bad))!r} are not bases (A, C, G, T, N)")
        prompts = [prompt]
    elif args.prompt_file:
        prompts = [bytes(r.seq) for r in read_sequences(args.prompt_file)]
        if not prompts:
            raise ValueError(f"{args.prompt_file}: no records to use as prompts")
        cut = args.prompt_len or min(map(len, prompts))
        prompts = [p[:cut] for p in prompts]
        if min(map(len, prompts)) < cut:
            raise ValueError(f"{args.prompt_file}: records shorter than --prompt-len {cut}")
    path = generate_to_fasta(
        args.export,
        args.out,
        num=args.num,
        length=args.length,
        prompts=prompts,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch=args.batch_size,
        device=args.device,
        cache=not args.no_cache,
    )
    print(f"wrote {args.num} sequences of {args.length} bases to {path}")
    return 0


def cmd_evaluate_generation(args: argparse.Namespace) -> int:
    from nucleo.downstream.generate import evaluate_generation, read_fasta_set, real_windows

    generated = read_fasta_set(args.generated, args.max_sequences)
    length = min(map(len, generated))
    if args.real:
        real = read_fasta_set(args.real, None)
        real = _cut(real, length, 2 * len(generated))
    elif args.shards and args.kingdom:
        real = real_windows(args.shards, args.kingdom, length, 2 * len(generated), args.seed)
    else:
        raise ValueError("give --real FASTA, or --shards DIR with --kingdom NAME")
    evaluate_generation(generated, real, args.out, args.seed, args.k, args.label)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _cut(seqs: list[bytes], length: int, count: int) -> list[bytes]:
    """Consecutive windows of ``length`` from ``seqs`` (N-free), up to ``count``."""
    out = []
    for seq in seqs:
        for start in range(0, len(seq) - length + 1, length):
            piece = seq[start : start + length]
            if b"N" not in piece:
                out.append(piece)
            if len(out) >= count:
                return out
    if len(out) < 2:
        raise ValueError(f"the real sequences hold fewer than 2 N-free windows of {length} bases")
    return out


# ----------------------------------------------------------------------------- parser


def add_commands(sub: Any) -> None:
    """Register the downstream commands on nucleo's subparsers."""
    tasks = sub.add_parser("tasks", help="build, convert and inspect classification tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True)
    p = tsub.add_parser("build", help="build a task from real genomes (leakage-free splits)")
    p.add_argument("name", help="the task (nucleo list shows them): kingdom, "
                   "plasmid_vs_chromosome, coding_vs_intergenic, or a plugin's")  # fmt: skip
    add_out(p, "task folder to write", required=True)
    p.add_argument("--corpus", default="data/offline", help="offline corpus folder for inputs "
                   "not given (nucleo data corpus --out)")  # fmt: skip
    p.add_argument("--layout", choices=LAYOUTS, default="parquet", help="task folder layout")
    add_shards(p, required=False, what="kingdom: shard folder (train -> train, val -> test)")
    p.add_argument("--genome", action="append", help="plasmid_vs_chromosome: genome FASTA "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--test-genome", help="plasmid_vs_chromosome: the genome held out")
    p.add_argument("--annotations", action="append", help="coding_vs_intergenic: GenBank file "
                   "or GFF3 with its FASTA beside (repeatable)")  # fmt: skip
    p.add_argument("--test-group", action="append", help="coding_vs_intergenic: organism held "
                   "out (repeatable; default: a salted hash picks ~30%%)")  # fmt: skip
    p.add_argument("--length", type=at_least(1), metavar="BASES",
                   help="bases per example (default: the task's, 200)")  # fmt: skip
    p.add_argument("--train-per-class", type=at_least(1), help="training examples per class")
    p.add_argument("--test-per-class", type=at_least(1), help="test examples per class")
    p.add_argument("--seed", type=int, help="sampling seed (default: the task's, 0)")
    p.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="any other option of the task's builder (repeatable)")  # fmt: skip
    p.set_defaults(func=cmd_tasks_build)
    p = tsub.add_parser("convert", help="rewrite a task in another layout")
    p.add_argument("source", help="task folder (any layout)")
    add_out(p, "task folder to write", required=True)
    p.add_argument("--layout", choices=LAYOUTS, required=True, help="the layout to write")
    p.add_argument("--references", help="Genomic Benchmarks reference FASTA folder")
    p.set_defaults(func=cmd_tasks_convert)
    p = tsub.add_parser("info", help="classes, sizes and groups of a task folder")
    p.add_argument("path", help="task folder (any layout)")
    p.add_argument("--references", help="Genomic Benchmarks reference FASTA folder")
    p.set_defaults(func=cmd_tasks_info)

    p = sub.add_parser("finetune", help="fine-tune or probe an export on a task; --compare")
    add_finetune_arguments(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="sample sequences from a causal export (FASTA)")
    p.add_argument("export", help="a model export folder of a causal model")
    add_out(p, "FASTA file to write", required=True)
    p.add_argument("--num", type=at_least(1), default=16, help="sequences")
    p.add_argument("--length", type=at_least(1), default=1000, metavar="BASES",
                   help="new bases per sequence")  # fmt: skip
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="bases to continue (default: none)")
    group.add_argument("--prompt-file", help="FASTA: each record prompts in turn (cut to "
                       "--prompt-len, default the shortest)")  # fmt: skip
    p.add_argument(
        "--prompt-len", type=at_least(1), help="bases of each --prompt-file record to use"
    )
    p.add_argument("--temperature", type=number(0), default=1.0,
                   help="softmax temperature; 0: greedy (the likeliest base)")  # fmt: skip
    p.add_argument("--top-k", type=at_least(0), default=0, help="keep the k likeliest; 0: off")
    p.add_argument(
        "--top-p", type=number(0, 1, low_open=True), default=1.0, help="nucleus mass; 1: off"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_batch_size(p, "sequences", 16)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window at "
                   "every step instead of decoding from a KV cache / recurrent state")  # fmt: skip
    add_device(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate-generation", help="generated vs real: GC, k-mers, CGR, walk, "
                       "topology; report + picture")  # fmt: skip
    p.add_argument("generated", help="FASTA of generated sequences")
    p.add_argument("--real", help="FASTA of held-out real sequences")
    add_shards(p, required=False, what="or: a shard folder whose val split gives the real windows")
    p.add_argument("--kingdom", help="with --shards: the kingdom to compare with")
    add_out(p, "report folder to write (report.md, report.json, cgr.png)", required=True)
    p.add_argument("--label", default="generated", help="the generated set's name in the report")
    p.add_argument("--k", type=at_least(1), default=4, help="k of the k-mer and FCGR comparisons")
    p.add_argument("--max-sequences", type=at_least(1), help="use at most this many generated")
    p.add_argument("--seed", type=int, default=0, help="which real windows are drawn")
    p.set_defaults(func=cmd_evaluate_generation)


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """The ``finetune`` options (also ``launch/finetune.py``'s)."""
    p.add_argument("task", nargs="+", help="task folder(s) (nucleo tasks build, a Genomic "
                   "Benchmarks folder, or NT-style parquet)")  # fmt: skip
    p.add_argument("--export", action="append", required=True, metavar="[LABEL=]PATH",
                   help="pretrained export (repeatable with --compare); scratch copies the "
                   "first one's architecture")  # fmt: skip
    p.add_argument("--init", choices=INITS, default="pretrained", help="backbone weights")
    p.add_argument("--mode", choices=MODES, default="full",
                   help="full: train backbone and head; probe: logistic regression on frozen "
                   "embeddings")  # fmt: skip
    p.add_argument("--seeds", type=_ints, default=[0], help="e.g. 0,1,2")
    p.add_argument("--epochs", type=at_least(1), default=3, help="passes over the training set")
    add_batch_size(p, "examples", 32)
    p.add_argument("--lr", type=positive, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument(
        "--balance",
        choices=BALANCES,
        default="weights",
        help="unbalanced classes: a weighted loss, a balanced sampler, or none",
    )
    p.add_argument("--rc-conjoin", action="store_true", help="average both strands at test")
    p.add_argument("--probe-c", type=positive, default=1.0, help="probe: inverse L2 strength")
    p.add_argument("--max-tokens", type=at_least(2), default=1024, help="longer inputs are cut")
    p.add_argument("--layer", type=int, default=-1,
                   help="probe the pooled states of this layer (0 the embedding, i after block "
                        "i, -1 the final states, -2 the block before)")  # fmt: skip
    add_device(p)
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="full: the engine's weights (bf16: DeepSpeed bf16, fp32 masters)",
    )
    p.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="full: DeepSpeed ZeRO stage"
    )
    add_out(p, "folder where classifiers are saved", default="runs/finetune")
    p.add_argument("--experiment", default="nucleo-finetune", help="MLflow experiment")
    add_store(p, tags=False)
    p.add_argument("--register-as", metavar="NAME", help="register each saved classifier as a "
                   "new version of this MLflow model (default: none, logged only)")  # fmt: skip
    p.add_argument("--compare", action="store_true", help="pretrained (full, probe) vs scratch "
                   "for every task and export")  # fmt: skip
    p.add_argument("--table", help="with --compare: markdown table to write (+ .json); rows "
                   "already in it are kept, not rerun")  # fmt: skip
    p.add_argument("--no-scratch", action="store_true", help="with --compare: leave out the "
                   "scratch rows (e.g. when adding another export to a table)")  # fmt: skip


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of launch/finetune.py."""
    parser = Parser(
        prog="launch/finetune.py", description="Fine-tune or probe a DNA model on a task."
    )
    add_finetune_arguments(parser)
    return run(cmd_finetune, parser.parse_args(argv))
