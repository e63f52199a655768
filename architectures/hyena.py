"""Hyena, as in HyenaDNA (Poli et al. 2023; Nguyen et al. 2023).

One Hyena operator of order N on x [B, L, D]:

    x0, x1, ..., x_{N-1}, v = split(short_conv(in_proj(x)))      (N + 1 branches of width D)
    for i = N-1 .. 1:   v = long_conv(v * x_i, h_i)               (FFT, O(L log L))
    y = out_proj(v * x0)

The long filters h_i [D, L] are implicit: a small MLP with sine activations over positional
features of t (t / max_len and sine/cosine bands), times an exponential decay per channel
(fast to slow), plus a per-channel skip term. Causal by default (filters on lags >= 0 and a
left-padded short conv); ``causal: false`` gives two-sided filters (lags -(L-1)..L-1, a second
set of MLP outputs) and a centred short conv, for masked-LM.

The block is HyenaDNA's: x + Hyena(norm(x)), then x + MLP(norm(x)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from architectures.incremental import History
from architectures.layers import (
    Block,
    LanguageModel,
    ModelConfig,
    Padding,
    float32_region,
    like_weights,
    presets,
)
from nucleo.core import cost
from nucleo.core.registry import ARCHITECTURES
from nucleo.core.schema import check


@dataclass
class HyenaConfig(ModelConfig):
    """Hyena settings (size, d_model, n_layers, checkpointing, autocast: see ModelConfig).

    order: number of long convolutions plus one (HyenaDNA: 2). filter_order: width of the
    implicit filter MLP. emb_dim: positional features (t plus (emb_dim - 1) / 2 sine/cosine
    pairs; odd, >= 3). short_filter: width of the depthwise conv on the projections.
    max_len: the context the filters are scaled to (HyenaDNA's l_max; positions enter as
    t / max_len and the decay reaches 1e-2 at t = max_len for the fastest channels; longer
    inputs work, the filters extrapolate). sine_freq: initial frequency of the sine
    activations. mlp_ratio: MLP width after each operator (0: none). causal: next-token or
    two-sided filters.
    """

    PRESETS = presets(
        [
            ("tiny", 128, 2, {}),
            ("mini", 192, 4, {}),
            ("small", 256, 8, {}),
            ("base", 384, 12, {}),
            ("medium", 640, 16, {}),
            ("large", 1024, 20, {}),
            ("xl", 1536, 32, {}),
        ]
    )

    order: int = 2
    filter_order: int = 64
    emb_dim: int = 5
    short_filter: int = 3
    max_len: int = 1024
    sine_freq: float = 1.0
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    causal: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.order >= 2, "order", f"must be >= 2, got {self.order}")
        check(self.filter_order >= 1, "filter_order", "must be >= 1")
        check(self.emb_dim >= 3 and self.emb_dim % 2 == 1, "emb_dim", "must be odd and >= 3")
        check(self.short_filter >= 1, "short_filter", "must be >= 1")
        check(self.max_len >= 1, "max_len", "must be >= 1")
        check(self.mlp_ratio >= 0, "mlp_ratio", "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


def _fft_conv(u: torch.Tensor, k_f: torch.Tensor, n: int) -> torch.Tensor:
    """Linear convolution of u [B, C, L] with the kernel whose n-point spectrum is k_f."""
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n)[..., : u.shape[-1]]


class HyenaRecurrence(torch.autograd.Function):
    """The Hyena recurrence, fused: for each stage i, z = v * x_i, v = conv(z, k_i) + bias_i * z;
    then y = v * x0. Float32 throughout.

    v, x0: [B, D, L]; gates: N-1 tensors [B, D, L] (x_{N-1} first, the order they apply);
    kernels: [N-1, D, K] lags of a circular kernel of size n = 2L (K = L: causal lags 0..L-1;
    K = 2L: two-sided, lags -(L-1)..-1 at L+1..2L-1); biases: [N-1, D].

    Autograd would keep every complex spectrum and product of the forward; this keeps only each
    stage's input v and the real kernels, and recomputes the rest in backward (one extra FFT
    per stage, one for the kernels): about four fewer activations in memory per stage, and
    fewer passes over memory.
    """

    @staticmethod
    def forward(ctx, v, x0, kernels, biases, *gates):  # type: ignore[override]
        n = 2 * v.shape[-1]
        k_f = torch.fft.rfft(kernels, n=n)
        inputs = []
        for i, gate in enumerate(gates):
            inputs.append(v)
            z = v * gate
            # a fresh [B, D, L] result: a slice of irfft's [B, D, 2L] output, saved below,
            # would keep the whole 2L buffer alive until backward
            v = (z * biases[i, :, None]).add_(_fft_conv(z, k_f[i], n))
        del k_f  # its spectrum is recomputed in backward: kernels take half the memory
        ctx.save_for_backward(x0, kernels, biases, v, *inputs, *gates)
        return v * x0

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x0, kernels, biases, v, *rest = ctx.saved_tensors
        stages = len(rest) // 2
        inputs, gates = rest[:stages], rest[stages:]
        length = grad.shape[-1]
        n = 2 * length
        k_f = torch.fft.rfft(kernels, n=n)
        grad_x0 = grad * v
        g = grad * x0  # d loss / d (output of the current stage)
        grad_gates: list[torch.Tensor] = [grad] * stages
        grad_k_f = torch.empty_like(k_f)
        grad_biases = torch.empty_like(biases)
        for i in reversed(range(stages)):
            z = inputs[i] * gates[i]
            g_f = torch.fft.rfft(g, n=n)
            grad_k_f[i] = (g_f * torch.fft.rfft(z, n=n).conj()).sum(0)
            grad_biases[i] = (g * z).sum((0, 2))
            grad_z = torch.fft.irfft(g_f * k_f[i].conj(), n=n)[..., :length]
            grad_z.addcmul_(g, biases[i, :, None])
            grad_gates[i] = grad_z * inputs[i]
            g = grad_z * gates[i]
        # k_f = rfft(k, n) is linear in k: d loss / dk = irfft-adjoint of grad_k_f.
        grad_kernels = torch.fft.irfft(grad_k_f, n=n)[..., : kernels.shape[-1]]
        return g, grad_x0, grad_kernels, grad_biases, *grad_gates


def hyena_recurrence_reference(v, x0, kernels, biases, *gates) -> torch.Tensor:
    """HyenaRecurrence with plain autograd and convolution as a sum over lags (O(L^2)); tests."""
    for i, gate in enumerate(gates):
        z = v * gate
        v = conv_reference(z, kernels[i], biases[i])
    return v * x0


def conv_reference(u: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y[t] = sum over lags of u[t - lag] k[lag mod 2L] + bias u[t]; u [B, C, L], k [C, K]."""
    length = u.shape[-1]
    n = 2 * length
    y = u * bias[:, None]
    for lag in range(-(length - 1), length):
        index = lag % n
        if index >= k.shape[-1]:
            continue
        shifted = torch.roll(F.pad(u, (0, length)), lag, dims=-1)[..., :length]
        y = y + shifted * k[:, index, None]
    return y


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature."""

    def __init__(self, dim: int, freq: float) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), freq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Long filters h [channels, L] from an MLP over positional features, times a decay.

    channels = (order - 1) * D (times 2 when two-sided: one set for negative lags).
    positionwise_chunk: when > 0 (set under checkpointing) and L is longer, the MLP runs over
    checkpointed pieces of that many positions: its activations would otherwise take
    ~7 x filter_order x L floats (1.9 GB per layer at 2^20 positions).
    """

    positionwise_chunk: int = 0

    def __init__(self, cfg: HyenaConfig, channels: int) -> None:
        super().__init__()
        self.emb_dim = cfg.emb_dim
        self.max_len = cfg.max_len
        width = cfg.filter_order
        self.mlp = nn.Sequential(
            nn.Linear(cfg.emb_dim, width),
            Sin(width, cfg.sine_freq),
            nn.Linear(width, width),
            Sin(width, cfg.sine_freq),
            nn.Linear(width, width),
            Sin(width, cfg.sine_freq),
            nn.Linear(width, channels, bias=False),
        )
        for layer in self.mlp:  # PyTorch's default init: long filters from the start
            if isinstance(layer, nn.Linear):
                layer.keep_init = True  # type: ignore[assignment]
        # HyenaDNA's ExponentialModulation: decay to 1e-2 by t = 0.3 (fast) .. 1.5 (slow).
        target = math.log(1e-2)
        self.register_buffer(
            "decay", torch.linspace(target / 1.5, target / 0.3, channels).abs(), persistent=False
        )

    def features(
        self, start: int, stop: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positional features [n, emb_dim] and t [n, 1] (t = position / max_len) of positions
        start..stop-1."""
        pos = torch.arange(start, stop, device=device, dtype=torch.float32)
        t = (pos / self.max_len)[:, None]
        bands = (self.emb_dim - 1) // 2
        freqs = torch.linspace(1e-4, bands - 1, bands, device=device)
        angle = 2 * math.pi * t * freqs
        return torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1), t

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        """[channels, L] float32."""
        chunk = self.positionwise_chunk
        if chunk and length > chunk and torch.is_grad_enabled():
            starts = range(0, length, chunk)
            pieces = [
                checkpoint(self.rows, a, min(a + chunk, length), device, use_reentrant=False)
                for a in starts
            ]
            return torch.cat(pieces).t()
        return self.rows(0, length, device).t()

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """[stop - start, channels] float32: the filters at lags start..stop-1.

        The MLP runs in its weights' dtype (bf16 weights: bf16, as under autocast); the
        filters leave in float32, for the FFT.
        """
        z, t = self.features(start, stop, device)
        return self.mlp(like_weights(z, self.mlp[0])).float() * torch.exp(-t * self.decay.float())


@dataclass
class HyenaState:
    """A causal Hyena operator's decoding state: ``short`` [B, (N+1) D, width - 1] (the short
    conv's last inputs), ``history`` (per long convolution, its last ``window`` inputs) and
    ``reversed_lags`` [N-1, D, K] (the filters at lags K-1..0, K growing as needed)."""

    short: torch.Tensor
    history: list[History]
    reversed_lags: torch.Tensor | None
    window: int

    def lags(self, op: HyenaOperator, n: int, device: torch.device) -> torch.Tensor:
        """[N-1, D, n]: the filters at lags n-1..0 (computed for twice as many when short)."""
        have = 0 if self.reversed_lags is None else self.reversed_lags.shape[-1]
        if have < n:
            self.reversed_lags = op.kernels(min(self.window, max(2 * n, 64)), device).flip(-1)
            have = self.reversed_lags.shape[-1]
        assert self.reversed_lags is not None
        return self.reversed_lags[..., have - n :]


class HyenaOperator(nn.Module):
    """The Hyena operator of order N, [B, L, D] -> [B, L, D]."""

    takes_padding = True

    def __init__(self, cfg: HyenaConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.d_model = d
        self.order = cfg.order
        self.causal = cfg.causal
        self.in_proj = nn.Linear(d, (cfg.order + 1) * d)
        self.out_proj = nn.Linear(d, d)
        width = cfg.short_filter
        self.short_pad = (width - 1, 0) if cfg.causal else ((width - 1) // 2, width // 2)
        self.short_conv = nn.Conv1d(
            (cfg.order + 1) * d, (cfg.order + 1) * d, width, groups=(cfg.order + 1) * d
        )
        sides = 1 if cfg.causal else 2
        self.filter = ImplicitFilter(cfg, (cfg.order - 1) * d * sides)
        self.filter_bias = nn.Parameter(torch.randn((cfg.order - 1) * d))  # skip term
        self.drop = nn.Dropout(cfg.dropout)

    def kernels(self, length: int, device: torch.device) -> torch.Tensor:
        """[order - 1, D, K]: K = L lags (causal) or the 2L circular lags (two-sided)."""
        h = self.filter(length, device).view(-1, self.order - 1, self.d_model, length)
        if self.causal:
            return h[0]
        forward, backward = h[0], h[1]  # lags 0..L-1 and -0..-(L-1)
        zero = forward.new_zeros(*forward.shape[:-1], 1)
        return torch.cat([forward, zero, backward[..., 1:].flip(-1)], dim=-1)

    def forward(self, x: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        """x [B, L, D]. Two-sided with ``padding``: the projections are zeroed at pads before
        and after the short conv, so every long-conv input (v times a gate) is zero there and
        pads reach no real position (causal: right pads never do)."""
        length = x.shape[1]
        u = self.in_proj(x).transpose(1, 2)  # [B, (N+1) D, L]
        two_sided = padding is not None and not self.causal
        if two_sided:
            u = padding.zero(u, dim=2)
        u = self.short_conv(F.pad(u, self.short_pad))
        if two_sided:
            u = padding.zero(u, dim=2)
        *gates, v = u.split(self.d_model, dim=1)
        with float32_region(x.device):
            k = self.kernels(length, x.device)
            bias = self.filter_bias.view(self.order - 1, self.d_model).float()
            inner = [self.drop(g.float()) for g in reversed(gates[1:])]
            y = HyenaRecurrence.apply(v.float(), gates[0].float(), k, bias, *inner)
        return self.out_proj(like_weights(y.transpose(1, 2), self.out_proj))

    def prefill(self, x: torch.Tensor, window: int) -> tuple[torch.Tensor, HyenaState]:
        """The causal forward on a prompt x [B, L, D] (HyenaRecurrence's arithmetic, keeping
        each long convolution's input), and the state for ``step``: the short conv's last
        inputs and the last ``window`` inputs of each long convolution."""
        length = x.shape[1]
        projected = self.in_proj(x).transpose(1, 2)  # [B, (N+1) D, L]
        width = self.short_conv.kernel_size[0]
        u = self.short_conv(F.pad(projected, self.short_pad))
        short = F.pad(projected, (width - 1, 0))
        short = short[..., short.shape[-1] - (width - 1) :].contiguous()
        *gates, v = u.split(self.d_model, dim=1)
        state = HyenaState(short, [], None, window)
        with float32_region(x.device):
            kernels = self.kernels(length, x.device)
            bias = self.filter_bias.view(self.order - 1, self.d_model).float()
            v = v.float()
            k_f = torch.fft.rfft(kernels, n=2 * length)
            for i, gate in enumerate(reversed(gates[1:])):
                z = v * self.drop(gate.float())
                state.history.append(History(z, window))
                v = (z * bias[i, :, None]).add_(_fft_conv(z, k_f[i], 2 * length))
            y = v * gates[0].float()
        return self.out_proj(like_weights(y.transpose(1, 2), self.out_proj)), state

    def step(self, x: torch.Tensor, state: HyenaState) -> torch.Tensor:
        """One position x [B, D] -> [B, D]: the short conv over the kept inputs, then per long
        convolution one dot product of its input history with the filter's lags (exact)."""
        projected = self.in_proj(x)[:, :, None]  # [B, (N+1) D, 1]
        taps = torch.cat([state.short.to(projected.dtype), projected], dim=-1)
        state.short = taps[:, :, 1:]
        weight, conv_bias = self.short_conv.weight[:, 0], self.short_conv.bias
        u = (taps * weight.to(taps.dtype)).sum(-1) + conv_bias.to(taps.dtype)  # [B, (N+1) D]
        *gates, v = u.split(self.d_model, dim=1)
        with float32_region(x.device):
            bias = self.filter_bias.view(self.order - 1, self.d_model).float()
            v = v.float()
            for i, gate in enumerate(reversed(gates[1:])):
                z = v * self.drop(gate.float())
                history = state.history[i].append(z)  # [B, D, n], oldest first
                lags = state.lags(self, history.shape[-1], x.device)[i]  # [D, n], last lag first
                v = z * bias[i] + (history * lags).sum(-1)  # measured faster than einsum
            y = v * gates[0].float()
        return self.out_proj(like_weights(y, self.out_proj))

    def flops(self, batch: int, length: int) -> cost.Flops:
        """Projections and the filter MLP, the short conv, and per stage and channel an FFT
        convolution of n = 2L points (rfft, complex product, irfft, skip) plus each filter's
        spectrum once per batch."""
        d, stages, rows, n = self.d_model, self.order - 1, batch * length, 2 * length
        mlp = sum(cost.linear(x, length) for x in self.filter.mlp if isinstance(x, nn.Linear))
        per_channel = 2 * cost.rfft(n) + 6.0 * (n // 2 + 1) + 2.0 * length
        return cost.Flops(
            matmul=cost.linear(self.in_proj, rows) + cost.linear(self.out_proj, rows) + mlp,
            conv=2.0 * self.short_conv.in_channels * self.short_conv.kernel_size[0] * rows,
            fft=stages * d * (batch * per_channel + cost.rfft(n)),
        )


@ARCHITECTURES.register("hyena", config=HyenaConfig)
class Hyena(LanguageModel):
    """HyenaDNA: Hyena operators with implicit long filters, FFT convolutions and MLPs."""

    def __init__(
        self, cfg: HyenaConfig, vocab_size: int, complement_ids: list[int] | None = None
    ) -> None:
        blocks = [
            Block(HyenaOperator(cfg), cfg.d_model, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.n_layers)
        ]
        super().__init__(cfg, vocab_size, blocks)
        self.causal = cfg.causal
