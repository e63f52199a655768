"""Where a model puts its capacity: bits per base by region class, from annotated records.

    nucleo evaluate --model runs/a --model runs/b --shards data/offline/shards \\
        --out experiments/results/regions.md [--markov floor.npz --markov-order 5]

Each base of an annotated record gets one class (``classify``), and a causal model's per-base
negative log-likelihood (``base_nats``) is summed per class, per repeat flag and per kingdom.
The classes, their precedence where features overlap, and which records are read (a shard
set's ``val`` split, or annotated files): ``nucleo.downstream.region_classes``.

**Repeats** cross the classes: a base is a repeat when the FASTA soft-masks it (lower case, as
RefSeq's eukaryotic genomes mark WindowMasker's repeats; GenBank records are never masked).
Every class is reported on all its bases, with the repeat and non-repeat bases of every class
alongside (``Tally.rows``: ``repeat`` all / repeat / non-repeat).

**Windows**: each record is cut into windows of the model's training length (``--window``),
every ``--stride`` tokens (default: the window, no overlap), as ``nucleo score`` cuts them
(``inference.windows``): each token is scored once, in the first window that reaches it, and
the first token of a window is context only (a record's first base is never scored; with
consecutive windows no window's first base is). ``max_bases_per_kingdom`` bounds the work:
each kingdom's budget is shared among its records by length, and a record over its share is
scored in evenly spaced windows (whole windows, so every scored base keeps the context the
model was trained with). Bases that are N are not counted. For k-mer and BPE tokenizers a
token's nats are spread evenly over the bases it covers.

**A floor**: any object with ``nats(seq: bytes, order: int) -> [len(seq)]`` per-base nats (NaN
at N), such as ``data_pipeline.markov.MarkovModel``, is scored on the same bases as each
network (each window's bases with ``order`` bases of context before them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from data_pipeline.readers import read_sequences
from nucleo.core.progress import duration, rate
from nucleo.downstream.classifier import batches
from nucleo.downstream.inference import token_nats, windows
from nucleo.downstream.region_classes import CLASSES, CODE, LABELS, Target, classify

#: the repeat flags of ``Tally.rows``
REPEATS = ("all", "repeat", "non-repeat")


class Floor(Protocol):
    """A reference model scored beside the networks (data_pipeline.markov.MarkovModel)."""

    def nats(self, seq: bytes, order: int) -> np.ndarray: ...


@dataclass
class Network:
    """A causal export to evaluate, with the windows it is read in."""

    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    window: int
    stride: int | None
    arch: str


def as_network(
    path: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    meta: dict[str, Any],
    window: int | None = None,
    stride: int | None = None,
    name: str = "",
    what: str = "",
) -> Network:
    """A loaded export (``load_exported``'s model, tokenizer and config.json) as a Network;
    ``window`` defaults to the length it was trained on, ``name`` to its run's name. A
    bidirectional model is refused (``what`` names it in the error): it has no next-token
    likelihood, and nucleo has no pseudo-likelihood over whole sequences."""
    if not meta.get("causal", True):
        raise ValueError(
            f"{what or path}: a {meta['arch']} model trained bidirectionally has no next-token "
            "likelihood; nucleo evaluate needs a causal model"
        )
    trained = meta.get("run_config", {}).get("data", {}).get("seq_len")
    size = int(window or trained or meta["model"].get("max_len") or 1024)
    windows(0, size, stride)  # checks the stride
    name = name or (path.parent.name if path.name == "export" else path.name)
    return Network(name, path, model, tokenizer, size, stride, meta["arch"])


def load_network(
    spec: str | Path,
    device: torch.device,
    window: int | None = None,
    stride: int | None = None,
) -> Network:
    """A Network from ``[LABEL=]PATH``: an export (config.json) or a run folder (its export/),
    labelled LABEL or its run's name (``as_network``)."""
    from nucleo.train.export import load_exported

    text = str(spec)
    label, where = text.split("=", 1) if "=" in text and not Path(text).exists() else ("", text)
    path = Path(where)
    if (path / "export" / "config.json").is_file():
        path = path / "export"
    elif not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {where}: not an export (config.json) or a run folder with "
            "export/config.json (make one with nucleo export)"
        )
    model, tokenizer, meta = load_exported(path, device)
    return as_network(path, model, tokenizer, meta, window, stride, label, f"--model {where}")


def chosen_windows(
    n_tokens: int, window: int, stride: int | None, budget_tokens: float
) -> list[tuple[int, int, int]]:
    """(start, stop, owned) of the windows (``inference.windows``) to score in a record of
    ``n_tokens``: all of them when they score at most ``budget_tokens``, else evenly spaced
    ones that score about that many."""
    spans = windows(n_tokens, window, stride)
    scored = [stop - start - max(owned, 1) for start, stop, owned in spans]
    if sum(scored) <= budget_tokens:
        return spans
    keep = max(1, math.ceil(budget_tokens / (sum(scored) / len(spans))))
    picks = np.unique(np.round(np.linspace(0, len(spans) - 1, keep)).astype(int))
    return [spans[i] for i in picks]


def base_nats(
    network: Network,
    seq: bytes,
    batch: int,
    device: torch.device,
    budget: float | None = None,
    floor: tuple[Floor, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """([len(seq)] float64 nats of each base given the tokens before it in its window, NaN
    where not scored (context, N, windows not chosen); the same for ``floor`` = (model, order)
    on the bases the network scored, or None). ``seq``: upper-case bases, read in the windows
    ``chosen_windows`` picks for ``budget`` bases (None: all). A token's nats are spread
    evenly over its bases."""
    tok = network.tokenizer
    ids = np.asarray(tok.encode(seq))
    width = np.asarray(tok.bases_per_token)[ids].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(width)])
    if offsets[-1] != len(seq):
        raise ValueError(f"{network.name}: the {tok.name} tokenizer's tokens cover "
                         f"{offsets[-1]} of {len(seq)} bases")  # fmt: skip
    tokens_budget = math.inf if budget is None else budget * len(ids) / max(len(seq), 1)
    spans = chosen_windows(len(ids), network.window, network.stride, tokens_budget)
    out = np.full(len(seq), np.nan)
    pieces = [ids[start:stop] for start, stop, _ in spans]
    order = np.arange(len(spans))
    for rows, tokens, mask in batches(pieces, order, batch, tok.pad_id, device):
        nats = token_nats(network.model, tokens, mask).cpu().numpy()
        for r, row in enumerate(rows):
            start, stop, owned = spans[row]
            first = start + max(owned, 1)  # the first token scored
            values = nats[r, first - start - 1 : stop - start - 1] / width[first:stop]
            out[offsets[first] : offsets[stop]] = np.repeat(values, width[first:stop])
    out[np.frombuffer(seq, np.uint8) == ord("N")] = np.nan
    if floor is None:
        return out, None
    model, k = floor
    low = np.full(len(seq), np.nan)
    for start, stop, owned in spans:
        lo, hi = offsets[start + max(owned, 1)], offsets[stop]
        context = max(0, lo - k)
        low[lo:hi] = np.asarray(model.nats(seq[context:hi], k), np.float64)[lo - context :]
    low[np.isnan(out)] = np.nan
    return out, low


class Tally:
    """Sums of nats and counts of bases per (kingdom, class, repeat flag)."""

    def __init__(self, kingdoms: Sequence[str]) -> None:
        self.kingdoms = list(kingdoms)
        self.nats = np.zeros((len(kingdoms), len(CLASSES), 2))
        self.bases = np.zeros((len(kingdoms), len(CLASSES), 2), np.int64)

    def add(self, kingdom: str, classes: np.ndarray, repeat: np.ndarray, nats: np.ndarray) -> int:
        """Adds the bases whose ``nats`` are finite; returns how many."""
        keep = np.isfinite(nats)
        cell = classes[keep].astype(np.int64) * 2 + repeat[keep]
        k = self.kingdoms.index(kingdom)
        size = len(CLASSES) * 2
        self.nats[k] += np.bincount(cell, nats[keep], size).reshape(-1, 2)
        self.bases[k] += np.bincount(cell, minlength=size).reshape(-1, 2)
        return int(keep.sum())

    def cell(self, kingdom: str, klass: str, repeat: str) -> tuple[int, float]:
        """(bases, nats) of a kingdom (or ``all``), a class (or ``all``), a repeat flag."""
        k = slice(None) if kingdom == "all" else self.kingdoms.index(kingdom)
        c = slice(None) if klass == "all" else CODE[klass]
        r = {"all": slice(None), "repeat": 1, "non-repeat": 0}[repeat]
        return int(self.bases[k, c, r].sum()), float(self.nats[k, c, r].sum())

    def rows(self) -> list[dict[str, Any]]:
        """Every (kingdom or all, class or all, repeat flag) with bases, nats and bits/base."""
        out = []
        for kingdom in [*self.kingdoms, "all"]:
            for klass in [*CLASSES, "all"]:
                for repeat in REPEATS:
                    bases, nats = self.cell(kingdom, klass, repeat)
                    bits = nats / bases / math.log(2) if bases else None
                    out.append(
                        {
                            "kingdom": kingdom,
                            "class": klass,
                            "repeat": repeat,
                            "bases": bases,
                            "nats": nats,
                            "bits_per_base": bits,
                        }
                    )
        return out


@dataclass
class Report:
    """What ``evaluate`` found: per network its Tally (and its floor's), and the settings."""

    kingdoms: list[str]
    networks: list[dict[str, Any]]
    tallies: list[Tally]
    floors: list[Tally | None]
    records: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        models = []
        for info, tally, floor in zip(self.networks, self.tallies, self.floors, strict=True):
            entry = {**info, "rows": tally.rows()}
            if floor is not None:
                entry["floor_rows"] = floor.rows()
            models.append(entry)
        return {
            "settings": self.settings,
            "classes": LABELS,
            "kingdoms": self.kingdoms,
            "records": self.records,
            "models": models,
        }

    def markdown(self) -> str:
        s = self.settings
        lines = [
            "# Bits per base by region class",
            "",
            *([f"    {s['command']}", ""] if s["command"] else []),
            f"{s['date']}; {s['machine']}; {s['seconds']} s.",
            "",
            "Cells: bits per base (bases counted). Classes by precedence where features overlap "
            "(CDS > rRNA > tRNA > other ncRNA > UTR > intron > other feature > intergenic; "
            "README, `nucleo evaluate`); repeat = soft-masked in the FASTA, across classes. "
            f"Windows of each model's length, every stride tokens; at most "
            f"{s['max_bases_per_kingdom']:,} bases per kingdom, in evenly spaced windows.",
            "",
        ]
        floor_name = str(s.get("floor"))
        series = []  # (name, tally) of every network and its floor
        for info, tally, floor in zip(self.networks, self.tallies, self.floors, strict=True):
            title = f"{info['name']} ({info['arch']}, window {info['window']}"
            title += f", stride {info['stride']})" if info["stride"] else ")"
            by_kingdom = [(k, tally, k) for k in [*self.kingdoms, "all"]]
            lines += [f"## {title}", "", *self._table(by_kingdom), ""]
            series.append((info["name"], tally))
            if floor is not None:
                by_kingdom = [(k, floor, k) for k in [*self.kingdoms, "all"]]
                lines += [f"### {floor_name} on the same bases", "", *self._table(by_kingdom), ""]
                series.append((f"{floor_name} ({info['name']}'s bases)", floor))
        if len(series) > 1:
            side = [(name, tally, "all") for name, tally in series]
            lines += ["## Side by side (all kingdoms)", "", *self._table(side), ""]
        lines += ["## Records", "", "| kingdom | record | file | length | scored bases |",
                  "|---|---|---|---:|---:|"]  # fmt: skip
        for r in self.records:
            lines.append(f"| {r['kingdom']} | {r['record']} | {Path(r['file']).name} | "
                         f"{r['length']:,} | {r['scored_bases']:,} |")  # fmt: skip
        return "\n".join(lines) + "\n"

    @staticmethod
    def _table(columns: list[tuple[str, Tally, str]]) -> list[str]:
        """A markdown table: a row per class (those with bases), then all classes, repeat and
        non-repeat; a column per (header, tally, kingdom or ``all``)."""
        rows = [(LABELS[c], c, "all") for c in CLASSES] + [
            ("all classes", "all", "all"),
            ("repeat (soft-masked)", "all", "repeat"),
            ("non-repeat", "all", "non-repeat"),
        ]
        out = ["| class | " + " | ".join(c[0] for c in columns) + " |"]
        out.append("|---|" + "---:|" * len(columns))
        for label, klass, repeat in rows:
            cells = []
            for _, tally, kingdom in columns:
                bases, nats = tally.cell(kingdom, klass, repeat)
                cells.append(f"{nats / bases / math.log(2):.3f} ({_short(bases)})" if bases
                             else "–")  # fmt: skip
            if klass != "all" and all(c == "–" for c in cells):
                continue
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        return out

    def plot(self, path: str | Path) -> None:
        """Grouped bars: a panel per kingdom (and all), a group per class, a bar per network
        (and the first network's floor, grey); the axis spans the values (bits per base of
        DNA models sit just under 2), a dotted line at 2 bits (uniform over ACGT)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [*self.kingdoms, "all"]
        present = [c for c in CLASSES if self.tallies[0].cell("all", c, "all")[0]]
        series = [(n["name"], t) for n, t in zip(self.networks, self.tallies, strict=True)]
        if self.floors[0] is not None:
            series.append((str(self.settings.get("floor")), self.floors[0]))
        bits = np.full((len(panels), len(series), len(present)), np.nan)
        for p, kingdom in enumerate(panels):
            for i, (_, tally) in enumerate(series):
                for c, klass in enumerate(present):
                    bases, nats = tally.cell(kingdom, klass, "all")
                    bits[p, i, c] = nats / bases / math.log(2) if bases else np.nan
        low = math.floor((np.nanmin(bits, initial=2.0) - 0.05) * 10) / 10
        high = max(2.0, np.nanmax(bits, initial=2.0)) + 0.03
        size = (max(8.0, 1.1 * len(present)), 2.4 * len(panels))
        fig, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False, sharex=True)
        width = 0.8 / len(series)
        for p, (ax, kingdom) in enumerate(zip(axes[:, 0], panels, strict=True)):
            for i, (name, _) in enumerate(series):
                grey = self.floors[0] is not None and i == len(series) - 1
                x = np.arange(len(present)) + (i - (len(series) - 1) / 2) * width
                ax.bar(x, bits[p, i], width, label=name, color="0.6" if grey else None)
            ax.axhline(2.0, color="0.3", lw=0.6, ls=":")
            ax.set_ylim(low, high)
            ax.set_ylabel("bits / base")
            ax.set_title(kingdom, fontsize=10, loc="left")
        labels = [LABELS[c] for c in present]
        axes[-1, 0].set_xticks(range(len(present)), labels, rotation=30, ha="right")
        axes[0, 0].legend(fontsize=8, ncol=min(4, len(series)))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, out: str | Path) -> list[Path]:
        """Writes ``out`` (markdown), and the .json and .png beside it."""
        md = Path(out)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(self.markdown())
        md.with_suffix(".json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        self.plot(md.with_suffix(".png"))
        return [md, md.with_suffix(".json"), md.with_suffix(".png")]


def _short(n: int) -> str:
    return rate(n) if n >= 1000 else str(n)


def evaluate(
    networks: Sequence[Network],
    targets: Sequence[Target],
    device: torch.device,
    max_bases_per_kingdom: int = 100_000,
    batch: int = 8,
    floor: tuple[Floor, int, str] | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> Report:
    """Bits per base by class, repeat flag and kingdom, of every network on ``targets``
    (module docstring); ``floor`` = (model, order, name) is scored beside each network."""
    from nucleo.core.machine import summary

    if not networks:
        raise ValueError("give at least one model (--model)")
    kingdoms = sorted({t.kingdom for t in targets})
    totals = {k: sum(t.length for t in targets if t.kingdom == k) for k in kingdoms}
    tallies = [Tally(kingdoms) for _ in networks]
    floors = [Tally(kingdoms) if floor else None for _ in networks]
    records = []
    by_file: dict[Path, dict[str, Target]] = {}
    for t in targets:
        by_file.setdefault(t.sequence_file, {})[t.record] = t
    began = time.monotonic()
    done = 0
    for path, wanted in by_file.items():
        for record in read_sequences(path, soft_mask=True):
            target = wanted.get(record.id)
            if target is None:
                continue
            raw = bytes(record.seq)
            seq = raw.upper()
            repeat = np.frombuffer(raw, np.uint8) >= ord("a")
            classes = classify(len(seq), target.annotation)
            share = max_bases_per_kingdom * len(seq) / max(totals[target.kingdom], 1)
            scored = 0
            for i, net in enumerate(networks):
                tic = time.monotonic()
                pair = (floor[0], floor[1]) if floor else None
                nats, low = base_nats(net, seq, batch, device, share, pair)
                scored = tallies[i].add(target.kingdom, classes, repeat, nats)
                floor_tally = floors[i]
                if floor_tally is not None and low is not None:
                    floor_tally.add(target.kingdom, classes, repeat, low)
                done += scored
                seconds = time.monotonic() - tic
                speed = rate(scored / max(seconds, 1e-9))
                log(
                    f"{net.name}: {target.kingdom} {target.record}: {scored:,} of {len(seq):,} "
                    f"bases in {duration(seconds)} ({speed} bases/s; "
                    f"{duration(time.monotonic() - began)} so far)"
                )
            records.append(
                {
                    "kingdom": target.kingdom,
                    "record": target.record,
                    "file": str(path),
                    "length": len(seq),
                    "scored_bases": scored,
                    "repeat_fraction": round(float(repeat.mean()), 4) if len(seq) else 0.0,
                }
            )
    settings = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": summary(),
        "max_bases_per_kingdom": max_bases_per_kingdom,
        "batch": batch,
        "floor": floor[2] if floor else None,
        "seconds": round(time.monotonic() - began, 1),
    }
    infos = [
        {
            "name": n.name,
            "path": str(n.path),
            "arch": n.arch,
            "window": n.window,
            "stride": n.stride,
        }
        for n in networks
    ]
    return Report(kingdoms, infos, tallies, floors, records, settings)
