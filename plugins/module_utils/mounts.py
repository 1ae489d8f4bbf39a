# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Mounts and loop devices, one owner: a stack that is always released in reverse order (lazy
unmount as a last resort, loop devices detached), a read-only mount of a device or image file, and
``release_under`` for sweepers of a killed run's workspace.

Image files are mounted with ``mount -o loop,ro,offset=N,sizelimit=M`` (``MountStack.mount_image``):
mount(8) attaches the loop device with LO_FLAGS_AUTOCLEAR, so a run killed with SIGKILL leaves only
mounts behind, and unmounting them (``release_under``) frees the loop devices too."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log, require_tool, which
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import dead_entries

RO_PREFIX = "modulus-ro-"


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
        """Attach ``image_path`` (from ``offset``, ``size`` bytes) to a read-only loop device.

        Detached by ``close()``, but not if the process is killed first: prefer ``mount_image``,
        whose loop device goes away with its mount."""
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

    def mount_image(self, image_path: str, target: str, fstype: Optional[str] = None, options: str = "ro",
                    offset: int = 0, size: Optional[int] = None) -> str:
        """Mount a filesystem inside an image file (from ``offset``, ``size`` bytes) read-only through
        a loop device that mount(8) sets up with LO_FLAGS_AUTOCLEAR: unmounting it (also lazily,
        also by ``release_under`` after this process was killed) frees the loop device, and a mount
        killed before it finished leaves none."""
        opts = [o for o in options.split(",") if o and o != "rw"]
        if "ro" not in opts:
            opts.insert(0, "ro")
        opts = ["loop"] + opts + ([f"offset={int(offset)}"] if offset else []) \
            + ([f"sizelimit={int(size)}"] if size is not None else [])
        return self.mount((["-t", fstype] if fstype else []) + ["-o", ",".join(opts), image_path], target)

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


def _mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, source) of every mount, in mount order."""
    table = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4:
                    source = ""
                    if "-" in fields[5:]:
                        sep = fields.index("-", 5)
                        source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
                    table.append((_unescape(fields[4]), source))
    except OSError:
        pass
    return table


def _below(point: str, real: str) -> bool:
    return point == real or point.startswith(real.rstrip("/") + "/")


def mounts_under(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    return [point for point, _source in _mount_table(mountinfo) if _below(point, real)]


def release_under(path: str, log: LogFn = no_log, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Unmount every mount at or below ``path``, deepest (and most recent) first; return the mount
    points released. For sweepers of a killed run's workspace: a mount that ``umount`` refuses
    (busy) is detached lazily (``umount -l``), which frees it from the tree at once. Loop devices
    that were the source of a released mount and are no longer mounted anywhere are detached
    (``mount -o loop`` sets them to clear themselves anyway; this catches ``losetup``-made ones)."""
    real = os.path.realpath(path)
    umount = which("umount") or "umount"
    released: list[str] = []
    loops: set[str] = set()
    for _round in range(8):  # stacked mounts on one point need one pass each
        table = [(i, point, source) for i, (point, source) in enumerate(_mount_table(mountinfo)) if _below(point, real)]
        if not table:
            break
        table.sort(key=lambda row: (row[1].count("/"), row[0]), reverse=True)
        for _i, point, source in table:
            if source.startswith("/dev/loop"):
                loops.add(source)
            ok = _quiet([umount, point]) or _quiet([umount, "-l", point])
            if ok or not _below_any(point, mountinfo):
                released.append(point)
                log(f"released the mount {point} of a run that is gone")
    still = {source for _point, source in _mount_table(mountinfo)}
    losetup = which("losetup")
    for dev in sorted(loops - still):
        if losetup and _loop_attached(dev):
            _quiet([losetup, "-d", dev])
    return released


def _quiet(args: list[str], timeout: float = 60.0) -> bool:
    """Run a command; True when it succeeded within ``timeout``."""
    try:
        return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, check=False,
                              timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _below_any(point: str, mountinfo: str) -> bool:
    return any(p == point for p, _s in _mount_table(mountinfo))


def _loop_attached(dev: str) -> bool:
    """A loop device with a backing file (/sys/block/loopN/loop exists only then)."""
    return os.path.isdir(f"/sys/block/{os.path.basename(dev)}/loop")


def sweep_dead_dirs(parent: str, prefix: str, log: LogFn = no_log, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Directories ``<prefix><pid>-*`` in ``parent`` whose process is gone: their mounts released
    (``release_under``), then removed if nothing is mounted below any more. Returns what was removed."""
    removed = []
    for path in dead_entries(parent, re.compile(re.escape(prefix) + r"([0-9]+)-[^/]+"), dirs_only=True):
        release_under(path, log, mountinfo)
        if mounts_under(path, mountinfo):
            log(f"kept {path}: still holds mounts")
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


@contextlib.contextmanager
def mount_readonly(device_or_file: str, fstype: Optional[str] = None, options: str = "ro",
                   log: LogFn = no_log) -> Iterator[str]:
    """Mount a block device, or an image file through a read-only loop device, read-only in a
    temporary directory (``modulus-ro-<pid>-*``: ``sweep_dead_dirs`` releases it if this process
    is killed); yield that directory. Everything is released on exit, also on failure."""
    mnt = tempfile.mkdtemp(prefix=f"{RO_PREFIX}{os.getpid()}-")
    try:
        with MountStack(log) as stack:
            if os.path.isfile(device_or_file):
                stack.mount_image(device_or_file, mnt, fstype, options)
            else:
                stack.mount_ro(device_or_file, mnt, fstype, options)
            yield mnt
    finally:
        if not mounts_under(mnt):
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
