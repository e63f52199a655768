"""MultiresConv (Shi, Wang & Fox, ICML 2023): multiresolution convolutional memory.

Per channel, two filters h0 (low-pass) and h1 (high-pass) of width K are shared by every
level of a stationary wavelet tree without downsampling: level j convolves the previous
low-pass output with both filters at dilation 2^j (causal: left padding). With J levels the
receptive field is (K - 1)(2^J - 1) + 1 positions; J is the smallest that covers ``max_len``.
The "fading" combination sums the high-pass outputs of every level, the last low-pass output
and the input, each with learned per-channel weights:

    y = w_skip * x + w_0 * lo_J + sum_j w_j * hi_j

The layer is O(L log L) and has no attention or FFT. A block is, as in the paper,
x + GLU(Linear(GELU(MultiresConv(norm(x))))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from architectures.cpu_ops import load_op
from architectures.layers import Block, LanguageModel, ModelConfig, float32_region, presets
from nucleo.core import cost
from nucleo.core.registry import ARCHITECTURES
from nucleo.core.schema import check


@dataclass
class MultiresConfig(ModelConfig):
    """MultiresConv settings (size, d_model, n_layers, checkpointing, autocast: ModelConfig).

    kernel_size: width K of h0 and h1 (2 is Haar-like). max_len: the sequence length the tree
    must cover; sets the depth J (longer inputs still run, beyond the receptive field).
    mlp_ratio: an extra MLP after each layer (0: none, as in the paper). dropout: after the
    activation and after the mixing.
    """

    PRESETS = presets(
        [
            ("tiny", 256, 4, {}),
            ("mini", 384, 6, {}),
            ("small", 512, 12, {}),
            ("base", 768, 18, {}),
            ("medium", 1280, 24, {}),
            ("large", 2048, 32, {}),
            ("xl", 3072, 48, {}),
        ]
    )

    kernel_size: int = 2
    max_len: int = 1024
    mlp_ratio: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.kernel_size >= 2, "kernel_size", f"must be >= 2, got {self.kernel_size}")
        check(self.max_len >= 2, "max_len", f"must be >= 2, got {self.max_len}")
        check(self.mlp_ratio >= 0, "mlp_ratio", "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    @property
    def depth(self) -> int:
        """Levels J so that (K - 1)(2^J - 1) + 1 >= max_len."""
        return max(1, math.ceil(math.log2((self.max_len - 1) / (self.kernel_size - 1) + 1)))


class _CompiledTree(torch.autograd.Function):
    """The tree through the compiled CPU op (``csrc/multires_tree.cpp``): one pass per channel
    row with its levels in cache; backward recomputes them. x [B, D, L], h0, h1 [D, K],
    w [D, J + 2], all float32 or float64."""

    @staticmethod
    def forward(ctx, op: Any, x: Tensor, h0: Tensor, h1: Tensor, w: Tensor) -> Tensor:
        ins = tuple(t.contiguous() for t in (x, h0, h1, w))
        ctx.save_for_backward(*ins)
        ctx.op = op
        return op.forward(*ins)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, h0, h1, w = ctx.saved_tensors
        gx, dh0, dh1, dw = ctx.op.backward(x, h0, h1, w, gy.contiguous())
        return None, gx, dh0, dh1, dw


class MultiresConv(nn.Module):
    """The multiresolution convolution with fading combination, [B, D, L] -> [B, D, L]."""

    def __init__(self, d_model: int, kernel_size: int, depth: int, kernels: str = "auto") -> None:
        super().__init__()
        self.kernels = kernels
        self.depth = depth
        scale = math.sqrt(2.0 / (2 * kernel_size))
        self.h0 = nn.Parameter(torch.empty(d_model, 1, kernel_size).uniform_(-1, 1) * scale)
        self.h1 = nn.Parameter(torch.empty(d_model, 1, kernel_size).uniform_(-1, 1) * scale)
        # columns: [w_0 (last low-pass), w_1..w_J (high-pass of level J..1), w_skip]
        self.w = nn.Parameter(
            torch.empty(d_model, depth + 2).uniform_(-1, 1) * math.sqrt(2.0 / (2 * depth + 4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, L] in any dtype -> [B, D, L] in x's dtype; the tree runs in float32 (its
        J cascaded low-pass filters would compound bf16 rounding)."""
        with float32_region(x.device):
            op = None
            if x.device.type == "cpu" and self.kernels != "off":
                op = load_op("multires_tree")
            if op is not None:  # recomputes its levels in backward itself
                h0, h1 = self.h0.float()[:, 0], self.h1.float()[:, 0]
                y = _CompiledTree.apply(op, x.float(), h0, h1, self.w.float())
            # The tree's intermediates are ~2J activations; keep only x and recompute them in
            # backward (elementwise work, cheap next to the memory it saves at long L).
            elif torch.is_grad_enabled() and x.requires_grad:
                y = checkpoint(self.tree, x.float(), use_reentrant=False)
            else:
                y = self.tree(x.float())
        return y.to(x.dtype)

    def tree(self, x: torch.Tensor) -> torch.Tensor:
        """Causal dilated convolutions as shifted multiply-adds (faster than dilated conv1d on
        CPU): tap k of a level at dilation d reads x[t - (K - 1 - k) d]. In x's dtype."""
        length, width = x.shape[-1], self.h0.shape[-1]
        h0, h1, w = (p.to(x.dtype) for p in (self.h0, self.h1, self.w))
        low, y, dilation = x, x * w[:, -1:], 1
        for level in range(self.depth, 0, -1):
            high_w = w[:, level : level + 1] * h1[:, :, width - 1]
            y = y.addcmul(high_w, low)  # tap K-1 has shift 0: the level's input itself
            new_low = low * h0[:, :, width - 1]
            reach = min(dilation * (width - 1), length)
            padded = F.pad(low, (reach, 0))
            for k in range(width - 1):
                shift = min((width - 1 - k) * dilation, length)
                tap = padded[..., reach - shift : reach - shift + length]
                new_low = new_low.addcmul_(h0[:, :, k], tap)
                y = y.addcmul_(w[:, level : level + 1] * h1[:, :, k], tap)
            low = new_low
            dilation *= 2
        return y.addcmul_(w[:, :1], low)

    def prefill(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoding state after x [B, D, L] (float32): per level (dilation 1, 2, 4, ...)
        a ring buffer [B, D, (K - 1) dilation + 1] of that level's input, position p in slot
        p mod its size (zeros before the start)."""
        width, length = self.h0.shape[-1], x.shape[-1]
        h0 = self.h0.float()
        rings, low, dilation = [], x, 1
        for _ in range(self.depth):
            size = (width - 1) * dilation + 1
            ring = low.new_zeros(*low.shape[:-1], size)
            kept = min(length, size)  # positions length - kept.. go to slots from `slot` on
            slot, first = (length - kept) % size, min(kept, size - (length - kept) % size)
            ring[..., slot : slot + first] = low[..., length - kept : length - kept + first]
            ring[..., : kept - first] = low[..., length - kept + first :]
            rings.append(ring)
            reach = min(dilation * (width - 1), length)  # the next level's input, as in tree
            padded, new_low = F.pad(low, (reach, 0)), low * h0[:, :, width - 1]
            for k in range(width - 1):
                shift = min((width - 1 - k) * dilation, length)
                new_low = new_low.addcmul_(h0[:, :, k], padded[..., reach - shift :][..., :length])
            low, dilation = new_low, dilation * 2
        return rings

    def step(self, x: torch.Tensor, rings: list[torch.Tensor], position: int) -> torch.Tensor:
        """Position ``position``'s output [B, D] from its input x [B, D] (float32), each level
        reading K taps from its ring buffer (updated in place): O(depth x K) per token."""
        width = self.h0.shape[-1]
        h0, h1, w = self.h0.float()[:, 0], self.h1.float()[:, 0], self.w.float()  # [D, K]
        low, y, dilation = x, x * w[:, -1], 1
        for level, ring in zip(range(self.depth, 0, -1), rings, strict=True):
            size = ring.shape[-1]
            ring[..., position % size] = low
            slots = [(position - (width - 1 - k) * dilation) % size for k in range(width)]
            taps = ring[..., slots]  # [B, D, K]: inputs at lags (K-1) d .. 0
            y = y + w[:, level] * (taps * h1).sum(-1)
            low = (taps * h0).sum(-1)
            dilation *= 2
        return y + w[:, 0] * low

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formulation with dilated ``conv1d`` (slow on CPU); for tests."""
        channels, width = x.shape[1], self.h0.shape[-1]
        low, y, dilation = x, x * self.w[:, -1:], 1
        for level in range(self.depth, 0, -1):
            padded = F.pad(low, (dilation * (width - 1), 0))
            high = F.conv1d(padded, self.h1, dilation=dilation, groups=channels)
            low = F.conv1d(padded, self.h0, dilation=dilation, groups=channels)
            y = y + self.w[:, level : level + 1] * high
            dilation *= 2
        return y + self.w[:, :1] * low


@dataclass
class MultiresState:
    """A MultiresMixer's decoding state: per tree level a ring buffer of its input
    (``MultiresConv.prefill``) and the next position."""

    rings: list[Tensor]
    position: int


class MultiresMixer(nn.Module):
    """MultiresConv -> GELU -> dropout -> Linear(D, 2D) -> GLU, on [B, L, D]."""

    def __init__(self, cfg: MultiresConfig) -> None:
        super().__init__()
        self.conv = MultiresConv(cfg.d_model, cfg.kernel_size, cfg.depth, cfg.kernels)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_proj = nn.Linear(cfg.d_model, 2 * cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous [B, D, L]: the tree's shifted taps on a transposed view run ~1.3x slower
        y = self.conv(x.transpose(1, 2).contiguous()).transpose(1, 2)
        return F.glu(self.out_proj(self.drop(F.gelu(y))), dim=-1)

    def prefill(self, x: torch.Tensor, window: int) -> tuple[torch.Tensor, MultiresState]:
        """The forward on a prompt x [B, L, D], and per level the ring buffer of its input
        (``window`` does not apply: the tree's reach is fixed)."""
        with float32_region(x.device):
            rings = self.conv.prefill(x.transpose(1, 2).float().contiguous())
        return self(x), MultiresState(rings, x.shape[1])

    def step(self, x: torch.Tensor, state: MultiresState) -> torch.Tensor:
        """One position x [B, D] -> [B, D]."""
        with float32_region(x.device):
            y = self.conv.step(x.float(), state.rings, state.position).to(x.dtype)
        state.position += 1
        return F.glu(self.out_proj(self.drop(F.gelu(y))), dim=-1)

    def flops(self, batch: int, length: int) -> cost.Flops:
        """The output projection, and 4 K D per level per token for the dilated taps (plus
        the mix)."""
        rows = batch * length
        d, k = cost.shape(self.conv.h0)[0], cost.shape(self.conv.h0)[-1]
        return cost.Flops(
            matmul=cost.linear(self.out_proj, rows),
            tree=(4.0 * k * self.conv.depth + 4.0) * d * rows,
        )


@ARCHITECTURES.register("multires", config=MultiresConfig)
class Multires(LanguageModel):
    """MultiresNet: causal multiresolution convolutions with GLU mixing."""

    causal = True

    def __init__(
        self, cfg: MultiresConfig, vocab_size: int, complement_ids: list[int] | None = None
    ) -> None:
        blocks = [
            Block(MultiresMixer(cfg), cfg.d_model, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.n_layers)
        ]
        super().__init__(cfg, vocab_size, blocks)
