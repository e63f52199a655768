"""Assemble experiments/results/downstream.md from what experiments/downstream.sh recorded:
the pretraining summaries, the fine-tuning comparison table, the generation reports, and the
hand-written discussion in experiments/downstream_notes.md.

    python experiments/downstream_report.py [--runs runs] [--out experiments/results/downstream.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.report import header, run_record, write  # noqa: E402
from nucleo.downstream.finetune_compare import format_table  # noqa: E402

MODELS = {"ce": "pre-ce", "ce+rc+cgr": "pre-ce+rc+cgr"}


def pretraining_rows(runs: Path) -> list[str]:
    lines = [
        "| model | losses | parameters | tokens | training FLOPs | wall time | tokens/s | "
        "val bits/base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, name in MODELS.items():
        path = runs / name / "summary.json"
        if not path.is_file():
            lines.append(f"| {label} | (not run: {path} missing) |||||||")
            continue
        s = json.loads(path.read_text())
        bits = (s.get("final_validation") or {}).get("val/bits_per_base", float("nan"))
        params = s.get("parameters", {})
        total = params.get("total", 0) if isinstance(params, dict) else params
        lines.append(
            f"| {name} | {label.replace('+', ',')} | {total:,} | {s.get('tokens', 0):,} | "
            f"{float(s.get('flops', 0)):.3g} | {float(s.get('train_seconds', 0)) / 60:.1f} min | "
            f"{float(s.get('tokens_per_second', 0)):,.0f} | {float(bits):.4f} |"
        )
    return lines


def deltas(rows: list[dict]) -> list[str]:
    """Pretrained minus scratch in MCC, like with like: full fine-tuning against scratch full
    fine-tuning, a probe against the probe of a random network. A difference within 2
    standard deviations of the seeds (the larger of the two rows') is called a tie."""
    out = [
        "| task | model | mode | MCC | scratch, same mode | difference | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        for r in rows:
            if r["task"] != task or r["init"] != "pretrained":
                continue
            base = next(
                (b for b in rows if b["task"] == task and b["init"] == "scratch"
                 and b["mode"] == r["mode"]),
                None,
            )  # fmt: skip
            if base is None:
                continue
            mean, sd = r["summary"]["mcc"]
            b_mean, b_sd = base["summary"]["mcc"]
            diff = mean - b_mean
            if abs(diff) <= 2 * max(sd, b_sd, 1e-9):
                verdict = "tie (within 2 sd)"
            else:
                verdict = "pretrained better" if diff > 0 else "scratch better"
            out.append(
                f"| {task} | {r['label']} | {r['mode']} | {mean:.3f} ± {sd:.3f} | "
                f"{b_mean:.3f} ± {b_sd:.3f} | {diff:+.3f} | {verdict} |"
            )
    return out


def generation_section(results: Path) -> list[str]:
    lines = []
    for name in MODELS.values():
        path = results / "generation" / name / "report.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        keys = list(next(iter(rows.values())))
        lines += [
            f"### {name}",
            "",
            f"{data['per_set']} sequences per set, first {data['length']} bases.",
            "",
            "| comparison | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for label, values in rows.items():
            lines.append(f"| {label} | " + " | ".join(f"{values[k]:.4f}" for k in keys) + " |")
        lines += ["", f"![CGR images: real, {name}, uniform random](generation/{name}/cgr.png)", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="experiments/results/downstream.md")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    results = out.parent
    table_json = results / "downstream_table.json"
    record = json.loads(table_json.read_text()) if table_json.is_file() else {"rows": []}
    lines = [
        "# Does pretraining help? Downstream tasks, pretrained vs scratch",
        "",
        *header(run_record()),
        "- the report is assembled from the runs; everything reproduces with "
        "`experiments/downstream.sh`",
        f"- fine-tuning command: `{record.get('command', '(none yet)')}`",
        f"- fine-tuning settings: `{json.dumps(record.get('settings', {}))}`",
        "",
        "## Pretraining (same budget for both loss sets)",
        "",
        *pretraining_rows(runs),
        "",
        "Wall time and tokens/s are not benchmarks: both runs shared the 2 cores with the "
        "fine-tuning runs of this study. Training FLOPs are counted analytically "
        "(`nucleo.train.compute`); `rc` runs the backbone twice per window.",
        "",
        "## Tasks, pretrained (full fine-tune, linear probe) vs scratch",
        "",
        "Mean ± sample standard deviation over the seeds; test split held out by record "
        "(kingdom), by genome (plasmid_vs_chromosome) or by species (coding_vs_intergenic); "
        "test predictions average both strands (`--rc-conjoin`). `scratch probe` is a linear "
        "probe on a randomly initialised network: the random-features baseline.",
        "",
        format_table(record["rows"]) if record["rows"] else "(no rows yet)",
        "",
        "### Pretrained minus scratch (MCC, same mode)",
        "",
        *deltas(record["rows"]),
        "",
        "## Generation: 400 bases continuing 100-base prompts from held-out bacteria",
        "",
        "Distances to held-out bacteria windows (lower is closer); `real vs real` is the noise "
        "floor, `uniform random` the ceiling.",
        "",
        *generation_section(results),
    ]
    notes = ROOT / "experiments" / "downstream_notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().rstrip(), ""]
    write(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
