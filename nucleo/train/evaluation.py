"""Validation during training: a fixed, bounded set of windows, every N steps.

The same windows every time (drawn once from the validation shards, ``windows_per_kingdom``
per kingdom), split across ranks, each rank running the same number of batches (ZeRO-3
gathers parameters collectively). Reports every loss of the objective and, for causal
models, next-token bits per base overall and per kingdom, and, when the shards keep the soft
mask, on repeat and non-repeat bases apart (``val/repeat/bits_per_base``,
``val/non_repeat/bits_per_base``; a token counts toward each by its share of masked bases).
Random views (MLM masks) are drawn from a generator seeded per batch, so every evaluation
scores the same masked positions.

With ``eval.floor`` (a k-mer Markov model saved by ``nucleo baseline markov --save``), the
floor's bits per base on the same windows, scored the same way (``data_pipeline.markov``:
positions 1..L-1, pads excluded, N targets left out), is logged beside every figure:
``val/floor/bits_per_base``, ``val/floor/bits_per_base/<kingdom>`` and, with the mask,
``val/floor/repeat/bits_per_base`` and ``val/floor/non_repeat/bits_per_base``. It is computed
once (each rank its share, summed across ranks at the first validation) and is the same at
every step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.loader import DataConfig, validation_set
from data_pipeline.markov import MAX_ORDER, MarkovModel, WindowNats, score_windows
from losses.ce import next_token_nll
from nucleo.core.protocols import Tokenizer
from nucleo.core.schema import ConfigError, check
from nucleo.core.types import Batch
from nucleo.train.engine import DistInfo
from nucleo.train.objective import Objective


@dataclass
class EvalConfig:
    """every: optimizer steps between validations (0: only at the end).
    windows_per_kingdom: validation windows drawn from each kingdom's val split.
    batch_size: windows per forward during validation.
    floor: a k-mer Markov model (.npz of ``nucleo baseline markov --save``) whose bits per base
    on the same windows is logged beside the network's (``val/floor/...``; char tokenizer only).
    floor_order: the Markov order to score (None: the model's highest)."""

    every: int = 100
    windows_per_kingdom: int = 32
    batch_size: int = 32
    floor: str | None = None
    floor_order: int | None = None

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", "must be >= 0")
        check(self.windows_per_kingdom >= 1, "windows_per_kingdom", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.floor is None or bool(self.floor.strip()), "floor", "must name a file")
        if self.floor_order is not None:
            check(self.floor is not None, "floor_order", "needs eval.floor (a Markov model)")
            check(0 <= self.floor_order <= MAX_ORDER, "floor_order", f"must be in 0..{MAX_ORDER}")


def check_floor_tokenizer(cfg: EvalConfig, tokenizer: str) -> None:
    """Refuse ``eval.floor`` unless the run's tokenizer (its registry name) is char."""
    if cfg.floor is not None and tokenizer != "char":
        raise ConfigError(
            "eval.floor",
            "a k-mer Markov floor scores one base per token: it needs data.tokenizer: char, "
            f"not {tokenizer!r}",
        )


def load_floor(cfg: EvalConfig, tokenizer: Tokenizer) -> tuple[MarkovModel, int] | None:
    """The Markov model of ``eval.floor`` and the order to score, or None when unset; a
    missing or bad file, an order the model lacks or a tokenizer other than char is a
    ConfigError naming the key."""
    if cfg.floor is None:
        return None
    check_floor_tokenizer(cfg, getattr(tokenizer, "name", type(tokenizer).__name__))
    try:
        model = MarkovModel.load(cfg.floor)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("eval.floor", str(err)) from None
    order = model.max_order if cfg.floor_order is None else cfg.floor_order
    if order > model.max_order:
        raise ConfigError(
            "eval.floor_order", f"{order}: {cfg.floor} holds orders 0..{model.max_order}"
        )
    return model, order


class Validator:
    """Holds this rank's share of the validation windows and evaluates a model on them."""

    def __init__(
        self,
        cfg: EvalConfig,
        data: DataConfig,
        tokenizer: Tokenizer,
        objective: Objective,
        dist: DistInfo,
        seed: int,
    ) -> None:
        floor = load_floor(cfg, tokenizer)  # a bad eval.floor fails before any data is read
        found = validation_set(data, tokenizer, cfg.windows_per_kingdom, seed)
        tokens, kingdom, self.kingdoms = found.tokens, found.kingdom, found.kingdoms
        self.total_windows = len(tokens)
        self.tokens = tokens[dist.rank :: dist.world_size]  # this rank's windows
        self.kingdom = kingdom[dist.rank :: dist.world_size]
        self.repeat = None if found.repeat is None else found.repeat[dist.rank :: dist.world_size]
        self.stand_in = (tokens[:1], kingdom[:1])  # for forwards that are not counted
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
        most = math.ceil(self.total_windows / dist.world_size)
        self.n_batches = math.ceil(most / cfg.batch_size)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.objective = objective
        self.dist = dist
        self.bases_per_token = torch.tensor(tokenizer.bases_per_token)
        self.seed = seed
        # the Markov floor on this rank's windows (summed across ranks at the first validation)
        self.floor_order = None if floor is None else floor[1]
        self.floor_sums: WindowNats | None = None
        self.floor_metrics: dict[str, float] | None = None
        if floor is not None:
            model, order = floor
            self.floor_sums = score_windows(
                model, self.tokens, self.kingdom, len(self.kingdoms), self.repeat, order
            )

    def _floor(self) -> dict[str, float]:
        """``val/floor/...`` of the floor's order, the same on every rank (computed once)."""
        if self.floor_sums is None or self.floor_order is None:
            return {}
        if self.floor_metrics is None:
            sums = torch.tensor(self.floor_sums.flat(), device=self.dist.device)
            if self.dist.world_size > 1:
                torch.distributed.all_reduce(sums)
            orders = self.floor_order + 1
            found = WindowNats.from_flat(sums.cpu().numpy(), orders, len(self.kingdoms))
            bits = found.bits_per_base(self.floor_order, self.kingdoms)
            names = {"all": "val/floor/bits_per_base"}
            names.update({p: f"val/floor/{p}/bits_per_base" for p in ("repeat", "non_repeat")})
            names.update({k: f"val/floor/bits_per_base/{k}" for k in self.kingdoms})
            scored = found.bases.sum() > 0
            self.floor_metrics = {names[k]: v for k, v in bits.items()} if scored else {}
        return self.floor_metrics

    def _batch(self, index: int) -> tuple[Batch, bool]:
        """Batch ``index`` of this rank, and whether it holds real windows (else a stand-in)."""
        rows = slice(index * self.cfg.batch_size, (index + 1) * self.cfg.batch_size)
        tokens, kingdom = self.tokens[rows], self.kingdom[rows]
        repeat = None if self.repeat is None else self.repeat[rows]
        real = len(tokens) > 0
        if not real:  # this rank ran out: a forward that is not counted
            tokens, kingdom = self.stand_in
            repeat = None if repeat is None else torch.zeros(tokens.shape)
        batch = Batch(
            tokens=tokens.to(self.dist.device),
            kingdom=kingdom.to(self.dist.device),
            kingdoms=self.kingdoms,
            pad_id=self.tokenizer.pad_id,
            repeat=None if repeat is None else repeat.to(self.dist.device),
        )
        return batch, real

    @torch.no_grad()
    def __call__(self, engine: Any, model: torch.nn.Module) -> dict[str, float]:
        """Metrics ``val/<loss>``, ``val/bits_per_base`` and ``val/bits_per_base/<kingdom>``."""
        if self.total_windows == 0:
            return {}
        started = time.perf_counter()
        engine.eval()
        device = self.dist.device
        nll = torch.zeros(len(self.kingdoms), dtype=torch.float64, device=device)
        bases = torch.zeros(len(self.kingdoms), dtype=torch.float64, device=device)
        # [repeat nats, repeat bases, other nats, other bases]
        by_mask = torch.zeros(4, dtype=torch.float64, device=device)
        loss_sums: dict[str, torch.Tensor] = {}
        windows = torch.zeros((), dtype=torch.float64, device=device)
        bpt = self.bases_per_token.to(device)
        keys: list[str] = []
        for index in range(self.n_batches):
            batch, real = self._batch(index)
            # the same MLM masks (and any other random view) at every evaluation
            generator = torch.Generator(device=device)
            generator.manual_seed((self.seed * 1_000_003 + self.dist.rank) * 4099 + index)
            outputs = self.objective.forward_views(engine, batch, generator)
            result = self.objective.losses(batch, outputs, model)
            # the same on every rank: the same objective (time per loss: training's business)
            keys = sorted(k for k in result.metrics if not k.startswith("time/"))
            if not real:
                continue
            size = len(batch.tokens)
            windows += size
            for key in keys:  # batch means, weighted by batch size
                value = result.metrics[key]
                loss_sums[key] = loss_sums.get(key, torch.zeros_like(windows)) + value * size
            if getattr(model, "causal", False):
                logits = outputs["forward"].logits
                token_nll, mask = next_token_nll(logits, batch.tokens, batch.pad_id)
                per_base = bpt[batch.tokens[:, 1:]] * mask
                nll.index_add_(0, batch.kingdom, (token_nll * mask).sum(1).double())
                bases.index_add_(0, batch.kingdom, per_base.sum(1).double())
                if batch.repeat is not None:
                    share = batch.repeat[:, 1:].double()
                    scored, counted = (token_nll * mask).double(), per_base.double()
                    by_mask += torch.stack([
                        (scored * share).sum(), (counted * share).sum(),
                        (scored * (1 - share)).sum(), (counted * (1 - share)).sum(),
                    ])  # fmt: skip
        engine.train()
        zero = torch.zeros_like(windows)
        packed = torch.stack([windows, *[loss_sums.get(k, zero) for k in keys]])
        if self.dist.world_size > 1:
            for tensor in (nll, bases, packed, by_mask):
                torch.distributed.all_reduce(tensor)
        metrics = {f"val/{k}": float(packed[i + 1] / packed[0]) for i, k in enumerate(keys)}
        if bases.sum() > 0:
            metrics["val/bits_per_base"] = float(nll.sum() / bases.sum() / math.log(2))
            for i, name in enumerate(self.kingdoms):
                if bases[i] > 0:
                    metrics[f"val/bits_per_base/{name}"] = float(nll[i] / bases[i] / math.log(2))
        if self.repeat is not None:
            for name, (n, b) in (("repeat", by_mask[:2]), ("non_repeat", by_mask[2:])):
                if b > 0:
                    metrics[f"val/{name}/bits_per_base"] = float(n / b / math.log(2))
            if bases.sum() > 0:
                metrics["val/repeat_fraction"] = float(by_mask[1] / bases.sum())
        if bases.sum() > 0:  # beside the network's bits per base (causal models)
            metrics.update(self._floor())
        metrics["val/seconds"] = time.perf_counter() - started
        return metrics
