"""Losses and their composition by the objective: values by hand, masking statistics,
compatibility errors, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.tokenizers import CharTokenizer
from losses.mlm import SELECTED, MaskedLM, MaskedLMConfig
from nucleo.alphabet import MASK, PAD
from nucleo.components import build_model
from nucleo.config import load_config
from nucleo.objective import Objective
from nucleo.schema import ConfigError
from nucleo.types import Batch, ModelOutput

TOKENIZER = CharTokenizer()


def _batch(tokens: torch.Tensor) -> Batch:
    return Batch(tokens=tokens, kingdom=torch.zeros(len(tokens), dtype=torch.long), kingdoms=("x",))


def _model(arch: str, *sets: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = load_config(arch=arch, overrides=["model.d_model=32", "model.n_layers=2", *sets])
    return build_model(arch, cfg.model, TOKENIZER)


def test_mlm_scores_only_the_selected_positions_by_hand():
    tokens = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 4, 9)
    logits[0, 1, 1] = 2.0  # position 1: the true token C gets logit 2, the 8 others 0
    logits[0, 3, 0] = 5.0  # position 3: the wrong token A gets logit 5
    batch = _batch(tokens)
    batch.aux[SELECTED] = torch.tensor([[False, True, False, True]])
    outputs = {"masked": ModelOutput(hidden=logits, logits=logits)}
    out = MaskedLM(MaskedLMConfig(), TOKENIZER)(batch, outputs, None)
    nll_1 = -math.log(math.exp(2) / (math.exp(2) + 8))
    nll_3 = -math.log(1 / (math.exp(5) + 8))
    assert out.loss.item() == pytest.approx((nll_1 + nll_3) / 2, rel=1e-6)
    assert out.metrics["accuracy"].item() == pytest.approx(0.5)
    assert out.metrics["bits_per_token"].item() == pytest.approx(out.loss.item() / math.log(2))


def test_mlm_masking_follows_the_configured_proportions():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (64, 2048), generator=gen)  # A C G T
    tokens[:, 1::97] = TOKENIZER.n_id  # N is a base too: maskable
    tokens[:, -48:] = PAD  # padded tails are never selected
    tokens[:, 0] = TOKENIZER.bos_id  # nor specials
    batch = _batch(tokens)
    loss = MaskedLM(MaskedLMConfig(), TOKENIZER)
    loss.prepare(batch, torch.Generator().manual_seed(1))
    selected, masked = batch.aux[SELECTED], batch.views["masked"]
    bases = (tokens <= TOKENIZER.n_id).sum().item()
    assert selected.sum().item() / bases == pytest.approx(0.15, abs=0.005)
    assert selected[tokens == TOKENIZER.n_id].any()
    assert not selected[:, -48:].any() and not selected[:, 0].any()
    assert torch.equal(masked[~selected], tokens[~selected])  # unselected positions untouched
    chosen, original = masked[selected], tokens[selected]
    to_mask = (chosen == MASK).float().mean().item()
    changed = ((chosen != MASK) & (chosen != original)).float().mean().item()
    kept = (chosen == original).float().mean().item()
    # a random base equals the original one time in four: 10% random -> 7.5% changed
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert changed == pytest.approx(0.1 * 3 / 4, abs=0.006)
    assert kept == pytest.approx(0.1 + 0.1 / 4, abs=0.006)
    assert set(chosen[chosen != MASK].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert set(chosen[(chosen != MASK) & (chosen != original)].unique().tolist()) <= {0, 1, 2, 3}

    again = _batch(tokens)
    loss.prepare(again, torch.Generator().manual_seed(1))  # same generator: same masks
    assert torch.equal(again.views["masked"], masked)


def test_mlm_settings_are_checked():
    with pytest.raises(ConfigError, match=r"loss.mlm.replace_random"):
        load_config(arch="caduceus", losses="mlm", overrides=["loss.mlm.replace_random=0.5"])
    with pytest.raises(ConfigError, match=r"loss.mlm.mask_prob"):
        load_config(arch="caduceus", losses="mlm", overrides=["loss.mlm.mask_prob=0"])


def test_a_loss_on_the_wrong_kind_of_model_is_a_config_error_that_names_the_fitting_ones():
    cfg = load_config(arch="caduceus", losses="ce")
    wrong = r"'ce' needs a causal model.*bidirectional models: .*'mlm'"
    with pytest.raises(ConfigError, match=wrong):
        Objective.build(cfg.losses, cfg.loss, _model("caduceus"), TOKENIZER)
    cfg = load_config(arch="hyena", losses="mlm")
    wrong = r"'mlm' needs a bidirectional model.*causal models: .*'ce'"
    with pytest.raises(ConfigError, match=wrong):
        Objective.build(cfg.losses, cfg.loss, _model("hyena"), TOKENIZER)


@pytest.mark.parametrize(
    "arch,sets",
    [("caduceus", ()), ("transformer", ("model.causal=false", "model.n_heads=2"))],
)
def test_mlm_objective_runs_one_masked_forward_and_reaches_every_parameter(arch, sets):
    model = _model(arch, *sets)
    cfg = load_config(arch=arch, losses="mlm")
    objective = Objective.build(cfg.losses, cfg.loss, model, TOKENIZER)
    assert objective.views == ("masked",)  # no unmasked forward pass is paid for
    calls = []

    def forward(tokens: torch.Tensor) -> ModelOutput:
        calls.append(tokens)
        return model(tokens)

    tokens = torch.randint(0, 4, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = _batch(tokens)
    result = objective(forward, batch, model)
    assert len(calls) == 1 and torch.equal(calls[0], batch.views["masked"])
    assert (calls[0] == MASK).any()
    selected = batch.aux[SELECTED]
    expected = F.cross_entropy(model(calls[0]).logits[selected].float(), tokens[selected])
    torch.testing.assert_close(result.loss, expected)
    assert set(result.metrics) >= {"loss", "mlm", "mlm/bits_per_token", "mlm/accuracy"}
    result.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
