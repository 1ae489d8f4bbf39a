"""A booted systemd container dressed as a Flatcar host, for the pull units (tests/integration/test_pull_unit.py).

Built from the booted root of ``sim.booted`` (debootstrap minbase with systemd, plus ``git`` for
ansible-pull and ``btrfs-progs`` for the USR partitions, both on Flatcar too; no Python at all), on a writable overlay that lives across boots, so a test can boot
it, drive it, power it off, change its release and boot it again:

- its ``/`` carries the kit host root's Flatcar files (release files, ``update_engine_client``);
- the kernel it "runs" is the kit release's (``/proc/sys/kernel/osrelease`` and ``/proc/cmdline``
  are bound over with files of the overlay; ``uname -r`` stays the machine's kernel);
- the USR partitions of the kit host root are at ``/dev/disk/by-partlabel`` (a bound directory:
  ``switch_update()`` writes the pending release into USR-B while the container runs);
- the network is the machine's (S3 endpoint on 127.0.0.1), or none (``private_network=True``).

Also the locally built artifacts that stand in for downloads: a relocatable CPython tarball in the
python-build-standalone ``install_only`` layout (``portable_python``), a wheel directory with
ansible-core and boto3 (``wheelhouse``), and a git repository of the collection's work tree
(``snapshot_repo``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

from sim.booted import BootedRoot, booted_root
from sim.kit import (
    Kit,
    _locked,
    _rmtree,
    cache_root,
    sha256_file,
    update_engine_client_script,
    update_engine_status_text,
)

PORTABLE_RECIPE_VERSION = "1"
# glibc's own libraries: every host has them; everything else an extension module needs is bundled
GLIBC = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1",
         "libresolv.so.2", "ld-linux-x86-64.so.2", "linux-vdso.so.1"}
SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "site-packages", "lib2to3"}


def pull_root(log=lambda msg: None) -> BootedRoot:
    """The booted root with git (ansible-pull clones with it) and btrfs-progs (the collection reads the
    btrfs USR partitions with ``btrfs restore``), both on every Flatcar host; cached like sim.booted's."""
    return booted_root(extra_packages=("btrfs-progs", "git"), log=log)


def _ldd(path: Path) -> list[Path]:
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    found = []
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line)
        if m and m.group(1) not in GLIBC and "libpython" not in m.group(1):
            found.append(Path(m.group(2)))
    return found


def portable_python(cache_dir: Optional[str] = None, log=lambda msg: None) -> tuple[Path, str]:
    """A relocatable CPython tarball (``python/bin/python3``, ``python/lib/python3.X``, the shared
    libraries it needs in ``python/lib`` found through ``$ORIGIN`` run paths), made from this
    machine's interpreter (``sys.base_prefix``) with patchelf: the same layout as
    python-build-standalone's ``install_only`` tarballs. Returns (tarball, sha256)."""
    base = Path(sys.base_prefix)
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    rec = {"v": PORTABLE_RECIPE_VERSION, "base": str(base), "version": sys.version}
    key = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root(cache_dir) / "pull" / f"python-{key}"
    tarball = final / f"cpython-{platform.python_version()}-x86_64-unknown-linux-gnu-install_only.tar.gz"
    if (final / "sha256").is_file():
        return tarball, (final / "sha256").read_text().strip()
    if not shutil.which("patchelf"):
        raise RuntimeError("patchelf is needed to make the portable Python of the tests (Debian package patchelf)")
    exe = base / "bin" / f"python{ver}"
    if not exe.is_file() or not (base / "lib" / f"python{ver}" / "os.py").is_file():
        raise RuntimeError(f"{base} is not a CPython installation (bin/python{ver}, lib/python{ver}/os.py)")
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".python-{key}.lock"):
        if (final / "sha256").is_file():
            return tarball, (final / "sha256").read_text().strip()
        work = final.parent / f".python-{key}.work"
        _rmtree(work)
        top = work / "python"
        (top / "bin").mkdir(parents=True)
        (top / "lib").mkdir()
        log(f"portable Python from {base}")
        shutil.copy2(exe, top / "bin" / f"python{ver}")
        for link in ("python3", "python"):
            (top / "bin" / link).symlink_to(f"python{ver}")
        for lib in base.glob(f"lib/libpython{ver}*.so*"):
            shutil.copy2(lib, top / "lib" / lib.name, follow_symlinks=True)

        stdlib = base / "lib" / f"python{ver}"

        def ignore(directory: str, names: list[str]) -> set[str]:
            top_level = Path(directory) == stdlib
            return {n for n in names if n == "__pycache__" or n.endswith(".a") or n.startswith("_tkinter")
                    or (top_level and n in SKIP_STDLIB)}

        shutil.copytree(stdlib, top / "lib" / f"python{ver}", ignore=ignore, symlinks=True)
        (top / "lib" / f"python{ver}" / "site-packages").mkdir()
        dynload = top / "lib" / f"python{ver}" / "lib-dynload"
        elves = [top / "bin" / f"python{ver}", *sorted(top.glob("lib/libpython*.so.*")), *sorted(dynload.glob("*.so"))]
        bundled: set[str] = set()
        queue = list(elves)
        while queue:
            for dep in _ldd(queue.pop()):
                if dep.name not in bundled:
                    bundled.add(dep.name)
                    shutil.copy2(dep, top / "lib" / dep.name, follow_symlinks=True)
                    queue.append(top / "lib" / dep.name)
        for elf in elves + [top / "lib" / n for n in sorted(bundled)]:
            rpath = {"bin": "$ORIGIN/../lib", "lib-dynload": "$ORIGIN/../.."}.get(elf.parent.name, "$ORIGIN")
            elf.chmod(elf.stat().st_mode | 0o200)
            subprocess.run(["patchelf", "--set-rpath", rpath, str(elf)], check=True)
        probe = subprocess.run([str(top / "bin" / "python3"), "-c",
                                "import sys, ssl, ctypes, hashlib, zlib, json, venv, ensurepip; print(sys.prefix)"],
                               capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False)
        if probe.returncode != 0 or probe.stdout.strip() != str(top):
            raise RuntimeError(f"the portable Python does not run from {top}: {probe.stdout}{probe.stderr}")
        out = work / tarball.name
        with tarfile.open(out, "w:gz", compresslevel=6) as tar:
            tar.add(top, arcname="python")
        _rmtree(top)
        (work / "sha256").write_text(sha256_file(out) + "\n")
        (work / "recipe.json").write_text(json.dumps(rec, indent=2) + "\n")
        _rmtree(final)
        os.rename(work, final)
    return tarball, (final / "sha256").read_text().strip()


def wheelhouse(packages: list[str], cache_dir: Optional[str] = None, log=lambda msg: None) -> Path:
    """A directory of wheels for ``packages`` and their dependencies (``pip download`` from the
    package index once, then cached): the wheel mirror the bootstrap installs from."""
    rec = {"packages": sorted(packages), "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    key = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root(cache_dir) / "pull" / f"wheels-{key}"
    if (final / ".done").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".wheels-{key}.lock"):
        if (final / ".done").is_file():
            return final
        work = final.parent / f".wheels-{key}.work"
        _rmtree(work)
        log(f"pip download {' '.join(packages)}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(work), *packages],
                       check=True, timeout=900)
        (work / ".done").write_text(json.dumps(rec) + "\n")
        _rmtree(final)
        os.rename(work, final)
    return final


def snapshot_repo(src: Path, dest: Path, branch: str = "main") -> Path:
    """A git repository holding the work tree of ``src`` as it is now (tracked files and new files
    that are not ignored), committed on ``branch``: what ansible-pull clones in the tests."""
    files = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    dest.mkdir(parents=True)
    for rel in filter(None, files):
        path = src / rel
        if not (path.exists() or path.is_symlink()) or path.is_dir():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel, follow_symlinks=False)
    env = dict(os.environ, GIT_AUTHOR_NAME="modulus tests", GIT_AUTHOR_EMAIL="tests@modulus.invalid",
               GIT_COMMITTER_NAME="modulus tests", GIT_COMMITTER_EMAIL="tests@modulus.invalid")
    for cmd in (["init", "-q", "-b", branch], ["add", "-A"], ["commit", "-q", "-m", "work tree snapshot"]):
        subprocess.run(["git", "-C", str(dest), *cmd], check=True, env=env, capture_output=True)
    return dest


class PullHost:
    """The container: ``with PullHost(root, workdir, kit) as host: host.dress(...); host.boot(); host.sh(...)``."""

    def __init__(self, root: BootedRoot, workdir: Path, kit: Kit, binds: Optional[dict[str, Path]] = None) -> None:
        from ansible_collections.modulus.kmods.plugins.module_utils.mounts import MountStack

        self.root, self.workdir, self.kit = root, Path(workdir), kit
        self.binds = dict(binds or {})  # container path -> host path (read-only)
        self._stack = MountStack()
        (self.workdir / "ovl").mkdir(parents=True, exist_ok=True)
        self.merged = Path(self._stack.overlay(str(root.path), str(self.workdir / "ovl"), tmpfs=False))
        self.proc: Optional[subprocess.Popen] = None
        self.leader: Optional[int] = None
        self.started = 0.0
        self.console = self.workdir / "console.log"

    def __enter__(self) -> PullHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- dressing ---------------------------------------------------------------------------
    def dress(self, release: str = "current", update: str = "idle", booted: str = "A") -> None:
        """Put the Flatcar files of a kit host root (running ``release``) in the container's /."""
        src = self.kit.host_root(self.workdir / "hostroots", update=update, release=release, booted=booted)
        m = self.merged
        for rel in ("usr/share/flatcar", "usr/share/coreos", "etc/flatcar", "etc/coreos", "usr/lib/os-release",
                    "etc/os-release"):
            target = m / rel
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            if (src / rel).is_symlink():
                target.symlink_to(os.readlink(src / rel))
            elif (src / rel).is_dir():
                shutil.copytree(src / rel, target, symlinks=True)
            else:
                shutil.copy2(src / rel, target)
        from sim import nvidia_service

        nvidia_service.install(m)  # Flatcar's nvidia.service, enabled (no GPU unless simulate_gpu)
        sim = m / "etc/modulus-sim"
        sim.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "proc/sys/kernel/osrelease", sim / "osrelease")
        shutil.copy2(src / "proc/cmdline", sim / "cmdline")
        kernel = (sim / "osrelease").read_text().strip()
        (m / "usr/lib/modules" / kernel).mkdir(parents=True, exist_ok=True)
        disk = sim / "disk"
        if disk.exists():
            shutil.rmtree(disk)
        shutil.copytree(src / "dev/disk", disk, symlinks=True)
        self.set_update(update, release)

    def set_update(self, update: str, release: str = "current") -> None:
        """update_engine's state (kit states: idle, need_reboot, need_reboot_zero, downloading); for
        need_reboot*, USR-B (the not-booted partition) holds the pending release, as after an update."""
        pending = self.kit.releases["pending"]
        if update in ("need_reboot", "need_reboot_zero"):
            written = self.kit.host_root(self.workdir / "hostroots", update=update, release=release)
            src = written / "dev/disk/by-partlabel/USR-B"
            dst = self.merged / "etc/modulus-sim/disk/by-partlabel/USR-B"
            tmp = dst.with_name(".USR-B.new")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)  # the bound directory shows the new file at once
        status = update_engine_status_text(update, pending.version, 486539264, int(time.time()) - 60)
        uec = self.merged / "usr/bin/update_engine_client"
        tmp = uec.with_name(".update_engine_client.new")
        tmp.write_text(update_engine_client_script(status, Path("/run/update_engine_client.calls")))
        tmp.chmod(0o755)
        os.replace(tmp, uec)

    # ---- running ------------------------------------------------------------------------------
    def boot(self, private_network: bool = False, timeout: float = 120.0) -> float:
        """Boot systemd in the container; returns when it is up (seconds from the start)."""
        nspawn = shutil.which("systemd-nspawn") or "/usr/bin/systemd-nspawn"
        cmd = [nspawn, "--keep-unit", "--register=no", "-q", "-D", str(self.merged), "-b", "--machine=modulus-pull",
               f"--bind-ro={self.merged}/etc/modulus-sim/disk:/dev/disk",
               "--bind-ro=/etc/modulus-sim/osrelease:/proc/sys/kernel/osrelease",
               "--bind-ro=/etc/modulus-sim/cmdline:/proc/cmdline"]
        cmd += [f"--bind-ro={host}:{inside}" for inside, host in self.binds.items()]
        if private_network:
            cmd.append("--private-network")
        self.console.parent.mkdir(parents=True, exist_ok=True)
        with open(self.console, "ab") as fh:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the container exited ({self.proc.returncode}): {self.console.read_text()[-3000:]}")
            self.leader = self.leader or self._find_leader()
            if self.leader:
                res = self.sh("systemctl is-system-running --wait", timeout=max(1.0, deadline - time.monotonic()),
                              check=False)
                if res.stdout.strip() in ("running", "degraded"):
                    return time.monotonic() - self.started
            time.sleep(0.2)
        raise RuntimeError(f"the container did not finish booting in {timeout} s: {self.console.read_text()[-3000:]}")

    def _find_leader(self) -> Optional[int]:
        """The container's PID 1 (systemd), seen from the machine: the descendant of systemd-nspawn
        that is PID 1 in its own PID namespace."""
        if self.proc is None:
            return None
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int(re.search(r"^PPid:\s+(\d+)$", (entry / "status").read_text(), re.M).group(1))
            except (OSError, AttributeError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
        queue = list(children.get(self.proc.pid, []))
        while queue:
            pid = queue.pop(0)
            try:
                m = re.search(r"^NSpid:\s+(\d+)\s+(\d+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
            except OSError:
                continue
            if m and m.group(2) == "1":
                return pid
            queue.extend(children.get(pid, []))
        return None

    def sh(self, script: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell script inside the running container (all its namespaces), as root."""
        if not self.leader:
            raise RuntimeError("the container is not running")
        cmd = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", "/bin/sh", "-c", script]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""})
        if check and proc.returncode != 0:
            raise RuntimeError(f"in the container, {script!r} failed ({proc.returncode}): {proc.stdout[-3000:]}"
                               f"{proc.stderr[-3000:]}")
        return proc

    def poweroff(self, timeout: float = 120.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.leader:
            with contextlib.suppress(Exception):
                self.sh("systemctl poweroff --no-block", timeout=30, check=False)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc, self.leader = None, None

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            self.proc = None
        finally:
            self._stack.close()


def mono_s(value: str) -> Optional[float]:
    """A systemd ``...TimestampMonotonic`` value (µs) as seconds, None when unset (0)."""
    value = value.strip()
    return int(value) / 1e6 if value.isdigit() and int(value) else None


