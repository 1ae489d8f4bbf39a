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

Signatures: the packed ``manifest.json`` (which lists every file's sha256) is signed with OpenSSH
(``ssh-keygen -Y sign -n modulus-build``, a tool every Flatcar host has); the signature is stored
beside the archive as ``<key>.sig``. A pull with trusted keys writes them to an allowed_signers
file, every key with the one principal ``modulus-build`` restricted to the namespace
``modulus-build``, and verifies with ``ssh-keygen -Y verify -I modulus-build -n modulus-build``.
Before a pulled build is made visible every ``.ko`` must be an ELF kernel module whose vermagic
names the build's kernel (``check_modules``).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import io
import os
import re
import stat
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import elfmod, fsutil
from ansible_collections.modulus.kmods.plugins.module_utils.common import which
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


class SignatureError(ArchiveError):
    """A build's signature is missing, malformed or not made by a trusted key."""


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
        raw = [info.name for info in tar]
    names = []
    for name in raw:
        while name.startswith("./"):
            name = name[2:]
        if name.startswith("/") or ".." in name.split("/"):
            raise ArchiveError(f"legacy archive member {name!r} is absolute or leaves the archive: refused")
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


def check_modules(tree: str, paths: Iterable[str], kernel_release: str, what: str) -> list[tuple[str, Any]]:
    """Every ``.ko`` among ``paths`` (relative to ``tree``) must be a regular file, an ELF kernel
    module (``elfmod.read_module``), whose vermagic names ``kernel_release``. Returns
    ``[(relpath, ModuleInfo)]``; raises ``ArchiveError`` naming each bad module."""
    problems: list[str] = []
    infos: list[tuple[str, Any]] = []
    for rel in sorted(paths):
        if not rel.endswith(".ko"):
            continue
        path = os.path.join(tree, rel)
        if not fsutil.is_regular(path):
            problems.append(f"{rel}: not a regular file")
            continue
        try:
            info = elfmod.read_module(path)
        except (elfmod.ModuleFormatError, OSError) as exc:
            problems.append(f"{rel}: not an ELF kernel module ({exc})")
            continue
        if elfmod.vermagic_release(info.vermagic) != kernel_release:
            problems.append(f"{rel}: vermagic {info.vermagic!r} does not name kernel {kernel_release}")
            continue
        infos.append((rel, info))
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ArchiveError("{}: {}{}".format(what, "; ".join(problems[:5]), more))
    return infos


def legacy_manifest(staging: str, written: dict[str, dict[str, Any]], ident: dict[str, Optional[str]],
                    channel: str, key: str) -> dict[str, Any]:
    """Manifest for a tree imported from an original-tool archive (``imported: legacy``).

    The tree must hold modules for ``kernel_release`` and no other kernel, and every ``.ko`` must be
    an ELF kernel module whose vermagic names that kernel."""
    want = ident.get("kernel_release")
    if not want:
        raise ArchiveError(f"legacy archive {key}: kernel_release is required to import it")
    kernels = sorted({rel.split("/")[2] for rel in written if rel.startswith("lib/modules/") and rel.count("/") >= 3})
    if not kernels:
        raise ArchiveError(f"legacy archive {key} holds no lib/modules/<kver>/ directory")
    if want not in kernels:
        raise ArchiveError("legacy archive {} is built for kernel {}, not kernel_release={}".format(key, ", ".join(kernels), want))
    others = [k for k in kernels if k != want]
    if others:
        raise ArchiveError("legacy archive {} also holds lib/modules/ for other kernel(s) {}: refused".format(
            key, ", ".join(others)))
    files = [rel for rel, meta in written.items() if "sha256" in meta]
    infos = check_modules(staging, files, want, f"legacy archive {key}")
    if not any(rel.startswith(f"lib/modules/{want}/") for rel, _info in infos):
        raise ArchiveError(f"legacy archive {key} holds no kernel module in lib/modules/{want}/")
    modules = [{"name": info.name, "file": rel, "size": written[rel]["size"], "vermagic": info.vermagic,
                "depends": info.depends, "signer": info.signer} for rel, info in infos]
    return {
        "schema": SCHEMA, "imported": "legacy", "legacy_key": key,
        "os": ident.get("os"), "board": ident.get("board"), "os_version": ident.get("os_version"),
        "channel": channel, "kernel_release": want, "driver": ident.get("driver"),
        "driver_version": ident.get("driver_version"), "module_type": ident.get("module_type"),
        MANIFEST_SIGNER_KEY: ident.get("signer"),
        "files": written, "modules": modules, "build_time": None,
    }


# --------------------------------------------------------------------------- signatures (OpenSSH)

SIG_NAMESPACE = "modulus-build"
SIG_PRINCIPAL = "modulus-build"
SIG_SUFFIX = ".sig"
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_SIG_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_SIG_END = "-----END SSH SIGNATURE-----"
_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_VERIFIED_RE = re.compile(r"with \S+ key (SHA256:[A-Za-z0-9+/]+)")
KEYGEN_TIMEOUT = 60.0


@dataclass(frozen=True)
class PublicKey:
    """An OpenSSH public key: type, base64 blob and its ``SHA256:...`` fingerprint (as ssh-keygen -l prints it)."""
    kind: str
    blob: str
    fingerprint: str

    def allowed_signers_line(self) -> str:
        return f'{SIG_PRINCIPAL} namespaces="{SIG_NAMESPACE}" {self.kind} {self.blob}'


def ssh_keygen() -> str:
    """The ssh-keygen executable (OpenSSH 8.2 or later, for ``-Y sign``/``-Y verify``)."""
    found = which("ssh-keygen")
    if not found:
        raise ArchiveError("signing_key and trusted_keys need ssh-keygen (OpenSSH 8.2 or later) on the managed node;"
                           " it was not found on PATH nor in the usual bin/sbin directories")
    return found


def _keygen(args: list[str], data: bytes = b"") -> subprocess.CompletedProcess:
    """ssh-keygen without a terminal (a passphrase prompt fails at once instead of waiting)."""
    try:
        return subprocess.run([ssh_keygen()] + args, input=data, capture_output=True, timeout=KEYGEN_TIMEOUT,
                              start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        raise ArchiveError("ssh-keygen {} did not finish within {:.0f} s".format(" ".join(args[:2]), KEYGEN_TIMEOUT)) from None


def _last_line(raw: bytes) -> str:
    lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def key_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def parse_public_keys(text: str, where: str) -> list[PublicKey]:
    """The keys of OpenSSH public key lines (``type base64 [comment]``, optionally after the principals
    and options of an allowed_signers or authorized_keys line; those are replaced by this module's
    own principal and namespace). Certificate authorities are refused."""
    keys: list[PublicKey] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        idx = next((i for i, f in enumerate(fields) if f in SSH_KEY_TYPES), None)
        if idx is None or idx + 1 >= len(fields):
            raise ArchiveError(f"{where}: {line[:60]!r}... is not an OpenSSH public key (expected '<type> <base64>')")
        if any("cert-authority" in f for f in fields[:idx]):
            raise ArchiveError(f"{where}: certificate authorities are not supported, list the signing keys themselves")
        kind, blob = fields[idx], fields[idx + 1]
        try:
            if not _B64_RE.fullmatch(blob):
                raise binascii.Error("not base64")
            decoded = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise ArchiveError(f"{where}: the {kind} key is not valid base64") from None
        if len(decoded) < 4 + len(kind) or decoded[4:4 + len(kind)] != kind.encode("ascii"):
            raise ArchiveError(f"{where}: the key data does not match its type {kind}")
        keys.append(PublicKey(kind, blob, key_fingerprint(decoded)))
    if not keys:
        raise ArchiveError(f"{where}: holds no public key")
    return keys


def load_trusted_keys(entries: Iterable[Any]) -> list[PublicKey]:
    """``trusted_keys``: each entry is public key text (one or more lines) or the absolute path of a
    file holding such lines. Duplicates (same fingerprint) are dropped."""
    keys: dict[str, PublicKey] = {}
    for i, entry in enumerate(entries):
        text = str(entry or "").strip()
        where = f"trusted_keys[{i}]"
        if text.startswith("/") and "\n" not in text:
            try:
                with open(text, encoding="utf-8", errors="replace") as handle:
                    content = handle.read(1 << 20)
            except OSError as exc:
                raise ArchiveError(f"{where}: cannot read {text}: {exc.strerror or exc}") from None
            found = parse_public_keys(content, f"{where} ({text})")
        else:
            found = parse_public_keys(text, where)
        for key in found:
            keys.setdefault(key.fingerprint, key)
    if not keys:
        raise ArchiveError("trusted_keys holds no public key")
    return list(keys.values())


def public_key_of(private_key: str) -> PublicKey:
    """The public half of the OpenSSH private key file ``private_key`` (``ssh-keygen -y``)."""
    if not os.path.isfile(private_key):
        raise ArchiveError(f"signing_key={private_key!r} is not a readable file")
    proc = _keygen(["-y", "-f", private_key])
    if proc.returncode != 0:
        raise ArchiveError(f"signing_key={private_key!r} cannot be used: {_last_line(proc.stderr)}"
                           " (an OpenSSH private key without a passphrase is needed)")
    return parse_public_keys(proc.stdout.decode("utf-8", "replace"), f"signing_key={private_key!r}")[0]


def sign_manifest(data: bytes, private_key: str) -> bytes:
    """The armored SSH signature of ``data`` (namespace ``modulus-build``), made by ``ssh-keygen -Y sign``
    reading the message from stdin (nothing written to disk)."""
    proc = _keygen(["-Y", "sign", "-f", private_key, "-n", SIG_NAMESPACE], data)
    sig = proc.stdout
    if proc.returncode != 0 or not sig.lstrip().startswith(_SIG_BEGIN.encode()):
        raise ArchiveError(f"ssh-keygen -Y sign with signing_key={private_key!r} failed: {_last_line(proc.stderr)}")
    return sig


def verify_manifest(data: bytes, signature: Optional[bytes], trusted: list[PublicKey], what: str,
                    workdir: Optional[str] = None) -> str:
    """Check that ``signature`` is a ``modulus-build`` signature of ``data`` by one of ``trusted``;
    returns the signer's fingerprint. Raises ``SignatureError`` naming ``what``."""
    if not signature:
        raise SignatureError(f"{what} is not signed: refused (trusted_keys is set)")
    text = signature.decode("ascii", "replace").strip()
    if not (text.startswith(_SIG_BEGIN) and text.endswith(_SIG_END)):
        raise SignatureError(f"{what}: the signature is not an armored SSH signature: refused")
    with tempfile.TemporaryDirectory(prefix=".modulus-sig-", dir=workdir) as tmp:
        allowed = os.path.join(tmp, "allowed_signers")
        sig_path = os.path.join(tmp, "manifest.sig")
        with open(allowed, "w", encoding="ascii") as handle:
            handle.write("".join(key.allowed_signers_line() + "\n" for key in trusted))
        with open(sig_path, "w", encoding="ascii") as handle:
            handle.write(text + "\n")
        proc = _keygen(["-Y", "verify", "-f", allowed, "-I", SIG_PRINCIPAL, "-n", SIG_NAMESPACE, "-s", sig_path], data)
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    match = _VERIFIED_RE.search(out)
    if proc.returncode != 0 or not match:
        raise SignatureError(f"{what}: the signature does not verify with any of the {len(trusted)} trusted key(s):"
                             f" {_last_line(proc.stderr or proc.stdout)}")
    if match.group(1) not in {key.fingerprint for key in trusted}:
        raise SignatureError(f"{what}: signed by {match.group(1)}, which is not a trusted key")
    return match.group(1)
