"""The objective: the selected losses, composed.

It checks each loss against the architecture (a causal-only loss on a bidirectional model is a
config error), runs the backbone once per view that the losses due at this step need
(``forward``: the tokens, ``rc``: their reverse complement, or a view a loss makes in its
``prepare``, such as ``mlm``'s ``masked``), hands every loss the same outputs, and returns the
weighted total with every component, its weight and its time as metrics. Each loss's weight
follows its schedule and the loss runs at its cadence (``losses.common.LossConfig``). When the
batch carries a repeat mask, each loss sees per-token weights from its repeat weight (its own
``repeat_weight``, else ``data.repeat_weight``): soft-masked bases count w, the others 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from nucleo.core.alphabet import reverse_complement
from nucleo.core.protocols import Loss, Tokenizer
from nucleo.core.registry import LOSSES
from nucleo.core.schema import ConfigError
from nucleo.core.types import Batch, LossOutput, ModelOutput

VIEWS = ("forward", "rc")  # made by the objective; other views are made by a loss's prepare


@dataclass
class Term:
    """One selected loss with its settings (weight, schedule, cadence: a LossConfig) and the
    weight of repeat bases in it (``repeat_weight``: the loss's own, else the data's)."""

    name: str
    loss: Loss
    config: Any
    repeat_weight: float = 1.0

    def batch_for(self, batch: Batch) -> Batch:
        """``batch`` with this term's per-token weights (a shallow copy; views are shared)."""
        if batch.repeat is None or self.repeat_weight == 1.0:
            return batch if batch.weights is None else replace(batch, weights=None)
        weights = 1.0 - (1.0 - self.repeat_weight) * batch.repeat.float()
        return replace(batch, weights=weights)

    def weight_at(self, step: int | None) -> float:
        return float(self.config.weight_at(step))

    def runs_at(self, step: int | None) -> bool:
        return bool(self.config.runs_at(step))


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
            own = isinstance(term.loss, nn.Module) and any(True for _ in term.loss.parameters())
            if own and term.config.every > 1:  # ZeRO reduces every parameter's grad each step
                raise ConfigError(
                    f"loss.{term.name}.every", "a loss with parameters must run every step"
                )
            check_model = getattr(term.loss, "check_model", None)
            if check_model is not None:
                check_model(model)  # raises ConfigError naming its own setting
        if all(t.config.every > 1 for t in terms):
            raise ConfigError(
                f"loss.{terms[0].name}.every", "at least one loss must run every step (every: 1)"
            )
        self.terms = terms
        # a bidirectional backbone is told where each view's right padding is (a causal one
        # needs no mask: pads come after every real position)
        self.masks = not causal
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
        cls,
        names: list[str],
        configs: Mapping[str, Any],
        model: nn.Module,
        tokenizer: Tokenizer,
        repeat_weight: float = 1.0,
    ) -> Objective:
        """repeat_weight: ``data.repeat_weight``, for losses that do not set their own."""
        terms = []
        for name in names:
            own = getattr(configs[name], "repeat_weight", None)
            loss = LOSSES.build(name, configs[name], tokenizer=tokenizer)
            weight = repeat_weight if own is None else own
            terms.append(Term(name, loss, configs[name], float(weight)))
        return cls(terms, model, getattr(tokenizer, "complement_ids", None))

    def due(self, step: int | None) -> list[Term]:
        """The terms computed at optimizer step ``step`` (all of them when None)."""
        return [t for t in self.terms if t.runs_at(step)]

    def passes_at(self, step: int | None) -> int:
        """Backbone passes at optimizer step ``step``: one per view the due losses need."""
        needed = {v for t in self.due(step) for v in t.loss.views}
        return sum(1 for view in self.views if view in needed)

    def forward_views(
        self,
        forward: Callable[..., ModelOutput],
        batch: Batch,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> dict[str, ModelOutput]:
        """Run the backbone once per view the due losses need; fills ``batch.views`` (and
        ``batch.aux``).

        generator: randomness of the losses' views (MLM masks, headless cut points), on the
        batch's device; None uses the global RNG. Validation passes a fixed one so every
        evaluation sees the same views.
        """
        terms = self.due(step)
        needed = {v for t in terms for v in t.loss.views}
        batch.views["forward"] = batch.tokens
        if "rc" in needed:
            assert self.complement is not None
            batch.views["rc"] = reverse_complement(batch.tokens, self.complement, batch.pad_id)
        for term in terms:
            prepare = getattr(term.loss, "prepare", None)
            if prepare is not None:
                prepare(batch, generator)
        outputs = {}
        for view in (v for v in self.views if v in needed):
            tokens = batch.views[view]
            mask = tokens != batch.pad_id if self.masks else None
            outputs[view] = forward(tokens) if mask is None else forward(tokens, mask)
        return outputs

    def losses(
        self,
        batch: Batch,
        outputs: Mapping[str, ModelOutput],
        model: nn.Module,
        step: int | None = None,
    ) -> LossOutput:
        """Weighted total of the losses due at ``step``.

        Metrics: the total (``loss``); each loss by name, unweighted; each loss's own metrics
        as ``name/metric``; ``name/weight`` when it is scheduled; ``time/name``, the seconds its
        call took (wall clock; on a GPU, queued work may land in a later loss's time).
        """
        total: torch.Tensor | None = None
        metrics: dict[str, torch.Tensor] = {}
        for term in self.due(step):
            started = time.perf_counter()
            out = term.loss(term.batch_for(batch), outputs, model)
            seconds = time.perf_counter() - started
            weight = term.weight_at(step)
            weighted = weight * out.loss
            total = weighted if total is None else total + weighted
            metrics[term.name] = out.loss.detach()
            for key, value in out.metrics.items():
                metrics[f"{term.name}/{key}"] = value
            if term.config.schedule != "constant":
                metrics[f"{term.name}/weight"] = torch.tensor(weight)
            metrics[f"time/{term.name}"] = torch.tensor(seconds)
        assert total is not None, "no loss due at this step"
        metrics["loss"] = total.detach()
        return LossOutput(loss=total, metrics=metrics)

    def __call__(
        self,
        forward: Callable[..., ModelOutput],
        batch: Batch,
        model: nn.Module,
        step: int | None = None,
    ) -> LossOutput:
        """forward: the training engine (or model); model: the bare module, for its attributes;
        step: the optimizer step (schedules and cadences), None for full weights and all
        losses."""
        return self.losses(batch, self.forward_views(forward, batch, step=step), model, step)
