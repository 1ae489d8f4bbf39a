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

A test acts at a moment the run under test has certainly reached, never after a sleep: a build
is held in make until the test lets it go or kills it (``HeldSource``, ``run_released``,
``run_without_build``), a tool on the run's PATH finishes its work and waits (``ToolHold``), or
the test sees a process blocked in a given system call (``in_syscall``, ``sleeping``: a waiter in
its poll sleep).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import platform
import secrets
import shlex
import shutil
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


# --------------------------------------------------------------------------- held builds

HELD, GO = "held", "go"
# Read by make in the container before anything is compiled: say so (``held`` beside the Kbuild),
# then wait until the test says ``go`` (or kills the run). ``$(src)`` is the absolute module
# directory (``M=``) in kbuild; the Kbuild is read more than once per build, every read waits.
HOLD_KBUILD = ("# sim.faults.HeldSource: announce the build, then wait for the test's go\n"
               f"$(shell touch $(src)/{HELD}; while [ ! -e $(src)/{GO} ]; do sleep 0.05; done)\n")


@dataclass
class HeldSource:
    """A copy of a Kbuild module source (kmod_build's generic recipe) whose every build is held.

    kmod_build copies the source to ``<dest parent>/.<dest>.build-*/work/src`` on the host, which is
    bind-mounted read-write into the container; when ``make`` reads the Kbuild there it creates
    ``held`` in that copy and blocks until ``go`` appears beside it. So a test knows the container
    is running the build (``wait_held``), and decides when it goes on (``release``) or is killed."""
    path: Path

    @classmethod
    def make(cls, src: Path, dest: Path) -> HeldSource:
        """Copy the module source ``src`` to ``dest`` and prepend the hold to its Kbuild."""
        shutil.copytree(src, dest, symlinks=True)
        kbuild = Path(dest) / "Kbuild"
        kbuild.write_text(HOLD_KBUILD + kbuild.read_text())
        return cls(Path(dest))

    @staticmethod
    def held(parent: Path, exclude: Iterable[Path] = ()) -> list[Path]:
        """The build copies (``.../work/src``) in the kmod_build workspaces under ``parent`` that were
        held (``held`` is there, ``go`` not yet), but those in ``exclude``: the workspace of a killed
        run stays until the next run sweeps it."""
        skip = {Path(p) for p in exclude}
        return sorted(p.parent for p in Path(parent).glob(f".*.build-*/work/src/{HELD}")
                      if not (p.parent / GO).exists() and p.parent not in skip)

    def wait_held(self, parent: Path, run: ModuleRun, timeout: float = 600, exclude: Iterable[Path] = ()) -> Path:
        """Wait until a build of ``run`` is held under ``parent`` (one not in ``exclude``); its copy."""
        return wait_for(lambda: self.held(parent, exclude), timeout, run=run, what=f"a held build under {parent}")[0]

    @staticmethod
    def release(copy: Path) -> None:
        """Let the held build of ``copy`` (from ``held``/``wait_held``) go on."""
        (Path(copy) / GO).touch()


@dataclass
class HeldRun:
    result: dict
    output: str
    held_for: float  # seconds from seeing the build held to releasing it: the run was alive all along
    wall: float  # seconds from starting the module to its end, measured here


def run_released(module: str, args: dict, source: HeldSource, parent: Path, *, tag_dir: Path,
                 hold: float = 0.0, timeout: float = 600) -> HeldRun:
    """Run ``module`` (whose build uses ``source``), wait until its build is held, keep it held
    ``hold`` seconds more (so that the run certainly lasts that long), release it and return its result."""
    killed = HeldSource.held(parent)
    started = time.monotonic()
    run = start_module(module, args, tag_dir=tag_dir)
    try:
        copy = source.wait_held(parent, run, timeout=timeout, exclude=killed)
        seen = time.monotonic()
        time.sleep(hold)
        held_for = time.monotonic() - seen  # before the release: the run cannot end earlier
        source.release(copy)
        result = run.result(timeout=timeout)
    finally:
        if run.proc.poll() is None:
            kill_tree(run)
    return HeldRun(result, run.output(), held_for, time.monotonic() - started)


@dataclass
class ToolHold:
    """A stand-in for an executable, first on the PATH of a module run (``env()``): it runs the real
    one, then creates ``held`` in its directory and waits until ``go`` appears there (``release``)
    or it is killed. The test knows the tool's work is done and the module waits for it."""
    directory: Path
    tool: str

    @classmethod
    def make(cls, directory: Path, tool: str) -> ToolHold:
        real = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if real is None:
            raise FileNotFoundError(f"{tool} is not installed")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / tool
        script.write_text(f"#!/bin/sh\n# sim.faults.ToolHold: {real}, then wait for the test's go\n"
                          f"{shlex.quote(real)} \"$@\" || exit $?\n"
                          f"touch {shlex.quote(str(directory / HELD))}\n"
                          f"while [ ! -e {shlex.quote(str(directory / GO))} ]; do sleep 0.05; done\n")
        script.chmod(0o755)
        return cls(directory, tool)

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.directory}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def held(self) -> bool:
        return (self.directory / HELD).exists() and not (self.directory / GO).exists()

    def release(self) -> None:
        (self.directory / GO).touch()


def run_without_build(module: str, args: dict, parent: Path, *, tag_dir: Path,
                      timeout: float = 600) -> tuple[dict, str, float]:
    """Run ``module``, whose build would be held (``HeldSource``), when no build must start (up to
    date, a known failure): (result, output, wall seconds). A build held under ``parent`` fails the
    call at once (the run is killed) instead of waiting forever."""
    killed = HeldSource.held(parent)
    started = time.monotonic()
    run = start_module(module, args, tag_dir=tag_dir)
    try:
        wait_for(lambda: run.proc.poll() is not None or HeldSource.held(parent, killed), timeout,
                 what="the end of the run")
        held = HeldSource.held(parent, killed)
    finally:
        if run.proc.poll() is None:
            kill_tree(run)
    assert not held, f"a build started: make was held in {held}\n{run.output()[-3000:]}"
    return run.result(), run.output(), time.monotonic() - started


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


# the numbers of the few system calls the tests look for a process blocked in, by machine
SYSCALLS = {"x86_64": {"nanosleep": 35, "clock_nanosleep": 230, "flock": 73},
            "aarch64": {"nanosleep": 101, "clock_nanosleep": 115, "flock": 32}}
SLEEPS = ("nanosleep", "clock_nanosleep")  # Python's time.sleep, sleep(1)


def in_syscall(pid: int, names: Iterable[str], tid: Optional[int] = None) -> bool:
    """Whether process ``pid`` (its thread ``tid``) is blocked in one of the system calls ``names``
    right now (``/proc/<pid>/syscall`` names the call a blocked task is in, "running" otherwise)."""
    table = SYSCALLS[platform.machine()]
    wanted = {table[n] for n in names}
    path = f"/proc/{pid}/syscall" if tid is None else f"/proc/{pid}/task/{tid}/syscall"
    call = _read(path).split(maxsplit=1)
    return bool(call) and call[0].isdigit() and int(call[0]) in wanted


def sleeping(run: ModuleRun, cmdline: str) -> list[Proc]:
    """The run's processes whose command line contains ``cmdline`` and that are blocked in a sleep
    right now: e.g. a module in the poll sleep of a wait, which it enters only once it has looked
    and found it must wait."""
    return [p for p in processes_referencing([], [run.tag]) if cmdline in p.cmdline and in_syscall(p.pid, SLEEPS)]


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
