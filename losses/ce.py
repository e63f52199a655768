"""Next-token cross-entropy for causal models (targets weighted by ``Batch.weights``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import LossConfig, token_weights, weighted_mean
from nucleo.core.registry import LOSSES
from nucleo.core.schema import check
from nucleo.core.types import Batch, LossOutput, ModelOutput


@dataclass
class CrossEntropyConfig(LossConfig):
    """label_smoothing: as in F.cross_entropy (plus the LossConfig settings)."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")


def next_token_nll(
    logits: torch.Tensor, tokens: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position negative log-likelihood (nats) of tokens[t + 1] given logits[t].

    logits: [B, L, V]; tokens: [B, L]. Returns nll [B, L-1] float and mask [B, L-1] bool
    (false where the target is padding).
    """
    targets = tokens[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=pad_id
    )
    return nll, targets != pad_id


@LOSSES.register("ce", config=CrossEntropyConfig)
class CrossEntropy:
    """Next-token cross-entropy (nats per token) on the forward strand; causal models only."""

    views = ("forward",)
    requires_causal: bool | None = True

    def __init__(self, cfg: CrossEntropyConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        logits = outputs["forward"].logits
        weights = token_weights(batch, shift=1)
        if weights is None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch.tokens[:, 1:].reshape(-1),
                ignore_index=batch.pad_id,
                label_smoothing=self.cfg.label_smoothing,
            )
        else:  # repeats down-weighted: a weighted mean over the targets
            targets = batch.tokens[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2),
                targets,
                reduction="none",
                ignore_index=batch.pad_id,
                label_smoothing=self.cfg.label_smoothing,
            )
            loss = weighted_mean(nll, targets != batch.pad_id, weights)
        return LossOutput(loss=loss, metrics={"bits_per_token": loss.detach() / math.log(2)})
