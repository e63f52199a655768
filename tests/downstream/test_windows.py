"""Whole records: strided windows score and embed each token once with the most left context,
embeddings come from any layer, and predict windows a whole record (token-weighted mean of
its windows' probabilities, both strands over the same bases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.classifier import (
    SequenceClassifier,
    classify,
    predict_file,
    predict_proba,
    save_classifier,
)
from nucleo.downstream.inference import embed_sequence, log_likelihood, windows
from tests.downstream.test_inference import _export

CPU = torch.device("cpu")
SEQ = bytes(np.random.default_rng(7).choice(list(b"ACGT"), 90).astype(np.uint8))


def test_windows_cover_every_token_once():
    assert windows(10, 4) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    assert windows(10, 4, 2) == [(0, 4, 0), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(0, 4) == [(0, 0, 0)]
    for length, window, stride in [(90, 32, 7), (33, 32, 1), (5, 8, 3)]:
        spans = windows(length, window, stride)
        owned, stops = [a + o for a, _, o in spans], [b for _, b, _ in spans]
        assert owned[0] == 0 and stops[-1] == length
        assert all(o == s for o, s in zip(owned[1:], stops[:-1], strict=True))
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_a_strided_score_gives_each_token_the_most_left_context(tmp_path):
    _out, model, tok = _export(tmp_path)
    ids = torch.from_numpy(tok.encode(SEQ)).long()
    window = 32
    expected = 0.0
    with torch.no_grad():
        for p in range(1, len(ids)):  # stride 1: every token after the first sees window - 1
            context = ids[max(0, p - window + 1) : p + 1][None]
            logp = torch.log_softmax(model(context).logits[0, -2], -1)
            expected += float(logp[ids[p]])
    nats, scored, bases = log_likelihood(model, tok, SEQ, window, 4, CPU, stride=1)
    assert scored == bases == len(ids) - 1 and nats == pytest.approx(expected, rel=1e-5)
    consecutive = log_likelihood(model, tok, SEQ, window, 4, CPU)
    assert consecutive[1] == len(ids) - 3  # each window's first token is context
    assert log_likelihood(model, tok, SEQ, window, 4, CPU, stride=window) == consecutive


def test_strided_embeddings_take_each_token_once_from_any_layer(tmp_path):
    _out, model, tok = _export(tmp_path, extra=("model.n_layers=2",))
    ids = torch.from_numpy(tok.encode(SEQ)).long()
    for layer in (-1, 1, 0):
        rows = []
        with torch.no_grad():
            for a, b, owned in windows(len(ids), 32, 24):
                states = model.hidden_states(ids[a:b][None], None, layer)[0]
                rows.append(states[owned:])
        expected = torch.cat(rows).mean(0).numpy()
        got = embed_sequence(model, tok, SEQ, 32, 2, CPU, stride=24, layer=layer)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    final = embed_sequence(model, tok, SEQ, 32, 2, CPU, stride=24)
    assert not np.allclose(final, embed_sequence(model, tok, SEQ, 32, 2, CPU, stride=24, layer=0))
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        embed_sequence(model, tok, SEQ, 32, 2, CPU, layer=5)


def test_predict_windows_a_whole_record_and_conjoins_strands_over_the_same_bases(tmp_path):
    out, backbone, tok = _export(tmp_path)
    torch.manual_seed(1)
    model = SequenceClassifier(backbone, 16, 2).eval()
    info = {"task": "t", "classes": ["x", "y"], "rc_conjoin": True, "max_tokens": 40}
    folder = save_classifier(model, out, info, tmp_path / "classifier")
    pieces = [SEQ[0:40], SEQ[40:80], SEQ[80:90]]  # 90 bases: windows of 40, 40 and 10
    ids = [tok.encode(p) for p in pieces]
    rc = [tok.encode(reverse_complement_bytes(p)) for p in pieces]
    per_window = predict_proba(model, ids, 8, tok.pad_id, CPU, rc)
    expected = (per_window * np.array([40, 40, 10])[:, None] / 90).sum(0)
    np.testing.assert_allclose(classify(model, tok, info, [SEQ], 2, CPU)[0], expected, atol=1e-9)
    fasta = tmp_path / "r.fa"
    fasta.write_text(f">long\n{SEQ.decode()}\n>short\n{SEQ[:30].decode()}\n")
    rows = list(predict_file(folder, fasta, batch=2, device="cpu"))
    np.testing.assert_allclose(rows[0][2], expected, atol=1e-6)
    assert [r[0] for r in rows] == ["long", "short"]
    assert main(["predict", str(folder), str(fasta), "--stride", "20", "--device", "cpu"]) == 0
    assert main(["embed", str(out), str(fasta), "--out", str(tmp_path / "e.npy"),
                 "--layer", "-2", "--stride", "16", "--window", "32"]) == 0  # fmt: skip
    assert np.load(tmp_path / "e.npy").shape == (2, 16)


def test_a_classifier_on_a_middle_layer_saves_and_loads_everywhere(tmp_path):
    from nucleo.downstream.classifier import load_classifier

    out, backbone, tok = _export(tmp_path, extra=("model.n_layers=2",))
    torch.manual_seed(2)
    model = SequenceClassifier(backbone, 16, 3, layer=1).eval()
    info = {"task": "t", "classes": ["a", "b", "c"], "rc_conjoin": False, "max_tokens": 64}
    folder = save_classifier(model, out, info, tmp_path / "mid")
    loaded, _tok, saved = load_classifier(folder, "cpu")
    assert saved["layer"] == 1 and loaded.layer == 1
    ids = [tok.encode(SEQ[:50]), tok.encode(SEQ[:20])]
    expected = predict_proba(model, ids, 2, tok.pad_id, CPU)
    np.testing.assert_allclose(predict_proba(loaded, ids, 2, tok.pad_id, CPU), expected)
    final = SequenceClassifier(backbone, 16, 3).eval()
    final.head.load_state_dict(model.head.state_dict())
    assert not np.allclose(predict_proba(final, ids, 2, tok.pad_id, CPU), expected)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=True
    ).eval()
    tokens = torch.full((2, 50), tok.pad_id)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)], mask[i, : len(row)] = torch.from_numpy(row), 1
    with torch.no_grad():
        probs = torch.softmax(hf(input_ids=tokens, attention_mask=mask).logits, -1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
