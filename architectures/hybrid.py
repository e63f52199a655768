"""Hybrids: one stack whose layers mix families, e.g. StripedHyena-like hyena, hyena, attention.

``pattern`` names each layer's mixer (attention, hyena, mamba, multires) and repeats to
``n_layers``; every layer is x + mixer(norm(x)), then x + MLP(norm(x)). Each mixer takes its
settings from the family's own section (``hybrid.hyena``, ``hybrid.attention``, ...), whose
size, d_model, n_layers, causal and mlp_ratio are set by the hybrid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from architectures.hyena import HyenaConfig, HyenaOperator
from architectures.layers import Block, LanguageModel, ModelConfig, presets
from architectures.mamba import MambaConfig, mamba_mixer
from architectures.multires import MultiresConfig, MultiresMixer
from architectures.transformer import Attention, TransformerConfig
from nucleo.core.registry import ARCHITECTURES
from nucleo.core.schema import ConfigError, check


@dataclass
class HybridConfig(ModelConfig):
    """A hybrid stack (size, d_model, n_layers, checkpointing, autocast: see ModelConfig).

    pattern: mixer names, repeated to n_layers. mlp_ratio: MLP after every mixer.
    causal: next-token (true) or bidirectional (hyena two-sided, BiMamba, full attention;
    multires is causal only). attention, hyena, mamba, multires: each family's settings.
    """

    PRESETS = presets(
        [
            ("tiny", 128, 3, {}),
            ("mini", 192, 4, {}),
            ("small", 256, 8, {}),
            ("base", 384, 12, {}),
            ("medium", 640, 16, {}),
            ("large", 1024, 20, {}),
            ("xl", 1536, 32, {}),
        ]
    )

    pattern: list[str] = field(default_factory=lambda: ["hyena", "hyena", "attention"])
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    causal: bool = True
    attention: TransformerConfig = field(default_factory=TransformerConfig)
    hyena: HyenaConfig = field(default_factory=HyenaConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    multires: MultiresConfig = field(default_factory=MultiresConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.pattern), "pattern", f"name at least one of {', '.join(MIXERS)}")
        for i, name in enumerate(self.pattern):
            check(name in MIXERS, f"pattern[{i}]", f"{name!r}; choose from {', '.join(MIXERS)}")
        check(
            self.causal or "multires" not in self.pattern,
            "pattern",
            "multires is causal only; remove it or set causal: true",
        )
        check(
            self.d_model % self.attention.n_heads == 0 or "attention" not in self.pattern,
            "attention.n_heads",
            f"must divide d_model={self.d_model}",
        )
        for name in dict.fromkeys(self.pattern):  # each section as it will be built
            try:
                self.mixer_config(name)
            except ConfigError as err:
                raise err.under(name) from None

    def mixer_config(self, name: str) -> Any:
        """The family section for ``name`` with the hybrid's width and direction."""
        section = getattr(self, name)
        shared: dict[str, Any] = {
            "size": None, "d_model": self.d_model, "n_layers": 1, "kernels": self.kernels,
        }  # fmt: skip
        if name != "multires":
            shared["causal"] = self.causal
        return replace(section, **shared)


MIXERS: dict[str, Callable[[Any], nn.Module]] = {
    "attention": Attention,
    "hyena": HyenaOperator,
    "mamba": lambda cfg: mamba_mixer(cfg, cfg.d_model),
    "multires": MultiresMixer,
}


@ARCHITECTURES.register("hybrid", config=HybridConfig)
class Hybrid(LanguageModel):
    """A stack mixing attention, hyena, mamba and multires layers in a repeating pattern."""

    def __init__(
        self, cfg: HybridConfig, vocab_size: int, complement_ids: list[int] | None = None
    ) -> None:
        names = [cfg.pattern[i % len(cfg.pattern)] for i in range(cfg.n_layers)]
        blocks = [
            Block(MIXERS[name](cfg.mixer_config(name)), cfg.d_model, cfg.mlp_ratio, cfg.dropout)
            for name in names
        ]
        super().__init__(cfg, vocab_size, blocks)
        self.causal = cfg.causal
        self.layer_names = names
