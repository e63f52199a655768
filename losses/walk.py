"""The DNA walk loss for causal models: the "2D line" of Yau et al. (2003).

Each base is a unit vector (purines A, G below the x-axis, pyrimidines C, T above; see
``nucleo.core.representations.WALK_VECTORS``) and a sequence is the walk W_t = sum_{j<=t} v(s_j).
The model's walk sums the expected vectors of its next-base predictions,
W^_t = sum_{j<=t} sum_k p_j(k) v(k), each predicted from the true prefix. The loss is
mean_t ||W^_t - W_t||^2 / n_t (n_t: the bases walked so far; a walk of independent errors
drifts like sqrt(n_t), so each term is an error per step). Non-ACGT positions (N, padding,
specials) are not walked. Unlike cross-entropy it is a global constraint: errors that drift
in one direction (a composition bias) accumulate, errors that cancel do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from losses.common import (
    LossConfig,
    next_base_probs,
    require_per_base,
    token_weights,
    weighted_mean,
)
from nucleo.core.registry import LOSSES
from nucleo.core.representations import dna_walk, onehot
from nucleo.core.types import Batch, LossOutput, ModelOutput


@dataclass
class WalkConfig(LossConfig):
    """Only the LossConfig settings (weight, schedule, cadence)."""


@LOSSES.register("walk", config=WalkConfig)
class Walk:
    """Distance between the expected DNA walk of the predictions and the true walk."""

    views = ("forward",)
    requires_causal: bool | None = True

    def __init__(self, cfg: WalkConfig, tokenizer: Any = None) -> None:
        require_per_base("walk", tokenizer)
        self.cfg = cfg

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        probs, targets, valid = next_base_probs(outputs["forward"].logits, batch.tokens)
        predicted = dna_walk(probs, valid)  # [B, T, 2]
        true = dna_walk(onehot(targets, probs.dtype), valid)
        walked = torch.cumsum(valid.to(probs.dtype), dim=-1).clamp(min=1)
        per_step = ((predicted - true) ** 2).sum(-1) / walked
        loss = weighted_mean(per_step, valid, token_weights(batch, shift=1))
        end = (predicted - true)[:, -1].norm(dim=-1).mean().detach()
        return LossOutput(loss=loss, metrics={"end_distance": end})
