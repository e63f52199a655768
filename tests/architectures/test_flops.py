"""Each family's FLOP formula (nucleo.core.cost), tied to torch.utils.flop_counter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from architectures.layers import Block
from data_pipeline.tokenizers import CharTokenizer
from nucleo.train.components import build_model
from nucleo.train.compute import (
    COUNTED_BY_TORCH,
    ComputeCounter,
    count_parameters,
    forward_flops,
    module_flops,
)
from nucleo.train.config import load_config

SMALL = ["model.d_model=32", "model.n_layers=2"]
FAMILIES = [
    ("transformer", ["model.n_heads=2"]),
    ("transformer", ["model.n_heads=2", "model.causal=false"]),
    ("hyena", []),
    ("hyena", ["model.causal=false", "model.order=3"]),
    ("mamba", []),
    ("mamba", ["model.causal=false"]),
    ("caduceus", []),
    ("caduceus", ["model.rcps=false"]),
    ("multires", ["model.max_len=64"]),
    ("hybrid", ["model.pattern=[hyena,mamba,attention,multires]", "model.n_layers=4"]),
]


def _model(arch: str, extra: list[str]) -> nn.Module:
    """The pure-PyTorch paths (model.kernels=off): torch's counter cannot see into the
    compiled CPU ops."""
    cfg = load_config(arch=arch, overrides=[*SMALL, *extra, "model.kernels=off"])
    return build_model(cfg.arch, cfg.model, CharTokenizer()).eval()


@pytest.mark.parametrize(("arch", "extra"), FAMILIES, ids=lambda x: str(x))
def test_matmul_conv_attention_and_readout_equal_torch_flop_counter(arch, extra):
    """What torch's counter sees (matrix products, convolutions, SDPA in its math form) is
    exactly the analytic count; FFT, scan and tree terms are the ones it cannot see."""
    model = _model(arch, extra)
    batch, length = 2, 64
    tokens = torch.randint(0, 4, (batch, length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    ours = forward_flops(model, length, batch)
    counted = sum(v for k, v in ours.items() if k in COUNTED_BY_TORCH)
    assert counted == pytest.approx(counter.get_total_flops(), rel=1e-9)
    uncounted = set(ours) - set(COUNTED_BY_TORCH)
    expected = {"hyena": {"fft"}, "mamba": {"scan"}, "caduceus": {"scan"}, "multires": {"tree"}}
    expected["hybrid"] = {"fft", "scan", "tree"}
    assert uncounted == expected.get(arch, set())


def test_a_transformers_matmuls_are_2n_per_token_plus_the_head():
    """The C = 6ND bookkeeping: 2 FLOPs per non-embedding weight per token (norm weights are
    elementwise) plus the tied head's 2 D V, plus attention, which grows with L."""
    model = _model("transformer", ["model.n_heads=2"])
    counts = count_parameters(model)
    norms = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.RMSNorm))
    vocab, width = model.embed.weight.shape
    for length in (64, 256):
        f = forward_flops(model, length, batch=3)
        per_token = f["matmul"] / (3 * length)
        assert per_token == 2 * (counts["non_embedding"] - norms) + 2 * width * vocab
        assert f["attention"] / (3 * length) == 4 * length * width * 2  # 2 layers


def test_hyena_long_convolutions_grow_as_l_log_l_and_filters_are_shared_by_the_batch():
    model = _model("hyena", [])
    f1, f2 = forward_flops(model, 1024, 1), forward_flops(model, 2048, 1)
    ratio = f2["fft"] / f1["fft"]
    assert 2.0 < ratio < 2.0 * math.log2(4096) / math.log2(2048) + 0.01
    # the implicit filters (MLP and their spectra) cost the same for 1 or 8 sequences
    one, eight = forward_flops(model, 512, 1), forward_flops(model, 512, 8)
    assert eight["fft"] < 8 * one["fft"] and eight["matmul"] < 8 * one["matmul"]


def test_the_scan_is_nine_e_n_per_token():
    model = _model("mamba", ["model.d_state=8", "model.expand=2"])
    f = forward_flops(model, 100, 1)
    inner = 2 * 32
    assert (f["scan"] + f["readout"]) / 100 == 9 * inner * 8 * 2  # 2 layers


def test_compute_counter_counts_passes_and_shorter_warm_up_windows():
    model = _model("hyena", [])
    counter = ComputeCounter(model, micro_batch=4)
    full = counter.step(windows=8, seq_len=256, passes=1)
    assert counter.step(windows=8, seq_len=256, passes=2) == 2 * full  # the rc strand's pass
    assert counter.step(windows=8, seq_len=128, passes=1) < full / 2 + 1e-6 * full
    per_window = sum(forward_flops(model, 256, 4).values()) / 4
    assert full == 3 * 8 * per_window
    assert counter.per_token(256) == 3 * per_window / 256


def test_a_mixer_without_a_formula_counts_its_linear_layers_and_warns():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    with pytest.warns(UserWarning, match="Odd has no formula"):
        f = module_flops(Block(Odd(), 8, mlp_ratio=2.0), batch=1, length=10)
    assert f["matmul"] == 2 * 8 * 8 * 10 + 2 * (2 * 8 * 16) * 10


def test_the_count_survives_zero3_partitioning():
    """ZeRO-3 leaves each rank an empty tensor per parameter (the shape is in ds_shape); the
    count must read module attributes and ds_shape, not the local tensors."""
    for arch, extra in (("mamba", []), ("multires", ["model.max_len=64"]), ("hyena", [])):
        model = _model(arch, extra)
        before = forward_flops(model, 64, 2)
        for param in model.parameters():
            param.ds_shape = param.shape
            param.data = torch.empty(0)
        assert forward_flops(model, 64, 2) == before
