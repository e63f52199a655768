"""The arithmetic of analytic compute, shared by every family's FLOP formula.

A module that does work other than linear layers says what it costs with a method
``flops(batch, length) -> Flops`` (forward FLOPs on [batch, length] positions, by kind); the
family owns the formula, ``module_flops`` asks for it, and ``nucleo.train.compute`` adds them up
for a run. The kinds:

    matmul      linear layers (projections, MLPs, the LM head, Hyena's filter MLP):
                2 x in x out per row
    attention   q k^T and attention x v: 4 x L^2 x D per sequence (the full matrix, as SDPA
                and torch.utils.flop_counter count it; a causal kernel may skip half)
    conv        depthwise convolutions (Hyena's short filter, Mamba's conv): 2 x C x K per token
    fft         Hyena's long convolutions: rfft and irfft of n = 2L points at 2.5 n log2 n each,
                6 FLOPs per complex product, the skip term; the filters' rfft once per batch
    scan        the selective scan's state update: 7 x E x N per token (discretise, decay, add)
    readout     the scan's y = C h: 2 x E x N per token (mamba-ssm counts 9 E N for the scan)
    tree        MultiresConv's dilated taps: 4 x K x D per level per token, plus the mix

Elementwise work (norms, activations, gates, rotary) is not counted. ``matmul``, ``attention``,
``conv`` and ``readout`` are what ``torch.utils.flop_counter`` sees in the pure-PyTorch paths;
tests/architectures/test_flops.py holds every family's formula to it.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


class Flops(dict[str, float]):
    """Forward FLOPs by kind (``Flops(matmul=..., fft=...)``); adds kind by kind, and a kind
    not present counts 0 (``flops["matmul"] -= shared``)."""

    def __init__(self, **kinds: float) -> None:
        super().__init__(kinds)

    def __missing__(self, kind: str) -> float:
        return 0.0

    def __add__(self, other: dict[str, float]) -> Flops:  # type: ignore[override]
        out = Flops(**self)
        out += other
        return out

    def __iadd__(self, other: dict[str, float]) -> Flops:  # type: ignore[override,misc]
        for kind, value in other.items():
            self[kind] = self[kind] + value
        return self


#: Kinds that torch.utils.flop_counter also counts (matrix products and convolutions).
COUNTED_BY_TORCH = ("matmul", "attention", "conv", "readout")


def shape(param: nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape, also under ZeRO-3 (which leaves an empty local tensor and
    keeps the real shape in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def linear(layer: nn.Linear, rows: float) -> float:
    """FLOPs of ``layer`` on ``rows`` rows: 2 x in x out each."""
    return 2.0 * layer.in_features * layer.out_features * rows


def rfft(n: int) -> float:
    """FLOPs of a real FFT of n points (half of a complex radix-2 FFT's 5 n log2 n)."""
    return 2.5 * n * math.log2(n)


def module_flops(module: nn.Module, batch: int, length: int) -> Flops:
    """Forward FLOPs of one block or mixer on [batch, length] positions: its own ``flops``.

    A module without one counts its linear layers only, with a warning (a new family's mixer
    should define ``flops(batch, length)``).
    """
    formula = getattr(module, "flops", None)
    if callable(formula):
        return formula(batch, length)
    warnings.warn(
        f"{type(module).__name__} has no formula for its FLOPs (a flops(batch, length) method); "
        "counting its linear layers only (the compute of its other operations is missing)",
        stacklevel=2,
    )
    from torch import nn

    rows = batch * length
    return Flops(matmul=sum(linear(x, rows) for x in module.modules() if isinstance(x, nn.Linear)))
