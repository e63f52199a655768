"""IsoFLOP fits: per family and budget, the loss-optimal size from a parabola in log N; then
N_opt ~ C^a and D_opt ~ C^b per family, all with bootstrap intervals (Hoffmann et al. 2022,
approach 2).

Per (family, budget): bits per base = p2 x^2 + p1 x + p0 with x = log10 N, least squares over
the curve's runs; N_opt = 10^(-p1 / 2 p2) when the parabola opens upward (p2 > 0), else the
curve has no interior minimum and the budget says so. Intervals come from a residual
bootstrap (each resample: the fitted curve plus the residuals drawn with replacement, scaled
by sqrt(n / (n - 3)), refitted): five points per curve are too few to resample the points
themselves. With two residual degrees of freedom the residuals can understate how much a run
moves with its seed, so ``seed_noise`` (bits per base: the seed-to-seed standard deviation
measured elsewhere, e.g. the ablation's repeated baseline) adds Gaussian noise of that size to
every resample when it is larger than the residuals' own spread. D_opt = C / f(N_opt), f the
family's training FLOPs per token, interpolated in log N across its runs. The exponents are
least-squares lines of log10 N_opt and log10 D_opt on log10 C; their intervals pair each
budget's r-th resample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucleo.studies.compare import RunRow
from nucleo.studies.isoflop import BUDGET_TAG


@dataclass
class Curve:
    """One isoFLOP curve: a family's runs at one budget, and its parabola's minimum.

    n_opt, d_opt, bits_opt: the minimum (None when the parabola opens downward); *_ci: 2.5 and
    97.5 percentiles over the resamples with a minimum; convex: the share of resamples that had
    one; inside: whether n_opt lies within the sizes trained.
    """

    family: str
    budget: float
    runs: list[RunRow]
    coef: tuple[float, float, float] | None = None
    n_opt: float | None = None
    n_ci: tuple[float, float] | None = None
    d_opt: float | None = None
    d_ci: tuple[float, float] | None = None
    bits_opt: float | None = None
    convex: float = 0.0
    inside: bool = False
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log10 N_opt, NaN: none


@dataclass
class Exponent:
    """value of the slope of log10 y on log10 C, its 95% interval, and the resamples used."""

    value: float | None
    ci: tuple[float, float] | None
    resamples: int


@dataclass
class FamilyFit:
    family: str
    curves: list[Curve]
    a: Exponent  # N_opt ~ C^a
    b: Exponent  # D_opt ~ C^b


def _parabola(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.polyfit(x, y, 2)


def _minimum(coef: np.ndarray) -> float | None:
    """x at the parabola's minimum, or None when it opens downward."""
    p2, p1, _ = coef
    return float(-p1 / (2 * p2)) if p2 > 0 else None


def _flops_per_token(runs: Sequence[RunRow]) -> tuple[np.ndarray, np.ndarray]:
    """(log10 N, log10 FLOPs per token) of a family's runs, sorted by N, duplicates merged."""
    by_n: dict[int, float] = {}
    for r in runs:
        by_n[r.non_embedding] = r.flops / r.tokens
    ns = sorted(by_n)
    return np.log10(ns), np.log10([by_n[n] for n in ns])


def log_tokens_at(budget: float, log_n: float, table: tuple[np.ndarray, np.ndarray]) -> float:
    """log10 D, D = C / f(N), f interpolated (and extrapolated linearly) in log-log across the
    runs; in logs, so that a bootstrap draw far outside the sizes trained stays finite."""
    xs, ys = table
    if len(xs) == 1:  # one size: f proportional to N
        return float(math.log10(budget) - (ys[0] + log_n - xs[0]))
    i = int(np.clip(np.searchsorted(xs, log_n) - 1, 0, len(xs) - 2))
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(math.log10(budget) - (ys[i] + slope * (log_n - xs[i])))


def tokens_at(budget: float, log_n: float, table: tuple[np.ndarray, np.ndarray]) -> float:
    """D = C / f(N) (see log_tokens_at); inf past the float range."""
    log_d = log_tokens_at(budget, log_n, table)
    return float(10**log_d) if log_d < 308 else math.inf


def fit_curve(
    curve: Curve,
    table: tuple[np.ndarray, np.ndarray],
    bootstrap: int,
    seed: int,
    seed_noise: float = 0.0,
):
    """Fill ``curve``'s parabola, minimum and intervals (see the module docstring)."""
    x = np.log10([r.non_embedding for r in curve.runs])
    y = np.array([r.bits for r in curve.runs])
    if len(set(x.tolist())) < 3:
        return
    coef = _parabola(x, y)
    curve.coef = tuple(float(c) for c in coef)  # type: ignore[assignment]
    best = _minimum(coef)
    rng = np.random.default_rng([seed, int(math.log10(curve.budget) * 1000)])
    fitted = np.polyval(coef, x)
    residuals = (y - fitted) * math.sqrt(len(x) / max(1, len(x) - 3))
    extra = math.sqrt(max(0.0, seed_noise**2 - float(np.mean(residuals**2))))
    samples = np.full(bootstrap, np.nan)
    for i in range(bootstrap):
        drawn = fitted + rng.choice(residuals, size=len(x), replace=True)
        if extra > 0:  # the residuals' spread topped up to the measured seed noise
            drawn = drawn + rng.normal(0.0, extra, size=len(x))
        found = _minimum(_parabola(x, drawn))
        if found is not None:
            samples[i] = found
    curve.samples = samples
    ok = samples[np.isfinite(samples)]
    curve.convex = float(len(ok) / bootstrap) if bootstrap else float(best is not None)
    if best is None:
        return
    curve.n_opt = 10**best
    curve.bits_opt = float(np.polyval(coef, best))
    curve.inside = bool(x.min() <= best <= x.max())
    curve.d_opt = tokens_at(curve.budget, best, table)
    if len(ok) >= 10:
        low, high = np.percentile(ok, [2.5, 97.5])
        curve.n_ci = (10**low, 10**high)
        # more parameters, fewer tokens: the interval's ends swap
        curve.d_ci = (tokens_at(curve.budget, high, table), tokens_at(curve.budget, low, table))


def _exponent(log_c: np.ndarray, values: np.ndarray, draws: np.ndarray) -> Exponent:
    """Slope of values on log_c, with the interval of the slopes of the paired resamples."""
    if len(log_c) < 2:
        return Exponent(None, None, 0)
    value = float(np.polyfit(log_c, values, 1)[0])
    usable = draws[np.all(np.isfinite(draws), axis=1)]
    if len(usable) < 10:
        return Exponent(value, None, len(usable))
    slopes = [np.polyfit(log_c, row, 1)[0] for row in usable]
    low, high = np.percentile(slopes, [2.5, 97.5])
    return Exponent(value, (float(low), float(high)), len(usable))


def fit_family(
    family: str, runs: Sequence[RunRow], bootstrap: int, seed: int, seed_noise: float = 0.0
) -> FamilyFit:
    """Every curve of one family (runs grouped by their budget tag) and its exponents."""
    table = _flops_per_token(runs)
    budgets = sorted({float(r.tags[BUDGET_TAG]) for r in runs})
    curves = []
    for budget in budgets:
        members = sorted(
            (r for r in runs if float(r.tags[BUDGET_TAG]) == budget), key=lambda r: r.non_embedding
        )
        curve = Curve(family, budget, members)
        fit_curve(curve, table, bootstrap, seed, seed_noise)
        curves.append(curve)
    found = [c for c in curves if c.n_opt is not None]
    log_c = np.log10([c.budget for c in found])
    log_n = np.log10([c.n_opt for c in found])  # type: ignore[misc]
    log_d = np.log10([c.d_opt for c in found])  # type: ignore[misc]
    draws_n = np.stack([c.samples for c in found], axis=1) if found else np.zeros((0, 0))
    draws_d = np.full_like(draws_n, np.nan)
    for j, c in enumerate(found):
        for i, value in enumerate(draws_n[:, j]):
            if np.isfinite(value):
                draws_d[i, j] = log_tokens_at(c.budget, float(value), table)
    return FamilyFit(
        family,
        curves,
        _exponent(log_c, log_n, draws_n),
        _exponent(log_c, log_d, draws_d),
    )


def fit_all(
    rows: Sequence[RunRow], bootstrap: int = 1000, seed: int = 0, seed_noise: float = 0.0
) -> list[FamilyFit]:
    """Every family of an isoFLOP sweep's finished runs (those with a budget tag)."""
    tagged = [r for r in rows if BUDGET_TAG in r.tags and math.isfinite(r.bits)]
    families = sorted({r.arch for r in tagged})
    return [
        fit_family(f, [r for r in tagged if r.arch == f], bootstrap, seed, seed_noise)
        for f in families
    ]


# ----------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _interval(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"


def curve_table(fits: Sequence[FamilyFit]) -> str:
    """Per family and budget: runs, the optimum N and D with intervals, and its bits."""
    lines = [
        "| family | budget (FLOPs) | runs | N range | N_opt [95%] | D_opt [95%] | D/N at opt | "
        "bits/base at opt | best run (bits/base) | resamples with a minimum |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fit in fits:
        for c in fit.curves:
            ns = [r.non_embedding for r in c.runs]
            best = min(c.runs, key=lambda r: r.bits)
            ratio = c.d_opt / c.n_opt if c.n_opt and c.d_opt else None
            flag = "" if c.n_opt is None or c.inside else " (outside the sizes trained)"
            lines.append(
                f"| {fit.family} | {c.budget:.0e} | {len(c.runs)} | {min(ns):,}-{max(ns):,} | "
                f"{_num(c.n_opt)}{_interval(c.n_ci)}{flag} | {_num(c.d_opt)}{_interval(c.d_ci)} | "
                f"{_num(ratio)} | {_num(c.bits_opt, 5)} | {best.non_embedding:,} "
                f"({best.bits:.4f}) | {c.convex:.0%} |"
            )
    return "\n".join(lines) + "\n"


def exponent_table(fits: Sequence[FamilyFit]) -> str:
    lines = [
        "| family | budgets with a minimum | a in N_opt ~ C^a [95%] | b in D_opt ~ C^b [95%] |",
        "|---|---|---|---|",
    ]
    for fit in fits:
        found = sum(1 for c in fit.curves if c.n_opt is not None)
        lines.append(
            f"| {fit.family} | {found} of {len(fit.curves)} | {_num(fit.a.value, 2)}"
            f"{_interval(fit.a.ci, 2)} | {_num(fit.b.value, 2)}{_interval(fit.b.ci, 2)} |"
        )
    return "\n".join(lines) + "\n"


def plot(fits: Sequence[FamilyFit], out: Path, floor: float | None = None) -> Path:
    """One panel per family: bits per base vs N at each budget, the parabolas and minima (and
    the k-mer Markov ``floor``, dashed); and a last panel of N_opt vs C per family with its
    fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(fits) + 1
    cols = min(3, panels)
    rows_n = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(f.curves) for f in fits)))
    for ax, fit in zip(axes.flat, fits, strict=False):
        for colour, c in zip(colours, fit.curves, strict=False):
            ns = np.array([r.non_embedding for r in c.runs])
            ax.scatter(ns, [r.bits for r in c.runs], color=colour, s=22, label=f"{c.budget:.0e}")
            if c.coef is not None:
                grid = np.linspace(np.log10(ns.min()) - 0.2, np.log10(ns.max()) + 0.2, 80)
                ax.plot(10**grid, np.polyval(c.coef, grid), color=colour, lw=1)
            if c.n_opt is not None and c.bits_opt is not None:
                ax.plot([c.n_opt], [c.bits_opt], marker="*", color=colour, ms=11, mec="k")
                if c.n_ci is not None:
                    ax.hlines(c.bits_opt, *c.n_ci, color=colour, lw=2, alpha=0.6)
        if floor is not None:
            ax.axhline(floor, ls="--", color="grey", lw=1, label="Markov floor")
        ax.set_xscale("log")
        ax.set_title(f"{fit.family}: isoFLOP curves")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("validation bits per base")
        ax.legend(title="budget (FLOPs)", fontsize=8)
    ax = axes.flat[len(fits)]
    for i, fit in enumerate(fits):
        found = [c for c in fit.curves if c.n_opt is not None]
        if not found:
            continue
        colour = plt.cm.tab10(i % 10)
        cs = np.array([c.budget for c in found])
        ax.scatter(cs, [c.n_opt for c in found], color=colour, label=fit.family)
        for c in found:
            if c.n_ci is not None:
                ax.vlines(c.budget, *c.n_ci, color=colour, alpha=0.5)
        if fit.a.value is not None and len(found) >= 2:
            k = np.mean(np.log10([c.n_opt for c in found])) - fit.a.value * np.mean(np.log10(cs))
            grid = np.geomspace(cs.min(), cs.max(), 20)
            ax.plot(grid, 10 ** (k + fit.a.value * np.log10(grid)), color=colour, lw=1,
                    label=f"a = {fit.a.value:.2f}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("loss-optimal size vs compute")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("N_opt")
    ax.legend(fontsize=8)
    for extra in list(axes.flat)[panels:]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def to_json(fits: Sequence[FamilyFit]) -> dict[str, Any]:
    """Every number of the fits (and each run's name, N, D, C and bits), for the .json."""
    return {
        fit.family: {
            "a": {"value": fit.a.value, "ci": fit.a.ci, "resamples": fit.a.resamples},
            "b": {"value": fit.b.value, "ci": fit.b.ci, "resamples": fit.b.resamples},
            "curves": [
                {
                    "budget": c.budget,
                    "parabola_log10N": c.coef,
                    "n_opt": c.n_opt,
                    "n_ci": c.n_ci,
                    "d_opt": c.d_opt,
                    "d_ci": c.d_ci,
                    "bits_opt": c.bits_opt,
                    "convex_share": c.convex,
                    "inside": c.inside,
                    "runs": [
                        {
                            "run_id": r.run_id,
                            "name": r.name,
                            "N": r.non_embedding,
                            "tokens": r.tokens,
                            "flops": r.flops,
                            "bits": r.bits,
                        }
                        for r in c.runs
                    ],
                }
                for c in fit.curves
            ],
        }
        for fit in fits
    }
