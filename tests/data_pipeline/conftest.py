"""Remote storage for the data-pipeline tests, on loopback only: an S3-compatible server (moto in
server mode) and a plain HTTP server over a temporary folder."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

#: the bucket ``s3_server`` creates
BUCKET = "bucket"
#: fake credentials ``s3_server`` puts in the environment (moto accepts any)
ACCESS_KEY, SECRET_KEY = "testing-access-key", "testing-secret-key"


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    """One moto S3 server on 127.0.0.1 for the session (a second to start); tests reset it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def forget_s3_clients() -> None:
    """Drop cached s3fs filesystems: a new one reads the environment again."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_server(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty S3 store with bucket ``BUCKET``; yields its endpoint URL. The environment holds
    fake credentials and AWS_ENDPOINT_URL, and nothing else of AWS (no profile, no instance
    metadata), as a user's shell would."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    request = urllib.request.Request(f"{_moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    forget_s3_clients()
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    yield _moto_endpoint
    forget_s3_clients()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that reads a file's first bytes and hangs up is no error


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    """Serves ``tmp_path / "http"`` (created empty; the test fills it) on 127.0.0.1; yields its
    base URL (``http://127.0.0.1:<port>``). Like many servers, it ignores Range requests."""
    folder = tmp_path / "http"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
