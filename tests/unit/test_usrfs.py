"""The USR partition's file system, and reading a btrfs one without mounting it (real btrfs-progs, no root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr
from ansible_collections.modulus.kmods.plugins.module_utils._host import usrfs

MKFS_BTRFS = shutil.which("mkfs.btrfs") or "/usr/sbin/mkfs.btrfs"
needs_btrfs = pytest.mark.skipif(not (os.path.exists(MKFS_BTRFS) and shutil.which("btrfs")),
                                 reason="btrfs-progs is not installed")


def btrfs_image(tmp_path: Path, tree: Path) -> Path:
    img = tmp_path / "usr.img"
    with open(img, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run([MKFS_BTRFS, "-q", "-f", "--mixed", "-m", "single", "-d", "single", "--rootdir", str(tree),
                    str(img)], check=True, capture_output=True)
    return img


def test_path_regex_restores_the_files_their_parents_and_one_level_of_dirs() -> None:
    rx = re.compile(usrfs.path_regex(["lib/os-release", "share/flatcar/release"], dirs=["lib/modules"]))
    for path in ("/", "/lib", "/lib/os-release", "/share", "/share/flatcar", "/share/flatcar/release", "/lib/modules",
                 "/lib/modules/6.12.0-flatcar"):
        assert rx.fullmatch(path), path
    for path in ("/lib/modules/6.12.0-flatcar/modules.dep", "/lib/os-releaseX", "/libx", "/share/flatcar/x",
                 "/bin/sh", "/lib/modules/a/b"):
        assert not rx.fullmatch(path), path


def test_fs_type_of_blank_ext_and_short_files(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(b"\0" * (1 << 20))
    assert usrfs.fs_type(str(blank)) is None
    short = tmp_path / "short"
    short.write_bytes(b"x")
    assert usrfs.fs_type(str(short)) is None
    ext = tmp_path / "ext"
    ext.write_bytes(b"\0" * 0x438 + b"\x53\xef" + b"\0" * (1 << 17))
    assert usrfs.fs_type(str(ext)) == "ext"
    with pytest.raises(usrfs.UsrReadError, match="cannot read"):
        usrfs.fs_type(str(tmp_path / "missing"))


@needs_btrfs
def test_btrfs_tree_reads_files_lists_dirs_and_skips_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "tree"
    (tree / "lib/modules/6.12.1-flatcar").mkdir(parents=True)
    (tree / "lib/modules/6.12.1-flatcar/modules.dep").write_text("big index\n")
    (tree / "lib/os-release").write_text("ID=flatcar\nVERSION_ID=4593.2.4\n")
    (tree / "share/flatcar").mkdir(parents=True)
    os.symlink("/etc/shadow", tree / "share/flatcar/release")  # must never be followed to the machine's file
    img = btrfs_image(tmp_path, tree)
    assert usrfs.fs_type(str(img)) == "btrfs"
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    with usrfs.BtrfsTree(str(img), fr.USR_RELEASE_FILES, dirs=("lib/modules",)) as read:
        assert read.read_text("lib/os-release") == "ID=flatcar\nVERSION_ID=4593.2.4\n"
        assert read.read_text("share/flatcar/release") is None
        assert read.listdir("lib/modules") == ["6.12.1-flatcar"]
        assert not os.path.exists(os.path.join(read.root, "lib/modules/6.12.1-flatcar/modules.dep"))
        assert os.path.basename(read.root).startswith(f"modulus-ro-{os.getpid()}-")
    assert os.listdir(tmp_path / "tmp") == []
    usr = fr.read_usr(str(img))
    assert (usr.version, usr.kernel_releases) == ("4593.2.4", ["6.12.1-flatcar"])


@needs_btrfs
def test_btrfs_restore_failure_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(usrfs.UsrReadError, match="btrfs restore of .* failed"), \
            usrfs.BtrfsTree(str(bad), ["lib/os-release"]):
        pass


def test_a_never_written_partition_is_named_as_such(tmp_path: Path) -> None:
    blank = tmp_path / "USR-B"
    blank.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(fr.ReleaseError, match="holds no btrfs or ext file system \\(never written\\)"):
        fr.read_usr(str(blank))
