"""A run's training compute, from each family's analytic forward FLOPs.

Each family owns its formula (a ``flops(batch, length)`` method on its mixers and model; the
kinds and their arithmetic are in ``nucleo.core.cost``). Training compute is taken as 3 x
forward (backward ~ 2 x forward), per backbone pass: a step that also runs the reverse
complement strand (``rc``) pays twice. C = 6 N D (Kaplan et al. 2020) would miss what makes
Hyena and SSMs different (FFT convolutions, the selective scan, attention's L^2, filters
computed once per batch), so it is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from nucleo.core.cost import COUNTED_BY_TORCH, Flops, module_flops

__all__ = [
    "COUNTED_BY_TORCH",
    "TRAIN_MULTIPLIER",
    "ComputeCounter",
    "forward_flops",
    "module_flops",
]

TRAIN_MULTIPLIER = 3  # forward + backward (~2 x forward)


def forward_flops(model: nn.Module, seq_len: int, batch: int = 1) -> Flops:
    """FLOPs of one forward pass of ``model`` on tokens [batch, seq_len], by kind."""
    return module_flops(model, batch, seq_len)


class ComputeCounter:
    """Training FLOPs of a run's steps: 3 x forward, per backbone pass, per window.

    Forward FLOPs depend on the window length (attention and FFT terms), so they are cached
    per length: warm-up steps with shorter windows cost what they cost.
    """

    def __init__(self, model: nn.Module, micro_batch: int) -> None:
        self.model = model
        self.micro_batch = micro_batch
        self._cache: dict[int, float] = {}

    def forward_per_window(self, seq_len: int) -> float:
        """Forward FLOPs per window of ``seq_len`` tokens, in a micro-batch of micro_batch."""
        if seq_len not in self._cache:
            total = sum(forward_flops(self.model, seq_len, self.micro_batch).values())
            self._cache[seq_len] = total / self.micro_batch
        return self._cache[seq_len]

    def step(self, windows: int, seq_len: int, passes: int) -> float:
        """Training FLOPs of a step over ``windows`` windows with ``passes`` backbone passes."""
        return TRAIN_MULTIPLIER * passes * windows * self.forward_per_window(seq_len)

    def per_token(self, seq_len: int, passes: int = 1) -> float:
        """Training FLOPs per token at ``seq_len`` (passes: backbone passes per step)."""
        return TRAIN_MULTIPLIER * passes * self.forward_per_window(seq_len) / seq_len


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters (tied weights once) and non-embedding parameters."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - embedding}
