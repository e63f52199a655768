"""k-mer Markov baselines (data_pipeline.markov, nucleo.studies.markov, nucleo baseline): counts
against a plain loop, smoothed probabilities, backoff, case and N, save/load, and the commands
on a tiny shard set whose validation windows are the ones training draws."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import markov
from data_pipeline.loader import DataConfig, validation_set, validation_windows
from data_pipeline.markov import MarkovModel, fit_from_shards
from data_pipeline.shards import ShardOptions, SourceFile, build_shards
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli import baseline
from nucleo.cli.main import main
from nucleo.studies.markov import validation_bits

LN2 = math.log(2)


def _random_dna(length: int, seed: int, alphabet: bytes = b"ACGT") -> bytes:
    rng = np.random.default_rng(seed)
    return bytes(rng.choice(np.frombuffer(alphabet, np.uint8), size=length).astype(np.uint8))


#: the favourite next base of each 2-base context of ``_second_order``'s chain
FAVOURITE = np.random.default_rng(99).integers(0, 4, size=16)


def _second_order(length: int, seed: int) -> bytes:
    """DNA from an order-2 chain that strongly prefers one next base per context (seed: the
    draws; the chain is always the same)."""
    rng = np.random.default_rng(seed)
    out = list(rng.integers(0, 4, size=2))
    for u in rng.random(length - 2):
        ctx = out[-2] * 4 + out[-1]
        out.append(FAVOURITE[ctx] if u < 0.7 else int(rng.integers(0, 4)))
    return bytes(b"ACGT"[c] for c in out)


@pytest.fixture(scope="module")
def model() -> MarkovModel:
    mixed = _random_dna(20_000, 0, b"ACGTacgtNn")
    return MarkovModel.fit([mixed, _second_order(5_000, 1)], max_order=5)


def test_counts_match_a_plain_loop_at_every_order(model):
    seqs = [_random_dna(20_000, 0, b"ACGTacgtNn"), _second_order(5_000, 1)]
    for k in range(model.max_order + 1):
        expected = Counter()
        for seq in seqs:
            upper = seq.upper()
            for i in range(k, len(upper)):
                if b"N" not in upper[i - k : i + 1]:
                    expected[upper[i - k : i + 1]] += 1
        got = {}
        for number, n in enumerate(model.counts[k].reshape(-1)):
            if n:
                mer = bytes(b"ACGT"[(number >> (2 * j)) & 3] for j in range(k, -1, -1))
                got[mer] = int(n)
        assert got == dict(expected), k


def test_probabilities_sum_to_one_and_are_what_nats_scores(model):
    rng = np.random.default_rng(2)
    seq = _second_order(300, 3) + b"N" + _random_dna(200, 4, b"ACGTacgtn")
    for k in range(model.max_order + 1):
        for length in (0, 1, 3, 9):  # seen, unseen (with N) and short contexts
            context = _random_dna(length, int(rng.integers(1 << 30)), b"ACGTN")
            p = model.probabilities(context, k)
            assert p.shape == (4,) and (p > 0).all()
            assert p.sum() == pytest.approx(1.0, abs=1e-12)
        nats = model.nats(seq, k)
        for i in rng.integers(0, len(seq), size=20):
            if seq[i : i + 1] in b"Nn":
                continue
            p = model.probabilities(seq[max(0, i - k) : i], k)
            assert nats[i] == pytest.approx(-math.log(p[b"ACGT".index(seq[i : i + 1].upper())]))


def test_order_2_learns_a_periodic_sequence_and_order_0_does_not():
    periodic = b"ACGTTGCA" * 1000  # every 2-mer has one successor; the bases are balanced
    m = MarkovModel.fit([periodic], max_order=3)
    bits = np.nanmean(m.nats_by_order(periodic[:800], 3), axis=1) / LN2
    assert bits[0] == pytest.approx(2.0, abs=0.01)
    assert bits[1] > 0.9  # one base of context leaves two choices after A, C, G and T
    assert bits[2] < 0.02 and bits[3] < 0.02


def test_case_does_not_matter_and_n_is_unknown(model):
    seq = _second_order(400, 5)
    upper = model.nats(seq, 5)
    assert np.array_equal(model.nats(seq.lower(), 5), upper)
    assert np.array_equal(
        MarkovModel.fit([seq.lower()], 3).counts[3], MarkovModel.fit([seq], 3).counts[3]
    )
    for n in (b"N", b"n", b"x"):
        holed = seq[:100] + n + seq[101:]
        nats = model.nats(holed, 5)
        assert np.isnan(nats[100]) and np.isnan(nats).sum() == 1
        # after the N the context starts again: as at the start of a sequence of its own
        assert nats[101:106] == pytest.approx(model.nats(seq[101:106], 5))
        assert nats[110:] == pytest.approx(upper[110:])


def test_the_start_of_a_sequence_backs_off_to_the_lower_orders(model):
    seq = _second_order(50, 6)
    rows = model.nats_by_order(seq, 5)
    for k in range(6):
        assert np.array_equal(rows[k], model.nats(seq, k))
        for i in range(k):  # i bases of context: order i's probability
            assert rows[k, i] == rows[i, i]
    assert rows[5, 0] == pytest.approx(
        -math.log(model.probabilities(b"", 0)[b"ACGT".index(seq[:1])])
    )
    assert not np.array_equal(rows[5, 5:], rows[4, 5:])


def test_save_and_load_give_the_same_nats(model, tmp_path):
    path = model.save(tmp_path / "m.npz")
    again = MarkovModel.load(path)
    seq = _second_order(500, 7)
    assert np.array_equal(again.nats_by_order(seq, 5), model.nats_by_order(seq, 5))
    assert again.meta == {"format": markov.FORMAT, **model.meta}
    (tmp_path / "junk.npz").write_text("not a model\n")
    with pytest.raises(ValueError, match=r"junk\.npz: not a nucleo Markov model"):
        MarkovModel.load(tmp_path / "junk.npz")


def test_the_cli_order_limit_is_the_library_s():
    assert baseline.MAX_ORDER == markov.MAX_ORDER


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """Two kingdoms of four records each (every other 37 bases soft-masked, 20 Ns): train and
    val splits."""
    folder = tmp_path_factory.mktemp("markov")
    sources = []
    for i, kingdom in enumerate(("viral", "plasmid")):
        path = folder / f"{kingdom}.fa.gz"
        with gzip.open(path, "wt") as fh:
            for r in range(4):
                seq = _second_order(3_000 + 500 * r, 10 * i + r).decode()
                blocks = [seq[j : j + 37] for j in range(0, len(seq), 37)]
                seq = "".join(b.lower() if j % 2 else b for j, b in enumerate(blocks))
                seq = seq[:900] + "N" * 20 + seq[920:]
                fh.write(f">{kingdom}{r}\n{seq}\n")
        sources.append(SourceFile(path, kingdom))
    options = ShardOptions(chunk_len=1024, min_shards=1, val_fraction=0.5)
    build_shards(sources, folder / "shards", options, log=lambda _: None)
    return folder / "shards"


def test_markov_command_reports_what_the_api_computes(tiny_shards, tmp_path, capsys):
    out, saved = tmp_path / "report" / "markov.md", tmp_path / "m.npz"
    argv = ["baseline", "markov", "--shards", str(tiny_shards), "--max-order", "4",
            "--window", "256", "--windows-per-kingdom", "3", "--seed", "5",
            "--out", str(out), "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    fitted = fit_from_shards(tiny_shards, 4, progress=None)
    loaded = MarkovModel.load(saved)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.counts, fitted.counts, strict=True))
    expected = validation_bits(fitted, tiny_shards, 256, 3, 5)
    assert report["validation"] == expected
    assert report["command"].startswith("nucleo baseline markov --shards")
    assert expected["kingdoms"] == ["plasmid", "viral"]
    best = min(expected["bits_per_base"][k]["all"] for k in map(str, range(5)))
    assert best < expected["bits_per_base"]["0"]["all"] - 0.3  # the chain is order 2
    text = out.read_text()
    assert f"| 4 | {expected['bits_per_base']['4']['all']:.4f} |" in text
    assert f"| 4 | {expected['bits_per_base']['4']['all']:.4f} |" in printed
    # the soft-masked bases and the rest pool to the whole
    total = sum(expected["bases_scored"].values())
    repeat = expected["repeat_bases"]
    assert 0 < repeat < total
    for k, row in expected["bits_per_base"].items():
        pooled = row["repeat"] * repeat + row["non_repeat"] * (total - repeat)
        assert pooled == pytest.approx(row["all"] * total), k
    assert "| order | all | repeat | non_repeat | plasmid | viral |" in text
    # the windows are training's: every non-pad, non-N target after the first position
    tokens, kingdom, names = validation_windows(
        DataConfig(shards=str(tiny_shards), seq_len=256), CharTokenizer(), 3, 5
    )
    found = validation_set(DataConfig(shards=str(tiny_shards), seq_len=256), CharTokenizer(), 3, 5)
    assert repeat == pytest.approx(float(found.repeat[:, 1:][found.tokens[:, 1:] < 4].sum()))
    for index, name in enumerate(names):
        targets = tokens[kingdom == index][:, 1:]
        assert expected["bases_scored"][name] == int((targets < 4).sum())
        assert expected["n_targets"][name] == int((targets == 4).sum())


def test_score_command_gives_each_record_and_the_total(tiny_shards, tmp_path, capsys):
    model = fit_from_shards(tiny_shards, 3, progress=None)
    path = model.save(tmp_path / "m.npz")
    fasta = tmp_path / "x.fa"
    one, two = _second_order(700, 40), b"ACGTNN" + _second_order(300, 41).lower()
    fasta.write_bytes(b">one\n" + one + b"\n>two\n" + two + b"\n")
    assert main(["baseline", "score", "--model", str(path), "--order", "2", str(fasta)]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.strip().splitlines()]
    assert rows[0] == ["record", "bases", "tokens_scored", "log_likelihood_nats", "bits_per_base"]
    total_nats = 0.0
    for row, seq in zip(rows[1:], (one, two), strict=True):
        nats = model.nats(seq, 2)[1:]
        scored = nats[~np.isnan(nats)]
        total_nats += scored.sum()
        assert row[:3] == [row[0], str(len(seq)), str(len(scored))]
        assert float(row[4]) == pytest.approx(scored.mean() / LN2, abs=1e-6)
    bits = total_nats / (len(one) + len(two) - 4) / LN2  # minus the two firsts and two Ns
    assert f"{bits:.4f} bits per base in all" in captured.err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["markov", "--shards", "{tmp}/nowhere"], "--shards {tmp}/nowhere: no such folder"),
        (["markov", "--shards", "{shards}", "--max-order", "13"], "--max-order: 13 is not valid"),
        (["markov", "--shards", "{shards}", "--out", "{tmp}/r.txt"], "--out {tmp}/r.txt"),
        (["markov", "--shards", "{shards}", "--kingdom", "viruses"], "'viruses' is not in"),
        (["score", "--model", "{tmp}/junk.npz", "{tmp}/x.fa"], "--model {tmp}/junk.npz: not a"),
        (["score", "--model", "{tmp}/m.npz", "--order", "3", "{tmp}/x.fa"], "--order 3: "),
        (["score", "--model", "{tmp}/m.npz", "{tmp}/missing.fa"], "missing.fa: no such genome"),
    ],
)
def test_bad_input_is_one_line(argv, says, tiny_shards, tmp_path, capsys):
    MarkovModel.fit([b"ACGTACGT"], 1).save(tmp_path / "m.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "x.fa").write_text(">x\nACGT\n")
    fill = {"tmp": str(tmp_path), "shards": str(tiny_shards)}
    argv = ["baseline", *(a.format(**fill) for a in argv)]
    try:
        code = main(argv)
    except SystemExit as stop:  # the parser's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("nucleo: error: "), err
    assert says.format(**fill) in err
    assert not (tmp_path / "markov.md").exists()


def test_scoring_in_blocks_changes_nothing(model, monkeypatch):
    seq = _second_order(1_000, 8) + b"N" + _second_order(300, 9)
    whole, total = model.nats_by_order(seq, 5), model.total_nats(seq, 5)
    monkeypatch.setattr(markov, "SCORE_BLOCK", 64)
    assert np.array_equal(model.nats_by_order(seq, 5), whole, equal_nan=True)
    nats, count = model.total_nats(seq, 5)
    assert count == total[1] == len(seq) - 2
    assert nats == pytest.approx(total[0])
