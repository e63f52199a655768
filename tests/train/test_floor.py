"""eval.floor: the k-mer Markov floor that training's validation logs beside its bits per base
is what ``nucleo baseline markov`` computes on the same windows; bad settings are config
errors that name the key; ``nucleo compare`` shows the overall floor and no floor kingdom."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.loader import DataConfig
from data_pipeline.markov import MarkovModel, WindowNats, fit_from_shards
from data_pipeline.shards import ShardOptions, SourceFile, build_shards
from data_pipeline.tokenizers import CharTokenizer, KmerTokenizer, KmerTokenizerConfig
from nucleo.core.schema import ConfigError
from nucleo.studies.compare import RunRow, columns, table
from nucleo.studies.markov import validation_bits
from nucleo.train.components import LOSSES, build_model
from nucleo.train.config import resolve
from nucleo.train.engine import DistInfo
from nucleo.train.evaluation import EvalConfig, Validator
from nucleo.train.objective import Objective
from tests.conftest import SOFT_MASKED, sample_file

CHAR = CharTokenizer()
SEQ_LEN, PER_KINGDOM, SEED = 256, 6, 3


def _dist(rank: int = 0, world_size: int = 1) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two kingdoms with records in both splits: the soft-masked dm3 segment (two records) and
    five mitochondria, in 4 kb chunks."""
    mito = ["bonobo.fasta.gz", "chickenMito.fa.gz", "fuguMito.fa.gz", "gorilla.fasta.gz",
            "mouseMito.fa.gz"]  # fmt: skip
    sources = [SourceFile(SOFT_MASKED, "invertebrate")]
    sources += [SourceFile(sample_file(f"mitochondrion/{name}"), "mitochondrion") for name in mito]
    out = tmp_path_factory.mktemp("shards") / "floor"
    options = ShardOptions(chunk_len=4096, min_shards=1, val_fraction=0.5)
    build_shards(sources, out, options, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def floor(shards, tmp_path_factory) -> tuple[MarkovModel, str]:
    """An order-4 model fit on the shards' training split, and its saved .npz."""
    model = fit_from_shards(shards, 4, progress=None)
    path = model.save(tmp_path_factory.mktemp("floor") / "markov.npz")
    return model, str(path)


def _validator(shards, cfg: EvalConfig, tokenizer=CHAR, dist: DistInfo | None = None):
    torch.manual_seed(0)
    data = DataConfig(shards=str(shards), seq_len=SEQ_LEN, num_workers=0)
    tiny = resolve({"model": {"d_model": 16, "n_layers": 1, "n_heads": 2}}).model
    model = build_model("transformer", tiny, tokenizer)
    objective = Objective.build(["ce"], {"ce": LOSSES.get("ce").config()}, model, tokenizer)
    return Validator(cfg, data, tokenizer, objective, dist or _dist(), SEED), model


@pytest.mark.parametrize("order", [None, 2])
def test_the_floor_is_what_baseline_markov_computes_on_the_same_windows(shards, floor, order):
    model, path = floor
    validator, network = _validator(
        shards, EvalConfig(windows_per_kingdom=PER_KINGDOM, floor=path, floor_order=order)
    )
    assert validator.floor_order == (4 if order is None else order)
    first = validator(network, network)
    expected = validation_bits(model, shards, SEQ_LEN, PER_KINGDOM, SEED)
    bits = expected["bits_per_base"][str(validator.floor_order)]
    assert sorted(expected["kingdoms"]) == ["invertebrate", "mitochondrion"]
    want = {"val/floor/bits_per_base": bits["all"]}
    want |= {f"val/floor/bits_per_base/{k}": bits[k] for k in expected["kingdoms"]}
    want |= {f"val/floor/{p}/bits_per_base": bits[p] for p in ("repeat", "non_repeat")}
    got = {k: v for k, v in first.items() if k.startswith("val/floor/")}
    assert got == pytest.approx(want, rel=1e-12)
    # beside every figure of the network, and the same at every validation
    for key in want:
        assert key.replace("floor/", "") in first
    again = validator(network, network)
    assert {k: again[k] for k in want} == {k: first[k] for k in want}


def test_each_rank_s_share_sums_to_the_whole(shards, floor):
    """Ranks score their own windows; the sums they all-reduce are the single rank's."""
    _, path = floor
    cfg = EvalConfig(windows_per_kingdom=PER_KINGDOM, floor=path)
    whole = _validator(shards, cfg)[0].floor_sums
    shares = [_validator(shards, cfg, dist=_dist(r, 2))[0].floor_sums for r in (0, 1)]
    assert whole is not None and all(s is not None for s in shares)
    summed = shares[0].flat() + shares[1].flat()
    assert summed == pytest.approx(whole.flat(), rel=1e-12)
    back = WindowNats.from_flat(summed, 5, 2)
    assert back.bits_per_base(4, ("a", "b")) == pytest.approx(whole.bits_per_base(4, ("a", "b")))


def test_a_missing_or_bad_floor_is_a_config_error_naming_eval_floor(shards, tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_text("not a model\n")
    for path, says in ((tmp_path / "missing.npz", "no such Markov model file"), (junk, "not a")):
        with pytest.raises(ConfigError, match=says) as err:
            _validator(shards, EvalConfig(floor=str(path)))
        assert err.value.key == "eval.floor"


def test_an_order_the_model_lacks_is_refused(shards, floor):
    with pytest.raises(ConfigError, match=r"holds orders 0\.\.4") as err:
        _validator(shards, EvalConfig(floor=floor[1], floor_order=5))
    assert err.value.key == "eval.floor_order"
    with pytest.raises(ConfigError, match=r"needs eval\.floor") as err:
        resolve({"eval": {"floor_order": 3}})
    assert err.value.key == "eval.floor_order"


def test_a_kmer_run_with_a_floor_is_refused(shards, floor):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: char") as err:
        resolve({"data": {"tokenizer": "kmer"}, "eval": {"floor": floor[1]}})
    assert err.value.key == "eval.floor"
    kmer = KmerTokenizer(KmerTokenizerConfig(k=3))
    with pytest.raises(ConfigError, match="not 'kmer'") as err:
        _validator(shards, EvalConfig(floor=floor[1]), tokenizer=kmer)
    assert err.value.key == "eval.floor"


def test_compare_shows_the_overall_floor_and_no_floor_kingdom():
    metrics = {
        "val/bits_per_base": 1.9, "val/bits_per_base/viral": 1.8, "val/ce": 1.3,
        "val/floor/bits_per_base": 1.95, "val/floor/bits_per_base/viral": 1.85,
        "val/floor/repeat/bits_per_base": 1.7,
    }  # fmt: skip
    row = RunRow("r", "r", "x", "FINISHED", "hyena", "ce", 10, 8, 1e6, 1e12, 1.9,
                 kingdoms={"viral": 1.8}, metrics=metrics)  # fmt: skip
    assert columns([row]) == ["val/floor/bits_per_base", "val/ce", "val/bits_per_base/viral"]
    head = table([row]).splitlines()[0]
    assert "| val/bits_per_base | val/floor/bits_per_base | val/ce | viral |" in head
