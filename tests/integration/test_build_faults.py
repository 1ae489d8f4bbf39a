"""Crash safety of the build side: SIGKILL the whole process tree of ``kmod_build`` / ``kmod_archive``
at a chosen moment (``sim.faults``), then run again and check that nothing of the killed run is
left (loop device, mount, process, workspace, temporary file) and that ``dest`` is whole.

Each run sweeps, under ``<dest>.lock``, what dead runs left beside ``dest`` before it starts
(``fsutil.sweep_dest`` with ``mounts.release_under``) and reports it as ``swept``.
"""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import manifest
from sim import ansible_run, faults
from sim.kit import Kit
from sim.kmod_archive_fixtures import IDENT, make_build, manifest_of

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "tests" / "fixtures" / "hello"
# what a killed build or pull may leave beside dest (and the container's workspace inside it)
PATTERNS = (".*.build-*", ".*.pull-*", ".*.push-*", ".*.tmp-*", ".*.old-*", ".modulus-devc.run-*", ".modulus-sig-*")
NAMING = {k: IDENT[k] for k in ("os_version", "kernel_release", "driver", "driver_version")}


def hello_args(rel, dest: Path, **kw) -> dict:
    args = {"image": str(rel.image_raw), "recipe": "generic", "name": "modulus-hello", "version": "1.0",
            "source": str(HELLO), "modules": ["modulus_hello"], "dest": str(dest)}
    args.update(kw)
    return args


def kit_loops(image: Path) -> dict[str, list[str]]:
    """Loop devices backed by ``image`` -> their mount points (another test run on this machine may
    use the same kit image: only loops that are unmounted or mounted below our directory count)."""
    proc = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], capture_output=True,
                          text=True, check=False)
    devices = json.loads(proc.stdout).get("loopdevices", []) if proc.stdout.strip() else []
    points: dict[str, list[str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            points.setdefault(fields[fields.index("-") + 2], []).append(fields[4])
    return {d["name"]: points.get(d["name"], []) for d in devices
            if (d.get("back-file") or "").replace(" (deleted)", "") == str(image)}


def our_loops(image: Path, root: Path, attempts: int = 10) -> list[str]:
    """Loops backed by the kit image that are mounted below ``root`` or mounted nowhere (leaked);
    an unmounted one is looked at again for a few seconds (another run may be just setting it up)."""
    for _ in range(attempts):
        found = [f"{name} at {pts or 'nothing'}" for name, pts in kit_loops(image).items()
                 if not pts or any(faults._under(p, str(root)) for p in pts)]
        if not found or any("nothing" not in f for f in found):
            return found
        time.sleep(1)
    return found


def assert_nothing_left(root: Path, image: Path | None, tags: list[str]) -> None:
    left = faults.leftovers([root], tags=tags, patterns=PATTERNS)
    assert not left, left.describe()
    if image is not None:
        assert our_loops(image, root) == []


def build_mounts(root: Path) -> list[str]:
    return faults.mounts_under([root])


@contextmanager
def stalling_http(root: Path, stall: Callable[[str], bool]) -> Iterator[tuple[str, dict]]:
    """HTTP on 127.0.0.1 serving the directory ``root``. While ``state["stall"]`` is true, a GET of a
    URL path for which ``stall(path)`` is true gets the headers and half the body, then nothing more
    until the server stops (a download in progress when the run is killed); ``state["reached"]`` is
    set then."""
    state = {"stall": True, "reached": threading.Event()}
    stop = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile) -> None:  # the http.server API
            if state["stall"] and self.command == "GET" and stall(self.path):
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                outputfile.flush()
                state["reached"].set()
                stop.wait(600)
                return
            super().copyfile(source, outputfile)

        def log_message(self, *_a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", state
    finally:
        stop.set()
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def stalling_server(tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """The hello source as a tarball over ``stalling_http`` (its download stalls until told otherwise)."""
    tarball = tmp_path / "www" / "modulus-hello-1.0.tar.gz"
    tarball.parent.mkdir()
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(HELLO.parent), "--transform", "s,^hello,modulus-hello-1.0,",
                    "hello"], check=True)
    with stalling_http(tarball.parent, lambda path: path == f"/{tarball.name}") as (base, state):
        yield f"{base}/{tarball.name}", state


@pytest.mark.parametrize("moment", ["container", "download"])
def test_killed_build_is_swept_by_the_next_run(kit: Kit, tmp_path: Path, moment: str,
                                               stalling_server: tuple[str, dict]) -> None:
    """SIGKILL kmod_build three times (while make runs in the container, held there, or while the
    source is being downloaded, stalled), then run it again: the leftovers of the killed runs are
    released and removed."""
    rel = kit.releases["pending"]
    work = tmp_path / "opt"
    work.mkdir()
    dest = work / "out"
    url, server = stalling_server
    held = faults.HeldSource.make(HELLO, tmp_path / "held-hello")
    args = hello_args(rel, dest, source=str(held.path)) if moment == "container" else hello_args(rel, dest, source=url)
    tags = []
    figures = []
    seen: set[str] = set()

    def new_workspace() -> list[Path]:
        return [p for p in work.glob(".out.build-*") if p.name not in seen]

    for attempt in range(3):
        killed = held.held(work)  # the copies held in the workspaces of the runs killed before
        run = faults.start_module("modulus.kmods.kmod_build", args, tag_dir=tmp_path / f"run{attempt}")
        tags.append(run.tag)
        try:
            if moment == "container":
                # make runs in this run's container and waits there for a go that never comes
                copy = held.wait_held(work, run, timeout=300, exclude=killed)
                workspace = copy.parents[1]
                assert workspace.name not in seen, (attempt, workspace)
                # its ext4 lower and overlay are mounted
                assert len(build_mounts(workspace)) >= 2, build_mounts(work)
            else:
                # the download's temporary file is in the workspace, the container has not started
                faults.wait_for(lambda: [w for w in new_workspace() if list((w / "in").glob("*"))], timeout=300,
                                run=run, what="the source download")
                assert [m for w in new_workspace() for m in build_mounts(w)] == []
        finally:
            escaped = faults.kill_tree(run, dirs=[work, run.tag_dir])
        seen.update(p.name for p in work.glob(".out.build-*"))
        workspaces = sorted(p.name for p in work.glob(".out.build-*"))
        figures.append({"workspaces": len(workspaces), "mounts": len(build_mounts(work)),
                        "loops": len(our_loops(rel.image_raw, work, attempts=1)), "escaped": len(escaped)})
        # each run swept the one before it: only the last killed run's workspace is there
        assert len(workspaces) == 1, (attempt, workspaces)
    print(f"after each kill ({moment}): {figures}")
    if moment == "container":
        assert figures[-1]["mounts"] >= 2 and figures[-1]["loops"] == 1, figures
    else:
        assert figures[-1]["mounts"] == 0 and figures[-1]["loops"] == 0, figures
    assert not dest.exists()
    server["stall"] = False

    if moment == "container":
        rerun = faults.run_released("modulus.kmods.kmod_build", args, held, work, tag_dir=tmp_path / "rerun")
        res, text, took = rerun.result, rerun.output, rerun.wall
    else:
        started = time.monotonic()
        res, text = ansible_run.run_module("modulus.kmods.kmod_build", args)
        took = time.monotonic() - started
    assert res["changed"] is True and not res.get("failed"), text
    swept = res["swept"]
    print(f"rerun after the kills ({took:.1f} s) swept: {swept}")
    assert any("removed leftover" in line and ".out.build-" in line for line in swept), swept
    if moment == "container":
        assert any("released leftover mount" in line for line in swept), swept
    assert manifest.verify_tree(str(dest), manifest_of(dest), strict=False) == []
    assert sorted(p.name for p in work.iterdir()) == ["out", "out.lock"]
    assert_nothing_left(work, rel.image_raw, tags)
    for t in tags:
        assert faults.processes_referencing([], [t]) == []


def test_killed_build_keeps_the_previous_dest(kit: Kit, tmp_path: Path) -> None:
    """A run killed while it replaces a build leaves the previous dest whole; the next run builds."""
    rel = kit.releases["pending"]
    work = tmp_path / "opt"
    work.mkdir()
    dest = work / "out"
    held = faults.HeldSource.make(HELLO, tmp_path / "held-hello")
    args = hello_args(rel, dest, source=str(held.path))
    first = faults.run_released("modulus.kmods.kmod_build", args, held, work, tag_dir=tmp_path / "first")
    assert first.result["changed"], first.output
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    run = faults.start_module("modulus.kmods.kmod_build", dict(args, force=True), tag_dir=tmp_path / "run")
    try:
        # make runs in the container (held there): the forced rebuild is under way
        copy = held.wait_held(work, run, timeout=300)
        assert len(build_mounts(copy.parents[1])) >= 2, build_mounts(work)
    finally:
        faults.kill_tree(run, dirs=[work, run.tag_dir])
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    # the next run (not forced) finds dest up to date (no build starts), and still removes the killed run's leftovers
    res, text, _wall = faults.run_without_build("modulus.kmods.kmod_build", args, work, tag_dir=tmp_path / "again")
    assert res["changed"] is False and res["reason"] == "up to date", text
    assert any(".out.build-" in line for line in res["swept"]), res["swept"]
    assert_nothing_left(work, rel.image_raw, [run.tag])


def test_killed_pull_is_swept_and_dest_stays_whole(tmp_path: Path) -> None:
    """SIGKILL kmod_archive while it pulls a build over a previous one (from a read-only HTTP store
    whose download of the new archive stalls half-way): dest keeps the previous build; the next
    pull removes the workspace and installs the new build."""
    store = tmp_path / "store"
    store.mkdir()
    old = make_build(tmp_path / "old")
    new = make_build(tmp_path / "new", ident={"os_version": "9001.2.0"}, big_random=16 << 20, seed=5)
    for src in (old, new):
        res, text = ansible_run.run_module("modulus.kmods.kmod_archive", {"store": f"file://{store}", "src": str(src)})
        assert res["changed"], text
    work = tmp_path / "opt"
    work.mkdir()
    dest = work / "nvidia"
    new_naming = dict(NAMING, os_version="9001.2.0")
    # only the new build's archive stalls (its metadata sidecar and the old build are served whole)
    with stalling_http(store, lambda path: "/9001.2.0/" in path and path.endswith(".tar.gz")) as (url, server):
        # a stall longer than the run's socket timeout would end the download by itself
        base = {"store": url, "state": "fetched", "dest": str(dest), "connect_timeout": 3600}
        res, text = ansible_run.run_module("modulus.kmods.kmod_archive", dict(base, **NAMING))
        assert res["changed"], text
        before = manifest_of(dest)
        run = faults.start_module("modulus.kmods.kmod_archive", dict(base, **new_naming), tag_dir=tmp_path / "run")
        try:
            # the server sent half the new archive and holds the rest; the download is in the workspace
            faults.wait_for(server["reached"].is_set, timeout=120, run=run, what="the stalled download")
            faults.wait_for(lambda: [p for ws in work.glob(".nvidia.pull-*") for p in ws.iterdir()], timeout=120,
                            run=run, what="the pull workspace")
        finally:
            faults.kill_tree(run, dirs=[work, run.tag_dir])
        left = sorted(p.name for p in work.glob(".nvidia.*"))
        print(f"left by the killed pull: {left}")
        assert any(".pull-" in name for name in left)
        # dest is the previous build, whole
        assert manifest_of(dest) == before and manifest.verify_tree(str(dest), before) == []
        server["stall"] = False
        started = time.monotonic()
        res, text = ansible_run.run_module("modulus.kmods.kmod_archive", dict(base, **new_naming))
        print(f"pull after the kill: {time.monotonic() - started:.1f} s, swept {res.get('swept')}")
    assert res["changed"] and not res.get("failed"), text
    assert any(".nvidia.pull-" in line for line in res["swept"]), res["swept"]
    after = manifest_of(dest)
    assert after["os_version"] == "9001.2.0" and manifest.verify_tree(str(dest), after) == []
    assert sorted(p.name for p in work.iterdir()) == ["nvidia", "nvidia.lock"]
    assert_nothing_left(work, None, [run.tag])
