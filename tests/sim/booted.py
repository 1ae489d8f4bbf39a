"""A booted systemd "host" in a container: a Debian root with systemd, dressed as Flatcar, booted
with ``systemd-nspawn -b`` (systemd as PID 1 of the container), for tests of what happens at boot:
systemd-sysext merging release-bound images, units ordered after it, and later the pull unit and
the update watcher.

The root (debootstrap minbase of bookworm, or trixie with ``suite="trixie"``, with ``systemd systemd-sysv kmod dbus``, about 240 MB) is
built once and cached as ``$MODULUS_SIM_CACHE/booted-<hash>/rootfs`` (``<hash>`` = the recipe below);
``systemd-sysext.service`` is enabled in ``sysinit.target.wants``. Every boot runs on a writable
overlay of that cached root (upper dir in a temporary directory), so the cache stays pristine.

Usage::

    from sim.booted import booted_root, boot
    root = booted_root()
    res = boot(root, os_release={"ID": "flatcar", "VERSION_ID": "9001.1.0"},
               extensions={"modulus-x-9001.1.0": Path(".../modulus-x-9001.1.0")},
               probe="systemd-sysext status")
    res.output            # what the probe printed (stdout and stderr)
    res.sysext_merged_s   # seconds from the container's start to systemd-sysext.service being active

The probe is a shell script run by ``modulus-probe.service`` (``After=systemd-sysext.service``) in
multi-user.target; the container powers itself off when it ends. Limits of the container (see
``../shared/reference/machine.md``): ``uname -r`` is the machine's kernel (name the image's kernel
explicitly: ``modprobe -S <kver>``), no loop devices, so ``.raw`` images do not merge here; use
directory extensions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sim.kit import DEFAULT_MIRROR, KitError, _locked, _rmtree, _run, cache_root, umount_below

BOOTED_RECIPE_VERSION = "1"
SUITE = "bookworm"
# The roots booted tests run on: bookworm (systemd 252) and trixie (systemd 257, what current
# Flatcar stable ships is 256/257). Both come from the same mirror; trixie is used for container
# roots only and never enters the machine's own apt sources.
SUITES = {"bookworm": "systemd 252", "trixie": "systemd 257"}
PACKAGES = ("systemd", "systemd-sysv", "kmod", "dbus")
PROBE_UNIT = "modulus-probe.service"
_MONO_RE = re.compile(r"^SYSEXT-ACTIVE-MONO=(\d+)$", re.M)
_PROBE_RE = re.compile(r"^PROBE-START-WALL=([0-9.]+)$", re.M)


@dataclass
class BootedRoot:
    path: Path  # the cached root; never modified by a boot
    recipe_hash: str
    suite: str = SUITE


@dataclass
class BootResult:
    rc: int
    output: str  # the probe's output
    console: str  # systemd-nspawn's output (the container's console)
    duration: float  # seconds from the start of systemd-nspawn to its end
    sysext_merged_s: float | None  # seconds from the start of systemd-nspawn to systemd-sysext.service active
    probe_started_s: float | None  # ... to the probe's start (after the merge)
    timed_out: bool


def recipe(mirror: str, extra_packages: tuple[str, ...] = (), suite: str = SUITE) -> dict:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    rec = {"version": BOOTED_RECIPE_VERSION, "suite": suite, "packages": list(PACKAGES), "mirror": mirror}
    if extra_packages:  # only then: the default root keeps its recipe (and its cache)
        rec["extra_packages"] = sorted(extra_packages)
    return rec


def booted_root(cache_dir: str | os.PathLike[str] | None = None, mirror: str | None = None,
                log=lambda msg: None, extra_packages: tuple[str, ...] = (), suite: str = SUITE) -> BootedRoot:
    """The cached systemd root of Debian ``suite`` (``bookworm``: systemd 252, ``trixie``: systemd 257;
    built on first use, ~35-60 s of debootstrap; a second process waits).
    ``extra_packages`` are installed too (a root of its own recipe, e.g. ``("git",)`` for ansible-pull)."""
    mirror = mirror or os.environ.get("MODULUS_SIM_MIRROR") or DEFAULT_MIRROR
    rec = recipe(mirror, tuple(extra_packages), suite)
    packages = list(PACKAGES) + sorted(extra_packages)
    key = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
    base = cache_root(cache_dir)
    final = base / f"booted-{key}"
    done = final / "rootfs" / ".modulus-booted-done"
    if done.is_file():
        return BootedRoot(final / "rootfs", key, suite)
    for tool in ("debootstrap", "systemd-nspawn"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            raise KitError(f"{tool} is needed for the booted container (Debian packages debootstrap, systemd-container)")
    with _locked(base / f".booted-{key}.lock"):
        if done.is_file():
            return BootedRoot(final / "rootfs", key, suite)
        work = base / f".booted-{key}.work"
        _rmtree(work)
        work.mkdir(parents=True)
        rootfs = work / "rootfs"
        log(f"debootstrap {suite} with {', '.join(packages)} -> {rootfs}")
        debs = base / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        try:
            _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), f"--cache-dir={debs}",
                  "--components=main", suite, str(rootfs), mirror], "debootstrap of the booted container",
                 log_file=work / "debootstrap.log", timeout=3600)
        finally:
            umount_below(rootfs)
        dress(rootfs)
        (rootfs / ".modulus-booted-done").write_text(json.dumps(rec) + "\n")
        (work / "recipe.json").write_text(json.dumps(rec, indent=2) + "\n")
        _rmtree(final)
        os.rename(work, final)
    return BootedRoot(final / "rootfs", key, suite)


def dress(rootfs: Path) -> None:
    """What every boot needs: systemd-sysext at boot, no getty or network waits, an empty machine-id."""
    wants = rootfs / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "systemd-sysext.service"
    if not link.is_symlink():
        link.symlink_to("/lib/systemd/system/systemd-sysext.service")
    for unit in ("getty@tty1.service", "console-getty.service", "systemd-networkd-wait-online.service",
                 "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"):
        mask = rootfs / "etc/systemd/system" / unit
        if not mask.exists() and not mask.is_symlink():
            mask.symlink_to("/dev/null")
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/extensions").mkdir(parents=True, exist_ok=True)


def _os_release_text(values: dict[str, str]) -> str:
    return "".join(f'{k}="{v}"\n' if " " in v else f"{k}={v}\n" for k, v in values.items())


def _probe_files(merged: Path, probe: str) -> None:
    script = merged / "etc/modulus-probe.sh"
    script.write_text("#!/bin/sh\n"
                      "echo PROBE-START-WALL=$(date +%s.%N)\n"
                      "echo SYSEXT-ACTIVE-MONO=$(systemctl show -p ActiveEnterTimestampMonotonic --value "
                      "systemd-sysext.service)\n" + probe + "\n")
    script.chmod(0o755)
    unit = merged / "etc/systemd/system" / PROBE_UNIT
    unit.write_text("[Unit]\nDescription=modulus test probe\nAfter=systemd-sysext.service multi-user.target\n"
                    "Wants=systemd-sysext.service\n\n[Service]\nType=oneshot\n"
                    "ExecStart=/bin/sh -c '/etc/modulus-probe.sh > /out/probe.log 2>&1'\n"
                    "ExecStopPost=/bin/systemctl poweroff --no-block\n\n[Install]\nWantedBy=multi-user.target\n")
    wants = merged / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / PROBE_UNIT).symlink_to(f"/etc/systemd/system/{PROBE_UNIT}")


def boot(root: BootedRoot, *, os_release: dict[str, str], extensions: dict[str, Path] | None = None,
         probe: str = "true", timeout: float = 180.0, workdir: str | os.PathLike[str] | None = None,
         copy_in: dict[str, Path] | None = None, copy_root: bool = False,
         out_dir: Path | None = None) -> BootResult:
    """Boot the root once on a fresh overlay with ``os_release`` as its ``/etc/os-release`` and
    ``/usr/lib/os-release``, the directory ``extensions`` (name -> directory) in
    ``/var/lib/extensions``, and ``probe`` run after systemd-sysext; returns when it powered off.
    ``copy_in`` (absolute path in the container -> file or directory here) is copied into the root
    first: e.g. a kit kernel's module tree at ``/usr/lib/modules/<kver>`` (the Debian root has none).
    ``copy_root``: boot a copy of the root (``cp -a``, a few seconds) instead of an overlay on it, so
    ``/usr`` is no overlay before systemd-sysext's: the kernel stacks at most two overlays, and
    Flatcar's kmod helper mounts one more on the merged ``/usr/lib/modules/<kver>``. ``out_dir`` (the
    container's ``/out``) keeps what the probe wrote there; by default it is a temporary directory."""
    from ansible_collections.modulus.kmods.plugins.module_utils.mounts import MountStack

    nspawn = shutil.which("systemd-nspawn") or "/usr/bin/systemd-nspawn"
    with tempfile.TemporaryDirectory(prefix="booted-", dir=workdir) as td, MountStack() as stack:
        work = Path(td)
        out = Path(out_dir) if out_dir is not None else work / "out"
        out.mkdir(parents=True, exist_ok=True)
        ovl = work / "ovl"
        ovl.mkdir()
        if copy_root:
            merged = ovl / "root"
            _run(["cp", "-a", str(root.path), str(merged)], "copying the booted root")
        else:
            merged = Path(stack.overlay(str(root.path), str(ovl), tmpfs=False))
        text = _os_release_text(os_release)
        for rel in ("etc/os-release", "usr/lib/os-release"):
            target = merged / rel
            if target.is_symlink() or target.exists():
                target.unlink()
            target.write_text(text)
        for name, src in (extensions or {}).items():
            shutil.copytree(src, merged / "var/lib/extensions" / name, symlinks=True)
        for inside, src in (copy_in or {}).items():
            target = merged / inside.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).is_dir():
                shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
        _probe_files(merged, probe)
        cmd = [nspawn, "--keep-unit", "--register=no", "-q", "-D", str(merged), "-b", f"--bind={out}:/out",
               "--machine=modulus-booted"]
        started, started_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            console, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            console, _ = proc.communicate()
        duration = time.monotonic() - started
        output = (out / "probe.log").read_text(errors="replace") if (out / "probe.log").exists() else ""
    mono = _MONO_RE.search(output)
    probe_mono = _PROBE_RE.search(output)
    # the container shares the machine's CLOCK_MONOTONIC (no time namespace): compare with our start
    merged_s = int(mono.group(1)) / 1e6 - started if mono and int(mono.group(1)) else None
    probe_s = float(probe_mono.group(1)) - started_wall if probe_mono else None
    return BootResult(rc=proc.returncode, output=output, console=console.decode("utf-8", "replace"),
                      duration=duration, sysext_merged_s=merged_s, probe_started_s=probe_s, timed_out=timed_out)
