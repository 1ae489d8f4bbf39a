# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Mounts and loop devices, one owner: a stack that is always released in reverse order (lazy
unmount as a last resort, loop devices detached), and a read-only mount of a device or image file."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log, require_tool, which


class MountError(RuntimeError):
    """A loop device or mount could not be set up, or not be released cleanly."""


def _run_cmd(args: list[str], what: str, timeout: float = 120.0) -> str:
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise MountError(f"{what} failed (rc={proc.returncode}): {' '.join(args)}: {err}")
    return proc.stdout.decode("utf-8", "replace").strip()


def _retry_quietly(args: list[str], attempts: int) -> subprocess.CompletedProcess:
    """Run ``args`` until it succeeds (a busy mount or loop device often frees itself in a moment)."""
    for attempt in range(attempts):
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if proc.returncode == 0:
            break
        time.sleep(0.2 * (attempt + 1))
    return proc


class MountStack:
    """Mounts and loop devices set up in order and always torn down in reverse (lazy as a last resort).

    As a context manager it releases everything on exit; problems while releasing are collected in
    ``errors`` (and logged) and raised as MountError when no other exception is on its way.
    """

    def __init__(self, log: LogFn = no_log) -> None:
        self.log = log
        self.mounts: list[str] = []
        self.loops: list[str] = []
        self.errors: list[str] = []

    def __enter__(self) -> MountStack:
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        self.close()
        if exc_type is None:
            self.raise_errors("releasing the mounts")

    def loop(self, image_path: str, offset: int = 0, size: Optional[int] = None) -> str:
        """Attach ``image_path`` (from ``offset``, ``size`` bytes) to a read-only loop device."""
        args = [require_tool("losetup"), "--find", "--show", "--read-only", "--offset", str(offset)]
        if size is not None:
            args += ["--sizelimit", str(size)]
        dev = _run_cmd(args + [image_path], "losetup")
        self.loops.append(dev)
        return dev

    def mount(self, args: list[str], target: str) -> str:
        _run_cmd([require_tool("mount")] + args + [target], "mount")
        self.mounts.append(target)
        return target

    def mount_ro(self, source: str, target: str, fstype: Optional[str] = None, options: str = "ro") -> str:
        return self.mount((["-t", fstype] if fstype else []) + ["-o", options, source], target)

    def bind(self, src: str, target: str, readonly: bool = False) -> str:
        self.mount(["--bind", src], target)
        if readonly:
            _run_cmd([require_tool("mount"), "-o", "remount,bind,ro", target], "mount")
        return target

    def overlay(self, lower: str, workspace: str, tmpfs: bool = True) -> str:
        """A writable overlay on the read-only tree ``lower``; upper and work dirs in ``workspace/rw``
        (a tmpfs mounted there, or the disk below ``workspace`` when ``tmpfs`` is false). Returns
        the merged tree ``workspace/merged``."""
        rw = os.path.join(workspace, "rw")
        merged = os.path.join(workspace, "merged")
        for path in (rw, merged):
            os.mkdir(path, 0o755)
        if tmpfs:
            self.mount(["-t", "tmpfs", "-o", "mode=0755", "modulus-devc"], rw)
        else:
            os.chmod(rw, 0o755)
        os.mkdir(os.path.join(rw, "upper"), 0o755)
        os.mkdir(os.path.join(rw, "work"), 0o755)
        return self.mount(["-t", "overlay", "-o", f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work",
                           "modulus-devc"], merged)

    def close(self) -> None:
        umount = which("umount") or "umount"
        while self.mounts:
            target = self.mounts.pop()
            if _retry_quietly([umount, target], 3).returncode != 0:
                proc = subprocess.run([umount, "-l", target], stdin=subprocess.DEVNULL, capture_output=True,
                                      check=False)
                self.errors.append(f"umount {target} was busy; lazily detached (rc={proc.returncode})")
        losetup = which("losetup") or "losetup"
        while self.loops:
            dev = self.loops.pop()
            proc = _retry_quietly([losetup, "-d", dev], 5)
            if proc.returncode != 0:
                self.errors.append("losetup -d {} failed: {}".format(dev, proc.stderr.decode("utf-8", "replace").strip()))
        for err in self.errors:
            self.log(err)

    def raise_errors(self, what: str) -> None:
        if self.errors:
            raise MountError("{} left problems: {}".format(what, "; ".join(self.errors)))


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    found = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4:
                    point = _unescape(fields[4])
                    if point == real or point.startswith(real.rstrip("/") + "/"):
                        found.append(point)
    except OSError:
        pass
    return found


@contextlib.contextmanager
def mount_readonly(device_or_file: str, fstype: Optional[str] = None, options: str = "ro",
                   log: LogFn = no_log) -> Iterator[str]:
    """Mount a block device, or an image file through a read-only loop device, read-only in a
    temporary directory; yield that directory. Everything is released on exit, also on failure."""
    mnt = tempfile.mkdtemp(prefix="modulus-ro-")
    try:
        with MountStack(log) as stack:
            source = stack.loop(device_or_file) if os.path.isfile(device_or_file) else device_or_file
            stack.mount_ro(source, mnt, fstype, options)
            yield mnt
    finally:
        if not mounts_under(mnt):
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
