"""Build WebDataset shards of genome chunks, per kingdom and split, with a JSON manifest.

Shards hold *chunks* of normalised bases (``<key>.seq``, ASCII ACGTN, at most ``chunk_len``
bytes) with their provenance (``<key>.json``), not fixed windows, so the loader can crop windows
of any length up to ``chunk_len`` without re-sharding, and any tokenizer can read them.

Format 2 (``nucleo-shards/2``, the default) keeps the inputs' soft mask: bases that a repeat
masker wrote in lower case (RefSeq's eukaryotic FASTA, WindowMasker) stay lower case ``acgtn``
in the chunks, so the loader can down-weight repeats (``data.repeat_weight``). Format 1 shards
(all upper case, no mask) still read; ``ShardOptions.soft_mask=False`` writes upper case only.
``ShardOptions.mask`` (``--mask dust|windowmasker``) soft-masks the records that arrive with no
lower case at all, with an established tool (``data_pipeline.masking``); each record's
``mask_source`` says where its mask came from.

Two passes over the inputs, each streaming one record at a time:

1. read every record, drop exact duplicates (same bases on either strand, first one kept), and
   assign each kept record to ``train`` or ``val`` by a deterministic hash of its id;
2. read again and write the kept records' chunks round-robin into the shards of their
   (kingdom, split), so each shard mixes records.

The output is written to a fresh ``<out>.partial-*`` folder beside ``out`` and swapped in
when complete: a failed build never leaves a half-written shard set behind a valid-looking
manifest, nor a partial folder. ``overwrite`` replaces only a folder that holds a nucleo shard
set (its manifest says so) and never one that holds an input: nucleo deletes nothing it did not
make.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from data_pipeline.dedup import SketchOptions, cluster_sketches, sketch
from data_pipeline.masking import MASKS, Masker, RecordMasker, get_masker
from data_pipeline.readers import SequenceRecord, read_sequences
from nucleo.core.alphabet import reverse_complement_bytes

MANIFEST = "manifest.json"
#: data.max_n_fraction's default: training windows with more N than this are skipped
DEFAULT_MAX_N_FRACTION = 0.1
FORMAT = "nucleo-shards/2"
#: every format this version reads (1: no soft mask)
FORMATS = ("nucleo-shards/1", FORMAT)
SPLITS = ("train", "val")
REFSEQ_KINGDOMS = (
    "archaea", "bacteria", "fungi", "invertebrate", "mammals", "mitochondrion", "plant",
    "plasmid", "plastid", "protozoa", "vertebrate_other", "viral",
)  # fmt: skip
_KINGDOM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class SourceFile:
    """A genome file, the kingdom its records belong to, and an optional split group.

    Records of files with the same (kingdom, group) go to the same split: give one organism's
    several files a common group (near-identical genomes are grouped automatically, see
    ``data_pipeline.dedup``). ``include``/``exclude`` filter records by header regex; ``fmt``
    forces "fasta" or "genbank"; ``package`` records where the file came from. A filter that
    keeps none of a file's records is an error, unless ``matched`` (the file is one of several
    a glob matched, so the filter picks among them: it is then skipped with a line).
    """

    path: Path
    kingdom: str
    group: str = ""
    include: str = ""
    exclude: str = ""
    fmt: str | None = None
    package: str = ""
    matched: bool = False

    def records(self, soft_mask: bool = False) -> Iterator[SequenceRecord]:
        """The file's records whose header (id and description) matches ``include`` (a regex,
        searched; empty: all) and not ``exclude`` (empty: none); ``soft_mask``: keep repeats
        lower case."""
        include = re.compile(self.include) if self.include else None
        exclude = re.compile(self.exclude) if self.exclude else None
        for rec in read_sequences(self.path, self.fmt, soft_mask):  # type: ignore[arg-type]
            header = f"{rec.id} {rec.description}"
            if include is not None and not include.search(header):
                continue
            if exclude is not None and exclude.search(header):
                continue
            yield rec


@dataclass
class ShardOptions:
    """How records become shards.

    chunk_len: bases per stored chunk; the longest window the loader can crop.
    shard_bytes: target size of a shard (bases), before the minimum count applies.
    min_shards: shards per (kingdom, split) when there are enough chunks, so that ranks x
        workers can each read their own shards (see DESIGN.md, webdataset).
    val_fraction: expected fraction of records held out for validation.
    split_salt: salt of the split hash; change it to draw a different split.
    near_dup_threshold: k-mer Jaccard above which records are near-duplicates and share a split
        (MinHash, ``data_pipeline.dedup``); 0 turns the clustering off.
    minhash_k, minhash_scale, minhash_perm: k-mer length, 1-in-scale k-mer subsampling and
        permutations of the sketches.
    soft_mask: keep the inputs' lower-case (repeat-masked) bases lower case in the chunks.
    mask: soft-mask the records that arrive with no lower case: "none", "dust" (low-complexity
        sequence) or "windowmasker" (NCBI's repeat masker); see ``data_pipeline.masking``.
    """

    chunk_len: int = 65536
    shard_bytes: int = 64 * 1024 * 1024
    min_shards: int = 8
    val_fraction: float = 0.1
    split_salt: str = "nucleo"
    near_dup_threshold: float = 0.8
    minhash_k: int = 21
    minhash_scale: int = 100
    minhash_perm: int = 128
    soft_mask: bool = True
    mask: str = "none"

    def __post_init__(self) -> None:
        if self.mask not in MASKS:
            raise ValueError(f"mask {self.mask!r} is not a masker; valid: {', '.join(MASKS)}")
        if self.mask != "none" and not self.soft_mask:
            raise ValueError(f"mask {self.mask!r} needs soft_mask=True (the mask is lower case)")
        if self.chunk_len < 64:
            raise ValueError(f"chunk_len must be >= 64 bases, got {self.chunk_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_shards < 1 or self.shard_bytes < 1:
            raise ValueError("min_shards and shard_bytes must be >= 1")
        self.sketch_options()  # checks the MinHash settings

    def sketch_options(self) -> SketchOptions:
        return SketchOptions(
            self.minhash_k, self.minhash_scale, self.minhash_perm, self.near_dup_threshold
        )


@dataclass
class RecordInfo:
    """One input record as the manifest lists it."""

    key: str
    id: str
    kingdom: str
    source: str
    length: int
    gc: float
    n_fraction: float
    digest: str
    repeat_fraction: float = 0.0
    mask_source: str = ""  # "input" (its own lower case), "dust"/"windowmasker", "" (none)
    description: str = ""
    organism: str = ""
    split: str = ""
    duplicate_of: str | None = None
    group: str = ""
    input: int = 0
    package: str = ""
    cluster: str = ""
    near_duplicate_of: str | None = None
    similarity: float = 1.0
    unit: str = ""
    split_hash: float = field(default=0.0, repr=False)

    @property
    def split_unit(self) -> str:
        """What the split hashes: the unit that joins groups and near-duplicate clusters when
        set (``assign_splits``), else the group when there is one, else the record."""
        return self.unit or (f"group:{self.group}" if self.group else self.key)


SOURCE_COLUMNS = (
    "path", "kingdom", "group", "include", "exclude", "format", "package", "matched",
)  # fmt: skip


def read_sources_tsv(path: str | Path) -> list[SourceFile]:
    """Inputs from a TSV whose header names its columns: ``path`` and ``kingdom`` (required),
    ``group``, ``include``, ``exclude``, ``format``, ``package`` and ``matched`` (optional; see
    SourceFile).

    Paths are relative to the TSV; rows starting with ``#`` are comments.
    """
    path = Path(path)
    base = path.parent
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header = [c.strip() for c in rows[0]] if rows else []
    unknown = [c for c in header if c not in SOURCE_COLUMNS]
    if header[:2] != ["path", "kingdom"] or unknown or len(set(header)) != len(header):
        raise ValueError(
            f"{path}:1: the header must start with 'path<TAB>kingdom', then any of "
            f"{', '.join(SOURCE_COLUMNS[2:])} once each; got {header}"
        )
    sources = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        if not 2 <= len(row) <= len(header):
            raise ValueError(f"{path}:{number}: expected {'<TAB>'.join(header)}, got {row}")
        cells = {name: value.strip() for name, value in zip(header, row, strict=False)}
        fmt = cells.get("format") or None
        if fmt not in (None, "fasta", "genbank"):
            raise ValueError(f"{path}:{number}: format {fmt!r}; valid: fasta, genbank (or empty)")
        for column in ("include", "exclude"):
            try:
                re.compile(cells.get(column, ""))
            except re.error as err:
                message = f"{column} is not a valid regex ({err})"
                raise ValueError(f"{path}:{number}: {message}") from None
        file = Path(cells["path"])
        sources.append(
            SourceFile(
                file if file.is_absolute() else base / file,
                cells["kingdom"],
                cells.get("group", ""),
                cells.get("include", ""),
                cells.get("exclude", ""),
                fmt,
                cells.get("package", ""),
                cells.get("matched", "").lower() in ("yes", "true", "1"),
            )
        )
    return sources


def write_sources_tsv(sources: Iterable[SourceFile], path: str | Path) -> Path:
    """Write ``sources`` as a TSV that ``read_sources_tsv`` reads back (paths relative to it
    when they are below its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")  # quotes what needs it
        writer.writerow(SOURCE_COLUMNS)
        for src in sources:
            try:
                rel = str(src.path.resolve().relative_to(path.parent.resolve()))
            except ValueError:
                rel = str(src.path.resolve())
            matched = "yes" if src.matched else ""
            writer.writerow([rel, src.kingdom, src.group, src.include, src.exclude,
                             src.fmt or "", src.package, matched])  # fmt: skip
    return path


def check_sources(sources: Iterable[SourceFile]) -> list[SourceFile]:
    sources = list(sources)
    if not sources:
        raise ValueError("no input genome files given")
    seen: set[tuple[Path, str, str]] = set()
    for src in sources:
        entry = (src.path.resolve(), src.include, src.exclude)
        if entry in seen:
            raise ValueError(f"{src.path}: listed twice in the inputs (with the same filters)")
        seen.add(entry)
        if not _KINGDOM_NAME.match(src.kingdom):
            raise ValueError(
                f"{src.path}: kingdom {src.kingdom!r} is not a valid name (lower-case letters, "
                f"digits, '_'); the RefSeq kingdoms are: {', '.join(REFSEQ_KINGDOMS)}"
            )
        if not src.path.is_file():
            raise FileNotFoundError(f"{src.path}: no such genome file (kingdom {src.kingdom})")
    return sources


def _unit_hash(text: str) -> float:
    """Deterministic hash of ``text`` to [0, 1)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def canonical_digest(seq: bytes | bytearray) -> str:
    """Hash of a sequence that is the same for both strands (exact-duplicate detection)."""
    fwd = hashlib.blake2b(seq, digest_size=16).hexdigest()
    rev = hashlib.blake2b(reverse_complement_bytes(seq), digest_size=16).hexdigest()
    return min(fwd, rev)


def _safe_key(text: str) -> str:
    """A webdataset key: no dots (they start the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _filtered_out(src: SourceFile) -> str:
    """Why a file gave no record: its include/exclude regexes, with headers it does have."""
    headers = []
    for rec in read_sequences(src.path, src.fmt):  # type: ignore[arg-type]
        headers.append(f"{rec.id} {rec.description}".strip()[:80])
        if len(headers) == 3:
            break
    seen = "; its records begin: " + " | ".join(headers) if headers else "; it has no record"
    return (
        f"{src.path}: include {src.include!r} / exclude {src.exclude!r} kept none of its "
        f"records{seen}"
    )


def _masked_records(
    src: SourceFile, index: int, options: ShardOptions, masking: RecordMasker
) -> Iterator[tuple[SequenceRecord, str]]:
    """(record, where its mask came from) of input ``index``, masked as ``options.mask`` says;
    both passes read through here, so their masks agree."""
    for ordinal, rec in enumerate(src.records(options.soft_mask)):
        yield rec, masking.apply((index, ordinal), rec)


def _scan(
    sources: list[SourceFile],
    log: Callable[[str], None],
    verbose: bool,
    options: ShardOptions | None = None,
    masking: RecordMasker | None = None,
) -> list[RecordInfo]:
    """Pass 1: one RecordInfo per input record, exact duplicates marked, and (unless the
    threshold is 0) near-duplicate clusters of the kept records (``cluster`` etc.)."""
    options = options or ShardOptions()
    masking = masking or RecordMasker(get_masker(options.mask), log)
    sketch_options = options.sketch_options()
    sketches: dict[str, Any] = {}
    infos: list[RecordInfo] = []
    by_digest: dict[str, RecordInfo] = {}
    digest_of_key: dict[str, str] = {}
    for index, src in enumerate(sources):
        count = 0
        for rec, mask_source in _masked_records(src, index, options, masking):
            count += 1
            masked = rec.seq
            rec.seq = rec.seq.upper()  # duplicates, sketches and counts ignore the mask
            digest = canonical_digest(rec.seq)
            key = rec.accession
            if key in digest_of_key and digest_of_key[key] != digest:
                key = f"{rec.accession}#{digest[:12]}"  # same id, different sequence
            digest_of_key.setdefault(key, digest)
            length = len(rec.seq)
            n_count = rec.seq.count(b"N")
            gc = rec.seq.count(b"G") + rec.seq.count(b"C")
            lower = length - sum(masked.count(b) for b in (b"A", b"C", b"G", b"T", b"N"))
            info = RecordInfo(
                key=key,
                id=rec.id,
                kingdom=src.kingdom,
                source=str(src.path),
                input=index,
                length=length,
                gc=round(gc / max(1, length - n_count), 4),
                n_fraction=round(n_count / length, 4),
                digest=digest,
                repeat_fraction=round(lower / length, 4),
                mask_source=mask_source,
                description=rec.description[:200],
                organism=rec.organism,
                group=src.group,
                package=src.package,
            )
            first = by_digest.get(digest)
            if first is not None:
                info.duplicate_of = first.key
                log(f"duplicate: {info.key} ({src.path}) has the same bases as {first.key}")
            else:
                by_digest[digest] = info
                if sketch_options.threshold > 0:
                    sketches[key] = sketch(rec.seq, sketch_options)
            infos.append(info)
            del rec, masked
        if not count and (src.include or src.exclude):
            if not src.matched:
                raise ValueError(_filtered_out(src))
            log(f"skipped: {_filtered_out(src)}")
        if verbose:
            log(f"read {src.path}: {count} records ({src.kingdom})")
    log(f"read {len(sources)} files: {len(infos)} records, {sum(i.length for i in infos):,} bases")
    if sketches:
        kept = {i.key: i for i in infos if i.duplicate_of is None}
        clusters = cluster_sketches(
            sketches, {k: kept[k].length for k in sketches}, sketch_options.threshold
        )
        for cluster in clusters:
            rep = cluster.members[0]
            for key in cluster.members:
                kept[key].cluster = rep
                kept[key].similarity = cluster.similarity[key]
                if key != rep:
                    kept[key].near_duplicate_of = rep
        near = sum(len(c.members) - 1 for c in clusters)
        multi = sum(1 for c in clusters if len(c.members) > 1)
        log(
            f"near-duplicates: {near} records in {multi} clusters (Jaccard >= "
            f"{sketch_options.threshold}, k={sketch_options.k}); each cluster stays in one split"
        )
    return infos


def _join_units(kept: list[RecordInfo]) -> None:
    """Set ``unit`` of records joined by a shared group or a near-duplicate cluster
    (transitively): one unit, named by its first group name (``group:<name>``), else by its
    first record key. Records joined to nothing keep an empty unit (their own key)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for info in kept:
        links = [f"group:{info.group}"] if info.group else []
        if info.cluster and info.cluster != info.key:
            links.append(info.cluster)
        for other in links:
            ra, rb = find(info.key), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for name in list(parent):
        members.setdefault(find(name), []).append(name)
    for info in kept:
        names = members.get(find(info.key), [info.key])
        groups = sorted(n for n in names if n.startswith("group:"))
        info.unit = groups[0] if groups else (min(names) if len(names) > 1 else "")


def assign_splits(infos: list[RecordInfo], options: ShardOptions) -> None:
    """Set ``split`` of every kept record by a hash of its split unit (a record, or records
    joined by a group or a near-duplicate cluster): a unit is never split.

    Two guarantees per kingdom, made by moving only units that lie wholly in that kingdom (a
    cluster spanning kingdoms keeps its hashed split everywhere): with two or more units, each
    split gets at least one (the smallest unit by bases moves when one split would be empty, so
    training keeps the most); with a single unit, it trains.
    """
    kept = [i for i in infos if i.duplicate_of is None]
    _join_units(kept)
    units: dict[str, list[RecordInfo]] = {}
    for info in kept:
        units.setdefault(info.split_unit, []).append(info)
    split: dict[str, str] = {}
    for unit, members in units.items():
        h = _unit_hash(f"{options.split_salt}:{unit}")
        for info in members:
            info.split_hash = h
        split[unit] = "train" if options.val_fraction == 0 or h >= options.val_fraction else "val"
    kingdoms_of = {u: {i.kingdom for i in members} for u, members in units.items()}
    for kingdom in sorted({i.kingdom for i in kept}):
        mine = [u for u in units if kingdom in kingdoms_of[u]]
        local = [u for u in mine if kingdoms_of[u] == {kingdom}]
        by_size = sorted(local, key=lambda u: (sum(i.length for i in units[u]), u))
        if not local or options.val_fraction == 0:
            continue
        if len(mine) == 1:
            split[local[0]] = "train"
        elif all(split[u] == "train" for u in mine):
            split[by_size[0]] = "val"
        elif all(split[u] == "val" for u in mine):
            split[by_size[-1]] = "train"
    for unit, members in units.items():
        for info in members:
            info.split = split[unit]
    for info in infos:
        if info.duplicate_of is not None:
            info.split = "dropped"


def _chunks(seq: bytearray, chunk_len: int) -> Iterable[tuple[int, bytes]]:
    """(offset, bases) of consecutive chunks; the last one ends at the record's end and may
    overlap its predecessor, so that every chunk of a long record is ``chunk_len`` long."""
    for offset in range(0, len(seq), chunk_len):
        offset = max(0, min(offset, len(seq) - chunk_len))
        yield offset, bytes(seq[offset : offset + chunk_len])


def build_shards(
    sources: Iterable[SourceFile],
    out_dir: str | Path,
    options: ShardOptions | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> dict[str, Any]:
    """Shard ``sources`` into ``out_dir``; returns the manifest (also written as manifest.json).

    ``log`` receives the summary (and, when ``verbose``, a line per input file)."""
    options = options or ShardOptions()
    sources = check_sources(sources)
    out = Path(out_dir)
    check_output(out, sources, overwrite)
    warn_kingdom_typos(sources, log)
    started = time.time()
    masker = get_masker(options.mask)  # a missing tool fails here, before any reading
    masking = RecordMasker(masker, log)
    infos = _scan(sources, log, verbose, options, masking)
    warn_mostly_n(infos, log)
    assign_splits(infos, options)
    kept = {i.key: i for i in infos if i.duplicate_of is None}

    # Shards per (kingdom, split), from the chunk counts of pass 1.
    plan: dict[tuple[str, str], int] = {}
    chunk_counts: dict[tuple[str, str], int] = {}
    byte_counts: dict[tuple[str, str], int] = {}
    for info in kept.values():
        group = (info.kingdom, info.split)
        chunk_counts[group] = chunk_counts.get(group, 0) + math.ceil(
            info.length / options.chunk_len
        )
        byte_counts[group] = byte_counts.get(group, 0) + info.length
    for group, n_chunks in chunk_counts.items():
        by_size = math.ceil(byte_counts[group] / options.shard_bytes)
        plan[group] = min(n_chunks, max(options.min_shards, by_size))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    writers: dict[tuple[str, str, int], wds.TarWriter] = {}
    next_shard: dict[tuple[str, str], int] = dict.fromkeys(plan, 0)
    shard_stats: dict[tuple[str, str, int], dict[str, int]] = {}
    try:
        try:
            for index, src in enumerate(sources):
                keys_in_file = iter([i for i in infos if i.input == index])
                for rec, _ in _masked_records(src, index, options, masking):
                    info = next(keys_in_file)
                    if info.duplicate_of is not None:
                        continue
                    _write_record(
                        rec, info, options, plan, next_shard, writers, shard_stats, partial
                    )
        finally:
            for writer in writers.values():
                writer.close()
        manifest = _manifest(infos, plan, shard_stats, partial, options, sources)
        manifest["masking"] = _masking_entry(infos, options, masker)
        manifest["build_seconds"] = round(time.time() - started, 2)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _swap_in(partial, out)
    except BaseException as err:  # a failed or interrupted build leaves nothing behind
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.filename is None:  # a write: name where it went
            raise OSError(err.errno, err.strerror, str(out)) from err
        raise
    log(summary(manifest))
    return manifest


def warn_kingdom_typos(sources: list[SourceFile], log: Callable[[str], None]) -> None:
    """A line for each kingdom name that is not a RefSeq kingdom but nearly is one: a typo
    would otherwise silently become a kingdom of its own."""
    for kingdom in sorted({s.kingdom for s in sources} - set(REFSEQ_KINGDOMS)):
        close = difflib.get_close_matches(kingdom, REFSEQ_KINGDOMS, n=1, cutoff=0.75)
        if close:
            where = next(s.path for s in sources if s.kingdom == kingdom)
            log(
                f"warning: kingdom {kingdom!r} ({where}) is not a RefSeq kingdom; did you mean "
                f"{close[0]!r}? As written it becomes a kingdom of its own"
            )


def warn_mostly_n(infos: list[RecordInfo], log: Callable[[str], None]) -> None:
    """One line naming the records with more N than training windows may hold by default."""
    many = [i for i in infos if i.n_fraction > DEFAULT_MAX_N_FRACTION]
    if not many:
        return
    names = ", ".join(f"{i.id} ({100 * i.n_fraction:.0f}% N)" for i in many[:5])
    more = f" and {len(many) - 5} more" if len(many) > 5 else ""
    log(
        f"warning: {len(many)} of {len(infos)} records are more than "
        f"{100 * DEFAULT_MAX_N_FRACTION:.0f}% N: {names}{more}. Training skips windows with more "
        f"N than data.max_n_fraction ({DEFAULT_MAX_N_FRACTION}); a kingdom made only of such "
        "records gives no window"
    )


def is_shard_set(folder: Path) -> bool:
    """Whether ``folder`` holds a nucleo shard set (a manifest.json of this format)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path, sources: list[SourceFile], overwrite: bool) -> None:
    """Refuse an output folder that building would harm: one holding an input, or anything
    but an empty folder or (with ``overwrite``) an earlier nucleo shard set."""
    resolved = out.resolve()
    for src in sources:
        if resolved == src.path.resolve() or resolved in src.path.resolve().parents:
            raise ValueError(
                f"{out}: the input {src.path} lies inside this output folder, which the build "
                "would replace; write the shards somewhere else (--out)"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return  # an empty folder is as good as none
    if not is_shard_set(out):
        raise FileExistsError(
            f"{out}: not empty and not a nucleo shard set (no {MANIFEST} of format {FORMAT}); "
            "--overwrite replaces only shard sets: choose another --out"
        )
    if not overwrite:
        raise FileExistsError(f"{out}: holds a shard set; pass --overwrite to replace it")


def _swap_in(partial: Path, out: Path) -> None:
    """Put the finished ``partial`` at ``out``; the set it replaces is removed only after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_record(
    rec: SequenceRecord,
    info: RecordInfo,
    options: ShardOptions,
    plan: dict[tuple[str, str], int],
    next_shard: dict[tuple[str, str], int],
    writers: dict[tuple[str, str, int], wds.TarWriter],
    shard_stats: dict[tuple[str, str, int], dict[str, int]],
    root: Path,
) -> None:
    group = (info.kingdom, info.split)
    for index, (offset, chunk) in enumerate(_chunks(rec.seq, options.chunk_len)):
        shard = next_shard[group]
        next_shard[group] = (shard + 1) % plan[group]
        wkey = (info.kingdom, info.split, shard)
        if wkey not in writers:
            path = root / info.kingdom / f"{info.split}-{shard:06d}.tar"
            path.parent.mkdir(parents=True, exist_ok=True)
            writers[wkey] = wds.TarWriter(str(path), mtime=0)
            shard_stats[wkey] = {"chunks": 0, "bases": 0}
        meta = {
            "record": info.key,
            "kingdom": info.kingdom,
            "chunk": index,
            "offset": offset,
            "length": len(chunk),
            "record_length": info.length,
        }
        writers[wkey].write(
            {"__key__": f"{_safe_key(info.key)}-{index:06d}", "seq": chunk, "json": meta}
        )
        shard_stats[wkey]["chunks"] += 1
        shard_stats[wkey]["bases"] += len(chunk)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(
    infos: list[RecordInfo],
    plan: dict[tuple[str, str], int],
    shard_stats: dict[tuple[str, str, int], dict[str, int]],
    root: Path,
    options: ShardOptions,
    sources: list[SourceFile],
) -> dict[str, Any]:
    kingdoms: dict[str, dict[str, Any]] = {}
    for kingdom, split in sorted(plan):
        members = [i for i in infos if i.kingdom == kingdom and i.split == split]
        shards = []
        for shard in range(plan[(kingdom, split)]):
            stats = shard_stats.get((kingdom, split, shard))
            if stats is None:
                continue
            rel = f"{kingdom}/{split}-{shard:06d}.tar"
            shards.append(
                {
                    "path": rel,
                    "chunks": stats["chunks"],
                    "bases": stats["bases"],
                    "bytes": (root / rel).stat().st_size,
                    "sha256": sha256_file(root / rel),
                }
            )
        kingdoms.setdefault(kingdom, {})[split] = {
            "records": len(members),
            "bases": sum(i.length for i in members),
            "repeat_bases": round(sum(i.length * i.repeat_fraction for i in members)),
            "chunks": sum(s["chunks"] for s in shards),
            "shards": shards,
        }
    records = []
    for info in infos:
        row = asdict(info)
        row.pop("split_hash")
        records.append(row)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": asdict(options),
        "kingdoms": kingdoms,
        "records": records,
        "duplicates": sum(1 for i in infos if i.duplicate_of is not None),
        "near_duplicates": sum(1 for i in infos if i.near_duplicate_of is not None),
        "inputs": [
            {
                "path": str(s.path),
                "kingdom": s.kingdom,
                "package": s.package,
                "include": s.include,
                "exclude": s.exclude,
                "sha256": sha256_file(s.path),
            }
            for s in sources
        ],
    }


def _masking_entry(
    infos: list[RecordInfo], options: ShardOptions, masker: Masker | None
) -> dict[str, Any]:
    """The manifest's ``masking``: the mask asked for, the tool that ran (name, version,
    settings), and records and repeat bases by where their mask came from."""
    entry: dict[str, Any] = masker.describe() if masker is not None else {"mask": options.mask}
    records: dict[str, int] = {}
    bases: dict[str, int] = {}
    for info in infos:
        source = info.mask_source or "none"
        records[source] = records.get(source, 0) + 1
        bases[source] = bases.get(source, 0) + round(info.length * info.repeat_fraction)
    entry["records"] = dict(sorted(records.items()))
    entry["repeat_bases"] = dict(sorted(bases.items()))
    return entry


def summary(manifest: dict[str, Any]) -> str:
    """A per-kingdom table of records, bases and shards."""
    lines = [
        f"{'kingdom':<18}{'split':<7}{'records':>8}{'bases':>13}{'repeats':>9}{'chunks':>8}"
        f"{'shards':>8}"
    ]
    for kingdom, splits in manifest["kingdoms"].items():
        for split, s in splits.items():
            share = f"{s['repeat_bases'] / s['bases']:.1%}" if "repeat_bases" in s else "-"
            lines.append(
                f"{kingdom:<18}{split:<7}{s['records']:>8}{s['bases']:>13,}{share:>9}"
                f"{s['chunks']:>8}{len(s['shards']):>8}"
            )
    total = sum(s["bases"] for k in manifest["kingdoms"].values() for s in k.values())
    held = sum(k.get("val", {}).get("bases", 0) for k in manifest["kingdoms"].values())
    lines.append(
        f"held out for validation: {held:,} of {total:,} bases ({100 * held / total:.0f}%)"
    )
    lines.append(f"exact duplicates dropped: {manifest['duplicates']}")
    if soft_masked(manifest):
        lines.append("repeats: soft-masked (lower-case) bases kept as a mask (format 2)")
    else:
        lines.append("repeats: no mask kept (all bases upper case)")
    masking = manifest.get("masking", {})
    if masking.get("mask", "none") != "none":
        records = masking.get("records", {})
        lines.append(
            f"masking: {masking['mask']} ({masking.get('tool')} {masking.get('version')}) masked "
            f"{records.get(masking['mask'], 0)} records; {records.get('input', 0)} kept their "
            "own soft mask"
        )
    if "near_duplicates" in manifest:
        lines.append(
            f"near-duplicates kept, clustered into one split: {manifest['near_duplicates']}"
        )
    return "\n".join(lines)


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read and check ``<shard_dir>/manifest.json``."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no shard manifest; build shards first with `nucleo data build`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if manifest.get("format") not in FORMATS:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r}, expected one of {', '.join(FORMATS)} "
            "(rebuild it with `nucleo data build`)"
        )
    return manifest


def soft_masked(manifest: dict[str, Any]) -> bool:
    """Whether a shard set keeps the soft mask (format 2 built with ``soft_mask``)."""
    return manifest.get("format") != FORMATS[0] and bool(
        manifest.get("options", {}).get("soft_mask", False)
    )


def shard_paths(
    shard_dir: str | Path, manifest: dict[str, Any], split: str, kingdoms: Iterable[str] | None
) -> list[tuple[str, int]]:
    """(shard path, chunks in it) of ``split``, kingdoms interleaved; unknown kingdoms are an
    error."""
    available = sorted(manifest["kingdoms"])
    wanted = list(kingdoms) if kingdoms else available
    for k in wanted:
        if k not in manifest["kingdoms"]:
            raise ValueError(
                f"kingdom {k!r} is not in {Path(shard_dir) / MANIFEST}; available: "
                + ", ".join(available)
            )
    ranked = []
    for k in sorted(wanted):
        for index, shard in enumerate(manifest["kingdoms"][k].get(split, {}).get("shards", [])):
            ranked.append((index, str(Path(shard_dir) / shard["path"]), int(shard["chunks"])))
    # Kingdoms interleaved (every kingdom's first shard, then every second, ...) so that the
    # readers striding through this list (rank x worker) each get a mix of kingdoms.
    return [(path, chunks) for _, path, chunks in sorted(ranked)]


def shard_checksums(shard_dir: str | Path, manifest: dict[str, Any]) -> dict[str, str]:
    """{shard path (as ``shard_paths`` gives it): SHA-256 from the manifest}."""
    return {
        str(Path(shard_dir) / shard["path"]): shard["sha256"]
        for splits in manifest["kingdoms"].values()
        for entry in splits.values()
        for shard in entry["shards"]
    }


def verify_shards(shard_dir: str | Path) -> list[str]:
    """Problems found by re-hashing every shard against the manifest (empty when all good)."""
    manifest = load_manifest(shard_dir)
    problems = []
    for kingdom, splits in manifest["kingdoms"].items():
        for split, entry in splits.items():
            for shard in entry["shards"]:
                path = Path(shard_dir) / shard["path"]
                if not path.is_file():
                    problems.append(f"{path}: missing ({kingdom}/{split})")
                elif sha256_file(path) != shard["sha256"]:
                    problems.append(f"{path}: checksum differs from the manifest (corrupt?)")
    return problems
