"""The one HTTP path against a real HTTP server on 127.0.0.1 (threads, no root): open_url error
classes, retries, small bodies and download_file (temp file, sha256, progress, rename)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import transfer as http


class Server:
    """Files by path, plus faults: a status for a path prefix, or a connection cut after N bytes.

    test_fetch.py uses it too (``from test_transfer import Server``)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.cuts: list[list] = []  # [path suffix, nbytes, times]
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.hits.append(self.path)
                for prefix, status in server.status.items():
                    if self.path.startswith(prefix):
                        self._empty(status)
                        return
                body = server.files.get(self.path)
                if body is None:
                    self._empty(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for cut in server.cuts:
                    if self.path.endswith(cut[0]) and cut[2] > 0:
                        cut[2] -= 1
                        self.wfile.write(body[:cut[1]])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                self.wfile.write(body)

            def _empty(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


BODY = os.urandom(3 << 20) + b"tail"
SHA = hashlib.sha256(BODY).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def download(url: str, dest: Path, **kwargs) -> tuple[str, int]:
    kwargs.setdefault("retry_delay", 0.01)
    return http.download_file(url, str(dest), 10, **kwargs)


# ------------------------------------------------------------------ download_file


def test_download_hashes_verifies_logs_and_renames(server: Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    logs: list[str] = []
    dest = tmp_path / "f.bin"
    assert download(server.base + "/f.bin", dest, log=logs.append, expected_sha256=SHA.upper()) == (SHA, len(BODY))
    assert dest.read_bytes() == BODY and dest.stat().st_mode & 0o777 == 0o644
    assert leftovers(tmp_path) == ["f.bin"]
    # every ~10 % (3 MiB in 1 MiB chunks: 33 %, 67 %, 100 %), and the last line at 100 %
    assert len(logs) >= 3 and all("/s" in line for line in logs)
    assert "100.0%" in logs[-1] and "3.0 MiB of 3.0 MiB" in logs[-1]


def test_download_replaces_an_existing_file(server: Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = b"new"
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old content")
    download(server.base + "/f.bin", dest)
    assert dest.read_bytes() == b"new" and leftovers(tmp_path) == ["f.bin"]


def test_checksum_mismatch_is_refused_deleted_and_not_retried(server: Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    wrong = "0" * 64
    with pytest.raises(http.ChecksumError) as err:
        download(server.base + "/f.bin", dest, expected_sha256=wrong)
    assert wrong in str(err.value) and SHA in str(err.value)
    assert isinstance(err.value, http.FetchError)
    assert leftovers(tmp_path) == [] and server.hits == ["/f.bin"]


def test_malformed_expected_sha256_fails_before_any_request(server: Server, tmp_path: Path) -> None:
    for bad in ("abc", SHA + "\n0", SHA[:-1] + "g"):
        with pytest.raises(ValueError, match="expected_sha256="):
            download(server.base + "/f.bin", tmp_path / "f.bin", expected_sha256=bad)
    assert server.hits == []


def test_404_is_not_found_at_once(server: Server, tmp_path: Path) -> None:
    with pytest.raises(http.NotFound, match="HTTP 404"):
        download(server.base + "/missing.bin", tmp_path / "f.bin")
    assert server.hits == ["/missing.bin"] and leftovers(tmp_path) == []


def test_connection_cut_is_retried(server: Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    server.cuts.append(["/f.bin", 100000, 2])
    logs: list[str] = []
    assert download(server.base + "/f.bin", tmp_path / "f.bin", retries=3, log=logs.append) == (SHA, len(BODY))
    assert len(server.hits) == 3 and any("retry 2/3" in line for line in logs)
    assert leftovers(tmp_path) == ["f.bin"]


def test_connection_cut_every_time_is_transient_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = BODY
    server.cuts.append(["/f.bin", 100000, 100])
    with pytest.raises(http.TransientError, match=r"after 3 attempt.*short read"):
        download(server.base + "/f.bin", tmp_path / "f.bin", retries=2)
    assert len(server.hits) == 3 and leftovers(tmp_path) == []


def test_server_error_is_transient(server: Server, tmp_path: Path) -> None:
    server.status["/f.bin"] = 503
    with pytest.raises(http.TransientError, match="HTTP 503"):
        download(server.base + "/f.bin", tmp_path / "f.bin", retries=1)
    assert len(server.hits) == 2


def test_file_urls(tmp_path: Path) -> None:
    src = tmp_path / "src" / "f.bin"
    src.parent.mkdir()
    src.write_bytes(BODY)
    out = tmp_path / "out"  # created by download_file
    assert download(src.as_uri(), out / "f.bin", expected_sha256=SHA) == (SHA, len(BODY))
    with pytest.raises(http.NotFound):
        download((tmp_path / "nope").as_uri(), out / "g.bin")
    assert leftovers(out) == ["f.bin"]


# ------------------------------------------------------------------ small bodies and retries


def test_fetch_small_limit(server: Server) -> None:
    server.files["/sig"] = b"x" * 100
    assert http.fetch_small(server.base + "/sig", 10) == b"x" * 100
    with pytest.raises(http.FetchError, match="more than the 99"):
        http.fetch_small(server.base + "/sig", 10, limit=99)


def test_with_retries_gives_up_after_retries_and_passes_other_errors() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise http.TransientError("reset")
        return "ok"

    assert http.with_retries(flaky, "x", 2, 0.0, lambda _m: None) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(http.TransientError, match="x failed after 2 attempt"):
        http.with_retries(flaky, "x", 1, 0.0, lambda _m: None)

    def missing() -> None:
        calls.append(1)
        raise http.NotFound("gone")

    calls.clear()
    with pytest.raises(http.NotFound):
        http.with_retries(missing, "x", 5, 0.0, lambda _m: None)
    assert len(calls) == 1
