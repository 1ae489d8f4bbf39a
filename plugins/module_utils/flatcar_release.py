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
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import fsutil, imageinfo, mounts
from ansible_collections.modulus.kmods.plugins.module_utils._host import usrfs
from ansible_collections.modulus.kmods.plugins.module_utils.common import (
    LogFn,
    no_log,
    parse_env_file,
    which,
)
from ansible_collections.modulus.kmods.plugins.module_utils.identity import (
    IdentityError,
    check_kernel_release,
    check_os_version,
)

CHANNELS = ("alpha", "beta", "stable", "lts")
DEFAULT_CHANNEL = "stable"
NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
UPDATE_OPS = (
    "UPDATE_STATUS_IDLE",
    "UPDATE_STATUS_CHECKING_FOR_UPDATE",
    "UPDATE_STATUS_UPDATE_AVAILABLE",
    "UPDATE_STATUS_DOWNLOADING",
    "UPDATE_STATUS_VERIFYING",
    "UPDATE_STATUS_FINALIZING",
    NEED_REBOOT,
    "UPDATE_STATUS_REPORTING_ERROR_EVENT",
)
ZERO_VERSION = "0.0.0"
USR_A_UUID = "7130c94a-213a-4e5a-8e26-6cce9662f132"
USR_B_UUID = "e03dd35c-7c2d-4a47-b3fe-27f15780a57c"
USR_PARTS = {"USR-A": USR_A_UUID, "USR-B": USR_B_UUID}
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
    try:
        check_os_version("release", value)
    except IdentityError:
        return False
    return True


def check_version(option: str, value: str) -> str:
    return check_os_version(option, value)


_read = fsutil.read_text


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
    if re.fullmatch(r"lts-[0-9]{4}", value):
        return "lts"
    raise ReleaseError("update GROUP={!r} is not a release channel ({}): set the channel option".format(group, ", ".join(CHANNELS)))


def parse_update_engine_status(text: str) -> UpdateStatus:
    """Parse ``update_engine_client -status`` stdout (KEY=VALUE lines; log lines are ignored)."""
    raw: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = re.fullmatch(r"([A-Z_]+)=(.*)", line)
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
    """Run ``command -status`` in its own process group (killed whole on timeout) and parse it."""
    try:
        proc = subprocess.Popen(list(command) + ["-status"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise ReleaseError("cannot run {} -status: {}".format(" ".join(command), exc)) from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ReleaseError("{} -status did not answer within {:g} s (its process group was killed)".format(
            " ".join(command), timeout)) from exc
    if proc.returncode != 0:
        text = err.decode("utf-8", "replace").strip()
        raise ReleaseError(f"{' '.join(command)} -status failed (rc={proc.returncode}): {text}")
    text = out.decode("utf-8", "replace")
    status = parse_update_engine_status(text)
    if not status.current_op:
        raise ReleaseError("{} -status printed no CURRENT_OP: {!r}".format(" ".join(command), text.strip()[:500]))
    if status.current_op not in UPDATE_OPS:
        raise ReleaseError("{} -status reports CURRENT_OP={!r}, a state this collection does not know; refusing to "
                           "guess whether an update waits for a reboot. Its whole answer: {!r}. Give release "
                           "explicitly".format(" ".join(command), status.current_op, text.strip()[:500]))
    return status


def command_argv(option: str, value: Any) -> Optional[list[str]]:
    """A command option given as a list of arguments or as a string split like a shell would."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ValueError(f"{option} must be a list of arguments or a string, got {type(value).__name__}")


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


@dataclass
class UsrPartition:
    """What a USR partition holds of its release: read without booting it."""
    device: str
    version: str
    kernel_releases: list[str]


USR_RELEASE_FILES = ("lib/os-release", "share/flatcar/release", "share/coreos/release")


def _usr_from_tree(device: str, read_text, list_modules) -> UsrPartition:
    version = None
    for rel in USR_RELEASE_FILES:
        version = _release_from_values(parse_env_file(read_text(rel) or ""))
        if version:
            break
    if not version:
        raise ReleaseError(f"the USR partition {device} has no lib/os-release with VERSION_ID")
    kernels = sorted(name for name in list_modules() if check_kernel_name(name))
    return UsrPartition(device=device, version=version, kernel_releases=kernels)


def check_kernel_name(name: str) -> bool:
    try:
        check_kernel_release("kernel_release", name)
    except IdentityError:
        return False
    return True


def read_usr(device: str, log: LogFn = no_log) -> UsrPartition:
    """Release version and kernel releases (``lib/modules/*``) of a USR partition (a block device or an
    image file), without mounting it: btrfs (Flatcar since 2021) with ``btrfs restore``, ext2/ext4
    (older releases) with ``debugfs``; mounted read-only (and released) only when that tool is missing
    or fails. A partition with no file system was never written."""
    try:
        kind = usrfs.fs_type(device)
    except usrfs.UsrReadError as exc:
        raise ReleaseError(str(exc)) from exc
    if kind is None:
        raise ReleaseError(f"the USR partition {device} holds no btrfs or ext file system (never written)")
    if kind == "btrfs" and which("btrfs"):
        mounts.sweep_dead_dirs(tempfile.gettempdir(), mounts.RO_PREFIX, log)  # what a killed read left
        try:
            with usrfs.BtrfsTree(device, USR_RELEASE_FILES, dirs=("lib/modules",)) as tree:
                return _usr_from_tree(device, tree.read_text, lambda: [
                    name for name in tree.listdir("lib/modules")
                    if os.path.isdir(os.path.join(tree.root, "lib/modules", name))
                    and not os.path.islink(os.path.join(tree.root, "lib/modules", name))])
        except usrfs.UsrReadError as exc:
            log(f"btrfs restore could not read the USR partition {device} ({exc}): mounting it read-only")
    if kind == "ext" and which("debugfs"):
        try:
            return _usr_from_tree(device, lambda rel: imageinfo.read_file(device, 0, "/" + rel),
                                  lambda: imageinfo.kernel_releases_in(device, 0, "/lib/modules", require_build=False))
        except (ReleaseError, imageinfo.ImageReadError) as exc:
            log(f"debugfs could not read the USR partition {device} ({exc}): mounting it read-only")
    with mounts.mount_readonly(device) as mnt:
        def listing() -> list[str]:
            try:
                return os.listdir(os.path.join(mnt, "lib/modules"))
            except OSError:
                return []
        return _usr_from_tree(device, lambda rel: _read(os.path.join(mnt, rel)), listing)


def not_booted_usr(host_root: str, current: str, log: LogFn = no_log) -> Optional[UsrPartition]:
    """The USR partition the host does not run from (where update_engine writes an update), or None
    when it cannot be told apart or found."""
    cmdline = _read(in_root(host_root, "proc/cmdline")) or ""
    booted = booted_usr(cmdline)
    labels = [other_usr(booted)] if booted else ["USR-A", "USR-B"]
    for label in labels:
        device = find_usr_partition(host_root, label)
        if not device:
            continue
        usr = read_usr(device, log)
        if booted or usr.version != current:
            return usr
    return None


def pending_from_usr(host_root: str, current: str, log: LogFn = no_log) -> tuple[str, str]:
    """(version, partition) of the not-booted USR partition, which update_engine wrote the update to."""
    cmdline = _read(in_root(host_root, "proc/cmdline")) or ""
    booted = booted_usr(cmdline)
    labels = [other_usr(booted)] if booted else ["USR-A", "USR-B"]
    if not any(find_usr_partition(host_root, label) for label in labels):
        raise ReleaseError(
            "update_engine reports {} with NEW_VERSION=0.0.0 (it restarted after applying the update) and the "
            "not-booted USR partition ({}) was not found under {}/dev/disk/by-partlabel or by-partuuid: "
            "give release explicitly".format(NEED_REBOOT, " or ".join(labels), host_root.rstrip("/")))
    usr = not_booted_usr(host_root, current, log)
    if usr is None:
        raise ReleaseError(f"update_engine reports {NEED_REBOOT} with NEW_VERSION=0.0.0, the kernel command line does "
                           f"not say which USR partition is booted, and both hold the current release {current}: give "
                           "release explicitly")
    if not valid_version(usr.version):
        raise ReleaseError(f"the not-booted USR partition {usr.device} says version {usr.version!r}")
    return usr.version, usr.device


def resolve_release(release: str, host_root: str = "/", update_engine_client: Optional[list[str]] = None,
                    host: Optional[HostRelease] = None, log: LogFn = no_log, timeout: float = 60.0) -> ResolvedRelease:
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
    status = query_update_engine(command, timeout)
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


@dataclass
class Target:
    """A release this host runs or will boot, with its kernel: what a build for it is named by."""
    release: str  # current | pending
    os: str
    board: str
    os_version: str
    channel: Optional[str]
    kernel_release: Optional[str]
    kernel_source: str  # running-kernel | usr-partition | unknown
    pending: bool
    usr_partition: Optional[str] = None
    note: Optional[str] = None

    def as_dict(self) -> dict:
        return {"release": self.release, "os": self.os, "board": self.board, "os_version": self.os_version,
                "channel": self.channel, "kernel_release": self.kernel_release, "kernel_source": self.kernel_source,
                "pending": self.pending, "usr_partition": self.usr_partition, "note": self.note}


def running_kernel(host_root: str = "/") -> str:
    """The running kernel's release, as ``{host_root}/proc/sys/kernel/osrelease`` says (``uname -r``)."""
    text = _read(in_root(host_root, "proc/sys/kernel/osrelease"))
    value = (text or "").strip() or (os.uname().release if (host_root or "/") == "/" else "")
    if not value:
        raise ReleaseError(f"cannot read the running kernel from {in_root(host_root, 'proc/sys/kernel/osrelease')}")
    return check_kernel_release("running kernel", value)


def host_channel(host_root: str = "/") -> Optional[str]:
    group, _path = read_group(host_root)
    if not group:
        return DEFAULT_CHANNEL
    try:
        return channel_of_group(group)
    except ReleaseError:
        return None  # an update-server group id: not a release-server channel


def _pending_kernel(usr: Optional[UsrPartition], version: str) -> tuple[Optional[str], Optional[str]]:
    """(kernel release, note) of the pending release from its USR partition."""
    if usr is None:
        return None, "the not-booted USR partition was not found"
    if usr.version != version:
        return None, (f"the not-booted USR partition {usr.device} holds {usr.version}, update_engine says {version}")
    if len(usr.kernel_releases) != 1:
        found = ", ".join(usr.kernel_releases) or "none"
        return None, f"the not-booted USR partition {usr.device} has {found} under lib/modules, expected one kernel"
    return usr.kernel_releases[0], None


def host_targets(host_root: str = "/", update_engine_client: Optional[list[str]] = None,
                 log: LogFn = no_log, timeout: float = 60.0) -> dict:
    """The current release (running kernel) and the pending one (kernel of the not-booted USR
    partition, when update_engine has installed an update), read from the host alone: nothing is
    downloaded. ``pending`` is None when no update waits for a reboot."""
    host = read_host_release(host_root)
    channel = host_channel(host_root)
    current = Target(release="current", os=host.os_id, board=host.board, os_version=host.version, channel=channel,
                     kernel_release=running_kernel(host_root), kernel_source="running-kernel", pending=False)
    resolved = resolve_release("pending", host_root, update_engine_client, host, log, timeout)
    pending = None
    if resolved.pending:
        try:
            usr = (read_usr(resolved.usr_partition, log) if resolved.usr_partition
                   else not_booted_usr(host_root, host.version, log))
        except (ReleaseError, OSError) as exc:
            usr, kernel, note = None, None, f"cannot read the not-booted USR partition: {exc}"
        else:
            kernel, note = _pending_kernel(usr, resolved.version)
        pending = Target(release="pending", os=host.os_id, board=host.board, os_version=resolved.version,
                         channel=channel, kernel_release=kernel,
                         kernel_source="usr-partition" if kernel else "unknown", pending=True,
                         usr_partition=usr.device if usr else None, note=note)
    return {"current": current, "pending": pending, "update_status": resolved.update_status}


def arch_of_board(board: str) -> str:
    return ARCH_OF_BOARD.get(board, board.split("-", 1)[0])
