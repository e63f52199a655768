"""Portable exports: a directory that loads without DeepSpeed, for inference and fine-tuning.

    export/config.json             architecture name, its config, tokenizer, training summary,
                                   the full run config it came from, and the keys transformers
                                   reads (model_type "nucleo", auto_map, complement_ids)
    export/model.safetensors       fp32 weights (the fp32 master copies of bf16 runs; tied
                                   weights stored once)
    export/nucleo_tokenizer.json   nucleo's tokenizer
    export/tokenizer.json          the same tokenizer for Hugging Face (with
    export/tokenizer_config.json   tokenizer_config.json: AutoTokenizer loads it)
    export/modeling_nucleo.py      the transformers classes (a copy of nucleo.train.hf_modeling)

``load_exported(path)`` rebuilds the model from config.json, model.safetensors and the
tokenizer (older exports, whose tokenizer.json is nucleo's and whose config.json has no
transformers keys, still load). ``transformers.AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` (AutoModelForMaskedLM for bidirectional models) loads the same model
with the installed nucleo package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from data_pipeline.tokenizers import build_tokenizer, load_tokenizer
from nucleo import __version__
from nucleo.core.device import resolve as resolve_device
from nucleo.core.protocols import Tokenizer
from nucleo.core.schema import from_dict, to_dict
from nucleo.train.checkpoint import weights_only
from nucleo.train.components import ARCHITECTURES, build_model
from nucleo.train.engine import parameter_groups

FORMAT = "nucleo-export/1"
HF_MODULE = "modeling_nucleo.py"  # the export's copy of nucleo/train/hf_modeling.py


class ExportError(ValueError):
    """An export directory that cannot be loaded (the message names the file)."""


def _complete(
    module: nn.Module, base: dict[str, torch.Tensor], masters: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A full fp32 state dict: fp32 masters where there are, ``base`` for the rest.

    ``masters`` is keyed by the first name of each parameter; tied copies (``head.weight``
    of ``embed.weight``) get the same tensor.
    """
    first = {id(p): name for name, p in module.named_parameters()}
    out = {name: value.detach().float().cpu().clone() for name, value in base.items()}
    for name, param in module.named_parameters(remove_duplicate=False):
        master = masters.get(first[id(param)])
        if master is not None:
            out[name] = master.detach().float().cpu().clone()
    return out


def masters_from_fp32_groups(
    groups: list[list[torch.Tensor]], module: nn.Module, weight_decay: float
) -> dict[str, torch.Tensor]:
    """Name the fp32 master copies that DeepSpeed's bf16 optimizer keeps without ZeRO.

    They are stored per optimizer parameter group, in the order ``parameter_groups`` built.
    """
    first = {id(p): name for name, p in module.named_parameters()}
    masters = {}
    for group, values in zip(parameter_groups(module, weight_decay), groups, strict=True):
        for param, value in zip(group["params"], values, strict=True):
            masters[first[id(param)]] = value
    return masters


def full_state_dict(engine: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """The model's fp32 weights on CPU, from the fp32 master copies when training in bf16.

    Collective under ZeRO (every rank must call it).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    stage, precision = cfg.engine.zero_stage, cfg.engine.precision
    masters: dict[str, torch.Tensor] = {}
    if stage > 0:
        for name, param in module.named_parameters():  # same order on every rank
            master = safe_get_full_fp32_param(param)
            if master is not None:
                masters[name] = master
    elif precision == "bf16":
        groups = engine.optimizer.state_dict()["fp32_groups"]
        masters = masters_from_fp32_groups(groups, module, cfg.train.weight_decay)
    missing = [p for n, p in module.named_parameters() if n not in masters]
    if stage == 3 and missing:
        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
            return _complete(module, module.state_dict(), masters)
    return _complete(module, module.state_dict(), masters)


def state_from_checkpoint(ckpt_dir: str | Path, tag: str, cfg: Any) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint of run config ``cfg``, read on CPU without an
    engine (the fp32 master copies when the run trained in bf16); weights-only loading."""
    path = Path(ckpt_dir) / tag
    if cfg.engine.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only():
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    states = path / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{states}: not found; is {path} a DeepSpeed checkpoint?")
    with weights_only():
        saved = torch.load(states, map_location="cpu")
    module = build_model(
        cfg.arch, cfg.model, build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
    )
    masters = {}
    if cfg.engine.precision == "bf16":
        groups = saved["optimizer"]["fp32_groups"]
        masters = masters_from_fp32_groups(groups, module, cfg.train.weight_decay)
    return _complete(module, saved["module"], masters)


def add_hf_files(out: Path, meta: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """Copy the transformers classes into ``out``; ``meta`` (config.json's contents) with the
    keys transformers reads added: the classes for the export's kind of model (causal:
    AutoModelForCausalLM, else AutoModelForMaskedLM), and what the model is built from."""
    shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), out / HF_MODULE)
    module = HF_MODULE.removesuffix(".py")
    causal = bool(meta.get("causal", True))
    head, auto = (
        ("NucleoForCausalLM", "AutoModelForCausalLM")
        if causal
        else ("NucleoForMaskedLM", "AutoModelForMaskedLM")
    )
    complement = getattr(tokenizer, "complement_ids", None)
    return {
        **meta,
        "model_type": "nucleo",
        "architectures": [head],
        "auto_map": {
            "AutoConfig": f"{module}.NucleoConfig",
            "AutoModel": f"{module}.NucleoModel",
            auto: f"{module}.{head}",
        },
        "vocab_size": tokenizer.vocab_size,
        "complement_ids": None if complement is None else [int(i) for i in complement],
        "pad_token_id": tokenizer.pad_id,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "mask_token_id": tokenizer.mask_id,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def export_model(
    state: dict[str, torch.Tensor],
    run_config: Any,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    trained: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (a full state dict of ``run_config``'s model) as a portable export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(run_config.arch, run_config.model, tokenizer)
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
    tokenizer.save(out)  # nucleo_tokenizer.json, and the Hugging Face files where it has them
    meta = add_hf_files(out, meta, tokenizer)
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_exported(
    path: str | Path,
    device: str | torch.device = "cpu",
    kernels: str = "auto",
    weights: bool = True,
) -> tuple[nn.Module, Any, dict]:
    """(model in eval mode, tokenizer, config.json contents) of an export directory.

    device: as nucleo.core.device.resolve takes it. kernels: the model's ``kernels`` setting
    here (a run's ``required`` belongs to the machine it trained on, not to its export).
    weights: False gives the export's architecture freshly initialised (from torch's current
    seed) instead of its trained weights: fine-tuning from scratch.
    """
    root = Path(path)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found; is {root} a nucleo export?")
    try:
        meta = json.loads(config_path.read_text())
    except ValueError as err:
        raise ExportError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{config_path}: format {found!r}, expected {FORMAT!r}")
    for key in ("arch", "model"):
        if key not in meta:
            raise ExportError(f"{config_path}: no {key!r} entry; is {root} a nucleo export?")
    tokenizer = load_tokenizer(root)
    try:
        entry = ARCHITECTURES.get(meta["arch"])
        settings = {**meta["model"], "kernels": kernels}
        config: Any = from_dict(entry.config, settings, "model")
    except (ValueError, KeyError) as err:  # an unknown architecture, or settings of another one
        raise ExportError(f"{config_path}: {err}") from None
    model = build_model(meta["arch"], config, tokenizer)
    dev = resolve_device(device)
    if not weights:
        return model.to(dev).eval(), tokenizer, meta
    path_weights = root / "model.safetensors"
    try:
        load_model(model, path_weights, device=str(dev))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path_weights}: not found; is {root} a whole nucleo export?"
        ) from None
    except (SafetensorError, RuntimeError, OSError) as err:  # truncated, or of another model
        detail = str(err).strip().splitlines()[0][:200]
        raise ExportError(
            f"{path_weights}: cannot be read as this export's weights ({detail}); export it again "
            "(nucleo export RUN_DIR)"
        ) from None
    return model.to(dev).eval(), tokenizer, meta
