"""Feature annotations of genome files: GenBank FEATURES tables and GFF3, as 0-based half-open
intervals per sequence record, for tasks such as coding vs intergenic windows.

    read_genbank_features("NC_005816.gb.gz")  -> {"NC_005816.1": [Feature(...), ...]}
    read_gff3("genomic.gff.gz")               -> {"NC_003070.9": [Feature(...), ...]}

A feature with several parts (``join(1..10,20..30)``) becomes one Feature per part, so that
"inside a CDS" means inside one coding segment, never across an intron.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
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


@dataclass(frozen=True)
class GenbankFeature:
    """One entry of a GenBank FEATURES table as written: its ``key`` (CDS, mRNA, ...), its
    ``location`` text, its ``qualifiers`` (``/codon_start=2`` -> {"codon_start": "2"}; quotes
    removed, continuation lines joined by a space, the first of a repeated qualifier kept) and
    the ``line`` of the file where it starts."""

    key: str
    location: str
    qualifiers: dict[str, str]
    line: int


def read_genbank_entries(path: str | Path) -> dict[str, list[GenbankFeature]]:
    """The FEATURES table of every record of a GenBank flat file, entry by entry, keyed by its
    VERSION (else ACCESSION, else LOCUS) as ``data_pipeline.readers.read_genbank`` names
    records."""
    out: dict[str, list[GenbankFeature]] = {}
    fields: dict[str, str] = {}
    entries: list[GenbankFeature] = []
    section = "outside"  # outside | header | features | sequence
    key, location, in_location, start_line = "", "", False, 0
    qualifiers: dict[str, str] = {}
    qualifier = ""

    def flush() -> None:
        nonlocal key, location, qualifiers
        if key:
            values = {name: _unquoted(value) for name, value in qualifiers.items()}
            entries.append(GenbankFeature(key, location, values, start_line))
        key, location, qualifiers = "", "", {}

    for number, raw in _lines(path):
        line = raw.decode("utf-8", errors="replace").rstrip("\n\r")
        if line.startswith("LOCUS"):
            words = line.split()
            if len(words) < 2:
                raise SequenceFormatError(path, number, "LOCUS line without a name")
            fields, entries, section = {"LOCUS": words[1]}, [], "header"
        elif section == "outside":
            continue
        elif line.startswith("//"):
            flush()
            ident = (
                fields.get("VERSION", "").split(" ")[0]
                or fields.get("ACCESSION", "").split(" ")[0]
                or fields["LOCUS"]
            )
            out[ident] = entries
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
                in_location, qualifier = True, ""
            elif line[21:22] == "/":
                in_location = False
                name, _, value = line[22:].partition("=")
                qualifier = "" if name in qualifiers else name
                if qualifier:
                    qualifiers[qualifier] = value.strip()
            elif key and in_location:
                location += line[21:].strip()
            elif qualifier:
                qualifiers[qualifier] += " " + line[21:].strip()
    if section != "outside":
        raise SequenceFormatError(path, None, f"record {fields.get('LOCUS')!r} has no '//' line")
    return out


def _unquoted(value: str) -> str:
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value


def read_genbank_features(path: str | Path) -> dict[str, list[Feature]]:
    """Features of every record of a GenBank flat file, keyed by its VERSION (else ACCESSION,
    else LOCUS) as ``data_pipeline.readers.read_genbank`` names records."""
    return {
        ident: [
            Feature(entry.key, *part)
            for entry in entries
            for part in parse_location(entry.location, f"{path}, line {entry.line}")
        ]
        for ident, entries in read_genbank_entries(path).items()
    }


def gff3_rows(path: str | Path) -> Iterator[tuple[str, Feature, str, int]]:
    """(seqid, Feature, phase column, line number) of each feature line of a GFF3 (or GTF)
    file, up to its ``##FASTA`` section; 1-based inclusive coordinates become 0-based
    half-open. Errors name the file and line."""
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
        yield cols[0], Feature(cols[2], start - 1, end, cols[6]), cols[7], number


def read_gff3(path: str | Path) -> dict[str, list[Feature]]:
    """Features of a GFF3 (or GTF) file keyed by seqid; 1-based inclusive coordinates become
    0-based half-open. Errors name the file and line."""
    out: dict[str, list[Feature]] = {}
    for seqid, feature, _phase, _line in gff3_rows(path):
        out.setdefault(seqid, []).append(feature)
    return out


# ----------------------------------------------------------------------------- reading frames


@dataclass(frozen=True)
class CodingPart:
    """One segment of a CDS with its reading frame: 0-based half-open ``start``..``end`` on
    ``strand`` ('+' or '-'), and ``phase``, GFF3's: the bases to skip from the segment's 5' end
    (``start`` on '+', ``end - 1`` on '-') to reach the first base of a codon."""

    start: int
    end: int
    strand: str
    phase: int

    def codon_positions(self) -> np.ndarray:
        """[end - start] uint8: the codon position (1, 2 or 3) of each base, in genome order."""
        positions = ((np.arange(self.end - self.start) - self.phase) % 3 + 1).astype(np.uint8)
        return positions[::-1].copy() if self.strand == "-" else positions


def _top_level(text: str) -> list[str]:
    """``a,b(c,d),e`` -> ["a", "b(c,d)", "e"]: split at the commas outside parentheses."""
    pieces, depth, begin = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            pieces.append(text[begin:i])
            begin = i + 1
    return [*pieces, text[begin:]]


def _transcribed(text: str, where: str) -> list[tuple[int, int, str] | int]:
    """The parts of a GenBank location in transcription order, each with its own strand
    (``join(complement(5..9),1..3)`` reads 9..5 then 1..3; ``complement(join(1..3,5..9))``
    reads 9..5 then 3..1); a remote part (``J00194.1:1..9``) as its length in bases."""
    for op in ("complement(", "join(", "order("):
        if text.startswith(op) and text.endswith(")"):
            parts = [
                p for piece in _top_level(text[len(op) : -1]) for p in _transcribed(piece, where)
            ]
            if op != "complement(":
                return parts
            flip = {"+": "-", "-": "+"}
            return [p if isinstance(p, int) else (p[0], p[1], flip[p[2]]) for p in parts[::-1]]
    if "^" in text or not text:
        return []
    remote = ":" in text
    match = _SPAN.fullmatch(text.split(":")[-1])
    if match is None:
        raise ValueError(f"{where}: cannot read location part {text!r}")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    start, end = min(first, last) - 1, max(first, last)
    return [end - start] if remote else [(start, end, "+")]


def coding_parts(location: str, codon_start: int = 1, where: str = "location") -> list[CodingPart]:
    """The segments of a GenBank CDS ``location`` with their reading frames, in transcription
    order (``parse_location`` keeps the segments but not the frame across them). A segment's
    phase follows from the bases of the CDS before it (every earlier segment's, remote ones
    included, in transcription order: reversed under ``complement(join(...))``) and the CDS's
    ``/codon_start`` (1-3: the first codon starts at that base of the first segment)."""
    if codon_start not in (1, 2, 3):
        raise ValueError(f"{where}: /codon_start must be 1, 2 or 3, got {codon_start}")
    out, before = [], 0
    for part in _transcribed(location.replace(" ", ""), where):
        if isinstance(part, int):
            before += part
            continue
        start, end, strand = part
        out.append(CodingPart(start, end, strand, (codon_start - 1 - before) % 3))
        before += end - start
    return out


def gff3_coding_part(feature: Feature, phase: str, where: str = "GFF3 line") -> CodingPart:
    """The reading frame of a GFF3 CDS line from its phase column (0, 1 or 2: the bases to
    skip from its 5' end to the next codon); strand '.' reads as '+'."""
    if phase not in ("0", "1", "2"):
        raise ValueError(f"{where}: a CDS's phase must be 0, 1 or 2, got {phase!r}")
    strand = "-" if feature.strand == "-" else "+"
    return CodingPart(feature.start, feature.end, strand, int(phase))


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
