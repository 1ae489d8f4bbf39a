# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_build's NVIDIA recipe: NVIDIA's ``.run`` and what is taken from it.

- where the ``.run`` is downloaded from (URL templates with ``{version}``, ``{arch}``, ``{branch}``);
- its part of the build script: the ``.run`` is extracted by its own self-extractor *inside the
  container* (the stub, a shell script from the download, never runs as root on the host), then
  ``make -C <tree>/kernel[-open] KERNEL_UNAME=<kver> modules`` as DKMS does;
- the archive's ``.manifest`` (one line per file) and the userspace files laid out in DEST from it.

Which variant (``proprietary`` or ``open``) a driver version gets is ``identity.resolve_module_type``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import UnsafePathError, is_regular, safe_relpath
from ansible_collections.modulus.kmods.plugins.module_utils.identity import NVIDIA, check_driver_version
from ansible_collections.modulus.kmods.plugins.module_utils.sources import BuildError, InputError

NVIDIA_URL_TEMPLATE = "https://us.download.nvidia.com/XFree86/Linux-{arch}/{version}/NVIDIA-Linux-{arch}-{version}.run"
NVIDIA_TESLA_URL_TEMPLATE = "https://us.download.nvidia.com/tesla/{version}/NVIDIA-Linux-{arch}-{version}.run"
NVIDIA_DEFAULT_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")
ARCHES = ("x86_64", "aarch64")  # what NVIDIA publishes .run files for, and Flatcar's boards
_PERMS_RE = re.compile(r"[0-7]{4}")
_TYPE_RE = re.compile(r"[A-Z0-9_]+")


def check_version(version: Optional[str], option: str = "version") -> str:
    """An NVIDIA driver version such as 535.104.05 (``IdentityError`` otherwise)."""
    return check_driver_version(option, version, NVIDIA)


def nvidia_url(version: str, arch: str, template: str = NVIDIA_URL_TEMPLATE) -> str:
    check_version(version)
    if arch not in ARCHES:
        raise InputError("arch={!r} is not one of {}".format(arch, ", ".join(ARCHES)))
    try:
        return template.format(version=version, arch=arch, branch=version.split(".")[0])
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"url_template={template!r} cannot be formatted ({{version}}, {{arch}}, {{branch}}): {exc}") from exc


def kernel_dir(module_type: Optional[str]) -> str:
    """The directory of the extracted ``.run`` that holds the kernel modules' sources."""
    return "kernel-open" if module_type == "open" else "kernel"


def script_lines(module_type: Optional[str], make_args: str, in_dir: str) -> list[str]:
    """The NVIDIA part of the build script (POSIX sh; ``$W``, ``$KVER``, ``$JOBS``, ``$EXTRA`` and
    ``log`` come from the common part); leaves ``MODDIR`` set to the built module directory."""
    kdir = kernel_dir(module_type)
    other = "kernel" if kdir == "kernel-open" else "kernel-open"
    return [
        f'log "extracting the driver archive with its own self-extractor: sh {in_dir}/driver.run --extract-only --target $W/tree"',
        f'sh {in_dir}/driver.run --extract-only --target "$W/tree"',
        f'[ -d "$W/tree/{kdir}" ] || {{ log "the archive has no {kdir}/ directory (kernel_module_type={module_type})"; exit 4; }}',
        # the other flavour's sources are not built: drop them before make (less disk, no writeback racing it)
        f'rm -rf "$W/tree/{other}"',
        f'log "building {kdir} modules: make -j$JOBS KERNEL_UNAME=$KVER $EXTRA {make_args} modules"',
        f'make -C "$W/tree/{kdir}" -j"$JOBS" KERNEL_UNAME="$KVER" $EXTRA {make_args} modules',
        'log "make done"',
        f'MODDIR="$W/tree/{kdir}"',
    ]


# --------------------------------------------------------------------------- the .manifest


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
        if len(parts) < 3 or not _PERMS_RE.fullmatch(parts[1]) or not _TYPE_RE.fullmatch(parts[2]):
            continue
        rest = parts[3:]
        arch = rest[0] if rest and rest[0] in ("NATIVE", "COMPAT32") else None
        if arch:
            rest = rest[1:]
        entries.append(ManifestEntry(path=parts[0], perms=int(parts[1], 8), type=parts[2], arch=arch, extra=rest))
    return header, entries


def _tree_path(p: str) -> str:
    try:
        return safe_relpath(os.path.normpath(p))
    except UnsafePathError:
        raise BuildError(f".manifest: path {p!r} leaves the extracted tree") from None


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
            dest = "{}/{}".format("bin" if "BIN" in t else "lib", base)
            item = UserspaceFile(src=None, dest=dest, mode=0o777, link_target=target)
        elif t.endswith("_LIB") or t.endswith("_SHARED_LIB"):
            if ".so" not in base:
                continue
            dest = f"lib/{base}"
            item = UserspaceFile(src=_tree_path(e.path), dest=dest, mode=e.perms & 0o755 or 0o755)
        elif t.endswith("_BINARY"):
            dest = f"bin/{base}"
            item = UserspaceFile(src=_tree_path(e.path), dest=dest, mode=e.perms & 0o755 or 0o755)
        elif t == "FIRMWARE":
            dest = f"lib/firmware/nvidia/{version}/{base}"
            item = UserspaceFile(src=_tree_path(e.path), dest=dest, mode=0o644)
        else:
            continue
        if dest in seen:
            continue
        seen.add(dest)
        out.append(item)
    return out


def stage_userspace(tree: str, stage: str, driver_version: str) -> None:
    """Lay out the userspace files of the extracted ``.run`` at ``tree`` in ``stage`` (DEST-to-be)."""
    man = os.path.join(tree, ".manifest")
    if not os.path.isfile(man):
        raise BuildError("the extracted archive has no .manifest")
    with open(man, encoding="utf-8", errors="replace") as f:
        header, entries = parse_nvidia_manifest(f.read())
    if header.get("version") and header["version"] != driver_version:
        raise BuildError("the archive is driver {}, not version={}".format(header["version"], driver_version))
    for item in plan_userspace(entries, driver_version):
        target = os.path.join(stage, item.dest)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if item.link_target is not None:
            os.symlink(item.link_target, target)
            continue
        src = os.path.join(tree, item.src or "")
        if not is_regular(src):
            raise BuildError(f".manifest lists {item.src} but the archive has no such regular file")
        shutil.copyfile(src, target)
        os.chmod(target, item.mode)
    for d in ("lib", "bin"):  # dangling symlinks (a target the manifest did not ship) are an error
        for dirpath, _dirs, files in os.walk(os.path.join(stage, d)):
            for fn in files:
                p = os.path.join(dirpath, fn)
                if os.path.islink(p) and not os.path.exists(p):
                    raise BuildError(f"symlink {os.path.relpath(p, stage)} -> {os.readlink(p)} points to nothing")
