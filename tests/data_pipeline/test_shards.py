"""Sharding: manifest, de-duplication, record-level splits, checksums, reproducibility."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds

from data_pipeline.readers import read_sequences
from data_pipeline.shards import (
    ShardOptions,
    SourceFile,
    build_shards,
    load_manifest,
    read_sources_tsv,
    verify_shards,
    write_sources_tsv,
)
from tests.conftest import SAMPLE, sample_file


def _chunks(shard_dir: Path, kingdom: str, split: str) -> list[dict]:
    manifest = load_manifest(shard_dir)
    out = []
    for shard in manifest["kingdoms"][kingdom].get(split, {}).get("shards", []):
        for sample in wds.DataPipeline(
            wds.SimpleShardList([str(shard_dir / shard["path"])]), wds.tarfile_to_samples()
        ):
            meta = json.loads(sample["json"])
            meta["seq"] = sample["seq"]
            out.append(meta)
    return out


def test_manifest_counts_records_bases_and_shards(sample_shards):
    manifest = load_manifest(sample_shards)
    assert manifest["format"] == "nucleo-shards/2"
    kept = [r for r in manifest["records"] if r["duplicate_of"] is None]
    assert len(manifest["records"]) == 44 and len(kept) == 43
    assert len(manifest["kingdoms"]) == 10
    for kingdom, splits in manifest["kingdoms"].items():
        for split, entry in splits.items():
            members = [r for r in kept if r["kingdom"] == kingdom and r["split"] == split]
            assert entry["records"] == len(members)
            assert entry["bases"] == sum(r["length"] for r in members)
            assert entry["chunks"] == sum(s["chunks"] for s in entry["shards"])
            for shard in entry["shards"]:
                assert (sample_shards / shard["path"]).stat().st_size == shard["bytes"]
                assert len(shard["sha256"]) == 64


def test_exact_duplicates_are_dropped(sample_shards):
    manifest = load_manifest(sample_shards)
    dropped = [r for r in manifest["records"] if r["duplicate_of"]]
    assert [(r["id"], r["duplicate_of"]) for r in dropped] == [("NC_012920_1", "NC_012920.1")]
    assert manifest["duplicates"] == 1


def test_reverse_complemented_copy_is_a_duplicate(tmp_path):
    rec = next(read_sequences(sample_file("viral/NC_045512.2.fasta")))
    rc = bytes(rec.seq).translate(bytes.maketrans(b"ACGTN", b"TGCAN"))[::-1]
    copy = tmp_path / "rc.fa"
    copy.write_bytes(b">rc_copy\n" + rc + b"\n")
    sources = [
        SourceFile(sample_file("viral/NC_045512.2.fasta"), "viral"),
        SourceFile(copy, "viral"),
    ]
    manifest = build_shards(sources, tmp_path / "out", log=lambda _: None)
    assert manifest["duplicates"] == 1


def test_splits_are_disjoint_by_record_and_every_kingdom_validates(sample_shards):
    manifest = load_manifest(sample_shards)
    for kingdom, splits in manifest["kingdoms"].items():
        train = {c["record"] for c in _chunks(sample_shards, kingdom, "train")}
        val = {c["record"] for c in _chunks(sample_shards, kingdom, "val")}
        assert train and not (train & val), kingdom
        records = [
            r for r in manifest["records"] if r["kingdom"] == kingdom and r["duplicate_of"] is None
        ]
        if len(records) >= 2:
            assert val, f"{kingdom} has {len(records)} records but none held out"
        else:
            assert "val" not in splits


def test_chunks_reassemble_every_record(sample_shards):
    manifest = load_manifest(sample_shards)
    originals = {}
    for src in read_sources_tsv(SAMPLE / "sources.tsv"):
        for rec in read_sequences(src.path):
            originals[rec.accession] = bytes(rec.seq)
    for kingdom, splits in manifest["kingdoms"].items():
        for split in splits:
            pieces: dict[str, bytearray] = {}
            for chunk in sorted(
                _chunks(sample_shards, kingdom, split), key=lambda c: (c["record"], c["offset"])
            ):
                seq = originals[chunk["record"]]
                assert chunk["seq"] == seq[chunk["offset"] : chunk["offset"] + chunk["length"]]
                assert chunk["length"] == min(65536, len(seq))
                buf = pieces.setdefault(chunk["record"], bytearray())
                buf[chunk["offset"] : chunk["offset"] + chunk["length"]] = chunk["seq"]
            for key, buf in pieces.items():
                assert bytes(buf) == originals[key]


def test_build_is_reproducible(tmp_path, sample_sources):
    a = build_shards(sample_sources[:6], tmp_path / "a", log=lambda _: None)
    b = build_shards(sample_sources[:6], tmp_path / "b", log=lambda _: None)

    def digests(m):
        return [
            s["sha256"] for k in m["kingdoms"].values() for v in k.values() for s in v["shards"]
        ]

    assert digests(a) == digests(b)


def test_verify_finds_a_corrupted_shard(tmp_path, sample_sources):
    out = tmp_path / "v"
    build_shards(sample_sources[:3], out, log=lambda _: None)
    assert verify_shards(out) == []
    victim = next(out.glob("*/train-*.tar"))
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    (problem,) = verify_shards(out)
    assert str(victim) in problem and "checksum" in problem


def test_existing_output_is_not_overwritten(tmp_path, sample_sources):
    out = tmp_path / "x"
    build_shards(sample_sources[:1], out, log=lambda _: None)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shards(sample_sources[:1], out, log=lambda _: None)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_never_deletes_what_nucleo_did_not_make(tmp_path):
    """--overwrite on an ordinary folder holding the input genome (and other files) is
    refused, and the folder is left as it was."""
    folder = tmp_path / "my_genomes"
    folder.mkdir()
    genome = folder / "lambda.fasta.gz"
    genome.write_bytes(sample_file("viral/lambda.fasta.gz").read_bytes())
    (folder / "notes.txt").write_text("curated by hand\n")
    before = _tree(folder)
    sources = [SourceFile(genome, "viral")]
    with pytest.raises(ValueError, match=r"lambda\.fasta\.gz lies inside this output folder"):
        build_shards(sources, folder, overwrite=True, log=lambda _: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match="not a nucleo shard set"):
        build_shards(sources, other, overwrite=True, log=lambda _: None)
    assert _tree(folder) == before and (other / "keep.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_genomes", "other"]


def test_overwrite_replaces_a_shard_set_and_an_interrupted_build_leaves_it_whole(
    tmp_path, monkeypatch
):
    out = tmp_path / "shards"
    lam = [SourceFile(sample_file("viral/lambda.fasta.gz"), "viral")]
    phix = [SourceFile(sample_file("viral/NC_001422.gbk.gz"), "viral")]
    build_shards(lam, out, log=lambda _: None)
    first = _tree(out)
    import data_pipeline.build as build

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    lines: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(build, "concat_block", disk_full)
        with pytest.raises(OSError, match="No space left"):
            build_shards(phix, out, overwrite=True, log=lines.append)
    assert _tree(out) == first  # the old set is whole
    # the finished stages wait in the work folder, for the same command to resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "shards.work"]
    assert any("shards.work: the same command resumes it" in x for x in lines), lines
    manifest = build_shards(phix, out, overwrite=True, log=lines.append)
    assert any(x.startswith("resuming the build") for x in lines)
    assert len(manifest["records"]) == 1 and _tree(out) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_a_failed_build_leaves_no_manifest(tmp_path):
    bad = tmp_path / "bad.fa"
    bad.write_text(">x\nACGT\n>y\nAC*GT\n")
    sources = [SourceFile(sample_file("viral/lambda.fasta.gz"), "viral"), SourceFile(bad, "viral")]
    with pytest.raises(ValueError, match=r"bad\.fa:4"):
        build_shards(sources, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="kingdom 'Bad Name'"):
        build_shards([SourceFile(sample_file("viral/lambda.fasta.gz"), "Bad Name")], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=r"missing\.fa"):
        build_shards([SourceFile(tmp_path / "missing.fa", "viral")], tmp_path / "o")
    tsv = tmp_path / "s.tsv"
    tsv.write_text("file\tkingdom\nx.fa\tviral\n")
    with pytest.raises(ValueError, match=r"s\.tsv:1"):
        read_sources_tsv(tsv)
    tsv.write_text("path\tkingdom\nonly-a-path\n")
    with pytest.raises(ValueError, match=r"s\.tsv:2"):
        read_sources_tsv(tsv)


def test_options_are_checked():
    with pytest.raises(ValueError, match="chunk_len"):
        ShardOptions(chunk_len=10)
    with pytest.raises(ValueError, match="val_fraction"):
        ShardOptions(val_fraction=1.5)


def test_grouped_records_share_a_split_and_a_file_listed_twice_is_refused(tmp_path):
    sources = read_sources_tsv(SAMPLE / "sources.tsv")
    mers = [s for s in sources if s.group == "MERS-CoV"]
    assert len(mers) == 2
    manifest = build_shards(sources, tmp_path / "g", log=lambda _: None)
    splits = {r["split"] for r in manifest["records"] if r["group"] == "MERS-CoV"}
    assert len(splits) == 1  # near-identical genomes never straddle train and validation
    with pytest.raises(ValueError, match="listed twice"):
        build_shards([*sources[:2], sources[0]], tmp_path / "twice", log=lambda _: None)


def test_a_forced_validation_record_is_the_smallest(tmp_path):
    # Two real records of one kingdom: whichever way the hash falls, validation gets one, and
    # when it must be forced it is the smaller, so training keeps the most bases.
    sources = [
        SourceFile(sample_file("viral/lambda.fasta.gz"), "viral"),
        SourceFile(sample_file("viral/NC_001422.gbk.gz"), "viral"),
    ]
    for salt in ("a", "b", "c", "d", "e", "f"):
        manifest = build_shards(
            sources, tmp_path / salt, ShardOptions(split_salt=salt), log=lambda _: None
        )
        split = {r["id"]: r["split"] for r in manifest["records"]}
        assert sorted(split.values()) == ["train", "val"]


def test_a_glob_matched_file_that_its_filter_empties_is_skipped_not_fatal(tmp_path):
    """Corpus globs match several files and a regex picks records among them: a file whose
    records all fail the filter (a package update may add one) is skipped with a line; a file
    named on its own still stops the build."""
    lam = sample_file("viral/lambda.fasta.gz")
    phage = sample_file("viral/lactococcus_phages.fasta.bz2")
    tsv = tmp_path / "sources.tsv"
    tsv.write_text(
        "path\tkingdom\tinclude\tmatched\n"
        f"{lam}\tviral\tLactococcus\tyes\n{phage}\tviral\tLactococcus\tyes\n"
    )
    sources = read_sources_tsv(tsv)
    assert [s.matched for s in sources] == [True, True]
    written = read_sources_tsv(write_sources_tsv(sources, tmp_path / "again.tsv"))
    assert [s.matched for s in written] == [True, True]
    lines: list[str] = []
    manifest = build_shards(sources, tmp_path / "out", ShardOptions(), log=lines.append)
    assert {r["kingdom"] for r in manifest["records"]} == {"viral"} and manifest["records"]
    assert any(line.startswith(f"skipped: {lam}") for line in lines)
    alone = [replace(sources[0], matched=False)]
    with pytest.raises(ValueError, match="kept none of its records"):
        build_shards(alone, tmp_path / "out2", ShardOptions(), log=lines.append)
