"""Inputs, shard sets and training data behind URLs: an S3-compatible server (moto) and a plain
HTTP server on 127.0.0.1 stand in for S3, GCS and https (one fsspec code path)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from data_pipeline import storage
from data_pipeline.loader import (
    VERIFIED_SHARDS,
    BadShardError,
    DataConfig,
    TrainLoader,
    split_chunks,
    tar_samples,
)
from data_pipeline.readers import (
    SequenceFormatError,
    compression_of,
    detect_format,
    open_binary,
    read_sequences,
)
from data_pipeline.shards import (
    ShardOptions,
    SourceFile,
    check_sources,
    is_shard_set,
    load_manifest,
    read_sources_tsv,
    sha256_file,
    shard_checksums,
    shard_paths,
    verify_shards,
)
from data_pipeline.sources import kingdom_folders
from data_pipeline.tokenizers import CharTokenizer
from tests.conftest import SAMPLE
from tests.data_pipeline.conftest import BUCKET, forget_s3_clients

#: small sample files in every compression and both formats
FILES = {
    "viral/lambda.fasta.gz": "viral",  # gzip FASTA
    "viral/lactococcus_phages.fasta.bz2": "viral",  # bzip2, several records
    "viral/NC_045512.2.fasta": "viral",  # plain
    "mammals/rn6_chr10_segment.fa.xz": "mammals",  # xz, soft-masked
    "plasmid/NC_007717.gbk.gz": "plasmid",  # GenBank
    "plasmid/NC_009934.gbk": "plasmid",
}
SECRET = "hunter2-secret"


def _s3():
    import s3fs

    return s3fs.S3FileSystem()


def _upload(files: dict[str, str], prefix: str) -> None:
    """Copy sample files (relative to SAMPLE) to ``s3://BUCKET/<prefix>/<same path>``."""
    fs = _s3()
    for rel in files:
        fs.put_file(str(SAMPLE / rel), f"{BUCKET}/{prefix}/{rel}")


def _records(path: str | Path, soft_mask: bool = False) -> list[tuple[str, str, bytes]]:
    return [(r.id, r.description, bytes(r.seq)) for r in read_sequences(path, None, soft_mask)]


def _one_line(err: pytest.ExceptionInfo, *names: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for name in names:
        assert name in text, text
    return text


# --------------------------------------------------------------------------- reading inputs


def test_genome_files_read_from_s3_as_from_disk(s3_server):
    _upload(FILES, "genomes")
    for rel in FILES:
        url = f"s3://{BUCKET}/genomes/{rel}"
        local = SAMPLE / rel
        assert compression_of(url) == compression_of(local)
        assert detect_format(url) == detect_format(local)
        with open_binary(url) as remote, open_binary(local) as disk:
            assert remote.read() == disk.read()
        assert _records(url, soft_mask=True) == _records(local, soft_mask=True)
        assert all(r.source == url for r in read_sequences(url))
    with pytest.raises(FileNotFoundError) as err:
        read_sequences(f"s3://{BUCKET}/genomes/viral/missing.fa")
    _one_line(err, f"s3://{BUCKET}/genomes/viral/missing.fa: no such genome file")


def test_sources_tsv_folders_and_checks_at_urls(s3_server, tmp_path):
    _upload(FILES, "genomes")
    rows = "".join(f"{rel}\t{kingdom}\n" for rel, kingdom in FILES.items())
    fs = _s3()
    fs.pipe_file(f"{BUCKET}/genomes/sources.tsv", b"path\tkingdom\n" + rows.encode())
    # a TSV at a URL: relative rows resolve against its folder
    remote = read_sources_tsv(f"s3://{BUCKET}/genomes/sources.tsv")
    urls = [f"s3://{BUCKET}/genomes/{rel}" for rel in FILES]
    assert [s.path for s in remote] == urls
    assert check_sources(remote) == remote
    # a local TSV whose rows are URLs, next to a local row (which stays a Path)
    table = tmp_path / "sources.tsv"
    lam = SAMPLE / "viral/lambda.fasta.gz"
    table.write_text(f"path\tkingdom\n{urls[0]}\tviral\n{lam}\tviral\n")
    mixed = read_sources_tsv(table)
    assert mixed[0].path == urls[0] and mixed[1].path == lam
    assert check_sources(mixed) == mixed
    # the same URL twice, a missing object: one line naming the URL
    with pytest.raises(ValueError, match=re.escape(f"{urls[0]}: listed twice")):
        check_sources([*remote, SourceFile(urls[0], "viral")])
    with pytest.raises(FileNotFoundError) as err:
        check_sources([SourceFile(f"s3://{BUCKET}/genomes/viral/nope.fa", "viral")])
    _one_line(err, f"s3://{BUCKET}/genomes/viral/nope.fa: no such genome file")

    # --folder: <root>/<kingdom>/...; files in root (the TSV) and hidden ones are ignored
    fs.pipe_file(f"{BUCKET}/genomes/viral/.hidden.fa", b">x\nACGT\n")
    listed = kingdom_folders(f"s3://{BUCKET}/genomes")
    expected = sorted(zip(urls, FILES.values(), strict=True))
    assert sorted((s.path, s.kingdom) for s in listed) == expected
    # --refseq: one form per volume (FASTA first), unfinished downloads ignored
    for name in ("viral.1.1.genomic.fna.gz", "viral.1.1.genomic.gbff.gz",
                 "viral.2.1.genomic.gbff.gz", "viral.3.1.genomic.fna.gz.part"):  # fmt: skip
        fs.pipe_file(f"{BUCKET}/refseq/viral/{name}", b"")
    refseq = kingdom_folders(f"s3://{BUCKET}/refseq", refseq=True)
    assert [s.path for s in refseq] == [
        f"s3://{BUCKET}/refseq/viral/viral.1.1.genomic.fna.gz",
        f"s3://{BUCKET}/refseq/viral/viral.2.1.genomic.gbff.gz",
    ]
    fs.pipe_file(f"{BUCKET}/refseq/Viruses/x.genomic.fna.gz", b"")
    with pytest.raises(ValueError, match=re.escape(f"s3://{BUCKET}/refseq/Viruses: 'Viruses'")):
        kingdom_folders(f"s3://{BUCKET}/refseq", refseq=True)
    with pytest.raises(ValueError, match=re.escape(f"s3://{BUCKET}/nothing: no such folder")):
        kingdom_folders(f"s3://{BUCKET}/nothing")


def test_inputs_over_http_build_the_same_shards(http_server, tmp_path):
    from data_pipeline.shards import build_shards

    served = tmp_path / "http"
    picked = list(FILES)[:4]
    for rel in picked:
        (served / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE / rel, served / rel)
    rows = "".join(f"{rel}\t{FILES[rel]}\n" for rel in picked)
    (served / "sources.tsv").write_text("path\tkingdom\n" + rows)
    sources = read_sources_tsv(f"{http_server}/sources.tsv")
    assert [s.path for s in sources] == [f"{http_server}/{rel}" for rel in picked]
    for src in sources:
        assert _records(src.path, soft_mask=True) == _records(SAMPLE / src.path.split("/", 3)[3],
                                                              soft_mask=True)  # fmt: skip
    options = ShardOptions(min_shards=2, chunk_len=4096)
    quiet = {"log": lambda _: None}
    build_shards(sources, tmp_path / "remote", options, work_dir=tmp_path / "w1", **quiet)
    local = [SourceFile(SAMPLE / rel, FILES[rel]) for rel in picked]
    build_shards(local, tmp_path / "local", options, work_dir=tmp_path / "w2", **quiet)
    remote_manifest = load_manifest(tmp_path / "remote")
    for entry in shard_checksums(tmp_path / "local", load_manifest(tmp_path / "local")).items():
        rel = Path(entry[0]).relative_to(tmp_path / "local")
        assert sha256_file(tmp_path / "remote" / rel) == entry[1]
    assert {r["source"] for r in remote_manifest["records"]} <= {s.path for s in sources}
    with pytest.raises(FileNotFoundError) as err:
        check_sources([SourceFile(f"{http_server}/viral/missing.fa", "viral")])
    _one_line(err, f"{http_server}/viral/missing.fa: no such genome file")


# --------------------------------------------------------------------------- shard sets


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shard set (three kingdoms, 4 kb chunks, at least 2 shards per split)."""
    from data_pipeline.shards import build_shards

    sources = [s for s in read_sources_tsv(SAMPLE / "sources.tsv")
               if Path(s.path).name in ("lambda.fasta.gz", "NC_001802.fna.gz", "ScerR64_I.fna.gz",
                                        "SkudIFO1802_1.fna.gz", "NC_007717.gbk.gz",
                                        "deinococcus_MP1.fna.gz")]  # fmt: skip
    out = tmp_path_factory.mktemp("small") / "shards"
    build_shards(sources, out, ShardOptions(min_shards=2, chunk_len=4096), log=lambda _: None,
                 work_dir=out.parent / "work")  # fmt: skip
    return out


def _put_set(local: Path, prefix: str = "sets/small") -> str:
    _s3().put(str(local), f"{BUCKET}/{prefix}", recursive=True)
    return f"s3://{BUCKET}/{prefix}"


def test_a_shard_set_at_a_url_reads_as_on_disk(s3_server, small_shards):
    url = _put_set(small_shards)
    manifest = load_manifest(url)
    assert manifest == load_manifest(small_shards)
    assert is_shard_set(url) and not is_shard_set(f"s3://{BUCKET}/sets")
    assert verify_shards(url) == []
    for split in ("train", "val"):
        remote = shard_paths(url, manifest, split, None)
        local = shard_paths(small_shards, manifest, split, None)
        assert [(p.replace(url, str(small_shards)), n) for p, n in remote] == local
    checksums = shard_checksums(url, manifest)
    first = next(iter(checksums))
    assert sha256_file(first) == checksums[first]
    assert [s["__key__"] for s in tar_samples(first, sha256=checksums[first])] == [
        s["__key__"] for s in tar_samples(first.replace(url, str(small_shards)))
    ]
    kingdom = sorted(manifest["kingdoms"])[0]
    assert split_chunks(url, kingdom, "train", manifest, soft_mask=True) == split_chunks(
        small_shards, kingdom, "train", manifest, soft_mask=True
    )
    # the run's MLflow dataset input: the same digest as the local copy, the URL as its source
    from nucleo.train.store import dataset_input

    remote, local = dataset_input(url).dataset, dataset_input(small_shards).dataset
    assert (remote.name, remote.digest) == ("small", local.digest)
    assert json.loads(remote.source) == {"uri": url}

    # damage on the store: a truncated shard and one with altered bytes are named
    fs = _s3()
    inner = first.removeprefix("s3://")
    data = fs.cat_file(inner)
    fs.pipe_file(inner, data[: len(data) // 3])
    problems = verify_shards(url)
    assert problems == [f"{first}: checksum differs from the manifest (corrupt?)"]
    VERIFIED_SHARDS.discard(first)  # checked above, before the damage
    with pytest.raises(BadShardError, match=f"shard {re.escape(first)} is unreadable.*SHA-256"):
        list(tar_samples(first, sha256=checksums[first] + "x"))
    with pytest.raises(BadShardError, match=f"shard {re.escape(first)} is unreadable"):
        list(tar_samples(first))
    fs.rm_file(inner)
    assert verify_shards(url) == [f"{first}: missing ({first.split('/')[-2]}/train)"]
    with pytest.raises(BadShardError, match=f"shard {re.escape(first)} is unreadable"):
        list(tar_samples(first))


def _stream(shards: str | Path, rank: int, world: int, workers: int = 0) -> TrainLoader:
    cfg = DataConfig(shards=str(shards), seq_len=256, num_workers=workers, shuffle_buffer=32,
                     open_shards=2)  # fmt: skip
    return TrainLoader(cfg, CharTokenizer(), 4, 11, rank, world)


def _take(loader: TrainLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.kingdom, y.kingdom)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_training_from_s3_gives_the_local_batches_for_two_ranks_and_after_a_resume(
    s3_server, small_shards
):
    url = _put_set(small_shards)
    for rank in (0, 1):
        local = _take(_stream(small_shards, rank, 2), 5)
        remote = _stream(url, rank, 2)
        assert remote.shards == [
            (p.replace(str(small_shards), url), n) for p, n in _stream(small_shards, rank, 2).shards
        ]
        _same(_take(remote, 5), local)
        # interrupted after 3 batches, resumed from the saved position: the same next batches
        first = _stream(url, rank, 2)
        _take(first, 3)
        resumed = _stream(url, rank, 2)
        resumed.load_state_dict(first.state_dict())
        _same(_take(resumed, 2), local[3:])
    # DataLoader worker processes read from the store too
    _same(_take(_stream(url, 0, 1, workers=2), 4), _take(_stream(small_shards, 0, 1, workers=2), 4))


# --------------------------------------------------------------------------- building to S3


def test_build_from_and_to_s3_writes_the_local_bytes(s3_server, tmp_path):
    from data_pipeline.build import build_shards

    picked = ["viral/lambda.fasta.gz", "viral/NC_045512.2.fasta", "plasmid/NC_007717.gbk.gz",
              "mammals/rn6_chr10_segment.fa.xz"]  # fmt: skip
    _upload(dict.fromkeys(picked), "in")
    remote = [SourceFile(f"s3://{BUCKET}/in/{rel}", FILES[rel]) for rel in picked]
    local = [SourceFile(SAMPLE / rel, FILES[rel]) for rel in picked]
    options = ShardOptions(min_shards=2, chunk_len=4096)
    out = f"s3://{BUCKET}/shards"
    quiet = {"log": lambda _: None}
    build_shards(remote, out, options, work_dir=tmp_path / "w1", **quiet)
    build_shards(local, tmp_path / "local", options, work_dir=tmp_path / "w2", **quiet)

    ours = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    theirs = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert [i["path"] for i in ours["inputs"]] == [str(s.path) for s in remote]
    assert {r["source"] for r in ours["records"]} <= {str(s.path) for s in remote}
    for manifest in (ours, theirs):
        for entry in manifest["inputs"]:
            entry.pop("path")
        for record in manifest["records"]:
            record.pop("source")
    assert ours == theirs
    for path, sha in shard_checksums(tmp_path / "local", theirs).items():
        rel = Path(path).relative_to(tmp_path / "local").as_posix()
        assert storage.read_bytes(f"{out}/{rel}") == Path(path).read_bytes()
        assert sha256_file(f"{out}/{rel}") == sha
    assert verify_shards(out) == []
    with pytest.raises(FileExistsError) as err:
        build_shards(remote, out, options, work_dir=tmp_path / "w3", **quiet)
    _one_line(err, out, "--overwrite")


# --------------------------------------------------------------------------- credentials


def test_messages_never_show_a_urls_credentials(http_server, tmp_path):
    served = tmp_path / "http"
    (served / "bad.fa").write_text("this is not a genome\n")
    (served / "junk.tar").write_bytes(b"not a tar" * 100)
    base = http_server.replace("http://", f"http://user:{SECRET}@")
    signed = f"?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature={SECRET}"
    failures = []
    for call in (
        lambda: read_sequences(f"{base}/bad.fa"),
        lambda: read_sequences(f"{http_server}/bad.fa{signed}"),
        lambda: list(read_sequences(f"{base}/missing.fa")),
        lambda: check_sources([SourceFile(f"{base}/missing.fa{signed}", "viral")]),
        lambda: load_manifest(f"{base}/shards"),
        lambda: list(tar_samples(f"{base}/junk.tar")),
        lambda: list(tar_samples(f"{http_server}/junk.tar{signed}", sha256="0" * 64)),
        lambda: verify_shards(f"{http_server}/nope{signed}"),
    ):
        with pytest.raises((SequenceFormatError, OSError, ValueError)) as err:
            call()
        failures.append(str(err.value))
    for text in failures:
        assert SECRET not in text and "AKIDEXAMPLE" not in text, text
        assert "***" in text, text
    assert storage.scrub(f"GET user:{SECRET}@host/x failed", f"{base}/x") == (
        "GET user:***@host/x failed"
    )


def test_no_credentials_or_no_bucket_is_one_line_naming_the_url(s3_server, monkeypatch, capsys):
    from nucleo.cli.common import run

    _upload({"viral/lambda.fasta.gz": "viral"}, "in")
    url = f"s3://{BUCKET}/in/viral/lambda.fasta.gz"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    forget_s3_clients()
    for call in (
        lambda: check_sources([SourceFile(url, "viral")]),
        lambda: load_manifest(f"s3://{BUCKET}/shards"),
        lambda: kingdom_folders(f"s3://{BUCKET}/in"),
        lambda: read_sequences(url),
    ):
        with pytest.raises(storage.StorageError) as err:
            call()
        _one_line(err, f"s3://{BUCKET}/", "no credentials", "AWS_ACCESS_KEY_ID")
    # what the command line prints: one line, exit code 2
    assert run(lambda _: check_sources([SourceFile(url, "viral")]) and 0, None) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert printed == [f"nucleo: error: {url}: no credentials for s3:// URLs; set "
                       f"{storage._CREDENTIALS['s3']}"]  # fmt: skip

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    forget_s3_clients()
    with pytest.raises(FileNotFoundError) as err:
        check_sources([SourceFile("s3://no-such-bucket/x.fa", "viral")])
    _one_line(err, "s3://no-such-bucket/x.fa: no such genome file")
    with pytest.raises(FileNotFoundError) as err:
        load_manifest("s3://no-such-bucket/shards")
    _one_line(err, "s3://no-such-bucket/shards/manifest.json: no shard manifest")
