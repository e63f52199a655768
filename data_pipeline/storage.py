"""Where files live: local paths or fsspec URLs (``s3://``, ``gs://``, ``https://``), one seam.

Inputs (``--sources``, ``--folder``, ``--refseq``), shard sets and the loader's shards may be
local paths or URLs. Everything that opens, lists or checks such a location goes through here,
so a new storage backend is one fsspec protocol away, and local paths keep plain ``open``.

Credentials come only from the standard environment of each backend (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` for S3, ``GOOGLE_APPLICATION_CREDENTIALS`` for
GCS, ...), never from a config file or a command line; ``redact`` removes any that a URL
carries before it is printed or logged.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: the package that implements each protocol, for the error when it is missing
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
             "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}  # fmt: skip
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a remote location (``scheme://...``, not ``file://``)."""
    match = _URL.match(str(path)) if isinstance(path, str) else None
    return match is not None and match.group(1).lower() != "file"


def local(path: str | Path) -> Path:
    """A local path (``file://`` stripped)."""
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(base: str | Path, *parts: str) -> str:
    """``base`` / ``parts``: a URL stays a URL (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    if is_url(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(local(base).joinpath(*parts))


def parent(path: str | Path) -> str:
    """The folder that holds ``path``."""
    if is_url(path):
        return posixpath.dirname(str(path).rstrip("/"))
    return str(local(path).parent)


def name(path: str | Path) -> str:
    """The last component of ``path``."""
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else local(path).name


def redact(text: str | Path) -> str:
    """``text`` without credentials a URL may carry (``user:secret@``, signed-URL queries)."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))
    return re.sub(r"([?&](?:X-Amz-[A-Za-z-]+|Signature|sig|token|key)=)[^&\s]+", r"\1***", text)


def filesystem(path: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; a missing backend is a one-line error."""
    import fsspec

    scheme = _URL.match(str(path)).group(1).lower()  # type: ignore[union-attr]
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as err:
        package = _BACKENDS.get(scheme)
        hint = f" (pip install {package})" if package else ""
        raise ValueError(f"{redact(path)}: cannot open {scheme}:// URLs{hint}: {err}") from None


def open_read(path: str | Path) -> IO[bytes]:
    """Open ``path`` for reading bytes (no decompression: see ``readers.open_binary``)."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, inner = filesystem(path)
    with _guard(path):
        return fs.open(inner, "rb")


def open_write(path: str | Path) -> IO[bytes]:
    """Open ``path`` for writing bytes, creating local parent folders (object stores have
    none). On an object store the object appears whole when the file is closed."""
    if not is_url(path):
        target = local(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "wb")
    fs, inner = filesystem(path)
    with _guard(path):
        return fs.open(inner, "wb")


def is_file(path: str | Path) -> bool:
    """Whether a file is at ``path``. For a URL, only "nothing there" is False: missing
    credentials or access denied raise (fsspec's ``isfile`` would answer False to them)."""
    if not is_url(path):
        return local(path).is_file()
    fs, inner = filesystem(path)
    try:
        with _guard(path):
            return fs.info(inner).get("type") == "file"
    except FileNotFoundError:
        return False


def exists(path: str | Path) -> bool:
    if not is_url(path):
        return local(path).exists()
    fs, inner = filesystem(path)
    with _guard(path):
        return bool(fs.exists(inner))


def size(path: str | Path) -> int:
    """Bytes in ``path``."""
    if not is_url(path):
        return local(path).stat().st_size
    fs, inner = filesystem(path)
    with _guard(path):
        return int(fs.size(inner))


def fingerprint(path: str | Path) -> str:
    """What changes when the file does: size and modification time (local), or size and the
    store's ETag / last-modified (URLs). Resumed builds redo an input whose fingerprint moved."""
    if not is_url(path):
        stat = local(path).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    fs, inner = filesystem(path)
    with _guard(path):
        info = fs.info(inner)
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return f"{info.get('size')}:{tag}"


def remove(path: str | Path) -> None:
    """Delete one file (nothing when it is not there)."""
    if not is_url(path):
        local(path).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    with _guard(path):
        if fs.exists(inner):
            fs.rm_file(inner)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, as URLs when ``pattern`` is one."""
    if not is_url(pattern):
        import glob as globbing

        return sorted(globbing.glob(pattern))
    fs, inner = filesystem(pattern)
    scheme = _URL.match(pattern).group(1)  # type: ignore[union-attr]
    with _guard(pattern):
        found = fs.glob(inner)
    return sorted(f if _URL.match(f) else f"{scheme}://{f}" for f in found)


def listdir(folder: str | Path) -> list[str]:
    """Names (not paths) of the entries of ``folder``, sorted."""
    if not is_url(folder):
        return sorted(os.listdir(local(folder)))
    fs, inner = filesystem(folder)
    with _guard(folder):
        found = fs.ls(inner, detail=False)
    return sorted(posixpath.basename(e.rstrip("/")) for e in found)


def isdir(path: str | Path) -> bool:
    if not is_url(path):
        return local(path).is_dir()
    fs, inner = filesystem(path)
    with _guard(path):
        return bool(fs.isdir(inner))


# --- failures: one line, credentials removed --------------------------------------------------


class StorageError(OSError, ValueError):
    """A remote location that cannot be read or written (credentials, permissions, network):
    one line naming it with its credentials removed. An OSError to code that handles failed
    reads (a shard is then a bad shard), a ValueError to the command line, which prints those
    as one line instead of a backend's traceback."""


class StorageNotFoundError(FileNotFoundError):
    """Nothing at a URL (no such object, folder or bucket): one line, credentials removed."""


#: where each backend takes its credentials from, for the error when it finds none
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL "
    "for a store other than AWS",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file)",
    "az": "AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME and _KEY)",
}
_CREDENTIALS.update(s3a=_CREDENTIALS["s3"], gcs=_CREDENTIALS["gs"], abfs=_CREDENTIALS["az"])
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "ClientAuthenticationError"}  # fmt: skip
_SECRET_QUERY = re.compile(r"^(?:X-Amz-[A-Za-z-]+|Signature|sig|token|key)$", re.IGNORECASE)


def _secrets(path: str | Path) -> list[str]:
    """The credentials written into URL ``path``: its userinfo and signed-query values."""
    if not is_url(path):
        return []
    parts = urllib.parse.urlsplit(str(path))
    found = [parts.password or parts.username or ""]
    found += [v for k, v in urllib.parse.parse_qsl(parts.query) if _SECRET_QUERY.match(k)]
    quoted = [urllib.parse.quote(s, safe="") for s in found]
    return sorted({s for s in found + quoted if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, *paths: str | Path) -> str:
    """``text`` (an error message) without any credential of ``paths``: ``redact``, and each
    secret removed wherever it appears (a backend may print a URL without its scheme)."""
    text = redact(text)
    for path in paths:
        for secret in _secrets(path):
            text = text.replace(secret, "***")
    return text


def failure(path: str | Path, err: BaseException) -> OSError:
    """The one-line error for ``err``, raised by a backend while it worked on ``path``."""
    if isinstance(err, (StorageError, StorageNotFoundError)):
        return err
    where = redact(path)
    scheme = str(path).split("://", 1)[0].lower()
    lines = str(err).strip().splitlines()
    text = scrub(lines[0][:300] if lines else "", path).strip("'\"")
    detail = f" ({text})" if text and text not in where else ""  # s3fs often repeats the path
    name = type(err).__name__
    hint = _CREDENTIALS.get(scheme, "the backend's usual environment variables")
    if name in _NO_CREDENTIALS:
        return StorageError(f"{where}: no credentials for {scheme}:// URLs; set {hint}")
    if isinstance(err, FileNotFoundError):
        return StorageNotFoundError(f"{where}: no such file, folder or bucket{detail}")
    if isinstance(err, PermissionError) or "AccessDenied" in name or "Forbidden" in str(err):
        return StorageError(f"{where}: access denied{detail}; check the credentials ({hint})")
    if isinstance(err, (ConnectionError, TimeoutError)) or "Connect" in name:
        endpoint = " and AWS_ENDPOINT_URL" if scheme in ("s3", "s3a") else ""
        return StorageError(f"{where}: cannot reach the store{detail}; check the network{endpoint}")
    return StorageError(f"{where}: {name}{detail}")


@contextlib.contextmanager
def _guard(path: str | Path) -> Iterator[None]:
    """Turn a backend's exception (botocore, aiohttp, ...) into ``failure``'s one line."""
    try:
        yield
    except Exception as err:
        raise failure(path, err) from None


# --- streaming reads --------------------------------------------------------------------------

#: bytes a remote stream fetches per request (S3's default, 50 MiB, times the shards a loader
#: keeps open, would hold gigabytes)
STREAM_BLOCK = 8 * 2**20


class _GuardedRaw(io.RawIOBase):
    """A backend's file whose read failures are ``failure``'s one-line errors."""

    def __init__(self, fh: Any, path: str | Path) -> None:
        super().__init__()
        self._fh, self._path = fh, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with _guard(self._path):
            return self._fh.readinto(buffer)

    def close(self) -> None:
        try:
            if not self.closed:
                self._fh.close()
        finally:
            super().close()


def _http(path: str | Path) -> bool:
    return str(path).split("://", 1)[0].lower() in ("http", "https")


def open_stream(path: str | Path) -> IO[bytes]:
    """Open ``path`` to read it front to back: a local file as ``open_read`` does; an
    ``http(s)://`` URL as one streamed GET (servers need not support ranges); another URL
    ``STREAM_BLOCK`` bytes per request. Buffered; a URL's failures (also mid-read) are
    one-line OSErrors naming it without credentials."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, inner = filesystem(path)
    with _guard(path):
        if _http(path):
            fh = fs.open(inner, "rb", block_size=0)
        else:
            fh = fs.open(inner, "rb", block_size=STREAM_BLOCK, cache_type="readahead")
    return io.BufferedReader(_GuardedRaw(fh, path), buffer_size=1 << 20)


def head(path: str | Path, nbytes: int) -> bytes:
    """The first ``nbytes`` bytes of ``path`` (fewer when it is shorter): for a URL, one
    small ranged request, or the start of a GET dropped once read (http), never a stream's
    first block."""
    if not is_url(path):
        with open(local(path), "rb") as fh:
            return fh.read(nbytes)
    if _http(path):
        with open_stream(path) as fh:
            return fh.read(nbytes)
    fs, inner = filesystem(path)
    with _guard(path):
        return bytes(fs.cat_file(inner, start=0, end=nbytes))[:nbytes]


def read_bytes(path: str | Path) -> bytes:
    """The whole of a small file (a manifest, a table of inputs)."""
    if not is_url(path):
        return local(path).read_bytes()
    fs, inner = filesystem(path)
    with _guard(path):
        return bytes(fs.cat_file(inner))


def find(folder: str | Path) -> list[str]:
    """Paths relative to ``folder`` (``/``-separated) of every file below it, sorted; a URL is
    listed with the store's own recursive listing (one request per 1000 objects on S3)."""
    if not is_url(folder):
        root = local(folder)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, inner = filesystem(folder)
    prefix = inner.rstrip("/") + "/"
    with _guard(folder):
        found = fs.find(inner)
    return sorted(f[len(prefix) :] for f in found if f.startswith(prefix))


def place(path: str | Path) -> str:
    """What identifies a location in duplicate checks: the resolved local path, or the URL."""
    return str(path) if is_url(path) else str(local(path).resolve())
