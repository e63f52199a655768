"""Reverse-complement consistency: a DNA model should say the same about both strands.

With c the complement permutation of the vocabulary and rc(x) = reverse(c(x)):

- ``distribution`` (bidirectional models): symmetric KL between p_i(. | x) and the
  complement-permuted distribution at the mirrored position of rc(x),
  q_i(v) = p_{n-1-i}(c(v) | rc x), averaged over the n non-padding positions. An
  RC-equivariant model (caduceus) gives 0.
- ``likelihood`` (causal models, whose per-position distributions condition on different
  contexts on the two strands and are not comparable): (log p(x) - log p(rc x))^2 / n, the
  squared disagreement of the two sequence log-likelihoods (nats) per scored token.
- ``embedding`` (any model): 1 - cos(mean_i h_i(x), mean_i h_i(rc x)), pooled final hidden
  states over the non-padding positions.

``auto`` picks ``distribution`` for bidirectional models and ``likelihood`` for causal ones.
With repeat weights (``Batch.weights``), ``distribution`` weights positions and the two
whole-window modes weight windows by their mean token weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from losses.ce import next_token_nll
from losses.common import LossConfig, token_weights, weighted_mean, window_weights
from nucleo.core.registry import LOSSES
from nucleo.core.schema import ConfigError
from nucleo.core.types import Batch, LossOutput, ModelOutput


@dataclass
class ReverseComplementConfig(LossConfig):
    """mode: auto | distribution | likelihood | embedding (see the module docstring)."""

    mode: Literal["auto", "distribution", "likelihood", "embedding"] = "auto"


def mirror(values: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """values [B, L, ...] of rc(x), re-indexed so that row i holds position n-1-i (n: the
    non-padding length of each window; padding stays in place, as in reverse_complement)."""
    length = tokens.shape[-1]
    valid = (tokens != pad_id).sum(-1, keepdim=True)  # [B, 1]
    pos = torch.arange(length, device=tokens.device)
    src = torch.where(pos < valid, valid - 1 - pos, pos)  # [B, L]
    index = src.view(*src.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


@LOSSES.register("rc", config=ReverseComplementConfig)
class ReverseComplement:
    """Reverse-complement consistency between the outputs on x and on rc(x)."""

    views = ("forward", "rc")
    requires_causal: bool | None = None

    def __init__(self, cfg: ReverseComplementConfig, tokenizer: Any = None) -> None:
        complement = getattr(tokenizer, "complement_ids", None)
        if complement is None:
            raise ConfigError("losses", "rc needs a tokenizer with a complement map")
        self.cfg = cfg
        self.complement = torch.tensor(complement)
        self.mode = cfg.mode

    def check_model(self, model: nn.Module) -> None:
        causal = bool(getattr(model, "causal", True))
        if self.cfg.mode == "auto":
            self.mode = "likelihood" if causal else "distribution"
        elif self.cfg.mode == "distribution" and causal:
            raise ConfigError(
                "loss.rc.mode",
                "distribution compares per-position outputs, which a causal model computes "
                "from different contexts on the two strands; use likelihood or embedding",
            )
        elif self.cfg.mode == "likelihood" and not causal:
            raise ConfigError(
                "loss.rc.mode", "likelihood needs a causal model; use distribution or embedding"
            )

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        if self.mode == "distribution":
            loss = self.distribution(batch, outputs)
        elif self.mode == "likelihood":
            loss = self.likelihood(batch, outputs)
        elif self.mode == "embedding":
            loss = self.embedding(batch, outputs)
        else:  # "auto" when check_model was never called
            causal = bool(getattr(model, "causal", True))
            loss = self.likelihood(batch, outputs) if causal else self.distribution(batch, outputs)
        return LossOutput(loss=loss)

    def distribution(self, batch: Batch, outputs: Mapping[str, ModelOutput]) -> torch.Tensor:
        """Symmetric KL (nats) per non-padding position."""
        tokens = batch.tokens
        log_p = F.log_softmax(outputs["forward"].logits.float(), dim=-1)  # [B, L, V]
        log_q_rc = F.log_softmax(outputs["rc"].logits.float(), dim=-1)
        comp = self.complement.to(tokens.device)
        log_q = mirror(log_q_rc, tokens, batch.pad_id)[..., comp]  # q_i(v) = q_{n-1-i}(c(v))
        kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)  # KL(p|q) + KL(q|p)
        return weighted_mean(kl, tokens != batch.pad_id, token_weights(batch))

    def likelihood(self, batch: Batch, outputs: Mapping[str, ModelOutput]) -> torch.Tensor:
        """(log p(x) - log p(rc x))^2 / n, averaged over the windows."""
        nll_x, mask = next_token_nll(outputs["forward"].logits, batch.tokens, batch.pad_id)
        nll_rc, _ = next_token_nll(outputs["rc"].logits, batch.views["rc"], batch.pad_id)
        count = mask.sum(-1).clamp(min=1)  # same count on both strands: padding is kept
        diff = ((nll_rc - nll_x) * mask).sum(-1)
        return weighted_mean(diff**2 / count, torch.ones_like(count), window_weights(batch))

    def embedding(self, batch: Batch, outputs: Mapping[str, ModelOutput]) -> torch.Tensor:
        """1 - cosine similarity of the mean-pooled hidden states of the two strands."""
        mask = (batch.tokens != batch.pad_id).float()[..., None]
        count = mask.sum(1).clamp(min=1)
        a = (outputs["forward"].hidden.float() * mask).sum(1) / count
        b = (outputs["rc"].hidden.float() * mask).sum(1) / count
        distance = 1 - F.cosine_similarity(a, b, dim=-1)
        return weighted_mean(distance, torch.ones_like(distance), window_weights(batch))
