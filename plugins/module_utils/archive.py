# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive: store keys, deterministic tarballs, verified extraction, legacy import.

Everything here works on local files only (no store, no boto3, no Ansible), so unit tests call
these functions directly. The identity of a build comes from ``identity.py``, the manifest format
from ``manifest.py``, safe extraction, staging and swapping from ``fsutil.py``. The store side
lives in ``stores.py`` / ``s3store.py``, the lease in ``lease.py`` and the glue the module calls in
``archive_ops.py``.

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
import hashlib
import io
import os
import re
import stat
import struct
import tarfile
import zlib
from typing import IO, Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import fsutil
from ansible_collections.modulus.kmods.plugins.module_utils.identity import MANIFEST_SIGNER_KEY
from ansible_collections.modulus.kmods.plugins.module_utils.manifest import MANIFEST_NAME, SCHEMA, canonical_manifest

ARCHIVE_SUFFIX = ".tar.gz"
CHUNK_SIZE = 4 << 20
PROBE_SIZE = 64 << 10
PROBE_RATIO = 0.9
DEFAULT_LEVEL = 1
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no flags, mtime 0, OS unknown


class ArchiveError(Exception):
    """A build tree, manifest or archive is not what it must be (message names the problem)."""


# --------------------------------------------------------------------------- keys

def _component(name: str, value: Optional[str]) -> str:
    if value is None or value == "":
        raise ArchiveError(f"{name} is required to derive the archive key")
    if not _COMPONENT.fullmatch(value) or ".." in value:
        raise ArchiveError(f"{name}={value!r} cannot be used in an archive key (allowed: letters, digits, . _ + ~ -)")
    return value


def variant_name(ident: dict[str, Optional[str]]) -> str:
    """``<module_type>-unsigned`` or ``<module_type>-signed-<signer>`` (signer: lower case, no ':' or ' ')."""
    module_type = _component("module_type", ident.get("module_type") or "default")
    signer = ident.get("signer")
    if signer:
        return "{}-signed-{}".format(module_type, _component("signer", signer.replace(" ", "").replace(":", "").lower()))
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


# --------------------------------------------------------------------------- deterministic tar.gz

def file_mode(meta: dict[str, Any]) -> int:
    """Fixed mode bits: 0755 when the manifest mode has any execute bit, else 0644."""
    try:
        mode = int(str(meta.get("mode", "0644")), 8)
    except ValueError:
        mode = 0o644
    return 0o755 if mode & 0o111 else 0o644


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


# --------------------------------------------------------------------------- verified extraction

def extract_archive(archive_path: str, staging: str, root: str = "") -> dict[str, dict[str, Any]]:
    """``fsutil.extract_tar`` (refuses anything that could escape ``staging``; returns what it wrote,
    hashed) with its refusals as ``ArchiveError``."""
    try:
        return fsutil.extract_tar(archive_path, staging, root)
    except fsutil.UnsafePathError as exc:
        raise ArchiveError(str(exc)) from None
    except tarfile.TarError as exc:
        raise ArchiveError(f"{archive_path} is not a readable tarball: {exc}") from None


def find_legacy_root(archive_path: str, driver: str, driver_version: str) -> str:
    """Find where the build lives inside an archive of the original tool.

    Preferred ``<driver>/<version>/``; otherwise the directory holding ``lib/modules/``
    (the tool's older uploads used ``./out/``)."""
    with fsutil.open_tar(archive_path) as tar:
        names = [info.name[2:] if info.name.startswith("./") else info.name for info in tar]
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
        "schema": SCHEMA, "imported": "legacy", "legacy_key": key,
        "os": ident.get("os"), "board": ident.get("board"), "os_version": ident.get("os_version"),
        "channel": channel, "kernel_release": kver, "driver": ident.get("driver"),
        "driver_version": ident.get("driver_version"), "module_type": ident.get("module_type"),
        MANIFEST_SIGNER_KEY: ident.get("signer"),
        "files": written, "modules": modules, "build_time": None,
    }
