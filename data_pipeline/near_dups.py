"""Near-duplicate clustering at scale: the same clusters as ``dedup.cluster_sketches``, without
one process holding every sketch or the whole LSH index.

``dedup.cluster_sketches`` (the in-memory reference) joins two records when their MinHash
sketches share at least one LSH band (datasketch's ``MinHashLSH`` with its own optimal
bands x rows for the threshold) *and* their estimated Jaccard similarity is at least the
threshold; clusters are the connected components. Here the same graph is built in pieces:

1. each input's scan task writes its records' sketches (``[n, num_perm] uint64``) and band
   hashes (``[n, bands] uint64``, a 64-bit hash of each band's rows) to disk;
2. ``reduce_partition`` is a group-by on (band, band hash): partition ``p`` of ``P`` takes the
   entries whose hash is ``p`` mod ``P`` from every input, sorts them, and checks the pairs
   within each bucket against the sketches (read row by row from memory-mapped files, so only
   the partition's entries are in memory). A pair counts when a band's rows are *equal*
   (exactly datasketch's bucket rule, whatever the 64-bit hash says) and the Jaccard estimate
   reaches the threshold. Each partition keeps only a spanning forest of its confirmed
   edges (a pair already joined through earlier edges is not checked again), which leaves
   the components unchanged;
3. ``components`` joins the forests (integer record ids only: 8 bytes per record and edge).

Records are numbered by their position in the build's record list (inputs in order, records in
file order). Memory per reduce task: about 24 bytes x records x bands / P, plus its edges.
"""

from __future__ import annotations

import hashlib
import resource
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Bands:
    """LSH bands: ``bands`` groups of ``rows`` consecutive MinHash values (datasketch's
    choice for ``threshold`` and ``num_perm``, so that the candidate pairs are its)."""

    bands: int
    rows: int
    threshold: float
    num_perm: int

    @classmethod
    def for_threshold(cls, threshold: float, num_perm: int) -> Bands:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        return cls(int(lsh.b), int(lsh.r), threshold, num_perm)

    def hashes(self, values: np.ndarray) -> np.ndarray:
        """[bands] uint64: a hash of each band's rows of one sketch's ``values`` [num_perm]."""
        out = np.empty(self.bands, dtype=np.uint64)
        for j in range(self.bands):
            piece = np.ascontiguousarray(values[j * self.rows : (j + 1) * self.rows])
            out[j] = int.from_bytes(hashlib.blake2b(piece.tobytes(), digest_size=8).digest(), "big")
        return out

    def shares_band(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether sketches ``a`` and ``b`` have some band with all rows equal."""
        span = self.bands * self.rows
        return bool((a[:span] == b[:span]).reshape(self.bands, self.rows).all(axis=1).any())

    def similar(self, a: np.ndarray, b: np.ndarray) -> float:
        """datasketch's Jaccard estimate: the fraction of equal MinHash values."""
        return float(np.count_nonzero(a == b)) / float(self.num_perm)


def sketch_path(work: str | Path, name: str) -> Path:
    """[records, num_perm] uint64 MinHash values of the input whose scan is ``name``."""
    return Path(work) / "scan" / f"{name}.sketch.npy"


def bands_path(work: str | Path, name: str) -> Path:
    """[records, bands] uint64 band hashes of the input whose scan is ``name``."""
    return Path(work) / "scan" / f"{name}.bands.npy"


@lru_cache(maxsize=64)
def _sketches(path: str) -> np.ndarray:
    """A memory-mapped sketch file: rows are read from disk as they are used."""
    return np.load(path, mmap_mode="r")


class SketchStore:
    """Sketch rows by record id, from the inputs' memory-mapped sketch files.

    offsets: [inputs + 1] int64, the id of each input's first record (and the total); names:
    each input's scan name."""

    def __init__(self, work: str | Path, offsets: np.ndarray, names: list[str]) -> None:
        self.work = str(work)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.names = names

    def row(self, record: int) -> np.ndarray:
        index = int(np.searchsorted(self.offsets, record, side="right")) - 1
        return np.asarray(
            _sketches(str(sketch_path(self.work, self.names[index])))[record - self.offsets[index]]
        )


def edges_path(near: str | Path, partition: int) -> Path:
    return Path(near) / f"edges-{partition:05d}.npy"


def _find(parent: dict[int, int], x: int) -> int:
    parent.setdefault(x, x)
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def reduce_partition(task: dict[str, Any]) -> dict[str, Any]:
    """One partition of the band group-by: a spanning forest of the confirmed near-duplicate
    pairs among its buckets, written to ``<near>/edges-<p>.npy`` as [E, 2] int64.

    task: work, near (this clustering's folder), names (scan names), partition, partitions,
    offsets (list), bands (Bands). Records marked in ``<near>/excluded.npy`` (exact
    duplicates, empty sketches) take no part."""
    work, p, parts = Path(task["work"]), int(task["partition"]), int(task["partitions"])
    near, names = Path(task["near"]), task["names"]
    out = edges_path(near, p)
    if out.is_file():
        return {"partition": p, "edges": int(np.load(out).shape[0]), "skipped": True}
    bands: Bands = task["bands"]
    offsets = np.asarray(task["offsets"], dtype=np.int64)
    excluded = np.load(near / "excluded.npy", mmap_mode="r")
    band_of, hash_of, record_of = [], [], []
    for index in range(len(offsets) - 1):
        lo, hi = int(offsets[index]), int(offsets[index + 1])
        if hi == lo:
            continue
        table = np.load(bands_path(work, names[index]), mmap_mode="r")
        keep = ~np.asarray(excluded[lo:hi])
        for j in range(bands.bands):
            column = np.asarray(table[:, j])
            mine = keep & (column % np.uint64(parts) == np.uint64(p))
            rows = np.nonzero(mine)[0]
            band_of.append(np.full(len(rows), j, dtype=np.int64))
            hash_of.append(column[rows])
            record_of.append(rows.astype(np.int64) + lo)
    edges: list[tuple[int, int]] = []
    checked = 0
    if band_of and sum(len(b) for b in band_of):
        band = np.concatenate(band_of)
        hashed = np.concatenate(hash_of)
        record = np.concatenate(record_of)
        order = np.lexsort((record, hashed, band))
        band, hashed, record = band[order], hashed[order], record[order]
        new = np.ones(len(band), dtype=bool)
        new[1:] = (band[1:] != band[:-1]) | (hashed[1:] != hashed[:-1])
        starts = np.nonzero(new)[0]
        ends = np.append(starts[1:], len(band))
        store = SketchStore(work, offsets, names)
        parent: dict[int, int] = {}
        for start, end in zip(starts, ends, strict=True):
            if end - start < 2:
                continue
            members = record[start:end].tolist()
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    ra, rb = _find(parent, a), _find(parent, b)
                    if ra == rb:
                        continue  # already joined: this pair cannot change the components
                    checked += 1
                    sa, sb = store.row(a), store.row(b)
                    if bands.shares_band(sa, sb) and bands.similar(sa, sb) >= bands.threshold:
                        parent[max(ra, rb)] = min(ra, rb)
                        edges.append((a, b))
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part.npy")
    np.save(part, np.asarray(edges, dtype=np.int64).reshape(-1, 2))
    part.replace(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    return {"partition": p, "edges": len(edges), "checked": checked, "skipped": False,
            "peak_rss_mb": round(peak, 1)}  # fmt: skip


def components(records: int, edge_files: list[Path]) -> np.ndarray:
    """[records] int64 component label of every record (its smallest member's id)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    parts = [np.load(f) for f in edge_files]
    edges = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    graph = coo_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(records, records)
    )
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if records else 0, records, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(records, dtype=np.int64))
    return first[labels]
