"""Portable exports: a directory that loads without DeepSpeed, for inference and fine-tuning.

    export/config.json         architecture name, its config, tokenizer, training summary,
                               and the full run config it came from
    export/model.safetensors   fp32 weights (tied weights stored once)
    export/tokenizer.json

``load_exported(path)`` rebuilds the model from these three files alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from data_pipeline.tokenizers import load_tokenizer
from nucleo import __version__
from nucleo.components import ARCHITECTURES
from nucleo.schema import from_dict, to_dict

FORMAT = "nucleo-export/1"


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """The model's complete fp32 state dict on CPU (collective under ZeRO-3: call on all ranks)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def state_from_checkpoint(
    ckpt_dir: str | Path, tag: str, zero_stage: int
) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint, read on CPU without starting DeepSpeed's engine."""
    path = Path(ckpt_dir) / tag
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    states = path / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{states}: not found; is {path} a DeepSpeed checkpoint?")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def export_model(
    state: dict[str, torch.Tensor],
    run_config: Any,
    tokenizer: Any,
    out_dir: str | Path,
    trained: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (a full state dict of ``run_config``'s model) as a portable export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = ARCHITECTURES.build(run_config.arch, run_config.model, vocab_size=tokenizer.vocab_size)
    model.load_state_dict(state)
    meta = {
        "format": FORMAT,
        "nucleo_version": __version__,
        "arch": run_config.arch,
        "model": to_dict(run_config.model),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name,
        "causal": bool(getattr(model, "causal", True)),
        "trained": trained or {},
        "run_config": run_config.to_dict(),
    }
    save_model(model, str(out / "model.safetensors"))
    tokenizer.save(out)
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, dict]:
    """(model in eval mode, tokenizer, config.json contents) of an export directory."""
    root = Path(path)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found; is {root} a nucleo export?")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    entry = ARCHITECTURES.get(meta["arch"])
    model = entry.cls(
        from_dict(entry.config, meta["model"], "model"), vocab_size=meta["vocab_size"]
    )
    load_model(model, root / "model.safetensors", device=str(device))
    tokenizer = load_tokenizer(root)
    return model.to(device).eval(), tokenizer, meta
