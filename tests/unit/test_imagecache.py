"""The image cache (no root): metadata that proves verification, versions, removal, pruning, lock."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import imagecache as ic
from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import FLATCAR_KEY_FINGERPRINT


def fake_cached(cache: Path, version: str, fingerprint: str = FLATCAR_KEY_FINGERPRINT) -> ic.CacheEntry:
    entry = ic.CacheEntry(str(cache), "amd64-usr", version)
    os.makedirs(entry.directory)
    Path(entry.image_path).write_bytes(b"image " + version.encode())
    ic.write_metadata(entry, {"verified": True, "fingerprint": fingerprint, "url": "file:///x"})
    return entry


def test_entry_layout(tmp_path: Path) -> None:
    entry = ic.CacheEntry(str(tmp_path), "amd64-usr", "9001.1.0")
    assert entry.image_path == str(tmp_path / "amd64-usr/9001.1.0" / ic.IMAGE_FILE)
    assert entry.metadata_path == str(tmp_path / "amd64-usr/9001.1.0/metadata.json")


def test_cached_ok_checks_metadata_size_mtime_and_fingerprint(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    meta = ic.cached_ok(entry, [FLATCAR_KEY_FINGERPRINT.lower()])
    assert meta["url"] == "file:///x" and (meta["board"], meta["version"]) == ("amd64-usr", "9001.1.0")
    assert ic.cached_ok(entry, ["A" * 40]) is None
    with open(entry.image_path, "ab") as fh:
        fh.write(b"tampered")
    assert ic.cached_ok(entry) is None
    os.unlink(entry.metadata_path)
    assert ic.cached_ok(entry) is None


def test_unverified_or_garbage_metadata_does_not_count(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    ic.write_metadata(entry, {"verified": False})
    assert ic.cached_ok(entry) is None
    Path(entry.metadata_path).write_text("[1, 2]")
    assert ic.read_metadata(entry) is None and ic.cached_ok(entry) is None


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    for version in ("9001.1.0", "9001.10.0", "9001.2.0", "8999.0.0"):
        fake_cached(tmp_path, version)
    (tmp_path / "amd64-usr" / ".partial-dir").mkdir()
    assert ic.cached_versions(str(tmp_path), "amd64-usr") == ["8999.0.0", "9001.1.0", "9001.2.0", "9001.10.0"]
    assert ic.prune(str(tmp_path), "amd64-usr", 2, protect=("8999.0.0",), check_mode=True) == ["9001.1.0"]
    assert len(ic.cached_versions(str(tmp_path), "amd64-usr")) == 4
    assert ic.prune(str(tmp_path), "amd64-usr", 2, protect=("8999.0.0",)) == ["9001.1.0"]
    assert ic.cached_versions(str(tmp_path), "amd64-usr") == ["8999.0.0", "9001.2.0", "9001.10.0"]
    assert ic.prune(str(tmp_path), "amd64-usr", 0) == []
    assert ic.cached_versions(str(tmp_path), "arm64-usr") == []


def test_remove_entry(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    assert ic.remove_entry(entry, check_mode=True) is True and os.path.exists(entry.image_path)
    assert ic.remove_entry(entry) is True and not os.path.exists(entry.directory)
    assert ic.remove_entry(entry) is False


def _can_lock(path: Path, how: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_image_lock_is_a_flock_on_the_directory(tmp_path: Path) -> None:
    image = tmp_path / "img.bin"
    with ic.image_lock(str(image), exclusive=True):
        assert not _can_lock(tmp_path, fcntl.LOCK_SH)
    with ic.image_lock(str(image)):
        assert _can_lock(tmp_path, fcntl.LOCK_SH) and not _can_lock(tmp_path, fcntl.LOCK_EX)
    assert _can_lock(tmp_path, fcntl.LOCK_EX)
    assert os.listdir(tmp_path) == []  # no lock file
    with ic.image_lock(str(tmp_path / "missing" / "img.bin"), exclusive=True) as lock:
        assert lock.fd is None


@pytest.mark.parametrize("keep", [1, 3])
def test_prune_never_removes_below_keep(tmp_path: Path, keep: int) -> None:
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        fake_cached(tmp_path, version)
    ic.prune(str(tmp_path), "amd64-usr", keep)
    assert len(ic.cached_versions(str(tmp_path), "amd64-usr")) == keep


def test_a_staged_entry_replaces_the_old_one_in_one_exchange(tmp_path: Path) -> None:
    old = fake_cached(tmp_path, "9001.1.0", "A" * 40)
    staging = ic.make_entry_staging(old)
    assert os.path.basename(staging).startswith(f".9001.1.0.fetch-{os.getpid()}-")
    assert ic.cached_versions(str(tmp_path), "amd64-usr") == ["9001.1.0"]  # staging is hidden
    new = ic.staged(old, staging)
    Path(new.image_path).write_bytes(b"new image")
    ic.write_metadata(new, {"verified": True, "fingerprint": FLATCAR_KEY_FINGERPRINT})
    assert ic.cached_ok(old, [FLATCAR_KEY_FINGERPRINT]) is None  # not yet
    assert ic.cached_unverified_reason(old, [FLATCAR_KEY_FINGERPRINT]).startswith("it was verified with the key AAAA")
    ic.replace_entry(staging, old)
    assert ic.cached_ok(old, [FLATCAR_KEY_FINGERPRINT]) is not None
    assert Path(old.image_path).read_bytes() == b"new image"
    assert sorted(os.listdir(tmp_path / "amd64-usr")) == ["9001.1.0"]
    assert ic.cached_unverified_reason(old, [FLATCAR_KEY_FINGERPRINT]) is None


def test_image_lock_follows_an_exchanged_directory(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    stale_fd = os.open(entry.directory, os.O_RDONLY)  # someone who locked the old directory...
    staging = ic.make_entry_staging(entry)
    ic.replace_entry(staging, entry)  # ...which is then exchanged (and removed)
    try:
        with ic.image_lock(entry.image_path, exclusive=True) as lock:
            assert os.fstat(lock.fd).st_ino == os.stat(entry.directory).st_ino != os.fstat(stale_fd).st_ino
    finally:
        os.close(stale_fd)


def test_sweep_board_removes_staging_and_partials_of_dead_runs(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    proc = subprocess.Popen(["true"])
    proc.wait()
    board = tmp_path / "amd64-usr"
    dead = [board / f".9001.2.0.fetch-{proc.pid}-ab", board / f".9001.1.0.old-{proc.pid}-cd"]
    live = board / f".9001.3.0.fetch-{os.getpid()}-ef"
    for path in dead + [live]:
        path.mkdir()
        (path / "flatcar_developer_container.bin").write_bytes(b"half")
    partial = Path(entry.directory) / f".partial-flatcar_developer_container.bin.{proc.pid}-x"
    partial.write_bytes(b"half")
    empty, locked = board / "9001.5.0", board / "9001.6.0"
    empty.mkdir()
    locked.mkdir()
    with ic.image_lock(str(locked / "img"), exclusive=True):  # a first fetch under way holds it
        removed = ic.sweep_board(str(tmp_path), "amd64-usr")
    assert sorted(removed) == sorted(str(p) for p in dead + [partial, empty])
    assert live.exists() and locked.exists() and ic.cached_ok(entry) is not None
