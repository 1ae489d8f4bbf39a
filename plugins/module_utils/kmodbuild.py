# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_build: compile out-of-tree kernel modules inside a developer container.

Two recipes:

- ``nvidia``: NVIDIA's ``.run`` (download by URL template, a mirror URL or a local file, optional
  SHA-256 pin), extracted by its own self-extractor *inside the container* (the container has the
  tools the makeself stub needs, and the stub, a shell script from the download, never runs as
  root on the host), then ``make -C <tree>/kernel[-open] KERNEL_UNAME=<kver> modules`` as DKMS
  does; userspace files collected per the archive's ``.manifest``.
- ``generic``: any Kbuild out-of-tree source (directory, tarball path/URL, git URL + ref), built
  with ``make -C /lib/modules/<kver>/build M=<src> modules`` plus make arguments.

Everything happens in a temporary directory next to ``dest``: the container gets the inputs
read-only and a work directory read-write; the result is checked (vermagic and CRCs, expected
modules), laid out, described by ``manifest.json`` and then renamed into place. The previous
``dest`` stays until the new one is complete.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import elfmod
from ansible_collections.modulus.kmods.plugins.module_utils.common import atomic_write, sha256_file

LogFn = Callable[[str], None]

BUILD_LOGIC_REV = "1"  # part of inputs_sha256: bump when the build script changes its output
MANIFEST_SCHEMA = 1

NVIDIA_URL_TEMPLATE = "https://us.download.nvidia.com/XFree86/Linux-{arch}/{version}/NVIDIA-Linux-{arch}-{version}.run"
NVIDIA_TESLA_URL_TEMPLATE = "https://us.download.nvidia.com/tesla/{version}/NVIDIA-Linux-{arch}-{version}.run"
NVIDIA_DEFAULT_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")
NVIDIA_OPEN_FIRST_BRANCH = 515  # first branch that ships kernel-open/
NVIDIA_OPEN_DEFAULT_BRANCH = 560  # NVIDIA's guidance: open modules are the default from R560 on
ARCHES = ("x86_64", "aarch64")
BOARD_ARCH = {"amd64-usr": "x86_64", "arm64-usr": "aarch64"}
MODULE_TYPES = ("proprietary", "open", "auto")
RECIPES = ("nvidia", "generic")

_NVIDIA_VERSION_RE = re.compile(r"^[0-9]{2,4}\.[0-9]{1,3}(\.[0-9]{1,3})?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_KVER_RE = re.compile(r"^[0-9]+\.[0-9]+[A-Za-z0-9_.+-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GIT_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./+-]{0,199}$")
_MAKE_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^\n\0]*$|^-[A-Za-z-][^\n\0]*$|^[A-Za-z0-9_.-]+$")
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst")

IN_DIR = "/modulus/in"
WORK_DIR = "/modulus/work"
KEY_DIR = "/modulus/keys"


class BuildError(Exception):
    """A build or its verification failed; ``log_tail`` holds the end of the build log."""

    def __init__(self, msg: str, log_tail: str = "", log_path: Optional[str] = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.log_tail = log_tail
        self.log_path = log_path


class InputError(ValueError):
    """An option has a value that cannot be used; the message names the option and the value."""


# --------------------------------------------------------------------------- validation


def validate_nvidia_version(version: str) -> str:
    if not isinstance(version, str) or not _NVIDIA_VERSION_RE.match(version):
        raise InputError(f"version={version!r} is not an NVIDIA driver version such as 535.104.05")
    return version


def nvidia_branch(version: str) -> int:
    return int(validate_nvidia_version(version).split(".")[0])


def resolve_module_type(kind: str, version: str) -> str:
    """``auto``: open modules from R560 on (NVIDIA's default there, Turing and newer GPUs), else
    proprietary (the only choice before R515 and NVIDIA's recommendation up to R555)."""
    if kind not in MODULE_TYPES:
        raise InputError("kernel_module_type={!r} is not one of {}".format(kind, ", ".join(MODULE_TYPES)))
    branch = nvidia_branch(version)
    if kind == "auto":
        return "open" if branch >= NVIDIA_OPEN_DEFAULT_BRANCH else "proprietary"
    if kind == "open" and branch < NVIDIA_OPEN_FIRST_BRANCH:
        raise InputError(f"kernel_module_type=open: driver {version} has no open kernel modules"
                         f" (they start with R{NVIDIA_OPEN_FIRST_BRANCH})")
    return kind


def nvidia_url(version: str, arch: str, template: str = NVIDIA_URL_TEMPLATE) -> str:
    validate_nvidia_version(version)
    if arch not in ARCHES:
        raise InputError("arch={!r} is not one of {}".format(arch, ", ".join(ARCHES)))
    try:
        return template.format(version=version, arch=arch, branch=version.split(".")[0])
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"url_template={template!r} cannot be formatted ({{version}}, {{arch}}, {{branch}}): {exc}") from exc


def validate_name(option: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise InputError(f"{option}={value!r} is not a plain name (letters, digits, '_', '.', '+', '-'; no '/' or '..')")
    return value


def validate_kernel_release(value: str) -> str:
    if not isinstance(value, str) or not _KVER_RE.match(value) or "/" in value:
        raise InputError(f"kernel_release={value!r} is not a kernel release such as 6.1.0-50-amd64")
    return value


def validate_sha256(value: Optional[str]) -> Optional[str]:
    if value is None or value == "":
        return None
    v = value.lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:"):]
    if not _SHA256_RE.match(v):
        raise InputError(f"checksum={value!r} is not a SHA-256 hex digest (64 hex digits, optional 'sha256:' prefix)")
    return v


def validate_make_args(args: list[str]) -> list[str]:
    for a in args:
        if not isinstance(a, str) or not _MAKE_ARG_RE.match(a):
            raise InputError(f"make_args entry {a!r} is not VAR=value, an option or a target name")
    return list(args)


def validate_subdir(value: Optional[str]) -> str:
    if not value:
        return ""
    if os.path.isabs(value) or any(p in ("..",) for p in value.split("/")) or "\0" in value:
        raise InputError(f"subdir={value!r} must be a relative path inside the source without '..'")
    return value.strip("/")


def module_key(name: str) -> str:
    """Kernel module names treat '-' and '_' alike."""
    return name.replace("-", "_")


# --------------------------------------------------------------------------- the NVIDIA .manifest


@dataclass
class ManifestEntry:
    path: str
    perms: int
    type: str
    arch: Optional[str]
    extra: list[str]


def parse_nvidia_manifest(text: str) -> tuple[dict[str, str], list[ManifestEntry]]:
    """Parse an NVIDIA ``.manifest``: a header (description, version, ...) then one line per file:
    ``path perms TYPE [ARCH|options...] [symlink target]``."""
    lines = text.splitlines()
    header: dict[str, str] = {}
    if lines:
        header["description"] = lines[0].strip()
    if len(lines) > 1:
        header["version"] = lines[1].strip()
    entries = []
    for line in lines[2:]:
        parts = line.split()
        if len(parts) < 3 or not re.match(r"^[0-7]{4}$", parts[1]) or not re.match(r"^[A-Z0-9_]+$", parts[2]):
            continue
        rest = parts[3:]
        arch = rest[0] if rest and rest[0] in ("NATIVE", "COMPAT32") else None
        if arch:
            rest = rest[1:]
        entries.append(ManifestEntry(path=parts[0], perms=int(parts[1], 8), type=parts[2], arch=arch, extra=rest))
    return header, entries


def _safe_relpath(option: str, p: str) -> str:
    norm = os.path.normpath(p)
    if os.path.isabs(p) or norm.startswith("..") or "\0" in p:
        raise BuildError(f"{option}: path {p!r} leaves the extracted tree")
    return norm


@dataclass
class UserspaceFile:
    src: Optional[str]  # relative to the tree (None for symlinks)
    dest: str           # relative to DEST
    mode: int
    link_target: Optional[str] = None


def plan_userspace(entries: list[ManifestEntry], version: str) -> list[UserspaceFile]:
    """Which files of the .run go where in DEST: native libraries and their symlinks to lib/,
    executables to bin/, firmware to lib/firmware/nvidia/<version>/. Sources, 32-bit compat
    libraries, X.org modules, man pages and the like are left out."""
    out: list[UserspaceFile] = []
    seen = set()
    for e in entries:
        base = os.path.basename(e.path)
        if not base or base in (".", "..") or e.arch == "COMPAT32" or e.type.startswith("XMODULE"):
            continue
        t = e.type
        if t.endswith("_SYMLINK"):
            target = e.extra[-1] if e.extra else ""
            if not target or "/" in target or target in (".", ".."):
                continue
            area = "bin" if "BIN" in t else "lib"
            dest = f"{area}/{base}"
            item = UserspaceFile(src=None, dest=dest, mode=0o777, link_target=target)
        elif t.endswith("_LIB") or t.endswith("_SHARED_LIB"):
            if ".so" not in base:
                continue
            dest = f"lib/{base}"
            item = UserspaceFile(src=_safe_relpath(".manifest", e.path), dest=dest, mode=e.perms & 0o755 or 0o755)
        elif t.endswith("_BINARY"):
            dest = f"bin/{base}"
            item = UserspaceFile(src=_safe_relpath(".manifest", e.path), dest=dest, mode=e.perms & 0o755 or 0o755)
        elif t == "FIRMWARE":
            dest = f"lib/firmware/nvidia/{version}/{base}"
            item = UserspaceFile(src=_safe_relpath(".manifest", e.path), dest=dest, mode=0o644)
        else:
            continue
        if dest in seen:
            continue
        seen.add(dest)
        out.append(item)
    return out


# --------------------------------------------------------------------------- requests and inputs


@dataclass
class SigningSpec:
    key_path: str
    cert_path: str
    hash_algo: str = "sha256"
    cert_fingerprint: str = ""  # sha256 of the certificate in DER, colon-free hex


@dataclass
class BuildRequest:
    recipe: str
    image: str
    dest: str
    kernel_release: Optional[str] = None
    version: Optional[str] = None  # nvidia: driver version; generic: free text
    name: Optional[str] = None  # generic: the driver name
    arch: Optional[str] = None
    source: Optional[str] = None
    url_template: str = NVIDIA_URL_TEMPLATE
    checksum: Optional[str] = None
    kernel_module_type: str = "auto"
    git_ref: Optional[str] = None
    subdir: str = ""
    make_args: list[str] = field(default_factory=list)
    modules: Optional[list[str]] = None
    signing: Optional[SigningSpec] = None
    force: bool = False
    timeout: float = 3600.0
    jobs: int = 0
    run_method: str = "auto"
    legacy_prepare: str = "auto"  # auto | always | never
    channel: Optional[str] = None
    validate_certs: bool = True
    download_timeout: float = 600.0


@dataclass
class Resolved:
    """A request with everything known before the container starts."""
    req: BuildRequest
    driver: str
    driver_version: str
    module_type: Optional[str]
    arch: str
    kernel_release: str
    image_release: dict[str, str]
    image_version: Optional[str]
    board: Optional[str]
    source_kind: str  # file | url | dir | git
    source: str
    source_identity: str
    expected_modules: list[str]
    inputs_sha256: str = ""


def cert_fingerprint(cert_path: str) -> str:
    """SHA-256 of the certificate (DER), so PEM and DER files of the same certificate agree."""
    with open(cert_path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" in data:
        import base64
        body = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.S)
        if not body:
            raise InputError(f"signing_cert={cert_path!r} holds no PEM certificate")
        data = base64.b64decode(b"".join(body.group(1).split()))
    return hashlib.sha256(data).hexdigest()


def source_kind(recipe: str, source: Optional[str], git_ref: Optional[str]) -> str:
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
    """Content hash of a directory tree (paths, modes, file contents, symlink targets)."""
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
                h.update(sha256_file(p).encode())
            h.update(b"\n")
    return h.hexdigest()


def compute_inputs_sha256(r: Resolved) -> str:
    req = r.req
    doc = {
        "logic": BUILD_LOGIC_REV,
        "recipe": req.recipe,
        "driver": r.driver,
        "version": r.driver_version,
        "module_type": r.module_type,
        "arch": r.arch,
        "kernel_release": r.kernel_release,
        "image_version": r.image_version,
        "board": r.board,
        "source": r.source_identity,
        "subdir": req.subdir,
        "make_args": req.make_args,
        "modules": r.expected_modules,
        "signing": [req.signing.cert_fingerprint, req.signing.hash_algo] if req.signing else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def resolve(req: BuildRequest, info) -> Resolved:
    """Validate the request against the image's ImageInfo; no network, no container."""
    if req.recipe not in RECIPES:
        raise InputError("recipe={!r} is not one of {}".format(req.recipe, ", ".join(RECIPES)))
    if not os.path.isabs(req.dest) or os.path.normpath(req.dest) in ("/", "/usr", "/etc", "/var", "/opt"):
        raise InputError(f"dest={req.dest!r} must be an absolute path of a directory of its own")
    if req.legacy_prepare not in ("auto", "always", "never"):
        raise InputError(f"legacy_prepare={req.legacy_prepare!r} is not one of auto, always, never")
    validate_make_args(req.make_args)
    kernels = list(info.kernel_releases)
    if req.kernel_release:
        kver = validate_kernel_release(req.kernel_release)
        if kernels and kver not in kernels:
            raise InputError("kernel_release={!r} is not in the image (it has {})".format(kver, ", ".join(kernels)))
    elif len(kernels) == 1:
        kver = kernels[0]
    elif not kernels:
        raise InputError(f"image={req.image!r} holds no kernel under /usr/lib/modules; set kernel_release")
    else:
        raise InputError("image={!r} holds several kernels ({}); set kernel_release".format(req.image, ", ".join(kernels)))
    arch = req.arch or BOARD_ARCH.get(info.board or "", "x86_64")
    if arch not in ARCHES:
        raise InputError("arch={!r} is not one of {}".format(arch, ", ".join(ARCHES)))
    checksum = validate_sha256(req.checksum)
    if req.recipe == "nvidia":  # the version first: it is part of the default URL
        validate_nvidia_version(req.version or "")
    kind = source_kind(req.recipe, req.source, req.git_ref)
    if req.recipe == "nvidia":
        version = validate_nvidia_version(req.version or "")
        mtype = resolve_module_type(req.kernel_module_type, version)
        driver = "nvidia"
        source = req.source or nvidia_url(version, arch, req.url_template)
        modules = list(req.modules) if req.modules else list(NVIDIA_DEFAULT_MODULES)
    else:
        driver = validate_name("name", req.name or "")
        version = req.version or "0"
        if not _NAME_RE.match(version):
            raise InputError(f"version={version!r} is not a plain version string")
        mtype = None
        source = req.source or ""
        if not req.modules:
            raise InputError("modules is required with recipe=generic: the module names the build must produce")
        modules = list(req.modules)
        if req.git_ref and not _GIT_REF_RE.match(req.git_ref):
            raise InputError(f"git_ref={req.git_ref!r} is not a branch, tag or commit name")
    for m in modules:
        validate_name("modules", m)
    validate_subdir(req.subdir)
    if kind == "file":
        identity = "sha256:" + sha256_file(source)
        if checksum and identity != "sha256:" + checksum:
            raise InputError(f"checksum={checksum} does not match source={source} (sha256 {identity[7:]})")
    elif kind == "dir":
        identity = "tree:" + tree_sha256(source)
    elif kind == "git":
        identity = "git:{}@{}".format(source, req.git_ref or "HEAD")
    else:
        identity = ("sha256:" + checksum) if checksum else "url:" + source
    r = Resolved(req=req, driver=driver, driver_version=version, module_type=mtype, arch=arch, kernel_release=kver,
                 image_release=dict(info.release), image_version=info.version, board=info.board, source_kind=kind,
                 source=source, source_identity=identity, expected_modules=modules)
    r.inputs_sha256 = compute_inputs_sha256(r)
    return r


# --------------------------------------------------------------------------- DEST state: manifest, marker


def read_manifest(dest: str) -> Optional[dict]:
    try:
        with open(os.path.join(dest, "manifest.json"), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def verify_files(dest: str, manifest: dict) -> list[str]:
    """Problems with the files the manifest lists (missing, size or checksum differs)."""
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return ["manifest lists no files"]
    for rel, meta in sorted(files.items()):
        p = os.path.join(dest, rel)
        if os.path.normpath(rel).startswith("..") or os.path.isabs(rel):
            problems.append(f"{rel}: path outside dest")
            continue
        if meta.get("link"):
            if not os.path.islink(p) or os.readlink(p) != meta["link"]:
                problems.append(f"{rel}: symlink missing or changed")
            continue
        try:
            st = os.stat(p)
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if st.st_size != meta.get("size") or sha256_file(p) != meta.get("sha256"):
            problems.append(f"{rel}: size or checksum differs")
    return problems


def up_to_date(dest: str, inputs_sha256: str) -> tuple[bool, Optional[dict], str]:
    m = read_manifest(dest)
    if m is None:
        return False, None, "no manifest in dest"
    if m.get("inputs_sha256") != inputs_sha256:
        return False, m, "inputs changed"
    problems = verify_files(dest, m)
    if problems:
        return False, m, "dest does not verify: " + "; ".join(problems[:5])
    return True, m, "up to date"


def marker_paths(dest: str) -> tuple[str, str]:
    d = os.path.normpath(dest)
    return d + ".failed.json", d + ".failed.log"


def read_failure_marker(dest: str) -> Optional[dict]:
    path = marker_paths(dest)[0]
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_failure_marker(dest: str, inputs_sha256: str, message: str, log_src: Optional[str]) -> str:
    path, log_path = marker_paths(dest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if log_src and os.path.isfile(log_src):
        tmp = log_path + ".tmp"
        shutil.copyfile(log_src, tmp)
        os.replace(tmp, log_path)
    atomic_write(path, json.dumps({"inputs_sha256": inputs_sha256, "message": message,
                                   "time": utc_now(), "log": log_path if log_src else None}, indent=2) + "\n")
    return path


def clear_failure_marker(dest: str) -> None:
    for p in marker_paths(dest):
        if os.path.exists(p):
            os.unlink(p)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- fetching sources


def download(url: str, dest_path: str, timeout: float, validate_certs: bool = True, log: Optional[LogFn] = None,
             retries: int = 3) -> str:
    """Stream ``url`` into ``dest_path`` (temp + rename, retried on transient errors); return its sha256."""
    from ansible_collections.modulus.kmods.plugins.module_utils import fetch

    tmp = dest_path + ".part"

    def once() -> str:
        h = hashlib.sha256()
        resp = fetch.open_url(url, timeout, validate_certs)
        got = 0
        try:
            with open(tmp, "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
        finally:
            resp.close()
        if resp.length is not None and got != resp.length:
            raise fetch.TransientError(f"{url}: got {got} of {resp.length} bytes")
        return h.hexdigest()

    try:
        digest = fetch.with_retries(once, f"download of {url}", retries, 2.0, log or (lambda _m: None))
        os.replace(tmp, dest_path)
    except Exception as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BuildError(f"download of {url} failed: {exc}") from exc
    if log:
        log(f"downloaded {url} ({os.path.getsize(dest_path)} bytes)")
    return digest


def safe_extract_tar(archive: str, target: str) -> None:
    """Extract a tarball refusing absolute paths, '..', device nodes and links leaving the tree."""
    os.makedirs(target, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            name = os.path.normpath(m.name)
            if os.path.isabs(m.name) or name.startswith(".."):
                raise BuildError(f"source tarball member {m.name!r} leaves the source tree")
            if m.isdev():
                raise BuildError(f"source tarball member {m.name!r} is a device node")
            if m.issym() or m.islnk():
                link = m.linkname if m.islnk() else os.path.join(os.path.dirname(name), m.linkname)
                if os.path.isabs(m.linkname) or os.path.normpath(link).startswith(".."):
                    raise BuildError(f"source tarball link {m.name!r} -> {m.linkname!r} leaves the source tree")
        for m in members:
            if m.isdir():
                m.mode = (m.mode & 0o755) | 0o700
            elif not m.issym():
                m.mode = (m.mode & 0o755) | 0o600
            m.uid = m.gid = 0
            m.uname = m.gname = "root"
        tar.extractall(target, members=members)  # noqa: S202 - members checked above


def _single_top_dir(path: str) -> str:
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(path, entries[0])):
        return os.path.join(path, entries[0])
    return path


def prepare_source(r: Resolved, tmp: str, log: LogFn) -> tuple[str, str]:
    """Put the source where the container sees it. Returns (host path, sha256 of what was built).

    nvidia: ``tmp/in/driver.run``; generic: the tree at ``tmp/work/src``.
    """
    req = r.req
    checksum = validate_sha256(req.checksum)
    if r.req.recipe == "nvidia":
        run_path = os.path.join(tmp, "in", "driver.run")
        if r.source_kind == "file":
            try:  # a hard link when the file is on the same filesystem: no 100+ MB copy
                os.link(r.source, run_path)
            except OSError:
                shutil.copyfile(r.source, run_path)
            digest = sha256_file(run_path)
        else:
            log(f"downloading {r.source}")
            digest = download(r.source, run_path, req.download_timeout, req.validate_certs, log)
        if checksum and digest != checksum:
            raise InputError(f"checksum={checksum} does not match the downloaded {r.source} (sha256 {digest})")
        with open(run_path, "rb") as f:
            head = f.read(2)
        if head != b"#!":
            raise BuildError(f"source {r.source} is not a self-extracting .run archive (no '#!' header)")
        return run_path, digest
    src_root = os.path.join(tmp, "work", "src")
    if r.source_kind == "dir":
        shutil.copytree(r.source, src_root, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        return src_root, r.source_identity.split(":", 1)[1]
    if r.source_kind == "git":
        url = r.source[4:] if r.source.startswith("git+") else r.source
        git = shutil.which("git")
        if not git:
            raise BuildError(f"source={r.source} needs git on the host, and git was not found")
        for cmd in ([git, "clone", "--quiet", "--no-checkout", url, src_root],
                    [git, "-C", src_root, "checkout", "--quiet", req.git_ref or "HEAD"]):
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=req.download_timeout,
                               check=False)
            if p.returncode:
                raise BuildError("{} failed: {}".format(" ".join(cmd[:3]), p.stdout.decode("utf-8", "replace")[-1000:]))
        head = subprocess.run([git, "-C", src_root, "rev-parse", "HEAD"], stdout=subprocess.PIPE, check=True)
        shutil.rmtree(os.path.join(src_root, ".git"), ignore_errors=True)
        log(f"git {url} at {head.stdout.decode().strip()}")
        return src_root, tree_sha256(src_root)
    tarball = os.path.join(tmp, "in", "source.tarball")  # tarfile detects the compression itself
    if r.source_kind == "file":
        shutil.copyfile(r.source, tarball)
        digest = sha256_file(tarball)
    else:
        digest = download(r.source, tarball, req.download_timeout, req.validate_certs, log)
    if checksum and digest != checksum:
        raise InputError(f"checksum={checksum} does not match source={r.source} (sha256 {digest})")
    unpack = os.path.join(tmp, "work", "unpack")
    try:
        safe_extract_tar(tarball, unpack)
    except tarfile.TarError as exc:
        raise BuildError(f"source={r.source} is not a readable tarball: {exc}") from exc
    os.rename(_single_top_dir(unpack), src_root)
    return src_root, digest


# --------------------------------------------------------------------------- the container script


def build_script(r: Resolved, jobs: int, signing: bool) -> str:
    """The shell script run inside the developer container (POSIX sh)."""
    req = r.req
    q = shlex.quote
    kver = q(r.kernel_release)
    lines = [
        "set -eu",
        f"KVER={kver}",
        f"W={WORK_DIR}",
        "JOBS=%s" % (str(int(jobs)) if jobs > 0 else "$(nproc 2>/dev/null || echo 2)"),
        'T0=$(date +%s)',
        'log() { echo "modulus: [+$(( $(date +%s) - T0 )) s] $*"; }',
        'log "target kernel $KVER (uname -r inside is the host\'s: $(uname -r))"',
        'BUILD=/lib/modules/$KVER/build',
        f"LEGACY={q(req.legacy_prepare)}",
        'if [ "$LEGACY" = always ] || { [ "$LEGACY" = auto ] && [ ! -e "$BUILD/Makefile" ]; }; then',
        '  [ "$LEGACY" = never ] && { log "no $BUILD in the image"; exit 3; }',
        '  log "legacy image: no usable $BUILD; preparing kernel sources (emerge-gitclone; emerge -gKv coreos-sources; make modules_prepare)"',
        "  emerge-gitclone",
        "  emerge -gKv coreos-sources",
        '  cp /usr/lib/modules/$KVER/build/.config /usr/src/linux/.config 2>/dev/null || zcat /proc/config.gz > /usr/src/linux/.config 2>/dev/null || true',
        "  make -C /usr/src/linux olddefconfig modules_prepare",
        "  BUILD=/usr/src/linux",
        '  EXTRA="SYSSRC=/usr/src/linux SYSOUT=/usr/src/linux IGNORE_MISSING_MODULE_SYMVERS=1"',
        '  log "legacy kernel sources prepared in /usr/src/linux"',
        "else",
        '  EXTRA=""',
        "fi",
        '[ -e "$BUILD/Makefile" ] || { log "kernel build directory $BUILD is missing"; exit 3; }',
        'if [ -f "$BUILD/Module.symvers" ]; then cp "$BUILD/Module.symvers" "$W/kernel.symvers"; '
        'else log "warning: $BUILD/Module.symvers missing: imported symbol CRCs cannot be checked"; fi',
        '{ gcc --version | head -n1; } > "$W/toolchain.gcc" 2>/dev/null || true',
        '{ make --version | head -n1; } > "$W/toolchain.make" 2>/dev/null || true',
        '{ ld --version | head -n1; } > "$W/toolchain.ld" 2>/dev/null || true',
    ]
    margs = " ".join(q(a) for a in req.make_args)
    if req.recipe == "nvidia":
        kdir = "kernel-open" if r.module_type == "open" else "kernel"
        lines += [
            f'log "extracting the driver archive with its own self-extractor: sh {IN_DIR}/driver.run --extract-only --target $W/tree"',
            f'sh {IN_DIR}/driver.run --extract-only --target "$W/tree"',
            f'[ -d "$W/tree/{kdir}" ] || {{ log "the archive has no {kdir}/ directory (kernel_module_type={r.module_type})"; exit 4; }}',
            # the other flavour's sources are not built: drop them before make (less disk, no writeback racing it)
            f'rm -rf "$W/tree/{"kernel" if kdir == "kernel-open" else "kernel-open"}"',
            f'log "building {kdir} modules: make -j$JOBS KERNEL_UNAME=$KVER $EXTRA {margs} modules"',
            f'make -C "$W/tree/{kdir}" -j"$JOBS" KERNEL_UNAME="$KVER" $EXTRA {margs} modules',
            'log "make done"',
            f'MODDIR="$W/tree/{kdir}"',
        ]
    else:
        sub = validate_subdir(req.subdir)
        mdir = "$W/src" + ("/" + sub if sub else "")
        lines += [
            f'MODDIR="{mdir}"',
            f'[ -d "$MODDIR" ] || {{ log "subdir {q(sub)} does not exist in the source"; exit 4; }}',
            f'log "building: make -C $BUILD M=$MODDIR -j$JOBS $EXTRA {margs} modules"',
            f'make -C "$BUILD" M="$MODDIR" -j"$JOBS" $EXTRA {margs} modules',
            'log "make done"',
        ]
    if signing:
        s = req.signing
        if s is None:
            raise InputError("signing requested without signing_key and signing_cert")
        lines += [
            "SIGN=",
            'for c in "$BUILD/scripts/sign-file" /usr/src/linux/scripts/sign-file /usr/lib/linux-kbuild-*/scripts/sign-file; do',
            '  [ -x "$c" ] && { SIGN="$c"; break; }',
            "done",
            '[ -n "$SIGN" ] || { log "scripts/sign-file not found in the image"; exit 5; }',
            f'log "signing with $SIGN ({q(s.hash_algo)})"',
            'find "$MODDIR" -name "*.ko" -type f | while read -r ko; do',
            f'  "$SIGN" {q(s.hash_algo)} {KEY_DIR}/signing.key {KEY_DIR}/signing.crt "$ko"',
            "done",
        ]
    lines += ['log "build done"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- collecting and checking


def find_modules(moddir: str) -> dict[str, str]:
    """module file name (without .ko) -> path, for every .ko under moddir."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(moddir):
        for fn in files:
            if fn.endswith(".ko"):
                out.setdefault(fn[:-3], os.path.join(dirpath, fn))
    return out


def check_build(mod_paths: dict[str, str], kernel_release: str, kernel_symvers_path: Optional[str],
                build_symvers_path: Optional[str]) -> tuple[list[elfmod.ModuleInfo], list[str], int]:
    """Read and check every module; returns (infos, problems, number of CRCs checked)."""
    ksyms = elfmod.read_symvers(kernel_symvers_path) if kernel_symvers_path and os.path.isfile(kernel_symvers_path) else None
    bsyms = elfmod.read_symvers(build_symvers_path) if build_symvers_path and os.path.isfile(build_symvers_path) else {}
    infos, problems, checked = [], [], 0
    for name in sorted(mod_paths):
        try:
            mi = elfmod.read_module(mod_paths[name])
        except (elfmod.ModuleFormatError, OSError) as exc:
            problems.append(f"{name}.ko: {exc}")
            continue
        res = elfmod.check_module(mi, kernel_release, ksyms, bsyms)
        checked += res.checked
        for p in res.problems():
            problems.append(f"{name}.ko: {p}")
        infos.append(mi)
    return infos, problems, checked


def _file_entry(path: str) -> dict:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(path), "mode": "0777"}
    return {"sha256": sha256_file(path), "size": st.st_size, "mode": "%04o" % (st.st_mode & 0o7777)}


def list_files(root: str) -> dict[str, dict]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, root)
            if rel == "manifest.json":
                continue
            out[rel] = _file_entry(p)
    return dict(sorted(out.items()))


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def module_record(mi: elfmod.ModuleInfo, rel: str) -> dict:
    sig = mi.signature
    return {"name": mi.name, "file": rel, "vermagic": mi.vermagic, "depends": mi.depends,
            "signer": sig.signer if sig else None, "sig_key": sig.key_id if sig else None,
            "sig_hashalgo": sig.hash_algo if sig else None, "size": mi.size,
            "srcversion": mi.first("srcversion"), "license": mi.first("license")}


def stage_output(r: Resolved, tmp: str, source_sha256: str, log_path: str, log: LogFn) -> tuple[str, dict]:
    """Check the build in tmp/work and lay out tmp/stage as DEST; returns (stage dir, manifest)."""
    work = os.path.join(tmp, "work")
    if r.req.recipe == "nvidia":
        kdir = "kernel-open" if r.module_type == "open" else "kernel"
        moddir = os.path.join(work, "tree", kdir)
    else:
        sub = validate_subdir(r.req.subdir)
        moddir = os.path.join(work, "src", sub) if sub else os.path.join(work, "src")
    mods = find_modules(moddir)
    have = {module_key(n) for n in mods}
    missing = [m for m in r.expected_modules if module_key(m) not in have]
    if missing:
        raise BuildError("the build did not produce the expected module(s) {} (it produced: {})".format(", ".join(missing), ", ".join(sorted(mods)) or "none"))
    kernel_symvers = os.path.join(work, "kernel.symvers")
    infos, problems, checked = check_build(mods, r.kernel_release, kernel_symvers, os.path.join(moddir, "Module.symvers"))
    if problems:
        raise BuildError("modules do not fit kernel {}: {}".format(r.kernel_release, "; ".join(problems[:40])))
    crc_note = f"{checked} imported symbol CRCs match" if os.path.isfile(kernel_symvers) \
        else "image has no Module.symvers: CRCs not checked"
    log(f"checked {len(infos)} module(s) against {r.kernel_release}: vermagic ok, {crc_note}")

    stage = os.path.join(tmp, "stage")
    kmod_dir = os.path.join(stage, "lib", "modules", r.kernel_release)
    os.makedirs(kmod_dir)
    records = []
    for mi in infos:
        base = os.path.basename(mi.path)
        target = os.path.join(kmod_dir, base)
        os.replace(mi.path, target)  # same filesystem: a rename, not a copy
        os.chmod(target, 0o644)
        records.append(module_record(mi, f"lib/modules/{r.kernel_release}/{base}"))
    if r.req.recipe == "nvidia":
        tree = os.path.join(work, "tree")
        man = os.path.join(tree, ".manifest")
        if not os.path.isfile(man):
            raise BuildError("the extracted archive has no .manifest")
        with open(man, encoding="utf-8", errors="replace") as f:
            header, entries = parse_nvidia_manifest(f.read())
        if header.get("version") and header["version"] != r.driver_version:
            raise BuildError("the archive is driver {}, not version={}".format(header["version"], r.driver_version))
        for item in plan_userspace(entries, r.driver_version):
            target = os.path.join(stage, item.dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if item.link_target is not None:
                os.symlink(item.link_target, target)
                continue
            src = os.path.join(tree, item.src or "")
            if not os.path.isfile(src) or os.path.islink(src):
                raise BuildError(f".manifest lists {item.src} but the archive has no such regular file")
            shutil.copyfile(src, target)
            os.chmod(target, item.mode)
        for d in ("lib", "bin"):  # dangling symlinks (a target the manifest did not ship) are an error
            base = os.path.join(stage, d)
            for dirpath, _dirs, files in os.walk(base):
                for fn in files:
                    p = os.path.join(dirpath, fn)
                    if os.path.islink(p) and not os.path.exists(p):
                        raise BuildError(f"symlink {os.path.relpath(p, stage)} -> {os.readlink(p)} points to nothing")
    shutil.copyfile(log_path, os.path.join(stage, "build.log"))
    rel = r.image_release
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "os": rel.get("ID") or ("flatcar" if "FLATCAR_RELEASE_VERSION" in rel else
                                "coreos" if "COREOS_RELEASE_VERSION" in rel else None),
        "board": r.board,
        "os_version": r.image_version,
        "channel": r.req.channel,
        "kernel_release": r.kernel_release,
        "arch": r.arch,
        "recipe": r.req.recipe,
        "driver": r.driver,
        "driver_version": r.driver_version,
        "module_type": r.module_type,
        "signing_key_fingerprint": r.req.signing.cert_fingerprint if r.req.signing else None,
        "source": r.source if r.source_kind != "file" else os.path.basename(r.source),
        "source_sha256": source_sha256,
        "inputs_sha256": r.inputs_sha256,
        "toolchain": {k: _read_text(os.path.join(work, "toolchain." + k)) for k in ("gcc", "make", "ld")},
        "crc_checked": checked,
        "files": {},
        "modules": records,
        "build_time": utc_now(),
    }
    manifest["files"] = list_files(stage)
    atomic_write(os.path.join(stage, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    # the checksums were just computed from these files: check that each one is there with its size
    missing = [rel for rel, meta in manifest["files"].items()
               if not os.path.lexists(os.path.join(stage, rel))
               or ("size" in meta and os.path.getsize(os.path.join(stage, rel)) != meta["size"])]
    if missing:
        raise BuildError("staged output does not verify: {}".format(", ".join(missing)))
    return stage, manifest


def swap_into_place(stage: str, dest: str) -> None:
    """Rename stage to dest; the previous dest is kept aside until the rename succeeded."""
    old = None
    if os.path.lexists(dest):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=os.path.dirname(dest))
        os.rmdir(old)
        os.rename(dest, old)
    try:
        os.rename(stage, dest)
    except OSError:
        if old:
            os.rename(old, dest)
        raise
    if old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


# --------------------------------------------------------------------------- the whole build


@dataclass
class BuildOutcome:
    changed: bool
    manifest: Optional[dict]
    inputs_sha256: str
    reason: str
    resolved: Resolved
    log_path: Optional[str] = None
    duration: float = 0.0
    container_seconds: float = 0.0
    method: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)


def _devcontainer():
    from ansible_collections.modulus.kmods.plugins.module_utils import devcontainer
    return devcontainer


def plan(req: BuildRequest) -> tuple[Resolved, bool, Optional[dict], str]:
    """Resolve the request and decide: (resolved, up to date?, existing manifest, reason)."""
    if not os.path.isfile(req.image):
        raise InputError(f"image={req.image!r} is not a file")
    info = _devcontainer().image_info(req.image)
    r = resolve(req, info)
    if req.force:
        return r, False, read_manifest(req.dest), "force"
    ok, m, why = up_to_date(req.dest, r.inputs_sha256)
    return r, ok, m, why


def known_failure(r: Resolved) -> Optional[dict]:
    if r.req.force:
        return None
    marker = read_failure_marker(r.req.dest)
    if marker and marker.get("inputs_sha256") == r.inputs_sha256:
        return marker
    return None


def run_build(r: Resolved, log: LogFn) -> BuildOutcome:
    """Compile, check, lay out and install into dest. Raises BuildError/InputError on failure
    (after writing the failure marker for build and check failures).

    Runs under an exclusive lock on ``<dest>.lock``: a second run for the same dest waits, then
    finds the first one's result and reports it unchanged (unless ``force``)."""
    parent = os.path.dirname(os.path.normpath(r.req.dest))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.normpath(r.req.dest) + ".lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not r.req.force:
            ok, m, why = up_to_date(r.req.dest, r.inputs_sha256)
            if ok:
                log("another run built it meanwhile")
                return BuildOutcome(changed=False, manifest=m, inputs_sha256=r.inputs_sha256, reason=why,
                                    resolved=r, log_path=os.path.join(r.req.dest, "build.log"))
        return _run_build_locked(r, log, parent)


def _run_build_locked(r: Resolved, log: LogFn, parent: str) -> BuildOutcome:
    req = r.req
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(req.dest))}.build-", dir=parent)
    os.chmod(tmp, 0o700)
    log_path = os.path.join(tmp, "build.log")
    keys = None
    try:
        for d in ("in", "work"):
            os.makedirs(os.path.join(tmp, d))
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"modulus kmod_build {r.req.recipe} {r.driver} {r.driver_version} for kernel {r.kernel_release},"
                    f" image {req.image} ({r.board} {r.image_version}), inputs {r.inputs_sha256}\n")
        _src_path, source_sha = prepare_source(r, tmp, log)
        timings = {"prepare": time.monotonic() - started}
        binds_ro = [(os.path.join(tmp, "in"), IN_DIR)]
        if req.signing:
            keys = tempfile.mkdtemp(prefix="keys-", dir=tmp)
            os.chmod(keys, 0o700)
            shutil.copyfile(req.signing.key_path, os.path.join(keys, "signing.key"))
            os.chmod(os.path.join(keys, "signing.key"), 0o600)
            shutil.copyfile(req.signing.cert_path, os.path.join(keys, "signing.crt"))
            binds_ro.append((keys, KEY_DIR))
        script = build_script(r, req.jobs, bool(req.signing))
        with open(os.path.join(tmp, "in", "build.sh"), "w", encoding="utf-8") as f:
            f.write(script)
        dc = _devcontainer()
        res = dc.run_in_image(req.image, ["/bin/sh", IN_DIR + "/build.sh"], binds_ro=binds_ro,
                              binds_rw=[(os.path.join(tmp, "work"), WORK_DIR)],
                              env={"KERNEL_UNAME": r.kernel_release, "LC_ALL": "C"}, workdir=WORK_DIR,
                              timeout=req.timeout, log_path=log_path, method=req.run_method, log=log,
                              scratch_dir=tmp)
        if keys:
            shutil.rmtree(keys, ignore_errors=True)
            keys = None
        if res.rc != 0:
            why = f"timed out after {req.timeout:.0f} s" if res.timed_out else f"exited with rc {res.rc}"
            raise BuildError(f"build in {os.path.basename(req.image)} {why}", res.output_tail, log_path)
        timings["container"] = res.duration
        mark = time.monotonic()
        stage, manifest = stage_output(r, tmp, source_sha, log_path, log)
        timings["check_and_stage"] = time.monotonic() - mark
        mark = time.monotonic()
        swap_into_place(stage, req.dest)
        clear_failure_marker(req.dest)
        shutil.rmtree(tmp, ignore_errors=True)
        timings["install_and_cleanup"] = time.monotonic() - mark
        timings = {k: round(v, 3) for k, v in timings.items()}
        log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        return BuildOutcome(changed=True, manifest=manifest, inputs_sha256=r.inputs_sha256, reason="built",
                            resolved=r, log_path=os.path.join(req.dest, "build.log"),
                            duration=time.monotonic() - started, container_seconds=res.duration, method=res.method,
                            timings=timings)
    except BuildError as exc:
        tail = exc.log_tail  # set for failures inside the container; a failed check names its problems itself
        marker = write_failure_marker(req.dest, r.inputs_sha256, exc.msg, log_path)
        raise BuildError(exc.msg, tail, marker_paths(req.dest)[1] if marker else None) from None
    finally:
        if keys:
            shutil.rmtree(keys, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def summary(manifest: Optional[dict]) -> dict:
    if not manifest:
        return {}
    return {k: manifest.get(k) for k in ("kernel_release", "os_version", "driver", "driver_version", "module_type",
                                         "inputs_sha256", "source_sha256", "signing_key_fingerprint")}
