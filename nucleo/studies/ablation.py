"""Loss ablations at matched compute, reported as paired differences with 95% intervals.

A spec is YAML::

    name: ablation                    # the sweep it becomes
    experiment: nucleo-ablation
    budget: 1e12                      # training FLOPs of every run (nucleo.train.compute)
    baseline: ce                      # the variant every other one is compared with
    base: ...; config: {...}          # as in a sweep spec
    models:                           # one shape per family (e.g. the isoFLOP optimum)
      hyena: {model.d_model: 32, model.n_layers: 2}
    variants:                         # overrides per variant
      ce: {losses: ce}
      ce+rc: {losses: "ce,rc"}
      repeats0.1: {losses: ce, data.repeat_weight: 0.1}
    seeds: [0, 1, 2]

Compute-matched means FLOPs, not steps: a variant whose losses need another backbone pass
(``rc``: the reverse strand; ``headless``: its placeholder view) costs twice the FLOPs a step,
so it trains for half the steps. The planner reads each variant's FLOPs per token from the
family's formula and the objective's passes (``Objective.passes_at``) and writes an ordinary
sweep (tags ``variant``, ``family``, ``budget``), so the ablation runs in resumable pieces.

The report pairs each variant's run with the baseline's run of the same family and seed (same
initialisation seed, same data order, same validation windows) and gives the mean paired
difference in validation bits per base (negative: the variant is better) with a t interval
over seeds, overall, per kingdom, on repeats and the rest, and per region class when
``nucleo evaluate`` results are given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucleo.core.schema import ConfigError
from nucleo.studies.compare import RunRow
from nucleo.studies.isoflop import budget_label, sweep_part
from nucleo.train.config import read_yaml

SPEC_KEYS = (
    "name", "experiment", "base", "config", "set", "budget", "baseline", "models", "variants",
    "seeds", "warmup_fraction",
)  # fmt: skip
VARIANT_TAG, FAMILY_TAG, BUDGET_TAG = "variant", "family", "budget"


@dataclass
class AblationSpec:
    path: Path
    name: str
    experiment: str
    raw: dict[str, Any]
    budget: float
    baseline: str
    models: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    warmup_fraction: float = 0.1


def _error(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(key, f"{message} (ablation spec {path})")


def load_ablation(path: str | Path) -> AblationSpec:
    """Read and check an ablation spec; errors name the file and the key."""
    path = Path(path)
    raw = read_yaml(path)
    for key in raw:
        if key not in SPEC_KEYS:
            raise _error(path, str(key), f"unknown key; valid: {', '.join(SPEC_KEYS)}")
    try:
        budget = float(raw.get("budget"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        budget = math.nan
    if not math.isfinite(budget) or budget <= 0:
        raise _error(path, "budget", f"need a positive FLOP count, got {raw.get('budget')!r}")
    for key in ("models", "variants"):
        value = raw.get(key)
        if (
            not isinstance(value, dict)
            or not value
            or not all(isinstance(v, dict) for v in value.values())
        ):
            raise _error(path, key, "need a mapping of name -> overrides (dotted key -> value)")
    baseline = str(raw.get("baseline", ""))
    if baseline not in raw["variants"]:
        raise _error(path, "baseline", f"{baseline!r} is not a variant; variants: "
                     f"{', '.join(raw['variants'])}")  # fmt: skip
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or len(seeds) < 2 or not all(isinstance(s, int) for s in seeds):
        raise _error(path, "seeds", f"need at least two integer seeds (intervals), got {seeds!r}")
    return AblationSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        experiment=str(raw.get("experiment") or raw.get("name") or path.stem),
        raw=raw,
        budget=budget,
        baseline=baseline,
        models={str(k): dict(v) for k, v in raw["models"].items()},
        variants={str(k): dict(v) for k, v in raw["variants"].items()},
        seeds=list(seeds),
        warmup_fraction=float(raw.get("warmup_fraction", 0.1)),
    )


@dataclass
class PlannedVariant:
    family: str
    variant: str
    overrides: dict[str, Any]
    passes: int
    flops_per_token: float
    steps: int
    flops: float


def plan(spec: AblationSpec) -> list[PlannedVariant]:
    """Each (family, variant) with the steps that spend the budget at its FLOPs per token."""
    import torch

    from data_pipeline.tokenizers import build_tokenizer
    from nucleo.studies.sweep import _apply, load_spec_from
    from nucleo.train.components import build_model
    from nucleo.train.compute import ComputeCounter
    from nucleo.train.config import resolve
    from nucleo.train.objective import Objective

    sweep = load_spec_from({**sweep_part(spec.raw, spec.path), "name": spec.name}, spec.path)
    out = []
    for family, shape in spec.models.items():
        for variant, overrides in spec.variants.items():
            chosen = {**sweep.overrides, "arch": family, **shape, **overrides}
            cfg = resolve(_apply(sweep.base, chosen))
            tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
            with torch.device("meta"):
                model = build_model(cfg.arch, cfg.model, tokenizer)
            objective = Objective.build(cfg.losses, cfg.loss, model, tokenizer)
            passes = objective.passes_at(None)
            per_token = ComputeCounter(model, cfg.train.micro_batch_size).per_token(
                cfg.data.seq_len, passes
            )
            step_tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
            steps = max(1, round(spec.budget / (per_token * step_tokens)))
            out.append(
                PlannedVariant(
                    family, variant, {**shape, **overrides}, passes, per_token, steps,
                    steps * step_tokens * per_token,
                )
            )  # fmt: skip
    return out


def sweep_spec(spec: AblationSpec, planned: list[PlannedVariant]) -> dict[str, Any]:
    """The plan as a sweep spec: one ``extra`` point per (family, variant), crossed with seeds."""
    raw = {"name": spec.name, "experiment": spec.experiment}
    raw |= sweep_part(spec.raw, spec.path)
    raw["extra"] = [
        {
            "arch": p.family,
            **p.overrides,
            "train.max_steps": p.steps,
            "train.warmup_steps": max(1, round(spec.warmup_fraction * p.steps)),
            f"tracking.tags.{VARIANT_TAG}": p.variant,
            f"tracking.tags.{BUDGET_TAG}": budget_label(spec.budget),
        }
        for p in planned
    ]
    raw["seeds"] = spec.seeds
    return raw


# ----------------------------------------------------------------------------- analysis

#: two-sided 95% Student t quantiles by degrees of freedom (1..10; the normal's beyond)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


@dataclass
class Difference:
    """Mean paired difference (variant - baseline) over seeds, its 95% t interval, the
    per-seed differences, the baseline's mean (for scale), and which way is better (bits per
    base: lower; MCC and other scores: higher)."""

    mean: float
    low: float
    high: float
    per_seed: list[float]
    baseline: float
    lower_is_better: bool = True

    @property
    def verdict(self) -> str:
        if len(self.per_seed) < 2:
            return "one seed"
        if self.high < 0:
            return "better" if self.lower_is_better else "worse"
        if self.low > 0:
            return "worse" if self.lower_is_better else "better"
        return "no difference resolved"


def paired(
    variant: Sequence[float], baseline: Sequence[float], lower_is_better: bool = True
) -> Difference:
    """Paired difference of two equally long per-seed lists (seed i with seed i)."""
    diffs = np.asarray(variant, dtype=float) - np.asarray(baseline, dtype=float)
    mean, base = float(diffs.mean()), float(np.mean(baseline))
    if len(diffs) < 2:
        return Difference(mean, math.nan, math.nan, diffs.tolist(), base, lower_is_better)
    half = t95(len(diffs) - 1) * float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
    return Difference(mean, mean - half, mean + half, diffs.tolist(), base, lower_is_better)


def _metric(row: RunRow, key: str) -> float | None:
    value = row.metrics.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def metric_keys(rows: Sequence[RunRow]) -> list[tuple[str, str]]:
    """(label, MLflow key) of the compared figures: overall, repeats, the rest, per kingdom."""
    keys = [("all bases", "val/bits_per_base")]
    if any("val/repeat/bits_per_base" in r.metrics for r in rows):
        keys += [("repeats", "val/repeat/bits_per_base"),
                 ("non-repeats", "val/non_repeat/bits_per_base")]  # fmt: skip
    kingdoms = sorted({k for r in rows for k in r.kingdoms})
    return keys + [(k, f"val/bits_per_base/{k}") for k in kingdoms]


def differences(
    rows: Sequence[RunRow], baseline: str, extra: dict[str, dict[str, float]] | None = None
) -> dict[str, dict[str, dict[str, Difference]]]:
    """family -> variant -> figure -> Difference, pairing runs by seed.

    extra: more figures per run name (e.g. region classes from ``nucleo evaluate``):
    {run name: {figure: bits per base}}.
    """
    out: dict[str, dict[str, dict[str, Difference]]] = {}
    tagged = [r for r in rows if VARIANT_TAG in r.tags]
    keys = metric_keys(tagged)
    for family in sorted({r.arch for r in tagged}):
        mine = [r for r in tagged if r.arch == family]
        by = {(r.tags[VARIANT_TAG], seed_of(r)): r for r in mine}
        base = {s: r for (v, s), r in by.items() if v == baseline}
        out[family] = {}
        for variant in sorted({v for v, _ in by} - {baseline}):
            seeds = sorted(s for v, s in by if v == variant and s in base)
            figures: dict[str, Difference] = {}
            for label, key in keys:
                pairs = [(_metric(by[(variant, s)], key), _metric(base[s], key)) for s in seeds]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    figures[label] = paired([a for a, _ in pairs], [b for _, b in pairs])
            for figure in sorted({f for values in (extra or {}).values() for f in values}):
                pairs = [
                    (extra.get(by[(variant, s)].name, {}).get(figure),  # type: ignore[union-attr]
                     extra.get(base[s].name, {}).get(figure))  # type: ignore[union-attr]
                    for s in seeds
                ]  # fmt: skip
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    figures[figure] = paired([a for a, _ in pairs], [b for _, b in pairs])
            out[family][variant] = figures
    return out


def seed_of(row: RunRow) -> int:
    """The run's training seed: its ``-seed<N>`` name suffix (a sweep names every point so),
    else -1."""
    tail = row.name.rsplit("-seed", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else -1


def region_figures(regions_json: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{model name: {"region <class>": bits per base}} over every kingdom of a
    ``nucleo evaluate`` .json (all bases of each class, pooled across kingdoms)."""
    out: dict[str, dict[str, float]] = {}
    for model in regions_json.get("models", []):
        nats: dict[str, float] = {}
        bases: dict[str, float] = {}
        for row in model["rows"]:
            if row["repeat"] != "all" or not row["bases"]:
                continue
            nats[row["class"]] = nats.get(row["class"], 0.0) + row["nats"]
            bases[row["class"]] = bases.get(row["class"], 0.0) + row["bases"]
        out[model["name"]] = {
            f"region {c}": nats[c] / bases[c] / math.log(2) for c in nats if bases[c] > 0
        }
    return out


def table(diffs: dict[str, dict[str, dict[str, Difference]]], figures: Sequence[str]) -> str:
    """Markdown: per family and variant, the paired difference of each figure."""
    lines = [
        "| family | variant | figure | baseline bits/base | difference [95%] | per seed | "
        "verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, variants in diffs.items():
        for variant, values in variants.items():
            for figure in figures:
                d = values.get(figure)
                if d is None:
                    continue
                seeds = ", ".join(f"{x:+.4f}" for x in d.per_seed)
                lines.append(
                    f"| {family} | {variant} | {figure} | {d.baseline:.4f} | {d.mean:+.4f} "
                    f"[{d.low:+.4f}, {d.high:+.4f}] | {seeds} | {d.verdict} |"
                )
    return "\n".join(lines) + "\n"


def forest(diffs: dict[str, dict[str, dict[str, Difference]]], out: Path, baseline: str) -> Path:
    """A forest plot: per family, each variant's paired difference in overall bits per base
    (and on repeats and the rest when measured) with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [f for f in ("all bases", "non-repeats", "repeats")
               if any(f in v for fam in diffs.values() for v in fam.values())]  # fmt: skip
    fig, axes = plt.subplots(
        1, len(diffs), figsize=(5.5 * len(diffs), 0.6 + 0.55 * max(
            len(v) * len(figures) for v in diffs.values())), squeeze=False,
    )  # fmt: skip
    marks = {"all bases": ("o", "k"), "non-repeats": ("s", "#1f77b4"), "repeats": ("^", "#d62728")}
    for ax, (family, variants) in zip(axes[0], diffs.items(), strict=True):
        labels = []
        shown: set[str] = set()
        y = 0
        for variant, values in variants.items():
            for figure in figures:
                d = values.get(figure)
                if d is None:
                    continue
                marker, colour = marks[figure]
                ax.errorbar(d.mean, -y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt=marker,
                            color=colour, capsize=3,
                            label=None if figure in shown else figure)  # fmt: skip
                shown.add(figure)
                ax.scatter(d.per_seed, [-y] * len(d.per_seed), s=8, color=colour, alpha=0.4)
                labels.append((y, f"{variant} ({figure})"))
                y += 1
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks([-i for i, _ in labels], [t for _, t in labels], fontsize=8)
        ax.set_xlabel(f"bits per base, variant - {baseline} (negative: better)")
        ax.set_title(f"{family}: paired differences, 95% t intervals over seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
