"""Stream training windows from WebDataset shards, and draw fixed validation windows.

The training stream of one consumer (a rank's DataLoader worker) is a webdataset pipeline:

    its own shards (split by rank and worker, shuffled per epoch) -> tar members -> chunks
    -> random windows of ``seq_len`` (mostly-N windows skipped) -> seeded shuffle buffer
    -> token ids -> micro-batches

Everything random is drawn from generators seeded by (seed, epoch, consumer), so the stream is
a pure function of the seed and the layout (world size, workers, micro-batch). The loader's
position is the number of micro-batches consumed; restoring it replays the stream without
tokenizing and drops what was already seen, so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Shards may be read from a URL (``data.shards: s3://bucket/shards``, ``gs://``, ``https://``):
each is streamed through ``data_pipeline.storage`` (webdataset's own opener knows no ``s3://``
and shells out to curl for http), into the same tar iteration, with the same errors, splits,
shuffles and resume as local shards.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import tarfile
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import storage
from data_pipeline.shards import (
    DEFAULT_MAX_N_FRACTION,
    load_manifest,
    sha256_file,
    shard_checksums,
    shard_paths,
    soft_masked,
)
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.schema import check
from nucleo.core.types import Batch


@dataclass
class DataConfig:
    """Where the shards are and how windows are cut from them.

    shards: a directory built by ``nucleo data build`` (holds manifest.json), or its URL
        (``s3://bucket/shards``; credentials from the environment, e.g. AWS_ACCESS_KEY_ID).
    kingdoms: kingdoms to train and validate on (null: all in the manifest).
    tokenizer: tokenizer registry name. tokenizer_options: its settings (``kmer``: ``k``).
    seq_len: window length in tokens; windows are cut seq_len x (the tokenizer's most bases
        per token) bases long (``char``: seq_len bases; ``kmer``: seq_len x k), at most the
        shards' chunk_len, and their tokens truncated or padded to seq_len.
    max_n_fraction: windows with a larger fraction of N are skipped.
    rc_prob: probability that a training window is replaced by its reverse complement
        (augmentation: both strands are the same DNA; validation windows never are).
    on_bad_shard: a missing or corrupt training shard stops the run with an error naming it
        ("error"), or is skipped with a warning and counted (``data/skipped_shards``).
    verify_shards: hash each shard against the manifest the first time a reader opens it
        (reads it twice, the second time from the page cache; twice over the network for
        shards at a URL), so altered bytes are refused rather than trained on.
    mixture: how training draws kingdoms: "natural" (in proportion to their bases, one pass
        over the shards per epoch), "uniform" (each kingdom equally often), "temperature"
        (p_k ~ n_k^mixture_alpha, n_k the kingdom's training chunks; alpha 1 = natural,
        0 = uniform); the last two cycle each kingdom's shards on its own.
    seq_len_warmup: sequence-length warm-up (HyenaDNA): training windows start this many
        tokens long and double stage by stage until seq_len (0: off). Validation always uses
        seq_len. seq_len_warmup_steps: optimizer steps until seq_len, split evenly among the
        shorter stages.
    shuffle_buffer: windows held by each worker's shuffle buffer.
    num_workers: DataLoader worker processes per rank (0 reads in the training process).
    open_shards: shards each worker reads at once, interleaved to mix kingdoms.
    repeat_weight: weight of soft-masked (repeat) bases in the losses, in [0, 1] (Evo 2 and GPN
        train with 0.1); each loss may set its own (``loss.<name>.repeat_weight``). Needs
        shards that keep the mask (format 2, ``nucleo data build``); 1 weighs every base alike.
    """

    shards: str = "data/shards/sample"
    kingdoms: list[str] | None = None
    tokenizer: str = "char"
    tokenizer_options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 512
    max_n_fraction: float = DEFAULT_MAX_N_FRACTION
    rc_prob: float = 0.0
    on_bad_shard: Literal["error", "skip"] = "error"
    mixture: Literal["natural", "uniform", "temperature"] = "natural"
    mixture_alpha: float = 0.5
    seq_len_warmup: int = 0
    seq_len_warmup_steps: int = 0
    shuffle_buffer: int = 2048
    num_workers: int = 1
    open_shards: int = 32
    verify_shards: bool = True
    repeat_weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        check(0 <= self.max_n_fraction <= 1, "max_n_fraction", "must be in [0, 1]")
        check(0 <= self.rc_prob <= 1, "rc_prob", f"must be in [0, 1], got {self.rc_prob}")
        check(0 <= self.mixture_alpha <= 1, "mixture_alpha", "must be in [0, 1]")
        check(
            0 <= self.repeat_weight <= 1,
            "repeat_weight",
            f"must be in [0, 1] (1: repeats count like other bases), got {self.repeat_weight}",
        )
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.open_shards >= 1, "open_shards", "must be >= 1")
        check(
            self.seq_len_warmup == 0 or 1 <= self.seq_len_warmup < self.seq_len,
            "seq_len_warmup",
            f"must be 0 (off) or in [1, seq_len={self.seq_len}), got {self.seq_len_warmup}",
        )
        check(
            not self.seq_len_warmup or self.seq_len_warmup_steps >= 1,
            "seq_len_warmup_steps",
            "must be >= 1 when seq_len_warmup is on",
        )

    def warmup_stages(self) -> list[int]:
        """Window lengths (tokens) of the warm-up stages before seq_len; empty when off."""
        stages: list[int] = []
        length = self.seq_len_warmup
        while 0 < length < self.seq_len:
            stages.append(length)
            length *= 2
        return stages

    def seq_len_at(self, step: int) -> int:
        """Training window length (tokens) at optimizer step ``step`` (0-based)."""
        stages = self.warmup_stages()
        if not stages or step >= self.seq_len_warmup_steps:
            return self.seq_len
        return stages[step * len(stages) // self.seq_len_warmup_steps]


def window_bases(cfg: DataConfig, tokenizer: Any, seq_len: int | None = None) -> int:
    """Bases cut per window: enough for seq_len tokens of the largest kind the tokenizer has
    (``char``, ``kmer``), or what the tokenizer asks for (``bpe``: ``bases_for``)."""
    seq_len = seq_len or cfg.seq_len
    if hasattr(tokenizer, "bases_for"):
        return int(tokenizer.bases_for(seq_len))
    return seq_len * int(getattr(tokenizer, "max_bases_per_token", 1))


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def n_count(seq: bytes | bytearray) -> int:
    """Unknown bases (``N``, or ``n`` in a soft-masked stretch) in ``seq``."""
    return seq.count(b"N") + seq.count(b"n")


def repeat_fractions(window: bytes, ids: np.ndarray, bases_per_token: np.ndarray) -> np.ndarray:
    """[len(ids)] float32: the fraction of each token's bases that are soft-masked (lower case
    in ``window``), for the ids the tokenizer made of ``window.upper()``; tokens of no bases
    (specials, padding) get 0."""
    lower = np.frombuffer(window, dtype=np.uint8) >= ord("a")
    if not lower.any():
        return np.zeros(len(ids), dtype=np.float32)
    widths = bases_per_token[ids].astype(np.int64)
    ends = np.minimum(np.cumsum(widths), len(window))
    starts = ends - widths
    masked = np.concatenate([[0], np.cumsum(lower)])
    return ((masked[ends] - masked[starts]) / np.maximum(widths, 1)).astype(np.float32)


def crop_windows(
    seq: bytes, seq_len: int, max_n_fraction: float, rng: random.Random
) -> Iterator[bytes]:
    """Random windows of a chunk, about one per ``seq_len`` bases; short chunks whole.

    Windows with more than ``max_n_fraction`` N are redrawn (at most 4 tries each) or skipped.
    """
    length = len(seq)
    count = max(1, round(length / seq_len))
    for _ in range(count):
        for _attempt in range(4):
            start = rng.randrange(0, length - seq_len + 1) if length > seq_len else 0
            window = seq[start : start + seq_len]
            if n_count(window) <= max_n_fraction * len(window):
                yield window
                break


class BadShardError(ValueError):
    """A shard that is missing, truncated or not a shard (the message names it)."""


class NoWindowsError(ValueError):
    """A reader's shards give no training window (too short, or too much N): the message
    names the shards and the settings that would help."""


#: Shards skipped by this process (``data.on_bad_shard: skip``), path -> reason.
SKIPPED_SHARDS: dict[str, str] = {}
#: Batch.aux key of [reader index, shards that reader skipped so far] (with ``skip``).
SKIPPED_KEY = "data/skipped_shards"


#: Shards whose checksum this process has already verified.
VERIFIED_SHARDS: set[str] = set()


def tar_samples(
    path: str, on_bad: str = "error", sha256: str | None = None
) -> Iterator[dict[str, Any]]:
    """The samples (dicts of member bytes by extension) of one shard.

    A shard that cannot be read (missing, truncated, not a tar, a sample without its sequence
    or metadata) raises BadShardError naming it; with ``on_bad="skip"`` the rest of that shard
    is skipped instead, with a warning, and recorded in SKIPPED_SHARDS; ``"strict"`` (the
    validation split, whose windows must be the same every time) never skips. With
    ``sha256`` (the manifest's), the file is hashed when this is called, the first time this
    process opens it: a corrupted shard is refused instead of feeding altered bases to
    training.
    """
    if sha256 is not None and path not in VERIFIED_SHARDS:
        try:
            same = sha256_file(path) == sha256
            problem = None if same else "its bytes do not match the manifest's SHA-256 (corrupted)"
        except OSError as err:
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            _bad_shard(path, problem, on_bad)
            return iter(())
        VERIFIED_SHARDS.add(path)
    return _samples(path, on_bad)


def _samples(path: str, on_bad: str) -> Iterator[dict[str, Any]]:
    try:
        for sample in _tar_stream(path):
            if "seq" not in sample or "json" not in sample:
                raise ValueError(f"sample {sample.get('__key__')!r} lacks .seq or .json")
            yield sample
    except (OSError, tarfile.TarError, ValueError) as err:
        _bad_shard(path, f"{type(err).__name__}: {_reason(err, path)}", on_bad, err)


def _tar_stream(path: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard: a local file through webdataset's own pipeline; a URL
    streamed by ``storage.open_stream`` (its read failures one-line OSErrors) into the same
    tar expansion and grouping by key."""
    if not storage.is_url(path):
        yield from wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
        return
    with storage.open_stream(path) as stream:
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


def _reason(err: BaseException, path: str) -> str:
    """An error's message for a bad-shard line: webdataset appends the stream and the URL to
    the arguments of what it re-raises; only the message is kept, without credentials."""
    text = str(err.args[0]) if len(err.args) > 1 and isinstance(err.args[0], str) else str(err)
    if not storage.is_url(path):
        return text
    return storage.scrub(text, path).removeprefix(f"{storage.redact(path)}: ")  # named already


def split_chunks(
    shard_dir: str | Path,
    kingdom: str,
    split: str,
    manifest: dict[str, Any],
    soft_mask: bool = False,
) -> list[tuple[str, int, bytes]]:
    """(record id, offset, bases) of every chunk of one kingdom's split, in shard order and, in
    a shard, by sample key: the whole split in memory (for building tasks and evaluation
    sets from held-out data, not for training). Bases are upper case unless ``soft_mask``
    (then repeats stay lower case, where the shards keep them)."""
    chunks = []
    for shard in manifest["kingdoms"][kingdom].get(split, {}).get("shards", []):
        samples = tar_samples(storage.join(shard_dir, shard["path"]), on_bad="strict")
        for sample in sorted(samples, key=lambda s: s["__key__"]):
            meta = json.loads(sample["json"])
            bases = sample["seq"] if soft_mask else sample["seq"].upper()
            chunks.append((meta["record"], int(meta["offset"]), bases))
    return chunks


def _bad_shard(path: str, reason: str, on_bad: str, cause: Exception | None = None) -> None:
    """Raise BadShardError naming ``path``, or (``on_bad="skip"``) warn once and record it."""
    skip = " or set data.on_bad_shard=skip" if on_bad != "strict" else ""
    shown = storage.redact(path) if storage.is_url(path) else path
    folder = storage.parent(storage.parent(path))
    folder = storage.redact(folder) if storage.is_url(folder) else folder
    message = (
        f"shard {shown} is unreadable ({reason}); re-check the folder with `nucleo data "
        f"verify --shards {folder}` and rebuild it{skip}"
    )
    if on_bad != "skip":
        raise BadShardError(message) from cause
    if path not in SKIPPED_SHARDS:
        warnings.warn(f"skipping the rest of {message.split(';')[0]}", stacklevel=3)
    SKIPPED_SHARDS[path] = reason


def interleave_shards(
    shards: list[tuple[str, int]],
    rng: random.Random,
    open_shards: int,
    on_bad: str = "error",
    checksums: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of ``shards`` ((path, chunks) in reading order), drawn from up to
    ``open_shards`` open shards at a time, each draw weighted by the chunks a shard has left.

    Shards hold one kingdom each, so reading them one after another would give long runs of a
    single kingdom; interleaving mixes kingdoms in proportion to their bases.
    """
    pending = deque(shards)
    pool: list[list[Any]] = []  # [sample iterator, chunks left]
    while pending or pool:
        while pending and len(pool) < open_shards:
            path, chunks = pending.popleft()
            sha = checksums.get(path) if checksums else None
            pool.append([tar_samples(path, on_bad, sha), chunks])
        pick = rng.choices(range(len(pool)), weights=[max(1, left) for _, left in pool])[0]
        sample = next(pool[pick][0], None)
        if sample is None:
            pool.pop(pick)
            continue
        pool[pick][1] -= 1
        yield sample


def mixture_weights(cfg: DataConfig, chunks: dict[str, int]) -> dict[str, float]:
    """Probability of drawing each kingdom, from its training chunks n_k: natural n_k,
    uniform 1, temperature n_k^alpha; normalised."""
    alpha = {"natural": 1.0, "uniform": 0.0, "temperature": cfg.mixture_alpha}[cfg.mixture]
    raw = {k: float(n) ** alpha for k, n in chunks.items() if n > 0}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def kingdom_cycle(
    shards: list[tuple[str, int]],
    seed: int,
    kingdom: str,
    consumer: int,
    cfg: DataConfig,
    checksums: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Endless samples of one kingdom's shards, reshuffled every pass."""
    cycle = 0
    while True:
        order = list(shards)
        rng = _rng(seed, "kingdom", kingdom, cycle, consumer)
        rng.shuffle(order)
        read = 0
        for sample in interleave_shards(order, rng, cfg.open_shards, cfg.on_bad_shard, checksums):
            read += 1
            yield sample
        if not read:
            raise BadShardError(f"no readable shard left for kingdom {kingdom!r}")
        cycle += 1


class WindowStream(IterableDataset):
    """An endless stream of micro-batches for one rank; each DataLoader worker reads its shards.

    shards: (path, chunks) of the training split, sorted. kingdoms: names indexed by
    ``Batch.kingdom``. skip_batches: micro-batches this rank already consumed (resume).
    masked: the shards keep soft-masked repeats lower case (format 2): batches carry
    ``Batch.repeat``.
    """

    def __init__(
        self,
        shards: list[tuple[str, int]],
        kingdoms: tuple[str, ...],
        tokenizer: Any,
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        shard_kingdom: dict[str, str] | None = None,
        kingdom_chunks: dict[str, int] | None = None,
        grad_accum: int = 1,
        checksums: dict[str, str] | None = None,
        masked: bool = False,
    ) -> None:
        self.masked = masked
        self.grad_accum = grad_accum
        self.shards = shards
        self.shard_kingdom = shard_kingdom or {}
        self.kingdom_chunks = kingdom_chunks or {}
        self.kingdoms = kingdoms
        self.kingdom_index = {k: i for i, k in enumerate(kingdoms)}
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.skip_batches = skip_batches
        self.checksums = checksums

    def consumer(self) -> tuple[int, int]:
        """(consumer index, number of consumers) of the calling DataLoader worker.

        DataLoader takes batches from its W workers in turn, always starting with worker 0,
        so global micro-batch j came from role j % W. After ``skip_batches`` = K batches the
        next one belongs to role K % W: worker w of the new DataLoader plays role (w + K) % W.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.skip_batches) % workers
        return self.rank * workers + role, self.world_size * workers

    def my_shards(self, consumer: int, total: int) -> list[tuple[str, int]]:
        mine = self.shards[consumer::total]
        if not mine:
            raise ValueError(
                f"{len(self.shards)} training shards cannot feed {total} readers "
                f"({self.world_size} ranks x {total // self.world_size} workers): rebuild the "
                "shards with more (--min-shards) or lower data.num_workers"
            )
        return mine

    def windows(self, consumer: int, shards: list[tuple[str, int]]) -> Iterator[tuple[bytes, int]]:
        """Endless (window bases, kingdom index) in the order this consumer yields them."""
        cfg = self.cfg
        bases = window_bases(cfg, self.tokenizer)
        epoch = 0
        while True:
            order = list(shards)
            _rng(self.seed, "shards", epoch, consumer).shuffle(order)
            crop_rng = _rng(self.seed, "crop", epoch, consumer)
            if cfg.mixture == "natural":
                samples = interleave_shards(
                    order, crop_rng, cfg.open_shards, cfg.on_bad_shard, self.checksums
                )
            else:  # endless: one "epoch" of the mixed stream
                samples = self.mixed(shards, consumer, crop_rng)
            rc_rng = _rng(self.seed, "rc", epoch, consumer)  # its own stream: crops unchanged
            crops = self.crops(samples, bases, crop_rng, rc_rng, consumer, shards)
            shuffle_rng = _rng(self.seed, "shuffle", epoch, consumer)
            before = len(SKIPPED_SHARDS)
            produced = 0
            for item in wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_buffer, rng=shuffle_rng)(crops):
                produced += 1
                yield item
            if not produced and len(SKIPPED_SHARDS) > before:
                raise BadShardError(
                    f"reader {consumer}: none of its {len(shards)} shards is readable "
                    f"({', '.join(sorted(SKIPPED_SHARDS))[:2000]})"
                )
            if not produced:
                raise self.no_windows(consumer, shards, bases)
            epoch += 1

    def crops(
        self,
        samples: Iterator[dict[str, Any]],
        bases: int,
        crop_rng: random.Random,
        rc_rng: random.Random,
        consumer: int,
        shards: list[tuple[str, int]],
    ) -> Iterator[tuple[bytes, int]]:
        """(window, kingdom index) from the samples; raises NoWindowsError after a whole pass
        over this reader's chunks gave none (an endless mixed stream would spin forever)."""
        cfg = self.cfg
        patience = sum(chunks for _, chunks in shards) + 1
        barren = 0
        for sample in samples:
            kingdom = self.kingdom_index[json.loads(sample["json"])["kingdom"]]
            barren += 1
            for window in crop_windows(sample["seq"], bases, cfg.max_n_fraction, crop_rng):
                barren = 0
                if cfg.rc_prob and rc_rng.random() < cfg.rc_prob:
                    window = reverse_complement_bytes(window)
                yield window, kingdom
            if barren > patience:
                raise self.no_windows(consumer, shards, bases)

    def no_windows(self, consumer: int, shards: list[tuple[str, int]], bases: int) -> Exception:
        names = ", ".join(_shown(path) for path, _ in shards[:4])
        names += " ..." if len(shards) > 4 else ""
        return NoWindowsError(
            f"reader {consumer}: its {len(shards)} shard(s) ({names}) give no training window of "
            f"{bases} bases with at most data.max_n_fraction={self.cfg.max_n_fraction} of N: "
            "their records are too short or mostly N. Lower data.seq_len, raise "
            "data.max_n_fraction, or leave those records out (nucleo data stats shows N per "
            "kingdom)"
        )

    def mixed(
        self, shards: list[tuple[str, int]], consumer: int, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        """Samples drawn kingdom by kingdom with the mixture's probabilities (restricted to the
        kingdoms among this reader's shards), each kingdom cycling its own shards."""
        by_kingdom: dict[str, list[tuple[str, int]]] = {}
        for path, chunks in shards:
            by_kingdom.setdefault(self.shard_kingdom[path], []).append((path, chunks))
        weights = mixture_weights(self.cfg, self.kingdom_chunks)
        names = sorted(k for k in by_kingdom if k in weights)
        streams = {
            k: kingdom_cycle(by_kingdom[k], self.seed, k, consumer, self.cfg, self.checksums)
            for k in names
        }
        probs = [weights[k] for k in names]
        while True:
            yield next(streams[rng.choices(names, weights=probs)[0]])

    def __iter__(self) -> Iterator[Batch]:
        consumer, total = self.consumer()
        workers = total // self.world_size
        role = consumer - self.rank * workers
        done = max(0, (self.skip_batches - role + workers - 1) // workers)  # role's batches so far
        stream = self.windows(consumer, self.my_shards(consumer, total))
        for _ in range(done * self.batch_size):
            next(stream)
        pad = self.tokenizer.pad_id
        encode = getattr(self.tokenizer, "encode_compact", self.tokenizer.encode)
        widths = np.asarray(self.tokenizer.bases_per_token)
        index = done * workers + role  # this rank's micro-batch index of the next batch
        while True:
            seq_len = self.cfg.seq_len_at(index // self.grad_accum)  # warm-up: a prefix
            index += workers
            tokens = np.full((self.batch_size, seq_len), pad, dtype=np.int64)
            kingdom = np.zeros(self.batch_size, dtype=np.int64)
            repeat = np.zeros((self.batch_size, seq_len), dtype=np.float32) if self.masked else None
            for row in range(self.batch_size):
                window, kingdom[row] = next(stream)
                if seq_len < self.cfg.seq_len:  # encode about the bases the prefix needs
                    window = window[: window_bases(self.cfg, self.tokenizer, seq_len)]
                ids = encode(window.upper())[:seq_len]
                tokens[row, : len(ids)] = ids  # widens compact (uint8) ids
                if repeat is not None:
                    repeat[row, : len(ids)] = repeat_fractions(window, ids, widths)
            batch = Batch(torch.from_numpy(tokens), torch.from_numpy(kingdom), self.kingdoms, pad)
            if repeat is not None:
                batch.repeat = torch.from_numpy(repeat)
            if self.cfg.on_bad_shard == "skip":  # (reader, shards it skipped so far)
                batch.aux[SKIPPED_KEY] = torch.tensor([consumer, len(SKIPPED_SHARDS)])
            yield batch


class TrainLoader:
    """Micro-batches for one rank, with a position that checkpoints save and restore."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        self.cfg = cfg
        self.grad_accum = grad_accum
        self.manifest = load_manifest(cfg.shards)
        self.where = shown = _shown(cfg.shards)  # as messages name it: no URL credentials
        chunk_len = self.manifest["options"]["chunk_len"]
        bases = window_bases(cfg, tokenizer)
        if bases > chunk_len:
            raise ValueError(
                f"data.seq_len={cfg.seq_len} tokens of {cfg.tokenizer} need {bases} bases, more "
                f"than the chunks of {shown} ({chunk_len} bases): rebuild the shards with "
                f"--chunk-len >= {bases} or lower data.seq_len"
            )
        self.shards = shard_paths(cfg.shards, self.manifest, "train", cfg.kingdoms)
        if not self.shards:
            raise ValueError(f"{shown}: no training shards for kingdoms {cfg.kingdoms}")
        readers = world_size * max(1, cfg.num_workers)
        if len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} training shards in {shown} cannot feed {readers} "
                f"readers ({world_size} ranks x {max(1, cfg.num_workers)} workers): rebuild the "
                "shards with more (--min-shards) or lower data.num_workers"
            )
        self.kingdoms = tuple(sorted(cfg.kingdoms or self.manifest["kingdoms"]))
        self.shard_kingdom = {
            path: kingdom
            for kingdom in self.kingdoms
            for path, _ in shard_paths(cfg.shards, self.manifest, "train", [kingdom])
        }
        self.kingdom_chunks = {k: 0 for k in self.kingdoms}
        for path, chunks in self.shards:
            self.kingdom_chunks[self.shard_kingdom[path]] += chunks
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.base_seed = seed  # from the config
        self.seed = seed  # of the stream; differs after a resume with a changed layout
        self.rank = rank
        self.world_size = world_size
        self.consumed = 0  # micro-batches of this stream handed to the trainer

    @property
    def windows_per_step(self) -> int:
        """Windows of one optimizer step over all ranks: micro-batch x grad_accum x ranks."""
        return self.batch_size * self.grad_accum * self.world_size

    def tokens_at(self, step: int) -> int:
        """Tokens of optimizer step ``step`` over all ranks (fewer during seq-len warm-up)."""
        return self.windows_per_step * self.cfg.seq_len_at(step)

    def layout(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same stream."""
        return {
            "seed": self.base_seed,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.batch_size,
            "seq_len": self.cfg.seq_len,
            "shards": len(self.shards),
            **(
                {
                    "warmup": [
                        self.cfg.seq_len_warmup,
                        self.cfg.seq_len_warmup_steps,
                        self.grad_accum,
                    ]
                }
                if self.cfg.seq_len_warmup
                else {}
            ),
            **({} if self.cfg.mixture == "natural" else {"mixture": self.mixture()}),
        }

    def mixture(self) -> dict[str, float]:
        """The probability of each kingdom in training (``data.mixture``)."""
        return mixture_weights(self.cfg, self.kingdom_chunks)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "stream_seed": self.seed, "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved stream; if the layout changed, start a fresh stream (new seed)."""
        if state.get("layout") == self.layout():
            self.seed = int(state.get("stream_seed", self.base_seed))
            self.consumed = int(state["consumed"])
            return
        warnings.warn(
            f"the data layout changed since the checkpoint ({state.get('layout')} -> "
            f"{self.layout()}): the stream restarts with a new order instead of resuming exactly",
            stacklevel=2,
        )
        previous = int(state.get("stream_seed", self.base_seed))
        self.seed = (previous * 1_000_003 + int(state.get("consumed", 0))) % 2**31
        self.consumed = 0

    def __iter__(self) -> Iterator[Batch]:
        stream = WindowStream(
            self.shards,
            self.kingdoms,
            self.tokenizer,
            self.cfg,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            skip_batches=self.consumed,
            shard_kingdom=self.shard_kingdom,
            kingdom_chunks=self.kingdom_chunks,
            grad_accum=self.grad_accum,
            checksums=shard_checksums(self.cfg.shards, self.manifest)
            if self.cfg.verify_shards
            else None,
            masked=soft_masked(self.manifest),
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.cfg.num_workers else None,
            worker_init_fn=(
                functools.partial(die_with_parent, parent=os.getpid())
                if self.cfg.num_workers
                else None
            ),
        )
        try:
            for batch in loader:
                self.consumed += 1
                yield batch
        except (BadShardError, NoWindowsError) as err:
            raise type(err)(worker_message(err)) from None


def _shown(path: str | Path) -> str:
    """A shard set's path as messages show it: a URL without its credentials."""
    return storage.redact(path) if storage.is_url(path) else str(path)


def worker_message(err: Exception) -> str:
    """The worker's own message of an error that a DataLoader worker raised (PyTorch re-raises
    it in the trainer with the worker's whole traceback as its text)."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def die_with_parent(worker_id: int = 0, parent: int | None = None) -> None:
    """Have the kernel end this DataLoader worker when the process that started it dies.

    PyTorch's workers notice a dead parent only between batches; one busy inside a batch
    would otherwise run on, orphaned, after its trainer is SIGKILLed (Linux; elsewhere a
    no-op).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:  # it died before the call took effect
        os._exit(1)


@dataclass
class ValidationSet:
    """The fixed validation windows (see ``validation_set``).

    tokens: [N, seq_len] int64; kingdom: [N] int64 index into ``kingdoms``; repeat: [N, seq_len]
    float32 soft-masked fraction of each token's bases, or None when the shards keep no mask.
    """

    tokens: torch.Tensor
    kingdom: torch.Tensor
    kingdoms: tuple[str, ...]
    repeat: torch.Tensor | None = None


def validation_set(cfg: DataConfig, tokenizer: Any, per_kingdom: int, seed: int) -> ValidationSet:
    """A fixed set of validation windows: up to ``per_kingdom`` from each kingdom's val shards.

    Only as many chunks as needed are read (one window per chunk, cycling when there are fewer
    chunks), so the cost is bounded whatever the size of the validation split. Deterministic
    in seed (and the same windows whether or not the shards keep the soft mask).
    """
    manifest = load_manifest(cfg.shards)
    checksums = shard_checksums(cfg.shards, manifest) if cfg.verify_shards else None
    kingdoms = tuple(sorted(cfg.kingdoms or manifest["kingdoms"]))
    masked = soft_masked(manifest)
    widths = np.asarray(tokenizer.bases_per_token)
    rows: list[np.ndarray] = []
    repeats: list[np.ndarray] = []
    labels: list[int] = []
    for index, kingdom in enumerate(kingdoms):
        chunks: list[bytes] = []
        for path, _ in shard_paths(cfg.shards, manifest, "val", [kingdom]):
            sha = checksums.get(path) if checksums else None
            for sample in tar_samples(path, on_bad="strict", sha256=sha):
                chunks.append(sample["seq"])
                if len(chunks) >= per_kingdom:
                    break
            if len(chunks) >= per_kingdom:
                break
        picked = 0
        for i in range(4 * per_kingdom):
            if picked == per_kingdom or not chunks:
                break
            rng = _rng(seed, "val", kingdom, i)
            bases = window_bases(cfg, tokenizer)
            window = next(crop_windows(chunks[i % len(chunks)], bases, 1.0, rng))
            if n_count(window) > cfg.max_n_fraction * len(window):
                continue
            ids = np.full(cfg.seq_len, tokenizer.pad_id, dtype=np.int64)
            encoded = tokenizer.encode(window.upper())[: cfg.seq_len]
            ids[: len(encoded)] = encoded
            rows.append(ids)
            if masked:
                fractions = np.zeros(cfg.seq_len, dtype=np.float32)
                fractions[: len(encoded)] = repeat_fractions(window, encoded, widths)
                repeats.append(fractions)
            labels.append(index)
            picked += 1
    if not rows:
        empty = torch.zeros(0, cfg.seq_len)
        return ValidationSet(
            empty.long(), torch.zeros(0, dtype=torch.long), kingdoms, empty if masked else None
        )
    return ValidationSet(
        torch.from_numpy(np.stack(rows)),
        torch.tensor(labels),
        kingdoms,
        torch.from_numpy(np.stack(repeats)) if masked else None,
    )


def validation_windows(
    cfg: DataConfig, tokenizer: Any, per_kingdom: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """``validation_set``'s tokens [N, seq_len] int64, kingdom [N] int64 and kingdom names."""
    found = validation_set(cfg, tokenizer, per_kingdom, seed)
    return found.tokens, found.kingdom, found.kingdoms
