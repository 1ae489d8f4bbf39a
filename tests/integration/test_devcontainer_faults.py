"""coreos_devcontainer under SIGKILL (root, simulation kit): the module runs through ``ansible localhost -m``
in a session of its own (sim.faults), is killed with its whole process tree while an image downloads or a
command runs inside the container, and a normal rerun must leave nothing of the killed run behind: no loop
device, mount, process or gpg-agent, no ``.partial-*``, ``modulus-gnupg-*``, staging or run workspace, and a
cache entry that is whole (the old one or the new one, metadata and image verifying)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim import faults
from sim.kit import Kit, ReleaseServer
from sim.signing import PgpKey

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="kill tests need root (loop devices, mounts, nspawn)")]

MODULE = "modulus.kmods.coreos_devcontainer"
NAME = "flatcar_developer_container.bin.bz2"
IMAGE = "flatcar_developer_container.bin"
METHODS = ["overlay", "chroot"] if shutil.which("systemd-nspawn") else ["chroot"]


def args_for(kit: Kit, server: ReleaseServer, cache: Path, **extra: object) -> dict:
    args = {"release": kit.releases["current"].version, "board": "amd64-usr", "channel": "stable",
            "host_root": str(cache.parent / "no-host"), "url_template": server.url_template,
            "fallback_url_template": "", "verify_key": str(kit.key.public_armored),
            "verify_fingerprint": [kit.key.fingerprint], "cache_dir": str(cache), "retry_delay": 0.2}
    args.update(extra)
    return args


def rerun(args: dict, tag_dir: Path, timeout: float = 600) -> dict:
    """A normal run with the same TMPDIR as the killed one (so its sweep sees the same places)."""
    return faults.start_module(MODULE, args, tag_dir=tag_dir).result(timeout=timeout)


def entry_files(cache: Path, version: str) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256 or '') of each file of the cache entry."""
    out = {}
    for path in sorted((cache / "amd64-usr" / version).iterdir()):
        st = path.stat()
        digest = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
        out[path.name] = (st.st_size, st.st_mtime_ns, digest)
    return out


def assert_entry_whole(cache: Path, kit: Kit, version: str, fingerprint: str) -> None:
    """metadata.json matches the image, was verified with ``fingerprint``, and the image is the signed one."""
    directory = cache / "amd64-usr" / version
    assert sorted(p.name for p in directory.iterdir()) == [IMAGE, "metadata.json"]
    meta = json.loads((directory / "metadata.json").read_text())
    st = (directory / IMAGE).stat()
    assert meta["verified"] is True and meta["fingerprint"] == fingerprint
    assert (meta["size"], meta["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    rel = next(r for r in kit.releases.values() if r.version == version)
    assert subprocess.run(["cmp", "--silent", str(directory / IMAGE), str(rel.image_raw)], check=False).returncode == 0


def assert_nothing_left(tag_dir: Path, tags: list[str]) -> None:
    left = faults.leftovers([tag_dir], tags=tags)
    assert not left, "the killed run left:\n" + left.describe()
    agents = [a for a in faults.gpg_agents() if str(tag_dir) in a.cmdline]
    assert agents == [], agents


@pytest.fixture
def tag_dir(tmp_path: Path) -> Iterator[Path]:
    """A unique directory per test: the cache lives in it and TMPDIR of the runs points into it. Whatever
    happens, nothing started for it survives the test."""
    d = tmp_path / "run"
    d.mkdir()
    yield d
    for proc in faults.processes_referencing([d]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


def kill_when(run: faults.ModuleRun, condition, what: str, timeout: float = 120) -> tuple[object, list[faults.Proc], float]:
    """Wait for ``condition``, then SIGKILL the whole tree; (condition's value, escaped processes, seconds waited)."""
    started = time.monotonic()
    try:
        value = faults.wait_for(condition, timeout, run=run, what=what)
    finally:
        escaped = faults.kill_tree(run)
    return value, escaped, time.monotonic() - started


# ------------------------------------------------------------------ killed while downloading


@pytest.mark.timeout(600)
def test_kill_during_download_then_rerun_leaves_nothing(kit: Kit, release_server: ReleaseServer, tag_dir: Path) -> None:
    cache = tag_dir / "cache"
    args = args_for(kit, release_server, cache)
    run = faults.start_module(MODULE, args, tag_dir=tag_dir)
    partials, escaped, waited = kill_when(run, lambda: faults.find_files(cache, (".partial-*",)), "a download under way")
    # killed mid-stream: the partial file and the private GNUPGHOME are there, no gpg-agent ever was
    assert partials and all(".partial-flatcar_developer_container.bin." in p.name for p in partials)
    assert faults.find_files(cache, ("modulus-gnupg-*",))
    assert [a for a in faults.gpg_agents() if str(tag_dir) in a.cmdline] == []
    assert not faults.processes_referencing([tag_dir], [run.tag])
    print(f"killed after {waited:.1f} s; escaped the session: {sorted({p.comm for p in escaped})}")

    res = rerun(args, tag_dir)
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is True and res["cached"] is False
    assert any("modulus-gnupg-" in s for s in res["swept"]) and any(".fetch-" in s for s in res["swept"])
    assert_entry_whole(cache, kit, args["release"], kit.key.fingerprint)
    assert_nothing_left(tag_dir, [run.tag])


@pytest.mark.timeout(600)
def test_kill_while_replacing_an_entry_keeps_the_old_one_whole(kit: Kit, release_server: ReleaseServer,
                                                               tag_dir: Path, tmp_path: Path) -> None:
    """An entry verified with the kit key; a run with another key (that signed the same image) must fetch a
    new copy beside it; killed meanwhile, the old entry is untouched and serves an offline run."""
    cache = tag_dir / "cache"
    current = kit.releases["current"]
    args = args_for(kit, release_server, cache)
    first = rerun(args, tag_dir)
    assert not first.get("failed"), first.get("msg")
    before = entry_files(cache, current.version)

    other = PgpKey.generate(tmp_path / "other-key", "Other Signer <other@example.invalid>")
    copy = tmp_path / NAME
    shutil.copyfile(current.image_bz2, copy)  # the kit cache is never touched
    sig = other.sign(copy)
    release_server.add_file(f"/other/{current.version}/{NAME}", copy)
    release_server.add_file(f"/other/{current.version}/{NAME}.sig", sig.read_bytes())
    key_file = tmp_path / "other.asc"
    key_file.write_bytes(other.public())
    other_args = dict(args, url_template=release_server.base_url + "/other/{version}", verify_key=str(key_file),
                      verify_fingerprint=[other.fingerprint])
    run = faults.start_module(MODULE, other_args, tag_dir=tag_dir)
    kill_when(run, lambda: faults.find_files(cache, (".partial-*",)), "the new copy downloading")
    assert entry_files(cache, current.version) == before  # byte for byte, metadata.json included

    offline = dict(args, url_template="http://127.0.0.1:9/unreachable/{version}")
    release_server.reset()
    res = rerun(offline, tag_dir)
    assert not res.get("failed"), res.get("msg")
    assert res["cached"] is True and res["changed"] is False and release_server.hits == []
    assert entry_files(cache, current.version) == before
    assert_nothing_left(tag_dir, [run.tag])


# ------------------------------------------------------------------ killed while a command runs inside the image


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", METHODS)
def test_kill_while_a_command_runs_then_rerun_releases_everything(kit: Kit, release_server: ReleaseServer,
                                                                  tag_dir: Path, method: str) -> None:
    cache = tag_dir / "cache"
    args = args_for(kit, release_server, cache)
    first = rerun(args, tag_dir)
    assert not first.get("failed"), first.get("msg")
    image = Path(first["image_path"])

    run = faults.start_module(MODULE, dict(args, command=["sleep", "60"], run_method=method), tag_dir=tag_dir)

    def sleeping() -> list[str]:
        sleepers = [p for p in faults.processes_referencing([tag_dir], [run.tag]) if p.comm == "sleep"]
        return faults.mounts_under([cache]) if sleepers else []

    mounts, escaped, waited = kill_when(run, sleeping, "the command running in the container")
    print(f"{method}: killed after {waited:.1f} s with {len(mounts)} mounts; escaped: {sorted({p.comm for p in escaped})}")
    # what SIGKILL leaves: the mounts of the workspace, but the loop device clears itself with them
    assert faults.mounts_under([cache]) and faults.find_files(cache, (".modulus-devc.run-*",))
    loops = [d for d in faults.loop_devices() if d.get("back-file", "").replace(" (deleted)", "") == str(image)]
    assert loops and all(d.get("autoclear") in ("1", "True", "true") for d in loops), loops

    res = rerun(args, tag_dir)
    assert not res.get("failed"), res.get("msg")
    assert res["cached"] is True and any(".modulus-devc.run-" in s for s in res["swept"])
    assert_entry_whole(cache, kit, args["release"], kit.key.fingerprint)
    assert_nothing_left(tag_dir, [run.tag])
    assert not faults.loops_backed_by([cache])


@pytest.mark.timeout(600)
def test_module_killed_but_its_container_survives_then_rerun_stops_it(kit: Kit, release_server: ReleaseServer,
                                                                      tag_dir: Path) -> None:
    """Only the Ansible side dies (as with an Ansible timeout): the container, in a session of its own,
    keeps running. The next run kills what still uses the dead run's workspace, then releases it."""
    cache = tag_dir / "cache"
    args = args_for(kit, release_server, cache)
    assert not rerun(args, tag_dir).get("failed")
    run = faults.start_module(MODULE, dict(args, command=["sleep", "300"], run_method=METHODS[0]), tag_dir=tag_dir)
    faults.wait_for(lambda: [p for p in faults.processes_referencing([tag_dir], [run.tag]) if p.comm == "sleep"],
                    120, run=run, what="the command running in the container")
    ansible_side = {"ansible", "python3", "sh"}
    try:
        faults.kill_matching(run, lambda p: p.comm in ansible_side)
        survivors = [p for p in faults.processes_referencing([tag_dir], [run.tag]) if p.comm == "sleep"]
        assert survivors, "the container should have outlived the module"
        res = rerun(args, tag_dir)
        after = faults.leftovers([tag_dir], tags=[run.tag])
    finally:
        faults.kill_tree(run)  # whatever the rerun did, nothing survives the test
    assert not res.get("failed"), res.get("msg")
    assert any(".modulus-devc.run-" in s for s in res["swept"])
    assert not after, "after the rerun:\n" + after.describe()
    assert_entry_whole(cache, kit, args["release"], kit.key.fingerprint)


# ------------------------------------------------------------------ the helper itself


@pytest.mark.timeout(120)
def test_kill_tree_finds_processes_that_left_the_session(tag_dir: Path) -> None:
    run = faults.start_module("ansible.builtin.command", {"argv": ["sh", "-c", "setsid sleep 300 & sleep 300"]},
                              tag_dir=tag_dir)
    kill_when(run, lambda: len([p for p in faults.processes_referencing([], [run.tag]) if p.comm == "sleep"]) == 2,
              "both sleeps")
    assert faults.processes_referencing([tag_dir], [run.tag]) == []
