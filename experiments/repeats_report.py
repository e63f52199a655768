"""Write experiments/results/repeats.md: which records of a shard set carry a repeat mask, where
it came from (the input's own lower case, or ``--mask dust``), and, for comparison, what DUST
and NCBI's WindowMasker find on every record (its own mask set aside).

    nucleo data build --sources data/offline/manifests/all.tsv --out data/offline/shards_masked \\
        --mask dust
    python experiments/repeats_report.py --shards data/offline/shards_masked [--no-windowmasker]
    python experiments/repeats_report.py --from-json experiments/results/repeats.json  # rewrite

The discussion below the tables is experiments/repeats_notes.md, appended as it is.

Re-reads every input record (as the build did), so it takes about as long as the build plus
WindowMasker's runs (a few minutes for the 311 Mb offline corpus).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.masking import Masker, get_masker  # noqa: E402
from data_pipeline.shards import SourceFile, load_manifest  # noqa: E402
from experiments.report import RESULTS, header, run_record, write  # noqa: E402

LOWER = np.frombuffer(b"acgt", dtype=np.uint8)
UPPER = np.frombuffer(b"ACGT", dtype=np.uint8)
#: what the .json keeps of each manifest record
FIELDS = ("key", "id", "kingdom", "length", "split", "duplicate_of", "mask_source",
          "repeat_fraction", "description", "organism")  # fmt: skip


def _mask_of(masker: Masker, upper: bytes, bases: np.ndarray) -> np.ndarray:
    """Where ``masker`` would lower-case ``upper`` (ACGT bases only, as the build does)."""
    mask = np.zeros(len(upper), dtype=bool)
    for start, end in masker.intervals(upper):
        mask[start:end] = True
    return mask & bases


def record_stats(shards: str, maskers: dict[str, Masker], log: Any = print) -> list[dict]:
    """Per record of the manifest: its mask in the shards, and each masker's on its bases."""
    manifest = load_manifest(shards)
    by_input: dict[int, list[dict]] = {}
    for row in manifest["records"]:
        by_input.setdefault(row["input"], []).append(row)
    rows = []
    for index, entry in enumerate(manifest["inputs"]):
        src = SourceFile(
            Path(entry["path"]), entry["kingdom"], include=entry["include"],
            exclude=entry["exclude"],
        )  # fmt: skip
        records = iter(by_input.get(index, []))
        for rec in src.records(soft_mask=True):
            row = next(records)
            assert row["id"] == rec.id, (row["id"], rec.id)
            seq = np.frombuffer(bytes(rec.seq), dtype=np.uint8)
            own = np.isin(seq, LOWER)
            upper = bytes(rec.seq).upper()
            bases = np.isin(np.frombuffer(upper, dtype=np.uint8), UPPER)
            stats: dict[str, Any] = {k: row[k] for k in FIELDS}
            stats["package"] = row.get("package") or Path(entry["path"]).parent.name
            stats["own"] = int(own.sum())
            started = time.time()
            for name, masker in maskers.items():
                found = _mask_of(masker, upper, bases)
                stats[name] = int(found.sum())
                stats[f"{name}_in_own"] = int((found & own).sum())
                stats[f"{name}_seconds"] = round(time.time() - started, 2)
                started = time.time()
            rows.append(stats)
            log(
                f"{row['kingdom']:<16} {rec.id[:40]:<40} {len(seq):>11,}  own "
                f"{stats['own'] / len(seq):6.1%}  "
                + "  ".join(f"{n} {stats[n] / len(seq):6.1%}" for n in maskers)
            )
    return rows


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def report(data: dict[str, Any]) -> list[str]:
    """The markdown of a run's ``data`` (what ``main`` stores in the .json)."""
    shards, rows, maskers, seconds = (
        data["shards"],
        data["records"],
        data["maskers"],
        data["seconds"],
    )
    manifest = load_manifest(shards)
    masking = manifest.get("masking", {})
    opts = manifest["options"]
    kept = [r for r in rows if r["duplicate_of"] is None]
    wm = "windowmasker" in maskers
    lines = [
        f"# Repeats in the offline corpus: `{shards}`",
        "",
        *header(data["run"]),
        f"- shard set: built {manifest.get('created', '?')} in {manifest.get('build_seconds')} s "
        f"with `nucleo data build --sources data/offline/manifests/all.tsv --out {shards} "
        f"--mask {opts.get('mask', 'none')}` (format {manifest['format']}; chunk_len "
        f"{opts['chunk_len']}, val_fraction {opts['val_fraction']}, near-duplicate threshold "
        f"{opts['near_dup_threshold']}: the options of `data/offline/shards`, whose splits it "
        "keeps record for record)",
        f"- masker: {masking.get('mask')} = {masking.get('tool')} {masking.get('version')} "
        f"{masking.get('settings')}; records by where their mask came from: "
        f"{masking.get('records')}",
        "- comparison maskers (this script, every record upper-cased, not written to any shard "
        "set): "
        + "; ".join(
            f"{m['mask']} = {m['tool']} {m['version']} {m['settings']}" for m in maskers.values()
        )
        + f"; {seconds:.0f} s in all",
        "",
        "Shares are of all bases (N included) of the records kept (exact duplicates dropped), "
        "train and validation together.",
        "",
        "## Per kingdom",
        "",
        "| kingdom | records (own mask / dust) | bases | masked in the shards | from the input's "
        "own mask | added by dust | dust on every record | "
        + ("windowmasker on every record |" if wm else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if wm else ""),
    ]
    for kingdom in sorted({r["kingdom"] for r in kept}):
        mine = [r for r in kept if r["kingdom"] == kingdom]
        bases = sum(r["length"] for r in mine)
        own = sum(r["own"] for r in mine if r["mask_source"] == "input")
        added = sum(r["dust"] for r in mine if r["mask_source"] == "dust")
        n_own = sum(r["mask_source"] == "input" for r in mine)
        n_dust = sum(r["mask_source"] == "dust" for r in mine)
        cells = [
            kingdom, f"{len(mine)} ({n_own} / {n_dust})", f"{bases:,}", _pct(own + added, bases),
            _pct(own, bases), _pct(added, bases), _pct(sum(r["dust"] for r in mine), bases),
        ]  # fmt: skip
        if wm:
            cells.append(_pct(sum(r["windowmasker"] for r in mine), bases))
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r["length"] for r in kept)
    own = sum(r["own"] for r in kept if r["mask_source"] == "input")
    added = sum(r["dust"] for r in kept if r["mask_source"] == "dust")
    cells = [
        "**all**", f"{len(kept)} ({sum(r['mask_source'] == 'input' for r in kept)} / "
        f"{sum(r['mask_source'] == 'dust' for r in kept)})", f"{total:,}",
        _pct(own + added, total), _pct(own, total), _pct(added, total),
        _pct(sum(r["dust"] for r in kept), total),
    ]  # fmt: skip
    if wm:
        cells.append(_pct(sum(r["windowmasker"] for r in kept), total))
    lines += ["| " + " | ".join(cells) + " |", ""]

    lines += [
        "## Records that carry their own soft mask (kept as it is)",
        "",
        "`own`: the input's lower case; `dust` / `windowmasker`: what each finds on the record "
        "upper-cased, and in brackets the share of that which lies inside the record's own mask.",
        "",
        "| kingdom | record | where from | bases | own | dust (in own) | "
        + ("windowmasker (in own) | own found by windowmasker |" if wm else ""),
        "|---|---|---|---:|---:|---:|" + ("---:|---:|" if wm else ""),
    ]
    for r in sorted(kept, key=lambda r: (r["kingdom"], r["package"], r["id"])):
        if r["mask_source"] != "input":
            continue
        what = (r["description"] or r["organism"] or "")[:60]
        cells = [
            r["kingdom"], f"`{r['id']}` {what}".strip(), f"`{r['package']}`",
            f"{r['length']:,}", _pct(r["own"], r["length"]),
            f"{_pct(r['dust'], r['length'])} ({_pct(r['dust_in_own'], r['dust'])})",
        ]  # fmt: skip
        if wm:
            cells += [
                f"{_pct(r['windowmasker'], r['length'])} "
                f"({_pct(r['windowmasker_in_own'], r['windowmasker'])})",
                _pct(r["windowmasker_in_own"], r["own"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    lines += [
        "## Records masked by dust (they arrived all upper case)",
        "",
        "| kingdom | records | bases | dust: all | per record: median | max (record) | "
        + ("windowmasker: all |" if wm else ""),
        "|---|---:|---:|---:|---:|---|" + ("---:|" if wm else ""),
    ]
    for kingdom in sorted({r["kingdom"] for r in kept}):
        mine = [r for r in kept if r["kingdom"] == kingdom and r["mask_source"] == "dust"]
        if not mine:
            continue
        bases = sum(r["length"] for r in mine)
        shares = [r["dust"] / r["length"] for r in mine]
        top = max(mine, key=lambda r: r["dust"] / r["length"])
        cells = [
            kingdom, str(len(mine)), f"{bases:,}", _pct(sum(r["dust"] for r in mine), bases),
            f"{100 * median(shares):.1f}%",
            f"{_pct(top['dust'], top['length'])} (`{top['id'][:30]}`)",
        ]  # fmt: skip
        if wm:
            cells.append(_pct(sum(r["windowmasker"] for r in mine), bases))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/offline/shards_masked")
    parser.add_argument("--out", default=str(RESULTS / "repeats.md"))
    parser.add_argument("--notes", default=str(ROOT / "experiments" / "repeats_notes.md"))
    parser.add_argument("--no-windowmasker", action="store_true")
    parser.add_argument("--from-json", help="rewrite the markdown from a stored .json")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        maskers = {"dust": get_masker("dust")}
        if not args.no_windowmasker:
            maskers["windowmasker"] = get_masker("windowmasker")
        started = time.time()
        rows = record_stats(args.shards, maskers)  # type: ignore[arg-type]
        data = {
            "run": run_record(),
            "shards": args.shards,
            "maskers": {n: m.describe() for n, m in maskers.items() if m is not None},
            "seconds": round(time.time() - started, 1),
            "records": rows,
        }
    lines = report(data)
    notes = Path(args.notes)
    if notes.is_file():
        lines += notes.read_text().splitlines()
    write(args.out, lines, data)


if __name__ == "__main__":
    main()
