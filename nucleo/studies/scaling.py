"""Scaling laws from tracked runs: fits, bootstrap intervals, the compute frontier, plots, report.

Per group (architecture x loss set), in validation bits per base:

    L(N)    = E + A / N^alpha                       N: non-embedding parameters
    L(N, D) = E + A / N^alpha + B / D^beta          D: training tokens (when D varies)

fitted as Hoffmann et al. 2022 (Chinchilla, approach 3) do: log L is modelled as
LSE(e, a - alpha log N[, b - beta log D]) with E = exp(e), A = exp(a), B = exp(b), the loss is
the Huber loss (delta 1e-3) of the residuals in log space, minimised by L-BFGS from a grid of
starts. Confidence intervals: the 2.5-97.5 percentiles over bootstrap resamples of the runs.
The compute frontier is the set of runs that no cheaper run beats; with L(N, D) and the runs'
FLOPs per token per parameter k (C ~ k N D), the compute-optimal size follows
N_opt(C) = G (C / k)^(beta / (alpha + beta)).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucleo.studies.compare import RunRow, table

HUBER_DELTA = 1e-3
EXPONENT_MAX = 5.0  # alpha, beta in [0, 5]
EXPONENT_EDGE = 0.01  # an exponent this close to a bound is not determined by the data


def _huber(r: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of residuals r, and its derivative per residual."""
    a = np.abs(r)
    value = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()
    return float(value), np.clip(r, -delta, delta)


def _objective(theta: np.ndarray, logs: np.ndarray, target: np.ndarray, delta: float):
    """Huber loss of LSE(e, a_i - alpha_i log X_i) - log L, and its gradient.

    theta = [e, a_1, alpha_1, a_2, alpha_2, ...]; logs: [k, n] log N (and log D); target: log L.
    """
    k = logs.shape[0]
    terms = np.empty((k + 1, logs.shape[1]))
    terms[0] = theta[0]
    for i in range(k):
        terms[i + 1] = theta[1 + 2 * i] - theta[2 + 2 * i] * logs[i]
    top = terms.max(0)
    weights = np.exp(terms - top)
    total = weights.sum(0)
    pred = top + np.log(total)
    soft = weights / total
    value, dr = _huber(pred - target, delta)
    grad = np.empty_like(theta)
    grad[0] = (dr * soft[0]).sum()
    for i in range(k):
        grad[1 + 2 * i] = (dr * soft[i + 1]).sum()
        grad[2 + 2 * i] = -(dr * soft[i + 1] * logs[i]).sum()
    return value, grad


def _starts(k: int) -> list[np.ndarray]:
    """The grid of initial points (Hoffmann et al. use a finer one; this is 3 x (4 x 3)^k)."""
    grids = [np.array([-1.0, 0.0, 1.0])]
    for _ in range(k):
        grids += [np.array([0.0, 5.0, 10.0, 15.0]), np.array([0.1, 0.5, 1.0])]
    mesh = np.meshgrid(*grids, indexing="ij")
    return [np.array(p) for p in zip(*(m.ravel() for m in mesh), strict=True)]


def _minimise(
    logs: np.ndarray, target: np.ndarray, starts: Sequence[np.ndarray], delta: float
) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    k = logs.shape[0]
    bounds = [(None, None)] + [(None, None), (0.0, EXPONENT_MAX)] * k
    best, best_value = None, math.inf
    for start in starts:
        result = minimize(
            _objective, start, args=(logs, target, delta), jac=True, method="L-BFGS-B",
            bounds=bounds,
        )  # fmt: skip
        if result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    assert best is not None
    return best, best_value


@dataclass
class Law:
    """A fitted law. form: "N" or "N,D"; params: E, A, alpha (and B, beta), in bits per base;
    ci: 95% bootstrap interval per parameter; resamples: bootstrap fits that were kept."""

    form: str
    params: dict[str, float]
    points: int
    objective: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    resamples: int = 0

    @property
    def identifiable(self) -> bool:
        """Whether the runs pin the exponents down: each strictly inside its bounds (0, 5) and,
        with intervals, known within 10x. A nearly flat curve fits any small alpha with some E,
        and the optimiser then stops at a bound."""
        for key in ("alpha", "beta"):
            if key not in self.params:
                continue
            if not EXPONENT_EDGE < self.params[key] < EXPONENT_MAX - EXPONENT_EDGE:
                return False
            lo, hi = self.ci.get(key, (1.0, 1.0))
            if lo <= EXPONENT_EDGE or hi / lo > 10:
                return False
        return True

    def predict(self, n: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
        p = self.params
        out = p["E"] + p["A"] * np.power(n, -p["alpha"])
        if self.form == "N,D":
            assert d is not None
            out = out + p["B"] * np.power(d, -p["beta"])
        return out


def _law(theta: np.ndarray, form: str, points: int, objective: float) -> Law:
    params = {"E": math.exp(theta[0]), "A": math.exp(theta[1]), "alpha": float(theta[2])}
    if form == "N,D":
        params.update(B=math.exp(theta[3]), beta=float(theta[4]))
    return Law(form, params, points, objective)


def fit_law(
    n: Sequence[float],
    loss: Sequence[float],
    d: Sequence[float] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    delta: float = HUBER_DELTA,
) -> Law:
    """Fit L(N) (or L(N, D) when ``d`` is given) with bootstrap intervals.

    Needs at least 3 distinct N (and, for L(N, D), 2 distinct D and 5 runs). A resample with
    fewer distinct values than that is skipped (``Law.resamples`` counts the kept ones).
    """
    n_arr, l_arr = np.asarray(n, float), np.asarray(loss, float)
    logs = [np.log(n_arr)]
    form = "N"
    if d is not None:
        d_arr = np.asarray(d, float)
        logs.append(np.log(d_arr))
        form = "N,D"
    x = np.stack(logs)
    target = np.log(l_arr)
    k = x.shape[0]

    def enough(idx: np.ndarray) -> bool:
        if len(np.unique(x[0, idx])) < 3:
            return False
        return k == 1 or (len(np.unique(x[1, idx])) >= 2 and len(idx) >= 5)

    every = np.arange(len(target))
    if not enough(every):
        raise ValueError(
            f"L({form}) needs >= 3 distinct model sizes"
            + (" and >= 2 token budgets over >= 5 runs" if k == 2 else "")
            + f"; got {len(np.unique(n_arr))} sizes in {len(target)} runs"
        )
    theta, value = _minimise(x, target, _starts(k), delta)
    law = _law(theta, form, len(target), value)
    rng = np.random.default_rng(seed)
    samples = []
    grid = _starts(k)
    near = [theta, grid[len(grid) // 3], grid[2 * len(grid) // 3]]  # the optimum + two others
    for _ in range(bootstrap):
        idx = rng.integers(0, len(target), len(target))
        if not enough(idx):
            continue
        fitted, _ = _minimise(x[:, idx], target[idx], near, delta)
        samples.append(list(_law(fitted, form, len(idx), 0.0).params.values()))
    if samples:
        arr = np.array(samples)
        for j, key in enumerate(law.params):
            lo, hi = np.percentile(arr[:, j], [2.5, 97.5])
            law.ci[key] = (float(lo), float(hi))
    law.resamples = len(samples)
    return law


def slope_per_decade(
    n: Sequence[float], loss: Sequence[float], bootstrap: int = 200, seed: int = 0
) -> tuple[float, tuple[float, float] | None]:
    """d L / d log10 N by least squares (bits per base gained per 10x parameters), with a 95%
    bootstrap interval: a plain summary that stays meaningful when the three-parameter law is
    not identifiable (a nearly flat curve fits any small alpha)."""
    x, y = np.log10(np.asarray(n, float)), np.asarray(loss, float)
    slope = float(np.polyfit(x, y, 1)[0])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) >= 2:
            samples.append(np.polyfit(x[idx], y[idx], 1)[0])
    if not samples:
        return slope, None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return slope, (float(lo), float(hi))


def frontier(rows: Sequence[RunRow]) -> list[RunRow]:
    """Runs no cheaper run beats: sorted by compute, each with lower loss than all before."""
    best, out = math.inf, []
    for row in sorted(rows, key=lambda r: r.flops):
        if row.bits < best:
            out.append(row)
            best = row.bits
    return out


def _groups(rows: Sequence[RunRow]) -> dict[str, list[RunRow]]:
    out: dict[str, list[RunRow]] = {}
    for row in rows:
        out.setdefault(row.group, []).append(row)
    return out


def _budget(rows: Sequence[RunRow]) -> float:
    """The token budget most runs of a group share (the largest of equals): L(N) uses those."""
    values, counts = np.unique([round(r.tokens) for r in rows], return_counts=True)
    return float(values[counts == counts.max()].max())


@dataclass
class GroupFit:
    """The fits of one group: L(N) at its common budget, L(N, D) when D varies, per-kingdom
    L(N) (no intervals), and C ~ c N^p (compute vs size, to draw L(N) against compute)."""

    group: str
    runs: int
    tokens: float
    law_n: Law | None
    law_nd: Law | None
    kingdoms: dict[str, Law]
    compute_fit: tuple[float, float]  # (log c, p)
    flops_per_token_per_param: float
    optimal_exponent: float | None = None  # N_opt ~ C^a from L(N, D)
    slope: float | None = None  # d L / d log10 N at the budget (bits per base per 10x N)
    slope_ci: tuple[float, float] | None = None
    kingdom_slopes: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def fit_groups(
    rows: Sequence[RunRow],
    bootstrap: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[GroupFit]:
    """Every group's fits; a group that cannot be fitted says why in ``errors``."""
    fits = []
    for group, members in sorted(_groups(rows).items()):
        started = time.perf_counter()
        budget = _budget(members)
        at_budget = [r for r in members if round(r.tokens) == round(budget)]
        errors: list[str] = []
        law_n = law_nd = None
        try:
            law_n = fit_law(
                [r.non_embedding for r in at_budget], [r.bits for r in at_budget],
                bootstrap=bootstrap, seed=seed,
            )  # fmt: skip
        except ValueError as err:
            errors.append(f"L(N): {err}")
        if len({round(r.tokens) for r in members}) >= 2:
            try:
                law_nd = fit_law(
                    [r.non_embedding for r in members], [r.bits for r in members],
                    d=[r.tokens for r in members], bootstrap=bootstrap, seed=seed,
                )  # fmt: skip
            except ValueError as err:
                errors.append(f"L(N, D): {err}")
        kingdoms: dict[str, Law] = {}
        for kingdom in sorted({k for r in at_budget for k in r.kingdoms}):
            have = [r for r in at_budget if kingdom in r.kingdoms]
            if len({r.non_embedding for r in have}) >= 3:
                kingdoms[kingdom] = fit_law(
                    [r.non_embedding for r in have], [r.kingdoms[kingdom] for r in have],
                    bootstrap=0,
                )  # fmt: skip
        log_n = np.log([r.non_embedding for r in members])
        log_c = np.log([r.flops / r.tokens * budget for r in members])  # at the common budget
        if len(set(log_n)) >= 2:
            p, c0 = np.polyfit(log_n, log_c, 1)
        else:
            p, c0 = 1.0, float(log_c.mean() - log_n.mean())
        per_param = float(np.median([r.flops / (r.tokens * r.non_embedding) for r in members]))
        fit = GroupFit(
            group, len(members), budget, law_n, law_nd, kingdoms, (float(c0), float(p)),
            per_param, errors=errors,
        )  # fmt: skip
        if len({r.non_embedding for r in at_budget}) >= 2:
            fit.slope, fit.slope_ci = slope_per_decade(
                [r.non_embedding for r in at_budget], [r.bits for r in at_budget], bootstrap, seed
            )
            for kingdom in sorted({k for r in at_budget for k in r.kingdoms}):
                have = [r for r in at_budget if kingdom in r.kingdoms]
                if len({r.non_embedding for r in have}) >= 2:
                    fit.kingdom_slopes[kingdom] = slope_per_decade(
                        [r.non_embedding for r in have], [r.kingdoms[kingdom] for r in have], 0
                    )[0]
        if law_nd is not None:
            a, b = law_nd.params["alpha"], law_nd.params["beta"]
            fit.optimal_exponent = b / (a + b) if a + b > 0 else None
        fits.append(fit)
        log(
            f"fitted {group}: {len(members)} runs, {len({r.tokens for r in members})} budget(s), "
            f"{bootstrap} resamples, {time.perf_counter() - started:.1f}s"
        )
    return fits


# ----------------------------------------------------------------------------- plots

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _styles(rows: Sequence[RunRow]) -> Callable[[str, str], tuple[str, str, str]]:
    archs = sorted({r.arch for r in rows})
    losses = sorted({r.losses for r in rows})

    def style(arch: str, loss: str) -> tuple[str, str, str]:
        colour = _COLOURS[archs.index(arch) % len(_COLOURS)]
        marker = _MARKERS[losses.index(loss) % len(_MARKERS)]
        line = "-" if losses.index(loss) == 0 else "--"
        return colour, marker, line

    return style


def plot(rows: Sequence[RunRow], fits: Sequence[GroupFit], out_dir: Path, stem: str) -> list[Path]:
    """Loss vs compute (fits and the frontier), loss vs parameters, and per-kingdom panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = _styles(rows)
    groups = _groups(rows)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for fit in fits:
        members = groups[fit.group]
        arch, loss = members[0].arch, members[0].losses
        colour, marker, line = style(arch, loss)
        at_budget = [r for r in members if round(r.tokens) == round(fit.tokens)]
        smaller = [r for r in members if round(r.tokens) != round(fit.tokens)]
        for ax, x in ((axes[0], lambda r: r.flops), (axes[1], lambda r: r.non_embedding)):
            ax.scatter([x(r) for r in at_budget], [r.bits for r in at_budget], color=colour,
                       marker=marker, s=36, label=fit.group, zorder=3)  # fmt: skip
            if smaller:  # other token budgets: hollow (the L(N) curve is at the main budget)
                ax.scatter([x(r) for r in smaller], [r.bits for r in smaller], marker=marker,
                           s=30, facecolors="none", edgecolors=colour, alpha=0.7,
                           label=f"{fit.group}, smaller budgets", zorder=3)  # fmt: skip
        if fit.law_n is not None:
            n = np.geomspace(
                min(r.non_embedding for r in members) / 1.5,
                max(r.non_embedding for r in members) * 3, 100,
            )  # fmt: skip
            c0, p = fit.compute_fit
            label = f"{fit.group}: alpha {fit.law_n.params['alpha']:.2f}"
            axes[0].plot(np.exp(c0) * n**p, fit.law_n.predict(n), line, color=colour, alpha=0.8,
                         label=label)  # fmt: skip
            axes[1].plot(n, fit.law_n.predict(n), line, color=colour, alpha=0.8)
    front = frontier(rows)
    axes[0].step([r.flops for r in front], [r.bits for r in front], where="post", color="k",
                 lw=1, alpha=0.5, label="compute frontier (best so far)")  # fmt: skip
    for ax, xlabel in ((axes[0], "training compute C (FLOPs, nucleo.flops)"),
                       (axes[1], "non-embedding parameters N")):  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per base")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("loss vs compute, with L(N) fits")
    axes[1].set_title("loss vs size")
    fig.tight_layout()
    path = out_dir / f"{stem}_compute.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    kingdoms = sorted({k for r in rows for k in r.kingdoms})
    if kingdoms:
        cols = 4
        rows_n = math.ceil(len(kingdoms) / cols)
        fig, axes_k = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 2.7 * rows_n), squeeze=False)
        for i, kingdom in enumerate(kingdoms):
            ax = axes_k[i // cols][i % cols]
            for fit in fits:
                members = sorted(
                    (
                        r
                        for r in groups[fit.group]
                        if kingdom in r.kingdoms and round(r.tokens) == round(fit.tokens)
                    ),
                    key=lambda r: r.non_embedding,
                )  # fmt: skip  (the group's main budget, as the table)
                if not members:
                    continue
                colour, marker, line = style(members[0].arch, members[0].losses)
                ax.plot([r.non_embedding for r in members], [r.kingdoms[kingdom] for r in members],
                        line, marker=marker, color=colour, ms=4, label=fit.group)  # fmt: skip
            ax.set_xscale("log")
            ax.set_title(kingdom, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        for j in range(len(kingdoms), rows_n * cols):
            axes_k[j // cols][j % cols].axis("off")
        axes_k[0][0].legend(fontsize=6)
        fig.supxlabel("non-embedding parameters N (each group at its main token budget)")
        fig.supylabel("validation bits per base")
        fig.tight_layout()
        path = out_dir / f"{stem}_kingdoms.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- report


NOT_IDENTIFIABLE = (
    "(!) not identifiable from these runs: an exponent sits at a bound of [0, 5] or its interval "
    "spans more than 10x; the curve is too flat over this range of N (and D) to separate E, A "
    "and alpha. Read the per-decade slope instead."
)


def _mark(law: Law) -> str:
    return "" if law.identifiable else " (!)"


def _ci(law: Law, key: str, digits: int = 3) -> str:
    value = law.params[key]
    if key in law.ci:
        lo, hi = law.ci[key]
        return f"{value:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"
    return f"{value:.{digits}g}"


def report(
    rows: Sequence[RunRow],
    fits: Sequence[GroupFit],
    figures: Sequence[Path],
    out: Path,
    header: dict[str, str],
    notes: str = "",
) -> str:
    """The markdown report (written to ``out``)."""
    lines = ["# Scaling laws", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## Fitted laws (validation bits per base; 95% bootstrap intervals)", ""]
    lines += [
        "L(N) = E + A / N^alpha at each group's token budget D; N = non-embedding parameters.",
        "",
        "The last column is a plain summary beside the law: the least-squares change of bits",
        "per base per 10x parameters (negative: bigger is better), with its bootstrap interval.",
        "",
        "| group | runs | D (tokens) | alpha | E (bits/base) | A | resamples "
        "| bits/base per 10x N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fit in fits:
        slope = ""
        if fit.slope is not None:
            slope = f"{fit.slope:+.4f}"
            if fit.slope_ci is not None:
                slope += f" [{fit.slope_ci[0]:+.4f}, {fit.slope_ci[1]:+.4f}]"
        if fit.law_n is None:
            lines.append(
                f"| {fit.group} | {fit.runs} | {fit.tokens:,.0f} | not fitted | | | | {slope} |"
            )
            continue
        law = fit.law_n
        lines.append(
            f"| {fit.group} | {law.points} | {fit.tokens:,.0f} | {_ci(law, 'alpha')}{_mark(law)} | "
            f"{_ci(law, 'E', 4)} | {_ci(law, 'A')} | {law.resamples} | {slope} |"
        )
    laws = [law for f in fits for law in (f.law_n, f.law_nd) if law is not None]
    if any(not law.identifiable for law in laws):
        lines += ["", NOT_IDENTIFIABLE]
    nd = [f for f in fits if f.law_nd is not None]
    if nd:
        lines += [
            "",
            "L(N, D) = E + A / N^alpha + B / D^beta (every run of the group); compute-optimal "
            "N_opt ~ C^(beta / (alpha + beta)):",
            "",
            "| group | runs | alpha | beta | E | A | B | N_opt exponent |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fit in nd:
            law = fit.law_nd
            assert law is not None
            exponent = f"{fit.optimal_exponent:.2f}" if fit.optimal_exponent is not None else ""
            exponent += _mark(law)
            lines.append(
                f"| {fit.group} | {law.points} | {_ci(law, 'alpha')}{_mark(law)} | "
                f"{_ci(law, 'beta')} | {_ci(law, 'E', 4)} | {_ci(law, 'A')} | {_ci(law, 'B')} | "
                f"{exponent} |"
            )
    for fit in fits:
        for error in fit.errors:
            lines.append(f"\n{fit.group}: {error}")
    lines += ["", "## Compute", ""]
    lines += [
        "Training FLOPs come from nucleo.flops (analytic per layer type, 3 x forward, one "
        "backbone pass per view: `rc` doubles it). C ~ c N^p across each group's sizes, and "
        "the FLOPs per token per non-embedding parameter (6 for a plain C = 6ND):",
        "",
        "| group | p in C ~ N^p | FLOPs / (token x N) |",
        "|---|---|---|",
    ]
    for fit in fits:
        lines.append(
            f"| {fit.group} | {fit.compute_fit[1]:.2f} | {fit.flops_per_token_per_param:.1f} |"
        )
    front = frontier(rows)
    lines += ["", "Compute frontier (each run beats every cheaper run):", ""]
    lines += ["| compute (FLOPs) | run | group | N | bits/base |", "|---|---|---|---|---|"]
    for r in front:
        lines.append(
            f"| {r.flops:.3g} | {r.name} | {r.group} | {r.non_embedding:,} | {r.bits:.4f} |"
        )
    kingdoms = sorted({k for f in fits for k in f.kingdom_slopes})
    if kingdoms:
        lines += ["", "## Per kingdom: bits per base per 10x N (at each group's budget)", ""]
        lines.append("| kingdom | " + " | ".join(f.group for f in fits) + " |")
        lines.append("|---|" + "---|" * len(fits))
        for kingdom in kingdoms:
            cells = [
                f"{f.kingdom_slopes[kingdom]:+.4f}" if kingdom in f.kingdom_slopes else ""
                for f in fits
            ]
            lines.append(f"| {kingdom} | " + " | ".join(cells) + " |")
        lines += ["", "(L(N) per kingdom, alpha and all, is in the .json beside this report.)"]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", "## Runs", "", table(list(rows), "md")]
    if notes:
        lines += ["", notes.strip(), ""]
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text)
    return text


def fits_json(fits: Sequence[GroupFit]) -> list[dict[str, Any]]:
    return [asdict(f) for f in fits]


def run_fit(
    rows: Sequence[RunRow],
    out: Path,
    header: dict[str, str],
    bootstrap: int = 200,
    seed: int = 0,
    notes: str = "",
) -> tuple[list[GroupFit], list[Path]]:
    """Fit, plot and write the report and ``<stem>.json`` beside ``out``."""
    if not rows:
        raise ValueError("no finished training runs match (check --experiment and --tag)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fits = fit_groups(rows, bootstrap=bootstrap, seed=seed)
    figures = plot(rows, fits, out.parent, out.stem)
    report(rows, fits, figures, out, header, notes)
    data = {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "fits": fits_json(fits)}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return fits, figures


def log_to_mlflow(
    uri: str, experiment: str, fits: Sequence[GroupFit], files: Sequence[Path]
) -> str:
    """A ``scaling-fit`` run in ``experiment`` holding the fitted exponents and every file."""
    from nucleo.train.store import tracked_run

    name = f"scaling-fit-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracked_run(uri, experiment, name, {"nucleo.kind": "scaling-fit"}) as (client, run_id):
        for i, fit in enumerate(fits):
            client.set_tag(run_id, f"group.{i}", fit.group)
            for law, prefix in ((fit.law_n, "N"), (fit.law_nd, "ND")):
                if law is not None:
                    for key, value in law.params.items():
                        client.log_metric(run_id, f"fit.{i}.{prefix}.{key}", value)
        for path in files:
            client.log_artifact(run_id, str(path), "scaling")
    return run_id
