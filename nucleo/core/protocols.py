"""The seams as types: what the trainer, the objective and the exports expect of a tokenizer
and a loss, whichever family, package or plugin provides them.

Structural (``typing.Protocol``): a component satisfies a seam by having these members, not by
inheriting from anything here. The type checker holds the train layer to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from nucleo.core.types import Batch, LossOutput, ModelOutput


class Tokenizer(Protocol):
    """Bases <-> token ids. Ids 0-8 are the character alphabet's (A C G T N and the specials,
    ``nucleo.core.alphabet``) in every tokenizer, so base ids stay 0..3."""

    name: str
    pad_id: int
    mask_id: int
    bos_id: int
    eos_id: int
    n_id: int

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_bases_per_token(self) -> int: ...

    @property
    def bases_per_token(self) -> np.ndarray:
        """[vocab_size] bases each id stands for (0 for the specials)."""
        ...

    def encode(self, seq: bytes | bytearray | str | np.ndarray) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def save(self, directory: str | Path) -> Path: ...


class Loss(Protocol):
    """A loss: the views it needs (``forward``, ``rc``, or one it makes in ``prepare``) and
    ``loss(batch, outputs, model) -> LossOutput`` (scalar loss, detached metrics)."""

    views: ClassVar[tuple[str, ...]]
    requires_causal: ClassVar[bool | None]

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput: ...
