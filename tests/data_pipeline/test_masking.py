"""Masking genomes that arrive unmasked (``--mask dust|windowmasker``, data_pipeline.masking):
the tools find what they should, records with their own soft mask keep it, a shard build writes
lower case exactly where the masker said and records where each mask came from, and a missing
tool or an unknown name is a one-line error."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from data_pipeline.loader import split_chunks
from data_pipeline.masking import MaskingError, RecordMasker, get_masker, soft_mask
from data_pipeline.readers import read_sequences
from data_pipeline.shards import MANIFEST, ShardOptions, SourceFile, build_shards, summary
from nucleo.cli.main import main
from tests.conftest import SOFT_MASKED

QUIET = {"log": lambda _: None}
POLY_A = (1000, 1060)
DINUCLEOTIDE = (2500, 2580)


def _planted(n: int = 4000, seed: int = 0) -> bytes:
    """Random bases with a poly-A run and a (CA)n repeat planted at POLY_A and DINUCLEOTIDE."""
    seq = bytearray(np.random.default_rng(seed).choice(list(b"ACGT"), n).astype(np.uint8))
    seq[POLY_A[0] : POLY_A[1]] = b"A" * (POLY_A[1] - POLY_A[0])
    seq[DINUCLEOTIDE[0] : DINUCLEOTIDE[1]] = b"CA" * ((DINUCLEOTIDE[1] - DINUCLEOTIDE[0]) // 2)
    return bytes(seq)


def _covered(intervals, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for start, end in intervals:
        mask[start:end] = True
    return mask


def _check_planted(intervals, seq: bytes) -> None:
    mask = _covered(intervals, len(seq))
    for start, end in (POLY_A, DINUCLEOTIDE):
        assert mask[start:end].all()
        mask[max(0, start - 64) : end + 64] = False  # DUST may take a few flanking bases
    assert mask.sum() < 0.01 * len(seq)  # random sequence: (almost) nothing


def test_dust_masks_low_complexity_runs_not_random_sequence():
    seq = _planted()
    dust = get_masker("dust")
    assert dust is not None and dust.tool == "pydustmasker"
    assert dust.describe()["settings"] == {"window_size": 64, "score_threshold": 20}
    intervals = dust.intervals(seq)
    _check_planted(intervals, seq)
    assert dust.intervals(seq) == intervals  # deterministic
    record = bytearray(seq[:1100] + b"NNNN")
    masked = soft_mask(record, [(990, 1104)])
    assert masked == 110 and record[1100:] == b"NNNN"  # N is never a repeat
    assert bytes(record[1000:1060]) == b"a" * 60 and record[:990] == seq[:990]


def test_records_with_their_own_mask_keep_it():
    """The dm3 segment (RefSeq-style lower case) is left exactly as it came; an unmasked
    record is masked, and the second time from the intervals found the first time."""
    (record, _) = read_sequences(SOFT_MASKED, soft_mask=True)
    before = bytes(record.seq)
    lines: list[str] = []
    records = RecordMasker(get_masker("dust"), lines.append)
    assert records.apply(0, record) == "input" and bytes(record.seq) == before
    plain = next(read_sequences(SOFT_MASKED))
    assert records.apply(1, plain) == "dust" and len(lines) == 1
    assert lines[0].startswith(f"masked {plain.id} with dust: ")
    again = next(read_sequences(SOFT_MASKED))
    assert records.apply(1, again) == "dust" and again.seq == plain.seq and len(lines) == 1
    assert RecordMasker(None).apply(2, next(read_sequences(SOFT_MASKED))) == ""


def test_a_build_with_dust_masks_where_the_masker_said(tmp_path):
    planted = _planted(6000, seed=1)
    fasta = tmp_path / "plain.fa"
    fasta.write_text(">plain unmasked\n" + planted.decode() + "\n")
    out = tmp_path / "shards"
    options = ShardOptions(chunk_len=1024, min_shards=1, val_fraction=0.0, mask="dust")
    sources = [SourceFile(SOFT_MASKED, "invertebrate"), SourceFile(fasta, "viral")]
    lines: list[str] = []
    manifest = build_shards(sources, out, options, log=lines.append)
    rows = {r["id"]: r for r in manifest["records"]}
    soft = list(read_sequences(SOFT_MASKED, soft_mask=True))
    assert [rows[r.id]["mask_source"] for r in soft] == ["input", "input"]
    assert rows["plain"]["mask_source"] == "dust"
    assert sum(line.startswith("masked ") for line in lines) == 1  # once, not per pass

    expected = bytearray(planted)
    lowered = soft_mask(expected, get_masker("dust").intervals(planted))
    assert lowered > 140
    assert rows["plain"]["repeat_fraction"] == pytest.approx(lowered / len(planted), abs=1e-4)
    chunks = split_chunks(out, "viral", "train", manifest, soft_mask=True)
    assert chunks and {key for key, _, _ in chunks} == {rows["plain"]["key"]}
    for _, offset, seq in chunks:
        assert seq == bytes(expected[offset : offset + len(seq)])
    for record in soft:  # the input's own mask, base for base
        key = rows[record.id]["key"]
        for k, offset, seq in split_chunks(out, "invertebrate", "train", manifest, True):
            if k == key:
                assert seq == bytes(record.seq[offset : offset + len(seq)])

    written = json.loads((out / MANIFEST).read_text())
    assert written["options"]["mask"] == "dust"
    entry = written["masking"]
    assert (entry["mask"], entry["tool"]) == ("dust", "pydustmasker")
    assert entry["version"] and entry["records"] == {"dust": 1, "input": 2}
    assert entry["repeat_bases"]["dust"] == lowered
    assert "masking: dust (pydustmasker" in summary(written)


def test_unknown_masks_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^mask 'repeatmasker' is not a masker; valid: none, "):
        ShardOptions(mask="repeatmasker")
    with pytest.raises(MaskingError, match=r"valid: none, dust, windowmasker$"):
        get_masker("tantan")
    with pytest.raises(ValueError, match="needs soft_mask=True"):
        ShardOptions(mask="dust", soft_mask=False)
    assert get_masker("none") is None


def test_missing_tools_are_one_line_errors_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydustmasker", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for name, hint in [
        ("dust", "pip install pydustmasker (or apt-get install ncbi-blast+)"),
        ("windowmasker", "apt-get install ncbi-blast+"),
    ]:
        with pytest.raises(MaskingError) as err:
            get_masker(name)
        assert "\n" not in str(err.value) and str(err.value).endswith(hint)
    out = tmp_path / "shards"
    options = ShardOptions(chunk_len=1024, min_shards=1, mask="dust")
    with pytest.raises(MaskingError, match="pip install pydustmasker"):
        build_shards([SourceFile(SOFT_MASKED, "invertebrate")], out, options, **QUIET)
    assert not list(tmp_path.glob("shards*"))  # neither a set nor a work folder


@pytest.mark.skipif(
    shutil.which("dustmasker") is None,
    reason="NCBI dustmasker not on PATH (apt-get install ncbi-blast+)",
)
def test_dustmasker_binary_is_the_fallback_and_agrees(monkeypatch):
    seq = _planted()
    ours = get_masker("dust").intervals(seq)
    monkeypatch.setitem(sys.modules, "pydustmasker", None)
    ncbi = get_masker("dust")
    assert ncbi.tool == "dustmasker" and ncbi.version.startswith("blast ")
    found = ncbi.intervals(seq)
    _check_planted(found, seq)
    assert (_covered(found, len(seq)) != _covered(ours, len(seq))).sum() <= 8


@pytest.mark.skipif(
    shutil.which("windowmasker") is None,
    reason="NCBI windowmasker not on PATH (apt-get install ncbi-blast+)",
)
def test_windowmasker_masks_an_interspersed_repeat():
    """Fifty copies of a 300-base element scattered through 200 kb of random sequence: the
    copies are masked, the rest (almost) not. (WindowMasker's thresholds are percentiles of
    the record's k-mer counts: in a much shorter record, or with fewer copies, it masks less.)"""
    rng = np.random.default_rng(2)
    seq = bytearray(rng.choice(list(b"ACGT"), 200_000).astype(np.uint8))
    element = bytes(rng.choice(list(b"ACGT"), 300).astype(np.uint8))
    starts = [500 + 3921 * i for i in range(50)]
    for start in starts:
        seq[start : start + 300] = element
    wm = get_masker("windowmasker")
    assert wm.tool == "windowmasker" and wm.version.startswith("blast ")
    mask = _covered(wm.intervals(bytes(seq)), len(seq))
    copies = np.zeros(len(seq), dtype=bool)
    for start in starts:
        copies[start : start + 300] = True
    assert mask[copies].mean() > 0.9 and mask[~copies].mean() < 0.01


def test_cli_mask_option(tmp_path, capsys):
    fasta = tmp_path / "plain.fa"
    fasta.write_text(">plain\n" + _planted().decode() + "\n")
    out = tmp_path / "o"
    args = ["data", "build", "--input", f"viral={fasta}", "--out", str(out), "--val-fraction",
            "0", "--min-shards", "1", "--chunk-len", "1024"]  # fmt: skip
    assert main([*args, "--mask", "dust"]) == 0
    assert "masked plain with dust" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["records"][0]["mask_source"] == "dust"
    with pytest.raises(SystemExit):
        main([*args, "--mask", "repeatmasker"])
    assert "invalid choice: 'repeatmasker'" in capsys.readouterr().err
