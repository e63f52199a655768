"""Genome sources: kingdom folders, RefSeq downloads (from a loopback HTTP server), tables."""

from __future__ import annotations

import gzip
import hashlib
import html
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import sources
from data_pipeline.readers import NORMALISE, SequenceFormatError, open_binary, read_sequences
from data_pipeline.shards import REFSEQ_KINGDOMS, SourceFile
from data_pipeline.sources import (
    ChecksumError,
    DownloadError,
    download_refseq,
    import_table,
    kingdom_folders,
)
from tests.conftest import sample_file

# ------------------------------------------------------------------------------ kingdom folders


def _touch_copy(src: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_file(src), dest)
    return dest


def test_kingdom_folders_any_layout(tmp_path):
    a = _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / "lambda.fasta.gz")
    b = _touch_copy("viral/NC_045512.2.fasta", tmp_path / "viral" / "sub" / "sars2.fasta")
    c = _touch_copy("plasmid/NC_009934.gbk", tmp_path / "plasmid" / "NC_009934.gbk")
    d = _touch_copy("archaea/Methanococcus_maripaludis.fna.xz", tmp_path / "archaea" / "m.fna.xz")
    e = _touch_copy("viral/lactococcus_phages.fasta.bz2", tmp_path / "my_kingdom2" / "p.fas.bz2")
    # ignored: unfinished downloads, hidden files and folders, non-genome files, files in root
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / "x.fasta.gz.part")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / ".hidden.fasta.gz")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / ".cache" / "y.fasta.gz")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / ".trash" / "z.fasta.gz")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "root_level.fasta.gz")
    (tmp_path / "viral" / "README.txt").write_text("notes")

    found = kingdom_folders(tmp_path)
    assert found == [
        SourceFile(d, "archaea"),
        SourceFile(e, "my_kingdom2"),
        SourceFile(c, "plasmid"),
        SourceFile(a, "viral"),
        SourceFile(b, "viral"),
    ]
    assert kingdom_folders(str(tmp_path)) == found  # deterministic, str accepted
    assert sum(1 for src in found for _ in read_sequences(src.path)) >= 5


def test_kingdom_folders_refseq_layout(tmp_path):
    v1 = _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / "viral.1.1.genomic.fna.gz")
    v2 = _touch_copy("viral/NC_045512.2.fasta", tmp_path / "viral" / "viral.2.1.genomic.fna")
    # another form of volume 1: not read twice
    _touch_copy("viral/NC_001422.gbk.gz", tmp_path / "viral" / "viral.1.genomic.gbff.gz")
    _touch_copy("viral/NC_001422.gbk.gz", tmp_path / "viral" / "viral.1.1.genomic.gbff.gz")
    p = _touch_copy("plasmid/NC_005816.gb.gz", tmp_path / "plasmid" / "plasmid.1.genomic.gbff.gz")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / "viral.3.1.genomic.fna.gz.part")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / "viral.1.protein.faa.gz")
    _touch_copy("viral/lambda.fasta.gz", tmp_path / "viral" / "other.fasta.gz")  # not RefSeq

    found = kingdom_folders(tmp_path, refseq=True)
    assert found == [
        SourceFile(p, "plasmid"),
        SourceFile(v1, "viral"),
        SourceFile(tmp_path / "viral" / "viral.1.genomic.gbff.gz", "viral"),
        SourceFile(v2, "viral"),
    ]


def test_kingdom_folders_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder") as err:
        kingdom_folders(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)

    with pytest.raises(ValueError, match="no kingdom sub-folders") as err:
        kingdom_folders(tmp_path)
    assert str(tmp_path) in str(err.value)

    bad = tmp_path / "bad"
    _touch_copy("viral/lambda.fasta.gz", bad / "Viral" / "lambda.fasta.gz")
    with pytest.raises(ValueError, match="not a valid kingdom name") as err:
        kingdom_folders(bad)
    assert str(bad / "Viral") in str(err.value)

    custom = tmp_path / "custom"
    _touch_copy("viral/lambda.fasta.gz", custom / "phages" / "viral.1.1.genomic.fna.gz")
    assert kingdom_folders(custom)[0].kingdom == "phages"
    with pytest.raises(ValueError, match="not a RefSeq release kingdom") as err:
        kingdom_folders(custom, refseq=True)
    assert str(custom / "phages") in str(err.value)
    assert ", ".join(REFSEQ_KINGDOMS) in str(err.value)

    empty = tmp_path / "empty"
    _touch_copy("viral/lambda.fasta.gz", empty / "viral" / "lambda.fasta.gz.part")
    (empty / "viral" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no genome files found") as err:
        kingdom_folders(empty)
    assert str(empty / "viral") in str(err.value) and "gbff" in str(err.value)
    _touch_copy("viral/lambda.fasta.gz", empty / "viral" / "lambda.fasta.gz")
    with pytest.raises(ValueError, match=r"\*\.genomic\.fna\.gz") as err:
        kingdom_folders(empty, refseq=True)
    assert str(empty / "viral") in str(err.value)


# ------------------------------------------------------------------------------ RefSeq download


@dataclass
class ServerState:
    """What the loopback server serves and what it saw."""

    root: Path
    delay: float = 0.0  # seconds each file response waits, to make downloads overlap
    ignore_range: bool = False  # answer 200 with the whole file to Range requests
    fail_first: set[str] = field(default_factory=set)  # names answered 503 once
    redirects: dict[str, str] = field(default_factory=dict)  # url path -> Location
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    active: int = 0
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def file_gets(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of files called ``name``."""
        return [rng for path, rng in self.requests if path.rsplit("/", 1)[-1] == name]


class Handler(BaseHTTPRequestHandler):
    """Serves ``state.root``: Apache-like index pages for folders, files with Range support."""

    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        url_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        with state.lock:
            state.requests.append((url_path, self.headers.get("Range")))
        target = state.root / url_path.lstrip("/")
        if url_path in state.redirects:
            self.send_response(302)
            self.send_header("Location", state.redirects[url_path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif target.is_dir():
            self._index(url_path, target)
        elif target.is_file():
            with state.lock:
                state.active += 1
                state.max_active = max(state.max_active, state.active)
            try:
                time.sleep(state.delay)
                self._file(state, target)
            finally:
                with state.lock:
                    state.active -= 1
        else:
            self.send_error(404)

    def _index(self, url_path: str, folder: Path) -> None:
        links = ['<a href="?C=N;O=D">Name</a>', '<a href="../">Parent Directory</a>']
        for entry in sorted(folder.iterdir()):
            name = entry.name + ("/" if entry.is_dir() else "")
            href = html.escape(urllib.parse.quote(name))
            links.append(f'<a href="{href}">{html.escape(name)}</a>  2024-01-01 00:00  1K')
        body = (
            f"<html><head><title>Index of {url_path}</title></head><body><h1>Index of "
            f"{url_path}</h1><pre>" + "\n".join(links) + "</pre></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, state: ServerState, path: Path) -> None:
        if path.name in state.fail_first:
            state.fail_first.discard(path.name)
            self.send_error(503)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


# originals: (kingdom, served name, bundled sample file)
GENOMES = [
    ("viral", "viral.1.1.genomic.fna.gz", "viral/NC_045512.2.fasta"),
    ("viral", "viral.2.1.genomic.fna.gz", "viral/lambda.fasta.gz"),
    ("mitochondrion", "mitochondrion.1.1.genomic.fna.gz", "mitochondrion/rCRS.fasta.gz"),
    ("mitochondrion", "mitochondrion.2.1.genomic.fna.gz", "mitochondrion/bonobo.fasta.gz"),
]


@pytest.fixture
def refseq_server(tmp_path, monkeypatch):
    """A RefSeq-like release tree of real sample genomes on 127.0.0.1; yields (state, base_url).

    viral/ has an md5checksums.txt (one ``./name`` entry, one plain), mitochondrion/ has none;
    both hold a protein file that the default pattern must skip.
    """
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sources, "_BACKOFF_S", 0.01)
    root = tmp_path / "mirror"
    release = root / "refseq" / "release"
    md5_lines = []
    for kingdom, name, sample in GENOMES:
        folder = release / kingdom
        folder.mkdir(parents=True, exist_ok=True)
        with open_binary(sample_file(sample)) as fh:
            plain = fh.read()
        data = gzip.compress(plain, mtime=0)
        (folder / name).write_bytes(data)
        if kingdom == "viral":
            prefix = "./" if name.startswith("viral.1.") else ""
            md5_lines.append(f"{hashlib.md5(data).hexdigest()}  {prefix}{name}")
        (folder / f"{kingdom}.1.protein.faa.gz").write_bytes(gzip.compress(b">p\nMKV\n"))
    (release / "viral" / "md5checksums.txt").write_text("\n".join(md5_lines) + "\n")
    (release / "release-notes").mkdir()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state = ServerState(root)
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/refseq/release"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _served(state: ServerState, kingdom: str, name: str) -> Path:
    return state.root / "refseq" / "release" / kingdom / name


def test_download_reads_back_as_refseq_layout(refseq_server, tmp_path):
    state, base_url = refseq_server
    out = tmp_path / "out"
    lines: list[str] = []
    files = download_refseq(["viral", "mitochondrion"], out, base_url=base_url, log=lines.append)

    expected = [out / k / n for k, n, _ in sorted(GENOMES, key=lambda g: (g[0], g[1]))]
    assert files == expected
    for kingdom, name, _ in GENOMES:
        assert (out / kingdom / name).read_bytes() == _served(state, kingdom, name).read_bytes()
    assert not list(out.rglob("*.part")) and not list(out.rglob("*protein*"))

    found = kingdom_folders(out, refseq=True)
    assert [(s.path, s.kingdom) for s in found] == [(p, p.parent.name) for p in expected]
    for src, (_, _, sample) in zip(found, sorted(GENOMES, key=lambda g: (g[0], g[1])), strict=True):
        got = [(r.id, bytes(r.seq)) for r in read_sequences(src.path)]
        assert got == [(r.id, bytes(r.seq)) for r in read_sequences(sample_file(sample))]

    text = "\n".join(lines)
    assert "viral/viral.1.1.genomic.fna.gz" in text and "md5 ok" in text
    assert "mitochondrion: no md5checksums.txt" in text and "gzip ok, no checksum" in text
    assert "MB/s" in text and "4/4 files ok" in text


def test_download_resumes_a_partial_file_with_a_range_request(refseq_server, tmp_path):
    state, base_url = refseq_server
    out = tmp_path / "out"
    name = "viral.1.1.genomic.fna.gz"
    original = _served(state, "viral", name).read_bytes()
    half = len(original) // 2
    (out / "viral").mkdir(parents=True)
    (out / "viral" / f"{name}.part").write_bytes(original[:half])

    lines: list[str] = []
    download_refseq(["viral"], out, base_url=base_url, max_files=1, log=lines.append)
    assert state.file_gets(name) == [f"bytes={half}-"]
    assert (out / "viral" / name).read_bytes() == original
    assert not (out / "viral" / f"{name}.part").exists()
    assert "resumed at" in "\n".join(lines)
    assert not (out / "viral" / "viral.2.1.genomic.fna.gz").exists()  # max_files=1


def test_download_restarts_when_the_server_ignores_range(refseq_server, tmp_path):
    state, base_url = refseq_server
    state.ignore_range = True
    out = tmp_path / "out"
    name = "mitochondrion.2.1.genomic.fna.gz"
    original = _served(state, "mitochondrion", name).read_bytes()
    (out / "mitochondrion").mkdir(parents=True)
    (out / "mitochondrion" / f"{name}.part").write_bytes(original[:100])
    download_refseq(["mitochondrion"], out, base_url=base_url, log=lambda _: None)
    assert state.file_gets(name) == ["bytes=100-"]  # asked to resume, got 200 and the whole file
    assert (out / "mitochondrion" / name).read_bytes() == original


def test_download_skips_complete_files(refseq_server, tmp_path):
    state, base_url = refseq_server
    out = tmp_path / "out"
    download_refseq(["viral", "mitochondrion"], out, base_url=base_url, log=lambda _: None)
    genome_gets = [p for p, _ in state.requests if p.endswith(".genomic.fna.gz")]
    assert len(genome_gets) == len(GENOMES)

    state.requests.clear()
    corrupt = out / "mitochondrion" / "mitochondrion.1.1.genomic.fna.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:-20])  # a damaged final file is fetched again
    lines: list[str] = []
    files = download_refseq(["viral", "mitochondrion"], out, base_url=base_url, log=lines.append)
    assert len(files) == len(GENOMES)
    assert [p for p, _ in state.requests if p.endswith(".genomic.fna.gz")] == [
        "/refseq/release/mitochondrion/mitochondrion.1.1.genomic.fna.gz"
    ]
    assert corrupt.read_bytes() == _served(state, "mitochondrion", corrupt.name).read_bytes()
    assert "3 already complete" in lines[-1]


def test_download_checksum_mismatch_names_the_file(refseq_server, tmp_path):
    state, base_url = refseq_server
    name = "viral.2.1.genomic.fna.gz"
    actual = hashlib.md5(_served(state, "viral", name).read_bytes()).hexdigest()
    md5_file = state.root / "refseq" / "release" / "viral" / "md5checksums.txt"
    md5_file.write_text(md5_file.read_text().replace(actual, "0" * 32))
    out = tmp_path / "out"

    with pytest.raises(ChecksumError) as err:
        download_refseq(["viral"], out, base_url=base_url, retries=1, log=lambda _: None)
    message = str(err.value)
    assert name in message and "0" * 32 in message and actual in message
    assert len(state.file_gets(name)) == 2  # retried once, from byte 0 each time
    assert not (out / "viral" / name).exists() and not (out / "viral" / f"{name}.part").exists()
    assert (out / "viral" / "viral.1.1.genomic.fna.gz").exists()  # the other file still arrives


def test_download_corrupt_gzip_without_checksum_is_an_error(refseq_server, tmp_path):
    state, base_url = refseq_server
    served = _served(state, "mitochondrion", "mitochondrion.1.1.genomic.fna.gz")
    served.write_bytes(served.read_bytes()[:-30])
    with pytest.raises(ChecksumError, match=r"mitochondrion\.1\.1\.genomic\.fna\.gz.*gzip"):
        download_refseq(
            ["mitochondrion"], tmp_path / "out", base_url=base_url, retries=0, log=lambda _: None
        )


def test_download_retries_network_errors(refseq_server, tmp_path):
    state, base_url = refseq_server
    state.fail_first = {"viral.1.1.genomic.fna.gz"}
    lines: list[str] = []
    download_refseq(["viral"], tmp_path / "out", base_url=base_url, log=lines.append)
    assert len(state.file_gets("viral.1.1.genomic.fna.gz")) == 2
    assert any("503" in line and "retry 1/3" in line for line in lines)

    with pytest.raises(DownloadError, match="404"):
        download_refseq(["plastid"], tmp_path / "out", base_url=base_url, log=lambda _: None)
    with pytest.raises(ValueError, match="not a RefSeq release kingdom"):
        download_refseq(["phages"], tmp_path / "out", base_url=base_url)


def test_download_bounds_concurrency(refseq_server, tmp_path):
    state, base_url = refseq_server
    state.delay = 0.2
    out = tmp_path / "out"
    download_refseq(["viral", "mitochondrion"], out, base_url=base_url, jobs=2, log=lambda _: None)
    assert state.max_active == 2  # overlapping, but never more than jobs
    assert len(kingdom_folders(out, refseq=True)) == len(GENOMES)


# ------------------------------------------------------------------------------ tables


def _sample_rows() -> list[dict[str, str]]:
    """Real records of two kingdoms; some soft-masked (lower case) and with an IUPAC code."""
    rows = []
    for kingdom, sample in [
        ("viral", "viral/NC_045512.2.fasta"),
        ("viral", "viral/lambda.fasta.gz"),
        ("mitochondrion", "mitochondrion/rCRS.fasta.gz"),
        ("mitochondrion", "mitochondrion/bonobo.fasta.gz"),
    ]:
        for rec in read_sequences(sample_file(sample)):
            seq = rec.seq.decode()
            rows.append({"id": rec.id, "sequence": seq, "kingdom": kingdom})
    rows[1]["sequence"] = rows[1]["sequence"][:500].lower() + rows[1]["sequence"][500:]
    rows[2]["sequence"] = "ry" + rows[2]["sequence"] + "u"
    return rows


def _expected(rows: list[dict[str, str]], kingdom: str) -> list[tuple[str, bytes]]:
    return [
        (row["id"], row["sequence"].encode().translate(NORMALISE))
        for row in rows
        if row["kingdom"] == kingdom
    ]


def _read_back(path: Path) -> list[tuple[str, bytes]]:
    return [(rec.id, bytes(rec.seq)) for rec in read_sequences(path)]


def test_import_parquet_with_a_kingdom_column(tmp_path):
    rows = _sample_rows()
    rows.append({"id": "empty_one", "sequence": "", "kingdom": "viral"})
    table = pa.Table.from_pylist(rows)
    source = tmp_path / "genomes.parquet"
    pq.write_table(table, source, row_group_size=2)
    out = tmp_path / "fasta"
    lines: list[str] = []

    found = import_table(source, out, log=lines.append)
    assert found == [
        SourceFile(out / "mitochondrion.fa", "mitochondrion"),
        SourceFile(out / "viral.fa", "viral"),
    ]
    for src in found:
        assert _read_back(src.path) == _expected(rows[:-1], src.kingdom)
        text_lines = src.path.read_text().splitlines()
        assert max(len(line) for line in text_lines) == 80
    assert sorted(p.name for p in out.iterdir()) == ["mitochondrion.fa", "viral.fa"]  # no temps
    assert any("skipped 1 rows with an empty sequence" in line for line in lines)

    # a folder of parquet files (one per kingdom), fixed kingdom, custom columns
    folder = tmp_path / "parts"
    folder.mkdir()
    renamed = table.rename_columns(["name", "dna", "group"])
    pq.write_table(renamed.slice(0, 2), folder / "a.parquet")
    pq.write_table(renamed.slice(2, 2), folder / "b.parquet")
    found = import_table(
        folder,
        tmp_path / "fixed",
        sequence_column="dna",
        id_column="name",
        kingdom_column=None,
        kingdom="plasmid",
        log=lambda _: None,
    )
    assert found == [SourceFile(tmp_path / "fixed" / "plasmid.fa", "plasmid")]
    as_plasmid = [dict(row, kingdom="plasmid") for row in rows[:4]]
    assert _read_back(found[0].path) == _expected(as_plasmid, "plasmid")


def test_import_table_errors(tmp_path):
    rows = _sample_rows()
    source = tmp_path / "genomes.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    out = tmp_path / "out"

    with pytest.raises(ValueError, match="no column 'seq'") as err:
        import_table(source, out, sequence_column="seq")
    assert "the columns are: id, sequence, kingdom" in str(err.value)
    assert str(source) in str(err.value)
    with pytest.raises(ValueError, match=r"kingdom_column .* or kingdom"):
        import_table(source, out, kingdom_column=None)
    with pytest.raises(ValueError, match="not a valid kingdom name"):
        import_table(source, out, kingdom="Viral")

    bad = [dict(row) for row in rows]
    bad[2]["sequence"] = bad[2]["sequence"][:1000] + "X" + bad[2]["sequence"][1000:]
    pq.write_table(pa.Table.from_pylist(bad), source)
    with pytest.raises(SequenceFormatError) as err:
        import_table(source, out, log=lambda _: None)
    message = str(err.value)
    assert str(source) in message and "row 2 " in message and repr(rows[2]["id"]) in message
    assert "'X'" in message and "position 1000" in message
    assert not out.exists() or not list(out.iterdir())  # nothing half-written left behind

    bad = [dict(row) for row in rows]
    bad[3]["kingdom"] = "Mito chondrion"
    pq.write_table(pa.Table.from_pylist(bad), source)
    with pytest.raises(ValueError, match=r"row 3 .*'Mito chondrion' is not a valid kingdom"):
        import_table(source, out, log=lambda _: None)

    with pytest.raises(FileNotFoundError):
        import_table(tmp_path / "missing.parquet", out)


def test_import_datasets_save_to_disk_and_arrow(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _sample_rows()
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    dataset = datasets.Dataset.from_dict(columns)
    saved = tmp_path / "saved"
    dataset.save_to_disk(str(saved))

    found = import_table(saved, tmp_path / "a", log=lambda _: None)
    assert [s.kingdom for s in found] == ["mitochondrion", "viral"]
    for src in found:
        assert _read_back(src.path) == _expected(rows, src.kingdom)

    (arrow,) = saved.glob("*.arrow")
    found = import_table(arrow, tmp_path / "b", log=lambda _: None)
    assert _read_back(found[1].path) == _expected(rows, "viral")

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": dataset.select(range(2)), "test": dataset}).save_to_disk(
        str(splits)
    )
    found = import_table(splits, tmp_path / "c", split="train", log=lambda _: None)
    assert found == [SourceFile(tmp_path / "c" / "viral.fa", "viral")]
    assert _read_back(found[0].path) == _expected(rows[:2], "viral")
    with pytest.raises(ValueError, match="no split 'validation'; the splits are: train, test"):
        import_table(splits, tmp_path / "d", split="validation")


def test_downloads_refuse_odd_redirects_and_files_past_the_size_cap(refseq_server, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """A server may redirect anywhere and send without end: file:// and redirect chains are
    refused, and a file over the cap is stopped with its part deleted."""
    state, base = refseq_server
    viral = "/refseq/release/viral/viral.2.1.genomic.fna.gz"
    state.redirects["/a"] = "file:///etc/passwd"
    with pytest.raises(DownloadError, match=r"file:///etc/passwd.* not allowed"):
        sources.download_file(base.split("/refseq")[0] + "/a", tmp_path / "a.gz", log=print)
    for i in range(8):  # a chain longer than 5 hops
        state.redirects[f"/hop{i}"] = f"/hop{i + 1}"
    state.redirects["/hop8"] = viral
    with pytest.raises(DownloadError, match="redirect"):
        sources.download_file(base.split("/refseq")[0] + "/hop0", tmp_path / "h.gz", log=print)
    state.redirects["/short"] = viral  # one hop is fine
    got = sources.download_file(base.split("/refseq")[0] + "/short", tmp_path / "s.gz", log=print)
    assert got.read_bytes() == _served(state, "viral", "viral.2.1.genomic.fna.gz").read_bytes()
    monkeypatch.setattr(sources, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(DownloadError, match="refused as larger than any genome file"):
        sources.download_file(base + "/viral/viral.2.1.genomic.fna.gz", tmp_path / "big.gz",
                              log=print)  # fmt: skip
    assert not list(tmp_path.glob("big*"))


def test_a_redirect_from_https_to_http_is_refused():
    request = urllib.request.Request("https://example.org/genome.fa.gz")
    with pytest.raises(DownloadError, match=r"refused a redirect to http://evil\.example/x"):
        sources._Redirects().redirect_request(request, None, 302, "Found", {},
                                              "http://evil.example/x")  # fmt: skip
