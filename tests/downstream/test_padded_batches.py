"""Downstream batches are padding-exact: a sequence's embedding, class probabilities and score
do not depend on the other sequences in its batch, for causal and bidirectional backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.tokenizers import CharTokenizer
from nucleo.downstream.classifier import SequenceClassifier, embed_ids, predict_proba
from nucleo.downstream.inference import embed_sequence, log_likelihood
from tests.architectures.test_architectures import VARIANTS, _model

CASES = ["transformer-bi", "caduceus", "hyena-bi", "mamba"]


def _ids(lengths: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 4, n).astype(np.int64) for n in lengths]


@pytest.mark.parametrize("variant", CASES)
def test_embeddings_and_probabilities_do_not_depend_on_the_batch(variant):
    backbone = _model(*VARIANTS[variant])
    torch.manual_seed(0)
    model = SequenceClassifier(backbone, 32, 3).eval()
    ids = _ids([17, 64, 33, 5, 48])
    pad_id, cpu = CharTokenizer().pad_id, torch.device("cpu")
    one = embed_ids(model, ids, 1, pad_id, cpu)
    many = embed_ids(model, ids, 5, pad_id, cpu)
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-5)
    probs = predict_proba(model, ids, 5, pad_id, cpu)
    np.testing.assert_allclose(probs, predict_proba(model, ids, 1, pad_id, cpu), atol=1e-6)


@pytest.mark.parametrize("variant", ["caduceus", "transformer"])
def test_whole_record_inference_does_not_depend_on_the_window_batch(variant):
    model = _model(*VARIANTS[variant])
    tokenizer, cpu = CharTokenizer(), torch.device("cpu")
    seq = bytes(np.random.default_rng(5).choice(list(b"ACGT"), 100).astype(np.uint8))
    alone = embed_sequence(model, tokenizer, seq, 32, 1, cpu)  # last window: 4 tokens
    together = embed_sequence(model, tokenizer, seq, 32, 4, cpu)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    if model.causal:
        a = log_likelihood(model, tokenizer, seq, 32, 1, cpu)
        b = log_likelihood(model, tokenizer, seq, 32, 4, cpu)
        assert a[1:] == b[1:] and a[0] == pytest.approx(b[0], abs=1e-4)
