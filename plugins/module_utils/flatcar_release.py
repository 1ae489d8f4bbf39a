# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Flatcar / CoreOS Container Linux host facts: release files, update.conf, ``update_engine_client
-status``, and resolving ``current`` / ``pending`` / explicit releases (with the not-booted USR
partition as the source of truth when update_engine forgot the new version)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import (
    LogFn,
    no_log,
    parse_env_file,
    require_tool,
    which,
)

CHANNELS = ("alpha", "beta", "stable", "lts")
NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
ZERO_VERSION = "0.0.0"
USR_A_UUID = "7130c94a-213a-4e5a-8e26-6cce9662f132"
USR_B_UUID = "e03dd35c-7c2d-4a47-b3fe-27f15780a57c"
USR_PARTS = {"USR-A": USR_A_UUID, "USR-B": USR_B_UUID}
VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+([.+~-][0-9A-Za-z.+~-]*)?$")
ARCH_OF_BOARD = {"amd64-usr": "amd64", "arm64-usr": "arm64"}

FLATCAR_RELEASE = "usr/share/flatcar/release"
COREOS_RELEASE = "usr/share/coreos/release"
UPDATE_CONFS = (
    "etc/flatcar/update.conf",
    "usr/share/flatcar/update.conf",
    "etc/coreos/update.conf",
    "usr/share/coreos/update.conf",
)


class ReleaseError(RuntimeError):
    """The host's release could not be determined; the message says why."""


@dataclass
class HostRelease:
    os_id: str  # flatcar | coreos
    version: str
    board: str
    appid: Optional[str]
    legacy: bool
    source: str
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class UpdateStatus:
    current_op: Optional[str]
    new_version: Optional[str]
    new_size: Optional[int]
    last_checked_time: Optional[int]
    progress: Optional[float]
    raw: dict[str, str] = field(default_factory=dict)

    @property
    def need_reboot(self) -> bool:
        return self.current_op == NEED_REBOOT

    def as_dict(self) -> dict:
        return {"current_op": self.current_op, "new_version": self.new_version, "new_size": self.new_size,
                "last_checked_time": self.last_checked_time, "progress": self.progress}


@dataclass
class ResolvedRelease:
    version: str
    pending: bool
    source: str  # release-file | update_engine | usr-partition | explicit
    host: Optional[HostRelease] = None
    update_status: Optional[UpdateStatus] = None
    usr_partition: Optional[str] = None


def in_root(host_root: str, path: str) -> str:
    return os.path.join(host_root or "/", path.lstrip("/"))


def valid_version(value: str) -> bool:
    return bool(value) and bool(VERSION_RE.match(value)) and ".." not in value


def check_version(option: str, value: str) -> str:
    if not valid_version(value):
        raise ValueError(f"{option}={value!r} is not a release version such as 4459.2.1")
    return value


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def parse_release(values: dict[str, str], source: str) -> HostRelease:
    """A Flatcar (FLATCAR_RELEASE_*) or legacy CoreOS (COREOS_RELEASE_*) release file's values."""
    for prefix, os_id in (("FLATCAR_RELEASE_", "flatcar"), ("COREOS_RELEASE_", "coreos")):
        version = values.get(prefix + "VERSION")
        if version:
            board = values.get(prefix + "BOARD") or "amd64-usr"
            return HostRelease(os_id=os_id, version=version, board=board, appid=values.get(prefix + "APPID"),
                               legacy=os_id == "coreos", source=source, values=values)
    raise ReleaseError(f"{source} has neither FLATCAR_RELEASE_VERSION nor COREOS_RELEASE_VERSION")


def read_host_release(host_root: str = "/") -> HostRelease:
    """The booted release: /usr/share/flatcar/release, else the legacy /usr/share/coreos/release,
    else /etc/os-release (ID flatcar or coreos)."""
    for rel in (FLATCAR_RELEASE, COREOS_RELEASE):
        path = in_root(host_root, rel)
        text = _read(path)
        if text is not None:
            return parse_release(parse_env_file(text), path)
    for rel in ("etc/os-release", "usr/lib/os-release"):
        path = in_root(host_root, rel)
        text = _read(path)
        if text is None:
            continue
        values = parse_env_file(text)
        os_id = values.get("ID", "")
        if os_id in ("flatcar", "coreos") and values.get("VERSION_ID"):
            return HostRelease(os_id=os_id, version=values["VERSION_ID"], board="amd64-usr", appid=None,
                               legacy=os_id == "coreos", source=path, values=values)
        raise ReleaseError(f"{path} says ID={os_id!r}: not a Flatcar or CoreOS Container Linux host")
    raise ReleaseError(f"no release file under {host_root} (looked for /{FLATCAR_RELEASE}, /{COREOS_RELEASE}, /etc/os-release)")


def read_group(host_root: str = "/") -> tuple[Optional[str], Optional[str]]:
    """GROUP from update.conf in update_engine's lookup order: (value, file it came from)."""
    for rel in UPDATE_CONFS:
        path = in_root(host_root, rel)
        text = _read(path)
        if text is None:
            continue
        group = parse_env_file(text).get("GROUP")
        if group:
            return group, path
    return None, None


def channel_of_group(group: str) -> str:
    """Map an update GROUP onto a release-server channel (frozen LTS streams such as lts-2022 -> lts)."""
    value = group.strip().lower()
    if value in CHANNELS:
        return value
    if re.match(r"^lts-[0-9]{4}$", value):
        return "lts"
    raise ReleaseError("update GROUP={!r} is not a release channel ({}): set the channel option".format(group, ", ".join(CHANNELS)))


def parse_update_engine_status(text: str) -> UpdateStatus:
    """Parse ``update_engine_client -status`` stdout (KEY=VALUE lines; log lines are ignored)."""
    raw: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = re.match(r"^([A-Z_]+)=(.*)$", line)
        if match:
            raw[match.group(1)] = match.group(2).strip()

    def as_int(key: str) -> Optional[int]:
        try:
            return int(raw[key])
        except (KeyError, ValueError):
            return None

    try:
        progress: Optional[float] = float(raw["PROGRESS"])
    except (KeyError, ValueError):
        progress = None
    return UpdateStatus(current_op=raw.get("CURRENT_OP"), new_version=raw.get("NEW_VERSION"),
                        new_size=as_int("NEW_SIZE"), last_checked_time=as_int("LAST_CHECKED_TIME"),
                        progress=progress, raw=raw)


def default_update_engine_client(host_root: str) -> list[str]:
    """``{host_root}/usr/bin/update_engine_client`` when it exists, else the one on PATH."""
    candidate = in_root(host_root, "usr/bin/update_engine_client")
    if os.access(candidate, os.X_OK):
        return [candidate]
    found = which("update_engine_client")
    if found:
        return [found]
    raise ReleaseError(f"update_engine_client was found neither at {candidate} nor on PATH: set update_engine_client")


def query_update_engine(command: list[str], timeout: float = 60.0) -> UpdateStatus:
    try:
        proc = subprocess.run(list(command) + ["-status"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReleaseError("cannot run {} -status: {}".format(" ".join(command), exc)) from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise ReleaseError(f"{' '.join(command)} -status failed (rc={proc.returncode}): {err}")
    status = parse_update_engine_status(proc.stdout.decode("utf-8", "replace"))
    if not status.current_op:
        raise ReleaseError("{} -status printed no CURRENT_OP".format(" ".join(command)))
    return status


def split_command(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return shlex.split(str(value))


# --------------------------------------------------------------------------------------------
# the not-booted USR partition


def booted_usr(cmdline: str) -> Optional[str]:
    """Which USR partition the kernel command line booted: 'USR-A', 'USR-B' or None."""
    for token in cmdline.split():
        key, _sep, value = token.partition("=")
        if key not in ("verity.usr", "mount.usr", "usr"):
            continue
        upper = value.upper()
        low = value.lower()
        for label, part_uuid in USR_PARTS.items():
            if "PARTLABEL=" + label in upper or upper.endswith("/BY-PARTLABEL/" + label) or part_uuid in low:
                return label
    return None


def other_usr(label: str) -> str:
    return "USR-B" if label == "USR-A" else "USR-A"


def resolve_in_root(host_root: str, path: str, max_links: int = 40) -> str:
    """Follow symlinks of ``path`` as seen from inside ``host_root`` (absolute targets stay inside it)."""
    root = os.path.abspath(host_root or "/")
    parts = [p for p in path.split("/") if p]
    current = root
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            links += 1
            if links > max_links:
                raise ReleaseError(f"too many symbolic links resolving {path} under {host_root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p] + parts
            continue
        current = candidate
    return current


def find_usr_partition(host_root: str, label: str) -> Optional[str]:
    """The device node or image file of USR-A/USR-B under {host_root}/dev/disk/by-partlabel or by-partuuid."""
    for rel in (f"dev/disk/by-partlabel/{label}", f"dev/disk/by-partuuid/{USR_PARTS[label]}"):
        if os.path.lexists(in_root(host_root, rel)):
            path = resolve_in_root(host_root, rel)
            if os.path.exists(path):
                return path
    return None


def _release_from_values(values: dict[str, str]) -> Optional[str]:
    return (values.get("FLATCAR_RELEASE_VERSION") or values.get("COREOS_RELEASE_VERSION")
            or values.get("VERSION_ID") or values.get("VERSION"))


def read_usr_version(device: str, log: LogFn = no_log) -> str:
    """Version in the os-release of a USR partition (a block device or an image file).

    ext4 is read with debugfs (no mount); otherwise it is mounted read-only (loop for a file)
    in a temporary directory and unmounted again."""
    debugfs = which("debugfs")
    if debugfs:
        for rel in ("/lib/os-release", "/share/flatcar/release", "/share/coreos/release"):
            proc = subprocess.run([debugfs, "-R", f"cat {rel}", device], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=60, check=False)
            version = _release_from_values(parse_env_file(proc.stdout.decode("utf-8", "replace")))
            if proc.returncode == 0 and version:
                return version
        log(f"debugfs could not read the os-release of {device}: mounting it read-only")
    mount = require_tool("mount")
    umount = require_tool("umount")
    mnt = tempfile.mkdtemp(prefix="modulus-usr-")
    try:
        opts = "ro,loop" if os.path.isfile(device) else "ro"
        proc = subprocess.run([mount, "-o", opts, device, mnt], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=120, check=False)
        if proc.returncode != 0:
            raise ReleaseError("cannot mount the not-booted USR partition {} read-only: {}".format(device, proc.stderr.decode("utf-8", "replace").strip()))
        try:
            for rel in ("lib/os-release", "share/flatcar/release", "share/coreos/release"):
                text = _read(os.path.join(mnt, rel))
                version = _release_from_values(parse_env_file(text or ""))
                if version:
                    return version
            raise ReleaseError(f"the not-booted USR partition {device} has no lib/os-release with VERSION_ID")
        finally:
            done = subprocess.run([umount, mnt], stdin=subprocess.DEVNULL, capture_output=True,
                                  check=False)
            if done.returncode != 0:
                subprocess.run([umount, "-l", mnt], stdin=subprocess.DEVNULL, capture_output=True,
                               check=False)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mnt)


def pending_from_usr(host_root: str, current: str, log: LogFn = no_log) -> tuple[str, str]:
    """(version, partition) of the not-booted USR partition, which update_engine wrote the update to."""
    cmdline = _read(in_root(host_root, "proc/cmdline")) or ""
    booted = booted_usr(cmdline)
    labels = [other_usr(booted)] if booted else ["USR-A", "USR-B"]
    found_any = False
    for label in labels:
        device = find_usr_partition(host_root, label)
        if not device:
            continue
        found_any = True
        version = read_usr_version(device, log)
        if booted or version != current:
            if not valid_version(version):
                raise ReleaseError(f"the not-booted USR partition {label} ({device}) says version {version!r}")
            return version, device
    if not found_any:
        raise ReleaseError(
            "update_engine reports {} with NEW_VERSION=0.0.0 (it restarted after applying the update) and the "
            "not-booted USR partition ({}) was not found under {}/dev/disk/by-partlabel or by-partuuid: "
            "give release explicitly".format(NEED_REBOOT, " or ".join(labels), host_root.rstrip("/")))
    raise ReleaseError(f"update_engine reports {NEED_REBOOT} with NEW_VERSION=0.0.0, the kernel command line does not say "
                       f"which USR partition is booted, and both hold the current release {current}: give release "
                       "explicitly")


def resolve_release(release: str, host_root: str = "/", update_engine_client: Optional[list[str]] = None,
                    host: Optional[HostRelease] = None, log: LogFn = no_log) -> ResolvedRelease:
    """``current``, ``pending`` or an explicit version -> the version to fetch.

    ``pending`` with no update waiting for a reboot resolves to the current release with pending=False.
    """
    if release not in ("current", "pending"):
        check_version("release", release)
        return ResolvedRelease(version=release, pending=False, source="explicit", host=host)
    if host is None:
        host = read_host_release(host_root)
    if release == "current":
        return ResolvedRelease(version=host.version, pending=False, source="release-file", host=host)
    command = update_engine_client or default_update_engine_client(host_root)
    status = query_update_engine(command)
    if not status.need_reboot:
        return ResolvedRelease(version=host.version, pending=False, source="release-file", host=host,
                               update_status=status)
    if status.new_version and status.new_version != ZERO_VERSION:
        check_version("NEW_VERSION reported by update_engine", status.new_version)
        return ResolvedRelease(version=status.new_version, pending=status.new_version != host.version,
                               source="update_engine", host=host, update_status=status)
    version, device = pending_from_usr(host_root, host.version, log)
    return ResolvedRelease(version=version, pending=version != host.version, source="usr-partition", host=host,
                           update_status=status, usr_partition=device)


def arch_of_board(board: str) -> str:
    return ARCH_OF_BOARD.get(board, board.split("-", 1)[0])


def require_debugfs() -> str:
    return require_tool("debugfs")
