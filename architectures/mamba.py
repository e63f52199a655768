"""Mamba (Gu & Dao 2023): the selective state-space block, and its bidirectional form.

One Mamba mixer on x [B, L, D], with inner width E = expand * D and state size N:

    x, z = split(in_proj(x))                       [B, E, L] each
    x = silu(causal_depthwise_conv(x))             width d_conv
    dt, B, C = split(x_proj(x))                    input-dependent: [B, R, L], [B, N, L] x 2
    dt = softplus(dt_proj(dt))                     [B, E, L], step sizes
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D) * silu(z)
    out = out_proj(y)

On CPU the mixer runs channels last through nucleo's compiled ops (the conv + silu, and the
scan with softplus, D and the gate fused; ``architectures.selective_scan``); on CUDA, or with
``kernels: off``, through ``architectures.selective_scan.scan``: mamba-ssm's CUDA kernel when
installed, otherwise the chunked pure-PyTorch scan (tied to a sequential reference by tests).
``causal: false`` gives BiMamba (Caduceus, Schiff et al. 2024): a second mixer reads the
sequence backwards, sharing in_proj and out_proj with the forward one, and the two outputs add.
Blocks are x + Mixer(RMSNorm(x)) without an MLP, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from architectures.kernels import CAUSAL_CONV1D, SELECTIVE_SCAN, require_suitable
from architectures.layers import (
    Block,
    LanguageModel,
    ModelConfig,
    Padding,
    causal_depthwise_conv,
    float32_region,
    like_weights,
    presets,
)
from architectures.selective_scan import (
    MAX_KERNEL_STATE,
    causal_conv_silu_rows,
    compiled_op,
    scan,
    selective_scan_rows,
)
from nucleo.core import cost
from nucleo.core.registry import ARCHITECTURES
from nucleo.core.schema import check


@dataclass
class MambaConfig(ModelConfig):
    """Mamba settings (size, d_model, n_layers, checkpointing, autocast: see ModelConfig).

    d_state: N, the state size per channel. d_conv: width of the causal conv. expand: inner
    width E / D. dt_rank: rank R of the step-size projection (null: ceil(D / 16)).
    dt_min, dt_max: range of the initial step sizes (log-uniform). causal: false gives BiMamba.
    mlp_ratio: an MLP after each mixer (0: none, as in the paper).
    """

    PRESETS = presets(
        [
            ("tiny", 128, 4, {}),
            ("mini", 192, 8, {}),
            ("small", 256, 16, {}),
            ("base", 384, 24, {}),
            ("medium", 640, 30, {}),
            ("large", 1024, 40, {}),
            ("xl", 1536, 64, {}),
        ]
    )

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    causal: bool = True
    mlp_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.d_state >= 1, "d_state", "must be >= 1")
        check(self.d_conv >= 1, "d_conv", "must be >= 1")
        check(self.expand >= 1, "expand", "must be >= 1")
        check(self.dt_rank is None or self.dt_rank >= 1, "dt_rank", "must be >= 1 or null")
        check(0 < self.dt_min <= self.dt_max, "dt_min", "need 0 < dt_min <= dt_max")
        check(self.mlp_ratio >= 0, "mlp_ratio", "must be >= 0")
        require_suitable(self.kernels, self.kernel_problems())

    def kernel_problems(self) -> list[tuple[str, str]]:
        """(key, why) for each setting that a CUDA kernel cannot take: under kernels=auto
        that layer runs in PyTorch, under required the config is refused."""
        problems = []
        if not 2 <= self.d_conv <= 4:
            problems.append(("d_conv", f"causal-conv1d takes widths 2-4, not {self.d_conv}"))
        if self.d_state > MAX_KERNEL_STATE:
            problems.append(
                ("d_state", f"mamba-ssm takes d_state <= {MAX_KERNEL_STATE}, not {self.d_state}")
            )
        return problems


@dataclass
class MambaState:
    """A Mamba mixer's decoding state: conv [B, E, d_conv - 1] (the last conv inputs, oldest
    first) and h [B, E, N], both float32."""

    conv: torch.Tensor
    h: torch.Tensor


class MambaMixer(nn.Module):
    """One selective-SSM mixer, [B, L, D] -> [B, L, D], causal (left to right)."""

    uses_kernels = (CAUSAL_CONV1D, SELECTIVE_SCAN)

    def __init__(self, cfg: MambaConfig, d_model: int) -> None:
        super().__init__()
        self.kernels = cfg.kernels
        problems = dict(cfg.kernel_problems())
        self.conv_unsuitable = problems.get("d_conv")  # that kernel then runs in PyTorch
        inner = cfg.expand * d_model
        self.inner = inner
        self.d_state = cfg.d_state
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv_weight = nn.Parameter(
            torch.empty(inner, cfg.d_conv).uniform_(-1, 1) / math.sqrt(cfg.d_conv)
        )
        self.conv_bias = nn.Parameter(torch.zeros(inner))
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        # Mamba keeps PyTorch's default init for these (LanguageModel's normal(0.02) would
        # make B, C and the input nearly vanish), and its own for dt_proj.
        for layer in (self.in_proj, self.x_proj, self.dt_proj):
            layer.keep_init = True  # type: ignore[assignment]
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(inner, 1)
        )
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        self._init_steps(cfg)

    def _init_steps(self, cfg: MambaConfig) -> None:
        """Mamba's step-size init: dt_proj's bias is softplus^-1 of dt ~ log-uniform
        [dt_min, dt_max], so initial memories span short to long."""
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        log_dt = torch.rand(self.inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
        dt = torch.exp(log_dt + math.log(cfg.dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self, x: torch.Tensor, projected: bool = False, reverse: bool = False
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; ``projected``: x is in_proj's output [B, L, 2E] and the
        result is y [B, L, E] before out_proj (BiMamba shares both projections); ``reverse``:
        read the sequence from the end (the result stays in position order). A module call
        either way, so that ZeRO-3 gathers this mixer's parameters."""
        if projected:
            return self.mix(x, reverse)
        return self.out_proj(like_weights(self.mix(self.in_proj(x), reverse), self.out_proj))

    def mix(self, xz: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """The mixer between its projections: in_proj's output [B, L, 2E] -> y [B, L, E].
        On CPU, the compiled channels-last op (unless ``kernels: off``); else PyTorch."""
        if xz.device.type == "cpu" and self.kernels != "off" and compiled_op() is not None:
            return self._mix_compiled(xz, reverse)
        if reverse:
            return self._mix(xz.flip(1)).flip(1)
        return self._mix(xz)

    def _mix_compiled(self, xz: torch.Tensor, reverse: bool) -> torch.Tensor:
        """``_mix`` through the compiled CPU op: channels last throughout, no transposes, no
        flips; softplus, D and the gate inside the scan. [B, L, 2E] -> [B, L, E] float32."""
        with float32_region(xz.device):
            u, z = xz.float().chunk(2, dim=-1)  # [B, L, E] views
            u = causal_conv_silu_rows(u, self.conv_weight, self.conv_bias, reverse)
        delta, B, C = self._selection(like_weights(u, self.x_proj))
        with float32_region(xz.device):
            return selective_scan_rows(
                u,
                delta,
                -torch.exp(self.A_log.float()),
                B,
                C,
                self.D,
                z,
                delta_bias=self.dt_proj.bias,
                delta_softplus=True,
                reverse=reverse,
            )

    def _selection(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-dependent scan parameters from the conv output u [B, L, E]: delta
        [B, L, E] (dt_proj without its bias, which the scan adds before softplus), B, C
        [B, L, N]."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt @ self.dt_proj.weight.t().to(dt.dtype), B, C

    def _mix(self, xz: torch.Tensor) -> torch.Tensor:
        """The mixer in PyTorch (and mamba-ssm's kernels on CUDA), in their [B, E, L] layout:
        in_proj's output [B, L, 2E] -> y [B, L, E] float32."""
        u, z = xz.transpose(1, 2).chunk(2, dim=1)  # [B, E, L] each
        weight, bias = self.conv_weight.to(u.dtype), self.conv_bias.to(u.dtype)
        u = F.silu(causal_depthwise_conv(u, weight, bias, self.kernels, self.conv_unsuitable))
        delta, B, C = self._selection(u.transpose(1, 2))
        with float32_region(xz.device):
            y = scan(
                u.float(),
                delta.transpose(1, 2).float(),
                -torch.exp(self.A_log.float()),
                B.transpose(1, 2).float(),
                C.transpose(1, 2).float(),
                self.D.float(),
                z.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
                kernels=self.kernels,
            )
        return y.transpose(1, 2)

    def prefill(self, x: torch.Tensor, window: int) -> tuple[torch.Tensor, MambaState]:
        """The forward on a prompt x [B, L, D], and the state it leaves: the last d_conv - 1
        conv inputs and the SSM state h after position L - 1 (``window`` does not apply: the
        state is all the history there is). One scan gives both: N probe positions after the
        prompt, with step size 0 (h stays) and C the unit vectors, read h out one state
        coordinate at a time."""
        xz = self.in_proj(x)
        batch, length, n = x.shape[0], x.shape[1], self.d_state
        rows = xz.device.type == "cpu" and self.kernels != "off" and compiled_op() is not None
        width = self.conv_weight.shape[-1]
        with float32_region(x.device):
            u, z = xz.float().chunk(2, dim=-1)  # [B, L, E] each
            tail = u[:, max(0, length - width + 1) :].transpose(1, 2)
            conv = F.pad(tail, (width - 1 - tail.shape[-1], 0)).contiguous()  # [B, E, K - 1]
            weight, bias = self.conv_weight.float(), self.conv_bias.float()
            if rows:
                u = causal_conv_silu_rows(u, weight, bias)
            else:
                u = causal_depthwise_conv(u.transpose(1, 2), weight, bias, self.kernels,
                                          self.conv_unsuitable)  # fmt: skip
                u = F.silu(u).transpose(1, 2)
        delta, B, C = self._selection(like_weights(u, self.x_proj))
        with float32_region(x.device):
            probes = torch.eye(n, device=x.device).expand(batch, n, n)
            inputs = [
                F.pad(u, (0, 0, 0, n)),
                F.pad(delta.float(), (0, 0, 0, n), value=-1e4),  # softplus(-1e4 + bias) = 0
                F.pad(B.float(), (0, 0, 0, n)),
                torch.cat([C.float(), probes], dim=1),
            ]  # [B, L + N, *]
            A, D, dt_bias = -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias
            if rows:
                u_, delta_, B_, C_ = inputs
                y = selective_scan_rows(u_, delta_, A, B_, C_, D, None, dt_bias.float(), True)
            else:
                u_, delta_, B_, C_ = (t.transpose(1, 2) for t in inputs)
                y = scan(u_, delta_, A, B_, C_, D, None, dt_bias.float(), True, self.kernels)
                y = y.transpose(1, 2)
            assert y is not None
            h = y[:, length:].transpose(1, 2).contiguous()  # [B, E, N] (u = 0 there: no D u)
            y = y[:, :length] * F.silu(z)
        return self.out_proj(like_weights(y, self.out_proj)), MambaState(conv, h)

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One position x [B, D] -> [B, D]: the conv over the kept inputs, one state update
        h = exp(dt A) h + dt B u, and y = C h + D u, gated. O(1) in the position."""
        u, z = self.in_proj(x).float().chunk(2, dim=-1)  # [B, E]
        with float32_region(x.device):
            taps = torch.cat([state.conv, u[:, :, None]], dim=-1)  # [B, E, d_conv]
            state.conv = taps[:, :, 1:]
            u = F.silu((taps * self.conv_weight.float()).sum(-1) + self.conv_bias.float())
        delta, B, C = self._selection(like_weights(u, self.x_proj))
        with float32_region(x.device):
            dt = F.softplus(delta.float() + self.dt_proj.bias.float())[:, :, None]  # [B, E, 1]
            A = -torch.exp(self.A_log.float())
            state.h = torch.exp(dt * A) * state.h + dt * B.float()[:, None, :] * u[:, :, None]
            y = (state.h * C.float()[:, None, :]).sum(-1) + self.D.float() * u
            y = y * F.silu(z)
        return self.out_proj(like_weights(y, self.out_proj))

    def flops(self, batch: int, length: int) -> cost.Flops:
        """Projections, the causal conv, the scan's state update (7 E N per token) and its
        readout y = C h (2 E N)."""
        rows, e, n = batch * length, self.inner, self.d_state
        projections = (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        return cost.Flops(
            matmul=sum(cost.linear(x, rows) for x in projections),
            conv=2.0 * e * cost.shape(self.conv_weight)[-1] * rows,
            scan=7.0 * e * n * rows,
            readout=2.0 * e * n * rows,
        )


class BiMamba(nn.Module):
    """Forward mixer + a mixer over the reversed sequence, in_proj and out_proj shared
    (Caduceus's BiMamba with weight tying); outputs add. [B, L, D] -> [B, L, D].

    With padding the reverse mixer reads each sequence reversed within its own length, so
    right pads stay last in both directions and never reach a real position.
    """

    takes_padding = True

    def __init__(self, cfg: MambaConfig, d_model: int) -> None:
        super().__init__()
        self.forward_mixer = MambaMixer(cfg, d_model)
        self.reverse_mixer = MambaMixer(cfg, d_model)
        self.reverse_mixer.in_proj = self.forward_mixer.in_proj
        self.reverse_mixer.out_proj = self.forward_mixer.out_proj
        self.out_proj = self.forward_mixer.out_proj  # for the residual-projection init

    def forward(self, x: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        # the shared projections act per position, so each runs once for both directions:
        # in_proj(flip x) = flip in_proj(x); out_proj(a) + flip out_proj(b) = out_proj(a + flip b)
        xz = self.forward_mixer.in_proj(x)
        if padding is None:
            backward = self.reverse_mixer(xz, True, reverse=True)
        else:
            backward = padding.reverse(self.reverse_mixer(padding.reverse(xz), True))
        y = self.forward_mixer(xz, True) + backward
        return self.out_proj(like_weights(y, self.out_proj))

    def flops(self, batch: int, length: int) -> cost.Flops:
        """Two mixers whose shared in_proj and out_proj run once for both directions."""
        rows = batch * length
        shared = cost.linear(self.forward_mixer.in_proj, rows) + cost.linear(self.out_proj, rows)
        both = self.forward_mixer.flops(batch, length) + self.reverse_mixer.flops(batch, length)
        both["matmul"] -= shared
        return both


def mamba_mixer(cfg: MambaConfig, d_model: int) -> nn.Module:
    """The mixer of ``cfg``: Mamba when causal, BiMamba otherwise."""
    return MambaMixer(cfg, d_model) if cfg.causal else BiMamba(cfg, d_model)


@ARCHITECTURES.register("mamba", config=MambaConfig)
class Mamba(LanguageModel):
    """Mamba: selective state-space blocks (BiMamba with ``causal: false``)."""

    def __init__(
        self, cfg: MambaConfig, vocab_size: int, complement_ids: list[int] | None = None
    ) -> None:
        blocks = [
            Block(mamba_mixer(cfg, cfg.d_model), cfg.d_model, cfg.mlp_ratio)
            for _ in range(cfg.n_layers)
        ]
        super().__init__(cfg, vocab_size, blocks)
        self.causal = cfg.causal
