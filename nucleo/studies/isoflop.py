"""IsoFLOP studies: lay out model sizes and token counts along curves of equal training compute.

A study spec is YAML::

    name: isoflop                     # the sweep it becomes (<run.root>/sweeps/<name>)
    experiment: nucleo-isoflop        # MLflow experiment
    base: ../configs/demo.yaml        # optional run config; ``config`` sections merge over it
    config: {...}
    budgets: [1.0e12, 3.0e12, 1.0e13] # training FLOPs per run (nucleo.train.compute)
    sizes: 5                          # models per budget and family
    tokens_per_parameter: 20          # first guess of the optimum: the centre of each curve
    min_steps: 100                    # no run shorter than this (its curve shifts to smaller N)
    micro_batch_sizes: [8, 16, 32]    # optional: per run the largest that still gives
    target_steps: 1000                #   target_steps (tiny models stream many tokens)
    warmup_fraction: 0.1              # train.warmup_steps = this x train.max_steps
    seeds: [0]
    families:                         # each family's ladder of shapes, smallest first
      hyena:
        - {model.d_model: 32, model.n_layers: 2}
        ...

The planner builds each rung's model (nothing is trained) to read its non-embedding parameters
N and its training FLOPs per token from the family's own formula (3 x forward, one backbone pass
per view the losses need; attention's L^2 and the FFT terms are in it, so FLOPs are not 6 N).
For each budget C it picks ``sizes`` consecutive rungs centred on the rung whose tokens per
parameter D/N = C / (N f(N)) is closest to the guess, and gives each the steps that spend C.
The plan becomes an ordinary sweep spec (``nucleo sweep run``: resumable, one MLflow run a
point, tagged ``budget``), so a study runs in pieces and a GPU-scale spec is the same file with
larger budgets and ladders.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nucleo.core.schema import ConfigError
from nucleo.train.config import read_yaml

STUDY_KEYS = (
    "name", "experiment", "base", "config", "budgets", "sizes", "tokens_per_parameter",
    "min_steps", "warmup_fraction", "seeds", "families", "set", "micro_batch_sizes",
    "target_steps",
)  # fmt: skip
#: the run tag that names a run's planned budget (FLOPs, as written in the plan)
BUDGET_TAG = "budget"


@dataclass
class StudySpec:
    """A parsed isoFLOP study spec (see the module docstring)."""

    path: Path
    name: str
    experiment: str
    raw: dict[str, Any]
    budgets: list[float]
    families: dict[str, list[dict[str, Any]]]
    sizes: int = 5
    tokens_per_parameter: float = 20.0
    min_steps: int = 100
    warmup_fraction: float = 0.1
    seeds: list[int] = field(default_factory=lambda: [0])
    micro_batch_sizes: list[int] = field(default_factory=list)  # empty: the config's
    target_steps: int = 1000


@dataclass
class Rung:
    """One shape of a family's ladder: N (non-embedding parameters) and training FLOPs per
    token at the study's window length (all views the losses need); seconds_per_token when
    measured (optimizer steps of the config's batch on this machine, plain PyTorch: a larger
    micro-batch is usually faster per token, so estimates from it err long)."""

    family: str
    overrides: dict[str, Any]
    non_embedding: int
    flops_per_token: float
    seconds_per_token: float | None = None

    @property
    def label(self) -> str:
        return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.overrides.items())


@dataclass
class PlannedRun:
    """One point of the study: a rung trained for ``steps`` optimizer steps of
    ``micro_batch`` windows at ``budget``."""

    rung: Rung
    budget: float
    steps: int
    tokens: int
    flops: float
    micro_batch: int = 0

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.rung.non_embedding


def _error(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(key, f"{message} (isoFLOP study {path})")


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study spec; errors name the file and the key."""
    path = Path(path)
    raw = read_yaml(path)
    for key in raw:
        if key not in STUDY_KEYS:
            raise _error(path, str(key), f"unknown key; valid: {', '.join(STUDY_KEYS)}")
    budgets = raw.get("budgets")
    try:  # YAML reads 1e12 (no dot) as a string
        budgets = [float(b) for b in budgets]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        budgets = None
    if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
        raise _error(
            path, "budgets", f"need a list of positive FLOP counts, got {raw.get('budgets')!r}"
        )
    families = raw.get("families")
    if not isinstance(families, dict) or not families:
        raise _error(path, "families", "need a mapping of family -> list of shapes")
    for family, ladder in families.items():
        if not isinstance(ladder, list) or not all(isinstance(s, dict) for s in ladder):
            raise _error(path, f"families.{family}", "need a list of shapes (dotted key -> value)")
    sizes = raw.get("sizes", 5)
    if not isinstance(sizes, int) or sizes < 3:
        raise _error(path, "sizes", f"need an integer >= 3 (a parabola has 3), got {sizes!r}")
    for family, ladder in families.items():
        if len(ladder) < sizes:
            raise _error(
                path, f"families.{family}", f"{len(ladder)} shapes, fewer than sizes={sizes}"
            )
    batches = raw.get("micro_batch_sizes", [])
    if not isinstance(batches, list) or not all(isinstance(b, int) and b >= 1 for b in batches):
        raise _error(
            path, "micro_batch_sizes", f"need a list of positive integers, got {batches!r}"
        )
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise _error(path, "seeds", f"expected a list of integers, got {seeds!r}")
    spec = StudySpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        experiment=str(raw.get("experiment") or raw.get("name") or path.stem),
        raw=raw,
        budgets=sorted(float(b) for b in budgets),
        families={str(k): [dict(s) for s in v] for k, v in families.items()},
        sizes=sizes,
        tokens_per_parameter=float(raw.get("tokens_per_parameter", 20.0)),
        min_steps=int(raw.get("min_steps", 100)),
        warmup_fraction=float(raw.get("warmup_fraction", 0.1)),
        seeds=list(seeds),
        micro_batch_sizes=sorted(batches),
        target_steps=int(raw.get("target_steps", 1000)),
    )
    if spec.tokens_per_parameter <= 0:
        raise _error(path, "tokens_per_parameter", "must be > 0")
    if not 0 <= spec.warmup_fraction < 1:
        raise _error(path, "warmup_fraction", "must be in [0, 1)")
    return spec


def sweep_part(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The sweep-spec part of a study or ablation spec read from ``path``: its ``base``
    (resolved against ``path``, as the sweep would read it), ``config`` and ``set``."""
    out = {k: raw[k] for k in ("base", "config", "set") if k in raw}
    if "base" in out:
        out["base"] = str((path.parent / str(out["base"])).resolve())
    return out


def _point_config(spec: StudySpec, family: str, shape: dict[str, Any]) -> Any:
    """The resolved RunConfig of one rung (as the sweep will resolve it)."""
    from nucleo.studies.sweep import _apply, load_spec_from
    from nucleo.train.config import resolve

    sweep = load_spec_from({**sweep_part(spec.raw, spec.path), "name": spec.name}, spec.path)
    return resolve(_apply(sweep.base, {**sweep.overrides, "arch": family, **shape}))


def measure_rungs(
    spec: StudySpec, time_steps: int = 0, log: Callable[[str], None] = print
) -> list[Rung]:
    """Every rung of every family with N and FLOPs per token; with ``time_steps`` > 0, also
    the seconds of one optimizer step (the median of that many, after one warm-up step)."""
    import torch

    from data_pipeline.tokenizers import build_tokenizer
    from nucleo.train.components import build_model
    from nucleo.train.compute import ComputeCounter, count_parameters
    from nucleo.train.objective import Objective

    rungs = []
    for family, ladder in spec.families.items():
        for shape in ladder:
            cfg = _point_config(spec, family, shape)
            tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
            # shapes are all the counts need: a GPU-scale ladder is built without memory
            with torch.device("cpu" if time_steps > 0 else "meta"):
                model = build_model(cfg.arch, cfg.model, tokenizer)
            objective = Objective.build(cfg.losses, cfg.loss, model, tokenizer)
            passes = objective.passes_at(None)
            counter = ComputeCounter(model, cfg.train.micro_batch_size)
            rung = Rung(
                family,
                shape,
                count_parameters(model)["non_embedding"],
                counter.per_token(cfg.data.seq_len, passes),
            )
            if time_steps > 0:
                rung.seconds_per_token = _time_step(model, objective, cfg, tokenizer, time_steps)
            log(
                f"{family:<12} {rung.label:<40} N={rung.non_embedding:>10,} "
                f"FLOPs/token={rung.flops_per_token:.3g}"
                + (
                    f" {rung.seconds_per_token * 1e6:.2f} us/token"
                    if rung.seconds_per_token
                    else ""
                )
            )
            rungs.append(rung)
            del model, objective
    return rungs


def _time_step(model: Any, objective: Any, cfg: Any, tokenizer: Any, repeats: int) -> float:
    """Seconds per token of an optimizer step (forward, losses, backward, AdamW; the median of
    ``repeats``) on random bases, the run's micro-batch x grad_accum windows of its seq_len
    (plain PyTorch, no DeepSpeed)."""
    import statistics

    import torch

    from nucleo.core.types import Batch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for _micro in range(cfg.train.grad_accum):
            tokens = torch.randint(0, 4, shape, generator=gen)
            batch = Batch(tokens, torch.zeros(shape[0], dtype=torch.long), ("x",), tokenizer.pad_id)
            out = objective(model, batch, model, step=None)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) / (shape[0] * shape[1] * cfg.train.grad_accum)


def step_layout(spec: StudySpec) -> tuple[int, list[int]]:
    """(tokens a step takes per window of the micro-batch: grad_accum x seq_len, the micro-batch
    sizes a run may use); the study runs in one process, as the sweep launches it."""
    cfg = _point_config(spec, next(iter(spec.families)), next(iter(spec.families.values()))[0])
    batches = spec.micro_batch_sizes or [int(cfg.train.micro_batch_size)]
    return int(cfg.train.grad_accum * cfg.data.seq_len), batches


def _batch_for(spec: StudySpec, tokens: float, per_window: int, batches: list[int]) -> int:
    """The largest micro-batch that still gives ``target_steps`` steps (else the smallest)."""
    fits = [b for b in batches if tokens / (b * per_window) >= spec.target_steps]
    return max(fits) if fits else min(batches)


def plan(
    spec: StudySpec, rungs: list[Rung], layout: tuple[int, list[int]] | None = None
) -> list[PlannedRun]:
    """Every (budget, rung) of the study; see the module docstring for the choice of rungs.
    layout: ``step_layout(spec)`` (computed when not given)."""
    per_window, batches = layout or step_layout(spec)
    smallest = min(batches)
    runs = []
    for budget in spec.budgets:  # the cheapest budget of every family first
        for family in spec.families:
            ladder = [r for r in rungs if r.family == family]
            feasible = [
                r
                for r in ladder
                if budget / (r.flops_per_token * smallest * per_window) >= spec.min_steps
            ]
            if len(feasible) < spec.sizes:
                raise ConfigError(
                    "budgets",
                    f"{family} at {budget:.3g} FLOPs: only {len(feasible)} shapes train for "
                    f">= min_steps={spec.min_steps} steps; raise the budget, add smaller shapes "
                    f"or lower min_steps (isoFLOP study {spec.path})",
                )
            # |log((D/N) / guess)|, D = C / (FLOPs per token)
            ratios = [
                abs(math.log(budget / (r.flops_per_token * r.non_embedding)
                             / spec.tokens_per_parameter))
                for r in feasible
            ]  # fmt: skip
            centre = ratios.index(min(ratios))
            first = min(max(0, centre - spec.sizes // 2), len(feasible) - spec.sizes)
            for rung in feasible[first : first + spec.sizes]:
                tokens_wanted = budget / rung.flops_per_token
                batch = _batch_for(spec, tokens_wanted, per_window, batches)
                step_tokens = batch * per_window
                steps = round(tokens_wanted / step_tokens)
                tokens = steps * step_tokens
                runs.append(
                    PlannedRun(rung, budget, steps, tokens, tokens * rung.flops_per_token, batch)
                )
    return runs


def budget_label(budget: float) -> str:
    """``1e+12`` -> ``1e12``; ``3e+12`` -> ``3e12`` (the value of the budget tag)."""
    mantissa, exponent = f"{budget:.2g}".split("e")
    return f"{mantissa}e{int(exponent)}"


def sweep_spec(spec: StudySpec, runs: list[PlannedRun]) -> dict[str, Any]:
    """The plan as a sweep spec (YAML-ready): the study's config, one ``extra`` point a run."""
    raw = {"name": spec.name, "experiment": spec.experiment, **sweep_part(spec.raw, spec.path)}
    extra = []
    for run in runs:
        point = {"arch": run.rung.family, **run.rung.overrides}
        if spec.micro_batch_sizes:
            point["train.micro_batch_size"] = run.micro_batch
        point["train.max_steps"] = run.steps
        point["train.warmup_steps"] = max(1, round(spec.warmup_fraction * run.steps))
        point[f"tracking.tags.{BUDGET_TAG}"] = budget_label(run.budget)
        extra.append(point)
    raw["extra"] = extra
    raw["seeds"] = spec.seeds
    return raw


def plan_table(runs: list[PlannedRun], overhead_s: float = 0.0) -> str:
    """The plan as markdown: per run its N, tokens, D/N, steps and (when measured) hours."""
    lines = [
        "| family | budget | shape | N | FLOPs/token | batch | steps | tokens | D/N | est. min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        est = ""
        if r.rung.seconds_per_token is not None:
            est = f"{(r.tokens * r.rung.seconds_per_token + overhead_s) / 60:.1f}"
        lines.append(
            f"| {r.rung.family} | {budget_label(r.budget)} | {r.rung.label} | "
            f"{r.rung.non_embedding:,} | {r.rung.flops_per_token:.3g} | {r.micro_batch} | "
            f"{r.steps} | "
            f"{r.tokens:,} | {r.tokens_per_parameter:.0f} | {est} |"
        )
    return "\n".join(lines) + "\n"


def estimated_hours(runs: list[PlannedRun], seeds: int, overhead_s: float) -> float | None:
    """Wall-clock hours of the whole plan from the measured step times (None: not measured)."""
    if any(r.rung.seconds_per_token is None for r in runs):
        return None
    seconds = sum(r.tokens * (r.rung.seconds_per_token or 0) + overhead_s for r in runs)
    return seeds * seconds / 3600
