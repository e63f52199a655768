"""Data types that cross the seams between data, architectures, losses and the trainer.

Foundation module: imports only the other foundation modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nucleo.core.alphabet import PAD


class ModelOutput(NamedTuple):
    """What every architecture returns.

    hidden: [B, L, D] float, the last layer's states (after the final norm).
    logits: [B, L, V] float, next-token logits for causal models, per-position for bidirectional.

    A named tuple, not a dataclass: DeepSpeed's ZeRO-3 hooks find the tensors in a module's
    outputs only inside tuples, lists and dicts.
    """

    hidden: torch.Tensor
    logits: torch.Tensor


@dataclass
class LossOutput:
    """What every loss (and the objective) returns.

    loss: scalar tensor with grad. metrics: detached scalar tensors to log (names without the
    loss's prefix); kept as tensors so that logging does not force a device sync every step.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """A micro-batch of windows.

    tokens: [B, L] int64 token ids; trailing positions may be padding.
    kingdom: [B] int64 index into ``kingdoms``.
    kingdoms: names of the kingdoms, in the order of the indices.
    pad_id: the padding token of the tokenizer (losses ignore it).
    views: token tensors by view name, filled by the objective (``"forward"`` is ``tokens``,
        ``"rc"`` its reverse complement) and by losses that make their own (``"masked"``).
    aux: tensors a loss's ``prepare`` keeps for its own call (e.g. the MLM-selected positions),
        keyed ``"<loss>/<name>"``.
    repeat: [B, L] float32, the fraction of each token's bases that the genome soft-masks as
        repeats (lower case in the shards; 0 for padding); None when the shards carry no mask.
    weights: [B, L] float32 per-token loss weights, or None (all 1): the objective sets them for
        each loss from ``repeat`` and the loss's repeat weight (1 - (1 - w) x repeat).
    """

    tokens: torch.Tensor
    kingdom: torch.Tensor
    kingdoms: tuple[str, ...]
    pad_id: int = PAD
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    repeat: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            tokens=self.tokens.to(device, non_blocking=True),
            kingdom=self.kingdom.to(device, non_blocking=True),
            kingdoms=self.kingdoms,
            pad_id=self.pad_id,
            views={k: v.to(device, non_blocking=True) for k, v in self.views.items()},
            aux={k: v.to(device, non_blocking=True) for k, v in self.aux.items()},
            repeat=move(self.repeat),
            weights=move(self.weights),
        )
