# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retire the other versions of a driver from a host's archive once one version serves it.

A host keeps one version of each driver (the one its settings name). The builds of the other versions
in ``<archive_root>/<driver>/<version>/<kernel>/`` go, except a build whose modules the running kernel
has loaded: the kernel keeps that code until the next boot, and a build that is in use must stay
where its files can be seen (kernel modules cannot be replaced under a running driver).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.modulus.kmods.plugins.module_utils import kload

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+~-]*")


class RetireError(Exception):
    """Bad input; the message names the option and the value."""


@dataclass
class Retired:
    removed: list[str] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.removed)


def check_version(option: str, value: str) -> str:
    if not isinstance(value, str) or not _VERSION_RE.fullmatch(value) or value in (".", ".."):
        raise RetireError(f"{option}={value!r} is not a driver version (letters, digits and . _ + ~ -)")
    return value


def loaded_by(manifest: dict[str, Any], host_root: str) -> list[str]:
    """Modules of the build the running kernel has loaded: same name, and the same srcversion
    whenever the kernel tells it (without one, a module of that name counts as this build's)."""
    loaded = kload.loaded_modules(host_root)
    found = []
    for mod in manifest.get("modules") or []:
        name = str(mod.get("name") or "")
        if not name or name.replace("-", "_") not in {m.replace("-", "_") for m in loaded}:
            continue
        have = kload.loaded_srcversion(name.replace("-", "_"), host_root)
        if have is None or not mod.get("srcversion") or have == mod.get("srcversion"):
            found.append(name)
    return found


def running_kernel(host_root: str) -> str | None:
    """The kernel release the host runs (``/proc/sys/kernel/osrelease``), None when unknown."""
    try:
        with open(os.path.join(host_root, "proc/sys/kernel/osrelease"), encoding="ascii") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _read_manifest(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remove(path: str, check: bool) -> None:
    if check:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def retire(archive_root: str, driver: str, keep_version: str, host_root: str = "/", check: bool = False) -> Retired:
    """Remove every build of ``driver`` in ``archive_root`` whose version is not ``keep_version``,
    except the loaded ones. ``archive_root`` is seen from here (host root included)."""
    from ansible_collections.modulus.kmods.plugins.module_utils.identity import check_name

    check_name("driver", driver)
    check_version("driver_version", keep_version)
    out = Retired()
    base = os.path.join(archive_root, driver)
    if not os.path.isdir(base):
        return out
    kernel_now = running_kernel(host_root)
    for version in sorted(os.listdir(base)):
        vdir = os.path.join(base, version)
        if version == keep_version or version.startswith(".") or not os.path.isdir(vdir) or os.path.islink(vdir):
            continue
        gone: list[str] = []
        kept_here: list[str] = []
        for kernel in sorted(os.listdir(vdir)):
            kdir = os.path.join(vdir, kernel)
            if kernel.startswith(".") or not os.path.isdir(kdir):
                continue  # a build's lock, failure marker or temporary directory: goes with its build
            # only a build for the running kernel can be loaded in it (another kernel's may have the same srcversion)
            mods = [] if kernel_now not in (None, kernel) else loaded_by(
                _read_manifest(os.path.join(kdir, "manifest.json")), host_root)
            if mods:
                out.kept.append({"path": kdir, "version": version, "kernel_release": kernel,
                                 "reason": "loaded in the running kernel: " + ", ".join(mods)})
                kept_here.append(kernel)
            else:
                gone.append(kernel)
        if not kept_here:
            _remove(vdir, check)
            out.removed.append(vdir)
            continue
        for kernel in gone:
            _remove(os.path.join(vdir, kernel), check)
            out.removed.append(os.path.join(vdir, kernel))
            for name in sorted(os.listdir(vdir)):  # its failure marker, lock, temporary directories
                if name.startswith((kernel + ".", "." + kernel + ".")):
                    _remove(os.path.join(vdir, name), check)
    return out
