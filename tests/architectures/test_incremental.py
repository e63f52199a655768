"""Incremental decoding (architectures.incremental): prefill + step give the full forward's
logits at every position for every causal family, the KV cache's sliding window equals
recomputation for one attention layer, the buffers keep what they should, bf16 runs."""

from __future__ import annotations

import pytest
import torch

from architectures.incremental import History, KVCache
from nucleo.studies.precision import TINY
from tests.architectures.test_architectures import CAUSAL, _model

pytestmark = pytest.mark.usefixtures("one_thread")


# every causal family, and mamba's PyTorch path (the CUDA kernels' layout) beside its compiled one
STEPPED = {**{arch: (arch, TINY[arch]) for arch in CAUSAL},
           "mamba-pytorch": ("mamba", [*TINY["mamba"], "model.kernels=off"])}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(STEPPED))
def test_steps_give_the_full_forward_logits_at_every_position(variant):
    arch, sets = STEPPED[variant]
    model = _model(arch, sets)
    tokens = torch.randint(0, 5, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(tokens).logits
    for start in (1, 17):  # from one token, and from a prompt
        logits, cache = model.prefill(tokens[:, :start])
        worst = (logits - full[:, start - 1]).abs().max()
        for t in range(start, tokens.shape[1]):
            logits, cache = model.step(tokens[:, t], cache)
            worst = max(worst, (logits - full[:, t]).abs().max())
        assert logits.shape == (2, 9) and logits.dtype == torch.float32
        assert worst < 1e-4, f"{variant} from {start} tokens: off by {worst:.2e}"


def test_a_sliding_kv_cache_equals_recomputing_the_window_for_one_attention_layer():
    model = _model("transformer", [*TINY["transformer"], "model.n_layers=1"])
    tokens = torch.randint(0, 5, (2, 30), generator=torch.Generator().manual_seed(2))
    window = 8
    logits, cache = model.prefill(tokens[:, :5], window)
    for t in range(5, 30):
        logits, cache = model.step(tokens[:, t], cache)
        want = model(tokens[:, max(0, t - window + 1) : t + 1]).logits[:, -1]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_the_kv_cache_keeps_the_last_window_positions_as_it_grows_and_wraps():
    def one(p: int) -> torch.Tensor:  # a position's key: its index everywhere
        return torch.full((1, 2, 3), float(p))

    cache = KVCache(one(0)[:, :, None], one(0)[:, :, None], window=100)
    for p in range(1, 250):
        keys, values = cache.append(one(p), one(p))
        held = sorted(keys[0, 0, :, 0].tolist())
        assert held == list(range(max(0, p - 99), p + 1)) and torch.equal(keys, values)
    assert cache.position == 250 and cache.k.shape[2] == 100


def test_history_keeps_the_last_values_oldest_first():
    history = History(torch.arange(3.0).view(1, 1, 3), limit=100)
    for p in range(3, 400):
        view = history.append(torch.tensor([[float(p)]]))
        assert view[0, 0].tolist() == list(map(float, range(max(0, p - 99), p + 1)))
    assert history.buffer.shape[-1] <= 200


def test_bidirectional_models_refuse_to_decode():
    model = _model("caduceus", TINY["caduceus"])
    with pytest.raises(ValueError, match="bidirectional"):
        model.prefill(torch.zeros(1, 4, dtype=torch.int64))


@pytest.mark.parametrize("arch", CAUSAL)
def test_bf16_autocast_decodes(arch):
    model = _model(arch, [*TINY[arch], "model.autocast=bf16"])
    tokens = torch.randint(0, 5, (2, 12), generator=torch.Generator().manual_seed(3))
    logits, cache = model.prefill(tokens[:, :8])
    for t in range(8, 12):
        logits, cache = model.step(tokens[:, t], cache)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    full = model(tokens).logits[:, -1]
    assert (logits - full).abs().max() < 0.1  # bf16 rounding, not a different model
