# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Streaming, single-pass download of a signed, bzip2-compressed disk image.

Every chunk of the compressed body goes, as it arrives, to ``gpg --verify SIG -`` and to a
decompressor (``lbzip2 -d`` when present so several cores work, else Python's bz2) whose output
is written sparse to a temporary file beside the destination. The file is renamed into place only
when gpg reports a good signature by the expected key, decompression ended cleanly and the GPT
has its ROOT partition. Transient network errors restart the stream (bounded retries)."""

from __future__ import annotations

import bz2
import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, human_bytes, no_log, which
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import fsync_dir
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import GptError, root_partition
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import Keyring
from ansible_collections.modulus.kmods.plugins.module_utils.transfer import (
    CHUNK,
    FetchError,
    NotFound,
    Progress,
    Response,
    TransientError,
    check_length,
    fetch_small,
    open_url,
    partial_prefix,
    sweep_partials,
    with_retries,
)

SPARSE_BLOCK = 4096
MAX_SIG_BYTES = 1 << 20
TEMPLATE_FIELDS = ("channel", "board", "version", "arch", "group")
F_SETPIPE_SZ = 1031


class SignatureError(FetchError):
    """The signature did not verify: never retried, nothing cached. ``keywords``: gpg's status
    keywords that made it fail (e.g. ``EXPKEYSIG``), when known."""

    def __init__(self, message: str, keywords: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keywords = keywords


# Called with the reason when the key that made the signature has expired: fetch a newer copy of
# the pinned key and merge it into the keyring, or raise SignatureError saying why not.
KeyRefresh = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# URLs


def render_template(option: str, template: str, fields: dict[str, str]) -> str:
    """Fill {channel} {board} {version} {arch} {group} in a base URL template; name the option on error."""
    try:
        url = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
        raise ValueError(f"{option}={template!r} uses an unknown or malformed placeholder ({exc}); known: {known}") from exc
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"{option}={template!r} gives {url!r}: only https://, http:// and file:// URLs are supported")
    return url.rstrip("/")


def join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(name)


@dataclass
class Candidate:
    option: str
    base: str

    def url(self, name: str) -> str:
        return join_url(self.base, name)


def candidate_bases(url_template: str, mirrors: list[str], fallback_url_template: Optional[str],
                    fields: dict[str, str]) -> list[Candidate]:
    """Where to look, in order: the main template, each mirror, then the fallback (used on 404)."""
    out = [Candidate("url_template", render_template("url_template", url_template, fields))]
    for index, mirror in enumerate(mirrors or []):
        out.append(Candidate(f"mirrors[{index}]", render_template(f"mirrors[{index}]", mirror, fields)))
    if fallback_url_template:
        out.append(Candidate("fallback_url_template",
                             render_template("fallback_url_template", fallback_url_template, fields)))
    seen = set()
    unique = []
    for cand in out:
        if cand.base not in seen:
            seen.add(cand.base)
            unique.append(cand)
    return unique


# --------------------------------------------------------------------------------------------
# sparse writing and decompression


class SparseWriter:
    """Write a stream to a file descriptor, seeking over all-zero blocks; finish() sets the size."""

    def __init__(self, fd: int, block: int = SPARSE_BLOCK) -> None:
        self.fd = fd
        self.block = block
        self.pos = 0
        self.written = 0
        self._zero_block = bytes(block)
        self._zero_chunk = b""

    def write(self, data: bytes) -> None:
        size = len(data)
        if not size:
            return
        if len(self._zero_chunk) != size:
            self._zero_chunk = bytes(size)
        if data == self._zero_chunk:
            self.pos += size
            return
        view = memoryview(data)
        block = self.block
        zero = self._zero_block
        start = None  # start of a run of non-zero blocks
        offset = 0
        while offset < size:
            end = min(offset + block, size)
            piece = data[offset:end]
            is_zero = piece == zero if end - offset == block else not piece.strip(b"\0")
            if is_zero:
                if start is not None:
                    self._pwrite(view[start:offset], self.pos + start)
                    start = None
            elif start is None:
                start = offset
            offset = end
        if start is not None:
            self._pwrite(view[start:size], self.pos + start)
        self.pos += size

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while len(view):
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done
            self.written += done

    def finish(self) -> None:
        os.ftruncate(self.fd, self.pos)


class DecompressError(FetchError):
    """The compressed stream is corrupt or was cut short."""


class _Decompressor:
    name = "?"

    def feed(self, chunk: bytes) -> None:
        raise NotImplementedError

    def finish(self, timeout: float) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class LbzipDecompressor(_Decompressor):
    """``lbzip2 -d`` (all cores) in a subprocess; a thread drains its output into the writer."""

    name = "lbzip2"

    def __init__(self, writer: SparseWriter, binary: str) -> None:
        self.writer = writer
        self.error: Optional[BaseException] = None
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finish()/abort()
        # a process group of its own: abort() kills it whole, and a SIGKILL of the module leaves it
        # reading EOF on its input, so it ends by itself
        self.proc = subprocess.Popen([binary, "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, bufsize=0, start_new_session=True)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, CHUNK)
        self.thread = threading.Thread(target=self._drain, name="modulus-decompress-writer", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        fd = self.proc.stdout.fileno()
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                self.writer.write(data)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
            with contextlib.suppress(OSError):
                self.proc.kill()

    def feed(self, chunk: bytes) -> None:
        try:
            self.proc.stdin.write(chunk)
        except (BrokenPipeError, ValueError) as exc:
            raise self._failure("lbzip2 stopped reading its input") from exc

    def _failure(self, what: str) -> BaseException:
        if self.error is not None:
            if isinstance(self.error, OSError) and self.error.errno == errno.ENOSPC:
                return FetchError(f"no space left writing the image: {self.error}")
            return FetchError(f"writing the decompressed image failed: {self.error}")
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace").strip()
        return DecompressError("{}: {}".format(what, text or "no message"))

    def finish(self, timeout: float) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.abort()
            raise DecompressError(f"lbzip2 did not finish within {timeout:.0f} s") from exc
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise DecompressError("the image writer did not finish")
        if rc != 0 or self.error is not None:
            raise self._failure(f"lbzip2 -d failed (rc={rc})")
        self.proc.stdout.close()
        self.stderr.close()

    def abort(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        self.proc.wait()
        self.thread.join(30)
        self.stderr.close()


class PyBz2Decompressor(_Decompressor):
    """Python's bz2 (one core) in a thread, multi-stream aware, fed through a bounded queue."""

    name = "python-bz2"
    OUT_LIMIT = 4 << 20

    def __init__(self, writer: SparseWriter) -> None:
        self.writer = writer
        self.error: Optional[BaseException] = None
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.dec = bz2.BZ2Decompressor()
        self.in_stream = False  # bytes of a stream consumed, its end-of-stream marker not yet seen
        self.streams = 0
        self.thread = threading.Thread(target=self._run, name="modulus-bz2", daemon=True)
        self.thread.start()

    def _decompress(self, data: bytes) -> None:
        while True:
            if data:
                self.in_stream = True
            out = self.dec.decompress(data, self.OUT_LIMIT)
            data = b""
            if out:
                self.writer.write(out)
            if self.dec.eof is True:
                rest = self.dec.unused_data
                self.dec = bz2.BZ2Decompressor()
                self.in_stream = False
                self.streams += 1
                if not rest:
                    return
                data = rest
                continue
            if self.dec.needs_input is True:
                return

    def _run(self) -> None:
        while True:
            chunk = self.queue.get()
            if chunk is None:
                return
            if self.error is not None:
                continue
            try:
                self._decompress(chunk)
            except BaseException as exc:  # noqa: BLE001 - reported by feed()/finish()
                self.error = exc

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            raise DecompressError(f"bz2 decompression failed: {self.error}")
        self.queue.put(chunk)

    def finish(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise DecompressError(f"bz2 decompression did not finish within {timeout:.0f} s")
        if self.error is not None:
            if isinstance(self.error, OSError) and self.error.errno == errno.ENOSPC:
                raise FetchError(f"no space left writing the image: {self.error}")
            raise DecompressError(f"bz2 decompression failed: {self.error}")
        if self.in_stream or not self.streams:
            raise DecompressError("the bzip2 stream ended before its end-of-stream marker (truncated)")

    def abort(self) -> None:
        self.error = self.error or DecompressError("aborted")
        while True:
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.queue.get_nowait()
        self.thread.join(30)


def make_decompressor(writer: SparseWriter, which_one: str = "auto") -> _Decompressor:
    if which_one not in ("auto", "lbzip2", "python"):
        raise ValueError(f"decompressor={which_one!r} is not one of auto, lbzip2, python")
    if which_one in ("auto", "lbzip2"):
        binary = which("lbzip2")
        if binary:
            return LbzipDecompressor(writer, binary)
        if which_one == "lbzip2":
            raise FetchError("decompressor=lbzip2 but lbzip2 is not installed")
    return PyBz2Decompressor(writer)


# --------------------------------------------------------------------------------------------
# the single pass


@dataclass
class FetchResult:
    url: str
    sig_url: str
    source: str
    compressed_size: int
    compressed_sha256: str
    image_size: int
    disk_used: int
    duration: float
    signing_fingerprint: Optional[str]
    primary_fingerprint: Optional[str]
    attempts: int
    decompressor: str
    tried: list[str] = field(default_factory=list)


def check_free_space(directory: str, needed: int) -> int:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise FetchError(f"not enough free space in {directory}: {human_bytes(free)} available, {human_bytes(needed)} needed (raise min_free_space only if "
                         "you know the image is smaller)")
    return free


def remove_stale_partials(directory: str, name: str) -> list[str]:
    """Temporary files of killed earlier runs (``.partial-<name>.<pid>-*`` whose process is gone)."""
    return sweep_partials(directory, name)


def _image_extra(writer: SparseWriter) -> str:
    return f", image {human_bytes(writer.pos)} ({human_bytes(writer.written)} on disk)"


def _stream_once(image_url: str, sig_path: str, dest: str, keyring: Keyring, timeout: float, validate_certs: bool,
                 min_free_space: int, space_factor: float, decompressor: str, progress_interval: float,
                 log: LogFn, root_label: str) -> tuple[Response, int, str, str, SparseWriter, object]:
    """One attempt: returns (response, compressed bytes, sha256, decompressor name, writer, verify result)."""
    directory = os.path.dirname(dest)
    resp = open_url(image_url, timeout, validate_certs)
    fd = -1
    tmp = None
    verifier = None
    dec = None
    try:
        needed = max(min_free_space, int((resp.length or 0) * space_factor))
        check_free_space(directory, needed)
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(os.path.basename(dest)), dir=directory)
        writer = SparseWriter(fd)
        verifier = keyring.verifier(sig_path)
        dec = make_decompressor(writer, decompressor)
        digest = hashlib.sha256()
        progress = Progress(log, f"download {image_url}", resp.length, progress_interval)
        done = 0
        while True:
            chunk = resp.read(CHUNK)
            if not chunk:
                break
            done += len(chunk)
            verifier.feed(chunk)
            dec.feed(chunk)
            digest.update(chunk)
            progress.update(done, extra=_image_extra(writer))
        check_length(resp, done)
        if done == 0:
            raise TransientError(f"empty body from {image_url}")
        verdict = verifier.finish()
        verifier = None
        if not verdict.good:
            raise SignatureError("signature check of {} FAILED: {}{}".format(
                image_url, verdict.reason, (f" (gpg: {verdict.stderr.splitlines()[-1]})") if verdict.stderr else ""),
                tuple(line.split(" ", 1)[0] for line in verdict.status))
        dec.finish(timeout=max(timeout, 600.0))
        name = dec.name
        dec = None
        writer.finish()
        os.fsync(fd)
        progress.update(done, force=True, extra=_image_extra(writer))
        try:
            root_partition(tmp, root_label)
        except GptError as exc:
            raise FetchError(f"{image_url} is signed but its content is not a developer container: {exc}") from exc
        os.chmod(tmp, 0o644)
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
        tmp = None
        fsync_dir(directory)
        return resp, done, digest.hexdigest(), name, writer, verdict
    finally:
        if verifier is not None:
            verifier.abort()
        if dec is not None:
            dec.abort()
        if fd >= 0:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        resp.close()


class _Attempt:
    """One call = one streaming attempt (counted), for with_retries()."""

    def __init__(self, *args: object) -> None:
        self.args = args
        self.count = 0

    def __call__(self) -> tuple:
        self.count += 1
        return _stream_once(*self.args)  # type: ignore[arg-type]


def _check_key_expiry(keyring: Keyring, sig_path: str, image_url: str, refresh_key: Optional[KeyRefresh],
                      log: LogFn) -> bool:
    """Before downloading: if the key that made the signature has expired (gpg would report
    EXPKEYSIG), refresh the pinned key through ``refresh_key`` or fail. True when it refreshed."""
    expired = keyring.expired_signers(sig_path)
    if not expired:
        return False
    reason = keyring.describe_expired(expired)
    if refresh_key is None:
        raise SignatureError(f"signature check of {image_url} FAILED before downloading: {reason} "
                             "(gpg reports EXPKEYSIG): give a current copy of the key", ("EXPKEYSIG",))
    log(f"{reason}: refreshing the key")
    refresh_key(reason)
    still = keyring.expired_signers(sig_path)
    if still:
        raise SignatureError(f"signature check of {image_url} FAILED before downloading: the refreshed key does not "
                             f"extend it: {keyring.describe_expired(still)} (EXPKEYSIG)", ("EXPKEYSIG",))
    return True


def fetch_image(candidates: list[Candidate], image_name: str, dest: str, keyring: Keyring, timeout: float = 60.0,
                retries: int = 3, retry_delay: float = 2.0, validate_certs: bool = True,
                min_free_space: int = 0, space_factor: float = 4.0, decompressor: str = "auto",
                progress_interval: float = 5.0, log: LogFn = no_log, root_label: str = "ROOT",
                refresh_key: Optional[KeyRefresh] = None) -> FetchResult:
    """Download ``image_name`` (+ ``.sig``) from the first candidate that has it into ``dest``.

    404 on the signature or the image moves on to the next candidate; transient errors restart the
    stream up to ``retries`` times; a bad signature stops at once. Nothing is left at ``dest`` (nor
    any temporary file) unless everything verified. When the key that made the signature has
    expired, ``refresh_key`` is asked (once) for a newer copy of the pinned key before the download
    (or, if it expired during the download, before one more download); without it that fails.
    """
    directory = os.path.dirname(os.path.abspath(dest))
    os.makedirs(directory, exist_ok=True)
    remove_stale_partials(directory, os.path.basename(dest))
    started = time.monotonic()
    tried: list[str] = []
    refreshed = False
    for cand in candidates:
        sig_url = cand.url(image_name + ".sig")
        image_url = cand.url(image_name)
        try:
            sig = with_retries(lambda u=sig_url: fetch_small(u, timeout, validate_certs, MAX_SIG_BYTES), f"fetch {sig_url}",
                               retries, retry_delay, log)
        except NotFound as exc:
            tried.append(f"{sig_url} ({exc})")
            log(f"not found: {sig_url}; trying the next location")
            continue
        sig_path = os.path.join(keyring.home or directory, "image.sig")
        with open(sig_path, "wb") as handle:
            handle.write(sig)
        problem = keyring.precheck(sig_path)
        if problem:
            raise SignatureError(f"signature check of {image_url} FAILED before downloading: {problem} ({sig_url})")
        refreshed = _check_key_expiry(keyring, sig_path, image_url, None if refreshed else refresh_key, log) or refreshed
        attempt = _Attempt(image_url, sig_path, dest, keyring, timeout, validate_certs, min_free_space, space_factor,
                           decompressor, progress_interval, log, root_label)
        try:
            try:
                resp, size, sha, name, writer, verdict = with_retries(attempt, f"download {image_url}", retries,
                                                                      retry_delay, log)
            except SignatureError as exc:
                if "EXPKEYSIG" not in exc.keywords or refreshed or refresh_key is None:
                    raise
                # the key expired while the image streamed in: refresh it and download once more
                refreshed = _check_key_expiry(keyring, sig_path, image_url, refresh_key, log)
                if not refreshed:
                    raise
                resp, size, sha, name, writer, verdict = with_retries(attempt, f"download {image_url}", retries,
                                                                      retry_delay, log)
        except NotFound as exc:
            tried.append(f"{image_url} ({exc})")
            log(f"not found: {image_url}; trying the next location")
            continue
        st = os.stat(dest)
        log(f"verified {image_url} ({human_bytes(size)}, good signature by {verdict.primary_fingerprint}) -> {dest}")
        return FetchResult(url=image_url, sig_url=sig_url, source=cand.option, compressed_size=size,
                           compressed_sha256=sha, image_size=st.st_size, disk_used=st.st_blocks * 512,
                           duration=time.monotonic() - started, signing_fingerprint=verdict.signing_fingerprint,
                           primary_fingerprint=verdict.primary_fingerprint, attempts=attempt.count, decompressor=name,
                           tried=tried)
    raise NotFound("{} was found at none of: {}".format(image_name, "; ".join(tried)))
