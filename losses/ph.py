"""Persistent homology of the chaos-game trajectory, with gradients (gudhi).

Point clouds: the soft CGR trajectory of a window's next-base predictions (the chaos game
played with the expected corners mu_t, ``nucleo.core.representations.cgr_points``) and the true
window's trajectory, each subsampled to ``points`` evenly spaced positions. Diagrams: H0 and
H1 (``max_dimension``) of their Vietoris-Rips filtrations. gudhi pairs the simplices on a
detached copy of the distance matrix (``flag_persistence_generators``); births and deaths are
gathered from the differentiable ``torch.cdist``, so the gradient reaches every predicted
point that creates or kills a class (DESIGN.md's recipe). The loss is the Wasserstein
distance (``order``; L-infinity ground metric) between the predicted and the true diagram,
summed over dimensions and averaged over the first ``windows`` windows of the batch (each
window counted with its mean token weight when repeats are down-weighted).

Expensive and CPU-bound (gudhi and the matching run on the CPU): it runs every ``every``
steps (default 10) and logs its seconds per call (``ph/seconds``). Causal models only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from losses.common import LossConfig, next_base_probs, require_per_base, window_weights
from nucleo.core.registry import LOSSES
from nucleo.core.representations import cgr_points, corners, diagrams, onehot, wasserstein
from nucleo.core.schema import check
from nucleo.core.types import Batch, LossOutput, ModelOutput


@dataclass
class PersistentHomologyConfig(LossConfig):
    """points: trajectory points per window (Rips cost grows fast: ~1 ms at 200 points, up to
    ~0.8 s at 1000). windows: windows of each batch scored. max_dimension: 0 (components) or
    1 (and loops). order: Wasserstein order. corners: the chaos game's (see ``cgr``).
    every: default 10 (steps between calls)."""

    every: int = 10
    points: int = 128
    windows: int = 2
    max_dimension: int = 1
    order: float = 1.0
    corners: Literal["tetrahedron", "square", "onehot"] = "tetrahedron"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(4 <= self.points <= 2000, "points", f"must be in 4..2000, got {self.points}")
        check(self.windows >= 1, "windows", f"must be >= 1, got {self.windows}")
        check(self.max_dimension in (0, 1), "max_dimension", "must be 0 or 1")
        check(self.order >= 1, "order", f"must be >= 1, got {self.order}")


def subsample(points: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced rows of points [n, dim] (all of them if n <= count)."""
    if len(points) <= count:
        return points
    index = torch.linspace(0, len(points) - 1, count, device=points.device).round().long()
    return points[index]


@LOSSES.register("ph", config=PersistentHomologyConfig)
class PersistentHomology:
    """Wasserstein distance between persistence diagrams of predicted and true CGR clouds."""

    views = ("forward",)
    requires_causal: bool | None = True

    def __init__(self, cfg: PersistentHomologyConfig, tokenizer: Any = None) -> None:
        require_per_base("ph", tokenizer)
        self.cfg = cfg
        self.corner = corners(cfg.corners)

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        started = time.perf_counter()
        cfg = self.cfg
        logits = outputs["forward"].logits[: cfg.windows]
        probs, targets, valid = next_base_probs(logits, batch.tokens[: cfg.windows])
        corner = self.corner.to(probs.device, probs.dtype)
        predicted = cgr_points(probs, valid, corner)  # [W, T, dim]
        true = cgr_points(onehot(targets, probs.dtype), valid, corner)
        total = probs.sum() * 0.0  # keeps the graph when no window has points
        h0, h1 = torch.zeros(()), torch.zeros(())
        scored = 0
        shares = window_weights(batch)
        weight_sum = 0.0
        for w in range(len(probs)):
            keep = valid[w]
            if keep.sum() < 4:
                continue
            a = subsample(predicted[w][keep], cfg.points).cpu().double()
            b = subsample(true[w][keep], cfg.points).cpu().double()
            distances = [
                wasserstein(da, db, cfg.order)
                for da, db in zip(
                    diagrams(a, cfg.max_dimension), diagrams(b, cfg.max_dimension), strict=True
                )
            ]
            share = 1.0 if shares is None else float(shares[w])
            total = total + share * sum(distances).to(total.device, total.dtype)
            h0 = h0 + distances[0].detach()
            if cfg.max_dimension >= 1:
                h1 = h1 + distances[1].detach()
            scored += 1
            weight_sum += share
        n = max(scored, 1)
        metrics = {
            "h0": (h0 / n).float(),
            "h1": (h1 / n).float(),
            "seconds": torch.tensor(time.perf_counter() - started),
        }
        return LossOutput(loss=total / max(weight_sum, 1e-8), metrics=metrics)
