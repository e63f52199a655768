"""experiments/results/study.md from the study's pieces (experiments/study.sh writes them):
the Markov floor, the isoFLOP fits, the ablation, its per-region and downstream results, the
repeat mask and the topology, each read from its own .json in experiments/results/, with the
hand-written discussion (experiments/study_notes.md) appended. A missing piece is named, not
invented: rerun experiments/study.sh to fill it.

    python experiments/study_report.py --out experiments/results/study.md
    python experiments/study_report.py --pick hyena     # "BASELINE_EXPORT BEST_EXPORT" (seed 0)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
NOTES = ROOT / "experiments" / "study_notes.md"
sys.path.insert(0, str(ROOT))  # nucleo, imported where a section needs it


def _load(name: str) -> Any | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(what: str, step: str) -> str:
    return f'*Not run yet: {what}. Run `STUDY_STEPS="{step}" experiments/study.sh`.*\n'


def best_variant(family: str, ablation: dict[str, Any]) -> str:
    """The variant with the lowest mean paired difference in overall bits per base."""
    variants = ablation.get(family, {})
    scored = {v: d["all bases"]["mean"] for v, d in variants.items() if "all bases" in d}
    if not scored:
        raise SystemExit(f"no ablation results for {family!r} in {RESULTS / 'ablation.json'}")
    return min(scored, key=scored.get)  # type: ignore[arg-type]


def pick(family: str) -> str:
    """``LABEL=EXPORT`` of the baseline (ce) and the best variant of ``family`` for every seed
    (``baseline-s0=... best-s0=... baseline-s1=...``): the downstream comparison pairs them by
    pretraining seed."""
    ablation = _load("ablation.json")
    if ablation is None:
        raise SystemExit("run the ablation first (experiments/results/ablation.json)")
    best = best_variant(family, ablation)
    from nucleo.studies.sweep import expand, load_spec

    points = expand(load_spec(ROOT / "experiments" / "sweeps" / "ablation_plan.yaml"))
    found = {}
    for p in points:
        if p.config.arch == family:
            found[p.config.tracking.tags["variant"], p.config.train.seed] = p.run_dir / "export"
    seeds = sorted({seed for _, seed in found})
    return " ".join(
        f"{label}-s{seed}={found[variant, seed]}"
        for seed in seeds
        for label, variant in (("baseline", "ce"), ("best", best))
    )


def downstream_section(family: str, best: str) -> str:
    """Best variant minus baseline in test MCC per task and mode, paired by pretraining seed."""
    table = _load(f"ablation_downstream_{family}.json")
    if table is None:
        return _missing(f"downstream MCC of {family}", "downstream")
    from nucleo.studies.ablation import paired

    mcc: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in table["rows"]:
        label, _, seed = row["label"].rpartition("-s")
        if label in ("baseline", "best") and seed.isdigit():
            mcc.setdefault((row["task"], row["mode"], label), {})[int(seed)] = row["summary"][
                "mcc"
            ][0]
    lines = [
        f"Downstream, {family}: `{best}` minus `ce` in test MCC, paired by pretraining seed "
        f"(one fine-tuning seed each; [ablation_downstream_{family}.md]"
        f"(ablation_downstream_{family}.md)).\n",
        "| task | mode | ce MCC | difference [95%] | per seed | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for task, mode in dict.fromkeys((t, m) for t, m, _ in mcc):
        base, other = mcc.get((task, mode, "baseline"), {}), mcc.get((task, mode, "best"), {})
        seeds = sorted(set(base) & set(other))
        if not seeds:
            continue
        d = paired([other[s] for s in seeds], [base[s] for s in seeds], lower_is_better=False)
        interval = "" if math.isnan(d.low) else f" [{d.low:+.3f}, {d.high:+.3f}]"
        per_seed = ", ".join(f"{x:+.3f}" for x in d.per_seed)
        lines.append(
            f"| {task} | {mode} | {d.baseline:.3f} | {d.mean:+.3f}{interval} | {per_seed} | "
            f"{d.verdict} |"
        )
    return "\n".join(lines) + "\n"


def floor_section() -> str:
    markov = _load("markov.json")
    if markov is None:
        return _missing("the k-mer Markov floor", "markov")
    by_order = markov["validation"]["bits_per_base"]
    orders = sorted(by_order, key=int)
    best = min(orders, key=lambda o: by_order[o]["all"])
    kingdoms = [k for k in by_order[best] if k != "all"]
    lines = [
        "Every network figure below has this floor beside it: Markov chains of order 0-10 fit on "
        "the same training split, scored on the same validation windows "
        "([markov.md](markov.md)).\n",
        "| order | " + " | ".join(orders) + " |",
        "|---|" + "---|" * len(orders),
        "| bits/base | " + " | ".join(f"{by_order[o]['all']:.4f}" for o in orders) + " |\n",
        f"Best overall: order {best}, {by_order[best]['all']:.4f} bits/base. Per kingdom at that "
        "order: " + ", ".join(f"{k} {by_order[best][k]:.3f}" for k in kingdoms) + ".\n",
    ]
    return "\n".join(lines)


def isoflop_section() -> str:
    fits = _load("isoflop.json")
    if fits is None:
        return _missing("the isoFLOP fits", "isoflop")
    lines = [
        "Five sizes per family at each budget, one run each, trained on the same data stream "
        "([isoflop.md](isoflop.md): every run, the parabolas and the intervals).\n",
        "| family | budget | N_opt [95%] | D_opt | D/N | bits/base at N_opt |",
        "|---|---|---|---|---|---|",
    ]
    for family, fit in fits.items():
        for c in fit["curves"]:
            if c["n_opt"] is None:
                lines.append(f"| {family} | {c['budget']:.0e} | no minimum | | | |")
                continue
            ci = c["n_ci"]
            interval = f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""
            flag = "" if c["inside"] else " (outside the sizes trained)"
            lines.append(
                f"| {family} | {c['budget']:.0e} | {c['n_opt']:.3g}{interval}{flag} | "
                f"{c['d_opt']:.3g} | {c['d_opt'] / c['n_opt']:.0f} | {c['bits_opt']:.4f} |"
            )
    lines += [
        "",
        "| family | a in N_opt ~ C^a [95%] | b in D_opt ~ C^b [95%] |",
        "|---|---|---|",
    ]
    for family, fit in fits.items():
        cells = []
        for key in ("a", "b"):
            e = fit[key]
            if e["value"] is None:
                cells.append("-")
            else:
                ci = e["ci"]
                cells.append(f"{e['value']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"| {family} | {cells[0]} | {cells[1]} |")
    lines.append("\n![isoFLOP curves](isoflop.png)\n")
    return "\n".join(lines)


def ablation_section() -> str:
    diffs = _load("ablation.json")
    if diffs is None:
        return _missing("the loss ablation", "ablation")
    lines = [
        "Each variant minus `ce` at equal training FLOPs, paired by seed, 95% t intervals "
        "([ablation.md](ablation.md): per kingdom and per region class too).\n",
        "| family | variant | all bases [95%] | repeats | non-repeats | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for family, variants in diffs.items():
        for variant, figures in variants.items():
            cells = []
            for figure in ("all bases", "repeats", "non-repeats"):
                d = figures.get(figure)
                cells.append(
                    "" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
                )
            verdict = _verdict(figures.get("all bases"))
            lines.append(f"| {family} | {variant} | {' | '.join(cells)} | {verdict} |")
    lines.append("\n![ablation forest plot](ablation.png)\n")
    if (RESULTS / "ablation_regions.md").is_file():
        lines.append(
            "Per region class, every ablation run beside the Markov floor on the same bases: "
            "[ablation_regions.md](ablation_regions.md).\n"
        )
    for family in diffs:
        lines.append(downstream_section(family, best_variant(family, diffs)))
    return "\n".join(lines)


def _verdict(d: dict[str, Any] | None) -> str:
    if d is None or d["low"] is None or math.isnan(d["low"]):
        return ""
    if d["high"] < 0:
        return "better"
    if d["low"] > 0:
        return "worse"
    return "not resolved"


def topology_section() -> str:
    topo = _load("data_stats_topology.json")
    if topo is None:
        return _missing("topology across species", "topology")
    lines = ["| window pairs from | ratio to the within-genome floor [95%] |", "|---|---|"]
    for level in topo["levels"].values():
        ci = level.get("interval") or []
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        lines.append(f"| {level['what']} | {level['ratio']:.2f}{interval} |")
    lines.append("\nFull section, matrices and dendrograms: [data_stats.md](data_stats.md).\n")
    return "\n".join(lines)


def report() -> str:
    parts = [
        "# The study: architecture, loss, data treatment and size for the compute\n",
        f"- written: {time.strftime('%Y-%m-%d %H:%M %Z')} by `python experiments/study_report.py`"
        " from the pieces `experiments/study.sh` writes (each links its command, machine and "
        "MLflow runs)\n",
        "- GPU-scale spec of the same study: "
        "[experiments/sweeps/isoflop_gpu.yaml](../sweeps/isoflop_gpu.yaml)\n",
        "## The floor: k-mer Markov models\n", floor_section(),
        "## Size for the compute: isoFLOP curves of every causal family\n", isoflop_section(),
        "## Which loss: the ablation\n", ablation_section(),
        "## Repeats\n",
        "[repeats.md](repeats.md): which corpus records carry a soft mask, and what dust adds.\n"
        if (RESULTS / "repeats.md").is_file() else _missing("the repeat mask report", "masked"),
        "## Topology across species\n", topology_section(),
    ]  # fmt: skip
    text = "\n".join(parts)
    if NOTES.is_file():
        text += "\n" + NOTES.read_text()
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "study.md"), help="report file")
    parser.add_argument("--pick", metavar="FAMILY", help="print the two exports to compare")
    args = parser.parse_args(argv)
    if args.pick:
        print(pick(args.pick))
        return 0
    Path(args.out).write_text(report())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
