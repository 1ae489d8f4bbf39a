# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A build as a release-bound systemd-sysext image: name, layout, extension-release, and the image
itself (erofs, squashfs, or a plain directory; ``_install/image_format.py`` picks one).

Layout of the image of driver D for release R (kernel K) -- what ``/usr`` shows once merged::

    usr/lib/extension-release.d/extension-release.modulus-D-R   ID=flatcar VERSION_ID=R (+ MODULUS_* keys)
    usr/lib/modules/K/updates/modulus/D/*.ko                    the build's modules (no modules.* index)
    usr/lib/modprobe.d/10-modulus-D-kmod-sysext.conf            install/remove lines per module -> the helper
    usr/libexec/_modulus-D_modprobe_helper                      depmod in a private namespace, then modprobe
    usr/lib/modules-load.d/modulus-D.conf                        load order
    usr/lib/firmware/...                                         the build's lib/firmware
    usr/lib64/lib*.so*                                           the build's libraries (ld.so's default path)
    usr/bin/*                                                    the build's tools
    usr/share/modulus/D/manifest.json                            the build's manifest

The module index follows Flatcar's own kmod extensions (``_install/kmod_sysext.py``): the image ships
no ``usr/lib/modules/K/modules.*`` file, so it never hides the kernel's index or another extension's
modules. The content of an image depends only on the build and this layout, never on what is merged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils._install import kmod_sysext
from ansible_collections.modulus.kmods.plugins.module_utils._install.image_format import find_tool
from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log, parse_env_file
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import safe_relpath
from ansible_collections.modulus.kmods.plugins.module_utils.identity import (
    check_kernel_release,
    check_name,
    check_os,
    check_os_version,
)

FORMATS = ("squashfs", "erofs", "directory")  # what an image can be; sysext_format also takes "auto"
DEFAULT_FORMAT = "auto"
DEFAULT_EXTENSIONS_DIR = "/var/lib/extensions"
IMAGE_PREFIX = "modulus-"
RELEASE_DIR = "usr/lib/extension-release.d"
LAYOUT_VERSION = "2"  # 2: Flatcar's kmod convention (no modules.* index, modprobe.d lines and a helper)
ZERO_UUID = "00000000-0000-0000-0000-000000000000"  # erofs: fixed, for reproducible images
_ARCH_OF_BOARD = {"amd64-usr": "x86-64", "arm64-usr": "arm64"}


class SysextError(RuntimeError):
    """The image cannot be made; the message says why."""


# --------------------------------------------------------------------------- names


def image_name(driver: str, os_version: str) -> str:
    """``modulus-<driver>-<os_version>``: one image per driver and release (a new driver version for
    the same release replaces it)."""
    return IMAGE_PREFIX + check_name("driver", driver) + "-" + check_os_version("release", os_version)


def image_path(extensions_dir: str, name: str, fmt: str) -> str:
    """``<dir>/<name>.raw`` for squashfs and erofs, ``<dir>/<name>/`` for a directory extension."""
    if fmt not in FORMATS:
        raise SysextError("sysext_format={!r} is not one of {}".format(fmt, ", ".join(FORMATS)))
    return os.path.join(extensions_dir, name if fmt == "directory" else name + ".raw")


def image_driver_prefix(driver: str) -> str:
    return IMAGE_PREFIX + check_name("driver", driver) + "-"


def architecture(board: Optional[str]) -> Optional[str]:
    """systemd's ARCHITECTURE= value for a Flatcar board (None when unknown: the key is left out)."""
    return _ARCH_OF_BOARD.get(board or "")


# --------------------------------------------------------------------------- extension-release


def extension_release(name: str, os_id: str, version_id: str, *, arch: Optional[str] = None,
                      extra: Optional[dict[str, str]] = None) -> str:
    """The ``extension-release.<name>`` text: ``ID`` and ``VERSION_ID`` bind the image to one release
    (systemd merges it only when the host's os-release has the same ``VERSION_ID``)."""
    lines = [f"ID={check_os('os', os_id)}", f"VERSION_ID={check_os_version('release', version_id)}"]
    if arch:
        lines.append(f"ARCHITECTURE={arch}")
    for key, value in sorted((extra or {}).items()):
        if not key.isupper() or any(c in str(value) for c in "\n\r\"'\\$`"):
            raise SysextError(f"extension-release {key}={value!r} is not a plain KEY=value")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def release_file(name: str) -> str:
    return f"{RELEASE_DIR}/extension-release.{name}"


def read_extension_release(path: str, name: str) -> Optional[dict[str, str]]:
    """The extension-release values of a directory extension (None when missing)."""
    try:
        with open(os.path.join(path, release_file(name)), encoding="utf-8") as handle:
            return parse_env_file(handle.read())
    except OSError:
        return None


def matches(values: dict[str, str], os_release: dict[str, str]) -> bool:
    """Whether systemd-sysext would merge an image with ``values`` on a host with ``os_release``
    (the ID / VERSION_ID / SYSEXT_LEVEL rule)."""
    if values.get("ID") not in ("_any", os_release.get("ID")):
        return False
    if values.get("SYSEXT_LEVEL"):
        return values["SYSEXT_LEVEL"] == os_release.get("SYSEXT_LEVEL")
    return bool(values.get("VERSION_ID")) and values.get("VERSION_ID") == os_release.get("VERSION_ID")


# --------------------------------------------------------------------------- layout


@dataclass
class Entry:
    src: str  # relative to the build
    dst: str  # relative to the image root
    link: Optional[str] = None


def layout(manifest: dict[str, Any], driver: str) -> list[Entry]:
    """Where each file of a build goes in the image (see the module docstring). The build log and
    anything outside lib/ and bin/ stay out."""
    kver = check_kernel_release("kernel_release", manifest.get("kernel_release"))
    check_name("driver", driver)
    mod_prefix = f"lib/modules/{kver}/"
    out: list[Entry] = []
    for rel, meta in sorted((manifest.get("files") or {}).items()):
        safe_relpath(rel)
        link = meta.get("link") if isinstance(meta, dict) else None
        if rel.startswith(mod_prefix):
            dst = f"usr/lib/modules/{kver}/updates/modulus/{driver}/{rel[len(mod_prefix):]}"
        elif rel.startswith("lib/modules/"):
            continue  # another kernel's modules: not for this image
        elif rel.startswith("lib/firmware/"):
            dst = "usr/lib/firmware/" + rel[len("lib/firmware/"):]
        elif rel.startswith("lib/"):
            dst = "usr/lib64/" + rel[len("lib/"):]
        elif rel.startswith("bin/"):
            dst = "usr/bin/" + rel[len("bin/"):]
        else:
            continue
        out.append(Entry(rel, dst, link))
    return out


def module_dir(kver: str, driver: str) -> str:
    """Where the build's modules are on a merged host (absolute)."""
    return f"/usr/lib/modules/{kver}/updates/modulus/{driver}"


# --------------------------------------------------------------------------- assembling


@dataclass
class ImageSpec:
    """Everything that decides an image's content (its key is ``content_key``): the build and the
    layout, nothing of the host (what is merged, the kernel's own module tree) goes in."""
    driver: str
    os_id: str
    release: str
    kernel_release: str
    board: Optional[str]
    manifest_sha256: str
    modules_load: str
    modules: list[str]  # the build's modules (kernel names): one install/remove line each
    fmt: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return image_name(self.driver, self.release)

    @property
    def kmod_name(self) -> str:
        """The name of the modprobe.d file and the helper: ``modulus-<driver>``."""
        return IMAGE_PREFIX + self.driver

    def content_key(self) -> str:
        body = {"layout": LAYOUT_VERSION, "driver": self.driver, "os": self.os_id, "release": self.release,
                "kernel": self.kernel_release, "board": self.board, "manifest": self.manifest_sha256,
                "modules_load": self.modules_load, "modules": sorted(self.modules), "kmod": kmod_sysext.digest(),
                "format": self.fmt, "extra": self.extra}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def release_text(self) -> str:
        extra = {"MODULUS_DRIVER": self.driver, "MODULUS_KERNEL_RELEASE": self.kernel_release,
                 "MODULUS_CONTENT": self.content_key()[:32]}
        extra.update(self.extra)
        return extension_release(self.name, self.os_id, self.release, arch=architecture(self.board), extra=extra)


def populate(root: str, build_dir: str, manifest: dict[str, Any], spec: ImageSpec, log: LogFn = no_log) -> dict[str, Any]:
    """Lay the image out in the empty directory ``root``. Returns what went in (file count, the
    modprobe.d file and the helper)."""
    count = 0
    for entry in layout(manifest, spec.driver):
        dst = os.path.join(root, entry.dst)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if entry.link is not None:
            os.symlink(entry.link, dst)
        else:
            shutil.copy2(os.path.join(build_dir, entry.src), dst)
        count += 1
    conf = kmod_sysext.conf_path(spec.kmod_name)
    helper = kmod_sysext.helper_path(spec.kmod_name)
    for rel, text, mode in (
        (release_file(spec.name), spec.release_text(), 0o644),
        (f"usr/lib/modules-load.d/modulus-{spec.driver}.conf", spec.modules_load, 0o644),
        (conf, kmod_sysext.conf_text(spec.kmod_name, spec.modules), 0o644),
        (helper, kmod_sysext.helper_text(spec.kmod_name), 0o755),
    ):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(path, mode)
    share = os.path.join(root, "usr", "share", "modulus", spec.driver)
    os.makedirs(share, exist_ok=True)
    shutil.copyfile(os.path.join(build_dir, "manifest.json"), os.path.join(share, "manifest.json"))
    kdir = os.path.join(root, "usr", "lib", "modules", spec.kernel_release)
    index = sorted(n for n in os.listdir(kdir) if os.path.isfile(os.path.join(kdir, n))) if os.path.isdir(kdir) else []
    if index:  # the layout never puts a file there; a file there would shadow the kernel's index
        raise SysextError(f"the image would ship {', '.join(index)} in usr/lib/modules/{spec.kernel_release}/")
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.stat(path).st_mode & 0o111 else 0o644)
    return {"files": count, "modprobe_conf": "/" + conf, "helper": "/" + helper}


def make_image(root: str, out: str, fmt: str, log: LogFn = no_log) -> None:
    """Pack ``root`` into ``out`` (squashfs or erofs), reproducibly: owners root, fixed timestamps."""
    if fmt == "squashfs":
        tool = find_tool("mksquashfs")
        if not tool:
            raise SysextError("sysext_format=squashfs needs mksquashfs (squashfs-tools) on the managed host")
        argv = [tool, root, out, "-noappend", "-all-root", "-no-xattrs", "-quiet", "-no-progress",
                "-mkfs-time", "0", "-all-time", "0", "-comp", "gzip"]
    elif fmt == "erofs":
        tool = find_tool("mkfs.erofs")
        if not tool:
            raise SysextError("sysext_format=erofs needs mkfs.erofs (erofs-utils) on the managed host")
        argv = [tool, "-zlz4hc", "-T0", "--all-root", "-U", ZERO_UUID, out, root]
    else:
        raise SysextError(f"make_image: {fmt!r} is not an image format")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    text = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise SysextError(f"{os.path.basename(tool)} failed (rc={proc.returncode}): {text[-1500:]}")
    if text.strip():
        log(text.strip()[-500:])


def tree_size(path: str) -> int:
    """Bytes of the regular files below ``path`` (a file: its size)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def list_images(extensions_dir: str, driver: str) -> dict[str, str]:
    """The modulus images of ``driver`` in ``extensions_dir``: name -> path."""
    prefix = image_driver_prefix(driver)
    out: dict[str, str] = {}
    try:
        names = sorted(os.listdir(extensions_dir))
    except OSError:
        return out
    for entry in names:
        if not entry.startswith(prefix):
            continue
        name = entry[:-4] if entry.endswith(".raw") else entry
        out[name] = os.path.join(extensions_dir, entry)
    return out
