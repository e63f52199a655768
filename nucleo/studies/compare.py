"""Runs from MLflow as rows: parameters, tokens, compute, per-loss and per-kingdom metrics.

``collect`` reads finished training runs (those that logged ``derived.non_embedding_parameters``
and ``val/bits_per_base``; sweep parents and fit runs are skipped) from one or more
experiments, filtered by tags; ``table`` renders them as markdown or CSV for ``nucleo compare``;
``nucleo.studies.scaling`` fits laws to the same rows.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from nucleo.train import store

KINGDOM_PREFIX = "val/bits_per_base/"
#: the k-mer Markov floor a run logs beside its figures (``eval.floor``): the overall one is a
#: column; its per-kingdom and repeat figures (``val/floor/...``) stay in MLflow
FLOOR = "val/floor/bits_per_base"


@dataclass
class RunRow:
    """One finished training run. params: total; non_embedding: N of the scaling laws;
    tokens: D, training tokens seen; flops: C, training compute (nucleo.train.compute);
    bits: final validation bits per base; kingdoms: the same per kingdom; seconds: the run's
    wall clock in the store (start to end; NaN while it runs)."""

    run_id: str
    name: str
    experiment: str
    status: str
    arch: str
    losses: str
    params: int
    non_embedding: int
    tokens: float
    flops: float
    bits: float
    kingdoms: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    seconds: float = math.nan

    @property
    def group(self) -> str:
        """What a scaling law is fitted per: the architecture and the loss set."""
        return f"{self.arch} [{self.losses}]"


def parse_tags(items: list[str] | None) -> dict[str, str]:
    """``["nucleo.arch=hyena", ...]`` -> {"nucleo.arch": "hyena"}."""
    tags = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {item!r}: expected KEY=VALUE, e.g. nucleo.arch=hyena")
        tags[key] = value
    return tags


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def collect(
    uri: str,
    experiments: list[str] | None = None,
    tags: dict[str, str] | None = None,
    filter_string: str = "",
    statuses: tuple[str, ...] = ("FINISHED",),
) -> list[RunRow]:
    """Training runs of ``experiments`` (all when None) whose tags match ``tags``."""
    client = store.client(uri)
    found = client.search_experiments()
    by_name = {e.name: e for e in found}
    if experiments:
        missing = [name for name in experiments if name not in by_name]
        if missing:
            known = ", ".join(sorted(by_name)) or "none"
            raise ValueError(f"no MLflow experiment {missing} in {uri}; experiments: {known}")
        chosen = [by_name[name] for name in experiments]
    else:
        chosen = list(found)
    clauses = [f"tags.`{k}` = {_quote(v)}" for k, v in (tags or {}).items()]
    if filter_string:
        clauses.append(filter_string)
    names = {e.experiment_id: e.name for e in chosen}
    rows: list[RunRow] = []
    token = None
    while chosen:
        page = client.search_runs(
            list(names), " and ".join(clauses), max_results=1000, page_token=token
        )
        for run in page:
            row = _row(run, names[run.info.experiment_id])
            if row is not None and run.info.status in statuses:
                rows.append(row)
        token = page.token
        if not token:
            break
    rows.sort(key=lambda r: (r.arch, r.losses, r.non_embedding, r.tokens, r.name))
    return rows


def _row(run: Any, experiment: str) -> RunRow | None:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    if "derived.non_embedding_parameters" not in params or "val/bits_per_base" not in metrics:
        return None
    return RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        experiment=experiment,
        status=run.info.status,
        arch=tags.get("nucleo.arch", params.get("arch", "?")),
        losses=tags.get("nucleo.losses", params.get("losses", "?")),
        params=int(params.get("derived.parameters", 0)),
        non_embedding=int(params["derived.non_embedding_parameters"]),
        tokens=float(metrics.get("train/tokens", math.nan)),
        flops=float(metrics.get("train/flops", math.nan)),
        bits=float(metrics["val/bits_per_base"]),
        kingdoms={
            k[len(KINGDOM_PREFIX) :]: float(v)
            for k, v in metrics.items()
            if k.startswith(KINGDOM_PREFIX)
        },
        metrics=dict(metrics),
        tags=dict(tags),
        seconds=(run.info.end_time - run.info.start_time) / 1000
        if run.info.end_time and run.info.start_time
        else math.nan,
    )


def _si(value: float) -> str:
    """1.23e6 -> '1.23M'; NaN -> ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def columns(rows: list[RunRow]) -> list[str]:
    """Metric columns present in ``rows``: the Markov floor (when a run logged one),
    validation losses, then kingdoms."""
    losses = sorted(
        {
            k
            for r in rows
            for k in r.metrics
            if k.startswith("val/") and not k.startswith((KINGDOM_PREFIX, "val/floor/"))
            if k not in ("val/bits_per_base", "val/seconds")
        }
    )
    floor = [FLOOR] if any(FLOOR in r.metrics for r in rows) else []
    kingdoms = sorted({k for r in rows for k in r.kingdoms})
    return floor + losses + [KINGDOM_PREFIX + k for k in kingdoms]


def table(rows: list[RunRow], fmt: str = "md") -> str:
    """The rows as a markdown table (``md``: compact numbers) or CSV (``csv``: full values)."""
    extra = columns(rows)
    head = ["run", "arch", "losses", "params", "non_embedding", "tokens", "flops", "tokens_per_s"]
    head += ["val/bits_per_base", *extra]
    records = []
    for r in rows:
        values: list[Any] = [r.name, r.arch, r.losses, r.params, r.non_embedding, r.tokens, r.flops]
        values += [r.metrics.get("train/tokens_per_second", math.nan), r.bits]
        values += [r.metrics.get(k, math.nan) for k in extra]
        records.append(values)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(head)
        writer.writerows(records)
        return buffer.getvalue()
    if fmt != "md":
        raise ValueError(f"--format {fmt!r}: choose md or csv")
    short = [h.replace(KINGDOM_PREFIX, "") for h in head]
    lines = ["| " + " | ".join(short) + " |", "|" + "---|" * len(head)]
    for values in records:
        cells = [str(v) for v in values[:3]]
        cells += [_si(float(v)) for v in values[3:8]]
        cells += ["" if math.isnan(float(v)) else f"{float(v):.4f}" for v in values[8:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
