# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""File safety: the one place that hashes, writes atomically, stages, swaps and extracts.

- ``sha256_file`` / ``sha256_and_size``: read a file once in chunks.
- ``atomic_write`` / ``atomic_copy`` / ``write_json_atomic``: temp file in the same directory,
  fsync, rename, fsync of the directory.
- ``make_staging`` / ``swap_into_place`` / ``sweep_stale``: a workspace beside ``dest`` named
  ``.<basename>.<what>-<pid>-<random>``, made visible with ``renameat2(RENAME_EXCHANGE)`` (else
  rename-aside), and removed by ``sweep_stale`` once the process that made it is gone (after the
  processes still using it are killed and, through the caller's ``release`` callback, the mounts
  inside it are released). Atomic writes use ``.<basename>.tmp-<pid>-<random>`` temporary files,
  so the same sweep finds those too. ``dest_lock`` is the ``<dest>.lock`` flock every run that
  writes ``dest`` (or sweeps beside it) holds; ``sweep_dest`` sweeps everything of ``dest``.
- ``safe_relpath`` / ``check_link`` / ``extract_tar``: a tarball from anywhere (a source tarball,
  an archive pulled from a store) never writes outside its target: absolute paths, ``..``, links
  leaving the tree, paths through symlinks, devices and FIFOs are refused.
"""

from __future__ import annotations

import bz2
import contextlib
import ctypes
import errno
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional, Union

BUFSIZE = 1 << 20
_WHAT_RE = re.compile(r"[a-z0-9_]{1,32}")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class UnsafePathError(ValueError):
    """A path, link or tar member would leave its tree, is a special file, or would replace
    something that is not a directory. The message names it."""


# --------------------------------------------------------------------------- hashing and atomic writes


def sha256_and_size(path: str, bufsize: int = BUFSIZE) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file, read once in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(bufsize)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def sha256_file(path: str, bufsize: int = BUFSIZE) -> str:
    """SHA-256 hex digest of a file."""
    return sha256_and_size(path, bufsize)[0]


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: str, mode: int, fill: Callable[[IO[bytes]], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    # named like a workspace (``.<name>.tmp-<pid>-*``): sweep_stale removes it if this process dies
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write(path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
    """Write ``data`` through a temporary file in the same directory, fsync, rename over ``path``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    _atomic(path, mode, lambda handle: handle.write(raw))


def atomic_copy(src: str, path: str, mode: int = 0o644) -> None:
    """Copy the file ``src`` to ``path`` the way ``atomic_write`` writes (complete or absent)."""
    def fill(handle: IO[bytes]) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, BUFSIZE)
    _atomic(path, mode, fill)


def write_json_atomic(path: str, data: Any) -> None:
    """JSON with sorted keys and a 2-space indent, written atomically."""
    atomic_write(path, json.dumps(data, sort_keys=True, indent=2) + "\n")


def write_hashed(handle: IO[bytes], path: str, mode: int = 0o644) -> tuple[str, int]:
    """Copy ``handle`` into the new file ``path`` (never through a symlink); returns (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        while True:
            block = handle.read(BUFSIZE)
            if not block:
                break
            out.write(block)
            digest.update(block)
            size += len(block)
    os.chmod(path, mode)  # the umask applied to the create
    return digest.hexdigest(), size


def copy_hashed(src: str, dst: str, mode: int = 0o644) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dst`` and hash it in the same pass; returns (sha256, size)."""
    with open(src, "rb") as handle:
        return write_hashed(handle, dst, mode)


# --------------------------------------------------------------------------- workspaces beside dest


def make_staging(dest: str, what: str, mode: int = 0o700, parent: Optional[str] = None) -> str:
    """A new directory ``.<basename of dest>.<what>-<pid>-<random>`` beside ``dest`` (or in
    ``parent``), so it is on dest's filesystem and ``sweep_stale`` can find it after a crash."""
    if not _WHAT_RE.fullmatch(what):
        raise ValueError(f"workspace kind {what!r} must be 1-32 of [a-z0-9_]")
    dest_abs = os.path.abspath(dest)
    parent = parent or os.path.dirname(dest_abs) or "/"
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{os.path.basename(dest_abs)}.{what}-{os.getpid()}-", dir=parent)
    os.chmod(path, mode)
    return path


_renameat2: Optional[Callable[..., int]] = None


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False when unavailable."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            return False
    return _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_into_place(staging: str, dest: str) -> None:
    """Make the directory ``staging`` visible at ``dest`` (same filesystem), then remove the old tree.

    With RENAME_EXCHANGE there is no moment without a complete ``dest``; else the old tree is renamed
    aside (``.<basename>.old-<pid>-<random>``) first and put back if the second rename fails. A
    ``dest`` that is a file or a symlink is not replaced."""
    parent = os.path.dirname(os.path.abspath(dest)) or "/"
    if not os.path.lexists(dest):
        os.rename(staging, dest)
        fsync_dir(parent)
        return
    if os.path.islink(dest) or not os.path.isdir(dest):
        raise UnsafePathError(f"{dest} exists and is not a directory: refusing to replace it")
    if _rename_exchange(staging, dest):
        fsync_dir(parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old tree is at the staging path now
        return
    old = os.path.join(parent, f".{os.path.basename(os.path.abspath(dest))}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except OSError:
        os.rename(old, dest)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Sweep:
    """What ``sweep_stale`` did: paths removed, mount points released, processes killed, and paths
    kept with the reason."""
    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)

    def merge(self, other: Sweep) -> Sweep:
        self.removed += other.removed
        self.kept.update(other.kept)
        self.released += other.released
        self.killed += other.killed
        return self

    def lines(self) -> list[str]:
        """One line per thing done or kept, for a log."""
        out = [f"killed leftover process {p}" for p in self.killed]
        out += [f"released leftover mount {m}" for m in self.released]
        out += [f"removed leftover {p}" for p in self.removed]
        out += [f"kept leftover {p}: {why}" for p, why in sorted(self.kept.items())]
        return out


# release(path) -> the mount points at or below ``path`` it unmounted (deepest first); the caller
# passes mounts.release_under, so this module does not manage mounts itself.
ReleaseFn = Callable[[str], list[str]]


def pid_alive(pid: int) -> bool:
    """True unless ``pid`` surely names no running process (a PID we may not signal is alive).

    A zombie is dead: a killed run whose parent died too waits for an init that may be slow (or, in
    a container, never) to reap it, and its leftovers must not wait with it."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            state = handle.read().rpartition(")")[2].split()[:1]
    except OSError:
        return True
    return state != ["Z"]


def _unescape_mountinfo(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Every mount point of this process's mount namespace."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    return [_unescape_mountinfo(line.split()[4]) for line in lines if len(line.split()) > 4]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat_ = handle.read()
    except OSError:
        return ""
    return stat_[stat_.rfind(b")") + 2:stat_.rfind(b")") + 3].decode("ascii", "replace")


def processes_using(path: str, proc: str = "/proc") -> list[tuple[int, str]]:
    """Live processes (not this one) whose command line names ``path`` (or something below it), or
    whose working or root directory is at or below it: ``[(pid, command line)]``."""
    real = os.path.realpath(path)
    found: list[tuple[int, str]] = []
    try:
        names = os.listdir(proc)
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as handle:
                args = [a.decode("utf-8", "surrogateescape") for a in handle.read().split(b"\0") if a]
        except OSError:
            continue
        hit = any(real in arg for arg in args)
        for link in ("cwd", "root"):
            if hit:
                break
            try:
                hit = _under(os.readlink(f"{proc}/{pid}/{link}"), real)
            except OSError:
                continue
        if hit and _proc_state(pid) not in ("Z", "X", ""):
            found.append((pid, " ".join(args)[:200]))
    return found


def kill_processes_using(path: str, timeout: float = 10.0) -> list[str]:
    """SIGKILL every process ``processes_using(path)`` finds (a dead run's container or compiler
    that escaped its process group), wait until they are gone; returns ``["PID cmdline", ...]``."""
    killed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        left = processes_using(path)
        if not left:
            break
        for pid, cmd in left:
            killed.setdefault(pid, f"{pid} {cmd}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return list(killed.values())


def dead_entries(parent: str, pattern: re.Pattern, dirs_only: bool = False) -> list[str]:
    """Paths in ``parent`` whose name matches ``pattern`` (group 1: the PID of the run that made it)
    and whose run is gone: what a killed run left for the next one to sweep. With ``dirs_only``
    only real directories (not symlinks to one) count."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        if dirs_only and (os.path.islink(path) or not os.path.isdir(path)):
            continue
        found.append(path)
    return found


def sweep_stale(parent: str, basename: str, mountinfo: str = "/proc/self/mountinfo",
                release: Optional[ReleaseFn] = None, kill: bool = False) -> Sweep:
    """Remove the workspaces and temporary files ``.<basename>.<what>-<pid>-*`` in ``parent`` whose
    process is gone. Call it under the lock of ``dest`` (``dest_lock``), before making a new one.

    For a dead workspace, first the processes still using it are killed (``kill=True``), then the mounts
    inside it are released by ``release(path)`` (``mounts.release_under``). A workspace that still
    is, or holds, a mount point is left in place and reported (removing it would delete the
    mounted files); so is one whose removal fails."""
    result = Sweep()
    pattern = re.compile(rf"\.{re.escape(basename)}\.[a-z0-9_]+-([0-9]+)-[^/]+")
    for path in dead_entries(parent, pattern):
        if os.path.isdir(path) and not os.path.islink(path):
            real = os.path.realpath(path)
            if kill:
                result.killed += kill_processes_using(real)
            held = [m for m in mount_points(mountinfo) if _under(m, real)]
            if held and release is not None:
                try:
                    result.released += release(real)
                except Exception as exc:  # noqa: BLE001 - reported, the workspace is kept
                    result.kept[path] = f"cannot release its mounts: {exc}"
                    continue
                held = [m for m in mount_points(mountinfo) if _under(m, real)]
            if held:
                result.kept[path] = "holds mount point(s) " + ", ".join(sorted(held))
                continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            result.kept[path] = f"cannot remove: {exc.strerror or exc}"
            continue
        result.removed.append(path)
    return result


def sweep_dest(dest: str, release: Optional[ReleaseFn] = None, parents: tuple[str, ...] = (),
               inner: tuple[str, ...] = ("manifest.json",), mountinfo: str = "/proc/self/mountinfo") -> Sweep:
    """``sweep_stale`` for everything a dead run may have left around ``dest``: workspaces and the
    renamed-aside old tree beside it (``.<name>.build-*``, ``.pull-*``, ``.push-*``, ``.old-*``), temporary
    files of ``<name>.failed.json``/``.failed.log``, workspaces in the other ``parents`` (a ``tmp_dir``)
    and temporary files of the ``inner`` files inside ``dest`` (its manifest). Hold ``dest_lock``."""
    dest = os.path.abspath(dest)
    parent, base = os.path.dirname(dest) or "/", os.path.basename(dest)
    targets = [(parent, base), (parent, base + ".failed.json"), (parent, base + ".failed.log")]
    targets += [(p, base) for p in parents if p and os.path.abspath(p) != parent]
    if os.path.isdir(dest) and not os.path.islink(dest):
        targets += [(dest, name) for name in inner]
    total = Sweep()
    for directory, name in targets:
        total.merge(sweep_stale(directory, name, mountinfo, release, kill=True))
    return total


@contextlib.contextmanager
def dest_lock(dest: str, wait: bool = True) -> Iterator[bool]:
    """Hold the exclusive flock on ``<dest>.lock`` (created, with dest's parent, when missing).
    Yields True when held; with ``wait=False`` yields False at once when another process holds it."""
    path = os.path.normpath(os.path.abspath(dest)) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if wait or exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            held = False
        else:
            held = True
        yield held


# --------------------------------------------------------------------------- paths and links from elsewhere


def safe_relpath(name: str) -> str:
    """A path inside a tree: relative, '/'-separated, no '..', no empty or '.' components."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"unsafe path {name!r} (absolute or invalid)")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(f"unsafe path {name!r} (escapes or is not normalized)")
    return name


def check_link(name: str, target: str) -> None:
    """A symlink at ``name`` pointing to ``target`` must stay inside the tree."""
    if not target or target.startswith("/") or "\x00" in target:
        raise UnsafePathError(f"symlink {name!r} points to {target!r}: absolute targets are refused")
    depth = len(name.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafePathError(f"symlink {name!r} points to {target!r}: outside the destination")
        elif part not in ("", "."):
            depth += 1


# --------------------------------------------------------------------------- tarballs


def _decompressing(raw: IO[bytes]) -> IO[bytes]:
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # several members are read as one stream
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, "rb")
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise tarfile.ReadError("zstd-compressed tarballs are not supported (use gzip, bzip2 or xz)")
    return raw


@contextlib.contextmanager
def open_tar(path: str) -> Iterator[tarfile.TarFile]:
    """A streaming reader of a tarball: plain, gzip (several members too), bzip2 or xz."""
    with open(path, "rb") as raw, _decompressing(raw) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        yield tar


def _member_path(name: str, root: str) -> Optional[str]:
    """The member's path below ``root`` ('' for root itself, None outside it)."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name == ".":
        name = ""
    if not root:
        return name
    if name == root.rstrip("/"):
        return ""
    return name[len(root):] if name.startswith(root) else None


def _ensure_parent(target: str, rel: str) -> None:
    cur = target
    for part in rel.split("/")[:-1]:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise UnsafePathError(f"archive path {rel!r} goes through a symlink: refused")
        if not os.path.isdir(cur):
            os.mkdir(cur, 0o755)


def extract_tar(archive_path: str, target: str, root: str = "", keep_mtime: bool = False) -> dict[str, dict[str, Any]]:
    """Extract a tarball into the directory ``target`` (new or empty), member by member.

    Only members below ``root`` (a prefix like ``nvidia/535/``; empty: everything) are taken, with
    that prefix removed. Refused (``UnsafePathError``): absolute paths, '..', paths through a
    symlink, symlinks leaving the tree, hard links to anything but an earlier regular file,
    devices, FIFOs, duplicates. Files get mode 0755 when any execute bit is set, else 0644;
    directories 0755; owners are not restored. Returns what was written:
    ``{relpath: {"sha256", "size", "mode"} or {"link"}}`` (directories omitted)."""
    os.makedirs(target, exist_ok=True)
    try:
        with open_tar(archive_path) as tar:
            return _extract_members(tar, target, root, keep_mtime)
    except (EOFError, zlib.error, lzma.LZMAError) as exc:
        raise tarfile.ReadError(f"{archive_path}: {exc}") from exc
    except OSError as exc:
        if exc.errno is not None:  # an I/O error, not corrupt data (gzip/bz2 raise OSError without errno)
            raise
        raise tarfile.ReadError(f"{archive_path}: {exc}") from exc


def _extract_members(tar: tarfile.TarFile, target: str, root: str, keep_mtime: bool) -> dict[str, dict[str, Any]]:
    written: dict[str, dict[str, Any]] = {}
    for info in tar:
        rel = _member_path(info.name, root)
        if not rel:
            continue
        safe_relpath(rel)
        if rel in written:
            raise UnsafePathError(f"archive member {info.name!r} appears twice")
        path = os.path.join(target, rel)
        _ensure_parent(target, rel)
        if info.isdir():
            if not os.path.isdir(path):
                os.mkdir(path, 0o755)
        elif info.issym():
            check_link(rel, info.linkname)
            os.symlink(info.linkname, path)
            written[rel] = {"link": info.linkname}
        elif info.islnk():
            src = _member_path(info.linkname, root)
            if src is None or src not in written or "sha256" not in written[src]:
                raise UnsafePathError(f"hard link {info.name!r} -> {info.linkname!r}: target is not an earlier file of the archive")
            os.link(os.path.join(target, src), path)
            written[rel] = dict(written[src])
        elif info.isreg():
            handle = tar.extractfile(info)
            if handle is None:
                raise UnsafePathError(f"archive member {info.name!r} cannot be read")
            mode = 0o755 if info.mode & 0o111 else 0o644
            digest, size = write_hashed(handle, path, mode)
            if keep_mtime:
                os.utime(path, (info.mtime, info.mtime))
            written[rel] = {"sha256": digest, "size": size, "mode": f"{mode:04o}"}
        else:
            raise UnsafePathError(f"archive member {info.name!r} is a device, FIFO or other special file: refused")
    return written


def read_text(path: str) -> Optional[str]:
    """The text of a file (undecodable bytes replaced), or None when there is no such file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def is_regular(path: str) -> bool:
    """A regular file, not a symlink to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------- symlinks switched atomically (kmod_install)


def switch_symlink(link: str, target: str) -> bool:
    """Point the symlink ``link`` at ``target`` atomically (a new link ``.<name>.tmp-<pid>-*`` renamed
    over it, so ``sweep_stale`` finds a leftover); returns False when it already pointed there. A
    ``link`` that exists and is not a symlink is refused (``UnsafePathError``)."""
    if os.path.islink(link):
        if os.readlink(link) == target:
            return False
    elif os.path.lexists(link):
        raise UnsafePathError(f"{link} exists and is not a symlink: refusing to replace it")
    parent = os.path.dirname(os.path.abspath(link)) or "/"
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(link)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)
    return True
