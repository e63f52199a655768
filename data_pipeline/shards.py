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

Inputs and shard sets may be URLs (``s3://``, ``gs://``, ``https://``: ``data_pipeline.storage``):
a shard's path is then ``storage.join(shard_dir, rel)``, a URL too, and messages name URLs
without their credentials.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import storage
from data_pipeline.dedup import SketchOptions
from data_pipeline.masking import MASKS, Masker
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
    ``path`` is a local Path or a URL string (``s3://...``; a local path given as a string
    becomes a Path).
    """

    path: str | Path
    kingdom: str
    group: str = ""
    include: str = ""
    exclude: str = ""
    fmt: str | None = None
    package: str = ""
    matched: bool = False

    def __post_init__(self) -> None:
        if not storage.is_url(self.path) and not isinstance(self.path, Path):
            object.__setattr__(self, "path", storage.local(self.path))

    @property
    def name(self) -> str:
        """The path as messages show it: a URL without its credentials."""
        return storage.redact(self.path) if storage.is_url(self.path) else str(self.path)

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


def _row_path(cell: str, base: str, remote: bool) -> str | Path:
    """A TSV row's path: a URL as written, else relative to the TSV's folder ``base`` (a URL
    folder when the TSV is at a URL; an absolute path in such a TSV stays local)."""
    if storage.is_url(cell):
        return cell
    file = Path(cell)
    if file.is_absolute():
        return file
    return storage.join(base, cell) if remote else Path(base) / file


def read_sources_tsv(path: str | Path) -> list[SourceFile]:
    """Inputs from a TSV whose header names its columns: ``path`` and ``kingdom`` (required),
    ``group``, ``include``, ``exclude``, ``format``, ``package`` and ``matched`` (optional; see
    SourceFile).

    Paths are relative to the TSV, or URLs; the TSV may itself be at a URL (relative rows then
    resolve against its URL folder). Rows starting with ``#`` are comments.
    """
    remote = storage.is_url(path)
    if remote:
        base = storage.parent(path)
        text = storage.read_bytes(path).decode("utf-8")
        where = storage.redact(path)
    else:
        path = Path(path)
        base = str(path.parent)
        with open(path, newline="") as fh:
            text = fh.read()
        where = str(path)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    header = [c.strip() for c in rows[0]] if rows else []
    unknown = [c for c in header if c not in SOURCE_COLUMNS]
    if header[:2] != ["path", "kingdom"] or unknown or len(set(header)) != len(header):
        raise ValueError(
            f"{where}:1: the header must start with 'path<TAB>kingdom', then any of "
            f"{', '.join(SOURCE_COLUMNS[2:])} once each; got {header}"
        )
    sources = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        if not 2 <= len(row) <= len(header):
            raise ValueError(f"{where}:{number}: expected {'<TAB>'.join(header)}, got {row}")
        cells = {name: value.strip() for name, value in zip(header, row, strict=False)}
        fmt = cells.get("format") or None
        if fmt not in (None, "fasta", "genbank"):
            raise ValueError(f"{where}:{number}: format {fmt!r}; valid: fasta, genbank (or empty)")
        for column in ("include", "exclude"):
            try:
                re.compile(cells.get(column, ""))
            except re.error as err:
                message = f"{column} is not a valid regex ({err})"
                raise ValueError(f"{where}:{number}: {message}") from None
        sources.append(
            SourceFile(
                _row_path(cells["path"], base, remote),
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
            if storage.is_url(src.path):
                rel = str(src.path)
            else:
                try:
                    rel = str(Path(src.path).resolve().relative_to(path.parent.resolve()))
                except ValueError:
                    rel = str(Path(src.path).resolve())
            matched = "yes" if src.matched else ""
            writer.writerow([rel, src.kingdom, src.group, src.include, src.exclude,
                             src.fmt or "", src.package, matched])  # fmt: skip
    return path


#: URL inputs checked at once (each check is a request to the store)
_CHECKS_AT_ONCE = 16


def check_sources(sources: Iterable[SourceFile]) -> list[SourceFile]:
    """``sources`` as a list, after checking that each is there once (a local path resolved,
    a URL as written), with a valid kingdom; a URL that cannot be checked (no credentials,
    no bucket, access denied) is a one-line error naming it, credentials removed."""
    sources = list(sources)
    if not sources:
        raise ValueError("no input genome files given")
    seen: set[tuple[str, str, str]] = set()
    for src in sources:
        entry = (storage.place(src.path), src.include, src.exclude)
        if entry in seen:
            raise ValueError(f"{src.name}: listed twice in the inputs (with the same filters)")
        seen.add(entry)
        if not _KINGDOM_NAME.match(src.kingdom):
            raise ValueError(
                f"{src.name}: kingdom {src.kingdom!r} is not a valid name (lower-case letters, "
                f"digits, '_'); the RefSeq kingdoms are: {', '.join(REFSEQ_KINGDOMS)}"
            )
    remote = [src for src in sources if storage.is_url(src.path)]
    found: dict[str, bool] = {}
    if remote:
        from concurrent.futures import ThreadPoolExecutor

        urls = sorted({str(src.path) for src in remote})
        with ThreadPoolExecutor(min(_CHECKS_AT_ONCE, len(urls))) as pool:
            found = dict(zip(urls, pool.map(storage.is_file, urls), strict=True))
    for src in sources:
        there = found[str(src.path)] if storage.is_url(src.path) else Path(src.path).is_file()
        if not there:
            raise FileNotFoundError(f"{src.name}: no such genome file (kingdom {src.kingdom})")
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
        f"{src.name}: include {src.include!r} / exclude {src.exclude!r} kept none of its "
        f"records{seen}"
    )


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
    sources: Iterable[SourceFile], out_dir: str | Path, options: ShardOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """Shard ``sources`` into ``out_dir``: see ``data_pipeline.build.build_shards`` (the stages,
    workers, resuming) for the keyword arguments."""
    from data_pipeline.build import build_shards as build

    return build(list(sources), out_dir, options, **kwargs)


def warn_kingdom_typos(sources: list[SourceFile], log: Callable[[str], None]) -> None:
    """A line for each kingdom name that is not a RefSeq kingdom but nearly is one: a typo
    would otherwise silently become a kingdom of its own."""
    for kingdom in sorted({s.kingdom for s in sources} - set(REFSEQ_KINGDOMS)):
        close = difflib.get_close_matches(kingdom, REFSEQ_KINGDOMS, n=1, cutoff=0.75)
        if close:
            where = next(s.name for s in sources if s.kingdom == kingdom)
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


def is_shard_set(folder: str | Path) -> bool:
    """Whether ``folder`` (a folder or a URL) holds a nucleo shard set (a manifest.json of
    this format)."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(folder, MANIFEST)))
        return manifest.get("format") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path, sources: list[SourceFile], overwrite: bool) -> None:
    """Refuse an output folder that building would harm: one holding an input, or anything
    but an empty folder or (with ``overwrite``) an earlier nucleo shard set."""
    resolved = out.resolve()
    for src in sources:
        if storage.is_url(src.path):
            continue  # a URL input is never inside a local folder
        place = Path(src.path).resolve()
        if resolved == place or resolved in place.parents:
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


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file or URL, streamed a MiB at a time."""
    h = hashlib.sha256()
    with storage.open_stream(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """Read and check ``<shard_dir>/manifest.json`` (``shard_dir`` a folder or a URL: no
    credentials, no bucket or access denied are one line naming it)."""
    path = storage.join(shard_dir, MANIFEST)
    where = storage.redact(path) if storage.is_url(path) else path
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{where}: no shard manifest; build shards first with `nucleo data build`"
        )
    try:
        manifest = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}:{err.lineno}: not valid JSON ({err.msg})") from None
    if manifest.get("format") not in FORMATS:
        raise ValueError(
            f"{where}: format {manifest.get('format')!r}, expected one of {', '.join(FORMATS)} "
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
                f"kingdom {k!r} is not in {_shown(storage.join(shard_dir, MANIFEST))}; "
                "available: " + ", ".join(available)
            )
    ranked = []
    for k in sorted(wanted):
        for index, shard in enumerate(manifest["kingdoms"][k].get(split, {}).get("shards", [])):
            ranked.append((index, storage.join(shard_dir, shard["path"]), int(shard["chunks"])))
    # Kingdoms interleaved (every kingdom's first shard, then every second, ...) so that the
    # readers striding through this list (rank x worker) each get a mix of kingdoms.
    return [(path, chunks) for _, path, chunks in sorted(ranked)]


def shard_checksums(shard_dir: str | Path, manifest: dict[str, Any]) -> dict[str, str]:
    """{shard path (as ``shard_paths`` gives it): SHA-256 from the manifest}."""
    return {
        storage.join(shard_dir, shard["path"]): shard["sha256"]
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
                path = storage.join(shard_dir, shard["path"])
                shown = _shown(path)
                if not storage.is_file(path):
                    problems.append(f"{shown}: missing ({kingdom}/{split})")
                elif sha256_file(path) != shard["sha256"]:
                    problems.append(f"{shown}: checksum differs from the manifest (corrupt?)")
    return problems


def _shown(path: str | Path) -> str:
    """``path`` as a message shows it: a URL without its credentials."""
    return storage.redact(path) if storage.is_url(path) else str(path)
