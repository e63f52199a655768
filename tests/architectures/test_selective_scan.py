"""The chunked selective scan against the sequential reference: outputs, every gradient,
stability for large steps, float64 gradcheck, bf16, memory, and the CUDA kernel when present."""

from __future__ import annotations

import sys

import pytest
import torch

import architectures.selective_scan as ss
from architectures import cpu_ops, kernels
from architectures.cpu_ops import load_op, why_not
from architectures.selective_scan import (
    scan,
    selective_scan,
    selective_scan_compiled,
    selective_scan_reference,
)
from tests.conftest import loaded_or_fail

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(
    b: int = 2,
    d: int = 5,
    n: int = 3,
    length: int = 37,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    big_steps: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Leaf tensors that require grad. big_steps: deltas up to 10 and A down to -16, a
    log-decay per step of up to -160 (exp(+cumsum) tricks overflow there)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if big_steps:
        delta = torch.rand(b, d, length, generator=g, dtype=torch.float64) * 10
        A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 15.5 - 0.5
    else:
        delta = rand(b, d, length) * 0.5
        A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1
    values = {
        "u": rand(b, d, length),
        "delta": delta,
        "A": A,
        "B": rand(b, n, length),
        "C": rand(b, n, length),
        "D": rand(d),
        "z": rand(b, d, length),
        "delta_bias": rand(d) * 0.3,
    }
    return {k: v.to(device, dtype).requires_grad_() for k, v in values.items()}


def _run(fn, x: dict[str, torch.Tensor], use: set[str], softplus: bool, **kw) -> torch.Tensor:
    optional = {k: x[k] if k in use else None for k in ("D", "z", "delta_bias")}
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], **optional, delta_softplus=softplus, **kw)


def _grads(y: torch.Tensor, x: dict[str, torch.Tensor], use: set[str]) -> dict[str, torch.Tensor]:
    names = [k for k in NAMES if k in use or k in ("u", "delta", "A", "B", "C")]
    seed = torch.Generator(device=y.device).manual_seed(1)
    grad_out = torch.randn(y.shape, generator=seed, device=y.device, dtype=torch.float64)
    grad_out = grad_out.to(y.dtype)  # the same values whatever y's dtype
    grads = torch.autograd.grad(y, [x[k] for k in names], grad_out)
    return dict(zip(names, grads, strict=True))


def _assert_matches_reference(x, use, softplus, chunk, rtol=1e-4, atol=1e-4) -> None:
    y = _run(selective_scan, x, use, softplus, chunk=chunk)
    y_ref = _run(selective_scan_reference, x, use, softplus)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    grads, grads_ref = _grads(y, x, use), _grads(y_ref, x, use)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=rtol, atol=atol, msg=name)


ALL = {"D", "z", "delta_bias"}


@pytest.mark.parametrize(
    "use, softplus",
    [(set(), False), (ALL, True), ({"D"}, False), ({"z"}, True), ({"delta_bias"}, True)],
    ids=["bare", "all", "D", "z", "bias"],
)
@pytest.mark.parametrize("length, chunk", [(37, 8), (64, 16), (40, 64), (1, 32), (23, 7)])
def test_matches_reference(use, softplus, length, chunk):
    """Output and all gradients, with and without each option, L (not) a multiple of the
    chunk, a single chunk, L = 1, odd chunk sizes."""
    _assert_matches_reference(_inputs(length=length), use, softplus, chunk)


@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_large_steps_are_stable(chunk):
    """Deltas up to 10 and A down to -16: per-step log-decays down to -160."""
    x = _inputs(length=50, big_steps=True)
    y = _run(selective_scan, x, ALL, False, chunk=chunk)
    assert torch.isfinite(y).all()
    _assert_matches_reference(x, ALL, False, chunk)
    _assert_matches_reference(x, ALL, True, chunk)


def test_gradcheck_float64():
    x = _inputs(b=2, d=2, n=2, length=7, dtype=torch.float64)
    names = list(NAMES)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        return _run(selective_scan, dict(zip(names, tensors, strict=True)), ALL, True, chunk=3)

    assert torch.autograd.gradcheck(f, [x[k] for k in names])


def test_bfloat16_inputs():
    x = _inputs(length=40)
    x16 = {k: v.detach().bfloat16().requires_grad_() for k, v in x.items()}
    y16 = _run(selective_scan, x16, ALL, True, chunk=16)
    assert y16.dtype == torch.bfloat16
    # the same (rounded) values in float32: bf16 only rounds the inputs and the output
    x32 = {k: v.detach().float().requires_grad_() for k, v in x16.items()}
    y32 = _run(selective_scan, x32, ALL, True, chunk=16)
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)
    grads16 = _grads(y16, x16, ALL)
    assert all(
        g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads16.values()
    )


def _saved_sizes(fn, b: int, d: int, n: int, length: int, chunk: int) -> list[int]:
    """The element counts of the tensors ``fn`` saves for backward."""
    x = _inputs(b=b, d=d, n=n, length=length)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(fn, x, ALL, True, chunk=chunk)
    return saved


def test_saves_no_per_position_states():
    """Backward keeps the inputs and one state per chunk, not the [b, d, n, L] states."""
    b, d, n, length, chunk = 2, 8, 4, 256, 32
    saved = _saved_sizes(selective_scan, b, d, n, length, chunk)
    states = b * d * n * length
    assert max(saved) <= max(b * d * length, states // chunk)
    assert sum(saved) < 6 * b * d * length + 2 * states // chunk


def _compiled():
    if load_op("selective_scan") is None:
        pytest.fail(f"the compiled CPU scan did not build: {why_not('selective_scan')}")
    return selective_scan_compiled


@pytest.mark.parametrize("use, softplus", [(set(), False), (ALL, True), ({"z"}, True)])
@pytest.mark.parametrize(
    "b, d, n, length, chunk",
    [(2, 5, 3, 37, 8), (1, 70, 4, 23, 7), (3, 130, 16, 65, None), (2, 8, 1, 1, None)],
)
def test_compiled_scan_matches_reference(use, softplus, b, d, n, length, chunk):
    """Output and every gradient in fp32 within 1e-5 (of each tensor's largest value) of the
    sequential reference run in float64: several channel blocks (d > 64, not a multiple of
    the vector width), several chunks, one chunk, L = 1, n = 1. (Without softplus, negative
    steps make states grow to ~1e5: hence a tolerance relative to the scale.)"""
    x = _inputs(b=b, d=d, n=n, length=length, seed=d)
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    y = _run(_compiled(), x, use, softplus, chunk=chunk)
    y_ref = _run(selective_scan_reference, x64, use, softplus)

    def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5 * scale, msg=name)

    close(y, y_ref, "y")
    grads, grads_ref = _grads(y, x, use), _grads(y_ref, x64, use)
    for name, g in grads.items():
        close(g, grads_ref[name], name)


def test_compiled_scan_gradcheck_float64_and_large_steps():
    x = _inputs(b=2, d=3, n=2, length=9, dtype=torch.float64)
    names = list(NAMES)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        return _run(_compiled(), dict(zip(names, tensors, strict=True)), ALL, True, chunk=4)

    assert torch.autograd.gradcheck(f, [x[k] for k in names])
    big = _inputs(length=50, big_steps=True)
    y = _run(_compiled(), big, ALL, True, chunk=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, _run(selective_scan_reference, big, ALL, True))


@pytest.mark.parametrize("reverse", [False, True])
def test_channels_last_scan_reads_slices_and_runs_backwards(reverse):
    """``selective_scan_rows`` as Mamba calls it: x and z slices of one [b, L, 2d] tensor,
    B and C slices of one [b, L, n + n + 3] tensor (no copies), and ``reverse`` equal to
    flipping the inputs along L and the output back; output and every gradient in fp32."""
    if load_op("selective_scan") is None:
        pytest.fail(f"the compiled CPU op did not build: {why_not('selective_scan')}")
    b, d, n, length = 2, 70, 4, 41
    x64 = _inputs(b=b, d=d, n=n, length=length, dtype=torch.float64, seed=3)
    xz = torch.cat([x64["u"], x64["z"]], 1).transpose(1, 2).float().detach().requires_grad_()
    bc = torch.cat([x64["B"], x64["C"], x64["B"][:, :3]], 1).transpose(1, 2).float()
    bc = bc.detach().requires_grad_()
    delta = x64["delta"].transpose(1, 2).float().detach().requires_grad_()
    A, D, bias = (x64[k].float().detach().requires_grad_() for k in ("A", "D", "delta_bias"))
    y = ss.selective_scan_rows(
        xz[..., :d], delta, A, bc[..., :n], bc[..., n : 2 * n], D, xz[..., d:], bias,
        delta_softplus=True, reverse=reverse, chunk=8,
    )  # fmt: skip
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    ref = {k: flip(v) if v.dim() == 3 else v for k, v in x64.items()}
    y_ref = flip(_run(selective_scan_reference, ref, ALL, True)).transpose(1, 2)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [xz, bc, delta, A, D, bias], g)
    want = torch.autograd.grad(y_ref, [x64[k] for k in NAMES], g.double())
    w = dict(zip(NAMES, want, strict=True))
    tr = {k: w[k].transpose(1, 2).float() for k in ("u", "z", "B", "C", "delta")}
    expected = [
        torch.cat([tr["u"], tr["z"]], -1),
        torch.cat([tr["B"], tr["C"], torch.zeros_like(tr["B"][..., :3])], -1),
        tr["delta"],
        *(w[k].float() for k in ("A", "D", "delta_bias")),
    ]
    for name, a, e in zip(["xz", "bc", "delta", "A", "D", "bias"], got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()), msg=name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("width", [1, 4])
def test_compiled_conv_silu_matches_conv1d(reverse, width):
    """silu(causal depthwise conv) through the op, on a slice of a wider tensor, equals
    ``causal_depthwise_conv`` then silu (reverse: on the flipped sequence); gradcheck in float64."""
    from architectures.layers import causal_depthwise_conv

    if load_op("selective_scan") is None:
        pytest.fail(f"the compiled CPU op did not build: {why_not('selective_scan')}")
    torch.manual_seed(width)
    wide = torch.randn(3, 29, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, width, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)

    def compiled(wide, weight, bias):
        return ss.causal_conv_silu_rows(wide[..., 7:17], weight, bias, reverse)

    def reference(wide, weight, bias):
        x = wide[..., 7:17].transpose(1, 2)
        x = x.flip(-1) if reverse else x
        y = torch.nn.functional.silu(causal_depthwise_conv(x, weight, bias, kernels="off"))
        return (y.flip(-1) if reverse else y).transpose(1, 2)

    torch.testing.assert_close(compiled(wide, weight, bias), reference(wide, weight, bias))
    assert torch.autograd.gradcheck(compiled, (wide, weight, bias))


def test_mamba_and_caduceus_give_the_same_results_with_the_compiled_op_and_without():
    """The channels-last compiled mixer (conv, scan, reverse direction without flips) against
    the pure-PyTorch mixer, same weights: logits and every parameter's gradient."""
    from nucleo.core.registry import ARCHITECTURES
    from nucleo.core.schema import from_dict
    from nucleo.train.components import build_model

    for arch in ("mamba", "caduceus"):
        torch.manual_seed(0)
        cfgs = [
            from_dict(ARCHITECTURES.get(arch).config,
                      {"d_model": 32, "n_layers": 2, "kernels": k}, "model")
            for k in ("auto", "off")
        ]  # fmt: skip
        fast, slow = (build_model(arch, c, _char_tokenizer()) for c in cfgs)
        slow.load_state_dict(fast.state_dict())
        tokens = torch.randint(0, 4, (2, 45))
        outs = [m(tokens).logits for m in (fast, slow)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for out in outs:
            out.square().sum().backward()
        for (name, p), q in zip(fast.named_parameters(), slow.parameters(), strict=True):
            scale = float(q.grad.abs().max())
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _char_tokenizer():
    from data_pipeline.tokenizers import build_tokenizer

    return build_tokenizer("char", {})


def test_compiled_scan_takes_bf16_and_keeps_few_states():
    x16 = {k: v.detach().bfloat16().requires_grad_() for k, v in _inputs(length=40).items()}
    y16 = _run(_compiled(), x16, ALL, True)
    assert y16.dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in _grads(y16, x16, ALL).values())
    b, d, n, length, chunk = 2, 8, 4, 256, 32
    saved = _saved_sizes(_compiled(), b, d, n, length, chunk)
    assert max(saved) <= b * d * length  # no [b, d, n, L] states
    assert sum(saved) < 7 * b * d * length + 2 * b * d * n * length // chunk


def test_scan_on_cpu_uses_the_compiled_op_unless_kernels_are_off(monkeypatch):
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of it would fail
    kernels.forget()
    x = _inputs(length=20)
    compiled = _run(_compiled(), x, ALL, True)
    torch.testing.assert_close(_run(scan, x, ALL, True), compiled, rtol=0, atol=0)
    off = _run(scan, x, ALL, True, kernels="off")
    torch.testing.assert_close(off, _run(selective_scan, x, ALL, True), rtol=0, atol=0)
    assert "selective_scan" not in kernels._LOADED  # the CUDA kernel is never tried on CPU


def test_without_a_compiler_the_pure_scan_runs_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(cpu_ops, "_LOADED", {})
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setattr(cpu_ops, "_cpu_tag", lambda: "nocompiler")  # not the cached build
    x = _inputs(length=12)
    with caplog.at_level("WARNING", logger="nucleo"):
        y = _run(scan, x, ALL, True)
        _run(scan, x, ALL, True)
    torch.testing.assert_close(y, _run(selective_scan, x, ALL, True), rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if "compiled CPU op" in r.getMessage()]
    assert len(lines) == 1 and "pure-PyTorch" in lines[0], lines


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    kernel = loaded_or_fail(kernels.SELECTIVE_SCAN)
    x = _inputs(b=2, d=16, n=8, length=300, device="cuda")
    for use, softplus in [(ALL, True), (set(), False)]:
        y = _run(kernel, x, use, softplus)
        y_ref = _run(selective_scan_reference, x, use, softplus)
        torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=2e-3)
        grads, grads_ref = _grads(y, x, use), _grads(y_ref, x, use)
        for name, g in grads.items():  # mamba-ssm's own tests allow as much for delta's grad
            torch.testing.assert_close(g, grads_ref[name], rtol=3e-3, atol=2e-2, msg=name)
    torch.testing.assert_close(_run(scan, x, ALL, True), _run(kernel, x, ALL, True))


@pytest.mark.gpu
def test_pure_pytorch_scan_on_cuda_matches_reference():
    _assert_matches_reference(_inputs(length=45, device="cuda"), ALL, True, chunk=16)


def test_default_chunk():
    assert ss.default_chunk(8 * 256 * 16) == 32  # b = 8, d_inner = 256, n = 16
    assert ss.default_chunk(64 * 16) == 256
    assert all(32 <= ss.default_chunk(s) <= 256 for s in (1, 100, 5000, 10**7))
