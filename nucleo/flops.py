"""Analytic compute of a model: FLOPs per forward pass, by kind of work, per architecture.

C = 6 N D (Kaplan et al. 2020) counts 2 FLOPs per parameter per token forward and twice that
backward. It misses what makes Hyena and SSMs different: FFT convolutions (O(L log L) per
channel), the selective scan (O(E N) per token), attention (O(L) per token), and filters that
are computed once per forward and shared across the batch. So compute is counted here per
layer type, for a batch of ``batch`` sequences of ``seq_len`` tokens:

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

Elementwise work (norms, activations, gates, rotary) is not counted. Training compute is taken
as 3 x forward (backward ~ 2 x forward), per backbone pass: a step that also runs the reverse
complement strand (``rc``) pays twice. ``matmul``, ``attention``, ``conv`` and ``readout`` are
what ``torch.utils.flop_counter`` sees in the pure-PyTorch paths (the compiled CPU scan hides
its readout); tests/test_flops.py holds the two to each other.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable

from torch import nn

from architectures.caduceus import RCPS, Caduceus, RCPSBlock
from architectures.hyena import HyenaOperator
from architectures.layers import MLP, Block, LanguageModel
from architectures.mamba import BiMamba, MambaMixer
from architectures.multires import MultiresMixer
from architectures.transformer import Attention

#: Kinds that torch.utils.flop_counter also counts (matrix products and convolutions).
COUNTED_BY_TORCH = ("matmul", "attention", "conv", "readout")
TRAIN_MULTIPLIER = 3  # forward + backward (~2 x forward)

Flops = Counter  # kind -> FLOPs (float)


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape, also under ZeRO-3 (which leaves an empty local tensor and
    keeps the real shape in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _linear(layer: nn.Linear, rows: float) -> float:
    return 2.0 * layer.in_features * layer.out_features * rows


def _rfft(n: int) -> float:
    """FLOPs of a real FFT of n points (half of a complex radix-2 FFT's 5 n log2 n)."""
    return 2.5 * n * math.log2(n)


def _attention(m: Attention, batch: int, length: int) -> Flops:
    d = m.qkv.in_features
    rows = batch * length
    return Flops(
        matmul=_linear(m.qkv, rows) + _linear(m.out_proj, rows),
        attention=4.0 * batch * length * length * d,
    )


def _hyena(m: HyenaOperator, batch: int, length: int) -> Flops:
    d, stages, rows = m.d_model, m.order - 1, batch * length
    n = 2 * length
    width = m.short_conv.in_channels
    filter_mlp = sum(_linear(x, length) for x in m.filter.mlp if isinstance(x, nn.Linear))
    per_channel = 2 * _rfft(n) + 6.0 * (n // 2 + 1) + 2.0 * length  # rfft, product, irfft, skip
    return Flops(
        matmul=_linear(m.in_proj, rows) + _linear(m.out_proj, rows) + filter_mlp,
        conv=2.0 * width * m.short_conv.kernel_size[0] * rows,
        fft=stages * d * (batch * per_channel + _rfft(n)),  # + each filter's spectrum, once
    )


def _mamba(m: MambaMixer, batch: int, length: int) -> Flops:
    rows, e, n = batch * length, m.inner, m.d_state
    return Flops(
        matmul=sum(_linear(x, rows) for x in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj)),
        conv=2.0 * e * _shape(m.conv_weight)[-1] * rows,
        scan=7.0 * e * n * rows,
        readout=2.0 * e * n * rows,
    )


def _bimamba(m: BiMamba, batch: int, length: int) -> Flops:
    """Two mixers whose shared in_proj and out_proj run once for both directions."""
    rows = batch * length
    shared = _linear(m.forward_mixer.in_proj, rows) + _linear(m.out_proj, rows)
    both = _mamba(m.forward_mixer, batch, length) + _mamba(m.reverse_mixer, batch, length)
    both["matmul"] -= shared
    return both


def _multires(m: MultiresMixer, batch: int, length: int) -> Flops:
    rows = batch * length
    d, k = _shape(m.conv.h0)[0], _shape(m.conv.h0)[-1]
    levels = m.conv.depth
    return Flops(
        matmul=_linear(m.out_proj, rows),
        tree=(4.0 * k * levels + 4.0) * d * rows,
    )


def _mlp(m: MLP, batch: int, length: int) -> Flops:
    return Flops(matmul=_linear(m.up, batch * length) + _linear(m.down, batch * length))


def _block(m: Block, batch: int, length: int) -> Flops:
    out = module_flops(m.mixer, batch, length)
    if m.mlp is not None:
        out += _mlp(m.mlp, batch, length)
    return out


def _rcps(m: RCPS, batch: int, length: int) -> Flops:
    one = module_flops(m.layer, batch, length)
    return one + one  # the same layer on each strand


def _rcps_block(m: RCPSBlock, batch: int, length: int) -> Flops:
    return _rcps(m.mixer, batch, length)


FORMULAS: dict[type, Callable[[nn.Module, int, int], Flops]] = {
    Attention: _attention,
    HyenaOperator: _hyena,
    MambaMixer: _mamba,
    BiMamba: _bimamba,
    MultiresMixer: _multires,
    MLP: _mlp,
    Block: _block,
    RCPS: _rcps,
    RCPSBlock: _rcps_block,
}


def module_flops(module: nn.Module, batch: int, length: int) -> Flops:
    """Forward FLOPs of one block or mixer on [batch, length] positions.

    A module without a formula counts its linear layers only, with a warning: add its formula
    to FORMULAS (a new family needs one).
    """
    for cls in type(module).__mro__:
        if cls in FORMULAS:
            return FORMULAS[cls](module, batch, length)
    warnings.warn(
        f"nucleo.flops has no formula for {type(module).__name__}; counting its linear "
        "layers only (the compute of its other operations is missing)",
        stacklevel=2,
    )
    rows = batch * length
    return Flops(matmul=sum(_linear(x, rows) for x in module.modules() if isinstance(x, nn.Linear)))


def forward_flops(model: LanguageModel, seq_len: int, batch: int = 1) -> Flops:
    """FLOPs of one forward pass of ``model`` on tokens [batch, seq_len], by kind."""
    out = Flops()
    for block in model.blocks:
        out += module_flops(block, batch, seq_len)
    rows = batch * seq_len
    vocab, width = model.embed.num_embeddings, model.embed.embedding_dim
    heads = 2 if isinstance(model, Caduceus) and model.cfg.rcps else 1  # one per strand
    out["matmul"] += heads * 2.0 * width * vocab * rows
    return out


class ComputeCounter:
    """Training FLOPs of a run's steps: 3 x forward, per backbone pass, per window.

    Forward FLOPs depend on the window length (attention and FFT terms), so they are cached
    per length: warm-up steps with shorter windows cost what they cost.
    """

    def __init__(self, model: LanguageModel, micro_batch: int) -> None:
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
