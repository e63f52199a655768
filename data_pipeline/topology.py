"""Topology across species: distances between the persistence diagrams of chaos-game point
clouds of a shard set's records, species and kingdoms, with the noise floor of one genome.

For each selected record, ``windows`` windows of ``length`` bases are drawn (non-overlapping,
seeded, at most ``max_n_fraction`` N; soft-masked lower-case bases count as bases). Each window
is played through the chaos game on the corners of a regular tetrahedron (the ``cgr`` and ``ph``
losses' picture, ``nucleo.core.representations.cgr_points``, here in closed form) at ``points``
evenly spaced positions: a cloud in 3-D whose shape is the window's k-mer
content at every scale (a point's position is its suffix, finer with each base).

Persistence: H0 and H1 of the Vietoris-Rips filtration (gudhi), the filtration the ``ph`` loss
uses, so these distances are in the units of its ``ph/h0`` and ``ph/h1`` metrics. The complex is
edge-collapsed before it is expanded to triangles, which leaves the diagrams unchanged (a test
ties them to ``representations.diagrams``) and is some 20 times faster. The infinite H0 class is
left out, as in the loss.

Distance between two windows: W1(H0) + W1(H1), order-1 Wasserstein distances with the
L-infinity ground metric (a point may go to the diagonal at (death - birth) / 2): the loss's
``representations.wasserstein``, computed without torch. H1 diagrams are small (~25 points): the
Hungarian algorithm (scipy), exact. H0 births are all 0, so an optimal matching can be taken
monotone and W1(H0) is an exact alignment recursion over the sorted deaths, run for thousands of
pairs at once in numpy (``h0_wasserstein``). gudhi's own Wasserstein (``gudhi.wasserstein``)
needs POT, which is not installed; ``gudhi.hera`` (no POT) gives the same numbers and is the
tests' reference, but is 3x (H1) to 100x (H0) slower here.

Groups (records, species, kingdoms): the distance between groups A and B is the mean distance
over all pairs (a window of A, a window of B); a group's *spread* is the mean over pairs of
distinct windows within it, and a record's spread is its **noise floor**: how far apart two
windows of the same genome are. The matrices have a zero diagonal; spreads are kept beside
them. *Ratio*: a distance over the mean noise floor of the records involved (1: no more
different than two stretches of one genome). *Excess*: distance - (spread A + spread B) / 2,
half the energy distance between the two sets of diagrams: about 0 for two samples of one
genome whatever its spread, where the plain mean would call a group of tight windows close to
everything. The dendrograms are average-linkage trees of the excess (negatives as 0), with the
excess between two halves of one genome's windows (95th percentile) as the noise line.

Levels: window pairs from the same record (the floor), from different records of one species,
from different species of one kingdom, and from different kingdoms, each averaged over record
pairs, with the mean ratio to the two records' floors and bootstrap intervals over records.
Permutation tests: window labels shuffled across records (is a genome's window more like its
own genome's windows?), and record labels shuffled across kingdoms (do kingdoms separate beyond
record-to-record variation?). The Spearman correlation between record-pair distance and GC
difference says how much of the picture is composition.

Species labels are best effort from the manifest: the organism, else the description (genus and
species of a binomial; a virus's name up to "isolate", "strain", "complete" ...), else the
record's source file; a species is kept apart per kingdom (Arabidopsis's chloroplast is not its
nucleus).
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.dedup import _CODES
from data_pipeline.loader import tar_samples
from data_pipeline.shards import load_manifest

Log = Callable[[str], None]


class TopologyError(ValueError):
    """Bad topology input; ``option`` names the ``TopologyOptions`` field at fault."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass
class TopologyOptions:
    """windows: per record (>= 2: the floor needs pairs). length: bases per window (at most the
    shards' chunk_len). points: CGR points per window (the ph loss's default, 128). records: per
    kingdom, spread over its species. max_n_fraction: N allowed in a window. permutations,
    bootstrap: resamples of the tests and intervals. seed: every draw."""

    windows: int = 8
    length: int = 2048
    points: int = 128
    records: int = 6
    max_n_fraction: float = 0.01
    permutations: int = 999
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.windows < 2:
            raise TopologyError(
                "windows", f"must be >= 2 (pairs give the floor), got {self.windows}"
            )
        if self.points < 4:
            raise TopologyError("points", f"must be >= 4, got {self.points}")
        if self.length < self.points:
            raise TopologyError(
                "length", f"{self.length} is shorter than the {self.points} points of a cloud"
            )
        if self.records < 1:
            raise TopologyError("records", f"must be >= 1, got {self.records}")


# ----------------------------------------------------------------------------- records


_BINOMIAL = re.compile(r"^([A-Z][a-z]+) ([a-z][a-z-]+)\b")
_VIRAL = re.compile(r"phage|virus|viridae|viroid", re.IGNORECASE)
_CUT = re.compile(
    r",|\s-\s|\s(?:isolate|strain|str\.|complete|genome|chromosome|plasmid|mitochondri\w*"
    r"|chloroplast|segment|DNA|sequence|cultivar|clone)\b",
    re.IGNORECASE,
)


def species_label(record: dict[str, Any]) -> str:
    """The species of a manifest record, best effort (see the module docstring)."""
    text = (record.get("organism") or "").strip()
    if not text:
        text = re.sub(r"^(?:gi\|[^ ]*\|\s*|\|)", "", (record.get("description") or "").strip())
        if not re.match(r"[A-Za-z]{3}", text):  # coordinates, not a name ("149454308 ...")
            text = ""
    if not text and "_" in record["key"] and not record["key"].startswith("chr"):
        text = record["key"].split("#")[0].replace("_", " ")
    if not text:
        name = Path(record.get("source") or record["key"]).name
        return re.sub(r"\.(fa|fasta|fna|gb|gbk|genbank)(\.gz|\.xz|\.bz2)?$", "", name)
    text = text.strip().rstrip(".")
    binomial = _BINOMIAL.match(text)
    if binomial and not _VIRAL.search(text):
        return f"{binomial.group(1)} {binomial.group(2)}"
    return _CUT.split(text, maxsplit=1)[0].strip().rstrip(".") or record["key"]


def _seeded(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in parts)])


def select_records(manifest: dict[str, Any], options: TopologyOptions) -> list[dict[str, Any]]:
    """Kept records (not exact duplicates) long enough for a window, at most ``records`` per
    kingdom, taken round-robin over the kingdom's species (seeded order), so a kingdom's species
    are all represented before any gets a second record."""
    chunk_len = int(manifest["options"]["chunk_len"])
    if options.length > chunk_len:
        raise TopologyError(
            "length", f"{options.length} is longer than the shards' chunks ({chunk_len} bases)"
        )
    kept = [r for r in manifest["records"] if r["duplicate_of"] is None]
    long = [r for r in kept if r["length"] >= options.length]
    if not long:
        longest = max((r["length"] for r in kept), default=0)
        raise TopologyError(
            "length",
            f"{options.length} is longer than every record (the longest has {longest:,} bases)",
        )
    chosen = []
    for kingdom in sorted({r["kingdom"] for r in long}):
        by_species: dict[str, list[dict[str, Any]]] = {}
        for r in sorted((r for r in long if r["kingdom"] == kingdom), key=lambda r: r["key"]):
            by_species.setdefault(species_label(r), []).append(r)
        rng = _seeded(options.seed, "records", kingdom)
        queues = [[group[i] for i in rng.permutation(len(group))] for group in by_species.values()]
        queues = [queues[i] for i in rng.permutation(len(queues))]
        picked: list[dict[str, Any]] = []
        while len(picked) < options.records and any(queues):
            for queue in queues:
                if queue and len(picked) < options.records:
                    picked.append(queue.pop(0))
        chosen += sorted(picked, key=lambda r: r["key"])
    return chosen


def _slots(record: dict[str, Any], chunk_len: int, options: TopologyOptions) -> list[tuple]:
    """Candidate windows (chunk, start in chunk) of a record: non-overlapping, seeded order, four
    times as many as needed (some may hold too many N)."""
    length, size = record["length"], options.length
    slots = [
        (chunk, start)
        for chunk in range(math.ceil(length / chunk_len))
        for start in range(0, min(chunk_len, length - chunk * chunk_len) - size + 1, size)
    ]
    order = _seeded(options.seed, "windows", record["key"]).permutation(len(slots))
    return [slots[i] for i in order[: 4 * options.windows]]


@dataclass
class Window:
    record: str
    offset: int
    bases: bytes


def sample_windows(
    shard_dir: str | Path,
    manifest: dict[str, Any],
    records: Sequence[dict[str, Any]],
    options: TopologyOptions,
    log: Log = print,
) -> dict[str, list[Window]]:
    """Up to ``windows`` windows of each record (upper-cased), read from the shards: only the
    chunks that hold a candidate window are kept in memory."""
    chunk_len = int(manifest["options"]["chunk_len"])
    slots = {r["key"]: _slots(r, chunk_len, options) for r in records}
    wanted = {(key, chunk) for key, items in slots.items() for chunk, _ in items}
    chunks: dict[tuple[str, int], bytes] = {}
    for kingdom in sorted({r["kingdom"] for r in records}):
        for split in ("train", "val"):
            for shard in manifest["kingdoms"].get(kingdom, {}).get(split, {}).get("shards", []):
                for sample in tar_samples(storage.join(shard_dir, shard["path"])):
                    meta = _meta(sample)
                    where = (meta["record"], int(meta["chunk"]))
                    if where in wanted:
                        chunks[where] = bytes(sample["seq"]).upper()
        log(f"topology: read {kingdom}")
    out: dict[str, list[Window]] = {}
    for r in records:
        found = []
        for chunk, start in slots[r["key"]]:
            data = chunks.get((r["key"], chunk))
            if data is None:
                continue
            bases = data[start : start + options.length]
            n = int((_CODES[np.frombuffer(bases, dtype=np.uint8)] == 4).sum())
            if len(bases) == options.length and n <= options.max_n_fraction * options.length:
                found.append(Window(r["key"], chunk * chunk_len + start, bases))
            if len(found) == options.windows:
                break
        out[r["key"]] = found
    return out


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(sample["json"])


# ----------------------------------------------------------------------------- diagrams

#: Bases of history that set a chaos-game point to float64 precision (older ones weigh < 2^-64).
_MEMORY = 64


def cgr_cloud(bases: bytes, points: int) -> np.ndarray:
    """[points, 3] chaos-game cloud of a window: the trajectory of its A/C/G/T bases (upper- or
    lower-case; others skipped) on the tetrahedron's corners, at ``points`` evenly spaced
    positions (all of them when there are fewer).

    The point after base t is centre + sum_j 2^-(j+1) (corner of base t-j - centre), the closed
    form of ``representations.cgr_points`` (a test ties the two); only the chosen positions are
    computed, each from its last ``_MEMORY`` bases.
    """
    from nucleo.core.representations import CORNERS

    corner = CORNERS["tetrahedron"].double().numpy()
    centre = corner.mean(0)
    codes = _CODES[np.frombuffer(bytes(bases).upper(), dtype=np.uint8)]
    codes = codes[codes < 4].astype(np.int64)
    if len(codes) == 0:
        return np.zeros((0, corner.shape[1]))
    at = np.linspace(0, len(codes) - 1, min(points, len(codes))).round().astype(np.int64)
    back = at[:, None] - np.arange(_MEMORY)[None, :]  # [points, memory]: t, t-1, ...
    steps = np.where(back[..., None] >= 0, corner[codes[back.clip(0)]] - centre, 0.0)
    return centre + np.einsum("pjd,j->pd", steps, 0.5 ** np.arange(1, _MEMORY + 1))


def persistence(cloud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H0 deaths [n] sorted, H1 [m, 2] (birth, death)) of the Vietoris-Rips filtration of a
    cloud, finite classes only. Edge collapse first: the same diagrams, far fewer triangles."""
    import gudhi

    tree = gudhi.RipsComplex(points=cloud).create_simplex_tree(max_dimension=1)
    tree.collapse_edges()
    tree.expansion(2)
    tree.compute_persistence()
    h0 = tree.persistence_intervals_in_dimension(0).reshape(-1, 2)
    h1 = tree.persistence_intervals_in_dimension(1).reshape(-1, 2)
    return np.sort(h0[np.isfinite(h0[:, 1]), 1]), h1[np.isfinite(h1[:, 1])]


def h0_wasserstein(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact W1 (L-infinity ground metric) between H0 diagrams whose births are all 0, for many
    pairs at once: a [P, n], b [P, m], each row sorted deaths (pad with zeros: a point at 0 is on
    the diagonal and costs nothing). Returns [P].

    Matching (0, x) with (0, y) costs |x - y|, leaving x unmatched x / 2. |x - y| is a Monge
    cost, so an optimal matching is monotone and the cost is the alignment recursion
    dp[i, j] = min(dp[i-1, j] + a_i / 2, dp[i, j-1] + b_j / 2, dp[i-1, j-1] + |a_i - b_j|). A
    row's dependence on its own left neighbour is a running minimum (dp[i, j] = S_j +
    min_{k<=j} (c_k - S_k), S the prefix sums of b / 2), so a row is a few vector operations.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    count, m = b.shape
    prefix = np.zeros((count, m + 1))
    np.cumsum(b / 2, axis=1, out=prefix[:, 1:])
    row, c, pair = prefix.copy(), np.empty_like(prefix), np.empty_like(b)
    for i in range(a.shape[1]):
        x = a[:, i : i + 1]
        np.subtract(x, b, out=pair)
        np.abs(pair, out=pair)
        pair += row[:, :-1]  # dp[i-1, j-1] + |a_i - b_j|
        np.add(row, x / 2, out=c)  # dp[i-1, j] + a_i / 2
        np.minimum(c[:, 1:], pair, out=c[:, 1:])
        c -= prefix
        np.minimum.accumulate(c, axis=1, out=row)
        row += prefix
    return row[:, -1]


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W1 (L-infinity ground metric) between diagrams a [n, 2] and b [m, 2]: the
    Hungarian algorithm (scipy) on the (n + m) x (m + n) cost matrix in which every point may
    go to the diagonal at (death - birth) / 2 (``representations.wasserstein`` in numpy)."""
    from scipy.optimize import linear_sum_assignment

    n, m = len(a), len(b)
    cost = np.zeros((n + m, m + n))
    cost[:n, :m] = np.abs(a[:, None, :] - b[None, :, :]).max(-1) if n and m else 0.0
    cost[:n, m:] = ((a[:, 1] - a[:, 0]) / 2)[:, None]
    cost[n:, :m] = ((b[:, 1] - b[:, 0]) / 2)[None, :]
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def distance_matrices(
    diagrams: Sequence[tuple[np.ndarray, np.ndarray]], log: Log = print, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """[N, N] W1 distances between the H0 diagrams and between the H1 diagrams of N windows."""
    count = len(diagrams)
    width = max((len(h0) for h0, _ in diagrams), default=0)
    deaths = np.zeros((count, width))
    for k, (h0, _) in enumerate(diagrams):
        deaths[k, width - len(h0) :] = h0  # zeros first: rows stay sorted
    rows, cols = np.triu_indices(count, 1)
    d0, d1 = np.zeros((count, count)), np.zeros((count, count))
    started = time.time()
    for s in range(0, len(rows), block):
        i, j = rows[s : s + block], cols[s : s + block]
        d0[i, j] = d0[j, i] = h0_wasserstein(deaths[i], deaths[j])
        if s and s // block % 10 == 0:
            done = s / len(rows)
            eta = (time.time() - started) * (1 - done) / done
            log(f"topology: H0 distances {done:.0%} (about {eta:.0f} s left)")
    log(f"topology: H0 distances of {len(rows):,} pairs in {time.time() - started:.1f} s")
    started = time.time()
    step = max(1, count // 5)
    for i in range(count):
        for j in range(i + 1, count):
            d1[i, j] = d1[j, i] = wasserstein(diagrams[i][1], diagrams[j][1])
        if (i + 1) % step == 0 and i + 1 < count:
            done = 1 - (count - i - 1) ** 2 / count**2
            eta = (time.time() - started) * (1 - done) / done
            log(f"topology: H1 distances {done:.0%} (about {eta:.0f} s left)")
    log(f"topology: H1 distances in {time.time() - started:.1f} s")
    return d0, d1


# ----------------------------------------------------------------------------- groups


def group_sums(d: np.ndarray, labels: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of d over window pairs, pair count), [groups, groups] each; distinct windows only
    (the diagonal of ``d`` is left out). labels: [N] group index of each window."""
    onehot = np.zeros((len(labels), groups))
    onehot[np.arange(len(labels)), labels] = 1.0
    sizes = onehot.sum(0)
    sums = onehot.T @ d @ onehot - np.diag(onehot.T @ np.diag(d))
    return sums, np.outer(sizes, sizes) - np.diag(sizes)


def group_matrix(d: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, matrix [G, G], spread [G]) of window distances ``d`` grouped by ``labels``:
    matrix[a, b] = mean distance over pairs (window of a, window of b), 0 on the diagonal;
    spread[a] = mean over pairs of distinct windows of a (nan with fewer than 2)."""
    names = sorted(set(labels))
    index = np.array([names.index(x) for x in labels])
    sums, counts = group_sums(d, index, len(names))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    means = (means + means.T) / 2  # exactly symmetric (the matrix products round)
    spread = np.diag(means).copy()
    matrix = means.copy()
    np.fill_diagonal(matrix, 0.0)
    return names, matrix, spread


def excess(matrix: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """matrix[a, b] - (spread[a] + spread[b]) / 2, 0 on the diagonal: how much farther apart the
    windows of two groups are than each group's own windows (half the energy distance of the
    two sets of diagrams; about 0 for two samples of one genome)."""
    out = matrix - (spread[:, None] + spread[None, :]) / 2
    np.fill_diagonal(out, 0.0)
    return out


def half_excess(d: np.ndarray, record: np.ndarray) -> np.ndarray:
    """The excess between the two halves (alternate windows) of each record with 4 windows or
    more: the excess that sampling noise alone gives."""
    out = []
    for r in np.unique(record):
        mine = np.flatnonzero(record == r)
        if len(mine) >= 4:
            halves = np.zeros(len(mine), dtype=np.int64)
            halves[1::2] = 1
            _, matrix, spread = group_matrix(d[np.ix_(mine, mine)], list(halves))
            out.append(excess(matrix, spread)[0, 1])
    return np.array(out)


LEVELS = (
    ("record", "the same record (noise floor)"),
    ("species", "one species, different records"),
    ("kingdom", "one kingdom, different species"),
    ("between", "different kingdoms"),
)


def level_masks(species: np.ndarray, kingdom: np.ndarray) -> dict[str, np.ndarray]:
    """[R, R] bool record pairs of each level above ``record`` (records as label arrays)."""
    same_k = kingdom[:, None] == kingdom[None, :]
    same_s = (species[:, None] == species[None, :]) & same_k
    other = ~np.eye(len(kingdom), dtype=bool)
    return {"species": same_s & other, "kingdom": same_k & ~same_s, "between": ~same_k}


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _bootstrap(
    ratio: np.ndarray, species: np.ndarray, kingdom: np.ndarray, reps: int,
    rng: np.random.Generator,
) -> dict[str, list[float]]:  # fmt: skip
    """95% intervals of each level's mean ratio to the floor, records resampled with
    replacement (a record paired with its own copy is left out)."""
    draws: dict[str, list[float]] = {name: [] for name, _ in LEVELS[1:]}
    for _ in range(reps):
        pick = rng.integers(0, len(kingdom), len(kingdom))
        twin = pick[:, None] == pick[None, :]
        sub = ratio[np.ix_(pick, pick)]
        for name, mask in level_masks(species[pick], kingdom[pick]).items():
            draws[name].append(_mean(sub[mask & ~twin]))
    out = {}
    for name, values in draws.items():
        finite = np.array(values)[np.isfinite(values)]
        out[name] = [float(q) for q in np.percentile(finite, [2.5, 97.5])] if len(finite) else []
    return out


def _ratio_of_means(sums: np.ndarray, counts: np.ndarray, between: np.ndarray) -> float:
    """mean over the ``between`` cells / mean over the others, pooled over pairs."""
    inside = ~between
    if counts[inside].sum() == 0 or counts[between].sum() == 0:
        return math.nan
    return (sums[between].sum() / counts[between].sum()) / (
        sums[inside].sum() / counts[inside].sum()
    )


def permutation_test(
    d: np.ndarray, labels: np.ndarray, groups: int, reps: int, rng: np.random.Generator
) -> dict[str, float]:
    """Is d larger between groups than within them? statistic: mean distance over pairs from
    different groups / mean over pairs from the same group; p: the share of label
    permutations (group sizes kept) whose statistic is at least as large (+1 smoothing)."""
    between = ~np.eye(groups, dtype=bool)
    observed = _ratio_of_means(*group_sums(d, labels, groups), between)
    if not math.isfinite(observed):
        return {"statistic": math.nan, "p": math.nan, "permutations": 0}
    hits = sum(
        _ratio_of_means(*group_sums(d, rng.permutation(labels), groups), between) >= observed
        for _ in range(reps)
    )
    return {"statistic": observed, "p": (hits + 1) / (reps + 1), "permutations": reps}


# ----------------------------------------------------------------------------- the analysis


def gc_fraction(bases: bytes) -> float:
    codes = _CODES[np.frombuffer(bytes(bases).upper(), dtype=np.uint8)]
    acgt = (codes < 4).sum()
    return float(((codes == 1) | (codes == 2)).sum() / acgt) if acgt else math.nan


def window_diagrams(
    windows: Sequence[bytes], points: int, log: Log = print
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Persistence diagrams of the CGR clouds of ``windows``, with a progress line per fifth."""
    out = []
    started = time.time()
    step = max(1, len(windows) // 5)
    for k, bases in enumerate(windows):
        out.append(persistence(cgr_cloud(bases, points)))
        if (k + 1) % step == 0 and k + 1 < len(windows):
            log(f"topology: diagrams {k + 1}/{len(windows)} ({time.time() - started:.0f} s)")
    log(f"topology: {len(windows)} diagrams in {time.time() - started:.1f} s")
    return out


def _groups(d: np.ndarray, labels: list[str], record_floor: dict[str, float], members) -> dict:
    """One level's matrices: mean distance, spread, excess, and ratio to the members' floor."""
    names, matrix, spread = group_matrix(d, labels)
    floor = np.array([_mean(np.array([record_floor[k] for k in members[n]])) for n in names])
    pair_floor = (floor[:, None] + floor[None, :]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):  # a floor of 0: a repeat's windows
        ratio = np.where(np.eye(len(names), dtype=bool), spread[:, None], matrix) / pair_floor
    return {
        "names": names,
        "matrix": matrix,
        "spread": spread,
        "floor": floor,
        "excess": excess(matrix, spread),
        "ratio": ratio,
    }


def analyse(
    windows: Sequence[Window],
    records: Sequence[dict[str, Any]],
    options: TopologyOptions,
    log: Log = print,
) -> dict[str, Any]:
    """Everything but the reading: diagrams, distances, matrices, levels, tests (see the module
    docstring). records: manifest entries (key, kingdom, and what ``species_label`` reads)."""
    info = {r["key"]: r for r in records}
    windows = sorted(windows, key=lambda w: (w.record, w.offset))
    rec = [w.record for w in windows]
    names = sorted(set(rec))
    kingdom_of = {k: info[k]["kingdom"] for k in names}
    species_of = {k: f"{kingdom_of[k]}: {species_label(info[k])}" for k in names}
    d0, d1 = distance_matrices(
        window_diagrams([w.bases for w in windows], options.points, log), log
    )
    d = d0 + d1
    record_idx = np.array([names.index(k) for k in rec])
    _, _, floor = group_matrix(d, rec)
    record_floor = dict(zip(names, floor, strict=True))
    matrices = {}
    for level, of in (("record", None), ("species", species_of), ("kingdom", kingdom_of)):
        members: dict[str, list[str]] = {}
        for k in names:
            members.setdefault(k if of is None else of[k], []).append(k)
        labels = [k if of is None else of[k] for k in rec]
        matrices[level] = _groups(d, labels, record_floor, members)
    record_m = matrices["record"]
    species_idx = np.unique([species_of[k] for k in names], return_inverse=True)[1]
    kingdom_idx = np.unique([kingdom_of[k] for k in names], return_inverse=True)[1]
    masks = level_masks(species_idx, kingdom_idx)
    dims = {name: group_matrix(m, rec) for name, m in (("h0", d0), ("h1", d1))}
    rng = _seeded(options.seed, "tests")
    intervals = _bootstrap(record_m["ratio"], species_idx, kingdom_idx, options.bootstrap, rng)
    levels = {"record": {"mean": _mean(floor), "ratio": 1.0, "interval": []}}
    levels["record"].update({dim: _mean(spread) for dim, (_, _, spread) in dims.items()})
    for name, mask in masks.items():
        levels[name] = {
            "mean": _mean(record_m["matrix"][mask]),
            "ratio": _mean(record_m["ratio"][mask]),
            "interval": intervals[name],
            "pairs": int(mask.sum() // 2),
            **{dim: _mean(matrix[mask]) for dim, (_, matrix, _) in dims.items()},
        }
    for name, what in LEVELS:
        levels[name]["what"] = what
    halves = half_excess(d, record_idx)
    tests = {
        "records": permutation_test(d, record_idx, len(names), options.permutations, rng),
        "kingdoms": permutation_test(
            record_m["matrix"], kingdom_idx, int(kingdom_idx.max()) + 1, options.permutations, rng
        ),
        "half_excess": {
            "records": len(halves),
            "mean": _mean(halves),
            "q95": float(np.percentile(halves, 95)) if len(halves) else math.nan,
        },
    }
    gc = np.array(
        [_mean(np.array([gc_fraction(w.bases) for w in windows if w.record == k])) for k in names]
    )
    rows, cols = np.triu_indices(len(names), 1)
    spearman = {"rho": math.nan, "p": math.nan, "pairs": len(rows)}
    if len(rows) >= 3:
        from scipy.stats import spearmanr

        result = spearmanr(record_m["matrix"][rows, cols], np.abs(gc[rows] - gc[cols]))
        spearman.update(rho=float(result.statistic), p=float(result.pvalue))
    record_rows = []
    for i, key in enumerate(names):
        others = np.delete(np.arange(len(names)), i)
        near = others[np.argmin(record_m["excess"][i, others])] if len(others) else None
        record_rows.append(
            {
                "key": key,
                "kingdom": kingdom_of[key],
                "species": species_of[key],
                "windows": int((record_idx == i).sum()),
                "offsets": [w.offset for w in windows if w.record == key],
                "gc": float(gc[i]),
                "floor": float(floor[i]),
                **{f"floor_{dim}": float(spread[i]) for dim, (_, _, spread) in dims.items()},
                "nearest": None if near is None else names[near],
                "nearest_ratio": math.nan if near is None else float(record_m["ratio"][i, near]),
            }
        )
    record_rows.sort(key=lambda r: (r["kingdom"], r["species"], r["key"]))
    return {
        "options": asdict(options),
        "distance": "W1(H0) + W1(H1), Vietoris-Rips of the tetrahedron CGR cloud",
        "windows": len(windows),
        "records": record_rows,
        "levels": levels,
        "tests": tests,
        "gc_spearman": spearman,
        "matrices": matrices,
    }


def topology(shard_dir: str | Path, options: TopologyOptions, log: Log = print) -> dict[str, Any]:
    """Select records, draw windows, and ``analyse`` them (see the module docstring)."""
    started = time.time()
    manifest = load_manifest(shard_dir)
    records = select_records(manifest, options)
    log(
        f"topology: {len(records)} records of {len({r['kingdom'] for r in records})} kingdoms, "
        f"up to {options.windows} windows of {options.length} bases each"
    )
    found = sample_windows(shard_dir, manifest, records, options, log)
    windows = [w for key in sorted(found) for w in found[key]]
    if len(windows) < 2:
        raise TopologyError(
            "length",
            f"{options.length}: fewer than 2 windows with at most "
            f"{options.max_n_fraction:.0%} N in the selected records",
        )
    result = analyse(windows, records, options, log)
    result["shards"] = str(shard_dir)
    result["skipped"] = sorted(key for key, items in found.items() if not items)
    result["seconds"] = time.time() - started
    return result


# ----------------------------------------------------------------------------- the report

START, END = "<!-- topology: start -->", "<!-- topology: end -->"
PLURAL = {"record": "records", "species": "species", "kingdom": "kingdoms"}


def _csv(path: Path, m: dict[str, Any]) -> None:
    """One level's mean-distance matrix (zero diagonal), with each group's spread and mean
    noise floor in front."""
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "spread", "noise_floor", *m["names"]])
        for name, spread, floor, row in zip(
            m["names"], m["spread"], m["floor"], m["matrix"], strict=True
        ):
            writer.writerow([name, f"{spread:.6g}", f"{floor:.6g}", *(f"{v:.6g}" for v in row)])


def _tree(m: dict[str, Any]) -> np.ndarray | None:
    """Average-linkage (UPGMA) tree of a level's excess distances (negative ones as 0); None
    with fewer than 2 groups."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    if len(m["names"]) < 2:
        return None
    return linkage(squareform(np.clip(np.nan_to_num(m["excess"]), 0, None)), method="average")


def _plots(result: dict[str, Any], folder: Path, stem: str) -> dict[str, str]:
    """The heatmap and the dendrogram figures (kingdoms and species); name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram, leaves_list

    noise = result["tests"]["half_excess"]["q95"]
    panels = [(level, result["matrices"][level]) for level in ("kingdom", "species")]
    files = {
        "heatmap": f"{stem}_topology_heatmap.png",
        "dendrogram": f"{stem}_topology_dendrogram.png",
    }
    many = len(panels[1][1]["names"])
    fig, axes = plt.subplots(
        1, 2, figsize=(9 + 0.2 * many, 4.5 + 0.13 * many), width_ratios=[1, 1.6]
    )
    for ax, (level, m) in zip(axes, panels, strict=True):
        tree = _tree(m)
        order = leaves_list(tree) if tree is not None else np.arange(len(m["names"]))
        shown = m["ratio"][np.ix_(order, order)]
        image = ax.imshow(shown, cmap="viridis")
        labels = [m["names"][i] for i in order]
        small = 8 if len(labels) <= 15 else 6
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=small)
        ax.set_yticks(range(len(labels)), labels, fontsize=small)
        if len(labels) <= 15:
            middle = (np.nanmin(shown) + np.nanmax(shown)) / 2
            for (y, x), value in np.ndenumerate(shown):
                ink = "black" if value > middle else "white"
                ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=6, color=ink)
        ax.set_title(f"{PLURAL[level]}: mean window-pair distance / noise floor", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.6)
    fig.tight_layout()
    fig.savefig(folder / files["heatmap"], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(14, 3 + 0.2 * many), width_ratios=[1, 1.4])
    for ax, (level, m) in zip(axes, panels, strict=True):
        tree = _tree(m)
        if tree is None:
            ax.text(0.5, 0.5, f"one {level}: no tree", ha="center", transform=ax.transAxes)
            continue
        dendrogram(tree, labels=m["names"], orientation="left", ax=ax, leaf_font_size=7)
        if math.isfinite(noise):
            ax.axvline(noise, color="red", linestyle="--", linewidth=1)
            ax.text(noise, ax.get_ylim()[1], " noise (halves of one genome, 95%)", color="red",
                    fontsize=7, va="top")  # fmt: skip
        ax.set_xlabel("excess distance (mean between - own spreads)", fontsize=8)
        ax.set_title(f"{PLURAL[level]} (average linkage of the excess)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / files["dendrogram"], dpi=110)
    plt.close(fig)
    return files


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def section(result: dict[str, Any], files: dict[str, str], command: str = "") -> str:
    """The markdown section of the report (between the START and END markers)."""
    opts, levels, tests = result["options"], result["levels"], result["tests"]
    records = result["records"]
    lines = [
        START,
        "## Topology across species",
        "",
        *([f"- command: `{command}`"] if command else []),
        f"- {len(records)} records ({len({r['species'] for r in records})} species, "
        f"{len({r['kingdom'] for r in records})} kingdoms; at most {opts['records']} per kingdom, "
        f"spread over its species), {result['windows']} windows: up to {opts['windows']} "
        f"non-overlapping windows of {opts['length']:,} bases per record (at most "
        f"{opts['max_n_fraction']:.0%} N), seed {opts['seed']}; computed in "
        f"{result['seconds']:.0f} s",
        f"- each window: its chaos-game trajectory (tetrahedron corners) at {opts['points']} "
        "evenly spaced positions; H0 and H1 of the Vietoris-Rips filtration (gudhi; the `ph` "
        "loss's)",
        "- distance between two windows: W1(H0) + W1(H1), order-1 Wasserstein with the "
        "L-infinity ground metric (the `ph` loss's); between two groups (records, species, "
        "kingdoms): the mean over all pairs of their windows",
        "- **noise floor** of a record: the mean distance between two of its own windows. "
        "*Ratio*: a distance over the noise floors of the records involved (1: no more "
        "different than two stretches of the same genome). *Excess*: the between-group mean "
        "minus the mean of the groups' own spreads (about 0 for two samples of one genome); "
        "the dendrograms join groups by average excess",
    ]
    if result.get("skipped"):
        lines.append(f"- records without a usable window: {', '.join(result['skipped'])}")
    lines += [
        "",
        "| window pairs from | record pairs | mean distance | H0 | H1 | ratio to the floor "
        "(95% bootstrap over records) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, level in levels.items():
        interval = level["interval"]
        ci = f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else ""
        ratio = "1" if name == "record" else f"{_num(level['ratio'], 2)}{ci}"
        pairs = str(level.get("pairs", "-"))
        lines.append(
            f"| {level['what']} | {pairs} | {_num(level['mean'])} | {_num(level['h0'])} | "
            f"{_num(level['h1'])} | {ratio} |"
        )
    rt, kt, half = tests["records"], tests["kingdoms"], tests["half_excess"]
    gc = result["gc_spearman"]
    lines += [
        "",
        f"Permutation tests ({rt['permutations']} shuffles): windows of different records are "
        f"{_num(rt['statistic'], 2)}x as far apart as windows of the same record (p = "
        f"{_num(rt['p'], 3)}; window labels shuffled across records); records of different "
        f"kingdoms are {_num(kt['statistic'], 2)}x as far apart as records of the same kingdom "
        f"(p = {_num(kt['p'], 3)}; record labels shuffled across kingdoms). The excess between "
        f"the two halves of one record's windows (sampling noise alone): mean "
        f"{_num(half['mean'])}, 95th percentile {_num(half['q95'])} ({half['records']} records; "
        f"the dashed line of the dendrograms). Spearman correlation of record-pair distance "
        f"with the records' GC difference: {_num(gc['rho'], 2)} ({gc['pairs']} pairs).",
        "",
    ]
    kingdom = result["matrices"]["kingdom"]
    names, ratio, extra = kingdom["names"], kingdom["ratio"], kingdom["excess"]
    lines += [
        "| kingdom | records | windows | noise floor (records' mean, min-max) | kingdom spread "
        "/ floor | other kingdoms / floor | nearest kingdom: ratio, excess |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, name in enumerate(names):
        mine = [r for r in records if r["kingdom"] == name]
        floors = [r["floor"] for r in mine if math.isfinite(r["floor"])]
        span = (
            f"{_num(float(np.mean(floors)))} ({min(floors):.3f}-{max(floors):.3f})"
            if floors
            else "-"
        )
        others = [j for j in range(len(names)) if j != i]
        near = min(others, key=lambda j: extra[i, j]) if others else None
        nearest = (
            f"{names[near]}: {ratio[i, near]:.2f}, {extra[i, near]:.3f}"
            if near is not None
            else "-"
        )
        away = float(np.mean(ratio[i, others])) if others else math.nan
        lines.append(
            f"| {name} | {len(mine)} | {sum(r['windows'] for r in mine)} | {span} | "
            f"{_num(ratio[i, i], 2)} | {_num(away, 2)} | {nearest} |"
        )
    lines += [
        "",
        "Kingdom x kingdom, mean window-pair distance over the two kingdoms' mean noise floor "
        "(diagonal: two windows of one kingdom):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_num(v, 2) for v in ratio[i]) + " |")
    lines += [
        "",
        f"![topology dendrograms]({files['dendrogram']})",
        "",
        f"![topology heatmaps]({files['heatmap']})",
        "",
        "<details><summary>Noise floor per record</summary>",
        "",
        "| record | kingdom: species | windows | GC | floor | H0 | H1 | nearest record (ratio) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['key']} | {r['species']} | {r['windows']} | {_num(r['gc'])} | "
            f"{_num(r['floor'])} | {_num(r['floor_h0'])} | {_num(r['floor_h1'])} | "
            f"{r['nearest'] or '-'} ({_num(r['nearest_ratio'], 2)}) |"
        )
    lines += [
        "",
        "</details>",
        "",
        "Files: " + ", ".join(f"`{name}`" for name in files.values()) + ".",
        END,
        "",
    ]
    return "\n".join(lines)


def insert_section(report: Path, text: str) -> None:
    """Put ``text`` into ``report``: in place of an earlier topology section, else at the end
    (the rest of the report is left as it is); a new file when there is none."""
    old = report.read_text() if report.exists() else ""
    if START in old and END in old:
        head, rest = old.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + text
    report.write_text(new)


def write_topology(
    result: dict[str, Any], report: str | Path, command: str = "", log: Log = print
) -> dict[str, str]:
    """Write the matrices (JSON, CSV), the two figures and the report's section beside
    ``report`` (``<stem>_topology*``); returns what -> file name."""
    import json

    report = Path(report)
    folder, stem = report.parent, report.stem
    folder.mkdir(parents=True, exist_ok=True)
    files = _plots(result, folder, stem)
    files["json"] = f"{stem}_topology.json"
    (folder / files["json"]).write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    for level in ("record", "species", "kingdom"):
        files[level] = f"{stem}_topology_{level}.csv"
        _csv(folder / files[level], result["matrices"][level])
    insert_section(report, section(result, files, command))
    log(f"topology: wrote {', '.join(files.values())} and a section of {report}")
    return files
