"""What every loss shares: the weight/schedule/cadence settings, and next-base predictions.

Not a loss (registers nothing); the losses' files import it, the objective reads the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from nucleo.core.representations import base_mask
from nucleo.core.schema import ConfigError, check
from nucleo.core.types import Batch


@dataclass
class LossConfig:
    """Settings of every loss.

    weight: multiplier of the loss in the total, at full strength.
    schedule: how the weight reaches full strength, in optimizer steps: "constant" (from step 0),
        "linear" (0 until ``start``, rising to full at ``start + ramp``), "step" (0 until
        ``start``, full from it).
    every: compute the loss every this many steps (1: every step); expensive losses (``ph``)
        run less often. Between, it is neither computed nor logged.
    repeat_weight: weight of soft-masked (repeat) bases in this loss, in [0, 1]; null takes
        ``data.repeat_weight``. Per-position losses weight each position; whole-window terms
        weight each window by its tokens' mean weight.
    """

    weight: float = 1.0
    schedule: Literal["constant", "linear", "step"] = "constant"
    start: int = 0
    ramp: int = 0
    every: int = 1
    repeat_weight: float | None = None

    def __post_init__(self) -> None:
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(self.start >= 0, "start", f"must be >= 0, got {self.start}")
        check(self.ramp >= 0, "ramp", f"must be >= 0, got {self.ramp}")
        check(
            self.schedule != "linear" or self.ramp > 0,
            "ramp",
            "must be > 0 with schedule: linear (steps from 0 to full weight)",
        )
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(
            self.repeat_weight is None or 0 <= self.repeat_weight <= 1,
            "repeat_weight",
            f"must be in [0, 1] (or null: data.repeat_weight), got {self.repeat_weight}",
        )

    def weight_at(self, step: int | None) -> float:
        """The weight at optimizer step ``step`` (None: full strength, as in validation)."""
        if step is None or self.schedule == "constant":
            return self.weight
        if step < self.start:
            return 0.0
        if self.schedule == "step":
            return self.weight
        return self.weight * min(1.0, (step - self.start) / self.ramp)

    def runs_at(self, step: int | None) -> bool:
        """Whether the loss is computed at ``step`` (always in validation: None)."""
        return step is None or step % self.every == 0


def next_base_probs(
    logits: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal model's predicted distribution over A, C, G, T for each next position.

    logits: [B, L, V] (position t predicts token t + 1); tokens: [B, L]. Returns probs
    [B, L-1, 4] float32 or float64 (the softmax restricted to the four bases and renormalised: the
    geometric losses place bases, not specials), targets [B, L-1] and valid [B, L-1] (the
    target is one of A, C, G, T).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 stays (gradchecks)
    probs = torch.softmax(logits[:, :-1, :4].to(dtype), dim=-1)
    targets = tokens[:, 1:]
    return probs, targets, base_mask(targets)


def require_per_base(loss: str, tokenizer: Any) -> None:
    """Refuse tokenizers whose tokens are not single bases (the geometric losses place one base
    per position: ids 0..3 must be A, C, G, T and nothing else may stand for bases)."""
    if tokenizer is not None and getattr(tokenizer, "max_bases_per_token", 1) != 1:
        raise ConfigError(
            "data.tokenizer",
            f"loss {loss!r} needs one token per base (char), not {tokenizer.name!r}",
        )


def token_weights(batch: Batch, shift: int = 0) -> torch.Tensor | None:
    """The batch's per-token loss weights from position ``shift`` on ([B, L - shift] float32;
    shift 1: the weights of next-token targets), or None when every weight is 1."""
    return None if batch.weights is None else batch.weights[:, shift:]


def weighted_mean(values: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None):
    """Mean of ``values`` over the positions ``keep`` (same shape, bool or float), each counted
    with its weight (None: 1). A batch whose kept weights sum to 0 gives 0."""
    w = keep.to(values.dtype)
    if weights is not None:
        w = w * weights.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1e-8)


def window_weights(batch: Batch) -> torch.Tensor | None:
    """[B] float32: each window's mean token weight over its non-padding tokens (the weight of
    a whole-window term), or None when every weight is 1."""
    if batch.weights is None:
        return None
    real = (batch.tokens != batch.pad_id).float()
    return (batch.weights * real).sum(-1) / real.sum(-1).clamp(min=1)
