"""The repeat mask end to end: soft-masked (lower-case) bases are kept by the readers, the
shards (format 2) and the loader, become per-token loss weights (``data.repeat_weight``, per
loss ``repeat_weight``), and validation reports bits per base on repeats and the rest apart.
Old (format 1) shards still read, with no mask."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_pipeline.loader import (
    DataConfig,
    TrainLoader,
    repeat_fractions,
    split_chunks,
    validation_set,
)
from data_pipeline.readers import read_sequences
from data_pipeline.shards import (
    MANIFEST,
    ShardOptions,
    SourceFile,
    build_shards,
    load_manifest,
    soft_masked,
)
from data_pipeline.tokenizers import CharTokenizer, KmerTokenizer, KmerTokenizerConfig
from nucleo.core.alphabet import A
from nucleo.core.schema import ConfigError
from nucleo.core.types import Batch
from nucleo.train.components import LOSSES, build_model
from nucleo.train.config import resolve
from nucleo.train.engine import DistInfo
from nucleo.train.evaluation import EvalConfig, Validator
from nucleo.train.objective import Objective
from nucleo.train.trainer import check_repeat_mask
from tests.conftest import SOFT_MASKED

CHAR = CharTokenizer()


def test_readers_keep_the_soft_mask_only_when_asked(tmp_path):
    path = tmp_path / "x.fa"
    path.write_text(">a\nACGTacgtnNryRYuU\n")
    (kept,) = read_sequences(path, soft_mask=True)
    (plain,) = read_sequences(path)
    assert bytes(kept.seq) == b"ACGTacgtnNnnNNtT"
    assert bytes(plain.seq) == b"ACGTACGTNNNNNNTT"


def test_shards_keep_the_mask_and_dedup_ignores_case(tmp_path):
    """Chunks hold the input's lower case base for base; a record that differs only in case
    is a duplicate; the manifest says format 2, soft-masked, and each record's repeat share."""
    (record, _) = read_sequences(SOFT_MASKED, soft_mask=True)
    twin = tmp_path / "twin.fa"
    twin.write_text(">twin\n" + bytes(record.seq).upper().decode() + "\n")
    out = tmp_path / "shards"
    options = ShardOptions(chunk_len=4096, min_shards=1, val_fraction=0.0)
    sources = [SourceFile(SOFT_MASKED, "invertebrate"), SourceFile(twin, "invertebrate")]
    manifest = build_shards(sources, out, options, log=lambda _: None)
    assert manifest["format"] == "nucleo-shards/2" and soft_masked(manifest)
    rows = {r["id"]: r for r in manifest["records"]}
    assert rows["twin"]["duplicate_of"] == rows[record.id]["key"]
    lower = sum(bytes(record.seq).count(b) for b in b"acgtn")
    assert rows[record.id]["repeat_fraction"] == pytest.approx(lower / len(record), abs=1e-4)
    chunks = split_chunks(out, "invertebrate", "train", manifest, soft_mask=True)
    first = {off: seq for key, off, seq in chunks if key == rows[record.id]["key"]}
    for offset, seq in first.items():
        assert seq == bytes(record.seq[offset : offset + len(seq)])
    upper = split_chunks(out, "invertebrate", "train", manifest)  # default: bases upper case
    assert all(seq == seq.upper() for _, _, seq in upper)


def test_old_format_shards_read_without_a_mask(masked_shards, tmp_path):
    """A format-1 shard set (before the mask existed) loads; batches carry no repeat mask and
    a repeat weight below 1 on it is refused by name."""
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((masked_shards / MANIFEST).read_text())
    manifest["format"] = "nucleo-shards/1"
    manifest["options"].pop("soft_mask")
    for kingdom in manifest["kingdoms"]:
        (old / kingdom).symlink_to(masked_shards / kingdom)
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert not soft_masked(load_manifest(old))
    cfg = DataConfig(shards=str(old), seq_len=64, num_workers=0, verify_shards=False)
    batch = next(iter(TrainLoader(cfg, CHAR, batch_size=2, seed=0)))
    assert batch.repeat is None
    assert validation_set(cfg, CHAR, 2, seed=0).repeat is None
    model = build_model("transformer", resolve({"model": _TINY}).model, CHAR)
    objective = Objective.build(["ce"], {"ce": _ce()}, model, CHAR, repeat_weight=0.1)
    with pytest.raises(ConfigError, match=r"data\.repeat_weight.*soft mask.*nucleo data build"):
        check_repeat_mask(objective, load_manifest(old), str(old))


def test_repeat_fractions_follow_each_tokens_bases():
    window = b"acGTnnAC"
    chars = CHAR.encode(window.upper())
    assert repeat_fractions(window, chars, CHAR.bases_per_token).tolist() == [
        1,
        1,
        0,
        0,
        1,
        1,
        0,
        0,
    ]
    kmer = KmerTokenizer(KmerTokenizerConfig(k=2))
    pairs = kmer.encode(b"ACGTAAAC")
    fractions = repeat_fractions(b"aCgtAaAC", pairs, kmer.bases_per_token)
    assert fractions.tolist() == [0.5, 1.0, 0.5, 0.0]
    assert repeat_fractions(b"ACGT", chars[:4], CHAR.bases_per_token).sum() == 0


def test_training_batches_mark_exactly_the_lower_case_bases(tmp_path):
    """A genome whose A's, and only they, are lower case: every batch's mask is 1 exactly
    on the A tokens (also on reverse-complemented windows, where they become T's)."""
    rng = np.random.default_rng(0)
    seq = bytes(rng.choice(list(b"ACGT"), 20000).astype(np.uint8)).replace(b"A", b"a")
    path = tmp_path / "a.fa"
    path.write_text(">a\n" + seq.decode() + "\n")
    out = tmp_path / "shards"
    options = ShardOptions(chunk_len=2048, min_shards=1, val_fraction=0.0)
    build_shards([SourceFile(path, "viral")], out, options, log=lambda _: None)
    cfg = DataConfig(shards=str(out), seq_len=128, num_workers=0, rc_prob=0.5)
    loader = iter(TrainLoader(cfg, CHAR, batch_size=4, seed=1))
    flips = 0
    for _ in range(4):
        batch = next(loader)
        assert batch.repeat is not None and batch.repeat.shape == batch.tokens.shape
        strand = batch.tokens == A
        flipped = batch.tokens == CHAR.encode(b"T")[0]
        for row in range(len(batch.tokens)):
            marked = batch.repeat[row].bool()
            assert torch.equal(marked, strand[row]) or torch.equal(marked, flipped[row])
            flips += int(torch.equal(marked, flipped[row]))
    assert 0 < flips < 16


_TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2}


def _ce(**kwargs):
    return LOSSES.get("ce").config(**kwargs)


def _batch(seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4, (3, 24), generator=gen)
    tokens[2, 20:] = CHAR.pad_id
    repeat = (torch.rand(3, 24, generator=gen) < 0.4).float()
    repeat[2, 20:] = 0
    return Batch(tokens, torch.zeros(3, dtype=torch.long), ("x",), CHAR.pad_id, repeat=repeat)


def test_ce_weights_targets_and_zero_weight_drops_repeats():
    torch.manual_seed(0)
    model = build_model("transformer", resolve({"model": _TINY}).model, CHAR)
    batch = _batch()
    logits = model(batch.tokens).logits.detach()
    targets, repeat = batch.tokens[:, 1:], batch.repeat[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none"
    )
    keep = targets != CHAR.pad_id
    for weight in (1.0, 0.1, 0.0):
        objective = Objective.build(["ce"], {"ce": _ce()}, model, CHAR, repeat_weight=weight)
        got = objective(model, batch, model).metrics["ce"]
        w = (1 - (1 - weight) * repeat) * keep
        assert float(got) == pytest.approx(float((nll * w).sum() / w.sum()), rel=1e-5)
    only_unique = keep & (repeat == 0)
    expected = nll[only_unique].mean()
    zero = Objective.build(["ce"], {"ce": _ce()}, model, CHAR, repeat_weight=0.0)
    assert float(zero(model, batch, model).metrics["ce"]) == pytest.approx(float(expected), 1e-5)


def test_a_loss_setting_overrides_the_data_setting_and_every_loss_takes_weights():
    """loss.<name>.repeat_weight wins over data.repeat_weight; every causal loss gives a finite
    value under weights, exactly its unweighted value under weights of 1, and a different one
    when repeats are down-weighted."""
    torch.manual_seed(0)
    model = build_model("transformer", resolve({"model": _TINY}).model, CHAR)
    names = ["ce", "rc", "cgr", "walk", "headless", "ph"]
    raw = {"losses": names, "loss": {"rc": {"repeat_weight": 0.5}, "ph": {"every": 1}}}
    cfg = resolve(raw)
    objective = Objective.build(cfg.losses, cfg.loss, model, CHAR, repeat_weight=0.1)
    assert {t.name: t.repeat_weight for t in objective.terms} == {
        "ce": 0.1, "rc": 0.5, "cgr": 0.1, "walk": 0.1, "headless": 0.1, "ph": 0.1,
    }  # fmt: skip
    batch = _batch()
    outputs = objective.forward_views(model, batch, torch.Generator().manual_seed(3))
    for term in objective.terms:
        weighted = term.batch_for(batch)
        assert torch.allclose(weighted.weights, 1 - (1 - term.repeat_weight) * batch.repeat)
        plain = term.loss(replace(batch, weights=None), outputs, model).loss
        ones = term.loss(replace(batch, weights=torch.ones(batch.tokens.shape)), outputs, model)
        down = term.loss(weighted, outputs, model).loss
        assert math.isfinite(float(down)), term.name
        assert float(ones.loss) == pytest.approx(float(plain), rel=1e-5), term.name
        assert float(down) != pytest.approx(float(plain), rel=1e-4), term.name


def test_validation_reports_repeat_and_other_bases_apart(masked_shards):
    """val/repeat and val/non_repeat bits per base average (by their bases) to the overall
    figure; the masked share is the lower-case share of the validation windows."""
    torch.manual_seed(0)
    data = DataConfig(shards=str(masked_shards), seq_len=256, num_workers=0)
    model = build_model("transformer", resolve({"model": _TINY}).model, CHAR)
    objective = Objective.build(["ce"], {"ce": _ce()}, model, CHAR, repeat_weight=0.1)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    validator = Validator(EvalConfig(windows_per_kingdom=6), data, CHAR, objective, dist, 0)
    metrics = validator(model, model)
    share = metrics["val/repeat_fraction"]
    assert 0.05 < share < 0.6
    mixed = share * metrics["val/repeat/bits_per_base"]
    mixed += (1 - share) * metrics["val/non_repeat/bits_per_base"]
    assert mixed == pytest.approx(metrics["val/bits_per_base"], rel=1e-6)
    found = validation_set(data, CHAR, 6, seed=0)
    scored = found.repeat[:, 1:][found.tokens[:, 1:] != CHAR.pad_id]
    assert float(scored.mean()) == pytest.approx(share, rel=1e-6)
