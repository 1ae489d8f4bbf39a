"""fsutil: hashing, atomic writes, workspaces beside dest, swapping into place, sweeping stale
workspaces, and the one safe tar extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import fsutil
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import UnsafePathError


def test_hashes(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 3000)
    want = hashlib.sha256(b"x" * 3000).hexdigest()
    assert fsutil.sha256_file(str(f)) == want
    assert fsutil.sha256_and_size(str(f), bufsize=1000) == (want, 3000)
    assert fsutil.copy_hashed(str(f), str(tmp_path / "g"), 0o600) == (want, 3000)
    assert (tmp_path / "g").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        fsutil.copy_hashed(str(f), str(tmp_path / "g"))  # never over an existing file


def test_atomic_writes(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    fsutil.write_json_atomic(str(p), {"b": 1, "a": [1]})
    assert p.read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'
    fsutil.atomic_write(str(p), b"raw", mode=0o600)
    assert p.read_bytes() == b"raw" and p.stat().st_mode & 0o777 == 0o600
    fsutil.atomic_copy(str(p), str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == b"raw"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json", "copy"]  # no temporary file left


def test_make_staging_names_the_owner(tmp_path: Path) -> None:
    ws = Path(fsutil.make_staging(str(tmp_path / "sub" / "dest"), "build"))
    assert ws.parent == tmp_path / "sub" and ws.name.startswith(f".dest.build-{os.getpid()}-")
    assert ws.stat().st_mode & 0o777 == 0o700
    other = Path(fsutil.make_staging(str(tmp_path / "dest"), "push", mode=0o755, parent=str(tmp_path / "elsewhere")))
    assert other.parent == tmp_path / "elsewhere" and other.stat().st_mode & 0o777 == 0o755
    with pytest.raises(ValueError, match="workspace kind"):
        fsutil.make_staging(str(tmp_path / "dest"), "../x")


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(fsutil, "_rename_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "v").write_text("1")
    fsutil.swap_into_place(str(stage), str(dest))  # nothing there yet
    assert (dest / "v").read_text() == "1"
    stage.mkdir()
    (stage / "v").write_text("2")
    fsutil.swap_into_place(str(stage), str(dest))
    assert (dest / "v").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old tree is gone, nothing aside


def test_swap_refuses_to_replace_a_non_directory(tmp_path: Path) -> None:
    (tmp_path / "stage").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("stage")
    for name in ("file", "link"):
        with pytest.raises(UnsafePathError, match="not a directory"):
            fsutil.swap_into_place(str(tmp_path / "stage"), str(tmp_path / name))
    assert (tmp_path / "file").read_text() == "x"


def test_swap_puts_the_old_tree_back_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "_rename_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "v").write_text("old")
    with pytest.raises(OSError):
        fsutil.swap_into_place(str(tmp_path / "missing-stage"), str(dest))
    assert (dest / "v").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_stale_removes_only_dead_owners(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale_dir = tmp_path / f".dest.build-{dead}-abc"
    (stale_dir / "work").mkdir(parents=True)
    stale_file = tmp_path / f".dest.download-{dead}-xyz"
    stale_file.write_text("partial")
    mine = Path(fsutil.make_staging(str(tmp_path / "dest"), "pull"))
    keep = [tmp_path / f".other.build-{dead}-abc", tmp_path / "dest", tmp_path / ".dest.lock",
            tmp_path / f".dest.x.build-{dead}-abc", tmp_path / f".dest.build-{dead}"]
    for p in keep:
        p.mkdir()
    res = fsutil.sweep_stale(str(tmp_path), "dest", mountinfo=str(tmp_path / "no-mountinfo"))
    assert sorted(res.removed) == sorted([str(stale_dir), str(stale_file)]) and res.kept == {}
    assert mine.exists() and all(p.exists() for p in keep)
    assert fsutil.sweep_stale(str(tmp_path / "absent"), "dest").removed == []


def test_sweep_stale_never_removes_across_a_mount(tmp_path: Path) -> None:
    dead = _dead_pid()
    held = tmp_path / f".dest.build-{dead}-abc"
    (held / "work" / "mnt").mkdir(parents=True)
    (held / "work" / "mnt" / "precious").write_text("host data")
    mountinfo = tmp_path / "mountinfo"
    escaped = str(held / "work" / "mnt").replace(" ", "\\040")
    mountinfo.write_text(f"36 35 98:0 / / rw - ext4 /dev/root rw\n"
                         f"99 36 0:42 / {escaped} rw,relatime shared:1 - tmpfs tmpfs rw\n")
    res = fsutil.sweep_stale(str(tmp_path), "dest", mountinfo=str(mountinfo))
    assert res.removed == [] and "holds mount point" in res.kept[str(held)]
    assert (held / "work" / "mnt" / "precious").read_text() == "host data"


def test_mount_points_unescape(tmp_path: Path) -> None:
    mi = tmp_path / "mi"
    mi.write_text("1 0 0:1 / /a\\040b rw - tmpfs t rw\n")
    assert fsutil.mount_points(str(mi)) == ["/a b"]
    assert "/" in fsutil.mount_points()


# --------------------------------------------------------------------------- paths, links, tarballs


@pytest.mark.parametrize("name", ["", "/abs", "../x", "a/../../x", "a//b", "./a", "a/.", "a\\b", "a\x00b"])
def test_safe_relpath_refuses(name: str) -> None:
    with pytest.raises(UnsafePathError):
        fsutil.safe_relpath(name)


def test_check_link() -> None:
    fsutil.check_link("lib/a.so", "a.so.1")
    fsutil.check_link("lib/x/a.so", "../b.so")
    for name, target in (("lib/a", "../../etc"), ("a", "/etc/passwd"), ("a", ""), ("lib/a", "x/../../..")):
        with pytest.raises(UnsafePathError):
            fsutil.check_link(name, target)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info


def _tar(path: Path, *members: tarfile.TarInfo, data: bytes = b"x", mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


@pytest.mark.parametrize("members,pattern", [
    ([_member("/etc/passwd")], "absolute"),
    ([_member("../outside")], "escapes"),
    ([_member("a/../../outside")], "escapes"),
    ([_member("lib/evil", tarfile.SYMTYPE, "../../etc/shadow")], "outside"),
    ([_member("lib/evil", tarfile.SYMTYPE, "/etc/shadow")], "absolute"),
    ([_member("lib", tarfile.SYMTYPE, "sub"), _member("lib/x")], "symlink"),
    ([_member("hl", tarfile.LNKTYPE, "/etc/passwd")], "hard link"),
    ([_member("a"), _member("a")], "twice"),
    ([_member("dev", tarfile.CHRTYPE)], "device"),
    ([_member("fifo", tarfile.FIFOTYPE)], "device, FIFO"),
])
def test_extract_refuses(tmp_path: Path, members: list, pattern: str) -> None:
    arc = _tar(tmp_path / "evil.tar.gz", *members)
    with pytest.raises(UnsafePathError, match=pattern):
        fsutil.extract_tar(str(arc), str(tmp_path / "t"))
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_extract_any_compression(tmp_path: Path, mode: str) -> None:
    arc = _tar(tmp_path / "a.tar", _member("./", tarfile.DIRTYPE), _member("./d/run.sh", mode=0o750),
               _member("d/l", tarfile.SYMTYPE, "run.sh"), _member("d/h", tarfile.LNKTYPE, "d/run.sh"), mode=mode)
    written = fsutil.extract_tar(str(arc), str(tmp_path / "t"))
    digest = hashlib.sha256(b"x").hexdigest()
    assert written == {"d/run.sh": {"sha256": digest, "size": 1, "mode": "0755"}, "d/l": {"link": "run.sh"},
                       "d/h": {"sha256": digest, "size": 1, "mode": "0755"}}
    assert os.path.samefile(tmp_path / "t/d/h", tmp_path / "t/d/run.sh")


def test_extract_reads_several_gzip_members_and_a_root(tmp_path: Path) -> None:
    one = io.BytesIO()
    with tarfile.open(fileobj=one, mode="w") as tar:
        for name in ("out/lib/a.ko", "other/b"):
            info = _member(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ab"))
    raw = one.getvalue()
    arc = tmp_path / "multi.tar.gz"
    arc.write_bytes(gzip.compress(raw[:1024]) + gzip.compress(raw[1024:]))  # two members, cut mid-tar
    written = fsutil.extract_tar(str(arc), str(tmp_path / "t"), root="out/")
    assert list(written) == ["lib/a.ko"] and (tmp_path / "t/lib/a.ko").read_bytes() == b"ab"


def test_extract_corrupt_data_is_a_read_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"not a tar" * 200)[:-30])
    with pytest.raises(tarfile.ReadError):
        fsutil.extract_tar(str(bad), str(tmp_path / "t"))
    zst = tmp_path / "x.tar.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 64)
    with pytest.raises(tarfile.ReadError, match="zstd"):
        fsutil.extract_tar(str(zst), str(tmp_path / "t2"))


def test_atomic_write_temp_files_are_named_for_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed between the temporary file and the rename leaves ``.<name>.tmp-<pid>-*``,
    which ``sweep_dest`` removes once that process is gone."""
    seen = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    fsutil.atomic_write(str(tmp_path / "dest.failed.json"), b"{}")
    assert seen and seen[0].startswith(f".dest.failed.json.tmp-{os.getpid()}-")
    dead = _dead_pid()
    (tmp_path / "dest").mkdir()
    left = [tmp_path / f".dest.failed.json.tmp-{dead}-abc", tmp_path / f".dest.failed.log.tmp-{dead}-abc",
            tmp_path / "dest" / f".manifest.json.tmp-{dead}-abc", tmp_path / f".dest.old-{dead}-abc"]
    for p in left:
        p.write_text("partial")
    res = fsutil.sweep_dest(str(tmp_path / "dest"), mountinfo=str(tmp_path / "no-mountinfo"))
    assert sorted(res.removed) == sorted(map(str, left)) and res.kept == {}
    assert (tmp_path / "dest.failed.json").read_bytes() == b"{}"


def test_sweep_kills_leftover_processes_and_releases_mounts_first(tmp_path: Path) -> None:
    dead = _dead_pid()
    held = tmp_path / f".dest.build-{dead}-abc"
    (held / "work" / "mnt").mkdir(parents=True)
    # a process of the dead run that escaped its group: its working directory is in the workspace
    straggler = subprocess.Popen(["sleep", "300"], cwd=str(held / "work"), start_new_session=True)
    mountinfo = tmp_path / "mountinfo"
    escaped = str(held / "work" / "mnt")
    mountinfo.write_text(f"36 35 98:0 / / rw - ext4 /dev/root rw\n99 36 0:42 / {escaped} rw - tmpfs tmpfs rw\n")
    released: list[str] = []

    def release(path: str) -> list[str]:
        assert straggler.poll() is not None or fsutil.processes_using(path) == []  # killed before the unmount
        released.append(path)
        mountinfo.write_text("36 35 98:0 / / rw - ext4 /dev/root rw\n")  # the mount is gone
        return [escaped]

    try:
        res = fsutil.sweep_stale(str(tmp_path), "dest", mountinfo=str(mountinfo), release=release, kill=True)
    finally:
        if straggler.poll() is None:
            straggler.kill()
        straggler.wait()
    assert res.removed == [str(held)] and res.released == [escaped] and released == [str(held)]
    assert [line.split()[0] for line in res.killed] == [str(straggler.pid)] and straggler.returncode == -9
    assert any("killed leftover process" in line for line in res.lines())
    # a release that fails keeps the workspace and says why
    (held / "mnt").mkdir(parents=True)
    mountinfo.write_text(f"99 36 0:42 / {held / 'mnt'} rw - tmpfs tmpfs rw\n")

    def broken(_path: str) -> list[str]:
        raise RuntimeError("umount: target is busy")

    res = fsutil.sweep_stale(str(tmp_path), "dest", mountinfo=str(mountinfo), release=broken)
    assert res.removed == [] and "target is busy" in res.kept[str(held)]


def test_dest_lock_is_exclusive(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "dest"
    with fsutil.dest_lock(str(dest)) as held:
        assert held and (tmp_path / "sub" / "dest.lock").exists()
        code = ("import sys\nfrom ansible_collections.modulus.kmods.plugins.module_utils import fsutil\n"
                f"with fsutil.dest_lock({str(dest)!r}, wait=False) as held:\n    sys.exit(0 if held else 3)\n")
        assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ), check=False).returncode == 3
    assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ), check=False).returncode == 0


def test_a_zombie_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # until it exited, not reaped: a zombie
    with open(f"/proc/{proc.pid}/stat", encoding="utf-8") as handle:
        assert handle.read().rpartition(")")[2].split()[0] == "Z"
    assert fsutil.pid_alive(proc.pid) is False
    proc.wait()
    assert fsutil.pid_alive(proc.pid) is False
    assert fsutil.pid_alive(os.getpid()) is True


def test_dead_entries_names_only_what_dead_runs_left(tmp_path: Path) -> None:
    import re
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f"modulus-x-{gone.pid}-a").mkdir()
    (tmp_path / f"modulus-x-{os.getpid()}-b").mkdir()  # alive: this test
    (tmp_path / f"modulus-x-{gone.pid}-f").write_text("")  # a file, not a directory
    (tmp_path / f"modulus-x-{gone.pid}-l").symlink_to(tmp_path / f"modulus-x-{gone.pid}-a")
    (tmp_path / "other").mkdir()
    pattern = re.compile(r"modulus-x-([0-9]+)-[^/]+")
    names = [os.path.basename(p) for p in fsutil.dead_entries(str(tmp_path), pattern)]
    assert names == [f"modulus-x-{gone.pid}-a", f"modulus-x-{gone.pid}-f", f"modulus-x-{gone.pid}-l"]
    dirs = [os.path.basename(p) for p in fsutil.dead_entries(str(tmp_path), pattern, dirs_only=True)]
    assert dirs == [f"modulus-x-{gone.pid}-a"]
    assert fsutil.dead_entries(str(tmp_path / "missing"), pattern) == []
