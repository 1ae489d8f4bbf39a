# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_build sources: what a build is made from, and putting it where the container sees it.

Kinds: ``file`` (a local ``.run`` or tarball), ``url`` (http, https or file URL of the same, through
the project's one HTTP path, ``transfer.download_file``), ``dir`` (a local Kbuild tree) and ``git`` (a
clone at ``git_ref``). A source has an identity before anything is fetched (``source_identity``:
its sha256, tree hash, pinned checksum, URL or git ref), part of kmod_build's ``inputs_sha256``.

Also the two failures of kmod_build, shared by its parts: ``InputError`` (an option cannot be used;
no failure marker) and ``BuildError`` (the build or its check failed; a failure marker is written).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.parse
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils import fsutil, transfer
from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_GIT_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./+-]{0,199}")
DOWNLOAD_RETRIES = 3


# What failed, for kmod_build's failure memory. A deterministic failure (the same inputs fail the
# same way) is remembered in DEST.failed.json; a transient one (network, clone, timeout, disk
# full, killed) is reported only, so the next run tries again without force.
TRANSIENT_KINDS = ("download", "git", "timeout", "no_space", "killed")
FAILURE_TEXT = {
    "compile": "compile error",
    "missing_module": "an expected module was not built",
    "abi": "ABI mismatch (vermagic or symbol CRCs)",
    "source": "unusable source",
    "build": "the build failed its checks",
    "download": "download failed",
    "git": "git clone failed",
    "timeout": "the build timed out",
    "no_space": "no space left on the device",
    "killed": "the build was killed",
}


class BuildError(Exception):
    """A build or its verification failed; ``log_tail`` holds the end of the build log, ``kind``
    what failed (``FAILURE_TEXT``), ``errors`` the compiler's first error lines."""

    def __init__(self, msg: str, log_tail: str = "", log_path: Optional[str] = None, kind: str = "build",
                 errors: Optional[list[str]] = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.log_tail = log_tail
        self.log_path = log_path
        self.kind = kind if kind in FAILURE_TEXT else "build"
        self.errors = list(errors or [])
        self.marker: Optional[str] = None  # DEST.failed.json once remembered

    @property
    def remembered(self) -> bool:
        """Whether this failure is deterministic (the same inputs would fail again)."""
        return self.kind not in TRANSIENT_KINDS


class InputError(ValueError):
    """An option has a value that cannot be used; the message names the option and the value."""


# --------------------------------------------------------------------------- options


def validate_sha256(value: Optional[str]) -> Optional[str]:
    """A pinned checksum: 64 hex digits, optionally ``sha256:``-prefixed; None when not given."""
    if value is None or value == "":
        return None
    v = value.lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:"):]
    if not _SHA256_RE.fullmatch(v):
        raise InputError(f"checksum={value!r} is not a SHA-256 hex digest (64 hex digits, optional 'sha256:' prefix)")
    return v


def validate_git_ref(value: Optional[str]) -> Optional[str]:
    if value and not _GIT_REF_RE.fullmatch(value):
        raise InputError(f"git_ref={value!r} is not a branch, tag or commit name")
    return value or None


def validate_subdir(value: Optional[str]) -> str:
    """The directory inside a generic source that holds the Kbuild file ('' for the top)."""
    if not value:
        return ""
    if os.path.isabs(value) or ".." in value.split("/") or "\0" in value or "\n" in value:
        raise InputError(f"subdir={value!r} must be a relative path inside the source without '..'")
    return value.strip("/")


def source_kind(recipe: str, source: Optional[str], git_ref: Optional[str]) -> str:
    """``file``, ``url``, ``dir`` or ``git`` (recipe ``nvidia``: only ``file`` or ``url``)."""
    if not source:
        if recipe == "nvidia":
            return "url"
        raise InputError("source is required with recipe=generic (a directory, a tarball path or URL, or a git URL)")
    parsed = urllib.parse.urlparse(source)
    if git_ref or source.startswith("git+") or parsed.scheme in ("git", "ssh") or source.endswith(".git"):
        if recipe == "nvidia":
            raise InputError(f"source={source!r}: recipe=nvidia takes a .run file or URL, not git")
        return "git"
    if parsed.scheme in ("http", "https", "file"):
        return "url"
    if parsed.scheme:
        raise InputError(f"source={source!r}: unsupported URL scheme {parsed.scheme!r} (http, https, file, git)")
    if not os.path.isabs(source):
        raise InputError(f"source={source!r} must be an absolute path or a URL")
    if os.path.isdir(source):
        if recipe == "nvidia":
            raise InputError(f"source={source!r} is a directory; recipe=nvidia takes the .run file")
        return "dir"
    if os.path.isfile(source):
        if recipe == "generic" and not source.endswith(TARBALL_SUFFIXES):
            raise InputError("source={!r} is a file but not a tarball ({})".format(source, ", ".join(TARBALL_SUFFIXES)))
        return "file"
    raise InputError(f"source={source!r} does not exist")


def tree_sha256(root: str) -> str:
    """Content hash of a directory tree (paths, modes, file contents, symlink targets; not .git)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            h.update(rel.encode() + b"\0" + oct(st.st_mode & 0o777).encode() + b"\0")
            if stat.S_ISLNK(st.st_mode):
                h.update(b"L" + os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(fsutil.sha256_file(p).encode())
            h.update(b"\n")
    return h.hexdigest()


def source_identity(kind: str, source: str, checksum: Optional[str], git_ref: Optional[str]) -> str:
    """What names the source in ``inputs_sha256``; a local file must match a pinned ``checksum``."""
    if kind == "file":
        digest = fsutil.sha256_file(source)
        if checksum and digest != checksum:
            raise InputError(f"checksum={checksum} does not match source={source} (sha256 {digest})")
        return "sha256:" + digest
    if kind == "dir":
        return "tree:" + tree_sha256(source)
    if kind == "git":
        return "git:{}@{}".format(source, git_ref or "HEAD")
    return ("sha256:" + checksum) if checksum else "url:" + source


# --------------------------------------------------------------------------- fetching


def download(url: str, dest_path: str, timeout: float, validate_certs: bool = True, log: Optional[LogFn] = None,
             retries: int = DOWNLOAD_RETRIES) -> str:
    """``transfer.download_file`` (temp file + rename, retried on transient errors); returns the sha256."""
    log = log or no_log
    try:
        digest, size = transfer.download_file(url, dest_path, timeout, validate_certs, retries=retries, log=log)
    except (transfer.FetchError, OSError) as exc:
        raise BuildError(f"download of {url} failed: {exc}", kind="download") from exc
    log(f"downloaded {url} ({size} bytes)")
    return digest


def prepare_run(kind: str, source: str, in_dir: str, checksum: Optional[str], timeout: float,
                validate_certs: bool, log: LogFn) -> tuple[str, str]:
    """NVIDIA's ``.run`` at ``in_dir/driver.run`` (a hard link when the file is on the same
    filesystem: no 100+ MB copy). Returns (path, sha256)."""
    run_path = os.path.join(in_dir, "driver.run")
    if kind == "file":
        try:
            os.link(source, run_path)
            digest = fsutil.sha256_file(run_path)
        except OSError:
            digest = fsutil.copy_hashed(source, run_path, 0o644)[0]
    else:
        log(f"downloading {source}")
        digest = download(source, run_path, timeout, validate_certs, log)
    if checksum and digest != checksum:
        raise InputError(f"checksum={checksum} does not match the downloaded {source} (sha256 {digest})")
    with open(run_path, "rb") as f:
        head = f.read(2)
    if head != b"#!":
        raise BuildError(f"source {source} is not a self-extracting .run archive (no '#!' header)", kind="source")
    return run_path, digest


def _single_top_dir(path: str) -> str:
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(path, entries[0])):
        return os.path.join(path, entries[0])
    return path


def _git_clone(source: str, git_ref: Optional[str], src_root: str, timeout: float, log: LogFn) -> str:
    url = source[4:] if source.startswith("git+") else source
    git = shutil.which("git")
    if not git:
        raise BuildError(f"source={source} needs git on the host, and git was not found", kind="git")
    for cmd in ([git, "clone", "--quiet", "--no-checkout", url, src_root],
                [git, "-C", src_root, "checkout", "--quiet", git_ref or "HEAD"]):
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BuildError("{} timed out after {:.0f} s".format(" ".join(cmd[:3]), timeout), kind="git") from None
        if p.returncode:
            raise BuildError("{} failed: {}".format(" ".join(cmd[:3]), p.stdout.decode("utf-8", "replace")[-1000:]),
                             kind="git")
    head = subprocess.run([git, "-C", src_root, "rev-parse", "HEAD"], stdout=subprocess.PIPE, check=True)
    shutil.rmtree(os.path.join(src_root, ".git"), ignore_errors=True)
    log(f"git {url} at {head.stdout.decode().strip()}")
    return tree_sha256(src_root)


def prepare_tree(kind: str, source: str, identity: str, in_dir: str, work_dir: str, checksum: Optional[str],
                 git_ref: Optional[str], timeout: float, validate_certs: bool, log: LogFn) -> tuple[str, str]:
    """A generic source as a tree at ``work_dir/src``. Returns (path, sha256 of what is built:
    the tarball's sha256, or the tree hash of a directory or clone)."""
    src_root = os.path.join(work_dir, "src")
    if kind == "dir":
        shutil.copytree(source, src_root, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        return src_root, identity.split(":", 1)[1]
    if kind == "git":
        return src_root, _git_clone(source, git_ref, src_root, timeout, log)
    tarball = os.path.join(in_dir, "source.tarball")  # the compression is detected from the content
    if kind == "file":
        digest = fsutil.copy_hashed(source, tarball)[0]
    else:
        digest = download(source, tarball, timeout, validate_certs, log)
    if checksum and digest != checksum:
        raise InputError(f"checksum={checksum} does not match source={source} (sha256 {digest})")
    unpack = os.path.join(work_dir, "unpack")
    try:
        fsutil.extract_tar(tarball, unpack, keep_mtime=True)
    except fsutil.UnsafePathError as exc:
        raise BuildError(f"source tarball {source}: {exc}", kind="source") from None
    except tarfile.TarError as exc:
        raise BuildError(f"source={source} is not a readable tarball: {exc}", kind="source") from exc
    os.rename(_single_top_dir(unpack), src_root)
    return src_root, digest
