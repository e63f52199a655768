"""Padding masks: a sequence comes out of every family (causal and bidirectional) exactly as it
does alone, whatever longer sequences share its right-padded batch."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.tokenizers import CharTokenizer
from nucleo.core.alphabet import PAD
from tests.architectures.test_architectures import VARIANTS, _model


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    return tokens, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_alone_equal_outputs_in_a_padded_batch(variant):
    arch, sets = VARIANTS[variant]
    model = _model(arch, sets)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 4, (n,), generator=gen) for n in (23, 57, 40)]
    tokens, mask = _padded(rows)
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            n = len(r)
            torch.testing.assert_close(batch.logits[i, :n], alone.logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch.hidden[i, :n], alone.hidden[0], rtol=0, atol=1e-5)
    if not model.causal:  # without the mask, pads leak into the real positions
        with torch.no_grad():
            unmasked = model(tokens).logits[0, :23]
        assert not torch.allclose(unmasked, batch.logits[0, :23], atol=1e-4)


@pytest.mark.parametrize("variant", ["transformer", "caduceus"])
def test_a_mask_that_is_not_right_padding_is_refused(variant):
    arch, sets = VARIANTS[variant]
    model = _model(arch, sets)
    tokens = torch.randint(0, 4, (2, 8))
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    with pytest.raises(ValueError, match="right padding"):
        model(tokens, attention_mask=left)
    with pytest.raises(ValueError, match="shape"):
        model(tokens, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="without real tokens"):
        model(tokens, attention_mask=torch.tensor([[0] * 8, [1] * 8]))
    full = model(tokens, attention_mask=torch.ones(2, 8)).logits
    torch.testing.assert_close(full, model(tokens).logits)


def test_tokenizer_pad_is_the_alphabet_pad():
    assert CharTokenizer().pad_id == PAD
