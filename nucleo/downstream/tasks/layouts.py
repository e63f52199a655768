"""Task folders in the layouts users already have: ``load_task`` detects and reads them,
``save_task`` writes them.

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
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_pipeline.readers import read_sequences
from data_pipeline.sources import DownloadError, download_file
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.options import LAYOUTS
from nucleo.downstream.tasks.base import Split, Task, TaskError


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
