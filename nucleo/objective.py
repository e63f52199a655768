"""The objective: the selected losses, composed.

It checks each loss against the architecture (a causal-only loss on a bidirectional model is a
config error), runs the backbone once per view that any loss needs (``forward``: the tokens,
``rc``: their reverse complement, or a view a loss makes in its ``prepare``, such as ``mlm``'s
``masked``), hands every loss the same outputs, and returns the weighted total with every
component as a metric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nucleo.alphabet import reverse_complement
from nucleo.registry import LOSSES
from nucleo.schema import ConfigError
from nucleo.types import Batch, LossOutput, ModelOutput

VIEWS = ("forward", "rc")  # made by the objective; other views are made by a loss's prepare


@dataclass
class Term:
    """One selected loss with its weight."""

    name: str
    loss: Any
    weight: float


class Objective:
    """Weighted sum of losses over shared forward passes."""

    def __init__(self, terms: list[Term], model: nn.Module, complement_ids: list[int] | None):
        if not terms:
            raise ConfigError("losses", f"select at least one loss; known: {LOSSES.names()}")
        causal = bool(getattr(model, "causal", True))
        for term in terms:
            wants = getattr(term.loss, "requires_causal", None)
            if wants is not None and wants != causal:
                kind = "causal" if wants else "bidirectional"
                has = "causal" if causal else "bidirectional"
                fits = [
                    entry.name
                    for entry in LOSSES
                    if getattr(entry.cls, "requires_causal", None) in (None, causal)
                ]
                raise ConfigError(
                    "losses",
                    f"loss {term.name!r} needs a {kind} model but {type(model).__name__} is "
                    f"{has}; losses for {has} models: {fits}",
                )
        self.terms = terms
        wanted = [v for t in terms for v in t.loss.views]
        self.views = tuple(dict.fromkeys([v for v in VIEWS if v in wanted] + wanted))
        made = {v for t in terms if hasattr(t.loss, "prepare") for v in t.loss.views}
        for view in self.views:
            if view not in VIEWS and view not in made:
                raise ConfigError("losses", f"no selected loss makes the view {view!r}")
        if "rc" in self.views and complement_ids is None:
            raise ConfigError("losses", "the 'rc' view needs a tokenizer with a complement map")
        self.complement = torch.tensor(complement_ids) if complement_ids is not None else None

    @classmethod
    def build(
        cls, names: list[str], configs: Mapping[str, Any], model: nn.Module, tokenizer: Any
    ) -> Objective:
        terms = [
            Term(
                name,
                LOSSES.build(name, configs[name], tokenizer=tokenizer),
                float(configs[name].weight),
            )
            for name in names
        ]
        return cls(terms, model, getattr(tokenizer, "complement_ids", None))

    def forward_views(
        self,
        forward: Callable[[torch.Tensor], ModelOutput],
        batch: Batch,
        generator: torch.Generator | None = None,
    ) -> dict[str, ModelOutput]:
        """Run the backbone once per needed view; fills ``batch.views`` (and ``batch.aux``).

        generator: randomness of the losses' views (MLM masks), on the batch's device; None
        uses the global RNG. Validation passes a fixed one so every evaluation sees the same
        masks.
        """
        batch.views["forward"] = batch.tokens
        if "rc" in self.views:
            assert self.complement is not None
            batch.views["rc"] = reverse_complement(batch.tokens, self.complement, batch.pad_id)
        for term in self.terms:
            prepare = getattr(term.loss, "prepare", None)
            if prepare is not None:
                prepare(batch, generator)
        return {view: forward(batch.views[view]) for view in self.views}

    def losses(
        self, batch: Batch, outputs: Mapping[str, ModelOutput], model: nn.Module
    ) -> LossOutput:
        """Weighted total; metrics hold the total (``loss``), each loss by name and each loss's
        own metrics as ``name/metric``."""
        total: torch.Tensor | None = None
        metrics: dict[str, torch.Tensor] = {}
        for term in self.terms:
            out = term.loss(batch, outputs, model)
            weighted = term.weight * out.loss
            total = weighted if total is None else total + weighted
            metrics[term.name] = out.loss.detach()
            for key, value in out.metrics.items():
                metrics[f"{term.name}/{key}"] = value
        assert total is not None
        metrics["loss"] = total.detach()
        return LossOutput(loss=total, metrics=metrics)

    def __call__(
        self, forward: Callable[[torch.Tensor], ModelOutput], batch: Batch, model: nn.Module
    ) -> LossOutput:
        """forward: the training engine (or model); model: the bare module, for its attributes."""
        return self.losses(batch, self.forward_views(forward, batch), model)
