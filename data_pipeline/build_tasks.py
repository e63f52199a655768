"""The tasks of a shard build, each run by a worker on one input file or one block of shards.

Every task reads its inputs, writes its result into the build's work folder with a final
atomic rename (the rename is the "done" mark: a resumed build skips the task), and returns a
small summary (counts, seconds, peak memory) for the progress line. Tasks are plain
functions of one picklable dict, so any executor runs them: in this process, on local Dask
workers, or on a cluster (``data_pipeline.executors``).

- ``scan_input``: the one pass over an input file: its records' metadata, MinHash sketches and
  LSH band hashes, and every record's chunks as ready tar members in one fragment file with
  an index of (record, chunk, offset, length, bases) (``scan/<name>.*``);
- ``concat_block``: a block of shards: each shard's members gathered from the fragments in
  input order (the plan, ``build._shard_plan``, says which chunk goes where), plus the tar
  trailer, written where the set goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.dedup import sketch
from data_pipeline.masking import RecordMasker, get_masker
from data_pipeline.near_dups import Bands, bands_path, sketch_path
from data_pipeline.readers import SequenceRecord
from data_pipeline.shards import (
    ShardOptions,
    SourceFile,
    _chunks,
    _filtered_out,
    _safe_key,
    canonical_digest,
    sha256_file,
)

_BLOCK = 512  # tar block
_RECORD = 512 * 20  # tarfile pads the finished archive to a multiple of this


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save_atomic(path: Path, write: Any) -> None:
    """``write(file)`` into a ``.part`` file, then rename it to ``path`` (the done mark)."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as fh:
        write(fh)
    os.replace(part, path)


def scan_path(work: str | Path, name: str) -> Path:
    """The scan's done mark: the input's records as JSON. ``name`` identifies the input file,
    its filters and its fingerprint (``build.scan_name``), so an input that moves in the list
    or is dropped and added back is not read again, and a changed file is."""
    return Path(work) / "scan" / f"{name}.json"


def fragment_paths(work: str | Path, name: str) -> tuple[Path, Path]:
    """(tar members, their index) of the input whose scan is ``name``: the members of every
    chunk of every record, in file order; the index is [chunks, 5] int64 (record ordinal,
    chunk, offset, length, bases)."""
    folder = Path(work) / "scan"
    return folder / f"{name}.tar", folder / f"{name}.idx.npy"


def _masked(src: SourceFile, index: int, options: ShardOptions, masking: RecordMasker) -> Any:
    """(ordinal, record, where its mask came from) of input ``index``."""
    for ordinal, rec in enumerate(src.records(options.soft_mask)):
        yield ordinal, rec, masking.apply((index, ordinal), rec)


def _record_row(rec: SequenceRecord, masked: bytes | bytearray, mask_source: str) -> dict[str, Any]:
    """What the build needs of one record (``rec.seq`` upper case, ``masked`` as stored)."""
    seq = rec.seq
    length = len(seq)
    n_count = seq.count(b"N")
    gc = seq.count(b"G") + seq.count(b"C")
    lower = length - sum(masked.count(b) for b in (b"A", b"C", b"G", b"T", b"N"))
    return {
        "accession": rec.accession,
        "id": rec.id,
        "length": length,
        "gc": round(gc / max(1, length - n_count), 4),
        "n_fraction": round(n_count / length, 4) if length else 0.0,
        "digest": canonical_digest(seq),
        "repeat_fraction": round(lower / length, 4) if length else 0.0,
        "mask_source": mask_source,
        "description": rec.description[:200],
        "organism": rec.organism,
    }


def _chunk_members(
    key: str, kingdom: str, seq: bytes | bytearray, chunk_len: int
) -> Iterator[tuple[bytes, int]]:
    """(tar member, bases) of each chunk of one record, as the shards store them."""
    for c, (start, chunk) in enumerate(_chunks(seq, chunk_len)):
        meta = {"record": key, "kingdom": kingdom, "chunk": c, "offset": start,
                "length": len(chunk), "record_length": len(seq)}  # fmt: skip
        yield (
            tar_member({"__key__": f"{_safe_key(key)}-{c:06d}", "seq": chunk, "json": meta}),
            len(chunk),
        )


def scan_input(task: dict[str, Any]) -> dict[str, Any]:
    """The one pass over input ``task["index"]``: a row per record, sketches, band hashes and
    every record's chunks as tar members (named by the record's accession; the rare record
    whose key the merge changes is re-encoded by ``concat_block``).

    task: index, name, source (SourceFile), options (ShardOptions), work, bands (Bands or
    None)."""
    index, src, work, name = int(task["index"]), task["source"], Path(task["work"]), task["name"]
    options: ShardOptions = task["options"]
    bands: Bands | None = task["bands"]
    done = scan_path(work, name)
    if done.is_file():
        head = json.loads(done.read_text())
        return {**head["summary"], "skipped": True}
    started = time.time()
    messages: list[str] = []
    masking = RecordMasker(get_masker(options.mask), messages.append)
    rows: list[dict[str, Any]] = []
    values: list[np.ndarray] = []
    band_rows: list[np.ndarray] = []
    empty: list[bool] = []
    members, table_path = fragment_paths(work, name)
    members.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[tuple[int, int, int, int, int]] = []
    offset = 0
    part = members.with_name(members.name + ".part")
    with open(part, "wb") as out:
        for ordinal, rec, mask_source in _masked(src, index, options, masking):
            masked = rec.seq  # as stored: repeats lower case when the options keep them
            rec.seq = rec.seq.upper()  # duplicates, sketches and counts ignore the mask
            rows.append(_record_row(rec, masked, mask_source))
            if bands is not None:
                minhash = sketch(rec.seq, options.sketch_options())
                values.append(np.asarray(minhash.hashvalues, dtype=np.uint64))
                band_rows.append(bands.hashes(values[-1]))
                empty.append(bool(minhash.is_empty()))
            members_of = _chunk_members(rec.accession, src.kingdom, masked, options.chunk_len)
            for c, (data, n) in enumerate(members_of):
                out.write(data)
                chunks.append((ordinal, c, offset, len(data), n))
                offset += len(data)
            del rec, masked
    os.replace(part, members)
    if not rows and (src.include or src.exclude):
        if not src.matched:
            raise ValueError(_filtered_out(src))
        messages.append(f"skipped: {_filtered_out(src)}")
    table = np.asarray(chunks, dtype=np.int64).reshape(-1, 5)
    _save_atomic(table_path, lambda fh: np.save(fh, table))
    if bands is not None:
        shape = (len(values), bands.num_perm)
        sketches = np.stack(values) if values else np.zeros(shape, dtype=np.uint64)
        _save_atomic(sketch_path(work, name), lambda fh: np.save(fh, sketches))
        band_table = np.stack(band_rows) if band_rows else np.zeros((0, bands.bands), np.uint64)
        _save_atomic(bands_path(work, name), lambda fh: np.save(fh, band_table))
    summary = {
        "index": index,
        "records": len(rows),
        "bases": sum(r["length"] for r in rows),
        "bytes": storage.size(src.path),
        "seconds": round(time.time() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "messages": messages,
    }
    sha = sha256_file(src.path)
    body = {"summary": summary, "sha256": sha, "records": rows, "empty": empty}
    _save_atomic(done, lambda fh: fh.write(json.dumps(body).encode()))
    return {**summary, "skipped": False}


def tar_member(sample: dict[str, Any]) -> bytes:
    """The tar bytes ``webdataset.TarWriter(mtime=0)`` writes for ``sample`` ({"__key__": str,
    extension: bytes, or a dict for "json"}), without the archive's trailer: members made one by
    one and concatenated are the archive one writer makes (tests hold it to TarWriter). Written
    here with ``tarfile`` because importing webdataset imports torch, which a worker that only
    shards would pay for in start-up time and ~250 MB of memory."""
    key = sample["__key__"]
    out = []
    for ext in sorted(k for k in sample if k != "__key__"):
        value = sample[ext]
        data = json.dumps(value).encode("utf-8") if ext == "json" else bytes(value)
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "bigdata"
        out.append(
            info.tobuf(tarfile.DEFAULT_FORMAT, "utf-8", "surrogateescape")
        )  # as tarfile.open
        out.append(data + b"\0" * (-len(data) % _BLOCK))
    return b"".join(out)


def tar_trailer(members_bytes: int) -> bytes:
    """What ``tarfile`` appends when it closes an archive of ``members_bytes``: two zero
    blocks, then zeros up to a multiple of its record size."""
    end = members_bytes + 2 * _BLOCK
    return b"\0" * (2 * _BLOCK + (-end) % _RECORD)


def _open_fragment(handles: dict[str, Any], work: str, name: str) -> Any:
    """Open an input's fragment once per task (closed by the caller)."""
    handles[name] = open(fragment_paths(work, name)[0], "rb")  # noqa: SIM115
    return handles[name]


def _renamed(member: bytes, key: str) -> bytes:
    """``member`` (a chunk's tar member) written again for record key ``key``."""
    with tarfile.open(fileobj=io.BytesIO(member + tar_trailer(len(member)))) as tar:
        parts = {m.name.rsplit(".", 1)[1]: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    meta = json.loads(parts["json"])
    meta["record"] = key
    return tar_member({"__key__": f"{_safe_key(key)}-{meta['chunk']:06d}", "seq": parts["seq"],
                       "json": meta})  # fmt: skip


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
    """A URL's upload failure (raised when the object is closed) as one line naming it."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        if storage.is_url(path):
            raise storage.failure(path, err) from None
        raise


def plan_path(plan: str | Path, name: str) -> Path:
    """[records, 3] int64 of an input under one shard plan: each record's first shard in its
    (kingdom, split), that group's shard count and the global id of its shard 0; -1 rows: not
    written (exact duplicates)."""
    return Path(plan) / f"{name}.plan.npy"


def concat_path(plan: str | Path, lo: int) -> Path:
    return Path(plan) / f"shards-{lo:07d}.json"


def concat_block(task: dict[str, Any]) -> dict[str, Any]:
    """Assemble shards ``lo`` .. ``hi - 1`` (global shard ids) from the inputs' fragments.

    task: work, plan (the plan's folder), lo, hi, paths ({shard id: destination, a path or
    URL}), names (scan names of the inputs that may hold these shards, in input order),
    renamed ({input name: {record ordinal: key}} for records whose key the merge changed).
    Chunk c of a record goes to shard ``base + (first + c) % shards`` (``plan_path``). Returns
    {shard id: [chunks, bases, bytes, sha256]}, also saved as the block's done mark."""
    work, plan, lo, hi = task["work"], task["plan"], int(task["lo"]), int(task["hi"])
    done = concat_path(plan, lo)
    if done.is_file():
        stats = json.loads(done.read_text())
        return {"shards": stats, "bases": sum(v[1] for v in stats.values()), "skipped": True}
    started = time.time()
    pieces: dict[int, list[tuple[str, int, int, int, int, int]]] = {s: [] for s in range(lo, hi)}
    for name in task["names"]:
        table = np.load(fragment_paths(work, name)[1])
        where = np.load(plan_path(plan, name))[table[:, 0]]  # [chunks, 3]
        shard = where[:, 2] + (where[:, 0] + table[:, 1]) % np.maximum(where[:, 1], 1)
        mine = np.nonzero((where[:, 1] > 0) & (shard >= lo) & (shard < hi))[0]
        for row, s in zip(table[mine].tolist(), shard[mine].tolist(), strict=True):
            pieces[s].append((name, *row))
    renamed = {name: {int(k): v for k, v in keys.items()} for name, keys in task["renamed"].items()}
    stats: dict[str, list[Any]] = {}
    handles: dict[str, Any] = {}
    try:
        for shard in range(lo, hi):
            h = hashlib.sha256()
            written = bases = 0
            target = task["paths"][str(shard)]
            with _named(target), storage.open_write(target) as out:  # closing uploads: named
                for name, ordinal, _, start, length, n in pieces[shard]:
                    fh = handles.get(name) or _open_fragment(handles, work, name)
                    fh.seek(start)
                    data = fh.read(length)
                    key = renamed.get(name, {}).get(ordinal)
                    if key is not None:
                        data = _renamed(data, key)
                    out.write(data)
                    h.update(data)
                    written += len(data)
                    bases += n
                trailer = tar_trailer(written)
                out.write(trailer)
                h.update(trailer)
            stats[str(shard)] = [len(pieces[shard]), bases, written + len(trailer), h.hexdigest()]
    finally:
        for fh in handles.values():
            fh.close()
    _save_atomic(done, lambda fh: fh.write(json.dumps(stats).encode()))
    return {"shards": stats, "bases": sum(v[1] for v in stats.values()),
            "seconds": round(time.time() - started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1), "skipped": False}  # fmt: skip
