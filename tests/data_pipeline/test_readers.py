"""Reading FASTA and GenBank: compression, normalisation, streaming, malformed input."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import tracemalloc
from pathlib import Path

import pytest

from data_pipeline.readers import SequenceFormatError, detect_format, read_sequences
from tests.conftest import SAMPLE, sample_file


def _provenance() -> dict[str, dict[str, str]]:
    lines = (SAMPLE / "PROVENANCE.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:]]
    return {row["accession"]: row for row in rows}


def test_every_bundled_record_matches_its_provenance():
    provenance = _provenance()
    seen = set()
    for path in sorted(SAMPLE.glob("*/*")):
        if path.suffix == ".py":
            continue
        for rec in read_sequences(path):
            row = provenance[rec.accession]
            assert int(row["length"]) == len(rec)
            assert hashlib.sha256(bytes(rec.seq)).hexdigest() == row["sha256_normalised"]
            assert str(path.relative_to(SAMPLE)) == row["file"]
            seen.add(rec.accession)
    assert seen == set(provenance)
    assert len({row["kingdom"] for row in provenance.values()}) >= 6


def test_genbank_record_fields():
    (rec,) = list(read_sequences(sample_file("viral/NC_001422.gbk.gz")))
    assert rec.id == rec.accession == "NC_001422.1"
    assert len(rec) == 5386
    assert rec.organism.startswith("coliphage phiX174") or "phiX174" in rec.organism
    assert bytes(rec.seq[:10]) == b"GAGTTTTATC"
    assert detect_format(sample_file("viral/NC_001422.gbk.gz")) == "genbank"


def test_ncbi_pipe_ids_give_the_accession():
    (rec,) = list(read_sequences(sample_file("viral/NC_001802.fna.gz")))
    assert rec.id.startswith("gi|")
    assert rec.accession == "NC_001802.1"


@pytest.mark.parametrize(
    "opener,suffix",
    [(open, ".fa"), (gzip.open, ".fa.gz"), (lzma.open, ".fa.xz"), (bz2.open, ".fa.bz2")],
)
def test_compressions_give_identical_records(tmp_path, opener, suffix):
    original = list(read_sequences(sample_file("plasmid/shigella_sonnei_plasmids.fasta.xz")))
    text = "".join(f">{r.id} {r.description}\n{bytes(r.seq).decode()}\n" for r in original)
    path = tmp_path / f"copy{suffix}"
    with opener(path, "wt") as fh:
        fh.write(text)
    again = list(read_sequences(path))
    assert [(r.id, bytes(r.seq)) for r in again] == [(r.id, bytes(r.seq)) for r in original]


def test_compression_is_detected_by_content_not_name(tmp_path):
    path = tmp_path / "misnamed.txt"
    path.write_bytes(gzip.compress(b">x\nACGT\n"))
    assert bytes(next(read_sequences(path)).seq) == b"ACGT"


def test_soft_masking_and_iupac_are_normalised(tmp_path):
    path = tmp_path / "x.fa"
    path.write_text(">r1 soft masked\nacgtNNacGT\nRYKMSWBDHVrykmswbdhv\nuU\n\n>r2\nAC GT\r\n")
    r1, r2 = read_sequences(path)
    assert bytes(r1.seq) == b"ACGTNNACGT" + b"N" * 20 + b"TT"
    assert bytes(r2.seq) == b"ACGT"


def _error(tmp_path: Path, name: str, content: bytes) -> SequenceFormatError:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SequenceFormatError) as info:
        list(read_sequences(path))
    assert str(path) in str(info.value)
    return info.value


def test_invalid_character_names_file_line_and_character(tmp_path):
    err = _error(tmp_path, "bad.fa", b">ok\nACGT\n>chr2\nACGT\nAC-GT\n")
    assert err.line == 5
    assert "'-'" in str(err) and "chr2" in str(err) and "valid:" in str(err)


def test_sequence_before_any_header(tmp_path):
    err = _error(tmp_path, "noheader.fa", b">x\nAC\n"[3:] + b">x\nAC\n")
    assert err.line == 1 and "'>'" in str(err)


def test_empty_header_and_empty_record(tmp_path):
    assert "empty FASTA header" in str(_error(tmp_path, "e.fa", b">\nACGT\n"))
    err = _error(tmp_path, "e2.fa", b">a\n>b\nACGT\n")
    assert err.line == 1 and "no sequence" in str(err)


def test_binary_garbage_is_not_a_genome(tmp_path):
    err = _error(tmp_path, "garbage.bin", bytes(range(200, 256)) * 3)
    assert "neither FASTA" in str(err)


def test_truncated_gzip(tmp_path):
    data = gzip.compress(b">x\n" + b"ACGT" * 50_000 + b"\n")
    err = _error(tmp_path, "cut.fa.gz", data[: len(data) // 2])
    assert "corrupt or truncated" in str(err)


def test_genbank_without_closing_slashes(tmp_path):
    text = gzip.decompress(sample_file("viral/NC_001422.gbk.gz").read_bytes())
    err = _error(tmp_path, "open.gbk", text.replace(b"\n//", b"\n"))
    assert "closing '//'" in str(err)


def test_genbank_length_mismatch_is_caught(tmp_path):
    text = gzip.decompress(sample_file("viral/NC_001422.gbk.gz").read_bytes())
    lines = text.split(b"\n")
    cut = next(i for i, line in enumerate(lines) if line.startswith(b"ORIGIN")) + 3
    err = _error(tmp_path, "short.gbk", b"\n".join(lines[:cut] + lines[cut + 1 :]))
    assert "declares 5386 bp" in str(err)
    assert err.line is not None


def test_genbank_bad_base(tmp_path):
    text = gzip.decompress(sample_file("viral/NC_001422.gbk.gz").read_bytes())
    lines = text.split(b"\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(b"ORIGIN")) + 2
    lines[at] = lines[at][:12] + b"X" + lines[at][13:]
    err = _error(tmp_path, "badbase.gbk", b"\n".join(lines))
    assert err.line == at + 1 and "'X'" in str(err)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no such genome file"):
        list(read_sequences("/nonexistent/genome.fa"))


def test_a_long_record_is_held_once(tmp_path):
    """A 20 Mb record must peak at about one copy of its bases (bytes, not str)."""
    size = 20_000_000
    line = b"ACGTACGTNNacgtacgtac" * 4 + b"\n"
    path = tmp_path / "big.fa"
    with open(path, "wb") as fh:
        fh.write(b">big\n")
        for _ in range(size // 80):
            fh.write(line)
    tracemalloc.start()
    (rec,) = list(read_sequences(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rec) == size
    assert peak < 1.5 * size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} Mb record"
