"""``nucleo data stats``: what is in a shard set, per kingdom, as a markdown report with plots.

Per kingdom: records (input, kept), bases, N fraction, GC, exact-duplicate and near-duplicate
fractions (from the manifest the build wrote), and the Shannon entropy of the k-mer spectrum
(bits; 2k is the maximum, a uniform random genome), counted over the shards' bases. Plots: the
record length histogram, GC per kingdom, and redundancy per kingdom. With ``topology``, a
section on the persistence diagrams of the records' chaos-game clouds (``data_pipeline.topology``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.dedup import _CODES, kmer_codes
from data_pipeline.loader import tar_samples
from data_pipeline.shards import load_manifest


def kmer_counts(seq: bytes, k: int) -> np.ndarray:
    """[4^k] int64 counts of the k-mers (A/C/G/T only, forward strand) of ``seq``."""
    codes = _CODES[np.frombuffer(seq, dtype=np.uint8)]
    m = len(codes) - k + 1
    if m <= 0:
        return np.zeros(4**k, dtype=np.int64)
    bad = np.concatenate([[0], np.cumsum(codes == 4, dtype=np.int64)])
    ok = (bad[k:] - bad[:-k]) == 0
    fwd, _ = kmer_codes((codes & 3).astype(np.uint64), k, m)
    return np.bincount(fwd[ok].astype(np.int64), minlength=4**k)


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of a count vector; nan when it is all zero."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def kingdom_stats(
    shard_dir: str | Path,
    k: int = 6,
    max_bases: int = 20_000_000,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Per-kingdom statistics (see the module docstring). The k-mer spectrum reads at most
    ``max_bases`` bases of each kingdom's shards (all of them when smaller)."""
    manifest = load_manifest(shard_dir)
    records = manifest["records"]
    out: dict[str, dict[str, Any]] = {}
    for kingdom in sorted({r["kingdom"] for r in records}):
        mine = [r for r in records if r["kingdom"] == kingdom]
        kept = [r for r in mine if r["duplicate_of"] is None]
        bases = sum(r["length"] for r in mine)
        kept_bases = sum(r["length"] for r in kept)
        n_bases = sum(r["n_fraction"] * r["length"] for r in kept)
        acgt = kept_bases - n_bases
        near = [r for r in kept if r.get("near_duplicate_of")]
        counts = np.zeros(4**k, dtype=np.int64)
        read = 0
        for split in ("train", "val"):
            for shard in manifest["kingdoms"].get(kingdom, {}).get(split, {}).get("shards", []):
                if read >= max_bases:
                    break
                for sample in tar_samples(storage.join(shard_dir, shard["path"])):
                    counts += kmer_counts(sample["seq"].upper(), k)
                    read += len(sample["seq"])
                    if read >= max_bases:
                        break
        splits = manifest["kingdoms"].get(kingdom, {})
        out[kingdom] = {
            "records": len(mine),
            "kept": len(kept),
            "bases": bases,
            "kept_bases": kept_bases,
            "train_bases": splits.get("train", {}).get("bases", 0),
            "val_bases": splits.get("val", {}).get("bases", 0),
            "n_fraction": n_bases / max(1, kept_bases),
            "gc": sum(r["gc"] * r["length"] * (1 - r["n_fraction"]) for r in kept) / max(1, acgt),
            "duplicate_records": (len(mine) - len(kept)) / max(1, len(mine)),
            "duplicate_bases": (bases - kept_bases) / max(1, bases),
            "near_duplicate_records": len(near) / max(1, len(kept)),
            "near_duplicate_bases": sum(r["length"] for r in near) / max(1, kept_bases),
            "clusters": len({r.get("cluster") or r["key"] for r in kept}),
            "kmer_entropy": entropy_bits(counts),
            "kmer_bases": read,
            "lengths": [r["length"] for r in kept],
            "record_gc": [r["gc"] for r in kept],
        }
        log(f"{kingdom}: {len(mine)} records, {bases:,} bases, k-mer entropy over {read:,} bases")
    return out


def _plots(stats: dict[str, dict[str, Any]], folder: Path, stem: str) -> dict[str, str]:
    """Write the three figures; returns name -> file name (relative to ``folder``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(stats)
    x = np.arange(len(names))
    files = {}

    def figure(name: str, title: str, ylabel: str, draw: Callable[[Any], None]) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        draw(ax)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        files[name] = f"{stem}_{name}.png"
        fig.tight_layout()
        fig.savefig(folder / files[name], dpi=110)
        plt.close(fig)

    def lengths(ax: Any) -> None:
        values = [np.log10(np.maximum(1, stats[n]["lengths"])) for n in names]
        ax.hist(values, bins=30, stacked=True, label=names)
        ax.set_xlabel("record length (log10 bases)")
        ax.legend(fontsize=7, ncol=2)

    def gc(ax: Any) -> None:
        for i, n in enumerate(names):
            values = stats[n]["record_gc"]
            jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(values))
            ax.scatter(np.full(len(values), i) + jitter, values, s=10, alpha=0.6)
            ax.hlines(stats[n]["gc"], i - 0.3, i + 0.3, color="black")
        ax.set_xticks(x, names, rotation=40, ha="right")

    def redundancy(ax: Any) -> None:
        exact = [stats[n]["duplicate_records"] for n in names]
        near = [stats[n]["near_duplicate_records"] for n in names]
        ax.bar(x - 0.2, exact, 0.4, label="exact duplicates (dropped)")
        ax.bar(x + 0.2, near, 0.4, label="near-duplicates (kept, clustered)")
        ax.set_xticks(x, names, rotation=40, ha="right")
        ax.legend()

    figure("lengths", "Record lengths (kept records, stacked by kingdom)", "records", lengths)
    figure("gc", "GC per record (dots) and per kingdom (bars, base-weighted)", "GC fraction", gc)
    figure("redundancy", "Redundancy per kingdom", "fraction of records", redundancy)
    return files


def report(
    shard_dir: str | Path,
    out: str | Path,
    *,
    k: int = 6,
    max_bases: int = 20_000_000,
    command: str = "",
    machine: str = "",
    topology: Any = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the markdown report ``out`` and its PNG plots beside it; returns ``out``.
    topology: ``data_pipeline.topology.TopologyOptions``: add the topology section and files."""
    started = time.time()
    stats = kingdom_stats(shard_dir, k, max_bases, log)
    manifest = load_manifest(shard_dir)
    out = Path(out)
    files = _plots(stats, out.parent, out.stem)
    total = {
        key: sum(s[key] for s in stats.values())
        for key in ("records", "kept", "bases", "kept_bases", "train_bases", "val_bases")
    }
    opts = manifest["options"]
    lines = [
        f"# Data statistics: `{shard_dir}`",
        "",
        f"- command: `{command or 'nucleo data stats ' + str(shard_dir)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f"; machine: {machine}" if machine else ""),
        f"- shards built {manifest.get('created', '?')}: chunk_len {opts['chunk_len']}, "
        f"val_fraction {opts['val_fraction']}, near-duplicate threshold "
        f"{opts.get('near_dup_threshold', 'off')} (MinHash, k={opts.get('minhash_k', '-')}, "
        f"1/{opts.get('minhash_scale', '-')} k-mers, {opts.get('minhash_perm', '-')} perms)",
        f"- totals: {total['records']} records ({total['kept']} kept), {total['bases']:,} bases "
        f"({total['kept_bases']:,} kept); train {total['train_bases']:,}, "
        f"val {total['val_bases']:,}",
        "",
        f"k-mer entropy: Shannon entropy of the {k}-mer spectrum in bits (maximum {2 * k}, "
        "a uniform random sequence), over at most "
        f"{max_bases:,} bases per kingdom. Exact duplicates have the same bases on either strand; "
        "near-duplicates are kept records whose k-mer Jaccard with their cluster's "
        "representative passes the threshold.",
        "",
        "| kingdom | records | kept | bases | val bases | N frac | GC | exact dup (records) | "
        "exact dup (bases) | near-dup (records) | near-dup (bases) | clusters | "
        f"{k}-mer entropy (bits) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        entropy = "-" if math.isnan(s["kmer_entropy"]) else f"{s['kmer_entropy']:.3f}"
        lines.append(
            f"| {name} | {s['records']} | {s['kept']} | {s['bases']:,} | {s['val_bases']:,} | "
            f"{s['n_fraction']:.4f} | {s['gc']:.3f} | {s['duplicate_records']:.1%} | "
            f"{s['duplicate_bases']:.1%} | {s['near_duplicate_records']:.1%} | "
            f"{s['near_duplicate_bases']:.1%} | {s['clusters']} | {entropy} |"
        )
    lines += [
        "",
        f"![record lengths]({files['lengths']})",
        "",
        f"![GC per kingdom]({files['gc']})",
        "",
        f"![redundancy]({files['redundancy']})",
        "",
        f"Report computed in {time.time() - started:.1f} s.",
        "",
    ]
    out.write_text("\n".join(lines))
    if topology is not None:
        from data_pipeline.topology import topology as topology_of
        from data_pipeline.topology import write_topology

        write_topology(topology_of(shard_dir, topology, log), out, command, log)
    return out
