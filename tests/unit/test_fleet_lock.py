"""The fleet lock's parts, called directly: the owner of a machine (hostname + the application-specific
machine ID, checked against systemd-id128), tokens, renewal and lapse with a controlled clock, the hold
loop watching a real async job file and process, and the checks of the lock's times."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar
from ansible_collections.modulus.kmods.plugins.module_utils import lease as ls
from ansible_collections.modulus.kmods.plugins.module_utils._archive import hold as hd
from ansible_collections.modulus.kmods.plugins.module_utils._host import machine
from ansible_collections.modulus.kmods.plugins.module_utils.stores import FileStore, open_store

KEY = ar.lease_key("flatcar/amd64-usr/9001.1.0/6.1.0-47-amd64/hello/1.0/default-unsigned.tar.gz")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def store(tmp_path: Path) -> FileStore:
    (tmp_path / "store").mkdir()
    st = open_store(f"file://{tmp_path / 'store'}")
    assert isinstance(st, FileStore)
    return st


def host_root(tmp_path: Path, name: str, machine_id: str, hostname: str | None = "localhost") -> Path:
    root = tmp_path / name
    (root / "etc").mkdir(parents=True)
    (root / "etc/machine-id").write_text(machine_id + "\n")
    if hostname is not None:
        (root / "proc/sys/kernel").mkdir(parents=True)
        (root / "proc/sys/kernel/hostname").write_text(hostname + "\n")
    return root


# ----------------------------------------------------------------------------- owner

def test_two_hosts_named_localhost_have_two_owners(tmp_path: Path) -> None:
    a = host_root(tmp_path, "a", "0123456789abcdef0123456789abcdef")
    b = host_root(tmp_path, "b", "fedcba9876543210fedcba9876543210")
    oa, ob = machine.lock_owner(str(a)), machine.lock_owner(str(b))
    assert oa != ob and oa.startswith("localhost/") and ob.startswith("localhost/")
    # the machine ID itself is not shown, and the owner is stable
    assert "0123456789abcdef" not in oa and machine.lock_owner(str(a)) == oa


def test_hostname_from_etc_when_the_kernel_has_none(tmp_path: Path) -> None:
    root = host_root(tmp_path, "r", "0123456789abcdef0123456789abcdef", hostname=None)
    (root / "etc/hostname").write_text("gpu-7.example.com\n")
    assert machine.lock_owner(str(root)).startswith("gpu-7.example.com/")
    (root / "etc/hostname").write_text("bad name; rm -rf\n")
    assert machine.read_hostname(str(root)) == "localhost"


def test_owner_id_is_systemds_app_specific_id() -> None:
    """The same derivation as sd_id128_get_machine_app_specific: systemd-id128 prints the same ID."""
    if not shutil.which("systemd-id128") or not os.path.isfile("/etc/machine-id"):
        pytest.skip("needs systemd-id128 and /etc/machine-id on this machine")
    want = subprocess.run(["systemd-id128", "machine-id", f"--app-specific={machine.LOCK_APP_ID}"],
                          capture_output=True, text=True, check=True).stdout.strip().replace("-", "")
    assert machine.app_specific_id(machine.read_machine_id("/")) == want


@pytest.mark.parametrize("content, words", [
    (None, ["cannot read the machine ID", "etc/machine-id"]),
    ("", ["holds no machine ID", "''"]),
    ("uninitialized", ["holds no machine ID", "'uninitialized'"]),
    ("0123456789ABCDEF0123456789ABCDEF", ["holds no machine ID"]),
])
def test_no_machine_id_fails_naming_the_file(tmp_path: Path, content: str | None, words: list[str]) -> None:
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    if content is not None:
        (root / "etc/machine-id").write_text(content + "\n")
    with pytest.raises(machine.MachineError) as err:
        machine.lock_owner(str(root))
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- tokens, renewal, lapse

def test_renewal_keeps_the_lease_and_a_stopped_holder_lapses_within_one_ttl(store: FileStore) -> None:
    clock = Clock()
    mine = ls.acquire(store, KEY, "a/1", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    assert mine.acquired and mine.token and mine.expires == clock.now + 30
    for _round in range(10):  # renewed every third of the TTL: nobody can take it over
        clock.now += 10
        assert ls.renew(store, KEY, "a/1", mine.token, 30, clock)["renewed"]
        other = ls.acquire(store, KEY, "b/2", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
        assert not other.acquired and other.holder["owner"] == "a/1"
    last = clock.now
    # the holder stops (killed): another host takes over once one TTL passed, not before
    clock.now = last + 30
    assert not ls.acquire(store, KEY, "b/2", ttl=30, wait=0, clock=clock, sleep=clock.sleep).acquired
    clock.now = last + 31
    took = ls.acquire(store, KEY, "b/2", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    assert took.acquired and took.took_over and took.holder["owner"] == "a/1"
    # the old holder, back, can neither renew nor release the new holder's lease
    res = ls.renew(store, KEY, "a/1", mine.token, 30, clock)
    assert not res["renewed"] and res["holder"]["owner"] == "b/2"
    assert not ls.release(store, KEY, "a/1", mine.token)["released"]
    assert ls.release(store, KEY, "b/2", took.token)["released"] and store.read_small(KEY) is None


def test_a_waiter_outlasting_one_ttl_takes_over_from_a_dead_holder(store: FileStore) -> None:
    clock = Clock()
    ls.acquire(store, KEY, "dead/1", ttl=20, wait=0, clock=clock, sleep=clock.sleep)
    res = ls.acquire(store, KEY, "b/2", ttl=20, wait=21, poll=1, clock=clock, sleep=clock.sleep)
    assert res.acquired and res.took_over and 20 < res.waited <= 21


def test_a_waiter_does_not_take_the_lock_of_a_holder_that_pushed_and_released(store: FileStore) -> None:
    """The holder pushes, then releases, between two looks of the waiter: the waiter finds the lease gone
    and could create it, but the build is there: it gives the lease back and reports done."""
    clock = Clock()
    holder = ls.acquire(store, KEY, "a/1", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    pushed = {"now": False}

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 1_000_010 and not pushed["now"]:
            pushed["now"] = True
            ls.release(store, KEY, "a/1", holder.token)

    res = ls.acquire(store, KEY, "b/2", ttl=30, wait=60, poll=1, done=lambda: pushed["now"], clock=clock, sleep=sleep)
    assert res.done and not res.acquired
    assert store.read_small(KEY) is None


def test_same_machine_takes_its_lease_back_with_a_new_token(store: FileStore) -> None:
    clock = Clock()
    first = ls.acquire(store, KEY, "a/1", ttl=300, wait=0, clock=clock, sleep=clock.sleep)
    again = ls.acquire(store, KEY, "a/1", ttl=300, wait=0, clock=clock, sleep=clock.sleep)
    assert again.acquired and again.renewed and again.token != first.token
    # the earlier run of the same machine neither renews nor frees the later one's lease
    assert not ls.renew(store, KEY, "a/1", first.token, 300, clock)["renewed"]
    assert not ls.release(store, KEY, "a/1", first.token)["released"]
    body = ls.parse_lease(store.read_small(KEY)[0])
    assert body["token"] == again.token and body["owner"] == "a/1"


def test_release_needs_the_lease_unchanged(store: FileStore) -> None:
    """Owner and token match, but the lease changed between our read and our delete: not deleted."""
    clock = Clock()
    mine = ls.acquire(store, KEY, "a/1", ttl=300, wait=0, clock=clock, sleep=clock.sleep)
    _data, etag = store.read_small(KEY)
    assert ls.renew(store, KEY, "a/1", mine.token, 300, clock)["renewed"]  # the lease changes
    assert not store.delete_if_match(KEY, etag)
    assert store.read_small(KEY) is not None


# ----------------------------------------------------------------------------- hold

def test_hold_renews_until_the_job_ends(store: FileStore) -> None:
    clock = Clock()
    mine = ls.acquire(store, KEY, "a/1", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    states = iter([hd.RUNNING] * 100 + [hd.FINISHED])
    res = hd.hold(store, KEY, "a/1", mine.token, 30, lambda: next(states), clock=clock, sleep=clock.sleep)
    assert res["job"] == hd.FINISHED and not res["lost"] and res["renewals"] >= 100 // 10
    assert ls.parse_lease(store.read_small(KEY)[0])["expires"] >= clock.now + 30 - 11


def test_hold_stops_when_the_run_that_started_it_is_gone(store: FileStore) -> None:
    clock = Clock()
    mine = ls.acquire(store, KEY, "a/1", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    alive = iter([True] * 5 + [False])
    res = hd.hold(store, KEY, "a/1", mine.token, 30, lambda: hd.RUNNING, parent_alive=lambda: next(alive),
                  clock=clock, sleep=clock.sleep)
    assert res["job"] == "orphaned"


def test_hold_reports_a_lost_lease(store: FileStore) -> None:
    clock = Clock()
    mine = ls.acquire(store, KEY, "a/1", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    clock.now += 31  # stalled longer than the TTL: another host took it
    other = ls.acquire(store, KEY, "b/2", ttl=30, wait=0, clock=clock, sleep=clock.sleep)
    assert other.took_over
    states = iter([hd.RUNNING] * 3 + [hd.FINISHED])
    res = hd.hold(store, KEY, "a/1", mine.token, 30, lambda: next(states), clock=clock, sleep=clock.sleep)
    assert res["lost"] and res["holder"]["owner"] == "b/2" and res["renewals"] == 0
    assert ls.parse_lease(store.read_small(KEY)[0])["token"] == other.token


def test_watch_job_reads_async_wrappers_file_and_processes(tmp_path: Path) -> None:
    """A job file and a process shaped as ansible's async_wrapper makes them: running while the process
    lives, finished once the result replaces the file, gone when the process died without a result."""
    results = tmp_path / "j123456789.4242"
    results.write_text(json.dumps({"started": True, "finished": False, "ansible_job_id": "j123456789.4242"}))
    fake = tmp_path / "async_wrapper.py"
    fake.write_text("import sys, time\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(fake), "j123456789", "60", "AnsiballZ_x.py", "_"])
    try:
        watch = hd.watch_job(str(results))
        deadline = time.monotonic() + 30
        while not hd.job_processes("j123456789") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hd.job_processes("j123456789") == [proc.pid]
        assert watch() == hd.RUNNING
        assert hd.job_processes("j987654321") == []
    finally:
        proc.kill()
        proc.wait()
    assert watch() == hd.GONE  # no result, no process: killed
    results.write_text(json.dumps({"changed": True, "rc": 0}))
    assert watch() == hd.FINISHED


def test_watch_job_refuses_what_is_not_a_results_file() -> None:
    with pytest.raises(hd.HoldError, match="job='/tmp/x' is not the results_file of an async task"):
        hd.watch_job("/tmp/x")


# ----------------------------------------------------------------------------- checks

@pytest.mark.parametrize("ttl, wait, poll, words", [
    (300, 120, 5, ["lock_wait=120 must be longer than lock_ttl=300"]),
    (300, 300, 5, ["lock_wait=300 must be longer than lock_ttl=300"]),
    (0, 600, 5, ["lock_ttl=0 must be positive"]),
    (300, -1, 5, ["lock_wait=-1 must not be negative"]),
    (300, 600, 0, ["lock_poll=0 must be positive"]),
])
def test_lock_times_are_checked(ttl: int, wait: int, poll: float, words: list[str]) -> None:
    with pytest.raises(hd.HoldError) as err:
        hd.check_lock_options(ttl, wait, poll)
    for word in words:
        assert word in str(err.value)


def test_lock_times_that_pass() -> None:
    hd.check_lock_options(300, 0, 5)  # no wait: one try
    hd.check_lock_options(300, 301, 5)
