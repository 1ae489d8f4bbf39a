# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The file system of a Flatcar USR partition, and reading a few small files of a btrfs one without
mounting it.

Flatcar formats ``USR-A``/``USR-B`` as btrfs (zstd-compressed) since July 2021
(``build_library/disk_layout.json``); older releases used ext2, and a partition that was never
written holds no file system at all (``USR-B`` of a fresh install). ext2/ext4 is read with
``debugfs`` (e2fsprogs), btrfs with ``btrfs restore`` (btrfs-progs): both are on every Flatcar host
image, and neither mounts anything. ``btrfs restore`` copies the files it is asked for into a
directory ``modulus-ro-<pid>-*`` in TMPDIR (``mounts.sweep_dead_dirs`` removes it after a SIGKILL);
symbolic links are not restored, so nothing read can point outside the partition."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import require_tool
from ansible_collections.modulus.kmods.plugins.module_utils.mounts import RO_PREFIX

BTRFS_MAGIC_OFFSET = 0x10040  # the primary superblock at 64 KiB, its magic 64 bytes in
BTRFS_MAGIC = b"_BHRfS_M"
EXT_MAGIC_OFFSET = 0x438  # the ext2/3/4 superblock at 1 KiB, s_magic 56 bytes in
EXT_MAGIC = b"\x53\xef"


class UsrReadError(RuntimeError):
    """The partition could not be read."""


def fs_type(device: str) -> Optional[str]:
    """``"btrfs"``, ``"ext"`` (ext2/3/4) or None (no file system this module reads: never written)."""
    try:
        with open(device, "rb") as handle:
            head = handle.read(BTRFS_MAGIC_OFFSET + len(BTRFS_MAGIC))
    except OSError as exc:
        raise UsrReadError(f"cannot read {device}: {exc}") from exc
    if head[BTRFS_MAGIC_OFFSET:BTRFS_MAGIC_OFFSET + len(BTRFS_MAGIC)] == BTRFS_MAGIC:
        return "btrfs"
    if head[EXT_MAGIC_OFFSET:EXT_MAGIC_OFFSET + len(EXT_MAGIC)] == EXT_MAGIC:
        return "ext"
    return None


def path_regex(files: Iterable[str], dirs: Iterable[str] = ()) -> str:
    """The ``btrfs restore --path-regex`` that restores exactly ``files`` (relative paths) and the
    entries directly inside ``dirs``, with every parent directory (restore walks from ``/``)."""
    wanted: set[str] = set()
    for rel in list(files) + [d + "/[^/]+" for d in dirs]:
        parts = rel.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            wanted.add("/".join(parts[:i]))
    alternatives = sorted(w if "[^/]+" in w else re.escape(w) for w in wanted)
    return "^/(|" + "|".join(alternatives) + ")$"


class BtrfsTree:
    """Small files and directory listings of a btrfs USR partition, restored into a temporary
    directory; use as a context manager (the copy is removed on exit)."""

    def __init__(self, device: str, files: Iterable[str], dirs: Iterable[str] = (), timeout: float = 120.0) -> None:
        self.device = device
        self.files = list(files)
        self.dirs = list(dirs)
        self.timeout = timeout
        self.root = ""

    def __enter__(self) -> BtrfsTree:
        btrfs = require_tool("btrfs")
        self.root = tempfile.mkdtemp(prefix=f"{RO_PREFIX}{os.getpid()}-")
        try:
            proc = subprocess.run([btrfs, "restore", "-i", "--path-regex", path_regex(self.files, self.dirs),
                                   self.device, self.root], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout, check=False)
        except BaseException:
            self.close()
            raise
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()
            self.close()
            raise UsrReadError(f"btrfs restore of {self.device} failed (rc={proc.returncode}): {err}")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    def read_text(self, rel: str) -> Optional[str]:
        path = os.path.join(self.root, rel.strip("/"))
        if os.path.islink(path) or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.root, rel.strip("/"))))
        except OSError:
            return []
