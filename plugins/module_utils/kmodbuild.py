# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_build: compile out-of-tree kernel modules inside a developer container.

Two recipes:

- ``nvidia``: NVIDIA's ``.run`` (download by URL template, a mirror URL or a local file, optional
  SHA-256 pin), extracted and built inside the container; userspace files collected per the
  archive's ``.manifest`` (``nvidia.py``).
- ``generic``: any Kbuild out-of-tree source (directory, tarball path/URL, git URL + ref), built
  with ``make -C /lib/modules/<kver>/build M=<src> modules`` plus make arguments.

This module is the orchestration: resolve a request against the image (``resolve``/``plan``),
prepare the source (``sources.py``), run the build script in the image (``container.py``), check
the result (vermagic and CRCs with ``elfmod.py``, expected modules), lay it out with its
``manifest.json`` (``manifest.py``) in a workspace beside ``dest`` and swap it into place
(``fsutil.py``). The previous ``dest`` stays until the new one is complete.
"""

from __future__ import annotations

import base64
import datetime
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import (
    container,
    elfmod,
    fsutil,
    imageinfo,
    mounts,
    nvidia,
    sources,
)
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn
from ansible_collections.modulus.kmods.plugins.module_utils.elfmod import check_build, find_modules
from ansible_collections.modulus.kmods.plugins.module_utils.identity import (
    MANIFEST_SIGNER_KEY,
    NVIDIA,
    IdentityError,
    check_driver_version,
    check_kernel_release,
    check_name,
    resolve_module_type,
)
from ansible_collections.modulus.kmods.plugins.module_utils.nvidia import NVIDIA_URL_TEMPLATE
from ansible_collections.modulus.kmods.plugins.module_utils.sources import FAILURE_TEXT, BuildError, InputError

BOARD_ARCH = {"amd64-usr": "x86_64", "arm64-usr": "aarch64"}
RECIPES = ("nvidia", "generic")
_MAKE_ARG_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^\n\0]*|-[A-Za-z-][^\n\0]*|[A-Za-z0-9_.-]+")

_ERROR_LINE_RE = re.compile(r"error:|Error ")
MAX_ERROR_LINES = 5
IN_DIR = "/modulus/in"
WORK_DIR = "/modulus/work"
KEY_DIR = "/modulus/keys"


# --------------------------------------------------------------------------- requests


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
    module_type: str  # proprietary | open for NVIDIA, default for every other driver
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
        body = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.S)
        if not body:
            raise InputError(f"signing_cert={cert_path!r} holds no PEM certificate")
        data = base64.b64decode(b"".join(body.group(1).split()))
    return hashlib.sha256(data).hexdigest()


def validate_make_args(args: list[str]) -> list[str]:
    for a in args:
        if not isinstance(a, str) or not _MAKE_ARG_RE.fullmatch(a):
            raise InputError(f"make_args entry {a!r} is not VAR=value, an option or a target name")
    return list(args)


def module_key(name: str) -> str:
    """Kernel module names treat '-' and '_' alike."""
    return name.replace("-", "_")


# --------------------------------------------------------------------------- inputs


def _source_text(module: ModuleType) -> bytes:
    """A module's source, also when it is imported from a zip (Ansible runs modules that way)."""
    loader: Any = getattr(module, "__loader__", None)
    path = str(module.__file__)
    if loader is not None and hasattr(loader, "get_data"):
        try:
            return loader.get_data(path)
        except OSError:
            pass
    with open(path, "rb") as f:
        return f.read()


@functools.cache
def build_logic_hash() -> str:
    """sha256 over the source of the code that shapes a build's output (this module, the NVIDIA
    recipe, sources, the module checks, the manifest): any change to it changes ``inputs_sha256``."""
    h = hashlib.sha256()
    for module in (sys.modules[__name__], nvidia, sources, elfmod, mf):
        h.update(module.__name__.rsplit(".", 1)[-1].encode() + b"\0" + _source_text(module) + b"\0")
    return h.hexdigest()


def compute_inputs_sha256(r: Resolved) -> str:
    req = r.req
    doc = {
        "logic": build_logic_hash(),
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


def resolve(req: BuildRequest, info: imageinfo.ImageInfo) -> Resolved:
    """Validate the request against the image's ImageInfo; no network, no container.
    Every bad value is an ``InputError`` naming the option."""
    try:
        return _resolve(req, info)
    except IdentityError as exc:
        raise InputError(str(exc)) from None


def _kernel_release(req: BuildRequest, kernels: list[str]) -> str:
    if req.kernel_release:
        kver = check_kernel_release("kernel_release", req.kernel_release)
        if kernels and kver not in kernels:
            raise InputError("kernel_release={!r} is not in the image (it has {})".format(kver, ", ".join(kernels)))
        return kver
    if len(kernels) == 1:
        return kernels[0]
    if not kernels:
        raise InputError(f"image={req.image!r} holds no kernel under /usr/lib/modules; set kernel_release")
    raise InputError("image={!r} holds several kernels ({}); set kernel_release".format(req.image, ", ".join(kernels)))


def _resolve(req: BuildRequest, info: imageinfo.ImageInfo) -> Resolved:
    if req.recipe not in RECIPES:
        raise InputError("recipe={!r} is not one of {}".format(req.recipe, ", ".join(RECIPES)))
    if not os.path.isabs(req.dest) or os.path.normpath(req.dest) in ("/", "/usr", "/etc", "/var", "/opt"):
        raise InputError(f"dest={req.dest!r} must be an absolute path of a directory of its own")
    dest = os.path.normpath(req.dest)
    if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
        raise InputError(f"dest={req.dest!r} exists and is not a directory (a symlink or a file is not replaced)")
    if req.legacy_prepare not in ("auto", "always", "never"):
        raise InputError(f"legacy_prepare={req.legacy_prepare!r} is not one of auto, always, never")
    validate_make_args(req.make_args)
    kver = _kernel_release(req, list(info.kernel_releases))
    arch = req.arch or BOARD_ARCH.get(info.board or "", "x86_64")
    if arch not in nvidia.ARCHES:
        raise InputError("arch={!r} is not one of {}".format(arch, ", ".join(nvidia.ARCHES)))
    checksum = sources.validate_sha256(req.checksum)
    # an NVIDIA version is checked first: it is part of the default URL
    version = nvidia.check_version(req.version) if req.recipe == "nvidia" else (req.version or "0")
    kind = sources.source_kind(req.recipe, req.source, req.git_ref)
    if req.recipe == "nvidia":
        driver = NVIDIA
        mtype = resolve_module_type(driver, version, req.kernel_module_type, "kernel_module_type")
        source = req.source or nvidia.nvidia_url(version, arch, req.url_template)
        modules = list(req.modules) if req.modules else list(nvidia.NVIDIA_DEFAULT_MODULES)
    else:
        driver = check_name("name", req.name or "")
        check_driver_version("version", version, driver)
        mtype = resolve_module_type(driver, version, None)  # kernel_module_type is NVIDIA's: "default"
        source = req.source or ""
        if not req.modules:
            raise InputError("modules is required with recipe=generic: the module names the build must produce")
        modules = list(req.modules)
        sources.validate_git_ref(req.git_ref)
    for m in modules:
        check_name("modules", m)
    sources.validate_subdir(req.subdir)
    identity = sources.source_identity(kind, source, checksum, req.git_ref)
    r = Resolved(req=req, driver=driver, driver_version=version, module_type=mtype, arch=arch, kernel_release=kver,
                 image_release=dict(info.release), image_version=info.version, board=info.board, source_kind=kind,
                 source=source, source_identity=identity, expected_modules=modules)
    r.inputs_sha256 = compute_inputs_sha256(r)
    return r


# --------------------------------------------------------------------------- DEST state: manifest, marker


def read_manifest(dest: str) -> Optional[dict]:
    """The checked manifest of ``dest``, or None (missing or unusable)."""
    try:
        return mf.load_manifest(dest)
    except mf.ManifestError:
        return None


def up_to_date(dest: str, inputs_sha256: str) -> tuple[bool, Optional[dict], str]:
    if not os.path.lexists(os.path.join(dest, mf.MANIFEST_NAME)):
        return False, None, "no manifest in dest"
    try:
        m = mf.load_manifest(dest)
    except mf.ManifestError as exc:
        return False, None, f"unusable manifest in dest: {exc}"
    if m.get("inputs_sha256") != inputs_sha256:
        return False, m, "inputs changed"
    problems = mf.verify_tree(dest, m, strict=False)
    if problems:
        return False, m, "dest does not verify: " + "; ".join(problems[:5])
    return True, m, "up to date"


def marker_paths(dest: str) -> tuple[str, str]:
    d = os.path.normpath(dest)
    return d + ".failed.json", d + ".failed.log"


def read_failure_marker(dest: str) -> Optional[dict]:
    try:
        with open(marker_paths(dest)[0], encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_failure_marker(dest: str, inputs_sha256: str, message: str, log_src: Optional[str], kind: str = "build",
                         errors: Optional[list[str]] = None, duration: Optional[float] = None) -> str:
    path, log_path = marker_paths(dest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    has_log = keep_failed_log(dest, log_src)
    fsutil.write_json_atomic(path, {"inputs_sha256": inputs_sha256, "message": message, "time": utc_now(),
                                    "log": log_path if has_log else None, "kind": kind, "errors": list(errors or []),
                                    "duration": None if duration is None else round(duration, 3)})
    return path


def keep_failed_log(dest: str, log_src: Optional[str]) -> bool:
    """Copy a failed run's log to ``DEST.failed.log`` (every failure, remembered or not)."""
    if not (log_src and os.path.isfile(log_src)):
        return False
    fsutil.atomic_copy(str(log_src), marker_paths(dest)[1])
    return True


def clear_failure_marker(dest: str) -> None:
    for p in marker_paths(dest):
        if os.path.exists(p):
            os.unlink(p)


def first_errors(log_path: Optional[str], limit: int = MAX_ERROR_LINES) -> list[str]:
    """The first lines of a build log that name an error (the compiler's ``error:``, make's
    ``Error N``), at most ``limit``, each cut to 300 characters; kmod_build's own lines are skipped."""
    found: list[str] = []
    if not log_path:
        return found
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                text = line.strip()
                if not text or text.startswith(("modulus: ", "=== ", "modulus kmod_build ")):
                    continue
                if _ERROR_LINE_RE.search(text) and text[:300] not in found:
                    found.append(text[:300])
                    if len(found) >= limit:
                        break
    except OSError:
        pass
    return found


def failure_reason(exc: BuildError) -> str:
    """The ``reason`` of a failed run: what failed, and whether it is remembered."""
    what = FAILURE_TEXT.get(exc.kind, exc.kind)
    if exc.remembered:
        where = exc.marker or "DEST.failed.json"
        return f"build failed: {what}; remembered in {where} (the same inputs fail at once until they change or force=true)"
    return f"build failed: {what} (transient: not remembered, the next run tries again)"


def known_failure_message(dest: str, marker: dict) -> str:
    """The fail-fast message: the remembered failure, the compiler's first errors and the log."""
    kind = str(marker.get("kind") or "build")
    parts = ["a previous build with the same inputs failed ({}, {}): {}: {}".format(
        marker_paths(dest)[0], marker.get("time") or "time unknown", FAILURE_TEXT.get(kind, kind),
        str(marker.get("message") or "").strip())]
    errors = [str(e) for e in (marker.get("errors") or []) if e][:MAX_ERROR_LINES]
    if errors:
        parts.append("first errors:\n  " + "\n  ".join(errors))
    if marker.get("log"):
        parts.append(f"build log: {marker['log']}")
    parts.append("not retrying until the inputs change or force=true")
    return "\n".join(parts)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- the container script


def build_script(r: Resolved, jobs: int, signing: bool) -> str:
    """The shell script run inside the developer container (POSIX sh)."""
    req = r.req
    q = shlex.quote
    lines = [
        "set -eu",
        f"KVER={q(r.kernel_release)}",
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
        lines += nvidia.script_lines(r.module_type, margs, IN_DIR)
    else:
        sub = sources.validate_subdir(req.subdir)
        lines += [
            'MODDIR="$W/src{}"'.format("/" + sub if sub else ""),
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


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _os_id(release: dict[str, str]) -> Optional[str]:
    if release.get("ID"):
        return release["ID"]
    if "FLATCAR_RELEASE_VERSION" in release:
        return "flatcar"
    return "coreos" if "COREOS_RELEASE_VERSION" in release else None


def stage_output(r: Resolved, tmp: str, source_sha256: str, log_path: str, log: LogFn) -> tuple[str, dict]:
    """Check the build in tmp/work and lay out tmp/stage as DEST; returns (stage dir, manifest)."""
    work = os.path.join(tmp, "work")
    if r.req.recipe == "nvidia":
        moddir = os.path.join(work, "tree", nvidia.kernel_dir(r.module_type))
    else:
        sub = sources.validate_subdir(r.req.subdir)
        moddir = os.path.join(work, "src", sub) if sub else os.path.join(work, "src")
    mods = find_modules(moddir)
    have = {module_key(n) for n in mods}
    missing = [m for m in r.expected_modules if module_key(m) not in have]
    if missing:
        raise BuildError("the build did not produce the expected module(s) {} (it produced: {})".format(
            ", ".join(missing), ", ".join(sorted(mods)) or "none"), kind="missing_module")
    kernel_symvers = os.path.join(work, "kernel.symvers")
    infos, problems, checked = check_build(mods, r.kernel_release, kernel_symvers, os.path.join(moddir, "Module.symvers"))
    if problems:
        raise BuildError("modules do not fit kernel {}: {}".format(r.kernel_release, "; ".join(problems[:40])), kind="abi")
    crc_note = f"{checked} imported symbol CRCs match" if os.path.isfile(kernel_symvers) \
        else "image has no Module.symvers: CRCs not checked"
    log(f"checked {len(infos)} module(s) against {r.kernel_release}: vermagic ok, {crc_note}")

    stage = os.path.join(tmp, "stage")
    kmod_dir = os.path.join(stage, "lib", "modules", r.kernel_release)
    os.makedirs(kmod_dir)
    os.chmod(stage, 0o755)  # becomes dest
    records = []
    for mi in infos:
        base = os.path.basename(mi.path)
        target = os.path.join(kmod_dir, base)
        os.replace(mi.path, target)  # same filesystem: a rename, not a copy
        os.chmod(target, 0o644)
        records.append(mf.module_entry(mi, f"lib/modules/{r.kernel_release}/{base}"))
    if r.req.recipe == "nvidia":
        nvidia.stage_userspace(os.path.join(work, "tree"), stage, r.driver_version)
    shutil.copyfile(log_path, os.path.join(stage, "build.log"))
    manifest = {
        "schema": mf.SCHEMA,
        "os": _os_id(r.image_release),
        "board": r.board,
        "os_version": r.image_version,
        "channel": r.req.channel,
        "kernel_release": r.kernel_release,
        "arch": r.arch,
        "recipe": r.req.recipe,
        "driver": r.driver,
        "driver_version": r.driver_version,
        "module_type": r.module_type,
        MANIFEST_SIGNER_KEY: r.req.signing.cert_fingerprint if r.req.signing else None,
        "source": r.source if r.source_kind != "file" else os.path.basename(r.source),
        "source_sha256": source_sha256,
        "inputs_sha256": r.inputs_sha256,
        "toolchain": {k: _read_text(os.path.join(work, "toolchain." + k)) for k in ("gcc", "make", "ld")},
        "crc_checked": checked,
        "files": mf.list_files(stage),
        "modules": records,
        "build_time": utc_now(),
    }
    mf.write_manifest(stage, manifest)
    # the checksums were just computed from these files: check that each one is there with its size
    problems = mf.verify_tree(stage, manifest, hash_files=False)
    if problems:
        raise BuildError("staged output does not verify: {}".format("; ".join(problems[:10])))
    return stage, manifest


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


def plan(req: BuildRequest) -> tuple[Resolved, bool, Optional[dict], str]:
    """Resolve the request and decide: (resolved, up to date?, existing manifest, reason)."""
    if not os.path.isfile(req.image):
        raise InputError(f"image={req.image!r} is not a file")
    r = resolve(req, imageinfo.image_info(req.image))
    if req.force:
        return r, False, read_manifest(req.dest), "force"
    ok, m, why = up_to_date(req.dest, r.inputs_sha256)
    return r, ok, m, why


def known_failure(r: Resolved) -> Optional[dict]:
    if r.req.force:
        return None
    marker = read_failure_marker(r.req.dest)
    if marker and marker.get("inputs_sha256") == r.inputs_sha256 and marker.get("kind") not in sources.TRANSIENT_KINDS:
        return marker
    return None


def sweep_leftovers(dest: str, log: LogFn) -> fsutil.Sweep:
    """Remove what dead runs left beside ``dest`` (workspaces, their mounts and processes, temporary
    files); call it holding ``fsutil.dest_lock(dest)``. Every step is logged."""
    swept = fsutil.sweep_dest(dest, release=mounts.release_under)
    for line in swept.lines():
        log(line)
    return swept


def sweep_if_idle(dest: str, log: LogFn) -> Optional[fsutil.Sweep]:
    """For a run that builds nothing (up to date, known failure): sweep when no other run holds the
    lock of ``dest`` (never waits; a running build sweeps itself). None when nothing was looked at."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(dest)) or "/"):
        return None
    try:
        with fsutil.dest_lock(dest, wait=False) as held:
            return sweep_leftovers(dest, log) if held else None
    except OSError as exc:  # a read-only parent: nothing can have been left there by us either
        log(f"cannot look for leftovers beside {dest}: {exc}")
        return None


def run_build(r: Resolved, log: LogFn, swept: Optional[list[str]] = None) -> BuildOutcome:
    """Compile, check, lay out and install into dest. Raises BuildError/InputError on failure
    (after writing the failure marker for deterministic failures, see ``BuildError.remembered``).

    Runs under an exclusive lock on ``<dest>.lock``: a second run for the same dest waits, then
    finds the first one's result and reports it unchanged (unless ``force``). Holding it, the run
    first sweeps what dead runs left (``sweep_leftovers``; the lines are appended to ``swept``)."""
    with fsutil.dest_lock(r.req.dest):
        lines = sweep_leftovers(r.req.dest, log).lines()
        if swept is not None:
            swept.extend(lines)
        if not r.req.force:
            ok, m, why = up_to_date(r.req.dest, r.inputs_sha256)
            if ok:
                log("another run built it meanwhile")
                return BuildOutcome(changed=False, manifest=m, inputs_sha256=r.inputs_sha256, reason=why,
                                    resolved=r, log_path=os.path.join(r.req.dest, "build.log"))
        return _run_build_locked(r, log)


def _prepare_source(r: Resolved, tmp: str, log: LogFn) -> str:
    """The source where the container sees it; returns the sha256 of what is built."""
    req = r.req
    checksum = sources.validate_sha256(req.checksum)
    if req.recipe == "nvidia":
        return sources.prepare_run(r.source_kind, r.source, os.path.join(tmp, "in"), checksum,
                                   req.download_timeout, req.validate_certs, log)[1]
    return sources.prepare_tree(r.source_kind, r.source, r.source_identity, os.path.join(tmp, "in"),
                                os.path.join(tmp, "work"), checksum, req.git_ref, req.download_timeout,
                                req.validate_certs, log)[1]


def _run_build_locked(r: Resolved, log: LogFn) -> BuildOutcome:
    req = r.req
    started = time.monotonic()
    tmp = fsutil.make_staging(os.path.normpath(req.dest), "build")
    log_path = os.path.join(tmp, "build.log")
    try:
        for d in ("in", "work"):
            os.makedirs(os.path.join(tmp, d))
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"modulus kmod_build {req.recipe} {r.driver} {r.driver_version} for kernel {r.kernel_release},"
                    f" image {req.image} ({r.board} {r.image_version}), inputs {r.inputs_sha256}\n")
        source_sha = _prepare_source(r, tmp, log)
        timings = {"prepare": time.monotonic() - started}
        binds_ro = [(os.path.join(tmp, "in"), IN_DIR)]
        keys = None
        if req.signing:
            keys = tempfile.mkdtemp(prefix="keys-", dir=tmp)  # 0700
            fsutil.copy_hashed(req.signing.key_path, os.path.join(keys, "signing.key"), 0o600)
            fsutil.copy_hashed(req.signing.cert_path, os.path.join(keys, "signing.crt"), 0o644)
            binds_ro.append((keys, KEY_DIR))
        with open(os.path.join(tmp, "in", "build.sh"), "w", encoding="utf-8") as f:
            f.write(build_script(r, req.jobs, bool(req.signing)))
        try:
            res = container.run_in_image(req.image, ["/bin/sh", IN_DIR + "/build.sh"], binds_ro=binds_ro,
                                         binds_rw=[(os.path.join(tmp, "work"), WORK_DIR)],
                                         env={"KERNEL_UNAME": r.kernel_release, "LC_ALL": "C"}, workdir=WORK_DIR,
                                         timeout=req.timeout, log_path=log_path, method=req.run_method, log=log,
                                         scratch_dir=tmp)
        finally:
            if keys:
                shutil.rmtree(keys, ignore_errors=True)
        if res.rc != 0:
            raise container_failure(req, res, log_path)
        timings["container"] = res.duration
        mark = time.monotonic()
        stage, manifest = stage_output(r, tmp, source_sha, log_path, log)
        timings["check_and_stage"] = time.monotonic() - mark
        mark = time.monotonic()
        try:
            fsutil.swap_into_place(stage, req.dest)
        except fsutil.UnsafePathError as exc:
            raise InputError(f"dest={req.dest!r}: {exc}") from None
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
        raise record_failure(r, exc, log_path, time.monotonic() - started) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        full = BuildError(f"no space left on the device: {exc}", kind="no_space")
        raise record_failure(r, full, log_path, time.monotonic() - started) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def container_failure(req: BuildRequest, res: container.RunResult, log_path: str) -> BuildError:
    """The BuildError of a container run that did not exit 0, with what failed: a timeout, a full
    disk, a kill, or (remembered) the build itself."""
    errors = first_errors(log_path)
    if res.timed_out:
        why, kind = f"timed out after {req.timeout:.0f} s", "timeout"
    elif "No space left on device" in res.output_tail:
        why, kind = f"exited with rc {res.rc}: no space left on the device", "no_space"
    elif res.rc < 0 or res.rc in (128 + 9, 128 + 15):
        why, kind = f"was killed (rc {res.rc})", "killed"
    else:
        why, kind = f"exited with rc {res.rc}", "compile"
    msg = f"build in {os.path.basename(req.image)} {why}"
    if errors and kind == "compile":
        msg += "; first errors:\n  " + "\n  ".join(errors)
    return BuildError(msg, res.output_tail, log_path, kind=kind, errors=errors)


def record_failure(r: Resolved, exc: BuildError, log_path: Optional[str], duration: float) -> BuildError:
    """Keep the log of a failed run in ``DEST.failed.log``; remember a deterministic failure in
    ``DEST.failed.json`` (a transient one is not remembered: the next run tries again). An older
    marker was for other inputs (else this run would not have started) and is dropped."""
    dest = r.req.dest
    clear_failure_marker(dest)
    errors = exc.errors or first_errors(log_path)
    out = BuildError(exc.msg, exc.log_tail, None, kind=exc.kind, errors=errors)
    if out.remembered:
        out.marker = write_failure_marker(dest, r.inputs_sha256, exc.msg, log_path, exc.kind, errors, duration)
        out.log_path = marker_paths(dest)[1] if os.path.isfile(marker_paths(dest)[1]) else None
    elif keep_failed_log(dest, log_path):
        out.log_path = marker_paths(dest)[1]
    return out


def summary(manifest: Optional[dict]) -> dict:
    if not manifest:
        return {}
    return {k: manifest.get(k) for k in ("kernel_release", "os_version", "driver", "driver_version", "module_type",
                                         "inputs_sha256", "source_sha256", MANIFEST_SIGNER_KEY)}
