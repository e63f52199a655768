"""Feature annotations of genome files: GenBank FEATURES tables and GFF3, as 0-based half-open
intervals per sequence record, for tasks such as coding vs intergenic windows.

    read_genbank_features("NC_005816.gb.gz")  -> {"NC_005816.1": [Feature(...), ...]}
    read_gff3("genomic.gff.gz")               -> {"NC_003070.9": [Feature(...), ...]}

A feature with several parts (``join(1..10,20..30)``) becomes one Feature per part, so that
"inside a CDS" means inside one coding segment, never across an intron.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.readers import SequenceFormatError, _lines

#: Feature types that describe a whole sequence rather than an element on it; they never count
#: as "annotated" when looking for unannotated (intergenic) windows.
WHOLE_SEQUENCE = frozenset(
    {"source", "region", "chromosome", "contig", "supercontig", "scaffold", "databank_entry"}
)


@dataclass(frozen=True)
class Feature:
    """One annotated interval: ``type`` (CDS, gene, ...), 0-based ``start`` <= ``end``
    (half-open, in bases of the record) and ``strand`` ('+', '-' or '.')."""

    type: str
    start: int
    end: int
    strand: str


_SPAN = re.compile(r"<?(\d+)(?:\.\.>?(\d+))?")


def parse_location(text: str, where: str = "location") -> list[tuple[int, int, str]]:
    """Parts of a GenBank location as (start, end, strand), 0-based half-open.

    Handles ``complement``, ``join``, ``order``, fuzzy ends (``<1..>200``) and single bases;
    remote parts (``J00194.1:100..202``) and between-bases sites (``10^11``) are skipped.
    """
    strand = "-" if "complement(" in text else "+"
    body = re.sub(r"(complement|join|order)\(|\)", "", text.replace(" ", ""))
    parts = []
    for piece in body.split(","):
        if not piece or ":" in piece or "^" in piece:
            continue
        match = _SPAN.fullmatch(piece)
        if match is None:
            raise ValueError(f"{where}: cannot read location part {piece!r} of {text!r}")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        parts.append((min(first, last) - 1, max(first, last), strand))
    return parts


def read_genbank_features(path: str | Path) -> dict[str, list[Feature]]:
    """Features of every record of a GenBank flat file, keyed by its VERSION (else ACCESSION,
    else LOCUS) as ``data_pipeline.readers.read_genbank`` names records."""
    out: dict[str, list[Feature]] = {}
    fields: dict[str, str] = {}
    features: list[Feature] = []
    section = "outside"  # outside | header | features | sequence
    key, location, in_location, start_line = "", "", False, 0

    def flush() -> None:
        nonlocal key, location
        if key:
            where = f"{path}, line {start_line}"
            features.extend(Feature(key, *part) for part in parse_location(location, where))
        key, location = "", ""

    for number, raw in _lines(path):
        line = raw.decode("utf-8", errors="replace").rstrip("\n\r")
        if line.startswith("LOCUS"):
            words = line.split()
            if len(words) < 2:
                raise SequenceFormatError(path, number, "LOCUS line without a name")
            fields, features, section = {"LOCUS": words[1]}, [], "header"
        elif section == "outside":
            continue
        elif line.startswith("//"):
            flush()
            ident = (
                fields.get("VERSION", "").split(" ")[0]
                or fields.get("ACCESSION", "").split(" ")[0]
                or fields["LOCUS"]
            )
            out[ident] = features
            section = "outside"
        elif line[:1].isalpha():  # a top-level keyword: FEATURES, ORIGIN, CONTIG, VERSION ...
            flush()
            word = line[:12].strip()
            section = {"FEATURES": "features", "ORIGIN": "sequence", "CONTIG": "sequence"}.get(
                word.split(" ")[0], "header" if section == "header" else "sequence"
            )
            if section == "header":
                fields.setdefault(word, line[12:].strip())
        elif section == "features":
            if len(line) > 5 and line[5] != " ":
                flush()
                key, location, start_line = line[5:21].strip(), line[21:].strip(), number
                in_location = True
            elif line[21:22] == "/":
                in_location = False
            elif key and in_location:
                location += line[21:].strip()
    if section != "outside":
        raise SequenceFormatError(path, None, f"record {fields.get('LOCUS')!r} has no '//' line")
    return out


def read_gff3(path: str | Path) -> dict[str, list[Feature]]:
    """Features of a GFF3 (or GTF) file keyed by seqid; 1-based inclusive coordinates become
    0-based half-open. Errors name the file and line."""
    out: dict[str, list[Feature]] = {}
    for number, raw in _lines(path):
        line = raw.decode("utf-8", errors="replace").rstrip("\n\r")
        if line.startswith("##FASTA"):
            break
        if not line or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) < 8:
            raise SequenceFormatError(
                path, number, f"a GFF3 line has 9 tab-separated columns, found {len(cols)}"
            )
        try:
            start, end = int(cols[3]), int(cols[4])
        except ValueError:
            raise SequenceFormatError(
                path, number, f"start/end must be integers, got {cols[3]!r}, {cols[4]!r}"
            ) from None
        if start < 1 or end < start:
            raise SequenceFormatError(path, number, f"bad interval {start}..{end}")
        out.setdefault(cols[0], []).append(Feature(cols[2], start - 1, end, cols[6]))
    return out


def coverage(
    features: Iterable[Feature], length: int, types: Iterable[str] | None = None
) -> np.ndarray:
    """[length] int32 count of features (of ``types``, or of every type outside
    WHOLE_SEQUENCE) covering each base, from a difference array: O(length + features)."""
    wanted = set(types) if types is not None else None
    diff = np.zeros(length + 1, np.int32)
    for f in features:
        if (wanted is not None and f.type not in wanted) or (
            wanted is None and f.type in WHOLE_SEQUENCE
        ):
            continue
        lo, hi = max(0, f.start), min(length, f.end)
        if lo < hi:
            diff[lo] += 1
            diff[hi] -= 1
    return np.cumsum(diff[:-1], dtype=np.int32)
