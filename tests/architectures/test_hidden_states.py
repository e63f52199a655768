"""States from any layer: the last is forward's hidden, every layer is [B, L, D], padding-exact,
and a layer the model does not have is refused by name."""

from __future__ import annotations

import pytest
import torch

from tests.architectures.test_architectures import VARIANTS, _model
from tests.architectures.test_padding import _padded


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_layer_of_every_family(variant):
    model = _model(*VARIANTS[variant])
    n = len(model.blocks)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 4, (k,), generator=gen) for k in (19, 44)]
    tokens, mask = _padded(rows)
    with torch.no_grad():
        out = model(tokens, attention_mask=mask)
        last = model.hidden_states(tokens, mask)
        torch.testing.assert_close(last, out.hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.hidden_states(tokens, mask, n), last)
        seen = []
        for layer in range(-(n + 1), 0):
            states = model.hidden_states(tokens, mask, layer)
            assert states.shape == out.hidden.shape and states.dtype == torch.float32
            alone = model.hidden_states(rows[0][None], None, layer)
            torch.testing.assert_close(states[0, :19], alone[0], rtol=0, atol=1e-5)
            seen.append(states)
        assert not torch.allclose(seen[0], seen[-1])  # the embedding is not the last layer
        with pytest.raises(ValueError, match=rf"layers 0\.\.{n}"):
            model.hidden_states(tokens, mask, n + 1)
