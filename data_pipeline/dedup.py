"""Near-duplicate genomes: MinHash sketches of canonical k-mers, clustered with LSH.

Exact duplicates (the same bases on either strand) are dropped by ``shards`` with a digest.
Near-duplicates (strains, the MERS-CoV genomes of one outbreak, one genome in two packages
with a few edits) are kept but *clustered*, so that a whole cluster lands in one split and
validation never scores a model on a near-copy of a training genome.

A record's k-mer set is subsampled before sketching, FracMinHash style: a canonical k-mer is
kept when its 64-bit hash is below 2^64 / ``scale``. The same rule applies to every record, so
the Jaccard similarity of two subsampled sets estimates that of the full sets (with about
n / scale k-mers per record), and sketching 300 Mb costs seconds instead of the hours that
hashing every k-mer in Python would. The kept hashes go into datasketch ``MinHash`` sketches,
and ``MinHashLSH`` finds the pairs above the threshold; the clusters are connected components.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

_CODES = np.full(256, 4, dtype=np.uint8)
for _i, _b in enumerate(b"ACGT"):
    _CODES[_b] = _i
_BLOCK = 1 << 20  # bases hashed at once: arrays of 8 MB stay in malloc's heap, not mmapped anew


@dataclass(frozen=True)
class SketchOptions:
    """k: k-mer length (<= 31). scale: 1 in ``scale`` k-mers kept (by hash) before sketching.
    num_perm: MinHash permutations. threshold: Jaccard similarity of k-mer sets above which
    two records are near-duplicates (0 turns clustering off)."""

    k: int = 21
    scale: int = 100
    num_perm: int = 128
    threshold: float = 0.8

    def __post_init__(self) -> None:
        if not 4 <= self.k <= 31:
            raise ValueError(f"minhash k must be in 4..31, got {self.k}")
        if self.scale < 1 or self.num_perm < 16:
            raise ValueError("minhash scale must be >= 1 and num_perm >= 16")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in [0, 1], got {self.threshold}")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: uint64 -> well-mixed uint64 (k-mer codes are far from uniform)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def kmer_codes(c: np.ndarray, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """2-bit codes of the m forward k-mers of base codes ``c`` (0-3) and of their reverse
    complements, by doubling (v_2L(i) = v_L(i) << 2L | v_L(i + L)): about 2 log2(k) array
    passes instead of 2k."""
    fwd_pow = {1: c}
    rev_pow = {1: np.uint64(3) - c}
    length = 1
    while length * 2 <= k:
        f, r, n = fwd_pow[length], rev_pow[length], len(fwd_pow[length]) - length
        fwd_pow[2 * length] = (f[:n] << np.uint64(2 * length)) | f[length : length + n]
        rev_pow[2 * length] = r[:n] | (r[length : length + n] << np.uint64(2 * length))
        length *= 2
    fwd = np.zeros(m, dtype=np.uint64)
    rev = np.zeros(m, dtype=np.uint64)
    done = 0
    for part in sorted(fwd_pow, reverse=True):  # k as a sum of powers of two
        if part & k:
            fwd = (fwd << np.uint64(2 * part)) | fwd_pow[part][done : done + m]
            rev |= rev_pow[part][done : done + m] << np.uint64(2 * done)
            done += part
    return fwd, rev


def canonical_kmer_hashes(seq: bytes | bytearray, k: int, scale: int = 1) -> np.ndarray:
    """[n] uint64 hashes of the canonical (strand-independent) k-mers of ``seq`` that pass the
    ``scale`` subsampling; k-mers with an N are skipped. Vectorised over blocks of 1 Mb."""
    out: list[np.ndarray] = []
    limit = np.uint64((1 << 64) // scale - 1) if scale > 1 else None
    mask = np.uint64((1 << (2 * k)) - 1)
    n = len(seq)
    with np.errstate(over="ignore"):
        for start in range(0, max(0, n - k + 1), _BLOCK):
            block = np.frombuffer(bytes(seq[start : start + _BLOCK + k - 1]), dtype=np.uint8)
            codes = _CODES[block]
            m = len(codes) - k + 1
            if m <= 0:
                break
            bad = np.concatenate([[0], np.cumsum(codes == 4, dtype=np.int64)])
            ok = (bad[k:] - bad[:-k]) == 0  # [m] k-mer has no N
            fwd, rev = kmer_codes((codes & 3).astype(np.uint64), k, m)
            h = _mix(np.minimum(fwd, rev) & mask)[ok]
            out.append(h[h <= limit] if limit is not None else h)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def sketch(seq: bytes | bytearray, options: SketchOptions) -> MinHash:
    """A datasketch MinHash of the subsampled canonical k-mer set of ``seq``."""
    hashes = np.unique(canonical_kmer_hashes(seq, options.k, options.scale))
    m = MinHash(num_perm=options.num_perm, seed=1, hashfunc=int)
    if len(hashes):
        m.update_batch((hashes >> np.uint64(32)).tolist())  # datasketch hashes are 32-bit
    return m


@dataclass
class Cluster:
    """Records that are near-duplicates of each other, the representative first (the longest;
    ties by key). ``similarity`` is each member's estimated Jaccard with the representative."""

    members: list[str]
    similarity: dict[str, float]


def cluster_sketches(
    sketches: dict[str, MinHash], lengths: dict[str, int], threshold: float
) -> list[Cluster]:
    """Connected components of the LSH "near-duplicate" graph; singletons included.

    An LSH candidate pair is confirmed with the sketches' own Jaccard estimate, so the bands'
    false positives do not join clusters. Deterministic: keys are processed sorted.
    """
    keys = sorted(sketches)
    parent = {k: k for k in keys}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if threshold > 0 and len(keys) > 1:
        num_perm = len(next(iter(sketches.values())).hashvalues)
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        empty = {k for k in keys if sketches[k].is_empty()}
        for key in keys:
            if key in empty:
                continue
            for other in sorted(lsh.query(sketches[key])):
                if sketches[key].jaccard(sketches[other]) >= threshold:
                    a, b = find(key), find(other)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
            lsh.insert(key, sketches[key])
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(find(key), []).append(key)
    clusters = []
    for members in groups.values():
        members.sort(key=lambda k: (-lengths[k], k))
        rep = sketches[members[0]]
        sim = {k: round(float(rep.jaccard(sketches[k])), 4) for k in members}
        clusters.append(Cluster(members, sim))
    clusters.sort(key=lambda c: c.members[0])
    return clusters


def near_duplicate_fraction(clusters: Iterable[Cluster]) -> float:
    """Fraction of records that are not their cluster's representative."""
    clusters = list(clusters)
    total = sum(len(c.members) for c in clusters)
    return sum(len(c.members) - 1 for c in clusters) / total if total else 0.0
