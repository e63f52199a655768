"""``nucleo data build`` on many processes or nodes: the stages of a shard build on Dask.

A build is five stages. The parallel ones run as tasks on an executor (``Executor``): in this
process (``workers=None``, the library's default), on N local Dask worker processes
(``workers=N``, the command's default: one per core), or on any Dask cluster (``client``: a
scheduler address, or Slurm through dask-jobqueue, see ``data_pipeline.cluster``):

1. scan (parallel, one task per input file): records, exact-duplicate digests, soft masks,
   MinHash sketches and LSH band hashes, written to the work folder;
2. merge (here): record keys, exact duplicates (first in input order kept); near-duplicate
   clusters from a distributed band group-by (``near_dups``, one task per partition); splits;
   the shard plan: chunk ``c`` of a record goes to shard ``(first + c) % shards`` of its
   (kingdom, split), ``first`` being the chunks before it in input order;
3. write (parallel, one task per input): chunks as tar members in one fragment per input;
4. concat (parallel, one task per block of shards): each shard's members from every
   fragment in input order, plus the tar trailer, written where the set goes (a local
   folder, or ``s3://``/``gs://`` ...: ``storage``);
5. the manifest.

Nothing in the output depends on which worker ran what or when: shards, their order and the
manifest are the same bytes for 1, 2 or 64 workers (the build's time and workers go to
``build.json`` beside the manifest). Each task's result lands in the work folder with an
atomic rename, so a killed build, run again with the same inputs and options, skips what is
done (an input whose size or modification time changed is redone).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.build_tasks import (
    concat_block,
    peak_rss_mb,
    plan_path,
    scan_input,
    scan_path,
)
from data_pipeline.executors import DaskExecutor, Executor, local_executor, run_stage
from data_pipeline.masking import get_masker
from data_pipeline.near_dups import (
    Bands,
    SketchStore,
    components,
    edges_path,
    reduce_partition,
)
from data_pipeline.shards import (
    FORMAT,
    MANIFEST,
    RecordInfo,
    ShardOptions,
    SourceFile,
    _masking_entry,
    _swap_in,
    assign_splits,
    check_output,
    check_sources,
    is_shard_set,
    summary,
    warn_kingdom_typos,
    warn_mostly_n,
)

WORK_FORMAT = "nucleo-build-work/1"
#: shards assembled by one concat task (at most)
CONCAT_BLOCK = 64


# --- the work folder ------------------------------------------------------------------------------


def _work_folder(out: str, work_dir: str | Path | None) -> Path:
    if work_dir is not None:
        return Path(work_dir).resolve()
    if storage.is_url(out):
        import hashlib

        tag = hashlib.blake2b(out.encode(), digest_size=6).hexdigest()
        return (Path.cwd() / ".nucleo-build" / f"{storage.name(out)}-{tag}").resolve()
    return Path(f"{storage.local(out).resolve()}.work")


def _fingerprint(options: ShardOptions) -> dict[str, Any]:
    """What a resumed build must share with the interrupted one: the options (inputs are
    matched one by one, by ``scan_name``)."""
    return {"format": WORK_FORMAT, "shards": FORMAT, "options": asdict(options)}


def _key(value: Any) -> str:
    """A short stable hash of a JSON-able value (names of resumable results)."""
    import hashlib

    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def scan_name(src: SourceFile) -> str:
    """The name of an input's scan results: its path, filters and current fingerprint (size
    and modification time, or the object store's ETag)."""
    what = [str(src.path), src.kingdom, src.include, src.exclude, src.fmt,
            storage.fingerprint(src.path)]  # fmt: skip
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", storage.name(src.path))[:40]
    return f"{readable}-{_key(what)}"


def _open_work(work: Path, fingerprint: dict[str, Any], log: Callable[[str], None]) -> None:
    """Create the work folder, or keep one of the same build (resume); another build's is
    replaced, a folder nucleo did not make is refused."""
    mark = work / "build.json"
    if work.exists():
        if not mark.is_file():
            if any(work.iterdir()):
                raise FileExistsError(
                    f"{work}: not empty and not a nucleo build's work folder; give another "
                    "--work-dir"
                )
        elif json.loads(mark.read_text()) == fingerprint:
            log(f"resuming the build in {work}: finished work is not done again")
            return
        else:
            log(f"{work}: the work of a build with other options: starting over")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(fingerprint))


# --- merge: keys, duplicates, near-duplicates -----------------------------------------------------


def _merge(
    sources: list[SourceFile], names: list[str], work: Path, log: Callable[[str], None],
    verbose: bool,
) -> tuple[list[RecordInfo], list[bool], list[str], list[int]]:  # fmt: skip
    """RecordInfos of every record in input order (keys made unique, exact duplicates marked),
    whether each one's sketch is empty, each input's SHA-256, and the records whose key is not
    their accession (an earlier record had it)."""
    infos: list[RecordInfo] = []
    empty: list[bool] = []
    shas: list[str] = []
    by_digest: dict[str, RecordInfo] = {}
    digest_of_key: dict[str, str] = {}
    changed: list[int] = []
    for index, src in enumerate(sources):
        scanned = json.loads(scan_path(work, names[index]).read_text())
        shas.append(scanned["sha256"])
        for message in scanned["summary"]["messages"]:
            log(message)
        empty.extend(scanned["empty"])
        for row in scanned["records"]:
            digest = row["digest"]
            key = row["accession"]
            if key in digest_of_key and digest_of_key[key] != digest:
                key = f"{key}#{digest[:12]}"  # same id, different sequence
                changed.append(len(infos))
            digest_of_key.setdefault(key, digest)
            info = RecordInfo(
                key=key, id=row["id"], kingdom=src.kingdom, source=storage.redact(src.path),
                input=index,
                length=row["length"], gc=row["gc"], n_fraction=row["n_fraction"], digest=digest,
                repeat_fraction=row["repeat_fraction"], mask_source=row["mask_source"],
                description=row["description"], organism=row["organism"], group=src.group,
                package=src.package,
            )  # fmt: skip
            first = by_digest.get(digest)
            if first is not None:
                info.duplicate_of = first.key
                log(f"duplicate: {info.key} ({info.source}) has the same bases as {first.key}")
            else:
                by_digest[digest] = info
            infos.append(info)
        if verbose:
            name = storage.redact(src.path)
            log(f"read {name}: {len(scanned['records'])} records ({src.kingdom})")
    log(f"read {len(sources)} files: {len(infos)} records, {sum(i.length for i in infos):,} bases")
    return infos, empty, shas, changed


def _near_duplicates(
    infos: list[RecordInfo], empty: list[bool], offsets: np.ndarray, names: list[str],
    bands: Bands, work: Path, executor: Executor, progress: Any, seconds: dict[str, float],
    memory: dict[str, float], log: Callable[[str], None],
) -> None:  # fmt: skip
    """Cluster the kept records (``cluster``, ``similarity``, ``near_duplicate_of``)."""
    n = len(infos)
    excluded = np.array([i.duplicate_of is not None for i in infos], dtype=bool) | np.array(
        empty, dtype=bool
    ).reshape(n)
    # ~2M band entries per partition (~50 MB per task); more partitions than workers balance
    parts = max(1, min(256, max(4 * executor.workers, math.ceil(n * bands.bands / 2_000_000))))
    near = work / "near" / _key([names, parts, np.packbits(excluded).tobytes().hex()])
    near.mkdir(parents=True, exist_ok=True)
    np.save(near / "excluded.npy", excluded)
    tasks = [
        {"work": str(work), "near": str(near), "names": names, "partition": p,
         "partitions": parts, "offsets": offsets.tolist(), "bands": bands}
        for p in range(parts)
    ]  # fmt: skip
    run_stage(executor, "near", reduce_partition, tasks, [0] * parts, progress, seconds, memory)
    label = components(n, [edges_path(near, p) for p in range(parts)])
    store = SketchStore(work, offsets, names)
    kept = [g for g in range(n) if infos[g].duplicate_of is None]
    members: dict[int, list[int]] = {}
    for g in kept:
        members.setdefault(int(label[g]), []).append(g)
    joined = multi = 0
    for group in members.values():
        group.sort(key=lambda g: (-infos[g].length, infos[g].key))
        rep = infos[group[0]]
        rep_row = store.row(group[0]) if len(group) > 1 else None
        for g in group:
            infos[g].cluster = rep.key
            if rep_row is not None:
                infos[g].similarity = round(bands.similar(rep_row, store.row(g)), 4)
            if g != group[0]:
                infos[g].near_duplicate_of = rep.key
        joined += len(group) - 1
        multi += len(group) > 1
    log(
        f"near-duplicates: {joined} records in {multi} clusters (Jaccard >= {bands.threshold}, "
        f"{bands.bands} bands x {bands.rows} rows, {parts} partitions); each cluster stays in "
        "one split"
    )


# --- the shard plan -------------------------------------------------------------------------------


def _shard_plan(
    infos: list[RecordInfo], options: ShardOptions
) -> tuple[list[tuple[str, str, int]], dict[int, list[Any]]]:
    """(every shard as (kingdom, split, index), in manifest order; {record id: [key, kingdom,
    split, first shard, shards of its group, id of its group's shard 0]})."""
    chunks: dict[tuple[str, str], int] = {}
    bases: dict[tuple[str, str], int] = {}
    for info in infos:
        if info.duplicate_of is None:
            group = (info.kingdom, info.split)
            chunks[group] = chunks.get(group, 0) + math.ceil(info.length / options.chunk_len)
            bases[group] = bases.get(group, 0) + info.length
    count = {
        group: min(n, max(options.min_shards, math.ceil(bases[group] / options.shard_bytes)))
        for group, n in chunks.items()
    }
    shards: list[tuple[str, str, int]] = []
    base: dict[tuple[str, str], int] = {}
    for group in sorted(count):
        base[group] = len(shards)
        shards.extend((group[0], group[1], s) for s in range(count[group]))
    seen = dict.fromkeys(count, 0)
    plan: dict[int, list[Any]] = {}
    for g, info in enumerate(infos):
        if info.duplicate_of is not None:
            continue
        group = (info.kingdom, info.split)
        plan[g] = [info.key, info.kingdom, info.split, seen[group] % count[group], count[group],
                   base[group]]  # fmt: skip
        seen[group] += math.ceil(info.length / options.chunk_len)
    return shards, plan


def shard_name(kingdom: str, split: str, index: int) -> str:
    return f"{kingdom}/{split}-{index:06d}.tar"


def _manifest(
    infos: list[RecordInfo], shards: list[tuple[str, str, int]], stats: dict[int, list[Any]],
    options: ShardOptions, sources: list[SourceFile], shas: list[str],
) -> dict[str, Any]:  # fmt: skip
    kingdoms: dict[str, dict[str, Any]] = {}
    for sid, (kingdom, split, index) in enumerate(shards):
        entry = kingdoms.setdefault(kingdom, {}).setdefault(split, {"shards": []})
        chunks, bases, nbytes, sha = stats[sid]
        if chunks:
            entry["shards"].append({"path": shard_name(kingdom, split, index), "chunks": chunks,
                                    "bases": bases, "bytes": nbytes, "sha256": sha})  # fmt: skip
    for kingdom, splits in kingdoms.items():
        for split, entry in splits.items():
            members = [i for i in infos if i.kingdom == kingdom and i.split == split]
            shard_list = entry.pop("shards")
            entry.update({
                "records": len(members),
                "bases": sum(i.length for i in members),
                "repeat_bases": round(sum(i.length * i.repeat_fraction for i in members)),
                "chunks": sum(s["chunks"] for s in shard_list),
                "shards": shard_list,
            })  # fmt: skip
    records = []
    for info in infos:
        row = asdict(info)
        row.pop("split_hash")
        records.append(row)
    return {
        "format": FORMAT,
        "options": asdict(options),
        "kingdoms": kingdoms,
        "records": records,
        "duplicates": sum(1 for i in infos if i.duplicate_of is not None),
        "near_duplicates": sum(1 for i in infos if i.near_duplicate_of is not None),
        "inputs": [
            {
                "path": storage.redact(s.path),
                "kingdom": s.kingdom,
                "package": s.package,
                "include": s.include,
                "exclude": s.exclude,
                "sha256": sha,
            }
            for s, sha in zip(sources, shas, strict=True)
        ],
    }


def check_url_output(out: str, overwrite: bool) -> None:
    """Refuse a URL that holds a shard set unless ``overwrite`` (object stores have no
    folders to be empty: only a manifest marks a set)."""
    if storage.exists(storage.join(out, MANIFEST)) and not overwrite:
        raise FileExistsError(
            f"{storage.redact(out)}: holds a shard set; pass --overwrite to replace it"
        )


def build_shards(
    sources: list[SourceFile],
    out_dir: str | Path,
    options: ShardOptions | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    workers: int | None = None,
    client: Any = None,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Shard ``sources`` into ``out_dir`` (a folder or a URL); returns the manifest (also
    written as manifest.json, with the build's stage times in build.json).

    workers: None runs every task in this process; N starts N local Dask worker processes.
    client: a ``distributed.Client`` of a running cluster (overrides ``workers``). work_dir:
    where stage results go (default ``<out>.work``; on a cluster, a folder every node sees);
    it is removed after a successful build unless ``keep_work``. progress: a stream for the
    per-stage progress lines (None: none)."""
    options = options or ShardOptions()
    sources = check_sources(sources)
    out = str(out_dir)
    if storage.is_url(out):
        check_url_output(out, overwrite)
    else:
        check_output(storage.local(out), sources, overwrite)
    warn_kingdom_typos(sources, log)
    started = time.time()
    masker = get_masker(options.mask)  # a missing tool fails here, before any reading
    work = _work_folder(out, work_dir)
    _open_work(work, _fingerprint(options), log)
    executor = Executor() if client is None and workers is None else (
        DaskExecutor(client) if client is not None else local_executor(workers)
    )  # fmt: skip
    seconds: dict[str, float] = {}
    memory: dict[str, float] = {}  # the largest worker peak of each stage, MiB
    old = _old_shards(out) if storage.is_url(out) else set()
    try:
        infos, manifest, staging = _build(
            sources, out, options, work, executor, log, verbose, progress, seconds, memory
        )
    except BaseException as err:
        if any((work / "scan").glob("*.json")):
            log(f"the build stopped; its finished work is kept in {work}: the same command "
                "resumes it (or delete that folder)")  # fmt: skip
        else:  # nothing finished: leave no trace
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, OSError) and err.filename is None:  # a write: name where it went
            raise OSError(err.errno, err.strerror, str(work)) from err
        raise
    finally:
        executor.close()
    manifest["masking"] = _masking_entry(infos, options, masker)
    seconds["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)
    _finish(out, work, staging, manifest, seconds, memory, started, executor, keep_work, old)
    log(summary(manifest))
    return manifest


def _build(
    sources: list[SourceFile], out: str, options: ShardOptions, work: Path, executor: Executor,
    log: Callable[[str], None], verbose: bool, progress: Any, seconds: dict[str, float],
    memory: dict[str, float],
) -> tuple[list[RecordInfo], dict[str, Any], str]:  # fmt: skip
    """The stages; (records, manifest without its masking entry, where the shards are)."""
    sizes = [storage.size(s.path) for s in sources]
    sketches = options.near_dup_threshold > 0
    bands = (
        Bands.for_threshold(options.near_dup_threshold, options.minhash_perm) if sketches else None
    )
    names = [scan_name(s) for s in sources]
    scans = [
        {"index": i, "name": names[i], "source": s, "options": options, "work": str(work),
         "bands": bands}
        for i, s in enumerate(sources)
    ]  # fmt: skip
    run_stage(executor, "scan", scan_input, scans, sizes, progress, seconds, memory)
    t0 = time.time()
    infos, empty, shas, keys_changed = _merge(sources, names, work, log, verbose)
    warn_mostly_n(infos, log)
    counts = np.bincount([i.input for i in infos], minlength=len(sources))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if bands is not None:
        _near_duplicates(
            infos, empty, offsets, names, bands, work, executor, progress, seconds, memory, log
        )
    assign_splits(infos, options)
    shards, plan = _shard_plan(infos, options)
    seconds["merge"] = round(time.time() - t0 - seconds.get("near", 0.0), 2)
    # the plan's folder: one per plan, so a resumed build whose plan moved (an input changed)
    # does not take shards of the old one
    plan_dir = work / "plan" / _key([names, [plan.get(g) for g in range(len(infos))]])
    for other in (work / "plan").iterdir() if (work / "plan").is_dir() else ():
        if other != plan_dir:
            shutil.rmtree(other, ignore_errors=True)
    plan_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        rows = [plan[g][3:] if g in plan else [0, 0, 0] for g in range(offsets[i], offsets[i + 1])]
        np.save(plan_path(plan_dir, name), np.asarray(rows, dtype=np.int64).reshape(-1, 3))
    staging = out if storage.is_url(out) else str(plan_dir / "out")
    if storage.is_url(out):
        storage.remove(storage.join(out, MANIFEST))  # no manifest over half-replaced shards
    groups_of_input = [
        {(plan[g][1], plan[g][2]) for g in range(offsets[i], offsets[i + 1]) if g in plan}
        for i in range(len(sources))
    ]
    renamed: dict[str, dict[str, str]] = {}
    for g in keys_changed:
        index = infos[g].input
        renamed.setdefault(names[index], {})[str(g - offsets[index])] = infos[g].key
    blocks = []
    lo = 0
    while lo < len(shards):
        group = shards[lo][:2]
        hi = lo
        while hi < len(shards) and shards[hi][:2] == group and hi - lo < CONCAT_BLOCK:
            hi += 1
        mine = [names[i] for i in range(len(sources)) if group in groups_of_input[i]]
        blocks.append({
            "work": str(work), "plan": str(plan_dir), "lo": lo, "hi": hi, "names": mine,
            "paths": {str(s): storage.join(staging, shard_name(*shards[s])) for s in range(lo, hi)},
            "renamed": {n: renamed[n] for n in mine if n in renamed},
        })  # fmt: skip
        lo = hi
    weights = [int(sum(sizes[i] for i in range(len(sources)) if names[i] in b["names"]) *
                   (b["hi"] - b["lo"]) / max(1, len(shards))) for b in blocks]  # fmt: skip
    done = run_stage(executor, "concat", concat_block, blocks, weights, progress, seconds, memory)
    stats = {int(s): v for result in done for s, v in result["shards"].items()}
    return infos, _manifest(infos, shards, stats, options, sources, shas), staging


def _finish(
    out: str, work: Path, staging: str, manifest: dict[str, Any], seconds: dict[str, float],
    memory: dict[str, float], started: float, executor: Executor, keep_work: bool, old: set[str],
) -> None:  # fmt: skip
    """Write the manifest and build.json, put the set in place, drop the work folder."""
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - started, 2),
        "stage_seconds": {k: v for k, v in seconds.items() if k != "driver_peak_rss_mb"},
        "worker_peak_rss_mb": memory,
        "driver_peak_rss_mb": seconds.get("driver_peak_rss_mb"),
        "executor": executor.name,
        "workers": executor.workers,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    if storage.is_url(out):
        with storage.open_write(storage.join(out, "build.json")) as fh:
            fh.write(json.dumps(report, indent=1).encode() + b"\n")
        with storage.open_write(storage.join(out, MANIFEST)) as fh:  # last: the set is valid
            fh.write(text.encode())
        new = {s["path"] for k in manifest["kingdoms"].values() for e in k.values()
               for s in e["shards"]}  # fmt: skip
        for path in sorted(old - new):
            storage.remove(storage.join(out, path))
    else:
        folder = Path(staging)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "build.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / MANIFEST).write_text(text)
        final = storage.local(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        _swap_in(folder, final)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    manifest["build"] = report


def _old_shards(out: str) -> set[str]:
    """Shard paths of the set at ``out`` that an overwrite replaces: removed after the new
    manifest is in place, unless the new set has them too (nucleo deletes only its own)."""
    path = storage.join(out, MANIFEST)
    if not storage.exists(path):
        return set()
    with storage.open_read(path) as fh:
        manifest = json.loads(fh.read())
    return {s["path"] for k in manifest.get("kingdoms", {}).values() for e in k.values()
            for s in e.get("shards", [])}  # fmt: skip


__all__ = ["build_shards", "is_shard_set"]
