"""Integration fixtures: the Flatcar simulation kit (tests/sim), its release server and host roots.

Every integration test runs as root against real parts. At the end of the session an autouse
fixture checks that no loop device backed by a kit or test file and no mount under the test
temporary directories is left behind, whatever module created it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from sim.kit import Kit, ReleaseServer, cache_root

NOT_ROOT = os.geteuid() != 0
ROOT_REASON = "integration tests need root (loop devices, mounts, systemd-nspawn); run them as root"


def loop_devices() -> list[dict[str, str]]:
    """Every attached loop device with its backing file (losetup --json)."""
    proc = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [{"name": d.get("name") or "", "back-file": d.get("back-file") or ""}
            for d in json.loads(proc.stdout).get("loopdevices", [])]


def mounts_under(prefixes: list[Path]) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at or below any of the prefixes."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            for p in prefixes:
                if mnt == str(p) or mnt.startswith(str(p).rstrip("/") + "/"):
                    found.append(mnt)
    return found


def _under(path: str, prefix: Path) -> bool:
    return path == str(prefix) or path.startswith(str(prefix).rstrip("/") + "/")


def mount_sources() -> dict[str, list[str]]:
    """Mount source (e.g. /dev/loop3) -> its mount points."""
    out: dict[str, list[str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            out.setdefault(fields[sep + 2], []).append(fields[4].replace("\\040", " "))
    return out


def leaks(session_tmp: Path, kit_cache: Path) -> list[str]:
    """Mounts under this session's temp dir, loop devices backed by its files, and loop devices
    backed by kit files that are unmounted or mounted under this session's temp dir (a kit-backed
    loop mounted elsewhere belongs to another process sharing the machine and is not ours)."""
    problems = [f"mount left: {m}" for m in mounts_under([session_tmp])]
    sources = mount_sources()
    for dev in loop_devices():
        back = dev["back-file"].replace(" (deleted)", "")
        mnts = sources.get(dev["name"], [])
        if _under(back, session_tmp) or (
                _under(back, kit_cache) and (not mnts or any(_under(m, session_tmp) for m in mnts))):
            problems.append(f"loop device left: {dev['name']} -> {dev['back-file']} mounted at {mnts or 'nothing'}")
    return problems


@pytest.fixture(scope="session", autouse=True)
def no_leaked_mounts_or_loops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the session if anything started by the tests leaves a mount or a loop device behind.

    TMPDIR points into the session's temp dir for the whole session, so temporary directories made
    by the modules (and their subprocesses) are covered by the check.
    """
    if NOT_ROOT:
        yield
        return
    session_tmp = tmp_path_factory.getbasetemp().resolve()
    tmpdir = session_tmp / "tmp"
    tmpdir.mkdir(exist_ok=True)
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(tmpdir)
    tempfile.tempdir = None
    before = set(leaks(session_tmp, cache_root()))
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        tempfile.tempdir = old_tempdir
    left = [p for p in leaks(session_tmp, cache_root()) if p not in before]
    assert not left, "cleanup failed:\n" + "\n".join(left)


@pytest.fixture(scope="session")
def kit() -> Kit:
    """The simulation kit (built once, then loaded from the cache in seconds)."""
    if NOT_ROOT:
        pytest.skip(ROOT_REASON)
    return Kit.build()


@pytest.fixture(scope="session")
def release_server(kit: Kit) -> Iterator[ReleaseServer]:
    """The kit's release server on 127.0.0.1 for the whole session (faults are reset after each test)."""
    with kit.serve() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_release_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that used the session release server leave it without faults and with no recorded hits."""
    yield
    if "release_server" in request.fixturenames:
        request.getfixturevalue("release_server").reset()


@pytest.fixture
def host_root_factory(kit: Kit, tmp_path: Path) -> Callable[..., Path]:
    """``host_root_factory(update="need_reboot", legacy=False, **kw)`` -> a fresh simulated host root."""

    def make(update: str = "idle", legacy: bool = False, **kwargs: object) -> Path:
        return kit.host_root(tmp_path, update=update, legacy=legacy, **kwargs)  # type: ignore[arg-type]

    return make
