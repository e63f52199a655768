"""Every registered family: the interface, causality, RC-equivariance, export, presets,
checkpointing, bf16 autocast, fast paths against their references, and learning real DNA."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from architectures.caduceus import conjoin, rc_logits
from architectures.cpu_ops import load_op, why_not
from architectures.hyena import HyenaRecurrence, hyena_recurrence_reference
from architectures.kernels import CAUSAL_CONV1D, FLASH_ATTN, kernels_of
from architectures.layers import POSITIONWISE_CHUNK, SIZES, causal_depthwise_conv
from architectures.multires import MultiresConv, _CompiledTree
from architectures.transformer import attention, attention_reference
from data_pipeline.tokenizers import CharTokenizer
from nucleo.core.alphabet import COMPLEMENT_IDS
from nucleo.core.schema import ConfigError, from_dict
from nucleo.core.types import Batch
from nucleo.studies.precision import TINY
from nucleo.train.components import ARCHITECTURES, build_model
from nucleo.train.compute import count_parameters
from nucleo.train.config import load_config
from nucleo.train.export import export_model, load_exported
from nucleo.train.objective import Objective
from tests.conftest import loaded_or_fail

# one tiny model per family (the precision check's): d_model 32, a layer or two
BIDIRECTIONAL: dict[str, tuple[str, list[str]]] = {
    "transformer-bi": ("transformer", [*TINY["transformer"], "model.causal=false"]),
    "hyena-bi": ("hyena", [*TINY["hyena"], "model.causal=false"]),
    "bimamba": ("mamba", [*TINY["mamba"], "model.causal=false"]),
    "caduceus": ("caduceus", TINY["caduceus"]),
    "caduceus-ph": ("caduceus", [*TINY["caduceus"], "model.rcps=false", "model.conjoin=true"]),
    "hybrid-bi": (
        "hybrid",
        ["model.d_model=32", "model.n_layers=3", "model.pattern=[hyena,mamba,attention]",
         "model.causal=false"],
    ),
}  # fmt: skip
CAUSAL = [name for name in TINY if name != "caduceus"]
VARIANTS = {**{name: (name, sets) for name, sets in TINY.items()}, **BIDIRECTIONAL}


def _config(arch: str, sets: list[str]):
    return load_config(arch=arch, overrides=sets)


def _model(arch: str, sets: list[str], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, _config(arch, sets).model, CharTokenizer()).eval()


def test_every_registered_family_is_covered():
    assert sorted(TINY) == sorted(ARCHITECTURES.names())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_finite_and_gradients_reach_every_parameter(variant):
    arch, sets = VARIANTS[variant]
    model = _model(arch, sets).train()
    tokens = torch.randint(0, 5, (2, 48))
    out = model(tokens)
    assert out.hidden.shape == (2, 48, 32) and out.logits.shape == (2, 48, 9)
    assert out.hidden.dtype == out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all()
    (out.logits.logsumexp(-1).mean() + out.hidden.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
    assert model.causal == (variant in CAUSAL)


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_output_at_t_never_depends_on_later_tokens(arch):
    model = _model(arch, TINY[arch])
    tokens = torch.randint(0, 4, (2, 40))
    base = model(tokens)
    for t in (0, 13, 38):
        changed = tokens.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 4
        out = model(changed)
        torch.testing.assert_close(out.logits[:, : t + 1], base.logits[:, : t + 1])
        assert not torch.allclose(out.logits[:, t + 1 :], base.logits[:, t + 1 :])


@pytest.mark.parametrize("variant", sorted(BIDIRECTIONAL))
def test_bidirectional_models_see_both_sides(variant):
    arch, sets = BIDIRECTIONAL[variant]
    model = _model(arch, sets)
    tokens = torch.randint(0, 4, (1, 40))
    changed = tokens.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 4
    assert not torch.allclose(model(tokens).logits[:, 5], model(changed).logits[:, 5])
    assert not model.causal


@pytest.mark.parametrize("autocast", ["fp32", "bf16"])
def test_caduceus_is_reverse_complement_equivariant(autocast):
    model = _model("caduceus", [*TINY["caduceus"], f"model.autocast={autocast}"])
    assert model.rc_equivariant
    comp = torch.tensor(COMPLEMENT_IDS)
    tokens = torch.randint(0, 5, (3, 57))
    out, rc_out = model(tokens), model(comp[tokens].flip(-1))
    torch.testing.assert_close(rc_out.logits, rc_logits(out.logits, comp), rtol=0, atol=1e-5)
    torch.testing.assert_close(rc_out.hidden, out.hidden.flip(-2, -1), rtol=0, atol=1e-5)


def test_conjoining_makes_any_model_rc_equivariant():
    comp = torch.tensor(COMPLEMENT_IDS)
    tokens = torch.randint(0, 5, (2, 33))
    for model in (_model(*BIDIRECTIONAL["caduceus-ph"]), _model("transformer", TINY["hyena"][:2])):
        forward = (
            model
            if getattr(model.cfg, "conjoin", False)
            else (lambda x, m=model: conjoin(m, x, comp))
        )
        out, rc_out = forward(tokens), forward(comp[tokens].flip(-1))
        torch.testing.assert_close(rc_out.logits, rc_logits(out.logits, comp), atol=1e-5, rtol=0)
    plain = _model("caduceus", [*TINY["caduceus"], "model.rcps=false"])
    out, rc_out = plain(tokens), plain(comp[tokens].flip(-1))
    assert not torch.allclose(rc_out.logits, rc_logits(out.logits, comp), atol=1e-3)


def test_caduceus_rejects_a_vocabulary_without_a_complement_map():
    cfg = _config("caduceus", TINY["caduceus"]).model
    with pytest.raises(ConfigError, match="complement permutation"):
        ARCHITECTURES.build("caduceus", cfg, vocab_size=12)
    with pytest.raises(ConfigError, match=r"model.causal"):
        _config("caduceus", ["model.causal=true"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_round_trip_gives_identical_outputs(variant, tmp_path):
    arch, sets = VARIANTS[variant]
    cfg = _config(arch, sets)
    model = _model(arch, sets, seed=3)
    export_model(model.state_dict(), cfg, CharTokenizer(), tmp_path, {"step": 1})
    loaded, tokenizer, meta = load_exported(tmp_path)
    tokens = torch.from_numpy(tokenizer.encode(b"ACGTTGCANNACGTAAACCCGGGTTT")).unsqueeze(0)
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    assert meta["causal"] == model.causal


@pytest.mark.parametrize("arch", sorted(TINY))
def test_presets_follow_the_shared_ladder(arch):
    entry = ARCHITECTURES.get(arch)
    assert list(entry.config.PRESETS) == list(SIZES)
    totals = []
    for size, target in SIZES.items():
        with torch.device("meta"):
            model = entry.cls(from_dict(entry.config, {"size": size}), vocab_size=9)
        total = count_parameters(model)["total"]
        assert 0.75 * target < total < 1.35 * target, (size, total)
        totals.append(total)
    ratios = [b / a for a, b in itertools.pairwise(totals)]
    assert all(2.5 < r < 5 for r in ratios), ratios


def test_a_key_beside_a_preset_overrides_it():
    cfg = _config("hyena", ["model.size=small", "model.n_layers=3"]).model
    assert (cfg.d_model, cfg.n_layers) == (256, 3)
    with pytest.raises(ConfigError, match=r"model.size.*presets: tiny, mini"):
        _config("hyena", ["model.size=huge"])


@pytest.mark.parametrize("arch", sorted(TINY))
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    """Per-block recomputation, and (long sequences) the position-wise parts (MLP half, Hyena's
    filter MLP) in recomputed pieces."""
    grads = []
    for flag, chunk in (("false", 0), ("true", None), ("true", 12)):
        model = _model(arch, [*TINY[arch], f"model.checkpointing={flag}"]).train()
        chunked = [m for m in model.modules() if hasattr(m, "positionwise_chunk")]
        expected = 0 if flag == "false" else POSITIONWISE_CHUNK
        assert all(m.positionwise_chunk == expected for m in chunked)
        if chunk is not None:
            for module in chunked:  # 32 positions: pieces of 12, 12 and 8
                module.positionwise_chunk = chunk
        model(torch.arange(64).remainder(5).view(2, 32)).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_bf16_autocast_runs_and_stays_close(arch):
    tokens = torch.randint(0, 4, (2, 40))
    ref = _model(arch, TINY[arch])(tokens).logits
    model = _model(arch, [*TINY[arch], "model.autocast=bf16"]).train()
    out = model(tokens)
    assert out.logits.dtype == torch.float32
    assert (out.logits - ref).abs().max() < 0.05 * ref.abs().max() + 0.02
    out.logits.logsumexp(-1).mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("stages,kernel_len", [(1, 12), (1, 24), (2, 12), (2, 24)])
def test_hyena_recurrence_matches_the_sum_over_lags(stages, kernel_len):
    """Causal (K = L) and two-sided (K = 2L) kernels; values and float64 gradients."""
    torch.manual_seed(0)
    b, c, length = 2, 3, 12
    f64 = {"dtype": torch.float64, "requires_grad": True}
    args = [
        torch.randn(b, c, length, **f64),
        torch.randn(b, c, length, **f64),
        torch.randn(stages, c, kernel_len, **f64),
        torch.randn(stages, c, **f64),
    ]
    gates = [torch.randn(b, c, length, **f64) for _ in range(stages)]  # fmt: skip
    fast = HyenaRecurrence.apply(*args, *gates)
    torch.testing.assert_close(fast, hyena_recurrence_reference(*args, *gates))
    assert torch.autograd.gradcheck(HyenaRecurrence.apply, (*args, *gates))


@pytest.mark.parametrize("width,depth,length", [(2, 5, 40), (3, 3, 20), (2, 7, 30)])
def test_multires_shifted_taps_match_dilated_conv1d(width, depth, length):
    torch.manual_seed(0)
    layer = MultiresConv(4, width, depth).double()
    x = torch.randn(2, 4, length, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer.tree(x), layer.reference(x))
    assert torch.autograd.gradcheck(layer.tree, (x,))


@pytest.mark.parametrize("width,depth,length", [(2, 5, 40), (3, 3, 20), (2, 7, 30), (4, 2, 1)])
def test_compiled_multires_tree_matches_dilated_conv1d(width, depth, length):
    """The compiled CPU tree: output and the gradients of x, h0, h1 and w, float64 gradcheck
    included; levels whose taps reach past the start; L = 1."""
    op = load_op("multires_tree")
    assert op is not None, why_not("multires_tree")
    torch.manual_seed(0)
    layer = MultiresConv(5, width, depth).double()
    x = torch.randn(3, 5, length, dtype=torch.float64, requires_grad=True)
    params = (layer.h0[:, 0], layer.h1[:, 0], layer.w)

    def compiled(x: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor, w: torch.Tensor):
        return _CompiledTree.apply(op, x, h0, h1, w)

    torch.testing.assert_close(compiled(x, *params), layer.reference(x))
    assert torch.autograd.gradcheck(compiled, (x, *params))


def test_multires_layer_uses_the_compiled_tree_on_cpu_unless_kernels_are_off():
    torch.manual_seed(0)
    layer = MultiresConv(8, 2, 4)
    x = torch.randn(2, 8, 50, requires_grad=True)
    fast, slow = layer(x), MultiresConv(8, 2, 4, kernels="off").requires_grad_(False)
    slow.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fast, slow(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, layer.tree(x), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(fast.square().sum(), x)
    (grad_ref,) = torch.autograd.grad(layer.tree(x).square().sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_the_reference(causal):
    q, k, v = torch.randn(3, 2, 50, 4, 8).unbind(0)
    torch.testing.assert_close(attention(q, k, v, causal), attention_reference(q, k, v, causal))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_kernel_matches_the_reference(causal):
    loaded_or_fail(FLASH_ATTN)
    q, k, v = torch.randn(3, 2, 300, 4, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    torch.testing.assert_close(
        attention(q, k, v, causal, kernels="required"),
        attention_reference(q, k, v, causal),
        atol=2e-2,
        rtol=2e-2,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channel-last"])
def test_causal_conv1d_kernel_matches_the_reference(width, layout):
    loaded_or_fail(CAUSAL_CONV1D)
    x = torch.randn(2, 64, 300, device="cuda")
    if layout == "channel-last":  # how Mamba's in_proj output arrives: [B, L, C] transposed
        x = torch.randn(2, 300, 64, device="cuda").transpose(1, 2)
    w, b = torch.randn(64, width, device="cuda"), torch.randn(64, device="cuda")
    expected = F.conv1d(F.pad(x, (width - 1, 0)), w.unsqueeze(1), b, groups=64)
    got = causal_depthwise_conv(x, w, b, kernels="required")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba", "caduceus", "transformer", "hybrid"])
def test_kernels_inside_a_model_match_the_pure_pytorch_path(arch):
    """The same weights with ``kernels=required`` and ``off`` on CUDA under bf16 autocast (flash
    attention takes bf16): logits and every gradient agree to bf16 rounding."""
    sets = [*TINY[arch], "model.autocast=bf16", "model.d_model=64"]
    if arch in ("transformer", "hybrid"):
        sets.append(f"model.{'attention.' if arch == 'hybrid' else ''}n_heads=1")
    fast = _model(arch, [*sets, "model.kernels=required"]).cuda().train()
    for kernel in kernels_of(fast):
        loaded_or_fail(kernel)
    slow = _model(arch, [*sets, "model.kernels=off"]).cuda().train()
    slow.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 4, (2, 256), device="cuda")
    outs = []
    for model in (fast, slow):
        out = model(tokens)
        (out.logits.logsumexp(-1).mean() + out.hidden.square().mean()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=3e-2, rtol=3e-2)
    for (name, p), q in zip(fast.named_parameters(), slow.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-6
        assert (p.grad - q.grad).abs().max().item() <= 0.05 * scale + 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(TINY))
def test_cuda_model_matches_cpu(arch):
    model = _model(arch, TINY[arch])
    tokens = torch.randint(0, 4, (2, 64))
    expected = model(tokens).logits
    got = model.cuda()(tokens.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_each_family_learns_real_dna(arch, yeast_windows):
    """30 AdamW steps on yeast chromosome I through the objective: causal families with ``ce``,
    caduceus with ``mlm`` (its pretraining objective: 15% of bases corrupted, 80% to <mask>)."""
    losses_name = "ce" if arch in CAUSAL else "mlm"
    cfg = load_config(arch=arch, losses=losses_name, overrides=TINY[arch])
    model = _model(arch, TINY[arch]).train()
    objective = Objective.build(cfg.losses, cfg.loss, model, CharTokenizer())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    losses = []
    for step in range(30):
        tokens = yeast_windows(128, 8, seed=step)
        batch = Batch(tokens=tokens, kingdom=torch.zeros(8, dtype=torch.long), kingdoms=("x",))
        loss = objective(model, batch, model).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3 and last < math.log(4) + 0.05, losses
