"""One optimizer step through a DeepSpeed engine: the loop body shared by pretraining
(``nucleo.train.trainer``) and fine-tuning (``nucleo.downstream.finetune``).

Each of ``grad_accum`` micro-batches goes to the device, through the objective (which calls
the engine's forward), backward, and ``engine.step()`` (DeepSpeed steps the optimizer and the
schedule at the accumulation boundary). Dropout and other randomness are a function of (seed,
step, rank, micro-batch), so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from nucleo.core.types import LossOutput


class Movable(Protocol):
    """A micro-batch: anything that moves itself to a device."""

    def to(self, device: torch.device) -> Any: ...


class ObjectiveLike(Protocol):
    """What the step calls: ``objective(forward, batch, model, step) -> LossOutput``, with
    ``forward`` the engine (its forward) and ``model`` the bare module (its attributes)."""

    def __call__(
        self, forward: Callable[..., Any], batch: Any, model: nn.Module, step: int | None = None
    ) -> LossOutput: ...


@dataclass
class Accumulated:
    """Metric sums over the micro-batches since the last log, and how many gave each."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, metrics: dict[str, torch.Tensor], device: torch.device) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, torch.zeros((), device=device)) + value
            self.counts[key] = self.counts.get(key, 0) + 1


def optimizer_step(
    engine: Any,
    objective: ObjectiveLike,
    model: nn.Module,
    batches: Iterator[Movable],
    *,
    grad_accum: int,
    step: int,
    seed: int,
    rank: int,
    device: torch.device,
    metrics: Accumulated,
    before_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run optimizer step ``step`` (0-based) over ``grad_accum`` micro-batches; returns the
    summed loss (a detached float tensor on ``device``) and adds each micro-batch's metrics
    into ``metrics``. ``before_step(micro)`` runs after each backward, before ``engine.step``
    (where gradients are all-reduced and not yet clipped: the trainer reads their norm)."""
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        batch = next(batches).to(device)
        torch.manual_seed((seed * 1_000_003 + step) * 4099 + rank * 31 + micro)
        result = objective(engine, batch, model, step=step)
        step_loss += result.loss.detach().float()
        engine.backward(result.loss)
        if before_step is not None:
            before_step(micro)
        engine.step()
        metrics.add(result.metrics, device)
    return step_loss
