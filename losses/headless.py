"""Teacherless ("headless") training of causal models (Bachmann & Nagarajan 2024).

Next-token training always conditions on the true previous bases (teacher forcing); at
generation time the model conditions on its own guesses. Here each window keeps a real prefix
x_<P and replaces the next ``span`` inputs x_P .. x_{P+m-1} by a placeholder (``<mask>``); the
model must predict all m bases from the prefix alone:

    loss = mean_{j<m} -log p(x_{P+j} | x_<P, <mask> * j)

The output at P-1+j sees the real prefix and j placeholders (which tell it how far ahead it
is), never x_P .. x_{P+j-1}. The cut P is drawn per window, uniformly with at least
``min_prefix`` of the window before it. A definition in which the whole input is placeholders
would let the model see nothing and learn only the base composition; here the prefix carries
the signal, and the tests check that the predictions depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import LossConfig
from nucleo.core.registry import LOSSES
from nucleo.core.schema import ConfigError, check
from nucleo.core.types import Batch, LossOutput, ModelOutput

CUT = "headless/cut"  # Batch.aux key: [B] int64 first placeholder position, -1: window skipped


@dataclass
class HeadlessConfig(LossConfig):
    """span: bases predicted without teacher forcing after each prefix. min_prefix: the
    shortest prefix, as a fraction of the window's non-padding length."""

    span: int = 8
    min_prefix: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.span >= 1, "span", f"must be >= 1, got {self.span}")
        check(0 < self.min_prefix < 1, "min_prefix", "must be in (0, 1)")


@LOSSES.register("headless", config=HeadlessConfig)
class Headless:
    """Cross-entropy of the next span bases, predicted from a real prefix and placeholders."""

    views = ("headless",)
    requires_causal: bool | None = True

    def __init__(self, cfg: HeadlessConfig, tokenizer: Any) -> None:
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None:
            raise ConfigError("tokenizer", "headless needs a tokenizer with a <mask> token")
        self.cfg = cfg
        self.placeholder = int(mask_id)

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> None:
        """Draw a cut P per window and add the ``headless`` view (placeholders at P..P+m-1)."""
        tokens = batch.tokens
        device = tokens.device
        span = self.cfg.span
        n = (tokens != batch.pad_id).sum(-1)  # [B] non-padding length
        low = torch.clamp(torch.ceil(n * self.cfg.min_prefix).long(), min=1)
        high = n - span  # last allowed cut
        ok = high >= low
        draw = torch.rand(n.shape, generator=generator, device=device)
        cut = low + (draw * (high - low + 1).clamp(min=1)).long()
        cut = torch.where(ok, torch.minimum(cut, high), torch.full_like(cut, -1))
        pos = torch.arange(tokens.shape[-1], device=device)
        hidden = (pos >= cut[:, None]) & (pos < cut[:, None] + span) & ok[:, None]
        batch.views["headless"] = tokens.masked_fill(hidden, self.placeholder)
        batch.aux[CUT] = cut

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        logits = outputs["headless"].logits  # [B, L, V]
        cut = batch.aux[CUT]
        span = self.cfg.span
        ok = cut >= 0
        offsets = torch.arange(span, device=cut.device)
        targets_at = (cut.clamp(min=1)[:, None] + offsets).clamp(max=logits.shape[1] - 1)
        predicted_at = targets_at - 1  # the output at t predicts t + 1
        picked = logits.gather(
            1, predicted_at[..., None].expand(-1, -1, logits.shape[-1])
        )  # [B, m, V]
        targets = batch.tokens.gather(1, targets_at)  # [B, m]
        nll = F.cross_entropy(picked.float().transpose(1, 2), targets, reduction="none")
        weights = ok[:, None].float().expand_as(nll)
        if batch.weights is not None:  # the weights of the predicted bases
            weights = weights * batch.weights.gather(1, targets_at)
        loss = (nll * weights).sum() / weights.sum().clamp(min=1e-8)
        per_offset = (nll * weights).sum(0) / weights.sum(0).clamp(min=1)
        return LossOutput(
            loss=loss,
            metrics={
                "bits_per_token": loss.detach() / math.log(2),
                "bits_first": per_offset[0].detach() / math.log(2),
                "bits_last": per_offset[-1].detach() / math.log(2),
            },
        )
