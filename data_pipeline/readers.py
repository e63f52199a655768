"""Streaming readers of genome files: FASTA and GenBank, plain or gzip/xz/bzip2 compressed.

Records are read one at a time; a record's sequence is built in one ``bytearray`` (each line is
normalised as it is appended), so a 100 MB chromosome is held once, never as Python ``str``.
Normalisation upper-cases soft-masked bases, maps IUPAC ambiguity codes to ``N`` and ``U`` to
``T``; anything else is an error naming the file, the line and the character. With
``soft_mask=True`` the case is kept instead (``acgtn``: bases a repeat masker marked, as RefSeq's
eukaryotic genomes mark WindowMasker's repeats; ambiguity codes become ``N`` or ``n``).
Compression is recognised by its magic bytes, not the file name. A path may be a URL
(``s3://``, ``gs://``, ``https://``: ``data_pipeline.storage``), streamed, never downloaded whole;
messages name it without credentials.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
import re
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from data_pipeline import storage

Format = Literal["fasta", "genbank"]

_INVALID = ord("!")  # sentinel written by the normalising table for invalid bytes
#: what a sequence may hold, for error messages
VALID_BASES = "A C G T N (any case), IUPAC codes R Y K M S W B D H V (read as N), U (as T)"


def _normalising_table() -> bytes:
    table = bytearray([_INVALID]) * 256
    for base in b"ACGTN":
        table[base] = base
        table[base + 32] = base  # lower case
    for code in b"RYKMSWBDHV":
        table[code] = ord("N")
        table[code + 32] = ord("N")
    table[ord("U")] = table[ord("u")] = ord("T")
    return bytes(table)


NORMALISE = _normalising_table()


def _case_keeping_table() -> bytes:
    table = bytearray(NORMALISE)
    for base in range(ord("a"), ord("z") + 1):
        if table[base] != _INVALID:
            table[base] += 32  # lower case stays lower case
    return bytes(table)


#: NORMALISE that keeps soft-masked (lower-case) bases lower case
NORMALISE_SOFT = _case_keeping_table()


def normalise_bases(text: str) -> tuple[bytes, int]:
    """(upper-case ACGTN bytes of ``text`` as the readers read it, position of its first
    character that is not a base or -1). One byte per character, so positions match."""
    clean = text.encode("ascii", errors="replace").translate(NORMALISE)
    return clean, clean.find(bytes([_INVALID]))


_WHITESPACE = b" \t\r\n\x0b\x0c"
_GENBANK_DELETE = _WHITESPACE + b"0123456789"


class SequenceFormatError(ValueError):
    """A malformed genome file; the message starts with ``path:line:``."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = _where(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


@dataclass
class SequenceRecord:
    """One sequence of a genome file.

    id: the first word of the FASTA header, or GenBank's VERSION (else ACCESSION, else LOCUS).
    accession: the database accession (``NC_001416.1``), parsed out of NCBI ``gi|..|ref|X|`` ids.
    seq: ``ACGTN`` bytes, one per base; read with ``soft_mask=True``, soft-masked (repeat)
        bases are lower case ``acgtn``.
    line: the line of the file where the record starts (1-based).
    """

    id: str
    accession: str
    description: str
    seq: bytearray
    source: str
    line: int
    organism: str = ""

    def __len__(self) -> int:
        return len(self.seq)


_MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2"}


def _where(path: str | Path) -> str:
    """``path`` as messages and records name it: a URL without its credentials."""
    return storage.redact(path) if storage.is_url(path) else str(path)


def _compression(head: bytes) -> str | None:
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def compression_of(path: str | Path) -> str | None:
    """``"gzip"``, ``"xz"``, ``"bzip2"`` or None, from the file's first bytes."""
    return _compression(storage.head(path, 6))


class _Decompressing(io.BufferedReader):
    """A decompressing reader of a remote stream that also closes the stream (``GzipFile``,
    ``LZMAFile`` and ``BZ2File`` given a file object leave it open)."""

    def __init__(self, reader: IO[bytes], stream: IO[bytes]) -> None:
        super().__init__(reader)  # type: ignore[arg-type]
        self._stream = stream

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stream.close()


def open_binary(path: str | Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing gzip, xz or bzip2 transparently.

    A URL is opened once and streamed (``storage.open_stream``): its first bytes, peeked
    from the stream, tell the compression."""
    if storage.is_url(path):
        stream = storage.open_stream(path)
        try:
            kind = _compression(stream.peek(6)[:6])  # type: ignore[attr-defined]
            if kind is None:
                return stream
            reader: Any
            if kind == "gzip":
                reader = gzip.GzipFile(fileobj=stream, mode="rb")
            else:
                reader = (lzma.LZMAFile if kind == "xz" else bz2.BZ2File)(stream, "rb")
            return _Decompressing(reader, stream)
        except BaseException:
            stream.close()
            raise
    kind = compression_of(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "bzip2":
        return bz2.open(path, "rb")
    return open(path, "rb")


_DECOMPRESS_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


def _lines(
    path: str | Path, fh: IO[bytes] | None = None
) -> Generator[tuple[int, bytes], None, None]:
    """(line number, line) pairs of ``path`` (read from ``fh`` when given, which is closed at
    the end); decompression failures become SequenceFormatError, a remote store's failures
    (``storage.StorageError``) stay what they are."""
    number = 0
    with fh if fh is not None else open_binary(path) as stream:
        try:
            for number, line in enumerate(stream, start=1):
                yield number, line
        except (storage.StorageError, storage.StorageNotFoundError):
            raise
        except _DECOMPRESS_ERRORS as err:
            raise SequenceFormatError(
                path, number + 1, f"corrupt or truncated compressed data ({err})"
            ) from None


_NCBI_ID = re.compile(r"(?:^|\|)(?:ref|gb|emb|dbj|tpg|tpe|tpd)\|([^|]+)")


def accession_of(identifier: str) -> str:
    """The accession in an NCBI identifier: ``gi|9629357|ref|NC_001802.1|`` -> ``NC_001802.1``."""
    match = _NCBI_ID.search(identifier)
    if match:
        return match.group(1)
    if identifier.startswith("ENA|"):
        parts = identifier.split("|")
        return parts[-1] or identifier
    return identifier


def _bad_character(
    path: str | Path, number: int, raw: bytes, record: str, delete: bytes = _WHITESPACE
) -> SequenceFormatError:
    """The error for the first invalid byte of sequence line ``raw``."""
    kept = raw.translate(None, delete)
    pos = kept.translate(NORMALISE).find(bytes([_INVALID]))
    char = kept[pos : pos + 1]
    return SequenceFormatError(
        path,
        number,
        f"invalid character {char.decode('latin-1')!r} (0x{char[0]:02x}) in the sequence of "
        f"record {record!r}; valid: {VALID_BASES}",
    )


def read_fasta(path: str | Path, soft_mask: bool = False) -> Iterator[SequenceRecord]:
    """Stream the records of a FASTA file (``>header`` lines, then sequence lines);
    ``soft_mask``: keep lower-case (repeat-masked) bases lower case."""
    return _fasta(path, _lines(path), soft_mask)


def _fasta(
    path: str | Path, lines: Iterable[tuple[int, bytes]], soft_mask: bool
) -> Iterator[SequenceRecord]:
    table = NORMALISE_SOFT if soft_mask else NORMALISE
    record: SequenceRecord | None = None
    invalid = bytes([_INVALID])
    for number, line in lines:
        if line.startswith(b">"):
            if record is not None:
                yield _finish(record, path)
            header = line[1:].decode("utf-8", errors="replace").strip()
            if not header:
                raise SequenceFormatError(path, number, "empty FASTA header ('>' with no id)")
            ident, _, description = header.partition(" ")
            record = SequenceRecord(
                id=ident,
                accession=accession_of(ident),
                description=description.strip(),
                seq=bytearray(),
                source=_where(path),
                line=number,
            )
            continue
        if record is None:
            if not line.strip() or line.startswith(b";"):
                continue  # blank lines and old-style comments before the first record
            snippet = line[:40].decode("latin-1").rstrip()
            raise SequenceFormatError(
                path, number, f"expected a '>' header line, found {snippet!r}: not a FASTA file?"
            )
        piece = line.translate(table, _WHITESPACE)
        if invalid in piece:
            raise _bad_character(path, number, line, record.id)
        record.seq += piece
    if record is not None:
        yield _finish(record, path)


def _finish(record: SequenceRecord, path: str | Path) -> SequenceRecord:
    if not record.seq:
        raise SequenceFormatError(path, record.line, f"record {record.id!r} has no sequence")
    return record


def read_genbank(path: str | Path) -> Iterator[SequenceRecord]:
    """Stream the records of a GenBank flat file (LOCUS ... ORIGIN ... //), upper case (GenBank
    prints every base in lower case, which marks no repeat)."""
    return _genbank(path, _lines(path))


def _genbank(path: str | Path, lines: Iterable[tuple[int, bytes]]) -> Iterator[SequenceRecord]:
    invalid = bytes([_INVALID])
    fields: dict[str, str] = {}
    seq = bytearray()
    start = 0
    declared = -1
    section = "outside"  # outside | header | origin
    last_key = ""
    for number, line in lines:
        if section == "outside":
            if not line.strip():
                continue
            if not line.startswith(b"LOCUS"):
                snippet = line[:40].decode("latin-1").rstrip()
                raise SequenceFormatError(
                    path, number, f"expected a LOCUS line, found {snippet!r}: not a GenBank file?"
                )
            text = line.decode("utf-8", errors="replace")
            words = text.split()
            if len(words) < 2:
                raise SequenceFormatError(path, number, "LOCUS line without a name")
            fields = {"LOCUS": words[1]}
            match = re.search(r"(\d+)\s+(?:bp|aa)\b", text)
            declared = int(match.group(1)) if match else -1
            seq = bytearray()
            start = number
            section = "header"
            last_key = "LOCUS"
        elif section == "header":
            if line.startswith(b"ORIGIN"):
                section = "origin"
            elif line.startswith(b"//"):
                raise SequenceFormatError(
                    path, number, f"record {fields['LOCUS']!r} ends before its ORIGIN sequence"
                )
            elif line[:1].isalpha():
                key = line[:12].decode("latin-1").strip()
                fields.setdefault(key, line[12:].decode("utf-8", errors="replace").strip())
                last_key = key
            else:
                sub = line[:12].decode("latin-1").strip()
                if sub == "ORGANISM" and "ORGANISM" not in fields:
                    value = line[12:].decode("utf-8", errors="replace").strip()
                    fields["ORGANISM"] = value
                elif not sub and last_key == "DEFINITION":
                    extra = line[12:].decode("utf-8", errors="replace").strip()
                    fields["DEFINITION"] += " " + extra
        else:  # origin
            if line.startswith(b"//"):
                locus = fields["LOCUS"]
                if not seq:
                    raise SequenceFormatError(path, start, f"record {locus!r} has no sequence")
                if declared >= 0 and declared != len(seq):
                    raise SequenceFormatError(
                        path,
                        number,
                        f"record {locus!r}: LOCUS line declares {declared} bp but ORIGIN holds "
                        f"{len(seq)} bases (truncated or corrupt record)",
                    )
                ident = (
                    fields.get("VERSION", "").split(" ")[0]
                    or fields.get("ACCESSION", "").split(" ")[0]
                    or locus
                )
                yield SequenceRecord(
                    id=ident,
                    accession=ident,
                    description=fields.get("DEFINITION", "").rstrip("."),
                    seq=seq,
                    source=_where(path),
                    line=start,
                    organism=fields.get("ORGANISM", ""),
                )
                section = "outside"
                continue
            piece = line.translate(NORMALISE, _GENBANK_DELETE)
            if invalid in piece:
                raise _bad_character(path, number, line, fields["LOCUS"], _GENBANK_DELETE)
            seq += piece
    if section != "outside":
        raise SequenceFormatError(
            path, None, f"record {fields.get('LOCUS')!r} (line {start}) has no closing '//' line"
        )


def _format_of(path: str | Path, number: int, line: bytes) -> Format:
    """The format that first non-blank ``line`` starts."""
    if line.startswith(b">"):
        return "fasta"
    if line.startswith(b"LOCUS"):
        return "genbank"
    snippet = line[:40].decode("latin-1").rstrip()
    raise SequenceFormatError(
        path,
        number,
        f"neither FASTA ('>' header) nor GenBank (LOCUS line): starts with {snippet!r}",
    )


def detect_format(path: str | Path) -> Format:
    """``"fasta"`` or ``"genbank"`` from the first non-blank line of the (decompressed) file."""
    with open_binary(path) as fh:
        try:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    return _format_of(path, number, line)
        except (storage.StorageError, storage.StorageNotFoundError):
            raise
        except _DECOMPRESS_ERRORS as err:
            raise SequenceFormatError(path, None, f"corrupt compressed data ({err})") from None
    raise SequenceFormatError(path, None, "file is empty")


def read_sequences(
    path: str | Path, fmt: Format | None = None, soft_mask: bool = False
) -> Iterator[SequenceRecord]:
    """Stream the records of a FASTA or GenBank file; the format is detected when not given.

    soft_mask: keep soft-masked bases lower case (FASTA). GenBank flat files print every base
    in lower case, which marks nothing, so their records always come upper case. A URL is
    opened once: the format is detected from the stream the records are then read from.
    """
    if storage.is_url(path):
        return _read_url(str(path), fmt, soft_mask)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such genome file")
    fmt = fmt or detect_format(path)
    if fmt == "fasta":
        return read_fasta(path, soft_mask)
    if fmt == "genbank":
        return read_genbank(path)
    raise ValueError(f"{path}: unknown format {fmt!r}; valid: fasta, genbank")


def _read_url(url: str, fmt: Format | None, soft_mask: bool) -> Iterator[SequenceRecord]:
    """``read_sequences`` of a URL: one stream, its first lines peeked for the format."""
    if fmt not in (None, "fasta", "genbank"):
        raise ValueError(f"{_where(url)}: unknown format {fmt!r}; valid: fasta, genbank")
    try:
        stream = open_binary(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{_where(url)}: no such genome file") from None
    lines = _lines(url, stream)
    peeked: list[tuple[int, bytes]] = []
    if fmt is None:
        try:
            for number, line in lines:
                peeked.append((number, line))
                if line.strip():
                    fmt = _format_of(url, number, line)
                    break
            else:
                raise SequenceFormatError(url, None, "file is empty")
        except BaseException:
            lines.close()
            raise
    everything = itertools.chain(peeked, lines)
    return _fasta(url, everything, soft_mask) if fmt == "fasta" else _genbank(url, everything)
