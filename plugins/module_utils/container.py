# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running a command inside a developer container image without modifying it: systemd-nspawn
--image, or the ROOT partition loop-mounted read-only under an overlay (nspawn -D or chroot)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log, require_tool, which
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import (
    dead_entries,
    make_staging,
    sweep_stale,
)
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import root_partition
from ansible_collections.modulus.kmods.plugins.module_utils.imagecache import image_lock
from ansible_collections.modulus.kmods.plugins.module_utils.mounts import MountStack, mounts_under, release_under

RUN_METHODS = ("auto", "image", "overlay", "chroot")
WORKSPACE_NAME = "modulus-devc"
TAIL_BYTES = 8192
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ContainerError(RuntimeError):
    """The image to run in is missing, or the run could not be cleaned up after."""


@dataclass
class RunResult:
    rc: int
    output_tail: str
    log_path: str
    timed_out: bool
    method: str
    duration: float
    command: list[str] = field(default_factory=list)


def _systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system")


def choose_method(method: str) -> str:
    """Resolve ``auto``: --image needs systemd as PID 1 (and its udev); else overlay+nspawn; else chroot."""
    if method not in RUN_METHODS:
        raise ValueError("method={!r} is not one of {}".format(method, ", ".join(RUN_METHODS)))
    if method != "auto":
        return method
    if which("systemd-nspawn"):
        return "image" if _systemd_booted() else "overlay"
    return "chroot"


def _check_binds(option: str, binds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for item in binds or []:
        if len(item) != 2:
            raise ValueError(f"{option} entry {item!r} is not a (host_path, container_path) pair")
        src, dst = str(item[0]), str(item[1])
        if not os.path.isabs(src) or not os.path.isabs(dst):
            raise ValueError(f"{option} entry {(src, dst)!r}: both paths must be absolute")
        if ":" in src or ":" in dst:
            raise ValueError(f"{option} entry {(src, dst)!r}: paths must not contain ':'")
        if not os.path.exists(src):
            raise ValueError(f"{option} entry {(src, dst)!r}: host path {src} does not exist")
        out.append((src, dst))
    return out


def _check_env(env: Optional[dict[str, str]]) -> dict[str, str]:
    out = {}
    for key, value in (env or {}).items():
        if not _ENV_NAME_RE.fullmatch(str(key)):
            raise ValueError(f"env key {key!r} is not a valid variable name")
        out[str(key)] = str(value)
    return out


def nspawn_args(root_args: list[str], command: list[str], binds_ro: list[tuple[str, str]],
                binds_rw: list[tuple[str, str]], env: dict[str, str], workdir: Optional[str]) -> list[str]:
    """The systemd-nspawn command line (works without systemd as PID 1 thanks to --keep-unit)."""
    args = [require_tool("systemd-nspawn"), "--keep-unit", "--register=no", "--as-pid2", "--quiet",
            "--console=pipe"] + root_args
    args += ["--bind-ro={}:{}".format(*pair) for pair in binds_ro]
    args += ["--bind={}:{}".format(*pair) for pair in binds_rw]
    args += ["--setenv={}={}".format(*kv) for kv in sorted(env.items())]
    if workdir:
        args.append(f"--chdir={workdir}")
    return args + ["--"] + list(command)


def _mount_root_overlay(stack: MountStack, image_path: str, offset: int, size: int, workspace: str,
                        scratch_dir: Optional[str]) -> str:
    """The ROOT partition read-only (ext4 without journal replay) under a tmpfs or on-disk overlay."""
    lower = os.path.join(workspace, "lower")
    os.mkdir(lower, 0o755)
    stack.mount_image(image_path, lower, "ext4", "ro,noload", offset, size)
    return stack.overlay(lower, workspace, tmpfs=not scratch_dir)


def _chroot_prepare(stack: MountStack, merged: str, binds_ro: list[tuple[str, str]],
                    binds_rw: list[tuple[str, str]]) -> None:
    def target_of(inner: str, is_dir: bool) -> str:
        path = os.path.join(merged, inner.lstrip("/"))
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                open(path, "a").close()
        return path

    stack.mount(["-t", "proc", "proc"], target_of("/proc", True))
    stack.bind("/dev", target_of("/dev", True))
    stack.mount(["-t", "sysfs", "-o", "ro", "sysfs"], target_of("/sys", True))
    for src, dst in binds_ro:
        stack.bind(src, target_of(dst, os.path.isdir(src)), readonly=True)
    for src, dst in binds_rw:
        stack.bind(src, target_of(dst, os.path.isdir(src)))


def _chroot_into(root: str, workdir: str):
    """A preexec function: chroot into ``root`` and change to ``workdir`` (no shell needed in the image)."""

    def enter() -> None:
        os.chroot(root)
        os.chdir(workdir)

    return enter


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _remove_workspace(workspace: str) -> None:
    """Remove the temporary tree, but never recurse into something still mounted (a rw bind!)."""
    if mounts_under(workspace):
        return
    shutil.rmtree(workspace, ignore_errors=True)


def make_workspace(parent: Optional[str]) -> str:
    """``<parent>/.modulus-devc.run-<pid>-XXXX`` (``parent`` default: TMPDIR), found by
    ``sweep_workspaces`` if this process is killed."""
    parent = parent or tempfile.gettempdir()
    return make_staging(os.path.join(parent, WORKSPACE_NAME), "run", parent=parent)


def _read_proc(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _root_mount_names(mountinfo: bytes, path: bytes) -> bool:
    """Whether the mount at ``/`` of that mount namespace names ``path`` (an overlay whose lowerdir is
    in the workspace): only a container on the workspace, not a daemon whose private namespace merely
    copied the host's mounts."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == b"/" and (path + b"/") in line:
            return True
    return False


def workspace_users(workspace: str) -> list[int]:
    """Processes still using a workspace, with everything below them: those naming it on their
    command line (systemd-nspawn -D), with their cwd or root in it (chroot), and those in another
    mount namespace whose root mount names it (a container's processes: the overlay root of their
    namespace has ``lowerdir=<workspace>/lower``), which outlive a killed nspawn."""
    real = os.path.realpath(workspace).encode()
    mine = os.getpid()
    try:
        my_ns = os.readlink("/proc/self/ns/mnt")
    except OSError:
        my_ns = ""
    users: set[int] = set()
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == mine:
            continue
        stat = _read_proc(name, "stat")
        if not stat or stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X"):
            continue
        parents[int(name)] = int(stat[stat.rfind(b")") + 2:].split()[1])
        hit = real in _read_proc(name, "cmdline").replace(b"\0", b" ")
        for link in ("cwd", "root"):
            if not hit:
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{name}/{link}").encode()
                    hit = target == real or target.startswith(real + b"/")
        if not hit:
            try:
                other_ns = os.readlink(f"/proc/{name}/ns/mnt") != my_ns
            except OSError:
                other_ns = False
            hit = other_ns and _root_mount_names(_read_proc(name, "mountinfo"), real)
        if hit:
            users.add(int(name))
    queue = list(users)
    while queue:
        parent = queue.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in users:
                users.add(pid)
                queue.append(pid)
    return sorted(users)


def kill_workspace_users(workspace: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL ``workspace_users`` (all found before any is killed, so a container's processes are
    not lost when their nspawn dies) until none is left; returns their PIDs."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        users = workspace_users(workspace)
        if not users:
            return sorted(killed)
        for pid in users:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        if time.monotonic() > deadline:
            return sorted(killed)
        time.sleep(0.05)


def sweep_workspaces(parent: Optional[str], log: LogFn = no_log) -> list[str]:
    """Workspaces in ``parent`` left by killed runs: the processes still using them killed (a
    container whose nspawn outlived the run), their mounts released (deepest first; the loop
    devices clear themselves), then removed. Returns what was removed."""
    parent = parent or tempfile.gettempdir()
    pattern = re.compile(r"\." + re.escape(WORKSPACE_NAME) + r"\.run-([0-9]+)-[^/]+")
    for path in dead_entries(parent, pattern, dirs_only=True):
        killed = kill_workspace_users(path)
        if killed:
            log("killed what still ran in {}: PIDs {}".format(os.path.basename(path), ", ".join(map(str, killed))))
    sweep = sweep_stale(parent, WORKSPACE_NAME, release=lambda path: release_under(path, log), kill=True)
    for line in sweep.lines():
        log(line)
    return sweep.removed


def _tail(path: str, start: int, limit: int = TAIL_BYTES) -> str:
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        handle.seek(max(start, end - limit))
        return handle.read().decode("utf-8", "replace")


def _wait(proc: subprocess.Popen, timeout: float, log: LogFn) -> tuple[int, bool]:
    """(rc, timed out): on timeout or interruption the whole process group is killed."""
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        log(f"command timed out after {timeout:.0f} s: killing its process group")
        _kill_group(proc)
        return (proc.returncode if proc.returncode is not None else -9), True
    except BaseException:
        _kill_group(proc, grace=2.0)
        raise
    finally:
        # stragglers that left the session but stayed in the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_in_image(image_path: str, command: list[str], binds_ro: Optional[list[tuple[str, str]]] = None,
                 binds_rw: Optional[list[tuple[str, str]]] = None, env: Optional[dict[str, str]] = None,
                 workdir: Optional[str] = None, timeout: float = 3600.0, log_path: Optional[str] = None,
                 method: str = "auto", log: Optional[LogFn] = None, scratch_dir: Optional[str] = None,
                 workspace_dir: Optional[str] = None) -> RunResult:
    """Run ``command`` inside the developer container ``image_path``; the image is never written.

    ``image``: systemd-nspawn --image with --read-only --volatile=overlay (needs systemd as PID 1).
    ``overlay``: ROOT partition loop-mounted read-only, a tmpfs (or ``scratch_dir``) overlay on top,
    systemd-nspawn -D on the merged tree. ``chroot``: the same tree with proc/dev/sys and the binds
    mounted by hand. Every mount, loop device and process is released before returning.

    The mount points live in a workspace ``.modulus-devc.run-<pid>-*`` inside ``scratch_dir``, else
    ``workspace_dir``, else TMPDIR: if this process is killed, ``sweep_workspaces`` of that
    directory (or the caller's sweeper, with ``mounts.release_under``) cleans up after it; the
    loop device is mounted with autoclear, so releasing the mounts frees it.
    """
    log = log or no_log
    if not command or not all(isinstance(c, str) for c in command):
        raise ValueError(f"command must be a non-empty list of strings, got {command!r}")
    if timeout is None or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if workdir is not None and not os.path.isabs(workdir):
        raise ValueError(f"workdir={workdir!r} must be an absolute path inside the container")
    binds_ro = _check_binds("binds_ro", binds_ro or [])
    binds_rw = _check_binds("binds_rw", binds_rw or [])
    env = _check_env(env)
    chosen = choose_method(method)
    if not os.path.isfile(image_path):
        raise ContainerError(f"image {image_path} does not exist")
    part = root_partition(image_path)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="modulus-devc-", suffix=".log")
        os.close(fd)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)

    stack = MountStack(log)
    workspace = make_workspace(scratch_dir or workspace_dir)
    started = time.monotonic()
    timed_out = False
    rc = -1
    with open(log_path, "ab") as log_handle:
        start_offset = log_handle.seek(0, os.SEEK_END)
        try:
            with image_lock(image_path):
                popen_env = None
                preexec = None
                if chosen == "image":
                    args = nspawn_args(["--read-only", "--volatile=overlay", f"--image={image_path}"],
                                       command, binds_ro, binds_rw, env, workdir)
                else:
                    merged = _mount_root_overlay(stack, image_path, part.offset, part.size, workspace,
                                                 scratch_dir)
                    if chosen == "overlay":
                        args = nspawn_args(["-D", merged], command, binds_ro, binds_rw, env, workdir)
                    else:
                        _chroot_prepare(stack, merged, binds_ro, binds_rw)
                        popen_env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
                        popen_env.update(env)
                        args = list(command)
                        preexec = _chroot_into(merged, workdir or "/")
                header = "=== modulus devcontainer run ({}) {}: {}\n".format(
                    chosen, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), " ".join(command))
                log_handle.write(header.encode("utf-8"))
                log_handle.flush()
                log("running in {} ({}): {}".format(os.path.basename(image_path), chosen, " ".join(command)))
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=popen_env, preexec_fn=preexec)
                rc, timed_out = _wait(proc, timeout, log)
        finally:
            stack.close()
            _remove_workspace(workspace)
            took = time.monotonic() - started
            log_handle.write("=== rc={}{} in {:.1f} s\n".format(rc, " (timed out)" if timed_out else "", took).encode("utf-8"))
    stack.raise_errors("cleanup after the run")
    return RunResult(rc=rc, output_tail=_tail(log_path, start_offset), log_path=log_path, timed_out=timed_out,
                     method=chosen, duration=time.monotonic() - started, command=list(command))
