"""``coding_vs_intergenic``: windows fully inside one CDS segment vs windows overlapping no
annotated feature, from GenBank files and GFF3 + FASTA pairs; whole organisms (files) are held
out for test."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.annotations import Feature, coverage, read_genbank_features, read_gff3
from data_pipeline.readers import detect_format, read_sequences
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.registry import TASKS
from nucleo.downstream.tasks.base import Task, TaskError, corpus_files, in_test, split_from


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
    test = set(test_groups or [g for g in groups if in_test(g, f"coding{seed}", test_fraction)])
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
        {k: split_from(v) for k, v in rows.items()},
        meta,
    )


@TASKS.register("coding_vs_intergenic")
class CodingVsIntergenic:
    """coding (inside a CDS) vs intergenic windows; whole organisms held out for test"""

    needs = "annotations"
    build = staticmethod(build_coding_vs_intergenic)

    @staticmethod
    def corpus_inputs(corpus: Path) -> dict[str, Any]:
        files = corpus_files(corpus)
        genbank = sorted({p for p, fmt in files if fmt == "genbank"})
        folders = sorted({str(Path(p).parent) for p, _ in files})
        gffs = [
            str(g)
            for folder in folders
            for g in sorted(Path(folder).glob("*.gff.gz"))
            if genome_fasta_of(g) is not None
        ]
        return {"annotations": genbank + gffs}
