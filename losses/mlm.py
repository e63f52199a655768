"""Masked-language-model loss for bidirectional models (BERT; Caduceus's pretraining objective).

``prepare`` corrupts the batch once per step into the ``masked`` view: each base position is
selected with probability ``mask_prob``; a selected position becomes ``<mask>`` with
probability ``replace_mask``, a random base (A, C, G or T) with ``replace_random``, and stays
as it is otherwise. The loss is the cross-entropy of the true token at the selected positions
only, from the model's output on the masked view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import LossConfig, token_weights, weighted_mean
from nucleo.core.registry import LOSSES
from nucleo.core.schema import ConfigError, check
from nucleo.core.types import Batch, LossOutput, ModelOutput

SELECTED = "mlm/selected"  # Batch.aux key: [B, L] bool, the positions the loss is scored on


@dataclass
class MaskedLMConfig(LossConfig):
    """mask_prob: fraction of base positions selected (plus the LossConfig settings).
    replace_mask / replace_random: of the selected, the fractions turned into ``<mask>`` and
    into a random base; the rest (1 - both) keep their token but are still scored."""

    mask_prob: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.mask_prob <= 1, "mask_prob", "must be in (0, 1]")
        check(0 <= self.replace_mask <= 1, "replace_mask", "must be in [0, 1]")
        check(0 <= self.replace_random <= 1, "replace_random", "must be in [0, 1]")
        check(
            self.replace_mask + self.replace_random <= 1 + 1e-9,
            "replace_random",
            f"replace_mask + replace_random must be <= 1, got "
            f"{self.replace_mask} + {self.replace_random}",
        )


def base_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens made only of A, C, G, T (the random replacements of MLM)."""
    per_token = tokenizer.bases_per_token
    ids = [
        i
        for i in range(tokenizer.vocab_size)
        if per_token[i] > 0 and set(tokenizer.decode([i])) <= set("ACGT")
    ]
    if not ids:
        raise ConfigError("tokenizer", "mlm needs a tokenizer with tokens made of A, C, G, T")
    return ids


@LOSSES.register("mlm", config=MaskedLMConfig)
class MaskedLM:
    """Masked-token cross-entropy (nats per selected token); bidirectional models only."""

    views = ("masked",)
    requires_causal: bool | None = False

    def __init__(self, cfg: MaskedLMConfig, tokenizer: Any) -> None:
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None:
            raise ConfigError("tokenizer", "mlm needs a tokenizer with a <mask> token")
        self.cfg = cfg
        self.mask_id = int(mask_id)
        self.random_ids = torch.tensor(base_token_ids(tokenizer))
        self.scored = torch.as_tensor(tokenizer.bases_per_token) > 0  # [V]: maskable tokens

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> None:
        """Add the ``masked`` view and the selected positions (``Batch.aux``) to ``batch``.

        generator: on the tokens' device; None draws from the global RNG (the trainer seeds it
        per step, so resumed runs draw the same masks).
        """
        tokens = batch.tokens
        device = tokens.device
        cfg = self.cfg
        eligible = self.scored.to(device)[tokens]  # bases only: no padding or specials
        draw = torch.rand(tokens.shape, generator=generator, device=device)
        selected = eligible & (draw < cfg.mask_prob)
        how = torch.rand(tokens.shape, generator=generator, device=device)
        to_mask = selected & (how < cfg.replace_mask)
        to_random = selected & ~to_mask & (how < cfg.replace_mask + cfg.replace_random)
        pick = torch.randint(len(self.random_ids), tokens.shape, generator=generator, device=device)
        random_tokens = self.random_ids.to(device)[pick]
        masked = torch.where(to_random, random_tokens, tokens)
        masked = masked.masked_fill(to_mask, self.mask_id)
        batch.views["masked"] = masked
        batch.aux[SELECTED] = selected

    def __call__(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        logits = outputs["masked"].logits  # [B, L, V]
        selected = batch.aux[SELECTED]
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch.tokens, reduction="none")
        count = selected.sum()
        loss = weighted_mean(nll, selected, token_weights(batch))
        with torch.no_grad():
            right = (logits.argmax(-1) == batch.tokens) & selected
            accuracy = right.sum() / count.clamp(min=1)
        return LossOutput(
            loss=loss,
            metrics={
                "bits_per_token": loss.detach() / math.log(2),
                "accuracy": accuracy.float(),
                "selected_fraction": count.float() / batch.tokens.numel(),
            },
        )
