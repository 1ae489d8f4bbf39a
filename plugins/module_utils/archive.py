# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive: build identity, store keys, deterministic tarballs, verified extraction.

Everything here works on local files only (no store, no boto3, no Ansible), so unit tests call
these functions directly. The store side lives in ``stores.py`` / ``s3store.py``, the lease in
``lease.py`` and the glue the module calls in ``archive_ops.py``.

Archive format: a tar (GNU format, entries sorted by path, mtime 0, uid/gid 0, no user/group
names, mode 0755 for directories and executables, 0644 otherwise) holding ``manifest.json``
(the build manifest without its ``archive`` section, canonical JSON) and every file the
manifest lists. The tar is gzip-compressed as a sequence of gzip members (one per 4 MiB chunk,
RFC 1952 allows several; ``gzip -d``, ``tar xzf`` and Python read them as one stream), header
mtime 0, no file name, compressed on all cores; a chunk whose first 64 KiB do not compress is
stored (deflate level 0) so incompressible data costs no CPU. Same input bytes and same
compression level give the same archive bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO, Any, Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import atomic_write, sha256_and_size

MANIFEST_NAME = "manifest.json"
ARCHIVE_SUFFIX = ".tar.gz"
CHUNK_SIZE = 4 << 20
PROBE_SIZE = 64 << 10
PROBE_RATIO = 0.9
DEFAULT_LEVEL = 1
IDENTITY_FIELDS = ("os", "board", "os_version", "kernel_release", "driver", "driver_version",
                   "module_type", "signing_key_fingerprint")
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no flags, mtime 0, OS unknown


class ArchiveError(Exception):
    """A build tree, manifest or archive is not what it must be (message names the problem)."""


# --------------------------------------------------------------------------- identity and keys

def identity_from_manifest(manifest: dict[str, Any]) -> dict[str, Optional[str]]:
    """The fields that name a build (and so its key) from a manifest."""
    ident: dict[str, Optional[str]] = {}
    for field in IDENTITY_FIELDS:
        value = manifest.get(field)
        ident[field] = None if value is None else str(value)
    if not ident.get("module_type"):
        ident["module_type"] = "default"
    return ident


def default_module_type(driver: Optional[str]) -> str:
    """The variant a fetch looks for when none is given: NVIDIA builds always record proprietary or
    open (kmod_build resolves ``auto``), the proprietary modules being Flatcar's own default; builds
    without a module type are stored as ``default``."""
    return "proprietary" if (driver or "").lower() == "nvidia" else "default"


def _component(name: str, value: Optional[str]) -> str:
    if value is None or value == "":
        raise ArchiveError(f"{name} is required to derive the archive key")
    if not _COMPONENT.match(value) or ".." in value:
        raise ArchiveError(f"{name}={value!r} cannot be used in an archive key (allowed: letters, digits, . _ + ~ -)")
    return value


def variant_name(ident: dict[str, Optional[str]]) -> str:
    """``<module_type>-unsigned`` or ``<module_type>-signed-<fingerprint>`` (lower case)."""
    module_type = _component("module_type", ident.get("module_type") or "default")
    fpr = ident.get("signing_key_fingerprint")
    if fpr:
        return "{}-signed-{}".format(module_type, _component("signing_key_fingerprint", fpr.replace(" ", "").lower()))
    return f"{module_type}-unsigned"


def normalize_prefix(prefix: str) -> str:
    parts = [p for p in (prefix or "").split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise ArchiveError(f"store prefix {prefix!r} may not contain '.' or '..'")
    return "/".join(parts)


def _join(prefix: str, name: str) -> str:
    prefix = normalize_prefix(prefix)
    return f"{prefix}/{name}" if prefix else name


def archive_key(ident: dict[str, Optional[str]], prefix: str = "") -> str:
    """Key of a build in a store:
    ``<prefix>/<os>/<board>/<os_version>/<kernel_release>/<driver>/<driver_version>/<variant>.tar.gz``."""
    parts = [_component(field, ident.get(field)) for field in
             ("os", "board", "os_version", "kernel_release", "driver", "driver_version")]
    return _join(prefix, "/".join(parts + [variant_name(ident) + ARCHIVE_SUFFIX]))


def legacy_key(os_version: str, channel: str, driver: str, driver_version: str, prefix: str = "") -> str:
    """Key the original bash tool used: ``<prefix>/<os-version>-<group>-<driver>-<version>.tar.gz``."""
    name = "-".join([_component("os_version", os_version), _component("channel", channel),
                     _component("driver", driver), _component("driver_version", driver_version)])
    return _join(prefix, name + ARCHIVE_SUFFIX)


def lease_key(key: str) -> str:
    """The lease object that guards the build stored at ``key``."""
    if key.endswith(ARCHIVE_SUFFIX):
        key = key[: -len(ARCHIVE_SUFFIX)]
    return key + ".lease"


# --------------------------------------------------------------------------- manifest and tree

def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest as packed into an archive: without ``archive``, sorted keys, 2-space indent."""
    body = {k: v for k, v in manifest.items() if k != "archive"}
    return (json.dumps(body, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """Digest naming the *content* of a build (manifest without its ``archive`` section)."""
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def load_manifest(tree: str) -> dict[str, Any]:
    path = os.path.join(tree, MANIFEST_NAME)
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise ArchiveError(f"{tree} has no {MANIFEST_NAME} (not a kmod_build output directory)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{path} is not valid JSON: {exc}") from None
    check_manifest(data, path)
    return data


def check_manifest(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ArchiveError(f"{where}: a manifest must be a JSON object")
    if data.get("schema") != 1:
        raise ArchiveError("{}: unsupported manifest schema {!r} (expected 1)".format(where, data.get("schema")))
    files = data.get("files")
    if not isinstance(files, dict):
        raise ArchiveError(f"{where}: manifest has no 'files' object")
    for rel, meta in files.items():
        safe_relpath(rel)
        if rel == MANIFEST_NAME:
            raise ArchiveError(f"{where}: 'files' may not list {MANIFEST_NAME} itself")
        if not isinstance(meta, dict):
            raise ArchiveError(f"{where}: files[{rel!r}] must be an object")
        if "link" in meta:
            check_link(rel, str(meta["link"]))
        elif not re.match(r"^[0-9a-f]{64}$", str(meta.get("sha256", ""))):
            raise ArchiveError(f"{where}: files[{rel!r}] has no valid sha256")


def safe_relpath(name: str) -> str:
    """Validate a path inside a build/archive: relative, no '..', no empty or '.' components."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ArchiveError(f"unsafe path {name!r} (absolute or invalid)")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ArchiveError(f"unsafe path {name!r} (escapes or is not normalized)")
    return name


def check_link(name: str, target: str) -> None:
    """A symlink at ``name`` pointing to ``target`` must stay inside the tree."""
    if not target or target.startswith("/"):
        raise ArchiveError(f"symlink {name!r} points to {target!r}: absolute targets are refused")
    depth = len(name.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise ArchiveError(f"symlink {name!r} points to {target!r}: outside the destination")
        elif part not in ("", "."):
            depth += 1


def file_mode(meta: dict[str, Any]) -> int:
    """Fixed mode bits: 0755 when the manifest mode has any execute bit, else 0644."""
    try:
        mode = int(str(meta.get("mode", "0644")), 8)
    except ValueError:
        mode = 0o644
    return 0o755 if mode & 0o111 else 0o644


def _sha256_path(path: str) -> tuple[str, int]:
    return sha256_and_size(path)


def tree_entries(tree: str) -> list[str]:
    """Every non-directory path below ``tree`` (relative, '/'-separated), except manifest.json."""
    found = []
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), tree).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def verify_tree(tree: str, manifest: dict[str, Any], strict: bool = True, hash_files: bool = True) -> list[str]:
    """Compare a tree with its manifest. Returns the list of problems (empty when it matches).

    ``strict``: files not listed are problems too. ``hash_files=False``: sizes only (cheap)."""
    problems: list[str] = []
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    for rel in sorted(files):
        meta = files[rel]
        path = os.path.join(tree, rel)
        if "link" in meta:
            if not os.path.islink(path) or os.readlink(path) != meta["link"]:
                problems.append("{}: expected a symlink to {}".format(rel, meta["link"]))
            continue
        if os.path.islink(path) or not os.path.isfile(path):
            problems.append(f"{rel}: missing or not a regular file")
            continue
        if not hash_files:
            size = os.stat(path).st_size
            if "size" in meta and int(meta["size"]) != size:
                problems.append(f"{rel}: size {size}, manifest says {meta['size']}")
            continue
        digest, size = _sha256_path(path)
        if digest != meta.get("sha256"):
            problems.append("{}: sha256 {}, manifest says {}".format(rel, digest, meta.get("sha256")))
        elif "size" in meta and int(meta["size"]) != size:
            problems.append(f"{rel}: size {size}, manifest says {meta['size']}")
    if strict:
        for rel in tree_entries(tree):
            if rel not in files:
                problems.append(f"{rel}: present but not listed in the manifest")
    return problems


# --------------------------------------------------------------------------- deterministic tar.gz

def gzip_member(data: bytes, level: int) -> bytes:
    """One gzip member (RFC 1952) with mtime 0 and no name; incompressible data is stored."""
    if level > 0 and len(data) >= PROBE_SIZE:
        probe = zlib.compress(data[:PROBE_SIZE], 1)
        if len(probe) > PROBE_RATIO * PROBE_SIZE:
            level = 0
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
    body = comp.compress(data) + comp.flush()
    return _GZIP_HEADER + body + struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)


class ChunkedGzipWriter(io.RawIOBase):
    """File-like sink: cuts the stream into CHUNK_SIZE chunks, compresses them in parallel
    (zlib releases the GIL) into gzip members, and writes them in order to ``out`` while
    hashing the result. Chunk boundaries depend only on the byte stream: output is deterministic."""

    def __init__(self, out: IO[bytes], level: int = DEFAULT_LEVEL, workers: Optional[int] = None) -> None:
        super().__init__()
        self._out = out
        self._level = level
        self._buf = bytearray()
        self._pending: list[concurrent.futures.Future] = []
        self._workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self._workers)
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one thread keeps the order
        self._writes: list[concurrent.futures.Future] = []
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.raw_size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw_size

    def write(self, data: Any) -> int:  # type: ignore[override]
        size = len(data)
        self._buf += data
        self.raw_size += size
        while len(self._buf) >= CHUNK_SIZE:
            chunk = bytes(memoryview(self._buf)[:CHUNK_SIZE])
            del self._buf[:CHUNK_SIZE]
            self._submit(chunk)
        return size

    def _submit(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(gzip_member, chunk, self._level))
        while len(self._pending) > 2 * self._workers:
            self._drain_one()

    def _write_member(self, member: bytes) -> None:
        self._out.write(member)
        self.sha256.update(member)
        self.size += len(member)

    def _drain_one(self) -> None:
        member = self._pending.pop(0).result()
        self._writes.append(self._writer.submit(self._write_member, member))
        while len(self._writes) > 2 * self._workers:
            self._writes.pop(0).result()

    def finish(self) -> None:
        if self._buf or self.raw_size == 0:
            self._submit(bytes(self._buf))
            self._buf = bytearray()
        while self._pending:
            self._drain_one()
        while self._writes:
            self._writes.pop(0).result()
        self._pool.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def abort(self) -> None:
        for fut in self._pending + self._writes:
            fut.cancel()
        self._pending, self._writes = [], []
        self._pool.shutdown(wait=True)
        self._writer.shutdown(wait=True)


class _HashingReader:
    """Wrap a file: hash what tarfile reads from it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.sha256.update(data)
        return data


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _parent_dirs(names: list[str]) -> list[str]:
    dirs = set()
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs)


def pack_tree(tree: str, manifest: dict[str, Any], out_path: str, level: int = DEFAULT_LEVEL) -> tuple[str, int]:
    """Write the deterministic archive of ``tree`` to ``out_path`` (a new file).

    Every file is hashed while it is packed and compared with the manifest; a mismatch
    aborts (and removes ``out_path``). Returns (sha256 hex, size) of the archive."""
    files: dict[str, dict[str, Any]] = manifest["files"]
    names = sorted(files)
    entries = sorted([(d, "dir") for d in _parent_dirs(names + [MANIFEST_NAME])] +
                     [(n, "file") for n in names] + [(MANIFEST_NAME, "manifest")])
    try:
        with open(out_path, "xb") as out:
            gz = ChunkedGzipWriter(out, level)
            try:
                with tarfile.TarFile(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT, copybufsize=1 << 20) as tar:  # type: ignore[arg-type]
                    for name, kind in entries:
                        _add_entry(tar, tree, name, kind, files, manifest)
            except BaseException:
                gz.abort()
                raise
            gz.finish()  # no fsync: a temporary file, uploaded then removed
        return gz.sha256.hexdigest(), gz.size
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
        raise


def _add_entry(tar: tarfile.TarFile, tree: str, name: str, kind: str,
               files: dict[str, dict[str, Any]], manifest: dict[str, Any]) -> None:
    if kind == "dir":
        tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
        return
    if kind == "manifest":
        data = canonical_manifest(manifest)
        tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        return
    meta = files[name]
    path = os.path.join(tree, name)
    if "link" in meta:
        if not os.path.islink(path) or os.readlink(path) != meta["link"]:
            raise ArchiveError("{}: expected a symlink to {}".format(path, meta["link"]))
        tar.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, link=str(meta["link"])))
        return
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{path}: missing or not a regular file (listed in the manifest)")
    with open(path, "rb") as handle:
        reader = _HashingReader(handle)
        tar.addfile(_tarinfo(name, tarfile.REGTYPE, file_mode(meta), st.st_size), reader)  # type: ignore[arg-type]
    if reader.sha256.hexdigest() != meta.get("sha256"):
        raise ArchiveError("{}: sha256 {} does not match the manifest ({}); refusing to pack".format(path, reader.sha256.hexdigest(), meta.get("sha256")))


def sha256_file(path: str) -> tuple[str, int]:
    """(sha256 hex, size) of a file."""
    return _sha256_path(path)


# --------------------------------------------------------------------------- verified extraction

def iter_members(archive_path: str) -> Iterator[tuple[tarfile.TarInfo, Optional[IO[bytes]]]]:
    """Stream the members of a (multi-member) .tar.gz."""
    with gzip.open(archive_path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:  # type: ignore[call-overload]
        for info in tar:
            handle = tar.extractfile(info) if info.isreg() else None
            yield info, handle


def _strip(name: str, root: str) -> Optional[str]:
    name = name[2:] if name.startswith("./") else name
    name = name.rstrip("/")
    if not root:
        return name
    if name == root.rstrip("/"):
        return ""
    if name.startswith(root):
        return name[len(root):]
    return None


def _write_member(handle: IO[bytes], path: str, mode: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        while True:
            block = handle.read(1 << 20)
            if not block:
                break
            out.write(block)
            digest.update(block)
            size += len(block)
    os.chmod(path, mode)
    return digest.hexdigest(), size


def extract_archive(archive_path: str, staging: str, root: str = "") -> dict[str, dict[str, Any]]:
    """Extract into the empty directory ``staging``, refusing anything that could escape it.

    Only members below ``root`` (a prefix like ``nvidia/535/``; empty: everything) are taken,
    with that prefix removed. Refused: absolute paths, '..', symlinks leaving the tree,
    hard links to anything but an earlier regular file, devices, FIFOs, duplicates.
    Returns what was written: {relpath: {"sha256", "size", "mode"} or {"link"}} (dirs omitted)."""
    written: dict[str, dict[str, Any]] = {}
    for info, handle in iter_members(archive_path):
        rel = _strip(info.name, root)
        if rel is None or rel == "":
            continue
        safe_relpath(rel)
        if rel in written:
            raise ArchiveError(f"archive member {info.name!r} appears twice")
        target = os.path.join(staging, rel)
        _ensure_parent(staging, rel)
        if info.isdir():
            if not os.path.isdir(target):
                os.mkdir(target, 0o755)
            continue
        if info.issym():
            check_link(rel, info.linkname)
            os.symlink(info.linkname, target)
            written[rel] = {"link": info.linkname}
        elif info.islnk():
            src = _strip(info.linkname, root)
            if src is None or src not in written or "sha256" not in written[src]:
                raise ArchiveError(f"hard link {info.name!r} -> {info.linkname!r}: target is not an earlier file of the archive")
            os.link(os.path.join(staging, src), target)
            written[rel] = dict(written[src])
        elif info.isreg() and handle is not None:
            mode = 0o755 if info.mode & 0o111 else 0o644
            digest, size = _write_member(handle, target, mode)
            written[rel] = {"sha256": digest, "size": size, "mode": f"{mode:04o}"}
        else:
            raise ArchiveError(f"archive member {info.name!r} is a device, FIFO or other special file: refused")
    return written


def _ensure_parent(staging: str, rel: str) -> None:
    parts = rel.split("/")[:-1]
    cur = staging
    for part in parts:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise ArchiveError(f"archive path {rel!r} goes through a symlink: refused")
        if not os.path.isdir(cur):
            os.mkdir(cur, 0o755)


def check_extracted(written: dict[str, dict[str, Any]], manifest: dict[str, Any]) -> list[str]:
    """Compare what extraction wrote with the manifest packed in the archive."""
    problems = []
    files = manifest.get("files", {})
    for rel in sorted(set(files) | set(written)):
        want, got = files.get(rel), written.get(rel)
        if rel == MANIFEST_NAME:
            continue
        if want is None:
            problems.append(f"{rel}: in the archive but not in its manifest")
        elif got is None:
            problems.append(f"{rel}: listed in the manifest but missing from the archive")
        elif "link" in want or "link" in got:
            if want.get("link") != got.get("link"):
                problems.append("{}: link {!r}, manifest says {!r}".format(rel, got.get("link"), want.get("link")))
        elif got["sha256"] != want.get("sha256"):
            problems.append("{}: sha256 {}, manifest says {}".format(rel, got["sha256"], want.get("sha256")))
        elif "size" in want and int(want["size"]) != got["size"]:
            problems.append(f"{rel}: size {got['size']}, manifest says {want['size']}")
    return problems


def find_legacy_root(archive_path: str, driver: str, driver_version: str) -> str:
    """Find where the build lives inside an archive of the original tool.

    Preferred ``<driver>/<version>/``; otherwise the directory holding ``lib/modules/``
    (the tool's older uploads used ``./out/``)."""
    names = []
    for info, _handle in iter_members(archive_path):
        name = info.name[2:] if info.name.startswith("./") else info.name
        names.append(name)
    preferred = f"{driver}/{driver_version}/"
    if any(n.startswith(preferred + "lib/modules/") for n in names):
        return preferred
    roots = set()
    for name in names:
        idx = name.find("lib/modules/")
        if idx == 0 or (idx > 0 and name[idx - 1] == "/"):
            roots.add(name[:idx])
    if len(roots) != 1:
        raise ArchiveError(f"cannot find the build inside the legacy archive (expected {preferred}lib/modules/<kver>/*.ko)")
    return roots.pop()


def _vermagic(path: str) -> Optional[str]:
    with open(path, "rb") as handle:
        data = handle.read()
    idx = data.find(b"vermagic=")
    if idx < 0:
        return None
    end = data.find(b"\x00", idx)
    return data[idx + len("vermagic="):end if end > 0 else None].decode("utf-8", "replace")


def legacy_manifest(staging: str, written: dict[str, dict[str, Any]], ident: dict[str, Optional[str]],
                    channel: str, key: str) -> dict[str, Any]:
    """Manifest for a tree imported from an original-tool archive (``imported: legacy``)."""
    kernels = sorted({rel.split("/")[2] for rel in written if rel.startswith("lib/modules/") and rel.count("/") >= 3})
    if not kernels:
        raise ArchiveError(f"legacy archive {key} holds no lib/modules/<kver>/ directory")
    want = ident.get("kernel_release")
    if want and want not in kernels:
        raise ArchiveError("legacy archive {} is built for kernel {}, not kernel_release={}".format(key, ", ".join(kernels), want))
    kver = want or kernels[0]
    modules = []
    for rel in sorted(written):
        if rel.startswith(f"lib/modules/{kver}/") and rel.endswith(".ko") and "sha256" in written[rel]:
            modules.append({"name": os.path.basename(rel)[:-3], "file": rel, "size": written[rel]["size"],
                            "vermagic": _vermagic(os.path.join(staging, rel)), "depends": [], "signer": None})
    return {
        "schema": 1, "imported": "legacy", "legacy_key": key,
        "os": ident.get("os"), "board": ident.get("board"), "os_version": ident.get("os_version"),
        "channel": channel, "kernel_release": kver, "driver": ident.get("driver"),
        "driver_version": ident.get("driver_version"), "module_type": ident.get("module_type"),
        "signing_key_fingerprint": ident.get("signing_key_fingerprint"),
        "files": written, "modules": modules, "build_time": None,
    }


# --------------------------------------------------------------------------- atomic placement

def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, sort_keys=True, indent=2) + "\n")


def _renameat2_exchange(a: str, b: str) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    res = fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange)
    return res == 0


def swap_into_place(staging: str, dest: str) -> None:
    """Make ``staging`` visible at ``dest`` atomically (RENAME_EXCHANGE when dest exists), then
    remove the old tree. Both must be on the same filesystem."""
    if not os.path.lexists(dest):
        os.rename(staging, dest)
        return
    if os.path.islink(dest) or not os.path.isdir(dest):
        raise ArchiveError(f"dest {dest} exists and is not a directory: refusing to replace it")
    if _renameat2_exchange(staging, dest):
        shutil.rmtree(staging)
        return
    old = staging + ".old"
    os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old)


def make_staging(dest: str) -> str:
    parent = os.path.dirname(os.path.abspath(dest)) or "/"
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dest))}.staging-", dir=parent)
    os.chmod(staging, 0o755)  # becomes dest: readable like any installed tree
    return staging


def describe_change(key: Optional[str], sha256: Optional[str], size: Optional[int]) -> dict[str, Any]:
    return {"key": key, "sha256": sha256, "size": size}


ProgressFn = Callable[[str], None]
