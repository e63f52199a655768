"""VCF files: variants in, an annotated copy out.

    for variant in read_variants("calls.vcf.gz"): ...   # one Variant per ALT allele
    header = read_header("calls.vcf.gz")                # the '#' lines, to write the file back

Plain, gzip or bgzip (BGZF: a series of gzip members, which Python's gzip reads) input,
recognised by content as the genome readers recognise theirs. Only CHROM, POS, ID, REF and ALT
are parsed; every other column is kept as written, so an annotated copy changes INFO alone.
POS is 1-based, as in the file. REF and ALT bases are read as the genome readers read bases
(upper case, IUPAC codes as N). A malformed line is an error naming the file and the line.
Annotated copies ending in ``.gz`` are written as BGZF, so ``tabix`` can index them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from data_pipeline.readers import VALID_BASES, SequenceFormatError, _lines, normalise_bases


class VcfFormatError(SequenceFormatError):
    """A malformed VCF line; the message starts with ``path:line:``."""


@dataclass(frozen=True)
class Variant:
    """One ALT allele of a VCF data line.

    pos: 1-based position of REF's first base. ref, alt: upper-case bases (alt as written when
    symbolic: ``<DEL>``, ``*``, ``.``, breakends). allele: 1-based index of alt among the line's
    ALTs. line: the line of the file; where: ``path:line`` for messages.
    """

    chrom: str
    pos: int
    id: str
    ref: str
    alt: str
    allele: int
    line: int
    where: str

    @property
    def symbolic(self) -> bool:
        """True for an ALT that is not bases: ``<...>``, ``*`` (spanning deletion), ``.``
        (missing) and breakends (``G]chr2:100]``, ``.A``)."""
        alt = self.alt
        return (
            alt in (".", "*")
            or alt.startswith("<")
            or "[" in alt
            or "]" in alt
            or alt.startswith(".")
            or alt.endswith(".")
        )


def _text(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its newline) of a plain or compressed file."""
    for number, raw in _lines(path):
        yield number, raw.decode("utf-8", errors="replace").rstrip("\r\n")


def read_header(path: str | Path) -> list[str]:
    """The header lines of a VCF (``##`` meta lines and the ``#CHROM`` line), in order."""
    header = []
    for _number, text in _text(path):
        if not text.startswith("#"):
            break
        header.append(text)
    return header


def _bases(text: str, path: str | Path, number: int, column: str) -> str:
    clean, bad = normalise_bases(text)
    if not text or bad >= 0:
        raise VcfFormatError(
            path, number, f"{column} {text!r} is not bases (expected {VALID_BASES})"
        )
    return clean.decode()


def read_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated columns) of every data line, checked: 5+ columns, POS a
    whole number >= 1. Header and empty lines are passed over."""
    for number, text in _text(path):
        if not text or text.startswith("#"):
            continue
        fields = text.split("\t")
        if len(fields) < 5:
            raise VcfFormatError(
                path, number, f"{len(fields)} tab-separated column(s); a VCF data line has "
                "CHROM POS ID REF ALT QUAL FILTER INFO (is this a VCF?)",
            )  # fmt: skip
        if not fields[1].isdigit() or int(fields[1]) < 1:
            raise VcfFormatError(path, number, f"POS {fields[1]!r} is not a whole number >= 1")
        yield number, fields


def read_variants(path: str | Path) -> Iterator[Variant]:
    """One Variant per ALT allele of every data line of ``path``, in file order."""
    where = str(path)
    for number, fields in read_lines(path):
        chrom, pos, ident = fields[0], int(fields[1]), fields[2]
        ref = _bases(fields[3], path, number, "REF")
        for allele, alt in enumerate(fields[4].split(","), 1):
            variant = Variant(chrom, pos, ident, ref, alt, allele, number, f"{where}:{number}")
            if not variant.symbolic:
                variant = Variant(
                    chrom, pos, ident, ref, _bases(alt, path, number, "ALT"), allele, number,
                    variant.where,
                )  # fmt: skip
            yield variant


# ----------------------------------------------------------------------------- writing


def annotate_header(header: list[str], info_lines: list[str], key: str) -> list[str]:
    """``header`` with any ``##INFO=<ID=key`` line replaced by ``info_lines``, placed before
    the ``#CHROM`` line (a ``##fileformat`` line is added when the header has none)."""
    kept = [h for h in header if not h.startswith(f"##INFO=<ID={key},")]
    if not kept or not kept[0].startswith("##fileformat"):
        kept.insert(0, "##fileformat=VCFv4.2")
    at = next((i for i, h in enumerate(kept) if not h.startswith("##")), len(kept))
    return kept[:at] + info_lines + kept[at:]


def with_info(fields: list[str], key: str, values: list[str]) -> str:
    """The data line ``fields`` with ``key=v1,v2,...`` in its INFO column (an earlier ``key``
    entry replaced; QUAL, FILTER and INFO added as ``.`` when the line lacks them)."""
    out = fields + ["."] * (8 - len(fields))
    kept = [e for e in out[7].split(";") if e not in (".", "") and e.split("=")[0] != key]
    out[7] = ";".join([*kept, f"{key}={','.join(values)}"])
    return "\t".join(out)


_BGZF_BLOCK = 0xFF00  # input bytes per block, as bgzip: a compressed block stays under 64 KiB


class BgzfWriter:
    """Text written as BGZF (bgzip's blocked gzip): gzip reads it, tabix can index it."""

    def __init__(self, path: str | Path) -> None:
        self._fh: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._buffer = bytearray()

    def write(self, text: str) -> int:
        self._buffer += text.encode()
        while len(self._buffer) >= _BGZF_BLOCK:
            self._block(bytes(self._buffer[:_BGZF_BLOCK]))
            del self._buffer[:_BGZF_BLOCK]
        return len(text)

    def _block(self, data: bytes) -> None:
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(data) + deflate.flush()
        # gzip header with the BC extra field holding the block's size - 1
        head = struct.pack("<4BI2BH2BHH", 31, 139, 8, 4, 0, 0, 255, 6, 66, 67, 2, len(body) + 25)
        self._fh.write(head + body + struct.pack("<II", zlib.crc32(data), len(data)))

    def close(self) -> None:
        if self._buffer:
            self._block(bytes(self._buffer))
            self._buffer.clear()
        self._block(b"")  # the end-of-file marker block
        self._fh.close()

    def __enter__(self) -> BgzfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
