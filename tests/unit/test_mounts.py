"""MountStack and mount_readonly without root: mount, umount and losetup are fakes that record
their command lines (and fail on demand), so the order of release and every fallback is visible."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import mounts

FAKE = """#!/bin/sh
name=$(basename "$0")
call="$name $*"
echo "$call" >> "$FAKE_LOG"
IFS=';'
for pattern in $FAKE_FAIL; do
  case "$call" in
    $pattern) echo "$name: busy" >&2; exit 32;;
  esac
done
if [ "$name" = losetup ] && [ "$1" = --find ]; then echo /dev/loop7; fi
if [ "$name" = umount ] && [ -n "$FAKE_MOUNTINFO" ]; then
  for target; do :; done
  grep -v " $target rw " "$FAKE_MOUNTINFO" > "$FAKE_MOUNTINFO.new"; mv "$FAKE_MOUNTINFO.new" "$FAKE_MOUNTINFO"
fi
exit 0
"""


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake tools; returns the log they append to. FAKE_FAIL: ';'-separated shell patterns of calls that fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("mount", "umount", "losetup"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", "")
    monkeypatch.setattr(mounts, "require_tool", lambda name: str(bin_dir / name))
    monkeypatch.setattr(mounts, "which", lambda name: str(bin_dir / name))
    monkeypatch.setattr(mounts.time, "sleep", lambda _s: None)
    return log


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_overlay_stack_is_released_in_reverse_order(calls: Path, tmp_path: Path) -> None:
    work = tmp_path / "ws"
    (work / "lower").mkdir(parents=True)
    with mounts.MountStack() as stack:
        dev = stack.loop("/img", 2097152, 8 << 20)
        stack.mount_ro(dev, str(work / "lower"), "ext4", "ro,noload")
        merged = stack.overlay(str(work / "lower"), str(work), tmpfs=True)
        stack.bind("/src", merged + "/src", readonly=True)
    assert merged == str(work / "merged") and (work / "rw" / "upper").is_dir()
    rw = work / "rw"
    assert lines(calls) == [
        "losetup --find --show --read-only --offset 2097152 --sizelimit 8388608 /img",
        f"mount -t ext4 -o ro,noload /dev/loop7 {work}/lower",
        f"mount -t tmpfs -o mode=0755 modulus-devc {rw}",
        f"mount -t overlay -o lowerdir={work}/lower,upperdir={rw}/upper,workdir={rw}/work modulus-devc {merged}",
        f"mount --bind /src {merged}/src",
        f"mount -o remount,bind,ro {merged}/src",
        f"umount {merged}/src",  # the remount is the same mount point: unmounted once
        f"umount {merged}",
        f"umount {rw}",
        f"umount {work}/lower",
        "losetup -d /dev/loop7",
    ]
    assert stack.mounts == [] and stack.loops == []


def test_on_disk_upper_mounts_no_tmpfs(calls: Path, tmp_path: Path) -> None:
    with mounts.MountStack() as stack:
        stack.overlay("/lower", str(tmp_path), tmpfs=False)
    assert not any("tmpfs" in line for line in lines(calls))


def test_busy_mount_is_lazily_detached_and_reported(calls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL", "umount /busy;losetup -d *")
    logged: list[str] = []
    problems = r"lazily detached.*losetup -d /dev/loop7 failed: losetup: busy"
    with pytest.raises(mounts.MountError, match=problems), mounts.MountStack(logged.append) as stack:
        stack.loop("/img")
        stack.mount(["--bind", "/x"], "/busy")
    assert lines(calls).count("umount /busy") == 3 and "umount -l /busy" in lines(calls)
    assert lines(calls).count("losetup -d /dev/loop7") == 5
    assert len(logged) == 2 and stack.mounts == [] and stack.loops == []


def test_everything_is_released_when_the_body_fails(calls: Path) -> None:
    with pytest.raises(KeyError), mounts.MountStack() as stack:
        stack.loop("/img")
        stack.mount_ro("/dev/loop7", "/mnt")
        raise KeyError("boom")
    assert lines(calls)[-2:] == ["umount /mnt", "losetup -d /dev/loop7"]


def test_a_failed_mount_is_an_error_and_the_loop_is_detached(calls: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL", "mount -o ro *")
    with pytest.raises(mounts.MountError, match=r"mount failed \(rc=32\).*busy"), mounts.MountStack() as stack:
        stack.mount_ro(stack.loop("/img"), "/mnt")
    assert lines(calls)[-1] == "losetup -d /dev/loop7" and not any(line.startswith("umount") for line in lines(calls))


def test_mount_readonly_of_a_file_uses_a_read_only_loop(calls: Path, tmp_path: Path) -> None:
    image = tmp_path / "usr.img"
    image.write_bytes(b"\0" * 4096)
    with mounts.mount_readonly(str(image)) as mnt:
        assert os.path.isdir(mnt)
    # mount(8) sets the loop device up with autoclear: unmounting frees it, nothing to detach
    assert lines(calls) == [f"mount -o loop,ro {image} {mnt}", f"umount {mnt}"]
    assert os.path.basename(mnt).startswith(f"modulus-ro-{os.getpid()}-")
    assert not os.path.exists(mnt)


def test_mount_image_uses_an_autoclear_loop_with_offset_and_size(calls: Path, tmp_path: Path) -> None:
    with mounts.MountStack() as stack:
        stack.mount_image("/img", str(tmp_path), "ext4", "ro,noload", 2097152, 8 << 20)
        stack.mount_image("/img2", str(tmp_path), None, "rw")  # never read-write
    assert lines(calls) == [f"mount -t ext4 -o loop,ro,noload,offset=2097152,sizelimit=8388608 /img {tmp_path}",
                            f"mount -o loop,ro /img2 {tmp_path}", f"umount {tmp_path}", f"umount {tmp_path}"]
    assert stack.loops == []


def mountinfo_of(points: list[str], source: str = "x") -> str:
    return "".join(f"{i + 10} 1 0:{i} / {p} rw - tmpfs {source} rw\n" for i, p in enumerate(points))


def test_release_under_unmounts_deepest_first_and_lazily_when_busy(calls: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "ws"
    info = tmp_path / "mountinfo"
    points = [str(ws / "lower"), str(ws / "rw"), str(ws / "merged"), str(ws / "merged/proc"), str(tmp_path / "other")]
    info.write_text(mountinfo_of(points))
    monkeypatch.setenv("FAKE_MOUNTINFO", str(info))
    monkeypatch.setenv("FAKE_FAIL", f"umount {ws}/rw")  # busy: only the lazy unmount works
    released = mounts.release_under(str(ws), mountinfo=str(info))
    assert released[0] == str(ws / "merged/proc") and sorted(released) == sorted(points[:4])
    assert f"umount -l {ws}/rw" in lines(calls)
    assert info.read_text() == mountinfo_of([str(tmp_path / "other")]).replace("10 1 0:0", "14 1 0:4")
    assert mounts.release_under(str(tmp_path / "nothing"), mountinfo=str(info)) == []


def test_sweep_dead_dirs_releases_then_removes_only_dead_ones(calls: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / f"modulus-ro-{proc.pid}-abc"
    live = tmp_path / f"modulus-ro-{os.getpid()}-def"
    for path in (dead, live):
        path.mkdir()
    info = tmp_path / "mountinfo"
    info.write_text(mountinfo_of([str(dead), str(live)]))
    monkeypatch.setenv("FAKE_MOUNTINFO", str(info))
    assert mounts.sweep_dead_dirs(str(tmp_path), "modulus-ro-", mountinfo=str(info)) == [str(dead)]
    assert lines(calls) == [f"umount {dead}"] and live.exists() and not dead.exists()


def test_mount_readonly_of_a_device_and_release_on_failure(calls: Path) -> None:
    with pytest.raises(RuntimeError, match="reader failed"), mounts.mount_readonly("/dev/sda4", "btrfs") as mnt:
        raise RuntimeError("reader failed")
    assert lines(calls) == [f"mount -t btrfs -o ro /dev/sda4 {mnt}", f"umount {mnt}"]
    assert not os.path.exists(mnt)


def test_mounts_under(tmp_path: Path) -> None:
    assert "/proc" in mounts.mounts_under("/proc")
    assert mounts.mounts_under("/proc/self/nonexistent-dir") == []
    base = tmp_path / "w s"
    info = tmp_path / "mountinfo"
    esc = str(base).replace(" ", "\\040")
    info.write_text(f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    f"2 1 0:5 / {esc}/merged rw - overlay x rw\n"
                    f"3 1 0:6 / {esc}x rw - tmpfs x rw\n"
                    f"4 1 0:7 / {esc}/a\\134b rw - tmpfs x rw\n")
    assert mounts.mounts_under(str(base), str(info)) == [f"{base}/merged", f"{base}/a\\b"]
    assert mounts.mounts_under(str(tmp_path / "none"), str(tmp_path / "no-such-file")) == []
