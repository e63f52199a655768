"""Region classes: which annotated records ``nucleo evaluate`` reads, and the class of each of
their bases (``classify``); nucleo.downstream.regions scores the bases and sums their nats per
class.

**Classes**, one per base; where features overlap the first that applies wins (strand is
ignored, except for the reading frame):

1. ``cds1``, ``cds2``, ``cds3``: inside a CDS, by codon position. The frame of every CDS
   segment comes from ``data_pipeline.annotations.coding_parts`` (GenBank: the bases of the
   CDS before the segment in transcription order and ``/codon_start``) or ``gff3_coding_part``
   (GFF3's phase column). ``cds_frames``: inside CDS segments that disagree on the codon
   position (overlapping genes in different frames).
2. ``rrna``, 3. ``trna``, 4. ``ncrna`` (every other RNA feature: ncRNA, lnc_RNA, snoRNA,
   tmRNA, misc_RNA, ...), as annotated (GFF3: the whole feature; GenBank: its parts).
5. ``utr``: 5'/3' UTR features; in a record without any, exons (GFF3 ``exon`` lines, GenBank
   ``exon`` features and the parts of ``mRNA`` joins) that lie inside a transcript.
6. ``intron``: inside a transcript (GFF3 ``mRNA``/``transcript``/``primary_transcript``, the
   span of a GenBank ``mRNA`` or of a CDS join, an ``intron`` feature) but in none of its
   exons.
7. ``other``: inside any other feature (gene, pseudogene, repeat_region, mobile_element,
   regulatory, misc_feature, ...) except those that describe the whole sequence
   (``annotations.WHOLE_SEQUENCE``: source, region, chromosome, ...).
8. ``intergenic``: in no feature at all.

**Which records**: by default the ``val`` split of a shard set (its manifest's records, each
read from its ``source`` file), so evaluation never sees training data; a record counts when
its GenBank file has features for it or a GFF3 lies beside its FASTA (``X.gff.gz`` beside
``X_*genomic.fna.gz``, ``tasks.coding.genome_fasta_of``). Or explicit GenBank / GFF3 files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.annotations import (
    WHOLE_SEQUENCE,
    CodingPart,
    Feature,
    coding_parts,
    coverage,
    gff3_coding_part,
    gff3_rows,
    read_genbank_entries,
)
from data_pipeline.readers import detect_format, read_sequences
from nucleo.downstream.tasks.coding import genome_fasta_of

#: the classes in report order, with their labels
LABELS = {
    "cds1": "CDS codon position 1",
    "cds2": "CDS codon position 2",
    "cds3": "CDS codon position 3",
    "cds_frames": "CDS, frames disagree",
    "utr": "UTR",
    "intron": "intron",
    "rrna": "rRNA",
    "trna": "tRNA",
    "ncrna": "other ncRNA",
    "other": "other feature",
    "intergenic": "intergenic",
}
CLASSES = tuple(LABELS)
CODE = {name: i for i, name in enumerate(CLASSES)}

NCRNA = frozenset(
    {
        "ncRNA", "tmRNA", "misc_RNA", "precursor_RNA", "lnc_RNA", "lncRNA", "snRNA", "snoRNA",
        "miRNA", "pre_miRNA", "piRNA", "siRNA", "antisense_RNA", "RNase_P_RNA", "RNase_MRP_RNA",
        "SRP_RNA", "guide_RNA", "scRNA", "Y_RNA", "telomerase_RNA", "vault_RNA", "scaRNA",
        "ribozyme", "autocatalytically_spliced_intron", "hammerhead_ribozyme",
    }
)  # fmt: skip
#: feature type -> role (CDS lines become CodingParts; unlisted types are ``other``)
ROLES = {
    "rRNA": "rrna",
    "tRNA": "trna",
    **{t: "ncrna" for t in NCRNA},
    "5'UTR": "utr",
    "3'UTR": "utr",
    "five_prime_UTR": "utr",
    "three_prime_UTR": "utr",
    "UTR": "utr",
    "exon": "exon",
    "mRNA": "transcript",
    "transcript": "transcript",
    "primary_transcript": "transcript",
    "intron": "transcript",
}


# ----------------------------------------------------------------------------- classes


@dataclass
class Annotation:
    """One record's features in the shape ``classify`` needs: intervals (start, end) per role
    (rrna, trna, ncrna, utr, exon, transcript, other) and the CDS segments with their frames."""

    intervals: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    coding: list[CodingPart] = field(default_factory=list)

    def add(self, role: str, start: int, end: int) -> None:
        self.intervals.setdefault(role, []).append((start, end))

    def __bool__(self) -> bool:
        return bool(self.coding) or any(self.intervals.values())


def _mask(annotation: Annotation, role: str, length: int) -> np.ndarray:
    """[length] bool: inside an interval of ``role``."""
    spans = [Feature(role, a, b, ".") for a, b in annotation.intervals.get(role, ())]
    return coverage(spans, length) > 0


def classify(length: int, annotation: Annotation) -> np.ndarray:
    """[length] uint8 class of each base (an index into CLASSES), by the precedence in the
    module's docstring: later lines paint over earlier ones."""
    out = np.full(length, CODE["intergenic"], np.uint8)
    spans = [Feature("", a, b, ".") for a, b in chain(*annotation.intervals.values())]
    spans += [Feature("", p.start, p.end, p.strand) for p in annotation.coding]
    out[coverage(spans, length) > 0] = CODE["other"]  # in a feature, of any kind
    transcript, exon = _mask(annotation, "transcript", length), _mask(annotation, "exon", length)
    out[transcript & ~exon] = CODE["intron"]
    utr = _mask(annotation, "utr", length)
    out[utr if annotation.intervals.get("utr") else exon & transcript] = CODE["utr"]
    for role in ("ncrna", "trna", "rrna"):
        out[_mask(annotation, role, length)] = CODE[role]
    frame = np.zeros(length, np.uint8)
    clash = np.zeros(length, bool)
    for part in annotation.coding:
        lo, hi = max(0, part.start), min(length, part.end)
        if lo >= hi:
            continue
        new = part.codon_positions()[lo - part.start : hi - part.start]
        old = frame[lo:hi]
        clash[lo:hi] |= (old != 0) & (old != new)
        frame[lo:hi] = np.where(old == 0, new, old)
    for position in (1, 2, 3):
        out[frame == position] = CODE[f"cds{position}"]
    out[clash] = CODE["cds_frames"]
    return out


def _span(parts: list[CodingPart]) -> tuple[int, int] | None:
    """The span of a spliced feature's parts (in transcription order), whose gaps are its
    introns; None for one part, or for parts on two strands or out of order (trans-splicing,
    as of the plastid rps12, whose span is no intron)."""
    if len(parts) < 2 or len({p.strand for p in parts}) > 1:
        return None
    starts = [p.start for p in parts]
    ordered = starts == sorted(starts) if parts[0].strand == "+" else starts == sorted(starts)[::-1]
    return (min(starts), max(p.end for p in parts)) if ordered else None


def genbank_annotations(path: str | Path) -> dict[str, Annotation]:
    """{record id: Annotation} of a GenBank file's FEATURES tables (records without features
    are left out)."""
    out = {}
    for ident, entries in read_genbank_entries(path).items():
        note = Annotation()
        for entry in entries:
            if entry.key in WHOLE_SEQUENCE:
                continue
            where = f"{path}, line {entry.line}"
            start = entry.qualifiers.get("codon_start", "1") if entry.key == "CDS" else "1"
            if start not in ("1", "2", "3"):
                raise ValueError(f"{where}: /codon_start must be 1, 2 or 3, got {start!r}")
            parts = coding_parts(entry.location, int(start), where)  # in transcription order
            span = _span(parts) if entry.key in ("CDS", "mRNA") else None
            if span is not None:  # the gaps of a CDS or mRNA join are introns
                note.add("transcript", *span)
            if entry.key == "CDS":
                note.coding += parts
                continue
            role = ROLES.get(entry.key, "other")
            if entry.key == "mRNA":  # a join of exons
                role = "exon"
                if len(parts) == 1:
                    note.add("transcript", parts[0].start, parts[0].end)
            for part in parts:
                note.add(role, part.start, part.end)
        if note:
            out[ident] = note
    return out


def gff3_annotations(path: str | Path) -> dict[str, Annotation]:
    """{seqid: Annotation} of a GFF3 file (CDS frames from its phase column)."""
    out: dict[str, Annotation] = {}
    for seqid, feature, phase, number in gff3_rows(path):
        if feature.type in WHOLE_SEQUENCE:
            continue
        note = out.setdefault(seqid, Annotation())
        if feature.type == "CDS":
            note.coding.append(gff3_coding_part(feature, phase, f"{path}:{number}"))
        else:
            note.add(ROLES.get(feature.type, "other"), feature.start, feature.end)
    return out


def gff3_beside(fasta: Path) -> Path | None:
    """The GFF3 whose genome FASTA (``genome_fasta_of``) is ``fasta``, if one lies beside it."""
    for gff in sorted(fasta.parent.glob("*.gff*")):
        if genome_fasta_of(gff) == fasta:
            return gff
    return None


# ----------------------------------------------------------------------------- which records


@dataclass
class Target:
    """One annotated record to evaluate: its kingdom, id, the file its bases are read from,
    its length in bases and its annotation."""

    kingdom: str
    record: str
    sequence_file: Path
    length: int
    annotation: Annotation


def _annotations_of(sequence_file: Path) -> tuple[dict[str, Annotation], Path | None]:
    """(annotations, annotation file) of a record source: its own features (GenBank) or the
    GFF3 beside it (FASTA); ({}, None) when it has neither."""
    if detect_format(sequence_file) == "genbank":
        return genbank_annotations(sequence_file), sequence_file
    gff = gff3_beside(sequence_file)
    return (gff3_annotations(gff), gff) if gff is not None else ({}, None)


def targets_from_shards(
    shards: str | Path, split: str = "val", log: Callable[[str], None] = print
) -> list[Target]:
    """The annotated records of a shard set's ``split`` (manifest.json's records, each read
    from its ``source`` path, relative to the working folder as the shards were built)."""
    from data_pipeline.shards import load_manifest

    manifest = load_manifest(shards)
    rows = [r for r in manifest.get("records", []) if r.get("split") == split]
    if not rows:
        splits = sorted({str(r.get("split")) for r in manifest.get("records", [])})
        raise ValueError(f"--split {split}: {shards} has no such records; its splits: "
                         f"{', '.join(splits) or 'none'}")  # fmt: skip
    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    out = []
    for source, records in sorted(by_source.items()):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the source of {len(records)} {split} record(s) "
                                    f"of {shards} is missing (run from the folder the shards "
                                    "were built in)")  # fmt: skip
        notes, _ = _annotations_of(path)
        for row in records:
            note = notes.get(row["id"]) or notes.get(row.get("key", ""))
            if note:
                out.append(Target(row["kingdom"], row["id"], path, int(row["length"]), note))
    if not out:
        raise ValueError(
            f"--shards {shards}: none of its {len(rows)} {split} records has annotations (a "
            "GenBank file with features, or a GFF3 beside its FASTA); give --annotations FILE"
        )
    log(f"{len(out)} of {len(rows)} {split} records of {shards} are annotated "
        f"({', '.join(sorted({t.kingdom for t in out}))})")  # fmt: skip
    return out


def targets_from_files(paths: Iterable[str | Path], kingdom: str = "unspecified") -> list[Target]:
    """The annotated records of GenBank files and GFF3 files (each with its genome FASTA beside
    it, ``genome_fasta_of``), all of one ``kingdom``."""
    out = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"--annotations {path}: no such file")
        name = path.name
        if ".gff" in name or ".gtf" in name:
            fasta = genome_fasta_of(path)
            if fasta is None:
                stem = name.split(".gff")[0].split(".gtf")[0]
                raise FileNotFoundError(f"--annotations {path}: no genome FASTA "
                                        f"{stem}_*genomic.fna[.gz] beside it")  # fmt: skip
            notes, source = gff3_annotations(path), fasta
        elif detect_format(path) == "genbank":
            notes, source = genbank_annotations(path), path
        else:
            raise ValueError(f"--annotations {path}: give GenBank files, or GFF3 files with "
                             "their X_*genomic.fna[.gz] beside them")  # fmt: skip
        found = 0
        for record in read_sequences(source):
            note = notes.get(record.id) or notes.get(record.accession)
            if note:
                out.append(Target(kingdom, record.id, source, len(record.seq), note))
                found += 1
        if not found:
            raise ValueError(f"--annotations {path}: no record of {source} has features")
    return out
