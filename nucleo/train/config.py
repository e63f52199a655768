"""The run config: every component's typed config, composed, from YAML plus overrides.

Precedence, lowest first: the components' defaults, the YAML file (``--config``), ``--arch`` and
``--losses``, then each ``--set key.path=value`` in order. The ``model`` section is validated
against the selected architecture's config and each ``loss.<name>`` section against that loss's.
A resolved config written with ``save_config`` loads back to the same run.

    arch: transformer            # ARCHITECTURES name
    losses: [ce]                 # LOSSES names, or "ce,rc" (default: ce, or mlm if bidirectional)
    model: {...}                 # the architecture's config
    loss: {ce: {weight: 1.0}}    # per-loss configs (weight and the loss's own settings)
    data: {...}    train: {...}    engine: {...}    eval: {...}
    checkpoint: {...}    tracking: {...}    run: {root: runs, name: null}
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.loader import DataConfig
from nucleo.core.registry import UnknownNameError
from nucleo.core.schema import ConfigError, check, from_dict, parse_override, set_path, to_dict
from nucleo.train.checkpoint import CheckpointConfig
from nucleo.train.components import ARCHITECTURES, LOSSES, TOKENIZERS
from nucleo.train.engine import EngineConfig, TrainConfig, check_compile
from nucleo.train.evaluation import EvalConfig, check_floor_tokenizer
from nucleo.train.tracking import TrackingConfig


@dataclass
class RunDirConfig:
    """root: directory holding runs (and the default MLflow store). name: this run's folder
    under root (null: ``<arch>-<losses>-<date>-<time>``)."""

    root: str = "runs"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None:
            check(
                bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*", self.name)),
                "name",
                f"{self.name!r} must be a plain folder name (letters, digits, _ . = + -)",
            )


@dataclass
class RunConfig:
    """Everything a run needs; ``model`` and ``loss`` hold the selected components' configs."""

    arch: str
    losses: list[str]
    model: Any
    loss: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


_SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "engine": EngineConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "tracking": TrackingConfig,
    "run": RunDirConfig,
}
TOP_LEVEL = ("arch", "losses", "model", "loss", *_SECTIONS)


def _names(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of names or 'a,b,c', got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(key, f"lists a loss twice: {value}")
    return value


def resolve(raw: dict[str, Any]) -> RunConfig:
    """Build the typed RunConfig from plain data; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"a config is a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(str(key), f"unknown section; valid: {', '.join(TOP_LEVEL)}")
    arch = raw.get("arch", "transformer")
    try:
        arch_entry = ARCHITECTURES.get(arch)
    except UnknownNameError as err:
        raise ConfigError("arch", str(err)) from None
    model: Any = from_dict(arch_entry.config, raw.get("model"), "model")
    # default: next-token CE for causal models, masked-LM for bidirectional ones
    default_losses = ["ce"] if getattr(model, "causal", True) else ["mlm"]
    loss_names = _names(raw.get("losses", default_losses), "losses")
    loss_sections = raw.get("loss") or {}
    if not isinstance(loss_sections, dict):
        raise ConfigError("loss", "expected a mapping of loss name -> settings")
    loss_configs: dict[str, Any] = {}
    for name in [*loss_names, *[n for n in loss_sections if n not in loss_names]]:
        try:
            entry = LOSSES.get(name)
        except UnknownNameError as err:
            key = "losses" if name in loss_names else f"loss.{name}"
            raise ConfigError(key, str(err)) from None
        parsed: Any = from_dict(entry.config, loss_sections.get(name), f"loss.{name}")
        if name in loss_names:  # sections of unselected losses are checked, then dropped
            loss_configs[name] = parsed
    sections: dict[str, Any] = {
        name: from_dict(cls, raw.get(name), name) for name, cls in _SECTIONS.items()
    }
    data = sections["data"]
    if data.tokenizer not in TOKENIZERS:
        known = ", ".join(TOKENIZERS.names())
        raise ConfigError("data.tokenizer", f"unknown tokenizer {data.tokenizer!r}; known: {known}")
    # the options must fit the tokenizer's own config (names the key when they do not)
    from_dict(
        TOKENIZERS.get(data.tokenizer).config, data.tokenizer_options, "data.tokenizer_options"
    )
    check_floor_tokenizer(sections["eval"], data.tokenizer)
    check_compile(sections["train"], sections["engine"])
    return RunConfig(
        arch=arch,
        losses=loss_names,
        model=model,
        loss=loss_configs,
        **sections,
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError("", f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(
    path: str | Path | None = None,
    *,
    arch: str | None = None,
    losses: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """The run config of a YAML file (optional) with command-line choices applied on top."""
    raw = read_yaml(path) if path else {}
    if arch is not None:
        if arch != raw.get("arch", arch) and "model" in raw:
            warnings.warn(
                f"--arch {arch}: the model section of {path} (for {raw.get('arch')}) is not "
                f"used; {arch} starts from its defaults plus any --set model.* overrides",
                stacklevel=2,
            )
            raw.pop("model")
        raw["arch"] = arch
    if losses is not None:
        raw["losses"] = losses
    for text in overrides:
        key_path, value = parse_override(text)
        set_path(raw, key_path, value)
    try:
        return resolve(raw)
    except ConfigError as err:
        if path:
            raise ConfigError(err.key, f"{err.message} (config {path})") from None
        raise


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
