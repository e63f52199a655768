"""``nucleo sweep | scaling | compare``: studies over many tracked runs.

nucleo sweep run SPEC.yaml [--slurm]          every point of a sweep (skips finished ones)
nucleo sweep status SPEC.yaml                 each point's state and result
nucleo scaling fit --experiment NAME          scaling laws, plots and a report from MLflow
nucleo scaling plan STUDY.yaml | isoflop ...  an isoFLOP study: its sweep, then its fits
nucleo ablation plan SPEC.yaml | report ...   a compute-matched loss ablation and its intervals
nucleo compare [--experiment NAME] [--tag k=v] [--format md|csv]   a table of runs
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from nucleo.cli.common import add_out, add_store, at_least


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from nucleo.studies.sweep import Sweep, load_spec

    spec = load_spec(args.spec)
    if args.launcher:
        spec.launcher = shlex.split(args.launcher)
    sweep = Sweep(spec)
    if args.slurm:
        sweep.submit_slurm(args.sbatch_arg or [], args.max_parallel)
        return 0
    failed = sweep.run(args.point, fail_fast=args.fail_fast, dry_run=args.dry_run)
    if not args.dry_run:
        print(sweep.table())
    return 1 if failed else 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from nucleo.studies.sweep import Sweep, load_spec

    print(Sweep(load_spec(args.spec)).table())
    return 0


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    import math
    import time

    from nucleo.core.machine import summary as machine
    from nucleo.studies.compare import collect, parse_tags
    from nucleo.studies.scaling_report import log_to_mlflow, run_fit
    from nucleo.train.store import resolve_uri

    uri = resolve_uri(args.tracking_uri, args.runs_root)
    tags = parse_tags(args.tag)
    if args.sweep:
        tags["nucleo.sweep"] = args.sweep
    rows = collect(uri, [args.experiment], tags)
    usable = [r for r in rows if math.isfinite(r.flops) and math.isfinite(r.tokens)]
    out = Path(args.out)
    command = f"nucleo scaling fit --experiment {args.experiment} --out {args.out}"
    for flag, value in (("--sweep", args.sweep), ("--notes", args.notes)):
        command += f" {flag} {value}" if value else ""
    command += "".join(f" --tag {t}" for t in args.tag or [])
    command += f" --bootstrap {args.bootstrap} --seed {args.seed}"
    header = {
        "command": f"`{command}`",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "MLflow": f"experiment `{args.experiment}` in `{uri}`" + (f", tags {tags}" if tags else ""),
        "runs": f"{len(usable)} finished training runs"
        + (
            f" ({len(rows) - len(usable)} without recorded compute left out)"
            if len(usable) < len(rows)
            else ""
        ),
        "fit": f"Huber (delta 1e-3) in log space, L-BFGS from a grid of starts, "
        f"{args.bootstrap} bootstrap resamples (seed {args.seed})",
    }
    notes = Path(args.notes).read_text() if args.notes else ""
    fits, figures = run_fit(usable, out, header, args.bootstrap, args.seed, notes)
    for fit in fits:
        law = fit.law_n
        text = f"alpha {law.params['alpha']:.3f}" if law else "; ".join(fit.errors)
        print(f"{fit.group}: {fit.runs} runs, L(N) {text}")
    if not args.no_log:
        run_id = log_to_mlflow(
            uri, args.experiment, fits, [out, out.with_suffix(".json"), *figures]
        )
        print(f"logged to MLflow run {run_id}")
    print(f"wrote {out}")
    return 0


def cmd_scaling_plan(args: argparse.Namespace) -> int:
    import yaml

    from nucleo.core.machine import summary as machine
    from nucleo.studies import isoflop

    spec = isoflop.load_study(args.study)
    print(f"measuring {sum(len(v) for v in spec.families.values())} shapes ...", flush=True)
    rungs = isoflop.measure_rungs(spec, args.time_steps)
    runs = isoflop.plan(spec, rungs)
    out = Path(args.out)
    command = f"nucleo scaling plan {args.study} --out {args.out}"
    if args.time_steps:
        command += f" --time-steps {args.time_steps} --overhead {args.overhead:g}"
    header = (
        f"# Planned by: {command}\n# {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}\n"
        f"# {len(runs)} runs x {len(spec.seeds)} seed(s); run with: nucleo sweep run {out}\n"
    )
    text = yaml.safe_dump(isoflop.sweep_spec(spec, runs), sort_keys=False, width=100)
    out.write_text(header + text)
    table = isoflop.plan_table(runs, args.overhead)
    print(table)
    hours = isoflop.estimated_hours(runs, len(spec.seeds), args.overhead)
    if hours is not None:
        print(f"estimated wall clock here: {hours:.1f} h ({args.overhead:g} s a run for start-up "
              "and validation)")  # fmt: skip
    if args.table:
        Path(args.table).write_text(table)
    print(f"wrote {out} ({len(runs)} points)")
    return 0


FLOOR_HELP = "a nucleo baseline markov .json: its best order is shown beside"


def _floor(path: str | None) -> tuple[str, float | None]:
    """(report line, bits/base) of a Markov floor .json (``--floor``), or ("", None)."""
    if not path:
        return "", None
    from nucleo.studies.markov import floor_line

    line, bits = floor_line(path)
    return line + "\n", bits


def cmd_scaling_isoflop(args: argparse.Namespace) -> int:
    import json
    import math

    from nucleo.core.machine import summary as machine
    from nucleo.studies import isoflop_fit
    from nucleo.studies.compare import collect
    from nucleo.train.store import resolve_uri

    uri = resolve_uri(args.tracking_uri, args.runs_root)
    tags = {"nucleo.sweep": args.sweep} if args.sweep else {}
    rows = collect(uri, [args.experiment], tags)
    if args.plan:  # runs of earlier plans (other shapes, batches) stay out of the fits
        from nucleo.studies.sweep import expand, load_spec

        names = {p.name for p in expand(load_spec(args.plan))}
        rows = [r for r in rows if r.name in names]
    fits = isoflop_fit.fit_all(rows, args.bootstrap, args.seed, args.seed_noise)
    if not fits:
        raise ValueError(
            f"no finished run with a {isoflop_fit.BUDGET_TAG!r} tag in experiment "
            f"{args.experiment!r} of {uri}: run the plan first (nucleo sweep run PLAN.yaml)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    floor_text, floor = _floor(args.floor)
    figure = isoflop_fit.plot(fits, out.with_suffix(".png"), floor)
    command = f"nucleo scaling isoflop --experiment {args.experiment} --out {args.out}"
    command += f" --sweep {args.sweep}" if args.sweep else ""
    command += f" --floor {args.floor}" if args.floor else ""
    command += f" --plan {args.plan}" if args.plan else ""
    command += f" --bootstrap {args.bootstrap} --seed {args.seed}"
    command += f" --seed-noise {args.seed_noise:g}" if args.seed_noise else ""
    runs = sum(len(c.runs) for f in fits for c in f.curves)
    hours = sum(r.seconds for f in fits for c in f.curves for r in c.runs
                if math.isfinite(r.seconds)) / 3600  # fmt: skip
    text = (
        f"# IsoFLOP fits\n\n- command: `{command}`\n- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
        f"- machine: {machine()}\n- MLflow: experiment `{args.experiment}` in `{uri}`"
        f"{f', tags {tags}' if tags else ''}\n- runs: {runs} finished runs with a budget tag, "
        f"{hours:.1f} h of wall clock in all (start to end of each run, as the store has them)\n"
        f"- fit: a parabola in log10 N per budget; {args.bootstrap} residual-bootstrap "
        f"resamples (seed {args.seed})"
        + (f", noise topped up to {args.seed_noise:g} bits/base (seed-to-seed)"
           if args.seed_noise else "")
        + f"; see nucleo/studies/isoflop_fit.py\n{floor_text}\n"
        "## Loss-optimal size per budget\n\n" + isoflop_fit.curve_table(fits)
        + "\n## Compute-optimal exponents\n\n" + isoflop_fit.exponent_table(fits)
        + f"\n![isoFLOP curves]({figure.name})\n"
    )  # fmt: skip
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(isoflop_fit.to_json(fits), indent=1) + "\n")
    print(isoflop_fit.exponent_table(fits))
    print(f"wrote {out}, {out.with_suffix('.json')} and {figure}")
    return 0


def cmd_ablation_plan(args: argparse.Namespace) -> int:
    import yaml

    from nucleo.core.machine import summary as machine
    from nucleo.studies import ablation

    spec = ablation.load_ablation(args.spec)
    planned = ablation.plan(spec)
    out = Path(args.out)
    header = (
        f"# Planned by: nucleo ablation plan {args.spec} --out {args.out}\n"
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}\n"
        f"# {len(planned)} runs x {len(spec.seeds)} seeds at {spec.budget:.3g} FLOPs each; "
        f"run with: nucleo sweep run {out}\n"
    )
    out.write_text(header + yaml.safe_dump(ablation.sweep_spec(spec, planned), sort_keys=False))
    print("| family | variant | backbone passes | FLOPs/token | steps |\n|---|---|---|---|---|")
    for p in planned:
        print(f"| {p.family} | {p.variant} | {p.passes} | {p.flops_per_token:.3g} | {p.steps} |")
    print(f"wrote {out} ({len(planned) * len(spec.seeds)} runs)")
    return 0


def cmd_ablation_report(args: argparse.Namespace) -> int:
    import json

    from nucleo.core.machine import summary as machine
    from nucleo.studies import ablation
    from nucleo.studies.compare import collect
    from nucleo.train.store import resolve_uri

    uri = resolve_uri(args.tracking_uri, args.runs_root)
    tags = {"nucleo.sweep": args.sweep} if args.sweep else {}
    rows = [r for r in collect(uri, [args.experiment], tags) if ablation.VARIANT_TAG in r.tags]
    if not rows:
        raise ValueError(
            f"no finished run with a {ablation.VARIANT_TAG!r} tag in experiment "
            f"{args.experiment!r} of {uri}: run the plan first (nucleo sweep run PLAN.yaml)"
        )
    variants = {r.tags[ablation.VARIANT_TAG] for r in rows}
    if args.baseline not in variants:
        raise ValueError(f"--baseline {args.baseline!r}: no such variant; found {sorted(variants)}")
    extra: dict[str, dict[str, float]] = {}
    for path in args.regions or []:
        for name, values in ablation.region_figures(json.loads(Path(path).read_text())).items():
            extra.setdefault(name, {}).update(values)
    diffs = ablation.differences(rows, args.baseline, extra)
    floor_text, _ = _floor(args.floor)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = ablation.forest(diffs, out.with_suffix(".png"), args.baseline)
    labels = [label for label, _ in ablation.metric_keys(rows)]
    main_figures = [f for f in labels if f in ("all bases", "repeats", "non-repeats")]
    kingdoms = [f for f in labels if f not in main_figures]
    regions = sorted({f for values in extra.values() for f in values})
    command = f"nucleo ablation report --experiment {args.experiment} --out {args.out}"
    command += f" --sweep {args.sweep}" if args.sweep else ""
    command += f" --baseline {args.baseline}"
    command += f" --floor {args.floor}" if args.floor else ""
    command += "".join(f" --regions {r}" for r in args.regions or [])
    seeds = sorted({ablation.seed_of(r) for r in rows})
    hours = sum(r.seconds for r in rows if r.seconds == r.seconds) / 3600  # NaN: still running
    text = (
        f"# Loss ablation\n\n- command: `{command}`\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n- machine: {machine()}\n"
        f"- MLflow: experiment `{args.experiment}` in `{uri}`\n"
        f"- runs: {len(rows)} ({len(variants)} variants, seeds {seeds}; {hours:.1f} h of wall "
        "clock in all); differences are "
        f"variant - {args.baseline} in validation bits per base, paired by seed (negative: "
        "better), with 95% Student t intervals over seeds\n" + floor_text + "\n"
        "## Overall, repeats and the rest\n\n" + ablation.table(diffs, main_figures)
        + f"\n![forest plot]({figure.name})\n"
    )  # fmt: skip
    if kingdoms:
        text += "\n## Per kingdom\n\n" + ablation.table(diffs, kingdoms)
    if regions:
        text += "\n## Per region class (nucleo evaluate)\n\n" + ablation.table(diffs, regions)
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    out.write_text(text)
    payload = {
        family: {
            variant: {f: vars(d) for f, d in values.items()}
            for variant, values in variants_.items()
        }
        for family, variants_ in diffs.items()
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    print(ablation.table(diffs, main_figures[:1]))
    print(f"wrote {out}, {out.with_suffix('.json')} and {figure}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from nucleo.studies.compare import collect, parse_tags, table
    from nucleo.train.store import resolve_uri

    uri = resolve_uri(args.tracking_uri, args.runs_root)
    statuses = ("FINISHED", "RUNNING", "KILLED", "FAILED") if args.all else ("FINISHED",)
    rows = collect(uri, args.experiment, parse_tags(args.tag), args.filter or "", statuses)
    text = table(rows, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(rows)} runs to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def add_commands(sub: Any) -> None:
    """Register ``sweep``, ``scaling``, ``ablation`` and ``compare``."""
    sweep = sub.add_parser("sweep", help="run a grid of configs as one tracked sweep")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True)
    p = sweep_sub.add_parser("run", help="run (or resume) every point, or submit them to Slurm")
    p.add_argument("spec", help="sweep spec (YAML; see experiments/sweeps/)")
    p.add_argument("--point", type=at_least(0), action="append", help="only point N (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed point")
    p.add_argument("--launcher", help="how to start a point, e.g. 'deepspeed launch/pretrain.py'")
    p.add_argument("--slurm", action="store_true", help="submit a job array (sweep.sbatch)")
    p.add_argument(
        "--sbatch-arg", action="append", metavar="OPTION", help="extra sbatch option (repeatable)"
    )
    p.add_argument(
        "--max-parallel", type=at_least(1), help="Slurm: at most this many points at once"
    )
    p.set_defaults(func=cmd_sweep_run)
    p = sweep_sub.add_parser("status", help="each point's state and final bits per base")
    p.add_argument("spec", help="sweep spec (YAML)")
    p.set_defaults(func=cmd_sweep_status)

    scaling = sub.add_parser("scaling", help="scaling laws from a tracked sweep")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True)
    p = scaling_sub.add_parser("fit", help="fit L(N) and L(N, D), plot, write a report")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the runs")
    p.add_argument("--sweep", help="only the runs of this sweep (tag nucleo.sweep)")
    add_out(p, "report file (markdown); plots and .json beside it", default="scaling.md")
    p.add_argument("--bootstrap", type=at_least(0), default=200, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--notes", help="markdown file appended to the report (the discussion)")
    p.add_argument("--no-log", action="store_true", help="do not log the fit to MLflow")
    add_store(p)
    p.set_defaults(func=cmd_scaling_fit)
    p = scaling_sub.add_parser(
        "plan", help="lay out an isoFLOP study (sizes x token counts per budget) as a sweep"
    )
    p.add_argument("study", help="isoFLOP study spec (YAML; see experiments/sweeps/isoflop.yaml)")
    add_out(p, "the sweep spec to write (YAML)", default="isoflop_plan.yaml")
    p.add_argument(
        "--time-steps", type=at_least(0), default=0,
        help="time this many training steps of each shape here to estimate the wall clock",
    )  # fmt: skip
    p.add_argument(
        "--overhead", type=float, default=30.0, help="seconds a run spends outside its steps"
    )
    p.add_argument("--table", help="also write the plan's markdown table here")
    p.set_defaults(func=cmd_scaling_plan)
    p = scaling_sub.add_parser(
        "isoflop", help="fit an isoFLOP sweep: N_opt per budget, N_opt ~ C^a, D_opt ~ C^b"
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment of the runs")
    p.add_argument("--sweep", help="only the runs of this sweep (tag nucleo.sweep)")
    add_out(p, "report file (markdown); .json and .png beside it", default="isoflop.md")
    p.add_argument("--bootstrap", type=at_least(0), default=1000, help="resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--notes", help="markdown file appended to the report (the discussion)")
    p.add_argument("--floor", metavar="JSON", help=FLOOR_HELP)
    p.add_argument("--plan", help="only the runs of this plan's points (its sweep spec YAML)")
    p.add_argument(
        "--seed-noise", type=float, default=0.0, metavar="BITS",
        help="seed-to-seed SD of bits/base: resamples carry at least this much noise",
    )  # fmt: skip
    add_store(p)
    p.set_defaults(func=cmd_scaling_isoflop)
    ablation = sub.add_parser("ablation", help="compute-matched loss ablations with intervals")
    ablation_sub = ablation.add_subparsers(dest="ablation_command", required=True)
    p = ablation_sub.add_parser("plan", help="an ablation spec -> a sweep at equal FLOPs")
    p.add_argument("spec", help="ablation spec (YAML; see experiments/sweeps/ablation.yaml)")
    add_out(p, "the sweep spec to write (YAML)", default="ablation_plan.yaml")
    p.set_defaults(func=cmd_ablation_plan)
    p = ablation_sub.add_parser("report", help="paired differences with 95%% intervals")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the runs")
    p.add_argument("--sweep", help="only the runs of this sweep (tag nucleo.sweep)")
    p.add_argument("--baseline", default="ce", help="the variant to compare with (default: ce)")
    p.add_argument("--regions", action="append", metavar="JSON",
                   help="a nucleo evaluate .json of the runs' exports (repeatable)")  # fmt: skip
    add_out(p, "report file (markdown); .json and forest plot .png beside it",
            default="ablation.md")  # fmt: skip
    p.add_argument("--notes", help="markdown file appended to the report (the discussion)")
    p.add_argument("--floor", metavar="JSON", help=FLOOR_HELP)
    add_store(p)
    p.set_defaults(func=cmd_ablation_report)
    p = sub.add_parser("compare", help="a table of tracked runs (markdown or CSV)")
    p.add_argument("--experiment", action="append", help="MLflow experiment (repeatable; all)")
    p.add_argument("--filter", help='an MLflow filter, e.g. "metrics.`val/bits_per_base` < 1.9"')
    p.add_argument("--format", choices=("md", "csv"), default="md", help="table format")
    p.add_argument("--all", action="store_true", help="also unfinished runs")
    add_out(p, "table file to write (default: stdout)")
    add_store(p)
    p.set_defaults(func=cmd_compare)
