"""Kill tests: start a module in its own session, wait for a moment, SIGKILL the whole tree, list leftovers.

Used by the integration tests of both sides (image: ``coreos_devcontainer``; build: ``kmod_build``)::

    from sim import faults

    run = faults.start_module("modulus.kmods.coreos_devcontainer", args, tag_dir=tmp_path)
    try:
        faults.wait_for(lambda: faults.find_files(cache, (".partial-*",)), timeout=60, run=run)
    finally:
        killed = faults.kill_tree(run)              # killpg(SIGKILL) + escaped processes, waits until gone
    ...rerun the module normally...
    left = faults.leftovers([tmp_path], patterns=faults.DEFAULT_PATTERNS)
    assert not left, left.describe()

Note: ``ansible`` forks its worker into a session of its own, so ``killpg`` alone misses most of
the tree; ``kill_tree`` therefore also scans /proc. A run is recognised by its *tag*: ``start_module`` puts ``MODULUS_FAULT_TAG=<random>`` and
``TMPDIR=<tag_dir>/tmp`` into the environment of ``ansible`` (the local connection and every
process below it inherit it). ``processes_referencing`` finds processes whose environment holds the
tag, or whose cmdline, cwd or root names one of the given directories: also those that left the
session (daemons such as gpg-agent call ``setsid``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

from sim.ansible_run import REPO, ansible_env, module_cmd, parse_result
from sim.hosttools import DEFAULT_VARIANT

T = TypeVar("T")

# Temporary things a killed run may leave: downloads, gnupg homes, read-only mount dirs,
# workspaces of run_in_image and of kmod_build (``.<dest>.build-<pid>-*``).
DEFAULT_PATTERNS = (".partial-*", "modulus-gnupg-*", "modulus-ro-*", "modulus-run-*", ".*.build-*",
                    ".*.run-*", ".*.fetch-*")
# Processes that must never survive a run.
SUSPECT_COMMS = ("gpg-agent", "gpg", "gpgv", "systemd-nspawn", "lbzip2", "bzip2", "sleep", "make", "scdaemon",
                 "keyboxd", "dirmngr")


@dataclass
class ModuleRun:
    """A module started by ``start_module`` (its own session: ``pgid == proc.pid``)."""
    proc: subprocess.Popen
    tag: str
    tag_dir: Path
    stdout_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def result(self, timeout: float = 600) -> dict:
        """Wait for a run that was not killed and return its module result."""
        self.proc.wait(timeout=timeout)
        return parse_result(self.output())


def start_module(module: str, args: dict, *, tag_dir: Path, check: bool = False,
                 env: Optional[dict[str, str]] = None, host_tools: Optional[str] = DEFAULT_VARIANT) -> ModuleRun:
    """Start ``ansible localhost -m module -a args`` in a new session; stdout+stderr go to a file in
    ``tag_dir``; ``TMPDIR`` is ``tag_dir/tmp`` (created) and ``MODULUS_FAULT_TAG`` a random tag."""
    tag_dir = Path(tag_dir)
    (tag_dir / "tmp").mkdir(parents=True, exist_ok=True)
    tag = "modulus-fault-" + secrets.token_hex(6)
    full_env = ansible_env(host_tools)
    full_env.update({"TMPDIR": str(tag_dir / "tmp"), "MODULUS_FAULT_TAG": tag})
    if env:
        full_env.update(env)
    out = tag_dir / f"ansible-{tag}.out"
    with open(out, "wb") as handle:
        proc = subprocess.Popen(module_cmd(module, args, check), env=full_env, cwd=str(REPO), stdin=subprocess.DEVNULL,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return ModuleRun(proc, tag, tag_dir, out)


def wait_for(condition: Callable[[], T], timeout: float, *, interval: float = 0.05, run: Optional[ModuleRun] = None,
             what: str = "condition") -> T:
    """Poll ``condition()`` until it returns something truthy and return it. Raises ``TimeoutError``
    after ``timeout`` s, or ``RuntimeError`` if ``run`` ended first (with its output)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            raise RuntimeError(f"the module ended (rc={run.proc.returncode}) before {what}:\n{run.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- processes


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


def _pgid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    return int(stat[stat.rfind(b")") + 2:].split()[2]) if stat else -1


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            break
        pid = int(stat[stat.rfind(b")") + 2:].split()[1])
    return pids


@dataclass
class Proc:
    pid: int
    comm: str
    cmdline: str
    why: str
    pgid: int = -1

    def __str__(self) -> str:
        return f"{self.pid} {self.comm} ({self.why}): {self.cmdline[:200]}"


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def processes_referencing(dirs: Iterable[Path] = (), tags: Iterable[str] = ()) -> list[Proc]:
    """Live processes (not this one nor its ancestors) whose environment holds one of ``tags``, or
    whose cmdline, cwd or root directory names a path at or below one of ``dirs``, and all their
    descendants (the processes inside a container, in other PID and mount namespaces)."""
    prefixes = [str(Path(d).resolve()) for d in dirs]
    tag_bytes = [t.encode() for t in tags]
    mine = _ancestors()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine or not _alive(int(name)):
            continue
        pid = int(name)
        cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        comm = _read(f"/proc/{pid}/comm").decode(errors="replace").strip()
        why = ""
        environ = _read(f"/proc/{pid}/environ")
        if any(t in environ for t in tag_bytes):
            why = "tag in environment"
        elif any(p in cmdline for p in prefixes):
            why = "cmdline"
        else:
            for link in ("cwd", "root"):
                try:
                    target = os.readlink(f"/proc/{pid}/{link}")
                except OSError:
                    continue
                if any(_under(target, p) for p in prefixes):
                    why = link
                    break
        if why:
            found.append(Proc(pid, comm, cmdline, why, _pgid(pid)))
    # and everything below them: a container's processes have a clean environment, and their cwd and
    # root are paths of another mount namespace
    parents = _parents()
    seen = {p.pid for p in found}
    queue = list(seen)
    while queue:
        parent = queue.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in seen and pid not in mine and _alive(pid):
                seen.add(pid)
                queue.append(pid)
                cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
                comm = _read(f"/proc/{pid}/comm").decode(errors="replace").strip()
                found.append(Proc(pid, comm, cmdline, f"child of {parent}", _pgid(pid)))
    return found


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read(f"/proc/{name}/stat")
            if stat:
                out[int(name)] = int(stat[stat.rfind(b")") + 2:].split()[1])
    return out


def kill_tree(run: ModuleRun, dirs: Iterable[Path] = (), timeout: float = 30) -> list[Proc]:
    """SIGKILL the run's process group, then every process still carrying its tag or referencing
    ``dirs`` (default: the run's tag_dir), repeated until none is left; reap the direct child.
    Returns the processes found outside the process group (escaped) and killed. Raises ``TimeoutError`` if something survives."""
    dirs = list(dirs) or [run.tag_dir]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pgid, signal.SIGKILL)
    escaped: dict[int, Proc] = {}
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.proc.wait(timeout=0.05)
        left = processes_referencing(dirs, [run.tag])
        if not left and run.proc.poll() is not None:
            return list(escaped.values())
        for p in left:
            if p.pgid not in (run.pgid, -1):
                escaped.setdefault(p.pid, p)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError("processes survive SIGKILL: " + "; ".join(map(str, left)))
        time.sleep(0.05)


def kill_matching(run: ModuleRun, which: Callable[[Proc], bool], timeout: float = 30) -> list[Proc]:
    """SIGKILL only the run's processes (by its tag, and their descendants) for which ``which(proc)``
    is true, e.g. the Ansible side but not the container it started, as an Ansible timeout or an
    OOM kill of the module would; wait until they are gone and return them."""
    killed: dict[int, Proc] = {}
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in processes_referencing([], [run.tag]) if which(p)]
        if not left:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(timeout=5)
            return list(killed.values())
        for p in left:
            killed.setdefault(p.pid, p)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError("processes survive SIGKILL: " + "; ".join(map(str, left)))
        time.sleep(0.05)


# --------------------------------------------------------------------------- loops, mounts, files


def loop_devices() -> list[dict[str, str]]:
    """Every attached loop device: name, back-file, autoclear ("1"/"0"), offset."""
    proc = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,AUTOCLEAR,OFFSET"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    out = []
    for dev in json.loads(proc.stdout).get("loopdevices", []):
        out.append({k: str(v if v is not None else "") for k, v in dev.items()})
    return out


def loops_backed_by(paths: Iterable[Path]) -> list[str]:
    """Loop devices whose backing file is at or below one of ``paths`` ("/dev/loopN -> file")."""
    prefixes = [str(Path(p).resolve()) for p in paths]
    found = []
    for dev in loop_devices():
        back = dev.get("back-file", "").replace(" (deleted)", "")
        if any(_under(back, p) for p in prefixes):
            found.append(f"{dev.get('name')} -> {dev.get('back-file')}")
    return found


def mounts_under(paths: Iterable[Path], mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below one of ``paths`` (this process's mount namespace)."""
    prefixes = [str(Path(p).resolve()) for p in paths]
    found = []
    for line in _read(mountinfo).decode(errors="surrogateescape").splitlines():
        fields = line.split()
        if len(fields) > 4:
            mnt = fields[4].replace("\\040", " ")
            if any(_under(mnt, p) for p in prefixes):
                found.append(mnt)
    return found


def find_files(root: Path, patterns: Sequence[str] = DEFAULT_PATTERNS, max_depth: int = 6) -> list[Path]:
    """Paths below ``root`` whose name matches one of ``patterns`` (fnmatch), not descending into
    mount points, matches or deeper than ``max_depth``."""
    root = Path(root)
    found: list[Path] = []
    mounts = set(mounts_under([root]))

    def walk(directory: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if any(fnmatch.fnmatchcase(entry.name, pat) for pat in patterns):
                found.append(Path(entry.path))
                continue
            if depth < max_depth and entry.is_dir(follow_symlinks=False) and entry.path not in mounts:
                walk(Path(entry.path), depth + 1)

    walk(root, 0)
    return sorted(found)


@dataclass
class Leftovers:
    loops: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    processes: list[Proc] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loops or self.mounts or self.processes or self.files)

    def describe(self) -> str:
        parts = [f"loop: {x}" for x in self.loops] + [f"mount: {x}" for x in self.mounts]
        parts += [f"process: {x}" for x in self.processes] + [f"file: {x}" for x in self.files]
        return "\n".join(parts) or "nothing left"


def leftovers(dirs: Iterable[Path], *, tags: Iterable[str] = (), patterns: Sequence[str] = DEFAULT_PATTERNS,
              file_roots: Optional[Iterable[Path]] = None) -> Leftovers:
    """Everything a run left: loops backed by files in ``dirs``, mounts under them, processes
    referencing them (or carrying ``tags``), and files matching ``patterns`` under ``file_roots``
    (default ``dirs``)."""
    dirs = [Path(d) for d in dirs]
    files: list[Path] = []
    for root in (dirs if file_roots is None else [Path(r) for r in file_roots]):
        files += find_files(root, patterns)
    return Leftovers(loops=loops_backed_by(dirs), mounts=mounts_under(dirs),
                     processes=processes_referencing(dirs, tags), files=files)


def gpg_agents() -> list[Proc]:
    """Every running gpg-agent (``pgrep -f gpg-agent`` equivalent), whoever started it."""
    out, mine = [], _ancestors()
    for name in os.listdir("/proc"):
        if name.isdigit() and _alive(int(name)):
            cmd = _read(f"/proc/{name}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
            if "gpg-agent" in cmd and int(name) not in mine:
                out.append(Proc(int(name), _read(f"/proc/{name}/comm").decode().strip(), cmd, "gpg-agent"))
    return out
