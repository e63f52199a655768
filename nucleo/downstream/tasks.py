"""Downstream classification tasks: built from real genomes with leakage-free splits, and read
or written in the layouts users already have.

Built tasks (``nucleo tasks build NAME``):

- ``kingdom``: which kingdom a fragment (200 bp) comes from, balanced classes. Train fragments
  come from the corpus's ``train`` shards, test fragments from its ``val`` shards, whose records
  the corpus split by near-duplicate cluster: no record (or near copy) is on both sides.
- ``plasmid_vs_chromosome``: plasmid vs chromosome fragments of whole genomes (the Klebsiella
  pneumoniae assemblies of the corpus); one genome is held out for test.
- ``coding_vs_intergenic``: windows fully inside one CDS segment vs windows overlapping no
  annotated feature, from GenBank files and GFF3 + FASTA pairs; whole organisms (files) are held
  out for test.

Layouts (``load_task`` detects them; ``save_task`` writes them):

- ``parquet`` (the Nucleotide Transformer tasks): ``train.parquet`` / ``test.parquet`` (or
  ``train-*.parquet``, in the folder or its ``data/``; CSV too) with ``sequence`` and
  ``label`` columns (plus ``name``/``id`` and ``group`` when known); class names in
  ``task.json``.
- ``genomic-benchmarks`` (its ``datasets/`` folder): ``metadata.yaml`` naming one reference
  FASTA per class, and per split one ``<class>.csv.gz`` of ``id,region,start,end,strand``
  intervals into it (0-based, end exclusive; ``-`` strand reverse-complemented).
- ``genomic-benchmarks-cached`` (its downloaded form): ``<split>/<class>/<id>.txt``, one
  sequence per file.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_pipeline.annotations import Feature, coverage, read_genbank_features, read_gff3
from data_pipeline.readers import detect_format, read_sequences
from data_pipeline.sources import DownloadError, download_file
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.options import LAYOUTS

BUILT = ("kingdom", "plasmid_vs_chromosome", "coding_vs_intergenic")


class TaskError(ValueError):
    """A task folder or file that cannot be read; the message names the file and what is valid."""


@dataclass
class Split:
    """One split: ``sequences`` (upper-case bytes), ``labels`` [n] int64 class indices, an
    ``id`` per example and the ``group`` (record or organism) it was cut from."""

    sequences: list[bytes]
    labels: np.ndarray
    ids: list[str]
    groups: list[str]
    #: (region, start, end, strand) per example when it came from a reference, else None.
    regions: list[tuple[str, int, int, str]] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def counts(self, n_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=n_classes).tolist()


@dataclass
class Task:
    name: str
    classes: list[str]
    splits: dict[str, Split]
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        for name, split in self.splits.items():
            counts = ", ".join(
                f"{c} {n}"
                for c, n in zip(self.classes, split.counts(len(self.classes)), strict=True)
            )
            lengths = [len(s) for s in split.sequences] or [0]
            parts.append(
                f"{name}: {len(split)} sequences ({counts}); {len(set(split.groups))} groups; "
                f"length {min(lengths)}-{max(lengths)}"
            )
        return f"task {self.name}: {len(self.classes)} classes\n  " + "\n  ".join(parts)


# ----------------------------------------------------------------------------- sampling


def _has_n(seq: bytes) -> bool:
    return seq.count(b"N") > 0


def _grid_fragments(
    seq: bytes | bytearray, length: int, count: int, rng: np.random.Generator
) -> list[int]:
    """Up to ``count`` distinct non-overlapping fragment starts (multiples of ``length``) of
    ``seq`` whose fragment holds no N."""
    slots = len(seq) // length
    out: list[int] = []
    for slot in rng.permutation(slots):
        start = int(slot) * length
        if not _has_n(bytes(seq[start : start + length])):
            out.append(start)
            if len(out) == count:
                break
    return out


def _in_test(group: str, salt: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{salt}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _split_from(rows: list[tuple[bytes, int, str, str, tuple[str, int, int, str] | None]]) -> Split:
    regions = [r[4] for r in rows]
    return Split(
        sequences=[r[0] for r in rows],
        labels=np.array([r[1] for r in rows], np.int64),
        ids=[r[2] for r in rows],
        groups=[r[3] for r in rows],
        regions=None if any(r is None for r in regions) else regions,  # type: ignore[misc]
    )


# ----------------------------------------------------------------------------- kingdom


def _shard_chunks(
    shard_dir: Path, kingdom: str, split: str, manifest: dict
) -> list[tuple[str, int, bytes]]:
    """(record key, offset, bases) of every chunk of one kingdom's split, from its tar shards."""
    chunks = []
    for shard in manifest["kingdoms"][kingdom].get(split, {}).get("shards", []):
        path = shard_dir / shard["path"]
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                handle = tar.extractfile(member)
                assert handle is not None
                members.setdefault(key, {})[ext] = handle.read()
        for key in sorted(members):
            entry = members[key]
            meta = json.loads(entry["json"])
            chunks.append((meta["record"], int(meta["offset"]), entry["seq"]))
    return chunks


def build_kingdom(
    shards: str | Path,
    length: int = 200,
    train_per_class: int = 400,
    test_per_class: int = 100,
    seed: int = 0,
    kingdoms: Sequence[str] | None = None,
) -> Task:
    """The ``kingdom`` task from a shard folder (``nucleo data build``/``corpus``): train
    fragments from ``train`` shards, test fragments from ``val`` shards. A kingdom without
    ``val`` records (or too few bases for the asked count) is left out and named in meta."""
    from data_pipeline.shards import load_manifest

    root = Path(shards)
    manifest = load_manifest(root)
    rng = np.random.default_rng(seed)
    names = sorted(kingdoms or manifest["kingdoms"])
    kept, left_out = [], {}
    for kingdom in names:
        if kingdom not in manifest["kingdoms"]:
            raise TaskError(f"{root}/manifest.json has no kingdom {kingdom!r}")
        info = manifest["kingdoms"][kingdom]
        need = {"train": train_per_class, "val": test_per_class}
        short = [s for s in need if info.get(s, {}).get("bases", 0) < need[s] * length * 1.25]
        if short:
            left_out[kingdom] = f"too few bases in its {'/'.join(short)} split"
            continue
        kept.append(kingdom)
    if len(kept) < 2:
        raise TaskError(f"{root}: fewer than 2 kingdoms with both train and val data ({left_out})")
    rows: dict[str, list] = {"train": [], "test": []}
    for label, kingdom in enumerate(kept):
        for split, out, count in (
            ("train", "train", train_per_class),
            ("val", "test", test_per_class),
        ):
            chunks = _shard_chunks(root, kingdom, split, manifest)
            weights = np.array([len(c[2]) // length for c in chunks], float)
            per_chunk = np.bincount(
                rng.choice(len(chunks), size=count * 2, p=weights / weights.sum()),
                minlength=len(chunks),
            )
            picked = []
            for index in np.flatnonzero(per_chunk):
                record, offset, seq = chunks[index]
                for start in _grid_fragments(seq, length, int(per_chunk[index]), rng):
                    frag = seq[start : start + length]
                    region = (record, offset + start, offset + start + length, "+")
                    picked.append((frag, label, f"{record}:{offset + start}", record, region))
            if len(picked) < count:
                raise TaskError(
                    f"{kingdom}/{split}: only {len(picked)} N-free fragments, need {count}"
                )
            order = rng.permutation(len(picked))[:count]
            rows[out].extend(picked[i] for i in sorted(order))
    meta = {"source": str(root), "length": length, "seed": seed, "left_out": left_out}
    return Task("kingdom", kept, {k: _split_from(v) for k, v in rows.items()}, meta)


# ----------------------------------------------------------------------------- plasmids


def build_plasmid_vs_chromosome(
    genomes: Sequence[str | Path],
    test_genome: str | None = None,
    length: int = 200,
    train_per_class: int = 1000,
    test_per_class: int = 300,
    seed: int = 0,
) -> Task:
    """Plasmid vs chromosome fragments of whole-genome assemblies (one file per genome); a
    record is a plasmid when its description says so. Genomes without both kinds of record are
    skipped (named in meta). ``test_genome`` (a file name or stem; default: the last usable
    file) is held out for test, the others train."""
    paths = [Path(g) for g in genomes]
    stems = [p.name.split(".")[0] for p in paths]
    usable: dict[str, dict[int, list[tuple[str, bytes]]]] = {}
    skipped = {}
    for path, stem in zip(paths, stems, strict=True):
        pools: dict[int, list[tuple[str, bytes]]] = {0: [], 1: []}
        for record in read_sequences(path):
            label = 1 if "plasmid" in record.description.lower() else 0
            pools[label].append((record.id, bytes(record.seq)))
        if pools[0] and pools[1]:
            usable[stem] = pools
        else:
            skipped[str(path)] = f"{len(pools[0])} chromosome and {len(pools[1])} plasmid records"
    if len(usable) < 2:
        raise TaskError(
            "plasmid_vs_chromosome holds one genome out: it needs >= 2 genome files with both "
            "chromosome and plasmid records (a plasmid's description says 'plasmid'); usable: "
            f"{sorted(usable)}; skipped: {skipped}"
        )
    held = (test_genome or list(usable)[-1]).split(".")[0]
    if held not in usable:
        raise TaskError(
            f"--test-genome {held!r} is none of the usable genomes: {', '.join(usable)}"
        )
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"train": [], "test": []}
    for split in ("train", "test"):
        count = train_per_class if split == "train" else test_per_class
        members = [s for s in usable if (s == held) == (split == "test")]
        for label in (0, 1):
            pool = [(stem, rid, seq) for stem in members for rid, seq in usable[stem][label]]
            slots = np.array([len(seq) // length for _, _, seq in pool], float)
            per_record = np.bincount(
                rng.choice(len(pool), size=count, p=slots / slots.sum()), minlength=len(pool)
            )
            for index, (stem, rid, seq) in enumerate(pool):
                for start in _grid_fragments(seq, length, int(per_record[index]), rng):
                    region = (rid, start, start + length, "+")
                    rows[split].append(
                        (seq[start : start + length], label, f"{rid}:{start}", stem, region)
                    )
    meta = {
        "genomes": [str(p) for p in paths],
        "test_genome": held,
        "skipped": skipped,
        "length": length,
        "seed": seed,
    }
    return Task(
        "plasmid_vs_chromosome",
        ["chromosome", "plasmid"],
        {k: _split_from(v) for k, v in rows.items()},
        meta,
    )


# ----------------------------------------------------------------------------- coding


@dataclass
class Annotated:
    """One annotated genome: a name (the organism's group) and the files to read."""

    group: str
    sequence_file: Path
    features: dict[str, list[Feature]]


def genome_fasta_of(gff: Path) -> Path | None:
    """The assembly FASTA beside a GFF3 ``X.gff.gz``: ``X_<assembly>_genomic.fna[.gz]`` (not
    the ``cds_from_genomic`` or ``rna`` files NCBI ships with it)."""
    stem = gff.name.split(".gff")[0].split(".gtf")[0]
    found = [
        f
        for f in sorted(gff.parent.glob(f"{stem}_*genomic.fna*"))
        if "cds_from" not in f.name and "_rna" not in f.name
    ]
    return found[0] if found else None


def annotated_genomes(paths: Iterable[str | Path]) -> list[Annotated]:
    """GenBank files carry their own features; a GFF3 (``X.gff.gz``) is paired with the FASTA
    next to it whose name starts with ``X_`` and ends in ``genomic.fna[.gz]``."""
    out = []
    for raw in paths:
        path = Path(raw)
        name = path.name
        if ".gff" in name or name.endswith(".gtf.gz") or name.endswith(".gtf"):
            stem = name.split(".gff")[0].split(".gtf")[0]
            fasta = genome_fasta_of(path)
            if fasta is None:
                raise TaskError(f"{path}: no FASTA {stem}_*genomic.fna[.gz] beside it to pair with")
            out.append(Annotated(_gff_species(path, stem), fasta, read_gff3(path)))
        elif detect_format(path) == "genbank":
            out.append(Annotated(_species(path), path, read_genbank_features(path)))
        else:
            raise TaskError(f"{path}: give GenBank files or GFF3 files (with their FASTA beside)")
    return out


def _species(path: Path) -> str:
    """Genus and species of a GenBank file's first ORGANISM line (strains and plasmids of one
    species are one group, so none straddles the split); the file stem when it has none."""
    from data_pipeline.readers import _lines

    for _, raw in _lines(path):
        line = raw.decode("utf-8", errors="replace")
        if line.startswith("  ORGANISM"):
            return "_".join(line[12:].split()[:2]) or path.name.split(".")[0]
        if line.startswith("ORIGIN"):
            break
    return path.name.split(".")[0]


def _gff_species(gff: Path, stem: str) -> str:
    """Genus and species from the NCBI ``<stem>_data_summary.tsv`` beside a GFF3, else stem."""
    summary = gff.parent / f"{stem}_data_summary.tsv"
    if summary.is_file():
        with summary.open() as fh:
            row = next(csv.DictReader(fh, delimiter="\t"), None) or {}
        name = row.get("Organism Scientific Name", "")
        if name:
            return "_".join(name.split()[:2])
    return stem


def _window_candidates(flags: np.ndarray, length: int) -> np.ndarray:
    """Starts s where flags[s:s+length] are all true ([n] bool -> sorted int64 starts)."""
    if len(flags) < length:
        return np.zeros(0, np.int64)
    sums = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return np.flatnonzero(sums[length:] - sums[:-length] == length)


def build_coding_vs_intergenic(
    annotations: Sequence[str | Path],
    length: int = 200,
    train_per_class: int = 1000,
    test_per_class: int = 300,
    test_fraction: float = 0.3,
    seed: int = 0,
    test_groups: Sequence[str] | None = None,
) -> Task:
    """Windows fully inside one CDS segment (label ``coding``, read on the CDS's strand) vs
    windows overlapping no annotated feature (``intergenic``, + strand). Whole genomes (files)
    go to test by a salted hash (``test_fraction``) or by name (``test_groups``)."""
    genomes = annotated_genomes(annotations)
    groups = sorted({g.group for g in genomes})
    if len(groups) < 2:
        raise TaskError(
            f"coding_vs_intergenic holds organisms out: give >= 2 genomes, got {groups}"
        )
    test = set(test_groups or [g for g in groups if _in_test(g, f"coding{seed}", test_fraction)])
    if not test or test == set(groups):
        ranked = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}{g}".encode()).hexdigest())
        test = {ranked[0]}
    unknown = test - set(groups)
    if unknown:
        raise TaskError(f"test groups {sorted(unknown)} are not among the genomes {groups}")
    rng = np.random.default_rng(seed)
    # per split, class and genome: candidate windows as (record index, start, strand) arrays
    records: list[tuple[str, bytes]] = []
    pools: dict[tuple[str, int], dict[str, list[np.ndarray]]] = {}
    for genome in genomes:
        split = "test" if genome.group in test else "train"
        for record in read_sequences(genome.sequence_file):
            feats = genome.features.get(record.id) or genome.features.get(record.accession)
            if not feats:
                continue
            seq = bytes(record.seq)
            index = len(records)
            records.append((record.id, seq))
            n = len(seq)
            clean = np.frombuffer(seq, np.uint8) != ord("N")
            plus = coverage([f for f in feats if f.strand != "-"], n, ["CDS"]) > 0
            minus = coverage([f for f in feats if f.strand == "-"], n, ["CDS"]) > 0
            found = {
                (0, 0): _window_candidates(plus & ~minus & clean, length),
                (0, 1): _window_candidates(minus & ~plus & clean, length),
                (1, 0): _window_candidates(~(coverage(feats, n) > 0) & clean, length),
            }
            for (label, strand), starts in found.items():
                tagged = np.stack(
                    [np.full_like(starts, index), starts, np.full_like(starts, strand)], 1
                )
                pools.setdefault((split, label), {}).setdefault(genome.group, []).append(tagged)
    rows: dict[str, list] = {"train": [], "test": []}
    for split in ("train", "test"):
        count = train_per_class if split == "train" else test_per_class
        for label in (0, 1):
            # up to `count` non-overlapping windows per genome, then round-robin over genomes:
            # an equal share per genome, topped up from the genomes that have more
            drawn: list[list[tuple[int, int, int]]] = []
            for group in sorted(pools.get((split, label), {})):
                cands = np.concatenate(pools[(split, label)][group])
                chosen: list[tuple[int, int, int]] = []
                occupied: set[tuple[int, int]] = set()
                for row in rng.permutation(len(cands))[: count * 20]:
                    rec, start, strand = (int(v) for v in cands[row])
                    cells = {(rec, start // length), (rec, (start + length - 1) // length)}
                    if cells & occupied:
                        continue
                    occupied |= cells
                    chosen.append((rec, start, strand))
                    if len(chosen) == count:
                        break
                drawn.append(chosen)
            taken: list[tuple[int, int, int]] = []
            for turn in range(count):
                for chosen in drawn:
                    if turn < len(chosen) and len(taken) < count:
                        taken.append(chosen[turn])
            group_of = {}
            for group, arrays in pools.get((split, label), {}).items():
                for arr in arrays:
                    if len(arr):
                        group_of[int(arr[0, 0])] = group
            for rec, start, strand in taken:
                rid, seq = records[rec]
                frag = seq[start : start + length]
                sign = "-" if strand else "+"
                if strand:
                    frag = reverse_complement_bytes(frag)
                region = (rid, start, start + length, sign)
                rows[split].append((frag, label, f"{rid}:{start}{sign}", group_of[rec], region))
    counts = {s: np.bincount([r[1] for r in rows[s]], minlength=2).tolist() for s in rows}
    for split, (n_coding, n_inter) in counts.items():
        if min(n_coding, n_inter) == 0:
            raise TaskError(
                f"coding_vs_intergenic: the {split} split has {n_coding} coding and {n_inter} "
                f"intergenic windows; give genomes with CDS annotations and unannotated stretches"
            )
    meta = {
        "annotations": [str(a) for a in annotations],
        "test_groups": sorted(test),
        "train_groups": sorted(set(groups) - test),
        "length": length,
        "seed": seed,
        "counts": counts,
    }
    return Task(
        "coding_vs_intergenic",
        ["coding", "intergenic"],
        {k: _split_from(v) for k, v in rows.items()},
        meta,
    )


# ----------------------------------------------------------------------------- layouts


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def save_task(task: Task, out: str | Path, layout: str = "parquet") -> Path:
    """Write ``task`` to folder ``out`` in one of LAYOUTS (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if layout not in LAYOUTS:
        raise TaskError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    info = {"name": task.name, "classes": task.classes, "layout": layout, "meta": task.meta}
    (root / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    if layout == "parquet":
        for name, split in task.splits.items():
            table = pa.table(
                {
                    "sequence": [s.decode() for s in split.sequences],
                    "label": split.labels.astype(np.int64),
                    "name": split.ids,
                    "group": split.groups,
                }
            )
            pq.write_table(table, root / f"{name}.parquet")
    elif layout == "genomic-benchmarks-cached":
        for name, split in task.splits.items():
            for c, cls in enumerate(task.classes):
                folder = root / name / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in np.flatnonzero(split.labels == c):
                    (folder / f"{i}.txt").write_text(split.sequences[i].decode())
    else:
        # One reference FASTA per class holding the examples' source regions (the example's
        # own bases: the reference stays small), and intervals into it per split and class.
        refs = root / "references"
        refs.mkdir(exist_ok=True)
        classes = {}
        for c, cls in enumerate(task.classes):
            ref_name = f"{_safe_name(cls)}.fa.gz"
            classes[cls] = {"type": "fa.gz", "url": f"references/{ref_name}"}
            with gzip.open(refs / ref_name, "wt") as fasta:
                for name, split in task.splits.items():
                    for i in np.flatnonzero(split.labels == c):
                        fasta.write(f">{name}_{i}\n{split.sequences[i].decode()}\n")
            for name, split in task.splits.items():
                (root / name).mkdir(exist_ok=True)
                with gzip.open(root / name / f"{_safe_name(cls)}.csv.gz", "wt", newline="") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(["id", "region", "start", "end", "strand"])
                    for i in np.flatnonzero(split.labels == c):
                        n = len(split.sequences[i])
                        writer.writerow([i, f"{name}_{i}", 0, n, "+"])
        meta = {"version": 0, "classes": classes}
        (root / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return root


def _table_files(root: Path, split: str) -> list[Path]:
    """``<split>*.parquet|csv`` files of a table task: in the folder, or in its ``data/``
    (Hugging Face's ``data/train-00000-of-00001.parquet``)."""
    return sorted(
        p
        for folder in (root, root / "data")
        for ext in ("parquet", "csv")
        for p in folder.glob(f"{split}*.{ext}")
    )


def detect_layout(path: str | Path) -> str:
    root = Path(path)
    if not root.is_dir():
        raise TaskError(f"{root}: not a folder; a task is a folder in one of: {', '.join(LAYOUTS)}")
    if (root / "metadata.yaml").is_file():
        return "genomic-benchmarks"
    if _table_files(root, "train"):
        return "parquet"
    train = root / "train"
    if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
        return "genomic-benchmarks-cached"
    raise TaskError(
        f"{root}: not a task folder. Expected train.parquet/test.parquet (sequence, label), a "
        f"Genomic Benchmarks folder with metadata.yaml and train/<class>.csv.gz, or its cached "
        f"form train/<class>/<id>.txt"
    )


def _clean(seq: str, where: str) -> bytes:
    data = seq.strip().upper().encode()
    bad = set(data) - set(b"ACGTN")
    if bad:
        # IUPAC ambiguity codes become N; anything else is an error
        iupac = set(b"RYSWKMBDHV")
        if bad - iupac:
            chars = "".join(sorted(chr(b) for b in bad - iupac))
            raise TaskError(f"{where}: characters {chars!r} are not DNA (A, C, G, T, N, IUPAC)")
        data = bytes(b if b not in iupac else ord("N") for b in data)
    if not data:
        raise TaskError(f"{where}: empty sequence")
    return data


def load_task(path: str | Path, references: str | Path | None = None) -> Task:
    """A Task from a folder in any of LAYOUTS (detected). ``references``: where the Genomic
    Benchmarks reference FASTAs are, or are downloaded to (default
    ``~/.genomic_benchmarks/fasta``)."""
    root = Path(path)
    layout = detect_layout(root)
    info = json.loads((root / "task.json").read_text()) if (root / "task.json").is_file() else {}
    if layout == "parquet":
        return _load_table_task(root, info)
    if layout == "genomic-benchmarks-cached":
        return _load_cached(root, info)
    return _load_intervals(root, info, references)


def _read_table(path: Path) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    for column in ("sequence", "label"):
        if column not in table.column_names:
            raise TaskError(
                f"{path}: no {column!r} column; columns are {table.column_names} (a task table "
                f"has 'sequence' and 'label')"
            )
    return table


def _load_table_task(root: Path, info: dict) -> Task:
    splits: dict[str, Split] = {}
    raw_labels: dict[str, list] = {}
    tables: dict[str, Any] = {}
    for name in ("train", "val", "test"):
        files = _table_files(root, name)
        if name == "val" and not files:
            files = _table_files(root, "valid")
        if not files:
            continue
        import pyarrow as pa

        tables[name] = pa.concat_tables([_read_table(f) for f in files])
        raw_labels[name] = tables[name].column("label").to_pylist()
    if "train" not in tables or "test" not in tables:
        raise TaskError(f"{root}: needs a train and a test table, found {sorted(tables)}")
    seen = sorted({v for vs in raw_labels.values() for v in vs})
    classes = info.get("classes") or [str(v) for v in seen]
    index = {str(c): i for i, c in enumerate(classes)}
    for name, table in tables.items():
        labels = []
        for row, value in enumerate(raw_labels[name]):
            key = classes[value] if info.get("classes") and isinstance(value, int) else str(value)
            if key not in index:
                raise TaskError(
                    f"{root} ({name}), row {row}: label {value!r} is not one of {classes}"
                )
            labels.append(index[key])
        seqs = [
            _clean(s, f"{root} ({name}), row {i}")
            for i, s in enumerate(table.column("sequence").to_pylist())
        ]
        names = table.column("name").to_pylist() if "name" in table.column_names else None
        ids = [str(v) for v in names] if names else [str(i) for i in range(len(seqs))]
        groups = (
            [str(v) for v in table.column("group").to_pylist()]
            if "group" in table.column_names
            else ids
        )
        splits[name] = Split(seqs, np.array(labels, np.int64), ids, groups)
    return Task(
        info.get("name", root.name), [str(c) for c in classes], splits, info.get("meta", {})
    )


def _load_cached(root: Path, info: dict) -> Task:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    splits = {}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        seqs, labels, ids = [], [], []
        for c, cls in enumerate(classes):
            folder = split_dir / cls
            if not folder.is_dir():
                continue
            for f in sorted(folder.glob("*.txt")):
                seqs.append(_clean(f.read_text(), str(f)))
                labels.append(c)
                ids.append(f"{cls}/{f.stem}")
        if seqs:
            splits[split_dir.name] = Split(seqs, np.array(labels, np.int64), ids, list(ids))
    if "test" not in splits:
        raise TaskError(f"{root}: a cached Genomic Benchmarks task needs train/ and test/ folders")
    return Task(info.get("name", root.name), classes, splits, info.get("meta", {}))


_REGION_RENAMES = {
    "ENSEMBL_HUMAN_GENOME": lambda x: "chr" + x,
    "ENSEMBL_MOUSE_GENOME": lambda x: "chr" + x,
    "ENSEMBL_HUMAN_TRANSCRIPTOME": lambda x: x.split(".")[0] if x.startswith("ENST") else x,
}


def _reference_path(root: Path, url: str, references: Path) -> Path:
    """A local reference for ``url``: a path (absolute or relative to the task folder), a copy
    already in ``references``, else downloaded there (http, https, ftp)."""
    for candidate in (Path(url), root / url, references / url.split("/")[-1]):
        if candidate.is_file():
            return candidate
    if "://" not in url:
        raise TaskError(f"{root}/metadata.yaml: reference {url!r} not found (nor in {references})")
    references.mkdir(parents=True, exist_ok=True)
    dest = references / url.split("/")[-1]
    print(f"downloading {url} -> {dest}", flush=True)
    try:  # resumable, timed out, retried, size-capped, gzip verified (data_pipeline.sources)
        return download_file(url, dest, log=lambda line: print(line, flush=True))
    except (OSError, DownloadError) as err:
        raise TaskError(f"{root}/metadata.yaml: cannot download {url}: {err}") from None


def _load_intervals(root: Path, info: dict, references: str | Path | None) -> Task:
    meta = yaml.safe_load((root / "metadata.yaml").read_text()) or {}
    if not isinstance(meta.get("classes"), dict) or not meta["classes"]:
        raise TaskError(f"{root}/metadata.yaml: needs a 'classes' mapping of class -> reference")
    classes = sorted(meta["classes"])
    ref_root = Path(references) if references else Path.home() / ".genomic_benchmarks" / "fasta"
    split_names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "references")
    # which regions each reference must provide, so a genome is read once and kept only in part
    wanted: dict[Path, set[str]] = {}
    rows: dict[tuple[str, str], list[dict[str, str]]] = {}
    refs: dict[str, tuple[Path, Any]] = {}
    for cls in classes:
        spec = meta["classes"][cls]
        if not isinstance(spec, dict) or "url" not in spec:
            raise TaskError(f"{root}/metadata.yaml: classes.{cls} needs a 'url' of its reference")
        extra = spec.get("extra_processing")
        if extra is not None and extra not in _REGION_RENAMES:
            raise TaskError(
                f"{root}/metadata.yaml: classes.{cls}.extra_processing {extra!r} unknown; valid: "
                + ", ".join(_REGION_RENAMES)
            )
        ref = _reference_path(root, str(spec["url"]), ref_root)
        refs[cls] = (ref, _REGION_RENAMES.get(extra, lambda x: x))
        for split in split_names:
            path = root / split / f"{_safe_name(cls)}.csv.gz"
            if not path.is_file():
                path = root / split / f"{cls}.csv.gz"
            if not path.is_file():
                continue
            with gzip.open(path, "rt", newline="") as fh:
                reader = csv.DictReader(fh)
                need = {"id", "region", "start", "end", "strand"}
                if not need <= set(reader.fieldnames or []):
                    raise TaskError(f"{path}: columns {reader.fieldnames}, need {sorted(need)}")
                rows[(split, cls)] = list(reader)
            wanted.setdefault(ref, set()).update(r["region"] for r in rows[(split, cls)])
    genomes: dict[Path, dict[str, bytes]] = {}
    for ref, regions in wanted.items():
        rename = next(r for p, r in refs.values() if p == ref)
        kept = {}
        for record in read_sequences(ref):
            name = rename(record.id)
            if name in regions:
                kept[name] = bytes(record.seq)
        genomes[ref] = kept
    splits = {}
    for split in split_names:
        seqs, labels, ids, groups, regions = [], [], [], [], []
        for c, cls in enumerate(classes):
            ref = refs[cls][0]
            for line, row in enumerate(rows.get((split, cls), []), start=2):
                where = f"{root / split / (cls + '.csv.gz')}, line {line}"
                genome = genomes[ref]
                if row["region"] not in genome:
                    raise TaskError(f"{where}: region {row['region']!r} is not in {ref}")
                start, end = int(row["start"]), int(row["end"])
                seq = genome[row["region"]][start:end]
                if not 0 <= start < end <= len(genome[row["region"]]):
                    raise TaskError(f"{where}: interval {start}-{end} is outside {row['region']}")
                if row["strand"] == "-":
                    seq = reverse_complement_bytes(seq)
                seqs.append(seq)
                labels.append(c)
                ids.append(f"{cls}/{row['id']}")
                groups.append(row["region"])
                regions.append((row["region"], start, end, row["strand"]))
        if seqs:
            splits[split] = Split(seqs, np.array(labels, np.int64), ids, groups, regions)
    if "train" not in splits or "test" not in splits:
        raise TaskError(f"{root}: needs train/ and test/ interval files, found {sorted(splits)}")
    return Task(info.get("name", root.name), classes, splits, info.get("meta", {}))


# ----------------------------------------------------------------------------- corpus defaults


def corpus_inputs(task: str, corpus: str | Path) -> dict[str, Any]:
    """The inputs each built task takes from an offline corpus folder (``nucleo data corpus
    --out CORPUS``): its shards, its Klebsiella assemblies, its annotated genomes."""
    root = Path(corpus)
    if task == "kingdom":
        return {"shards": root / "shards"}
    files = []
    for manifest in sorted((root / "manifests").glob("*.tsv")):
        with manifest.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                files.append((row["path"], row.get("format", "")))
    if not files:
        raise TaskError(
            f"{root}/manifests: no corpus manifests; build it with `nucleo data corpus`"
        )
    if task == "plasmid_vs_chromosome":
        klebs = sorted({p for p, _ in files if "kleborate" in p})
        return {"genomes": klebs, "test_genome": "NTUH-K2044"}
    if task == "coding_vs_intergenic":
        genbank = sorted({p for p, fmt in files if fmt == "genbank"})
        folders = sorted({str(Path(p).parent) for p, _ in files})
        gffs = [
            str(g)
            for folder in folders
            for g in sorted(Path(folder).glob("*.gff.gz"))
            if genome_fasta_of(g) is not None
        ]
        return {"annotations": genbank + gffs}
    raise TaskError(f"unknown task {task!r}; built tasks: {', '.join(BUILT)}")


def build_task(name: str, corpus: str | Path | None = None, **options: Any) -> Task:
    """Build one of BUILT from explicit inputs (``shards``, ``genomes``, ``annotations``) or,
    for those not given, from the offline corpus folder ``corpus``."""
    builders = {
        "kingdom": build_kingdom,
        "plasmid_vs_chromosome": build_plasmid_vs_chromosome,
        "coding_vs_intergenic": build_coding_vs_intergenic,
    }
    if name not in builders:
        raise TaskError(f"unknown task {name!r}; built tasks: {', '.join(BUILT)}")
    inputs = {k: v for k, v in options.items() if v is not None}
    needs = {
        "kingdom": "shards",
        "plasmid_vs_chromosome": "genomes",
        "coding_vs_intergenic": "annotations",
    }
    if needs[name] not in inputs:
        if corpus is None:
            raise TaskError(f"task {name} needs --{needs[name]} or --corpus")
        inputs = {**corpus_inputs(name, corpus), **inputs}
    return builders[name](**inputs)
