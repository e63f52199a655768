"""k-mer Markov baselines: the floor every network's bits per base must beat.

A ``MarkovModel`` holds the counts of every (k+1)-mer over A C G T for k = 0 .. max_order,
fit on the training split of a shard set (one pass gives every order), and predicts each base
from the up-to-k bases before it. Probabilities are smoothed by **interpolated Witten-Bell**,
recursive down to order 0 and a uniform floor (1/4 each)::

    P_k(w | h) = (c(h w) + t(h) P_{k-1}(w | h')) / (c(h) + t(h))      (= P_{k-1} when c(h) = 0)

where h' is h without its oldest base, c(h) the count of context h and t(h) the number of
distinct bases seen after it. Why Witten-Bell: it has no parameter to tune and interpolates
every order with raw counts. Kneser-Ney replaces lower-order counts by continuation counts
(how many distinct bases precede), which on a 4-letter alphabet saturate at 4, so its lower
orders would carry almost nothing; with DNA's dense low-order counts, the raw counts are the
better estimate.

Counting is vectorised numpy: 2-bit codes, the (max_order+1)-mer ending at each base as one
integer (newest base in the lowest bits), one ``np.bincount`` per buffer of chunks; the lower
orders are marginals of the top one plus the k-mers that start a run of bases. Contexts that
hold an N are skipped (the run of bases restarts after each N). Input is case-insensitive:
soft-masked ``acgt`` counts as ``ACGT``; ``N``/``n`` (and anything else) is unknown.

Scoring: ``nats`` per base, ``score_records`` per record of a genome file, and ``score_windows``
on char-tokenizer windows exactly as training scores its validation windows (the reports built
on it, ``validation_bits`` and the markdown, live in ``nucleo.studies.markov``; training's
``eval.floor`` logs it beside ``val/bits_per_base``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucleo.core.alphabet import BASES
from nucleo.core.alphabet import N as N_ID
from nucleo.core.progress import duration, rate

FORMAT = "nucleo-markov/1"
SMOOTHING = "interpolated Witten-Bell, down to order 0 and a uniform floor"
#: highest order a model may hold (4^(k+1) counts per order: order 12 is ~0.5 GB of int64)
MAX_ORDER = 12
#: bases counted per np.bincount call (chunks are buffered up to this)
BUFFER_BASES = 1 << 23
#: positions scored per block (bounds the memory of scoring a chromosome)
SCORE_BLOCK = 1 << 20
#: fitting reads at most this many training bases unless told otherwise (~1 min on 2 cores)
DEFAULT_MAX_BASES = 300_000_000

# byte -> 2-bit code: A C G T (either case) -> 0 1 2 3, anything else -> 4 (unknown)
_TABLE = bytearray([4] * 256)
for _code, _base in enumerate(BASES):
    _TABLE[ord(_base)] = _TABLE[ord(_base.lower())] = _code
_TABLE = bytes(_TABLE)
assert N_ID == 4 and BASES == "ACGT"  # the char tokenizer's ids are these codes


def codes_of(seq: bytes | bytearray | str) -> np.ndarray:
    """[L] uint8 codes of ``seq``: A C G T (either case) 0..3, anything else (N, n) 4."""
    raw = seq.encode("ascii") if isinstance(seq, str) else bytes(seq)
    return np.frombuffer(raw.translate(_TABLE), dtype=np.uint8)


def _runs(codes: np.ndarray) -> np.ndarray:
    """[L] int64: how many known bases end at each position (0 at an unknown one)."""
    pos = np.arange(len(codes))
    last_unknown = np.maximum.accumulate(np.where(codes > 3, pos, -1))
    return pos - last_unknown


def _kmer_index(codes: np.ndarray, k: int) -> np.ndarray:
    """[L] intp: the k bases ending at each position as one number (newest in the lowest two
    bits; unknown bases read as A, the caller masks them by ``_runs``)."""
    codes = (codes & 3).astype(np.intp)
    index = codes.copy()
    for back in range(1, min(k, len(codes))):
        index[back:] |= codes[:-back] << (2 * back)
    return index


class _Counter:
    """Accumulates the (k+1)-mer counts of every order k <= max_order over many sequences."""

    def __init__(self, max_order: int) -> None:
        self.max_order = max_order
        self.top = np.zeros(4 ** (max_order + 1), dtype=np.int64)
        # (k+1)-mers that start a run of known bases: not in the marginals of order k+1
        self.starts = [np.zeros(4 ** (k + 1), dtype=np.int64) for k in range(max_order)]
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.bases = 0

    def add(self, seq: bytes | bytearray | str) -> None:
        codes = codes_of(seq)
        self.buffer += [codes, np.full(1, 4, dtype=np.uint8)]  # an N between sequences
        self.buffered += len(codes)
        self.bases += len(codes)
        if self.buffered >= BUFFER_BASES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        codes = np.concatenate(self.buffer)
        self.buffer, self.buffered = [], 0
        top = self.max_order + 1
        runs, index = _runs(codes), _kmer_index(codes, top)
        self.top += np.bincount(index[runs >= top], minlength=len(self.top))
        short = (runs >= 1) & (runs < top)
        runs, index = runs[short], index[short]
        for k, counts in enumerate(self.starts):
            mer = index[runs == k + 1] & (len(counts) - 1)
            counts += np.bincount(mer, minlength=len(counts))

    def counts(self) -> list[np.ndarray]:
        """[4^k, 4] int64 counts (context, next base) of every order k."""
        self.flush()
        out = [self.top]
        for k in range(self.max_order - 1, -1, -1):
            out.append(out[-1].reshape(4, -1).sum(0) + self.starts[k])  # drop the oldest base
        return [c.reshape(-1, 4) for c in reversed(out)]


class MarkovModel:
    """k-mer Markov models of every order 0..max_order, smoothed (``SMOOTHING``).

    counts: per order k, [4^k, 4] int64 counts of (context, next base); a context's number is
    its bases in 2-bit codes, newest in the lowest bits. meta: what was fit on (JSON-able).
    """

    def __init__(self, counts: list[np.ndarray], meta: dict[str, Any] | None = None) -> None:
        for k, c in enumerate(counts):
            if c.shape != (4**k, 4):
                raise ValueError(f"order {k}: counts of shape {c.shape}, expected {(4**k, 4)}")
        self.counts = counts
        self.meta = {"max_order": self.max_order, "smoothing": SMOOTHING, **(meta or {})}
        # per order: lam [4^k] weight of the counts, ml [4^k, 4] their relative frequencies
        self._lam: list[np.ndarray] = []
        self._ml: list[np.ndarray] = []
        for c in counts:
            total = c.sum(1).astype(np.float64)
            types = (c > 0).sum(1)
            self._lam.append(total / np.maximum(total + types, 1))
            self._ml.append(c / np.maximum(total, 1)[:, None])

    @property
    def max_order(self) -> int:
        return len(self.counts) - 1

    @property
    def bases(self) -> int:
        """Bases the counts came from (order 0's total; a base after an N too)."""
        return int(self.counts[0].sum())

    @classmethod
    def fit(cls, seqs: Iterable[bytes | bytearray | str], max_order: int) -> MarkovModel:
        """Count every order up to ``max_order`` over ``seqs`` (contexts stop at each end)."""
        counter = _Counter(check_order(max_order))
        for seq in seqs:
            counter.add(seq)
        return cls(counter.counts(), {"bases_read": counter.bases})

    def _check(self, order: int) -> int:
        if not 0 <= order <= self.max_order:
            raise ValueError(f"order {order} is not in this model (orders 0..{self.max_order})")
        return order

    def _mix(
        self, context: np.ndarray, known: np.ndarray, order: int, target: np.ndarray | None
    ) -> Iterator[np.ndarray]:
        """The smoothed probability after each order 0..order: [P] of ``target``, or [P, 4]
        of every base when None. context: [P] context numbers; known: [P] bases in them."""
        p = np.full((len(context), 4) if target is None else len(context), 0.25)
        for k in range(order + 1):
            use = known >= k
            h = context[use] & (4**k - 1)
            lam = self._lam[k][h]
            if target is None:
                p[use] = lam[:, None] * self._ml[k][h] + (1 - lam)[:, None] * p[use]
            else:
                p[use] = lam * self._ml[k][h, target[use]] + (1 - lam) * p[use]
            yield p

    def probabilities(self, context: bytes | str, order: int) -> np.ndarray:
        """[4] P(A, C, G, T | the last ``order`` bases of ``context``, fewer after an N)."""
        codes = codes_of(context)
        codes = codes[len(codes) - min(self._check(order), len(codes)) :]
        known = np.array([_runs(codes)[-1] if len(codes) else 0])
        number = _kmer_index(codes, order)[-1:] if len(codes) else np.zeros(1, np.intp)
        *_, p = self._mix(number, known, order, None)
        return p[0]

    def _blocks(
        self, codes: np.ndarray, order: int
    ) -> Iterator[tuple[np.ndarray, Iterator[np.ndarray]]]:
        """Per block of ``SCORE_BLOCK`` positions: the positions of its known bases, and the
        probability of each after every order 0..order (``_mix``), from the bases before it."""
        self._check(order)
        for start in range(0, len(codes), SCORE_BLOCK):
            left = max(0, start - order)  # the context of the block's first bases
            block = codes[left : start + SCORE_BLOCK]
            known_before = np.zeros(len(block), dtype=np.intp)
            context = np.zeros(len(block), dtype=np.intp)
            if order and len(block) > 1:
                known_before[1:] = np.minimum(_runs(block[:-1]), order)
                context[1:] = _kmer_index(block[:-1], order)
            scored = block < 4
            scored[: start - left] = False
            target = block[scored].astype(np.intp)
            mix = self._mix(context[scored], known_before[scored], order, target)
            yield np.flatnonzero(scored) + left, mix

    def nats_by_order(self, seq: bytes | bytearray | str, order: int) -> np.ndarray:
        """[order+1, L] float64 nats of each base of ``seq`` given up to k bases before it
        within ``seq`` (row k; fewer at the start and after an N); NaN where the base is N."""
        codes = codes_of(seq)
        out = np.full((self._check(order) + 1, len(codes)), np.nan)
        for columns, mix in self._blocks(codes, order):
            for k, p in enumerate(mix):
                out[k, columns] = -np.log(p)
        return out

    def total_nats(self, seq: bytes | bytearray | str, order: int) -> tuple[float, int]:
        """(sum of nats, bases scored) over positions 1..L-1 of ``seq`` that are not N, as
        a causal network scores a window; memory bounded by the block, not by ``seq``."""
        total, count = 0.0, 0
        for columns, mix in self._blocks(codes_of(seq), order):
            *_, p = mix
            keep = columns >= 1
            total += float(-np.log(p[keep]).sum())
            count += int(keep.sum())
        return total, count

    def nats(self, seq: bytes | bytearray | str, order: int) -> np.ndarray:
        """[L] float64 nats of each base of ``seq`` given up to ``order`` bases before it within
        ``seq`` (fewer at the start and after an N: the lower orders); NaN where it is N."""
        return self.nats_by_order(seq, order)[order]

    def save(self, path: str | Path) -> Path:
        """One .npz: the counts of every order and the metadata (JSON) as ``meta``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"order_{k}": _compact(c) for k, c in enumerate(self.counts)}
        meta = {"format": FORMAT, **self.meta}
        with open(path, "wb") as fh:  # a name without .npz stays as given
            np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MarkovModel:
        """A model saved by ``save``; anything else raises ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such Markov model file")
        try:
            if not zipfile.is_zipfile(path):
                raise ValueError("not an .npz archive")
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                counts = [data[f"order_{k}"].astype(np.int64) for k in range(meta["max_order"] + 1)]
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise ValueError(
                f"{path}: not a nucleo Markov model ({err}); make one with nucleo baseline markov"
            ) from None
        return cls(counts, meta)


def _compact(counts: np.ndarray) -> np.ndarray:
    """uint32 when the counts fit (half the file), else int64."""
    return counts.astype(np.uint32) if counts.max(initial=0) < 2**32 else counts


def check_order(order: int) -> int:
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order {order} is out of range (0..{MAX_ORDER})")
    return order


def manifest_digest(shard_dir: str | Path) -> str:
    """SHA-256 of the shard set's manifest.json (names the exact shard set fit on)."""
    from data_pipeline import storage

    manifest = storage.read_bytes(storage.join(shard_dir, "manifest.json"))
    return hashlib.sha256(manifest).hexdigest()


def fit_from_shards(
    shard_dir: str | Path,
    max_order: int = 10,
    kingdoms: list[str] | None = None,
    max_bases: int | None = DEFAULT_MAX_BASES,
    progress: Callable[[str], None] | None = print,
) -> MarkovModel:
    """Fit every order up to ``max_order`` on the TRAIN split of a shard set.

    With ``max_bases`` (None: all), each kingdom gives its share in proportion to its training
    bases (the natural mixture, subsampled), read from its shards in order (chunks are dealt
    round-robin to a kingdom's shards, so its first shards sample all its records). The
    metadata records the bases read per kingdom. progress: receives a line now and then.
    """
    from data_pipeline import storage
    from data_pipeline.loader import tar_samples
    from data_pipeline.shards import load_manifest, shard_paths

    check_order(max_order)
    manifest = load_manifest(shard_dir)
    wanted = sorted(kingdoms or manifest["kingdoms"])
    shard_paths(shard_dir, manifest, "train", wanted)  # checks the kingdom names
    available = {k: int(manifest["kingdoms"][k].get("train", {}).get("bases", 0)) for k in wanted}
    total = sum(available.values())
    if total == 0:
        raise ValueError(f"{shard_dir}: no training bases in kingdoms {', '.join(wanted)}")
    goal = total if max_bases is None else min(total, max_bases)
    counter = _Counter(max_order)
    read: dict[str, int] = {}
    started, said = time.perf_counter(), 0
    for kingdom in wanted:
        quota = math.ceil(goal * available[kingdom] / total)
        read[kingdom] = 0
        for shard in manifest["kingdoms"][kingdom].get("train", {}).get("shards", []):
            if read[kingdom] >= quota:
                break
            for sample in tar_samples(storage.join(shard_dir, shard["path"]), on_bad="strict"):
                chunk = sample["seq"][: quota - read[kingdom]]
                counter.add(chunk)
                read[kingdom] += len(chunk)
                if read[kingdom] >= quota:
                    break
            done = counter.bases
            if progress is not None and (done - said >= goal / 10 or done >= goal):
                said = done
                seconds = time.perf_counter() - started
                eta = seconds * max(goal - done, 0) / max(done, 1)
                progress(f"read {rate(done)} of {rate(goal)} training bases ({kingdom}) | "
                         f"{rate(done / max(seconds, 1e-9))} bases/s | elapsed "
                         f"{duration(seconds)} | eta {duration(eta)}")  # fmt: skip
    counts = counter.counts()
    meta = {
        "shards": str(shard_dir),
        "manifest_sha256": manifest_digest(shard_dir),
        "kingdoms": wanted,
        "max_bases": max_bases,
        "bases_read": counter.bases,
        "training_bases": total,
        "bases_read_by_kingdom": read,
        "fit_seconds": round(time.perf_counter() - started, 1),
    }
    return MarkovModel(counts, meta)


def score_records(
    model: MarkovModel, path: str | Path, order: int
) -> Iterator[tuple[str, int, int, float]]:
    """(record id, bases, bases scored, nats) of every record of a FASTA or GenBank file,
    streamed; scored as ``total_nats`` (positions 1..L-1 that are not N)."""
    from data_pipeline.readers import read_sequences

    model._check(order)
    for record in read_sequences(path):
        nats, scored = model.total_nats(record.seq, order)
        yield record.id, len(record.seq), scored, nats


#: char-tokenizer id -> base letter (A C G T N are ids 0..4; ``codes_of`` reads them back)
_LETTERS = np.frombuffer(b"ACGTN", dtype=np.uint8)


@dataclass
class WindowNats:
    """The nats of a Markov model on a set of windows, pooled per kingdom, for every order.

    nats: [orders, K] float64 (row k: order k) over the scored bases of each kingdom's
    windows; bases: [K] bases scored; unknown: [K] N targets left out (no Markov
    probability); masked: [orders, 2] nats of the soft-masked bases and of the rest, a base
    counting by its masked share; masked_bases: [2] their bases (zeros without a mask).
    """

    nats: np.ndarray
    bases: np.ndarray
    unknown: np.ndarray
    masked: np.ndarray
    masked_bases: np.ndarray

    def flat(self) -> np.ndarray:
        """Every sum in one float64 vector (to all-reduce across ranks; ``from_flat``)."""
        parts = (self.nats, self.bases, self.unknown, self.masked, self.masked_bases)
        return np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])

    @classmethod
    def from_flat(cls, flat: np.ndarray, orders: int, n_kingdoms: int) -> WindowNats:
        sizes = [orders * n_kingdoms, n_kingdoms, n_kingdoms, orders * 2, 2]
        nats, bases, unknown, masked, masked_bases = np.split(flat, np.cumsum(sizes)[:-1])
        shape = (orders, n_kingdoms)
        return cls(nats.reshape(shape), bases, unknown, masked.reshape(orders, 2), masked_bases)

    def bits_per_base(self, order: int, kingdoms: Iterable[str]) -> dict[str, float]:
        """Bits per base of ``order``: ``all`` (bases pooled over every window), ``repeat`` and
        ``non_repeat`` where there are such bases, and each kingdom that has scored bases."""
        bits = {"all": float(self.nats[order].sum() / max(self.bases.sum(), 1) / math.log(2))}
        for j, part in enumerate(("repeat", "non_repeat")):
            if self.masked_bases[j] > 0:
                bits[part] = float(self.masked[order, j] / self.masked_bases[j] / math.log(2))
        for i, name in enumerate(kingdoms):
            if self.bases[i] > 0:
                bits[name] = float(self.nats[order, i] / self.bases[i] / math.log(2))
        return bits


def score_windows(
    model: MarkovModel,
    tokens: Any,
    kingdom: Any,
    n_kingdoms: int,
    repeat: Any = None,
    order: int | None = None,
) -> WindowNats:
    """Orders 0..``order`` (None: the model's highest) on windows of the char tokenizer, scored
    as a causal network's next-token bits per base: special tokens (pads) dropped, positions
    1..L-1 of each window, each base from up to ``order`` bases before it within its window
    (fewer at the start and after an N); an N target is left out and counted.

    tokens: [W, L] char-tokenizer ids (A C G T N = 0..4, specials above; a tensor or an array);
    kingdom: [W] index < n_kingdoms; repeat: [W, L] masked share of each token, or None.
    """
    order = model.max_order if order is None else model._check(order)
    tokens, kingdom = np.asarray(tokens), np.asarray(kingdom)
    shares = np.asarray(repeat) if repeat is not None else None
    out = WindowNats(
        np.zeros((order + 1, n_kingdoms)), np.zeros(n_kingdoms, dtype=np.int64),
        np.zeros(n_kingdoms, dtype=np.int64), np.zeros((order + 1, 2)), np.zeros(2),
    )  # fmt: skip
    for row, index in enumerate(kingdom.tolist()):
        keep = tokens[row] <= N_ID  # the bases (pads and other specials are not sequence)
        per_base = model.nats_by_order(_LETTERS[tokens[row][keep]].tobytes(), order)[:, 1:]
        scored = ~np.isnan(per_base[0])
        out.nats[:, index] += per_base[:, scored].sum(1)
        out.bases[index] += scored.sum()
        out.unknown[index] += (~scored).sum()
        if shares is not None:
            masked = shares[row][keep][1:][scored]
            weights = np.stack([masked, 1 - masked], axis=1)  # [bases, 2]
            out.masked += per_base[:, scored] @ weights
            out.masked_bases += weights.sum(0)
    return out
