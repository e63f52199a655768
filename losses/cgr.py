"""Chaos-game representation losses for causal models (Jeffrey 1990; the CGR of a sequence:
x_0 = centre, x_t = (x_{t-1} + corner(s_t)) / 2).

Predictions enter through the expected corner mu_t = sum_k p_t(k) corner_k of the next-base
distribution p_t (restricted to A, C, G, T), which makes both terms differentiable:

- point (teacher-forced): the predicted point x^_t = (x_{t-1} + mu_t) / 2 against the true
  x_t; ||x^_t - x_t||^2 = ||mu_t - corner(s_t)||^2 / 4, averaged over positions. With
  ``tetrahedron`` corners (the default: affinely independent and equidistant) it is 0 only
  for the right base, and it penalises all wrong bases alike; with the 2-D ``square`` a
  uniform prediction costs the same as an even A/G mix, because the four corners are
  affinely dependent.
- fcgr (frequency CGR): the 2^k x 2^k image of k-mer frequencies of each window, true vs
  predicted. A teacher-forced prediction puts mass p_t(b) in the cell of (the true k-1 bases
  before t) + b, which is where the chaos game's soft point falls at resolution 2^k (soft
  binning); the loss is the mean over cells of ((F^ - F) / (1/4^k))^2, the squared error of
  each cell's frequency relative to a uniform cell. It asks the model's predictions to
  reproduce each window's k-mer spectrum, not just each next base.

Causal models only: both terms place the prediction of a base the model has not seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from losses.common import (
    LossConfig,
    next_base_probs,
    require_per_base,
    token_weights,
    weighted_mean,
    window_weights,
)
from nucleo.core.registry import LOSSES
from nucleo.core.representations import corners, kmer_index
from nucleo.core.schema import check
from nucleo.core.types import Batch, LossOutput, ModelOutput


@dataclass
class ChaosGameConfig(LossConfig):
    """corners: tetrahedron (3-D, default) | square (2-D, the classic picture) | onehot (4-D).
    point_weight, fcgr_weight: the two terms' shares of this loss. k: frequency-CGR resolution
    2^k x 2^k (k-mers of length k)."""

    corners: Literal["tetrahedron", "square", "onehot"] = "tetrahedron"
    point_weight: float = 1.0
    fcgr_weight: float = 1.0
    k: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.point_weight >= 0, "point_weight", "must be >= 0")
        check(self.fcgr_weight >= 0, "fcgr_weight", "must be >= 0")
        check(1 <= self.k <= 8, "k", f"must be in 1..8 (4^k cells), got {self.k}")


def fcgr_predicted(
    probs: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft and true k-mer frequencies of each window.

    probs: [B, T, 4] next-base predictions for targets [B, T]. Returns predicted [B, 4^k]
    (float32, differentiable), true [B, 4^k] (both normalised per window) and the count of
    k-mers per window [B].
    """
    index, ok = kmer_index(targets, k)  # k-mer ending at each target position
    prefix = index // 4  # the k-1 true bases before it
    count = ok.sum(-1)
    b = targets.shape[0]
    cells = 4**k
    slots = prefix[..., None] * 4 + torch.arange(4, device=targets.device)  # [B, T, 4]
    mass = probs * ok[..., None]
    predicted = torch.zeros(b, cells, device=probs.device, dtype=probs.dtype)
    predicted = predicted.scatter_add(1, slots.reshape(b, -1), mass.reshape(b, -1))
    true = torch.zeros(b, cells, device=probs.device, dtype=probs.dtype)
    true = true.scatter_add(1, index, ok.to(probs.dtype))
    norm = count.clamp(min=1)[:, None].to(probs.dtype)
    return predicted / norm, true / norm, count


@LOSSES.register("cgr", config=ChaosGameConfig)
class ChaosGame:
    """Chaos-game point loss plus frequency-CGR loss on next-base predictions."""

    views = ("forward",)
    requires_causal: bool | None = True

    def __init__(self, cfg: ChaosGameConfig, tokenizer: Any = None) -> None:
        require_per_base("cgr", tokenizer)
        self.cfg = cfg
        self.corner = corners(cfg.corners)

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        probs, targets, valid = next_base_probs(outputs["forward"].logits, batch.tokens)
        corner = self.corner.to(probs.device, probs.dtype)
        mu = probs @ corner  # [B, T, dim]
        true = corner[targets.clamp(0, 3)]
        sq = ((mu - true) ** 2).sum(-1) / 4  # ||x^_t - x_t||^2
        point = weighted_mean(sq, valid, token_weights(batch, shift=1))
        predicted, actual, count = fcgr_predicted(probs, targets, self.cfg.k)
        per_window = ((predicted - actual) ** 2).sum(-1) * 4**self.cfg.k
        fcgr = weighted_mean(per_window, count > 0, window_weights(batch))
        loss = self.cfg.point_weight * point + self.cfg.fcgr_weight * fcgr
        return LossOutput(loss=loss, metrics={"point": point.detach(), "fcgr": fcgr.detach()})
