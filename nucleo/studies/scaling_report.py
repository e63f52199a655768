"""The scaling report: plots, the markdown report and its ``.json`` of fits, and the MLflow
``scaling-fit`` run, from the fits of ``nucleo.studies.scaling`` (kept apart from the fitting,
which needs neither matplotlib nor MLflow).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nucleo.studies.compare import RunRow, table
from nucleo.studies.scaling import GroupFit, Law, by_group, fit_groups, frontier

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
    groups = by_group(rows)
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
    for ax, xlabel in ((axes[0], "training compute C (FLOPs, nucleo.train.compute)"),
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
        "Training FLOPs come from nucleo.train.compute (analytic per layer type, 3 x forward, one "
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
