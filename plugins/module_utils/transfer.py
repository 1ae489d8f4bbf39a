# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one HTTP path: open an http(s):// or file:// URL, retry transient failures, fetch a small
body, or stream a file to disk (temp file beside the destination, sha256 while writing, rename)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Callable, Optional, TypeVar

from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import SSLValidationError
from ansible.module_utils.urls import open_url as ansible_open_url

from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, human_bytes, no_log
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import fsync_dir, pid_alive

CHUNK = 1 << 20
MAX_SMALL_BYTES = 1 << 20
PARTIAL_PREFIX = ".partial-"
USER_AGENT = "modulus.kmods-coreos_devcontainer"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PARTIAL_PID_RE = re.compile(r"\.([0-9]+)-[^.]+$")

T = TypeVar("T")


class FetchError(RuntimeError):
    """The download failed for good (nothing was kept)."""


class NotFound(FetchError):
    """The server answered 404/410 (or the file:// path does not exist)."""


class TransientError(FetchError):
    """Worth retrying: connection reset/refused, short read, timeout, 5xx."""


class ChecksumError(FetchError):
    """The body arrived whole but its sha256 is not the expected one: never retried, nothing kept."""


class Response:
    """A readable body with its length (None when unknown)."""

    def __init__(self, handle, length: Optional[int], url: str) -> None:
        self.handle = handle
        self.length = length
        self.url = url

    def read(self, size: int) -> bytes:
        try:
            return self.handle.read(size)
        except (socket.timeout, TimeoutError) as exc:
            raise TransientError(f"timed out reading {self.url}") from exc
        except (ConnectionError, HTTPException, OSError) as exc:
            raise TransientError(f"connection error reading {self.url}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail any way
            self.handle.close()


def open_url(url: str, timeout: float, validate_certs: bool = True) -> Response:
    """Open ``url`` for reading; failures become NotFound, TransientError or FetchError."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = urllib.request.url2pathname(parsed.path)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by Response.close()
        except FileNotFoundError as exc:
            raise NotFound(f"{url} does not exist") from exc
        except OSError as exc:
            raise FetchError(f"cannot open {url}: {exc}") from exc
        return Response(handle, os.fstat(handle.fileno()).st_size, url)
    try:
        handle = ansible_open_url(url, headers={"Accept-Encoding": "identity"}, http_agent=USER_AGENT,
                                  timeout=timeout, validate_certs=validate_certs, follow_redirects="safe")
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (404, 410):
            raise NotFound(f"{url}: HTTP {exc.code}") from exc
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise FetchError(f"{url}: TLS certificate verification failed: {exc.reason} (validate_certs)") from exc
        raise TransientError(f"{url}: {exc.reason}") from exc
    except SSLValidationError as exc:
        raise FetchError(f"{url}: TLS certificate verification failed: {exc} (validate_certs)") from exc
    except (socket.timeout, TimeoutError, ConnectionError, HTTPException, OSError, UrlsConnectionError) as exc:
        raise TransientError(f"{url}: {exc}") from exc
    length = handle.headers.get("Content-Length")
    try:
        size = int(length) if length is not None else None
    except ValueError:
        size = None
    return Response(handle, size, url)


def with_retries(action: Callable[[], T], what: str, retries: int, retry_delay: float, log: LogFn) -> T:
    """Run ``action()``; on TransientError retry up to ``retries`` times with a growing delay."""
    attempt = 0
    while True:
        try:
            return action()
        except TransientError as exc:
            if attempt >= retries:
                raise TransientError(f"{what} failed after {attempt + 1} attempt(s): {exc}") from exc
            delay = min(retry_delay * (2 ** attempt), 30.0)
            attempt += 1
            log(f"{what}: {exc}; retry {attempt}/{retries} in {delay:.1f} s")
            time.sleep(delay)


def fetch_small(url: str, timeout: float, validate_certs: bool = True, limit: int = MAX_SMALL_BYTES) -> bytes:
    """The whole body of a small file (a signature, a digest list); refuses more than ``limit`` bytes."""
    resp = open_url(url, timeout, validate_certs)
    try:
        if resp.length is not None and resp.length > limit:
            raise FetchError(f"{url} is {resp.length} bytes, more than the {limit} expected")
        data = b""
        while True:
            block = resp.read(65536)
            if not block:
                break
            data += block
            if len(data) > limit:
                raise FetchError(f"{url} is larger than the {limit} bytes expected")
        check_length(resp, len(data))
        return data
    finally:
        resp.close()


def check_length(resp: Response, got: int) -> None:
    """A body shorter (or longer) than its Content-Length was cut: worth another attempt."""
    if resp.length is not None and got != resp.length:
        raise TransientError(f"short read on {resp.url}: {got} of {resp.length} bytes")


class Progress:
    """Progress lines a person can follow: at most every ``interval`` seconds, or every ``step_pct``
    percent of a known total, whichever comes first; ``update(force=True)`` always logs."""

    def __init__(self, log: LogFn, label: str, total: Optional[int], interval: float,
                 step_pct: Optional[float] = None) -> None:
        self.log = log
        self.label = label
        self.total = total
        self.interval = interval
        self.step = total * step_pct / 100.0 if total and step_pct else None
        self.started = time.monotonic()
        self.last = self.started
        self.last_done = 0

    def update(self, done: int, force: bool = False, extra: str = "") -> None:
        now = time.monotonic()
        due = now - self.last >= self.interval or (self.step is not None and done - self.last_done >= self.step)
        if not (force or due):
            return
        self.last, self.last_done = now, done
        rate = done / max(now - self.started, 1e-6)
        pct = " %5.1f%%" % (100.0 * done / self.total) if self.total else ""
        of = f" of {human_bytes(self.total)}" if self.total else ""
        self.log(f"{self.label}:{pct} {human_bytes(done)}{of} at {human_bytes(rate)}/s{extra}")


def partial_prefix(name: str) -> str:
    """``.partial-<name>.<pid>-``: the temporary file of a download names its process, so a later
    run can tell the leftovers of a killed one (``sweep_partials``) from a live download."""
    return f"{PARTIAL_PREFIX}{name}.{os.getpid()}-"


def sweep_partials(directory: str, name: Optional[str] = None, every: bool = False) -> list[str]:
    """Remove ``.partial-<name>.<pid>-*`` files in ``directory`` whose process is gone (every
    ``.partial-*`` file with ``every``, for a caller holding the directory's exclusive lock; files of
    older releases without a PID count as dead). Returns what was removed."""
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    want = PARTIAL_PREFIX + (name + "." if name else "")
    for entry in names:
        if not entry.startswith(want):
            continue
        match = _PARTIAL_PID_RE.search(entry[len(PARTIAL_PREFIX):])
        if not every and match and pid_alive(int(match.group(1))):
            continue
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def _download_once(url: str, directory: str, prefix: str, timeout: float, validate_certs: bool,
                   log: LogFn) -> tuple[str, str, int]:
    """One attempt: (temporary file, sha256, size); the temporary file is removed on any failure."""
    resp = open_url(url, timeout, validate_certs)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = hashlib.sha256()
                progress = Progress(log, f"download {url}", resp.length, 30.0, step_pct=10.0)
                done = 0
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress.update(done)
                check_length(resp, done)
                out.flush()
                os.fsync(out.fileno())
            progress.update(done, force=True)
            return tmp, digest.hexdigest(), done
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        resp.close()


def download_file(url: str, dest_path: str, timeout: float, validate_certs: bool = True, retries: int = 3,
                  retry_delay: float = 2.0, log: LogFn = no_log,
                  expected_sha256: Optional[str] = None) -> tuple[str, int]:
    """Stream ``url`` (http, https or file) to ``dest_path``; return its (sha256, size).

    The body goes to a ``.partial-*`` file beside ``dest_path`` and is hashed while written;
    transient errors restart it (``retries`` times). With ``expected_sha256`` a different digest is
    refused (ChecksumError, nothing kept). The file is fsynced, made 0644 and renamed into place
    (the directory is created when missing).
    """
    expected = None
    if expected_sha256 is not None:
        expected = expected_sha256.strip().lower()
        if not _SHA256_RE.fullmatch(expected):
            raise ValueError(f"expected_sha256={expected_sha256!r} is not a sha256 hex digest (64 hex digits)")
    directory = os.path.dirname(os.path.abspath(dest_path))
    os.makedirs(directory, exist_ok=True)
    prefix = partial_prefix(os.path.basename(dest_path))
    tmp, sha, size = with_retries(lambda: _download_once(url, directory, prefix, timeout, validate_certs, log),
                                  f"download {url}", retries, retry_delay, log)
    try:
        if expected is not None and sha != expected:
            raise ChecksumError(f"sha256 mismatch for {url}: expected {expected}, got {sha} "
                                f"({human_bytes(size)}); the download was deleted")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return sha, size
