"""The transformer: shapes, causality, the objective's checks, and the portable export."""

from __future__ import annotations

import pytest
import torch

from architectures.transformer import TransformerConfig
from data_pipeline.tokenizers import CharTokenizer
from nucleo.core.schema import ConfigError
from nucleo.core.types import Batch
from nucleo.train.components import ARCHITECTURES
from nucleo.train.compute import count_parameters
from nucleo.train.config import load_config
from nucleo.train.export import export_model, load_exported
from nucleo.train.objective import Objective

TINY = TransformerConfig(d_model=32, n_layers=2, n_heads=4)


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**TINY.__dict__, **kw})
    return ARCHITECTURES.build("transformer", cfg, vocab_size=9).eval()


def test_shapes_and_tied_head():
    model = _model()
    out = model(torch.randint(0, 5, (3, 40)))
    assert out.hidden.shape == (3, 40, 32) and out.logits.shape == (3, 40, 9)
    assert model.head.weight is model.embed.weight
    counts = count_parameters(model)
    assert counts["total"] - counts["non_embedding"] == 9 * 32


def test_causal_output_at_t_never_depends_on_later_tokens():
    model = _model()
    torch.manual_seed(1)
    tokens = torch.randint(0, 5, (2, 64))
    base = model(tokens)
    for t in (0, 17, 62):
        changed = tokens.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 4
        out = model(changed)
        torch.testing.assert_close(out.logits[:, : t + 1], base.logits[:, : t + 1])
        torch.testing.assert_close(out.hidden[:, : t + 1], base.hidden[:, : t + 1])
        assert not torch.allclose(out.logits[:, t + 1 :], base.logits[:, t + 1 :])


def test_bidirectional_option_sees_the_future():
    model = _model(causal=False)
    tokens = torch.randint(0, 4, (1, 32))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 4
    assert not torch.allclose(model(tokens).logits[:, 0], model(changed).logits[:, 0])


def test_ce_on_a_bidirectional_model_is_a_config_error():
    cfg = load_config()
    with pytest.raises(ConfigError, match="needs a causal model"):
        Objective.build(["ce"], cfg.loss, _model(causal=False), CharTokenizer())


def test_objective_weights_and_metrics():
    cfg = load_config(overrides=["loss.ce.weight=0.25"])
    model = _model()
    objective = Objective.build(["ce"], cfg.loss, model, CharTokenizer())
    assert objective.views == ("forward",)
    tokens = torch.randint(0, 4, (2, 16))
    batch = Batch(tokens, torch.zeros(2, dtype=torch.long), ("viral",))
    out = objective(model, batch, model)
    assert out.loss.requires_grad
    torch.testing.assert_close(out.metrics["loss"], 0.25 * out.metrics["ce"])
    torch.testing.assert_close(
        out.metrics["ce/bits_per_token"], out.metrics["ce"] / 0.6931471805599453
    )


def test_padding_is_ignored_by_ce():
    cfg = load_config()
    model = _model()
    objective = Objective.build(["ce"], cfg.loss, model, CharTokenizer())
    tokens = torch.randint(0, 4, (1, 20))
    padded = torch.cat([tokens, torch.full((1, 12), CharTokenizer.pad_id)], 1)
    kingdom = torch.zeros(1, dtype=torch.long)
    a = objective(model, Batch(tokens, kingdom, ("x",)), model).metrics["ce"]
    b = objective(model, Batch(padded, kingdom, ("x",)), model).metrics["ce"]
    torch.testing.assert_close(a, b)


def test_export_round_trip_gives_the_same_logits(tmp_path):
    cfg = load_config(overrides=["model.d_model=32", "model.n_layers=2"])
    model = ARCHITECTURES.build("transformer", cfg.model, vocab_size=9).eval()
    export_model(model.state_dict(), cfg, CharTokenizer(), tmp_path, {"step": 7})
    loaded, tokenizer, meta = load_exported(tmp_path)
    tokens = torch.from_numpy(tokenizer.encode(b"ACGTTGCANNACGT")).unsqueeze(0)
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    assert meta["arch"] == "transformer" and meta["trained"]["step"] == 7
    assert loaded.head.weight is loaded.embed.weight


def test_loading_something_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="nucleo export"):
        load_exported(tmp_path)


def test_validation_reports_true_means_over_uneven_batches(sample_shards):
    """val/ce is the mean over windows, whatever the batch size; bits/base = ce / ln 2 here."""
    from data_pipeline.loader import DataConfig
    from nucleo.train.engine import DistInfo
    from nucleo.train.evaluation import EvalConfig, Validator

    cfg = load_config(overrides=["model.d_model=32", "model.n_layers=1"])
    model = _model()
    objective = Objective.build(["ce"], cfg.loss, model, CharTokenizer())
    data = DataConfig(shards=str(sample_shards), seq_len=64)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    results = []
    for batch_size in (1, 7, 64):
        validator = Validator(
            EvalConfig(windows_per_kingdom=3, batch_size=batch_size),
            data,
            CharTokenizer(),
            objective,
            dist,
            seed=0,
        )
        results.append(validator(model, model))
    assert results[0]["val/ce"] == pytest.approx(results[1]["val/ce"], rel=1e-6)
    assert results[0]["val/ce"] == pytest.approx(results[2]["val/ce"], rel=1e-6)
    assert results[0]["val/bits_per_base"] == pytest.approx(
        results[0]["val/ce"] / 0.6931471805599453, rel=1e-6
    )
    assert len([k for k in results[0] if k.startswith("val/bits_per_base/")]) == 9
