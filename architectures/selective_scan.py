"""Selective scan, the S6 operator of Mamba (Gu & Dao 2023), in pure PyTorch.

Argument conventions are those of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
so that the CUDA kernel can be swapped in (``scan`` does it on CUDA tensors when mamba-ssm is
installed)::

    u, delta, z: [b, d, L]   A: [d, n]   B, C: [b, n, L]   D, delta_bias: [d]   y: [b, d, L]

    dt_t = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        h: [b, d, n], h_{-1} = 0
    y_t  = sum_n C_t h_t + D * u_t,    then y = y * silu(z)

Four entry points:

- ``selective_scan``: the fast pure-PyTorch path. The sequence is cut into chunks of ``chunk``
  positions; a chunk's states (laid out [T, b, n, d]) come from a work-efficient (Blelloch)
  parallel scan that only multiplies decays exp(dt * A) <= 1, so it is stable for any step
  size; the state is carried from chunk to chunk. A custom autograd function keeps only the inputs
  and the state at each chunk start; backward recomputes a chunk's states and runs the reverse
  scan for the state gradient chunk by chunk from the last one, like the CUDA kernel. Memory
  is O(b d L + b d n (T + L / T)) instead of the O(b d n L) of autograd through a loop.
- ``selective_scan_compiled``: the recurrence in compiled C++ (``csrc/selective_scan.cpp``,
  built at first use by ``architectures.cpu_ops``): sequential over positions, vectorised over
  channels, states recomputed chunk by chunk in backward. 2-2.5x the chunked path in models.
- ``selective_scan_reference``: a plain loop over positions, for tests and benchmarks.
- ``scan``: mamba-ssm's CUDA kernel on CUDA tensors when it is installed; on CPU the compiled
  op (unless ``kernels="off"`` or it cannot be built); else ``selective_scan``.

Computation is in float32 (float64 when u is float64); the output has u's dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from architectures.cpu_ops import load_op
from architectures.kernels import SELECTIVE_SCAN, use

log = logging.getLogger("nucleo")

MAX_KERNEL_STATE = 256  # mamba-ssm's selective_scan_cuda takes d_state <= 256


def default_chunk(states_per_position: int) -> int:
    """Positions per chunk: chunk buffers [T, b, n, d] of about 2^18 floats, T a power of two
    in [32, 256]. Measured on CPU (one thread): b d n = 32768 -> 32 (16 to 32 are best),
    4096 -> 64, 1024 -> 256 (more per-op overhead than work below that)."""
    t = 1 << max(0, (2**18 // max(1, states_per_position)).bit_length() - 1)
    return min(256, max(32, t))


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _check_shapes(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None
) -> None:
    if u.dim() != 3 or A.dim() != 2 or delta.shape != u.shape or A.shape[0] != u.shape[1]:
        raise ValueError(f"need u, delta [b, d, L] and A [d, n]: {u.shape} {delta.shape} {A.shape}")
    (b, d, length), n = u.shape, A.shape[1]
    if B.shape != (b, n, length) or C.shape != (b, n, length):
        raise ValueError(f"need B, C [b, n, L] = {(b, n, length)}: got {B.shape} {C.shape}")
    if (D is not None and D.shape != (d,)) or (z is not None and z.shape != u.shape):
        raise ValueError(f"need D [d] and z [b, d, L] = {tuple(u.shape)}")


def _step_sizes(
    delta: Tensor, delta_bias: Tensor | None, softplus: bool, dtype: torch.dtype
) -> Tensor:
    """dt = softplus(delta + delta_bias), bias and softplus optional: [b, d, L]."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if softplus else dt


def _time_major(x: Tensor) -> Tensor:
    """[b, c, L] -> a new contiguous [L, b, c] (a 2-D transpose, which PyTorch does in blocks)."""
    b, c, length = x.shape
    out = x.new_empty((length, b, c))
    out.view(length, b * c).copy_(x.reshape(b * c, length).t())
    return out


def _batch_major(x: Tensor) -> Tensor:
    """[L, b, c] -> a new contiguous [b, c, L]."""
    length, b, c = x.shape
    out = x.new_empty((b, c, length))
    out.view(b * c, length).copy_(x.reshape(length, b * c).t())
    return out


def _scan_(
    a: Tensor, x: Tensor, h0: Tensor, reverse: bool = False, work: Tensor | None = None
) -> None:
    """In place along dim 0: x_t <- a_t * x_{t-1} + x_t, with x_{-1} = h0.

    reverse: x_t <- a_t * x_{t+1} + x_t, with x_T = h0. a, x: [T, ...], h0: [...].
    Blelloch's work-efficient scan: combine neighbouring pairs (their decays multiply), scan the
    half-length sequence of pair results recursively, then fill in the other member of each
    pair: about 3 elementwise products per element in log2(T) levels, and the only decays ever
    formed are products of decays, so nothing overflows. Overwrites a, unless a workspace
    ``work`` ([>= T // 2, ...]) is given for the products of pairs.
    """
    T = x.shape[0]
    if T == 1:
        x[0].addcmul_(a[0], h0)
        return
    m, odd = T // 2, T % 2
    if reverse:  # pairs (odd + 2j, odd + 2j + 1); the higher index comes first in scan order
        first, second = slice(odd + 1, T, 2), slice(odd, T, 2)
    else:  # pairs (2j, 2j + 1)
        first, second = slice(0, 2 * m, 2), slice(1, 2 * m, 2)
    fa, fx, sa, sx = a[first], x[first], a[second], x[second]
    sx.addcmul_(sa, fx)  # pair result: x_s + a_s x_f, with decay a_s a_f
    pair_decay = sa.mul_(fa) if work is None else torch.mul(sa, fa, out=work[:m])
    _scan_(pair_decay, sx, h0, reverse)  # sx <- the states at the second members
    if reverse:
        fx[:-1].addcmul_(fa[:-1], sx[1:])
        fx[-1].addcmul_(fa[-1], h0)
        if odd:
            x[0].addcmul_(a[0], x[1])
    else:
        fx[1:].addcmul_(fa[1:], sx[:-1])
        fx[0].addcmul_(fa[0], h0)
        if odd:
            x[T - 1].addcmul_(a[T - 1], x[T - 2])


def _through_gate(dy: Tensor, z: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Back through out = y * silu(z): (dL/dy, dL/dz in z's dtype), or (dy, None) without z.
    dy: dL/dout in the compute dtype; y: the output before the gate."""
    if z is None:
        return dy, None
    zc = z.to(dy.dtype)
    sz = torch.sigmoid(zc)
    dsilu = torch.sub(1, sz).mul_(zc).add_(1).mul_(sz)  # sz (1 + z (1 - sz))
    dz = dsilu.mul_(dy).mul_(y).to(z.dtype)
    return sz.mul_(zc).mul_(dy), dz


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


class _TimeMajor:
    """The inputs of the chunk loop, time-major so that a chunk is a contiguous slice and the
    states of one position a contiguous [b, n, d] block.

    dt, dtu (= dt * u): [L, b, 1, d]; B, C: [L, b, n, 1]; At (= A transposed): [n, d].
    A chunk, once done, may overwrite its slices of dt and dtu with results.
    """

    def __init__(self, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
        self.dt, self.dtu = _time_major(dt)[:, :, None], _time_major(dt * u)[:, :, None]
        self.B, self.C = _time_major(B)[..., None], _time_major(C)[..., None]
        self.At = A.t().contiguous()

    def decay(self, s: int, e: int, out: Tensor) -> Tensor:
        """a_t = exp(dt_t * A) for positions s..e-1 into out [e - s, b, n, d]."""
        return torch.mul(self.dt[s:e], self.At, out=out).exp_()

    def drive(self, s: int, e: int, out: Tensor) -> Tensor:
        """x_t = dt_t * B_t * u_t for positions s..e-1 into out [e - s, b, n, d]."""
        return torch.mul(self.B[s:e], self.dtu[s:e], out=out)


class _SelectiveScan(torch.autograd.Function):
    """Chunked selective scan with recomputation in backward; see ``selective_scan``.

    Saves the inputs and the state before each chunk ([chunks, b, n, d]), plus y before the
    gate when z is given. Peak memory: about a dozen [b, d, L] tensors (inputs, gradients and
    their time-major copies) and three and a half [T, b, n, d] chunk buffers.
    """

    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        chunk: int,
    ) -> Tensor:
        ct = _compute_dtype(u)
        (b, d, length), n = u.shape, A.shape[1]
        uc = u.to(ct)
        tm = _TimeMajor(
            _step_sizes(delta, delta_bias, delta_softplus, ct), uc, A.to(ct), B.to(ct), C.to(ct)
        )
        spans = _chunks(length, chunk)
        bufs = u.new_empty((2, spans[0][1], b, n, d), dtype=ct)
        states = u.new_zeros((len(spans) + 1, b, n, d), dtype=ct)  # state before each chunk
        for c, (s, e) in enumerate(spans):
            a, h = bufs[:, : e - s]  # [T, b, n, d]
            _scan_(tm.decay(s, e, a), tm.drive(s, e, h), states[c])  # h <- states h_t
            states[c + 1].copy_(h[-1])
            # y_t = sum_n C_t h_t, written over dt, which this chunk no longer needs
            torch.matmul(tm.C[s:e].transpose(-1, -2), h, out=tm.dt[s:e])
        y = _batch_major(tm.dt.view(length, b, d))
        del tm, bufs
        if D is not None:
            y.addcmul_(D.to(ct)[:, None], uc)
        out = y if z is None else F.silu(z.to(ct)).mul_(y)
        ctx.save_for_backward(
            u, delta, A, B, C, D, z, delta_bias, states[:-1], y if z is not None else None
        )
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, states, y = ctx.saved_tensors
        ct = _compute_dtype(u)
        (b, d, length), n = u.shape, A.shape[1]
        uc, dy = u.to(ct), dout.to(ct)

        dy, dz = _through_gate(dy, z, y)
        dD = None if D is None else (dy * uc).sum((0, 2)).to(D.dtype)

        tm = _TimeMajor(
            _step_sizes(delta, delta_bias, ctx.delta_softplus, ct), uc, A.to(ct), B.to(ct), C.to(ct)
        )
        dy_l = _time_major(dy)[:, :, None]  # [L, b, 1, d]
        spans = _chunks(length, ctx.chunk)
        T = spans[0][1]
        bufs = u.new_empty((3, T, b, n, d), dtype=ct)
        work = u.new_empty(((T + 1) // 2, b, n, d), dtype=ct)
        dB_l, dC_l = u.new_empty((2, length, b, 1, n), dtype=ct)
        dAt = torch.zeros_like(tm.At)
        carry = torch.zeros_like(states[0])  # a_{t+1} * dL/dh_{t+1} at the chunk end
        for c in reversed(range(len(spans))):
            s, e = spans[c]
            a, h, dh = bufs[:, : e - s]  # [T, b, n, d]
            tm.decay(s, e, a)
            _scan_(a, tm.drive(s, e, h), states[c], work=work)  # recompute the states h_t
            torch.mul(tm.C[s:e], dy_l[s:e], out=dh)  # direct dL/dh_t = C_t dy_t
            dh[-1].add_(carry)
            if e - s > 1:  # dL/dh_t += a_{t+1} dL/dh_{t+1}
                _scan_(a[1:], dh[:-1], dh[-1], reverse=True, work=work)
            carry = a[0] * dh[0]
            torch.matmul(dy_l[s:e], h.transpose(-1, -2), out=dC_l[s:e])
            torch.matmul(tm.dtu[s:e], dh.transpose(-1, -2), out=dB_l[s:e])
            G = a.mul_(dh)  # G = dL/d(dt A) = dh_t * a_t * h_{t-1}
            G[1:].mul_(h[:-1])
            G[0].mul_(states[c])
            dAt += torch.mul(G, tm.dt[s:e], out=h).sum((0, 1))
            # results over this chunk's slices of dtu and dt: sum_n B dh (the gradient of
            # dt * u) and sum_n A G (the gradient of dt through the decays)
            torch.matmul(tm.B[s:e].transpose(-1, -2), dh, out=tm.dtu[s:e])
            torch.sum(G.mul_(tm.At), 2, keepdim=True, out=tm.dt[s:e])
        dS1 = _batch_major(tm.dtu.view(length, b, d))
        dS2 = _batch_major(tm.dt.view(length, b, d))
        del tm, dy_l, bufs, work

        dt = _step_sizes(delta, delta_bias, ctx.delta_softplus, ct)
        du = dS1 * dt
        if D is not None:
            du.addcmul_(dy, D.to(ct)[:, None])
        ddelta = dS1.mul_(uc).add_(dS2)  # gradient of dt
        if ctx.delta_softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
            ddelta.mul_(torch.neg(dt).expm1_().neg_())
        dbias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)
        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dAt.t().to(A.dtype),
            _batch_major(dB_l.view(length, b, n)).to(B.dtype),
            _batch_major(dC_l.view(length, b, n)).to(C.dtype),
            dD,
            dz,
            dbias,
            None,
            None,
        )


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> Tensor:
    """Chunked parallel selective scan in pure PyTorch: y [b, d, L] (see the module docstring).

    u, delta, z: [b, d, L]; A: [d, n]; B, C: [b, n, L]; D, delta_bias: [d]. chunk: positions
    per chunk T (None: ``default_chunk``); memory grows with b d n T, time with L.
    """
    _check_shapes(u, delta, A, B, C, D, z)
    if chunk is None:
        chunk = default_chunk(u.shape[0] * u.shape[1] * A.shape[1])
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)


def compiled_blocks(d: int, n: int) -> tuple[int, int]:
    """(chunk, channels per task) for the compiled CPU scan: a task's recomputed states
    [chunk + 1, n, channels] stay within about 512 KB in backward. Measured (b 8, d 256,
    n 16, L 256, one thread): 256 channels and 32 positions are best, 64 x 64 is 1.3x slower."""
    channels = min(d, 256)
    chunk = max(16, min(256, 2**17 // max(1, n * channels)))
    return chunk, channels


def compiled_op() -> Any:
    """The compiled CPU op of Mamba's mixer (``csrc/selective_scan.cpp``), or None when it
    cannot be built here (architectures.cpu_ops says why, once)."""
    return load_op("selective_scan")


def _rows(t: Tensor) -> Tensor:
    """t with its last dimension contiguous (what the compiled op reads), copied only if not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _none_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


class _CompiledScan(torch.autograd.Function):
    """The selective scan in compiled C++, channels last, with softplus, D and the gate fused:
    x, delta, z [b, L, d]; At [n, d]; B, C [b, L, n]; all of one floating type. Sequential over
    positions, vectorised over channels, states recomputed chunk by chunk in backward (memory
    O(b d L + b d n L / chunk))."""

    @staticmethod
    def forward(
        ctx,
        op: Any,
        x: Tensor,
        delta: Tensor,
        At: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        reverse: bool,
        blocks: tuple[int, int],
    ) -> Tensor:
        ins = (delta, x, _none_empty(z, x), At, B, C, _none_empty(D, x), _none_empty(delta_bias, x))
        settings = (delta_softplus, reverse, *blocks)
        out, states = op.forward(*ins, *settings)
        ctx.save_for_backward(*ins, states)
        ctx.op, ctx.settings = op, settings
        ctx.given = (D is not None, z is not None, delta_bias is not None)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        *ins, states = ctx.saved_tensors
        grads = ctx.op.backward(*ins, *ctx.settings, states, _rows(dout))
        ddelta, dx, dz, dAt, dB, dC, dD, dbias = grads
        has_D, has_z, has_bias = ctx.given
        return (
            None,
            dx,
            ddelta,
            dAt,
            dB,
            dC,
            dD if has_D else None,
            dz if has_z else None,
            dbias if has_bias else None,
            None,
            None,
            None,
        )


def selective_scan_rows(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    chunk: int | None = None,
) -> Tensor | None:
    """The selective scan through the compiled CPU op, channels last: x, delta, z [b, L, d]
    (slices of a larger last dimension go in without copies), A [d, n], B, C [b, L, n],
    D, delta_bias [d] -> y [b, L, d] in the compute dtype (float32, float64 for float64 x).
    reverse: scan from the last position to the first (the same as flipping the inputs along
    L and the output back). chunk: positions per recomputed chunk in backward (None:
    ``compiled_blocks``). None when the op cannot be built here."""
    op = compiled_op()
    if op is None:
        return None
    ct = _compute_dtype(x)
    best, channels = compiled_blocks(*A.shape)
    rows = [None if t is None else _rows(t.to(ct)) for t in (x, delta, B, C, z)]
    vectors = [None if t is None else t.to(ct).contiguous() for t in (D, delta_bias)]
    At = A.to(ct).t().contiguous()
    blocks = (chunk or best, channels)
    x_, delta_, B_, C_, z_ = rows
    return _CompiledScan.apply(
        op, x_, delta_, At, B_, C_, vectors[0], z_, vectors[1], delta_softplus, reverse, blocks
    )


def selective_scan_compiled(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> Tensor | None:
    """``selective_scan_rows`` with ``selective_scan``'s arguments and shapes ([b, d, L]; the
    channels-last copies cost two passes over each tensor), or None without the op."""
    _check_shapes(u, delta, A, B, C, D, z)
    tr = [None if t is None else t.transpose(1, 2) for t in (u, delta, B, C, z)]
    y = selective_scan_rows(tr[0], tr[1], A, tr[2], tr[3], D, tr[4], delta_bias,
                            delta_softplus, chunk=chunk)  # fmt: skip
    return None if y is None else y.transpose(1, 2).to(u.dtype)


class _CompiledConv(torch.autograd.Function):
    """Causal depthwise conv + silu in compiled C++, channels last: x [b, L, d], wt [K, d]."""

    @staticmethod
    def forward(ctx, op: Any, x: Tensor, wt: Tensor, bias: Tensor, reverse: bool) -> Tensor:
        ctx.save_for_backward(x, wt, bias)
        ctx.op, ctx.reverse = op, reverse
        return op.conv_forward(x, wt, bias, reverse)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        x, wt, bias = ctx.saved_tensors
        dx, dwt, dbias = ctx.op.conv_backward(x, wt, bias, ctx.reverse, _rows(dout))
        return None, dx, dwt, dbias, None


def causal_conv_silu_rows(
    x: Tensor, weight: Tensor, bias: Tensor, reverse: bool = False
) -> Tensor | None:
    """silu(causal depthwise conv) through the compiled CPU op, channels last: x [b, L, d]
    (a slice of a larger last dimension goes in without a copy), weight [d, K], bias [d] ->
    [b, L, d] in x's dtype (float32 or float64). Output t sees inputs t-K+1..t (reverse:
    t..t+K-1). The same as ``architectures.layers.causal_depthwise_conv`` then silu. None when
    the op cannot be built here."""
    op = compiled_op()
    if op is None:
        return None
    wt = weight.to(x.dtype).t().contiguous()
    return _CompiledConv.apply(op, _rows(x), wt, bias.to(x.dtype).contiguous(), reverse)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The recurrence as written, one position at a time (slow; for tests and benchmarks)."""
    _check_shapes(u, delta, A, B, C, D, z)
    ct = _compute_dtype(u)
    dt = _step_sizes(delta, delta_bias, delta_softplus, ct)
    uc, A, B, C = u.to(ct), A.to(ct), B.to(ct), C.to(ct)
    h = uc.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [b, d, n]
    ys = []
    for t in range(u.shape[2]):
        dt_t = dt[:, :, t, None]  # [b, d, 1]
        h = torch.exp(dt_t * A) * h + dt_t * B[:, None, :, t] * uc[:, :, t, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(ct)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)


def scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    kernels: str = "auto",
) -> Tensor:
    """Selective scan on the best backend: mamba-ssm's CUDA kernel for CUDA tensors under
    ``kernels`` (architectures.kernels), the compiled CPU op for CPU tensors unless
    ``kernels="off"`` (architectures.cpu_ops), else ``selective_scan``. Same arguments and shapes as
    ``selective_scan``."""
    unsuitable = None
    if A.shape[1] > MAX_KERNEL_STATE:
        unsuitable = f"d_state={A.shape[1]}; its kernel takes at most {MAX_KERNEL_STATE}"
    kernel = use(SELECTIVE_SCAN, u.device, kernels, unsuitable)
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if u.device.type == "cpu" and kernels != "off":
        y = selective_scan_compiled(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if y is not None:
            return y
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
