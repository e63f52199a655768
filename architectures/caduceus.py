"""Caduceus (Schiff et al. 2024): bidirectional, reverse-complement-equivariant Mamba.

Reverse complement on tokens x [B, L]: rc(x) = flip_L(comp[x]). On hidden states h [B, L, D]
it is flip over both length and channels, rc(h) = flip_{L,C}(h). With RC parameter sharing
(``rcps: true``) every layer commutes with rc, so the model satisfies exactly

    hidden(rc(x)) = flip_{L,C}(hidden(x)),    logits(rc(x)) = flip_L(logits(x)[..., comp])

- RCPS embedding: h = [e(x), flip_C(e(comp[x]))], e: vocab -> D/2.
- RCPS wrapper of any layer f on D/2 channels: [f(h1), flip_{L,C}(f(flip_{L,C}(h2)))],
  one set of weights for both strands; used for the BiMamba mixers and the RMSNorms.
- RCPS LM head, tied to e: logits = h1 W^T + flip_C(h2) W[comp]^T.

How it runs: the states travel strand-batched, s = [h1; flip_{L,C}(h2)] along the batch
([2B, L, D/2]). Then the embedding is e applied to the batch [x; rc(x)], every RCPS layer is
its layer applied once to s (rc is linear, so residual sums commute with it), and the halves
meet only at the head: logits = s1 W^T + flip_L(s2 W[comp]^T), hidden = [s1, flip_{L,C}(s2)].
No concatenation or flip inside the blocks: the model costs one width-D/2 BiMamba on 2B
sequences.

Without RCPS (``rcps: false``, Caduceus-PH), ``conjoin: true`` averages, in eval mode, the
outputs on x and on rc(x) mapped back ("post-hoc conjoining"); ``conjoin`` (the function) does
the same for any model. Caduceus is bidirectional: train it with masked-LM (``mlm``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from architectures.layers import (
    Block,
    LanguageModel,
    Padding,
    autocast_context,
    presets,
    reverse,
)
from architectures.mamba import BiMamba, MambaConfig
from nucleo.core import cost
from nucleo.core.alphabet import COMPLEMENT_IDS
from nucleo.core.registry import ARCHITECTURES
from nucleo.core.schema import ConfigError, check
from nucleo.core.types import ModelOutput


@dataclass
class CaduceusConfig(MambaConfig):
    """Caduceus settings: those of mamba (``causal`` must stay false) plus

    rcps: reverse-complement parameter sharing (exact RC equivariance; each strand gets D/2
    channels). conjoin: without rcps, average the outputs on x and rc(x) in eval mode.
    """

    PRESETS = presets(
        [
            ("tiny", 256, 4, {}),
            ("mini", 384, 6, {}),
            ("small", 512, 12, {}),
            ("base", 768, 20, {}),
            ("medium", 1280, 30, {}),
            ("large", 2048, 40, {}),
            ("xl", 3072, 64, {}),
        ]
    )

    causal: bool = False
    rcps: bool = True
    conjoin: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not self.causal, "causal", "caduceus is bidirectional; use mamba for causal")
        check(self.d_model % 2 == 0, "d_model", "must be even (two strands of D/2 channels)")
        check(not (self.rcps and self.conjoin), "conjoin", "only for rcps: false")


def rc_hidden(h: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
    """Reverse complement of hidden states [B, L, D] under RCPS: flip length (within each
    sequence's length when padded) and channels."""
    return reverse(h, padding).flip(-1)


class RCPS(nn.Module):
    """``layer`` ([B, L, D/2] -> [B, L, D/2], each sequence on its own) shared by both strands.
    It takes and gives strand-batched states [2B, L, D/2] (the module docstring): one call,
    no copies. A module of its own so that parameter names (``...mixer.layer...``) and
    nucleo.train.compute' count per strand stay as they were."""

    takes_padding = True

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, s: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        return self.layer(s) if padding is None else self.layer(s, padding=padding)

    def flops(self, batch: int, length: int) -> cost.Flops:
        """The same layer on each strand."""
        one = cost.module_flops(self.layer, batch, length)
        return one + one


class RCPSBlock(nn.Module):
    """h + RCPS(BiMamba)(RCPS(RMSNorm)(h))."""

    def __init__(self, cfg: CaduceusConfig, width: int) -> None:
        super().__init__()
        self.norm = RCPS(nn.RMSNorm(width))
        self.mixer = RCPS(BiMamba(cfg, width))

    def forward(self, h: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        """h: strand-batched [2B, L, D/2]; ``padding`` of those 2B rows."""
        return h + self.mixer(self.norm(h), padding)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.mixer.layer.out_proj]

    def flops(self, batch: int, length: int) -> cost.Flops:
        """The RCPS mixer on both strands (no MLP in Caduceus blocks)."""
        return self.mixer.flops(batch, length)


def rc_logits(
    logits: torch.Tensor, complement: torch.Tensor, padding: Padding | None = None
) -> torch.Tensor:
    """Map per-position logits [B, L, V] of rc(x) back onto x's positions and strand."""
    return reverse(logits, padding)[..., complement]


def conjoin(
    forward: Callable[[torch.Tensor, torch.Tensor | None], ModelOutput],
    tokens: torch.Tensor,
    complement: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    padding: Padding | None = None,
) -> ModelOutput:
    """Post-hoc conjoining: the mean of forward(x) and forward(rc(x)) mapped back to x.

    The logits of the result satisfy logits(rc x) = rc_logits(logits(x)) for any model.
    Hidden states are averaged position-wise (the rc pass reversed along L, within each
    sequence's length when padded: rc(x) keeps its pads on the right).
    """
    out = forward(tokens, attention_mask)
    rc_out = forward(reverse(complement[tokens], padding, -1), attention_mask)
    return ModelOutput(
        hidden=(out.hidden + reverse(rc_out.hidden, padding)) / 2,
        logits=(out.logits + rc_logits(rc_out.logits, complement, padding)) / 2,
    )


def complement_table(complement_ids: list[int] | None, vocab_size: int) -> torch.Tensor:
    ids = list(complement_ids) if complement_ids is not None else list(COMPLEMENT_IDS)
    if len(ids) != vocab_size or sorted(ids) != list(range(vocab_size)):
        raise ConfigError(
            "data.tokenizer",
            f"caduceus needs a complement permutation of the {vocab_size}-token vocabulary; "
            f"the tokenizer gives {ids}",
        )
    return torch.tensor(ids)


@ARCHITECTURES.register("caduceus", config=CaduceusConfig)
class Caduceus(LanguageModel):
    """Bidirectional Mamba with reverse-complement parameter sharing (or post-hoc conjoining)."""

    causal = False

    def __init__(
        self, cfg: CaduceusConfig, vocab_size: int, complement_ids: list[int] | None = None
    ) -> None:
        width = cfg.d_model // 2 if cfg.rcps else cfg.d_model
        blocks = [
            RCPSBlock(cfg, width) if cfg.rcps else Block(BiMamba(cfg, width), width)
            for _ in range(cfg.n_layers)
        ]
        super().__init__(cfg, vocab_size, blocks)
        self.rc_equivariant = cfg.rcps
        self.heads_per_position = 2 if cfg.rcps else 1  # the head runs on each strand
        self.register_buffer(
            "complement", complement_table(complement_ids, vocab_size), persistent=False
        )
        if cfg.rcps:  # embedding, final norm and head act on the strands
            self.embed = nn.Embedding(vocab_size, width)
            nn.init.normal_(self.embed.weight, std=0.02)
            self.norm = RCPS(nn.RMSNorm(width))
            del self.head

    def stem(
        self, tokens: torch.Tensor, padding: Padding | None
    ) -> tuple[torch.Tensor, Padding | None]:
        """With RCPS, the embedding of [x; rc(x)] (strand-batched [2B, L, D/2]) and the padding
        of those 2B rows; rc(x) is x reverse-complemented within its own length."""
        if not self.cfg.rcps:
            return super().stem(tokens, padding)
        both = torch.cat([tokens, reverse(self.complement[tokens], padding, -1)])
        return self.embed(both), padding.repeat(2) if padding is not None else None

    def merge_strands(self, x: torch.Tensor, padding: Padding | None) -> torch.Tensor:
        """[2B, L, D/2] strands -> [B, L, D]: x's states beside rc(x)'s mapped back onto x."""
        if not self.cfg.rcps:
            return x
        forward, backward = x.chunk(2, dim=0)
        return torch.cat([forward, rc_hidden(backward, padding)], dim=-1)

    def hidden_states(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, layer: int = -1
    ) -> torch.Tensor:
        """As LanguageModel's; Caduceus-PH (``conjoin``) averages x's states with rc(x)'s
        mapped back, as its forward does."""
        states = super().hidden_states
        if self.cfg.rcps or not self.cfg.conjoin or self.training:
            return states(tokens, attention_mask, layer)
        padding = self.padding(tokens, attention_mask)
        rc = reverse(self.complement[tokens], padding, -1)
        return (
            states(tokens, attention_mask, layer)
            + reverse(states(rc, attention_mask, layer), padding)
        ) / 2

    def forward(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ModelOutput:
        """tokens [B, L] int64, attention_mask [B, L] (1 real, 0 right padding) -> hidden
        [B, L, D], logits [B, L, V], both float32. The reverse strand of a padded sequence is
        its reverse complement within its own length, pads kept on the right."""
        padding = self.padding(tokens, attention_mask)
        if not self.cfg.rcps:
            if self.cfg.conjoin and not self.training:
                return conjoin(super().forward, tokens, self.complement, attention_mask, padding)
            return super().forward(tokens, attention_mask)
        with autocast_context(self.cfg.autocast, tokens.device):
            both, strands = self.stem(tokens, padding)  # [x; rc(x)]
            s = self.norm(self.run_blocks(both, strands))  # [2B, L, D/2]
            forward, backward = s.chunk(2, dim=0)
            w = self.embed.weight
            rc_part = reverse(F.linear(backward, w[self.complement]), padding)
            logits = F.linear(forward, w) + rc_part
            hidden = self.merge_strands(s, padding)
        return ModelOutput(hidden=hidden.float(), logits=logits.float())
