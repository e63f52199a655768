"""Which layer of a pretrained model probes best? A linear probe (``nucleo finetune --mode probe
--layer L``) on the pooled states of every layer, per task.

    python experiments/layer_probe.py --export runs/pre-ce/export \
        data/tasks/kingdom data/tasks/coding_vs_intergenic

Layer 0 is the embedding, layer i the residual stream after block i, the last the final normed
states (``LanguageModel.hidden_states``). Each probe is ``nucleo.downstream.finetune``'s
(logistic regression on frozen mean-pooled states, test strands averaged with
``--rc-conjoin``), one seed: a pretrained probe does not depend on it. The interval is the
normal approximation of the test accuracy's 95% interval (n test windows). Writes
experiments/results/layers.md (.json) and layers.png. ``experiments/layers.sh`` runs it all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.report import RESULTS, header, run_record, write


def interval(accuracy: float, n: int) -> tuple[float, float]:
    """95% normal-approximation interval of an accuracy over n test examples."""
    half = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n, 1))
    return max(0.0, accuracy - half), min(1.0, accuracy + half)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        x = [r["layer"] for r in mine]
        y = [r["accuracy"] for r in mine]
        low = [r["accuracy"] - r["low"] for r in mine]
        high = [r["high"] - r["accuracy"] for r in mine]
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=task)
    ax.set_xlabel("layer (0: embedding; last: final states)")
    ax.set_ylabel("probe test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", help="task folders (nucleo tasks build)")
    parser.add_argument("--export", required=True, help="the pretrained export")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longer inputs are cut")
    parser.add_argument("--out", type=Path, default=RESULTS / "layers.md")
    args = parser.parse_args()

    from nucleo.downstream.finetune import FinetuneConfig, run_seeds
    from nucleo.downstream.tasks import load_task
    from nucleo.train.export import load_exported

    record = run_record()
    _model, _tok, meta = load_exported(args.export, weights=False)
    layers = int(meta["model"]["n_layers"])
    rows = []
    for path in args.tasks:
        task = load_task(path)
        n_test = len(task.splits["test"])
        for layer in range(layers + 1):
            cfg = FinetuneConfig(
                task=path, export=args.export, mode="probe", seeds=[0], rc_conjoin=True,
                max_tokens=args.max_tokens, layer=layer, device="cpu", out="runs/layer_probe",
                experiment="nucleo-layers",
            )  # fmt: skip
            (result,) = run_seeds(cfg, task)
            m = result.metrics
            low, high = interval(m["accuracy"], n_test)
            rows.append({"task": task.name, "layer": layer, "n_test": n_test, "low": low,
                         "high": high, **{k: float(v) for k, v in m.items()}})  # fmt: skip
    best = {
        t: max((r for r in rows if r["task"] == t), key=lambda r: r["accuracy"])["layer"]
        for t in dict.fromkeys(r["task"] for r in rows)
    }
    png = args.out.with_suffix(".png")
    plot(rows, png)
    lines = [
        "# Which layer probes best?",
        "",
        *header(record),
        "",
        f"Export `{args.export}`: {meta['arch']}, {layers} blocks "
        f"({meta.get('run_config', {}).get('losses', [])}); training: "
        f"{meta.get('trained') or 'not recorded'}. A linear probe per layer "
        "(`nucleo finetune --mode probe --layer L --rc-conjoin`, seed 0): layer 0 is the "
        f"embedding, {layers} the final states. 95% intervals: normal approximation over the "
        "test windows.",
        "",
        f"![accuracy by layer]({png.name})",
        "",
        "| task | layer | test n | accuracy (95% interval) | MCC | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **best**" if best[r["task"]] == r["layer"] else ""
        lines.append(
            f"| {r['task']} | {r['layer']}{mark} | {r['n_test']} | {r['accuracy']:.3f} "
            f"({r['low']:.3f}-{r['high']:.3f}) | {r['mcc']:.3f} | {r['auroc']:.3f} |"
        )
    write(args.out, lines, {"record": record, "export": args.export, "rows": rows, "best": best})
    print("\n".join(lines))
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
