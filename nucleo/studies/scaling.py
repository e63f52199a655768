"""Scaling-law fits from tracked runs: the laws, their Huber/L-BFGS fit, bootstrap intervals,
the compute frontier and the per-group fits (``nucleo.studies.scaling_report`` plots and writes
them up).

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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nucleo.studies.compare import RunRow

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


def by_group(rows: Sequence[RunRow]) -> dict[str, list[RunRow]]:
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
    for group, members in sorted(by_group(rows).items()):
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
