"""nucleo score and nucleo embed on exports (random weights: the arithmetic, not the quality)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.inference import embed_sequence, log_likelihood
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model
from tests.conftest import sample_file

LAMBDA = sample_file("viral/lambda.fasta.gz")


def _export(tmp_path, arch: str = "transformer", extra: tuple[str, ...] = ()):
    overrides = ["model.d_model=16", "model.n_layers=1", *extra]
    if arch == "transformer":
        overrides.append("model.n_heads=2")
    cfg = load_config(arch=arch, overrides=overrides)
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, tokenizer)
    out = export_model(model.state_dict(), cfg, tokenizer, tmp_path / f"export-{arch}")
    return out, model.eval(), tokenizer


def test_a_score_is_the_sum_of_next_base_log_likelihoods_window_by_window(tmp_path):
    _out, model, tok = _export(tmp_path)
    seq = b"ACGTTGCAACGGTTAC" * 5  # 80 bases
    ids = torch.from_numpy(tok.encode(seq)).long()
    expected, scored = 0.0, 0
    for start in range(0, 80, 32):  # windows of 32 tokens; each window's first is context
        piece = ids[start : start + 32][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(piece).logits[0, :-1], -1)
        expected += float(logp.gather(-1, piece[0, 1:, None]).sum())
        scored += piece.shape[1] - 1
    nats, n, bases = log_likelihood(model, tok, seq, 32, 2, torch.device("cpu"))
    assert nats == pytest.approx(expected, rel=1e-5) and n == scored == bases == 77


def test_score_and_embed_commands_stream_a_genome_file(tmp_path, capsys):
    out, model, tok = _export(tmp_path)
    tsv = tmp_path / "scores.tsv"
    assert main(["score", str(out), str(LAMBDA), "--out", str(tsv), "--window", "512"]) == 0
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    (record,) = list(read_sequences(LAMBDA))
    assert rows[0][0] == "record" and rows[1][0] == record.id and int(rows[1][1]) == len(record)
    bits = float(rows[1][4])
    assert bits == pytest.approx(-float(rows[1][3]) / math.log(2) / int(rows[1][2]), rel=1e-4)
    assert 1.5 < bits < 4.0  # random weights over 9 tokens: about log2(9) = 3.2

    both = tmp_path / "both.tsv"
    assert main(["score", str(out), str(LAMBDA), "--out", str(both), "--both-strands"]) == 0
    seq = bytes(record.seq)
    dev = torch.device("cpu")
    fwd = log_likelihood(model, tok, seq, 1024, 8, dev)
    rev = log_likelihood(model, tok, reverse_complement_bytes(seq), 1024, 8, dev)
    mean = (-fwd[0] / fwd[2] - rev[0] / rev[2]) / 2 / math.log(2)
    assert float(both.read_text().splitlines()[1].split("\t")[4]) == pytest.approx(mean, rel=1e-4)

    npy = tmp_path / "emb.npy"
    assert (
        main(["embed", str(out), str(sample_file("plasmid/NC_005816.gb.gz")), "--out", str(npy)])
        == 0
    )
    vectors = np.load(npy)
    ids = (tmp_path / "emb.ids.txt").read_text().split()
    assert vectors.shape == (len(ids), 16) and ids and np.isfinite(vectors).all()
    pq_path = tmp_path / "emb.parquet"
    gb = str(sample_file("plasmid/NC_005816.gb.gz"))
    assert main(["embed", str(out), gb, "--out", str(pq_path)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(pq_path)
    assert table.column("id").to_pylist() == ids
    assert np.allclose(np.array(table.column("embedding").to_pylist()), vectors)


def test_an_embedding_is_the_mean_hidden_state_over_all_windows():
    tok = CharTokenizer()
    cfg = load_config(arch="hyena", overrides=["model.d_model=16", "model.n_layers=1"])
    model = build_model(cfg.arch, cfg.model, tok).eval()
    seq = b"ACGT" * 30  # 120 bases: windows of 50, 50, 20
    ids = torch.from_numpy(tok.encode(seq)).long()
    with torch.no_grad():
        hidden = torch.cat([model(ids[s : s + 50][None]).hidden[0] for s in (0, 50, 100)])
    cpu = torch.device("cpu")
    got = embed_sequence(model, tok, seq, 50, 2, cpu)
    assert np.allclose(got, hidden.mean(0).numpy(), atol=1e-5)
    got = embed_sequence(model, tok, seq, 50, 2, cpu, pooling="max")
    assert np.allclose(got, hidden.amax(0).numpy(), atol=1e-5)
    got = embed_sequence(model, tok, seq, 50, 2, cpu, pooling="last")
    assert np.allclose(got, hidden[-1].numpy(), atol=1e-5)


def test_scoring_a_bidirectional_model_is_refused_with_the_reason(tmp_path, capsys):
    out, _model, _tok = _export(tmp_path, "caduceus")
    assert main(["score", str(out), str(LAMBDA)]) == 2
    assert "causal model" in capsys.readouterr().err


def test_bpe_scores_count_the_bases_their_tokens_cover(sample_bpe):
    from data_pipeline.tokenizers import build_tokenizer

    tok = build_tokenizer("bpe", {"path": str(sample_bpe)})
    cfg = load_config(arch="transformer", overrides=["model.d_model=16", "model.n_layers=1",
                                                     "model.n_heads=2"])  # fmt: skip
    model = build_model(cfg.arch, cfg.model, tok).eval()
    (record,) = list(read_sequences(LAMBDA))
    seq = bytes(record.seq[:3000])
    nats, scored, bases = log_likelihood(model, tok, seq, 64, 4, torch.device("cpu"))
    ids = tok.encode(seq)
    first_of_windows = [ids[i] for i in range(0, len(ids), 64)]
    assert scored == len(ids) - len(first_of_windows) and nats < 0
    assert bases == len(seq) - len(tok.decode(first_of_windows))  # every other base, once
