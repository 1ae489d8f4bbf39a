# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading an ext4 image without mounting it (debugfs): directory listings, kernel releases under
the modules directory and the release file, of a developer container's ROOT partition or of a
USR partition (image file or block device, offset 0)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import parse_env_file, require_tool
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import root_partition

RELEASE_FILES = (
    "/usr/share/flatcar/release",
    "/usr/share/coreos/release",
    "/usr/lib/os-release",
    "/etc/os-release",
)
MODULE_DIRS = ("/usr/lib/modules", "/lib/modules")
S_IFMT = 0o170000
S_IFDIR = 0o040000
_NOT_OPEN = "Filesystem not open"


class ImageReadError(RuntimeError):
    """debugfs could not read the image (not an ext4 file system at that offset, or debugfs failed)."""


@dataclass
class ImageInfo:
    kernel_releases: list[str]
    release: dict[str, str]
    version: Optional[str]
    board: Optional[str]
    root_offset: int
    root_size: int


def version_key(text: str) -> list:
    """Sort key for versions and kernel releases: numeric parts as numbers (6.1.0-9 < 6.1.0-50)."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"[.\-+~_]", text)]


def _debugfs(image_path: str, offset: int, request: str, timeout: float = 60.0) -> str:
    debugfs = require_tool("debugfs")
    spec = f"{image_path}?offset={offset}" if offset else image_path
    proc = subprocess.run([debugfs, "-R", request, spec], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, check=False)
    err = proc.stderr.decode("utf-8", "replace").strip()
    # debugfs exits 0 when it cannot open the file system at all: its stderr tells
    if proc.returncode != 0 or _NOT_OPEN in err:
        raise ImageReadError(f"debugfs -R {request!r} {spec} failed (rc={proc.returncode}): {err}")
    return proc.stdout.decode("utf-8", "replace")


def parse_debugfs_ls(text: str) -> list[tuple[str, int]]:
    """Parse ``debugfs -R 'ls -p DIR'`` output into (name, mode) pairs, without . and .."""
    entries = []
    for line in text.splitlines():
        # /inode/mode/uid/gid/name/size/  (the name may not contain '/')
        parts = line.strip().split("/")
        if len(parts) < 7 or parts[0] != "":
            continue
        try:
            mode = int(parts[2], 8)
        except ValueError:
            continue
        name = parts[5]
        if name in (".", "..", ""):
            continue
        entries.append((name, mode))
    return entries


def list_dir(image_path: str, offset: int, directory: str) -> list[tuple[str, int]]:
    """(name, mode) of the entries of ``directory`` in the ext4 file system at ``offset`` of
    ``image_path`` (an image file or a block device); empty when the directory does not exist."""
    return parse_debugfs_ls(_debugfs(image_path, offset, f"ls -p {directory}"))


def kernel_releases_in(image_path: str, offset: int, modules_dir: Optional[str] = None,
                       require_build: bool = True) -> list[str]:
    """Kernel releases (directories) under ``modules_dir``, oldest first.

    Without ``modules_dir`` the first of /usr/lib/modules and /lib/modules that has any is used
    (a ROOT partition); a USR partition holds them at /lib/modules. With ``require_build`` only
    the kernels carrying a ``build`` entry count, unless none does (then every one counts); without
    it every directory counts and no kernel directory is listed (one debugfs call in all).
    """
    for mod_dir in (modules_dir,) if modules_dir else MODULE_DIRS:
        dirs = [name for name, mode in list_dir(image_path, offset, mod_dir) if (mode & S_IFMT) == S_IFDIR]
        if not dirs:
            continue
        if require_build:
            with_build = [name for name in dirs
                          if any(entry == "build" for entry, _mode in list_dir(image_path, offset, f"{mod_dir}/{name}"))]
            dirs = with_build or dirs
        return sorted(dirs, key=version_key)
    return []


def read_file(image_path: str, offset: int, path: str) -> str:
    """The text of ``path`` in the ext4 file system at ``offset``; empty when it does not exist."""
    return _debugfs(image_path, offset, f"cat {path}")


def release_of(image_path: str, offset: int, files: tuple[str, ...] = RELEASE_FILES) -> dict[str, str]:
    """The image's own release file, parsed (Flatcar release first, then os-release)."""
    merged: dict[str, str] = {}
    for path in files:
        values = parse_env_file(read_file(image_path, offset, path))
        for key, value in values.items():
            merged.setdefault(key, value)
    return merged


def image_info(image_path: str) -> ImageInfo:
    """Kernel releases and release file of a developer container image, read without mounting it."""
    part = root_partition(image_path)
    release = release_of(image_path, part.offset)
    version = (release.get("FLATCAR_RELEASE_VERSION") or release.get("COREOS_RELEASE_VERSION")
               or release.get("VERSION_ID") or None)
    board = release.get("FLATCAR_RELEASE_BOARD") or release.get("COREOS_RELEASE_BOARD") or None
    return ImageInfo(kernel_releases=kernel_releases_in(image_path, part.offset), release=release,
                     version=version, board=board, root_offset=part.offset, root_size=part.size)
