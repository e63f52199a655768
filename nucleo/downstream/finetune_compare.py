"""The pretrained-vs-scratch comparison: every task x (each export fine-tuned and probed, the
first export's architecture from scratch) over several seeds, as a markdown table with its JSON
and an MLflow parent run holding one child run per seed.

    nucleo finetune TASK... --export A --export B --compare --table table.md
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nucleo.downstream.finetune import FinetuneConfig, run_seeds, summarize, tracked_on_main
from nucleo.downstream.tasks import load_task
from nucleo.train.engine import setup_distributed
from nucleo.train.store import resolve_uri


def compare_settings(
    exports: Sequence[tuple[str, str]], scratch: bool = True
) -> list[tuple[str, str, str, str]]:
    """(label, export, init, mode) rows of the pretrained-vs-scratch comparison: each export
    fine-tuned and probed, plus (``scratch``) the first export's architecture from scratch
    (fine-tuned, and probed as a random-features baseline)."""
    rows = []
    for label, export in exports:
        rows.append((label, export, "pretrained", "full"))
        rows.append((label, export, "pretrained", "probe"))
    if not scratch:
        return rows
    first = exports[0][1]
    rows.append(("scratch", first, "scratch", "full"))
    rows.append(("scratch", first, "scratch", "probe"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: task, model, init, mode, seeds, then mean ± sd of each metric."""
    head = "| task | model | init | mode | seeds | accuracy | MCC | F1 | AUROC | train s/seed |"
    lines = [head, "|" + "---|" * 10]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    ordered = sorted(
        rows,
        key=lambda r: (tasks.index(r["task"]), r["init"] == "scratch", labels.index(r["label"]),
                       r["mode"]),
    )  # fmt: skip
    for r in ordered:
        s = r["summary"]
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("accuracy", "mcc", "f1", "auroc")]
        lines.append(
            f"| {r['task']} | {r['label']} | {r['init']} | {r['mode']} | {r['seeds']} | "
            + " | ".join(cells)
            + f" | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def compare(
    tasks: Sequence[str],
    exports: Sequence[tuple[str, str]],
    base: FinetuneConfig,
    out: str | Path | None = None,
    say: Any = print,
    scratch: bool = True,
) -> list[dict[str, Any]]:
    """Every task x compare_settings row over base.seeds; a markdown table (and JSON beside
    it) at ``out``; an MLflow parent run holding the table, one child run per seed.

    Rows already in ``out``'s JSON with the same task, model, init, mode and seeds are kept,
    not rerun: an interrupted comparison resumes, and a later one (another export,
    ``scratch=False``) adds its rows to the same table."""

    table: list[dict[str, Any]] = []
    if out is not None and Path(out).with_suffix(".json").is_file():
        table = json.loads(Path(out).with_suffix(".json").read_text()).get("rows", [])
    done = {(r["task"], r["label"], r["init"], r["mode"], r["seeds"]) for r in table}
    uri = resolve_uri(base.tracking_uri)
    tags = {"nucleo.kind": "finetune-compare"}
    dist = setup_distributed(base.engine())
    with tracked_on_main(dist, uri, base.experiment, "finetune-compare", tags) as (client, parent):
        if client is not None:
            client.log_param(parent, "tasks", ",".join(tasks))
            client.log_param(parent, "exports", ",".join(e for _, e in exports))
            client.log_param(parent, "seeds", ",".join(map(str, base.seeds)))
        for task_path in tasks:
            task = load_task(task_path)
            say(task.describe())
            for label, export, init, mode in compare_settings(exports, scratch):
                if (task.name, label, init, mode, len(base.seeds)) in done:
                    say(f"  {task.name} | {label} | {init} {mode}: in {out} already, kept")
                    continue
                cfg = FinetuneConfig(
                    **{
                        **asdict(base),
                        "task": task_path,
                        "export": export,
                        "init": init,
                        "mode": mode,
                        "label": label,
                        "layer": base.layer if mode == "probe" else -1,
                    }
                )
                results = run_seeds(cfg, task, say, parent)
                table.append(
                    {
                        "task": task.name,
                        "label": label,
                        "init": init,
                        "mode": mode,
                        "seeds": len(results),
                        "summary": summarize(results),
                        "per_seed": [asdict(r) for r in results],
                        "seconds": float(np.mean([r.train_seconds for r in results])),
                    }
                )
                if out is not None and dist.is_main:
                    _write_compare(out, table, tasks, exports, base)
        if client is not None:
            client.log_text(parent, format_table(table), "compare.md")
    if out is not None and dist.is_main:
        _write_compare(out, table, tasks, exports, base)
    return table


def _command_line() -> str:
    """This process's command as a user types it (``nucleo finetune ...`` rather than the path
    of nucleo's ``__main__``)."""
    program = Path(sys.argv[0]).name
    if program in ("__main__.py", "nucleo"):
        return " ".join(["nucleo", *sys.argv[1:]])
    return " ".join(["python", sys.argv[0], *sys.argv[1:]])


def _write_compare(
    out: str | Path,
    table: list[dict],
    tasks: Sequence[str],
    exports: Sequence[tuple[str, str]],
    base: FinetuneConfig,
) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_table(table) + "\n")
    record = {
        "command": _command_line(),
        "tasks": list(tasks),
        "exports": [list(e) for e in exports],
        "settings": {k: v for k, v in asdict(base).items() if k not in ("task", "export")},
        "rows": table,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
