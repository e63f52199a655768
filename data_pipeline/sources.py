"""Where genome files come from: local kingdom folders, RefSeq release downloads, and tables.

Every entry point ends in a list of ``SourceFile`` (path, kingdom) for ``build_shards``:

- ``kingdom_folders``: a tree ``<root>/<kingdom>/...``, local or at a URL (``s3://bucket/root``,
  listed through ``data_pipeline.storage``), either any FASTA/GenBank files or the NCBI RefSeq
  release layout (``<root>/<kingdom>/*.genomic.fna.gz``);
- ``download_refseq``: fetches RefSeq release files into that layout, resumably, in parallel,
  each file verified (md5 when the server lists checksums, else a full gzip decode);
- ``import_table``: parquet files, Arrow files / ``datasets.save_to_disk`` folders or Hugging
  Face Hub datasets with one sequence per row, written as one FASTA file per kingdom.
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import storage
from data_pipeline.readers import NORMALISE, VALID_BASES, SequenceFormatError
from data_pipeline.shards import REFSEQ_KINGDOMS, SourceFile

Log = Callable[[str], None]

KINGDOM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
GENOME_EXTENSIONS = (".fa", ".fasta", ".fna", ".fas", ".gb", ".gbk", ".gbff")
COMPRESSION_EXTENSIONS = (".gz", ".xz", ".bz2")
# RefSeq release files, in order of preference when one volume is there in several forms.
REFSEQ_SUFFIXES = (".genomic.fna.gz", ".genomic.fna", ".genomic.gbff.gz")
REFSEQ_BASE_URL = "https://ftp.ncbi.nlm.nih.gov/refseq/release"
MD5_LIST = "md5checksums.txt"
USER_AGENT = "nucleo-data-pipeline/0.1 (python urllib)"

_BACKOFF_S = 1.0  # first retry delay after a network error; doubles per retry
MAX_DOWNLOAD_BYTES = 64 * 2**30  # a file larger than this is refused (RefSeq's largest: ~2 GB)
_MAX_REDIRECTS = 5
_CHUNK_BYTES = 1 << 20
_BATCH_ROWS = 64  # table rows per batch: bounds memory when rows are whole chromosomes
_LINE_BASES = 80
_WHITESPACE = b" \t\r\n\x0b\x0c"
_INVALID = ord("!")


# --------------------------------------------------------------------------- local folders


def _check_kingdom(name: str, where: str | Path, *, refseq: bool = False) -> None:
    """Raise a ValueError naming ``where`` if ``name`` is not a valid (RefSeq) kingdom name."""
    if refseq and name not in REFSEQ_KINGDOMS:
        raise ValueError(
            f"{where}: {name!r} is not a RefSeq release kingdom; the RefSeq kingdoms are: "
            f"{', '.join(REFSEQ_KINGDOMS)}"
        )
    if not isinstance(name, str) or not KINGDOM_NAME.match(name):
        raise ValueError(
            f"{where}: {name!r} is not a valid kingdom name (lower-case letters, digits and '_', "
            f"starting with a letter, e.g. {', '.join(REFSEQ_KINGDOMS[:3])})"
        )


def _ignored(name: str) -> bool:
    """Hidden files/folders and unfinished downloads."""
    return name.startswith(".") or name.endswith(".part")


def _is_genome_file(name: str) -> bool:
    lower = name.lower()
    for ext in COMPRESSION_EXTENSIONS:
        if lower.endswith(ext):
            lower = lower[: -len(ext)]
            break
    return lower.endswith(GENOME_EXTENSIONS)


def _refseq_files(folder: Path) -> list[Path]:
    """The RefSeq genome files directly in ``folder``; one form per volume (``.fna.gz`` first)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    return sorted(files[name] for name in _refseq_names(files))


def _refseq_names(names: list[str] | dict[str, Any]) -> list[str]:
    """Of the file ``names`` of one folder, the RefSeq genome files; one form per volume."""
    best: dict[str, tuple[int, str]] = {}
    for name in names:
        if _ignored(name):
            continue
        for rank, suffix in enumerate(REFSEQ_SUFFIXES):
            if name.endswith(suffix):
                volume = name[: -len(suffix)]
                if volume not in best or rank < best[volume][0]:
                    best[volume] = (rank, name)
                break
    return [name for _, name in best.values()]


def _genome_files(folder: Path) -> list[Path]:
    """FASTA/GenBank files anywhere under ``folder``, skipping hidden folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not _ignored(name) and _is_genome_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def kingdom_folders(root: str | Path, *, refseq: bool = False) -> list[SourceFile]:
    """The genome files of a folder with one sub-folder per kingdom, sorted by kingdom and path.

    ``refseq=False``: any FASTA/GenBank file (``.fa .fasta .fna .fas .gb .gbk .gbff``, optionally
    ``.gz/.xz/.bz2``) anywhere under ``<root>/<kingdom>/``. ``refseq=True``: the NCBI RefSeq
    release layout, ``<root>/<kingdom>/*.genomic.fna.gz`` (or ``*.genomic.fna``,
    ``*.genomic.gbff.gz``; one form per volume, FASTA first, so a volume is never read twice),
    where every kingdom must be a RefSeq kingdom. Hidden entries and ``*.part`` files (unfinished
    downloads) are ignored; files directly in ``root`` are ignored. ``root`` may be a URL
    (``s3://bucket/genomes``): the files are then URLs, found by one recursive listing.
    """
    patterns = _patterns(refseq)
    if storage.is_url(root):
        return _url_kingdom_folders(str(root), refseq, patterns)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"{root}: no such folder (expected one sub-folder per kingdom: <root>/<kingdom>/...)"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(
            f"{root}: no kingdom sub-folders, so no genome files found (expected "
            f"<root>/<kingdom>/{patterns})"
        )
    sources = []
    for folder in folders:
        _check_kingdom(folder.name, folder, refseq=refseq)
        files = _refseq_files(folder) if refseq else _genome_files(folder)
        if not files:
            raise ValueError(
                f"{folder}: no genome files found (looked for {patterns}; hidden and *.part files "
                "are ignored)"
            )
        sources.extend(SourceFile(path, folder.name) for path in files)
    return sources


def _patterns(refseq: bool) -> str:
    """The file names ``kingdom_folders`` looks for, for its messages."""
    if refseq:
        return ", ".join(f"*{suffix}" for suffix in REFSEQ_SUFFIXES)
    exts = "|".join(e.lstrip(".") for e in GENOME_EXTENSIONS)
    comps = "|".join(e.lstrip(".") for e in COMPRESSION_EXTENSIONS)
    return f"*.{{{exts}}}[.{{{comps}}}]"


def _url_kingdom_folders(root: str, refseq: bool, patterns: str) -> list[SourceFile]:
    """``kingdom_folders`` of a URL: the same rules, applied to one recursive listing (an
    object store has no empty folders, and listing each one would cost a request)."""
    where = storage.redact(root)
    try:
        files = storage.find(root)
    except FileNotFoundError:
        files = []
    if not files:
        raise ValueError(
            f"{where}: no such folder, or nothing in it (expected one sub-folder per kingdom: "
            "<root>/<kingdom>/...)"
        )
    by_kingdom: dict[str, list[str]] = {}
    for rel in files:
        parts = rel.split("/")
        if len(parts) < 2 or parts[0].startswith("."):
            continue  # files directly in root, hidden kingdoms
        by_kingdom.setdefault(parts[0], []).append("/".join(parts[1:]))
    if not by_kingdom:
        raise ValueError(
            f"{where}: no kingdom sub-folders, so no genome files found (expected "
            f"<root>/<kingdom>/{patterns})"
        )
    sources: list[SourceFile] = []
    for kingdom in sorted(by_kingdom):
        folder = storage.join(root, kingdom)
        _check_kingdom(kingdom, storage.redact(folder), refseq=refseq)
        inner = by_kingdom[kingdom]
        if refseq:
            names = _refseq_names([rel for rel in inner if "/" not in rel])
        else:
            names = [
                rel
                for rel in inner
                if not any(part.startswith(".") for part in rel.split("/")[:-1])
                and not _ignored(rel.rsplit("/", 1)[-1])
                and _is_genome_file(rel.rsplit("/", 1)[-1])
            ]
        if not names:
            raise ValueError(
                f"{storage.redact(folder)}: no genome files found (looked for {patterns}; hidden "
                "and *.part files are ignored)"
            )
        paths = sorted(storage.join(folder, rel) for rel in names)
        sources.extend(SourceFile(path, kingdom) for path in paths)
    return sources


# --------------------------------------------------------------------------- RefSeq download


class DownloadError(RuntimeError):
    """A file that could not be listed, downloaded or verified; the message names it."""


class ChecksumError(DownloadError):
    """A downloaded file whose md5 (or gzip stream) is wrong; the message names the file."""


class _IncompleteDownload(ConnectionError):
    """The connection closed before the announced number of bytes arrived (resumable)."""


_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


def _transient(err: BaseException) -> bool:
    """Worth retrying: network trouble and server-side HTTP errors, not 404 or 403."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code in (408, 425, 429) or err.code >= 500
    return isinstance(err, _NETWORK_ERRORS)


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders ``viral.2.1`` before ``viral.10.1``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for key, value in attrs if key == "href" and value)


def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow at most ``_MAX_REDIRECTS`` redirects, only to http(s), never https -> http."""

    max_redirections = _MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new.scheme not in ("http", "https") or (old.scheme == "https" != new.scheme):
            raise DownloadError(f"{req.full_url}: refused a redirect to {newurl} ({new.scheme})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_Redirects)


def open_url(request: urllib.request.Request, timeout: float):
    """``urlopen`` with bounded redirects (``_Redirects``) and a timeout in seconds."""
    return _OPENER.open(request, timeout=timeout)


def _with_retries(what: str, fn: Callable[[], Any], retries: int, log: Log) -> Any:
    """``fn()``, retried ``retries`` times with exponential backoff on transient errors."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:
            if not _transient(err) or attempt == retries:
                raise DownloadError(f"{what}: {err}") from err
            delay = _BACKOFF_S * 2**attempt
            log(f"{what}: {err}; retry {attempt + 1}/{retries} in {delay:.1f} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def list_directory(url: str, *, timeout: float = 60) -> list[str]:
    """Names of the files linked from the HTML directory index at ``url`` (natural order).

    Only links to entries directly inside the directory count: parent links, sub-folders and
    sorting links (``?C=N;O=D``) are dropped.
    """
    if not url.endswith("/"):
        url += "/"
    with open_url(_request(url), timeout=timeout) as resp:
        base = resp.geturl()
        body = resp.read().decode("utf-8", errors="replace")
    if not base.endswith("/"):
        base += "/"
    parser = _Links()
    parser.feed(body)
    base_path = urllib.parse.urlsplit(base).path
    names = set()
    for href in parser.hrefs:
        target = urllib.parse.urlsplit(urllib.parse.urljoin(base, href))
        if not target.path.startswith(base_path):
            continue
        rest = urllib.parse.unquote(target.path[len(base_path) :])
        if rest and "/" not in rest:
            names.add(rest)
    return sorted(names, key=_natural_key)


def parse_md5_list(text: str) -> dict[str, str]:
    """``{file name: md5}`` from ``md5sum`` output: ``<md5>  <name>`` (or ``./<name>``)."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            continue
        name = parts[1].strip().lstrip("*")
        name = name.removeprefix("./")
        sums[name] = parts[0].lower()
    return sums


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _gzip_problem(path: Path) -> str | None:
    """None if ``path`` decompresses completely as gzip, else what is wrong with it."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(_CHUNK_BYTES):
                pass
    except (OSError, EOFError, zlib.error) as err:
        return f"corrupt or truncated gzip data ({err})"
    return None


@dataclass
class _Job:
    """One file to fetch: ``url`` to ``dest``, checked against ``md5`` when known."""

    kingdom: str
    name: str
    url: str
    dest: Path
    md5: str | None

    @property
    def label(self) -> str:
        return f"{self.kingdom}/{self.name}"

    def problem(self, path: Path) -> str | None:
        """None if ``path`` verifies (md5, else gzip decode), else what is wrong."""
        if self.md5 is not None:
            actual = file_md5(path)
            if actual != self.md5:
                return f"md5 mismatch: expected {self.md5}, got {actual}"
            return None
        if self.name.endswith(".gz"):
            return _gzip_problem(path)
        return None  # no checksum and not gzip: nothing to check

    @property
    def check(self) -> str:
        if self.md5 is not None:
            return "md5 ok"
        if self.name.endswith(".gz"):
            return "gzip ok, no checksum available"
        return "not verified, no checksum available"


def _fetch(url: str, part: Path, timeout: float, max_bytes: int | None = None) -> int:
    """Append the rest of ``url`` to ``part`` (a ``Range`` request when it exists); bytes read.

    A server answering 200 to a Range request sends the whole file: ``part`` restarts from 0.
    A 416 (the part is at least as long as the file) restarts from 0 too. A file that grows
    past ``max_bytes`` is refused (DownloadError) and its part deleted.
    """
    max_bytes = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = open_url(_request(url, headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            part.unlink()
            return _fetch(url, part, timeout, max_bytes)
        raise
    with resp:
        mode = "wb"
        if offset and resp.status == 206:
            match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if match and int(match.group(1)) != offset:
                part.unlink()
                raise _IncompleteDownload(
                    f"asked for bytes from {offset}, got {resp.headers['Content-Range']}"
                )
            mode = "ab"
        expected = resp.headers.get("Content-Length")
        start = offset if mode == "ab" else 0
        if expected is not None and start + int(expected) > max_bytes:
            part.unlink(missing_ok=True)
            raise _too_big(url, start + int(expected), max_bytes)
        read = 0
        with open(part, mode) as fh:
            while chunk := resp.read(_CHUNK_BYTES):
                fh.write(chunk)
                read += len(chunk)
                if start + read > max_bytes:
                    fh.close()
                    part.unlink(missing_ok=True)
                    raise _too_big(url, start + read, max_bytes)
    if expected is not None and read != int(expected):
        raise _IncompleteDownload(f"connection closed after {read} of {expected} bytes")
    return read


def _too_big(url: str, size: int, max_bytes: int) -> DownloadError:
    return DownloadError(
        f"{url}: over {max_bytes / 2**30:.0f} GiB ({size:,} bytes so far); refused as larger "
        "than any genome file should be"
    )


def download_file(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    timeout: float = 60,
    retries: int = 3,
    log: Log = print,
) -> Path:
    """Fetch ``url`` to ``dest`` as the RefSeq downloader does: resumable ``.part``, bounded
    timeouts, retries with backoff, at most ``MAX_DOWNLOAD_BYTES``, bounded redirects, and
    verified (``md5`` when given, else a ``.gz`` must decompress whole) before the rename."""
    dest = Path(dest)
    _download(_Job("download", dest.name, url, dest, md5), timeout, retries, log)
    return dest


def _download(job: _Job, timeout: float, retries: int, log: Log) -> tuple[int, bool]:
    """Fetch, verify and rename one file; (bytes fetched, skipped because already complete)."""
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    if job.dest.exists():
        problem = job.problem(job.dest)
        if problem is None:
            return 0, True
        log(f"{job.label}: the existing file fails verification ({problem}); downloading again")
        job.dest.unlink()
    part = job.dest.with_name(job.dest.name + ".part")
    start = time.monotonic()
    fetched = last = 0
    for attempt in range(retries + 1):
        try:
            last = _fetch(job.url, part, timeout)
            fetched += last
        except Exception as err:
            if not _transient(err) or attempt == retries:
                raise DownloadError(f"{job.label}: download failed ({job.url}): {err}") from err
            delay = _BACKOFF_S * 2**attempt
            log(f"{job.label}: {err}; retry {attempt + 1}/{retries} in {delay:.1f} s")
            time.sleep(delay)
            continue
        problem = job.problem(part)
        if problem is None:
            break
        part.unlink()
        if attempt == retries:
            raise ChecksumError(f"{job.label}: {problem} ({job.url}); the download was deleted")
        log(f"{job.label}: {problem}; downloading again ({attempt + 1}/{retries})")
    os.replace(part, job.dest)
    seconds = max(time.monotonic() - start, 1e-6)
    size = job.dest.stat().st_size
    resumed = size - last  # where the successful request started
    resume = f", resumed at {resumed / 1e6:.2f} MB" if resumed else ""
    log(
        f"{job.label}: {size / 1e6:.2f} MB in {seconds:.1f} s, {fetched / 1e6 / seconds:.1f} MB/s "
        f"({job.check}{resume})"
    )
    return fetched, False


def download_refseq(
    kingdoms: list[str],
    out: str | Path,
    *,
    base_url: str = REFSEQ_BASE_URL,
    jobs: int = 4,
    max_files: int | None = None,
    pattern: str = r"\.genomic\.fna\.gz$",
    log: Log = print,
    timeout: float = 60,
    retries: int = 3,
) -> list[Path]:
    """Download RefSeq release files of ``kingdoms`` to ``<out>/<kingdom>/<name>``.

    Lists ``<base_url>/<kingdom>/`` (an HTML index) and takes the files matching ``pattern``
    (the first ``max_files`` in natural order, when given). Files are written to ``<name>.part``,
    resumed with a ``Range`` request after an interruption, verified, then renamed; a final
    file that verifies is not fetched again. Verification uses the directory's
    ``md5checksums.txt`` when it has one, else decodes the whole gzip stream (NCBI's kingdom
    folders have no md5 list; their checksums are in ``release-catalog/``). At most ``jobs``
    files download at once; network errors are retried ``retries`` times with exponential
    backoff (timeout: seconds per connection/read). ``kingdom_folders(out, refseq=True)`` reads
    the result. Returns the files, sorted by kingdom and name; raises DownloadError (a
    ChecksumError for a wrong md5) naming the failed files after the others finish.
    """
    if not kingdoms:
        raise ValueError(
            f"no kingdoms given; the RefSeq kingdoms are: {', '.join(REFSEQ_KINGDOMS)}"
        )
    for kingdom in kingdoms:
        _check_kingdom(kingdom, base_url, refseq=True)
    if jobs < 1 or retries < 0 or (max_files is not None and max_files < 1):
        raise ValueError(
            f"need jobs >= 1, retries >= 0, max_files >= 1; got {jobs}, {retries}, {max_files}"
        )
    regex = re.compile(pattern)
    out = Path(out)
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            log(message)

    started = time.monotonic()
    todo: list[_Job] = []
    for kingdom in sorted(set(kingdoms)):
        folder_url = f"{base_url.rstrip('/')}/{kingdom}/"
        names = _with_retries(
            folder_url, lambda u=folder_url: list_directory(u, timeout=timeout), retries, say
        )
        matched = [name for name in names if regex.search(name)]
        if not matched:
            raise DownloadError(f"{folder_url}: no file matches {pattern!r} ({len(names)} listed)")
        picked = matched[:max_files] if max_files is not None else matched
        sums: dict[str, str] = {}
        if MD5_LIST in names:
            md5_url = folder_url + MD5_LIST

            def read_md5(url: str = md5_url) -> str:
                with open_url(_request(url), timeout=timeout) as resp:
                    return resp.read().decode("utf-8", errors="replace")

            sums = parse_md5_list(_with_retries(md5_url, read_md5, retries, say))
            unlisted = [name for name in picked if name not in sums]
            if unlisted:
                say(f"{kingdom}: {len(unlisted)} files not in {MD5_LIST}; checking their gzip data")
        else:
            say(
                f"{kingdom}: no {MD5_LIST} at {folder_url}: no checksum available, each file's "
                "gzip data is decoded in full instead"
            )
        say(f"{kingdom}: {len(picked)} of {len(matched)} files matching {pattern!r}")
        for name in picked:
            todo.append(
                _Job(
                    kingdom,
                    name,
                    folder_url + urllib.parse.quote(name),
                    out / kingdom / name,
                    sums.get(name),
                )
            )

    fetched = skipped = 0
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="refseq") as pool:
        futures: list[Future[tuple[int, bool]]] = [
            pool.submit(_download, job, timeout, retries, say) for job in todo
        ]
        for job, future in zip(todo, futures, strict=True):
            try:
                nbytes, was_complete = future.result()
            except Exception as err:
                errors.append(err)
                say(f"{job.label}: FAILED: {err}")
                continue
            fetched += nbytes
            if was_complete:
                skipped += 1
                say(f"{job.label}: already complete, skipped")
    seconds = max(time.monotonic() - started, 1e-6)
    say(
        f"RefSeq download to {out}: {len(todo) - len(errors)}/{len(todo)} files ok "
        f"({len(todo) - len(errors) - skipped} downloaded, {skipped} already complete, "
        f"{len(errors)} failed), {fetched / 1e6:.1f} MB in {seconds:.1f} s "
        f"({fetched / 1e6 / seconds:.1f} MB/s)"
    )
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kind = ChecksumError if all(isinstance(e, ChecksumError) for e in errors) else DownloadError
        raise kind(f"{len(errors)} files failed:\n" + "\n".join(str(e) for e in errors))
    return sorted((job.dest for job in todo), key=lambda p: (p.parent.name, _natural_key(p.name)))


# --------------------------------------------------------------------------- tables


@dataclass
class _TablePart:
    """One readable piece of a table source: a parquet file or a ``datasets.Dataset``.

    batches(columns) yields pyarrow RecordBatches/Tables of at most ``_BATCH_ROWS`` rows.
    """

    label: str
    columns: list[str]
    batches: Callable[[list[str]], Iterator[Any]]


def _parquet_part(path: Path) -> _TablePart:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)

    def batches(columns: list[str]) -> Iterator[Any]:
        return file.iter_batches(batch_size=_BATCH_ROWS, columns=columns)

    return _TablePart(str(path), list(file.schema_arrow.names), batches)


def _dataset_parts(dataset: Any, label: str, split: str) -> list[_TablePart]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{label}: no split {split!r}; the splits are: {', '.join(dataset)}")
        dataset = dataset[split]
        label = f"{label}[{split}]"

    def batches(columns: list[str]) -> Iterator[Any]:
        chosen = dataset.select_columns(columns).with_format("arrow")
        return chosen.iter(batch_size=_BATCH_ROWS)

    return [_TablePart(label, list(dataset.column_names), batches)]


def _table_parts(source: str | Path, split: str) -> list[_TablePart]:
    """The readable pieces of ``source`` (see ``import_table``)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            return [_parquet_part(path)]
        if path.suffix == ".arrow":
            import datasets

            return _dataset_parts(datasets.Dataset.from_file(str(path)), str(path), split)
        raise ValueError(f"{path}: not a parquet (.parquet) or Arrow (.arrow) file")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            import datasets

            return _dataset_parts(datasets.load_from_disk(str(path)), str(path), split)
        files = sorted(
            p
            for p in path.rglob("*.parquet")
            if not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(
                f"{path}: no *.parquet files and not a datasets.save_to_disk folder (no state.json "
                "or dataset_dict.json)"
            )
        return [_parquet_part(p) for p in files]
    text = str(source)
    if (
        isinstance(source, Path)
        or text.startswith(("/", ".", "~"))
        or path.suffix in (".parquet", ".arrow")
    ):
        raise FileNotFoundError(f"{source}: no such file or folder")
    import datasets

    return _dataset_parts(datasets.load_dataset(text, split=split), text, split)


def _bad_character(value: str | bytes) -> tuple[int, str]:
    """(position, description) of the first invalid base of ``value``."""
    for pos, item in enumerate(value):
        code = item if isinstance(item, int) else ord(item)
        if code in _WHITESPACE:
            continue
        if code > 255 or NORMALISE[code] == _INVALID:
            char = chr(code) if isinstance(item, str) else bytes([code]).decode("latin-1")
            hexa = f"U+{code:04X}" if isinstance(item, str) else f"0x{code:02x}"
            return pos, f"{char!r} ({hexa})"
    raise AssertionError("no invalid character")


def _normalised(value: str | bytes) -> bytes | None:
    """Upper-case ACGTN bytes of a table cell, without whitespace; None if a byte is invalid."""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    seq = raw.translate(NORMALISE, _WHITESPACE)
    return None if _INVALID in seq else seq


class _FastaWriters:
    """One FASTA file per kingdom, written under a hidden temporary name, renamed by ``commit``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: dict[str, Any] = {}
        self.temps: dict[str, Path] = {}
        self.records: dict[str, int] = {}
        self.bases: dict[str, int] = {}

    def write(self, kingdom: str, ident: str, seq: bytes) -> None:
        if kingdom not in self.files:
            temp = self.out_dir / f".{kingdom}.fa.{os.getpid()}.tmp"
            self.temps[kingdom] = temp
            self.files[kingdom] = open(temp, "wb")  # noqa: SIM115 (closed by commit/abort)
            self.records[kingdom] = self.bases[kingdom] = 0
        fh = self.files[kingdom]
        fh.write(b">" + ident.encode("utf-8") + b"\n")
        for start in range(0, len(seq), _LINE_BASES):
            fh.write(seq[start : start + _LINE_BASES])
            fh.write(b"\n")
        self.records[kingdom] += 1
        self.bases[kingdom] += len(seq)

    def commit(self) -> dict[str, Path]:
        done = {}
        for kingdom in sorted(self.files):
            self.files[kingdom].close()
            final = self.out_dir / f"{kingdom}.fa"
            os.replace(self.temps[kingdom], final)
            done[kingdom] = final
        return done

    def abort(self) -> None:
        for kingdom, fh in self.files.items():
            fh.close()
            self.temps[kingdom].unlink(missing_ok=True)


def _string_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    checks = [
        pa.types.is_string,
        pa.types.is_large_string,
        pa.types.is_binary,
        pa.types.is_large_binary,
        pa.types.is_null,
    ]
    for name in ("is_string_view", "is_binary_view"):
        if hasattr(pa.types, name):
            checks.append(getattr(pa.types, name))
    return any(check(arrow_type) for check in checks)


def import_table(
    source: str | Path,
    out_dir: str | Path,
    *,
    sequence_column: str = "sequence",
    id_column: str = "id",
    kingdom_column: str | None = "kingdom",
    kingdom: str | None = None,
    split: str = "train",
    log: Log = print,
) -> list[SourceFile]:
    """Write the sequences of a table as ``<out_dir>/<kingdom>.fa`` FASTA files (one per kingdom).

    ``source``: a ``.parquet`` file or a folder of them (streamed with pyarrow, ``_BATCH_ROWS``
    rows at a time), an ``.arrow`` file or a ``datasets.save_to_disk`` folder (``split`` picks
    from a DatasetDict), else a Hugging Face Hub dataset name (``datasets.load_dataset``).
    Each row is one record: ``>id`` (whitespace in ids becomes ``_``), then its bases normalised
    as the genome readers do, 80 per line. The kingdom is ``kingdom`` for every row when given,
    else the row's ``kingdom_column``. Rows with empty sequences are skipped (and counted in the
    log); an invalid base raises a SequenceFormatError naming the source, the row (0-based), the
    id and the character. Files appear only when the whole table is read (atomic rename).
    Returns the written files as SourceFiles, sorted by kingdom.
    """
    if kingdom is None and kingdom_column is None:
        raise ValueError(
            "import_table needs kingdom_column (a column naming each row's kingdom) or kingdom "
            "(one kingdom for every row)"
        )
    if kingdom is not None:
        _check_kingdom(kingdom, source)
    out_dir = Path(out_dir)
    parts = _table_parts(source, split)
    wanted = [sequence_column, id_column]
    if kingdom is None:
        wanted.append(str(kingdom_column))
    for part in parts:
        for column in wanted:
            if column not in part.columns:
                raise ValueError(
                    f"{part.label}: no column {column!r}; the columns are: "
                    f"{', '.join(part.columns)}"
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = _FastaWriters(out_dir)
    empty = 0
    valid_kingdoms: set[str] = set()
    try:
        for part in parts:
            row = 0
            for batch in part.batches(list(dict.fromkeys(wanted))):
                seq_type = batch.schema.field(sequence_column).type
                if not _string_type(seq_type):
                    raise ValueError(
                        f"{part.label}: column {sequence_column!r} has type {seq_type}; expected "
                        "strings or bytes"
                    )
                seqs = batch.column(sequence_column)
                ids = batch.column(id_column).to_pylist()
                if kingdom is None:
                    kingdoms = batch.column(str(kingdom_column)).to_pylist()
                for i, ident in enumerate(ids):
                    value = seqs[i].as_py()
                    where = f"row {row} (0-based)"
                    if ident is None or not str(ident).strip():
                        raise ValueError(f"{part.label}: {where}: empty id in column {id_column!r}")
                    ident = re.sub(r"\s+", "_", str(ident).strip())
                    name = kingdom if kingdom is not None else kingdoms[i]
                    if name not in valid_kingdoms:
                        _check_kingdom(name, f"{part.label}: {where} (id {ident!r})")
                        valid_kingdoms.add(name)
                    if not value:
                        empty += 1
                    else:
                        seq = _normalised(value)
                        if seq is None:
                            pos, char = _bad_character(value)
                            raise SequenceFormatError(
                                part.label,
                                None,
                                f"{where}, id {ident!r}: invalid character {char} at position "
                                f"{pos} of column {sequence_column!r}; valid: {VALID_BASES}",
                            )
                        if seq:
                            writers.write(name, ident, seq)
                        else:
                            empty += 1
                    row += 1
        if not writers.files:
            raise ValueError(f"{source}: no non-empty sequences in column {sequence_column!r}")
        written = writers.commit()
    except BaseException:
        writers.abort()
        raise
    if empty:
        log(f"{source}: skipped {empty} rows with an empty sequence")
    for name, path in written.items():
        log(
            f"{name}: {writers.records[name]} records, {writers.bases[name] / 1e6:.2f} Mb -> {path}"
        )
    return [SourceFile(path, name) for name, path in written.items()]
