"""Reading images without mounting them (real debugfs, no root): a Flatcar-shaped developer
container (GPT, ext4 ROOT at 2 MiB) and a USR-partition-shaped file system at offset 0."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import imageinfo as ii
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import LINUX_FS_TYPE

SGDISK = shutil.which("sgdisk") or "/usr/sbin/sgdisk"
MKFS = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
DEBUGFS = shutil.which("debugfs") or "/usr/sbin/debugfs"
NEEDS_TOOLS = pytest.mark.skipif(not all(os.path.exists(t) for t in (SGDISK, MKFS, DEBUGFS)),
                                 reason="needs gdisk and e2fsprogs")


def make_image(path: Path, version: str, kernels: dict[str, bool], board: str = "amd64-usr") -> Path:
    """GPT + ext4 ROOT at 2 MiB holding /usr/lib/modules/<k>[/build] and the release files.

    test_devcontainer.py uses it too (``from test_imageinfo import make_image``)."""
    tree = path.parent / f"tree-{path.name}"
    for kver, with_build in kernels.items():
        (tree / "usr/lib/modules" / kver).mkdir(parents=True)
        if with_build:
            (tree / "usr/lib/modules" / kver / "build").mkdir()
    (tree / "usr/share/flatcar").mkdir(parents=True)
    (tree / "usr/share/flatcar/release").write_text(f"FLATCAR_RELEASE_VERSION={version}\nFLATCAR_RELEASE_BOARD={board}\n")
    (tree / "usr/lib/os-release").write_text(f'ID=flatcar\nVERSION_ID={version}\nNAME="Flatcar Container Linux"\n')
    with open(path, "wb") as fh:
        fh.truncate(12 << 20)
    subprocess.run([SGDISK, "-n", "9:4096:+8M", "-c", "9:ROOT", "-t", f"9:{LINUX_FS_TYPE}", str(path)], check=True,
                   capture_output=True)
    subprocess.run([MKFS, "-q", "-F", "-L", "ROOT", "-d", str(tree), "-E", "offset=2097152", str(path), "8M"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return path


def make_usr(path: Path, version: str, kernels: list[str]) -> Path:
    """A USR partition image: ext4 at offset 0, mounted at /usr, so /lib/modules/<k> without build."""
    tree = path.parent / f"tree-{path.name}"
    for kver in kernels:
        (tree / "lib/modules" / kver / "kernel").mkdir(parents=True)
    (tree / "lib/modules/modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (tree / "lib/os-release").write_text(f"ID=flatcar\nVERSION_ID={version}\n")
    subprocess.run([MKFS, "-q", "-F", "-L", "USR-B", "-d", str(tree), str(path), "8M"], check=True, capture_output=True)
    shutil.rmtree(tree)
    return path


@NEEDS_TOOLS
def test_image_info_reads_kernels_and_release_without_mounting(tmp_path: Path) -> None:
    kernels = {"6.1.0-50-amd64": True, "6.1.0-9-amd64": True, "6.1.0-10-amd64": False}
    image = make_image(tmp_path / "img.bin", "9001.2.0", kernels)
    info = ii.image_info(str(image))
    assert info.kernel_releases == ["6.1.0-9-amd64", "6.1.0-50-amd64"]  # numeric order, only those with build
    assert (info.version, info.board, info.root_offset, info.root_size) == ("9001.2.0", "amd64-usr", 2097152, 8 << 20)
    assert info.release["ID"] == "flatcar"
    everything = ii.kernel_releases_in(str(image), info.root_offset, require_build=False)
    assert everything == ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-50-amd64"]


@NEEDS_TOOLS
def test_image_info_without_build_dirs_lists_every_kernel(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img.bin", "9001.2.0", {"5.15.0": False})
    assert ii.image_info(str(image)).kernel_releases == ["5.15.0"]


@NEEDS_TOOLS
def test_usr_partition_at_offset_zero(tmp_path: Path) -> None:
    usr = str(make_usr(tmp_path / "usr.img", "9001.2.0", ["6.1.0-50-amd64", "6.1.0-47-amd64"]))
    listing = {name: mode & ii.S_IFMT for name, mode in ii.list_dir(usr, 0, "/lib/modules")}
    assert listing == {"6.1.0-47-amd64": ii.S_IFDIR, "6.1.0-50-amd64": ii.S_IFDIR, "modules.builtin": 0o100000}
    assert ii.kernel_releases_in(usr, 0, "/lib/modules", require_build=False) == ["6.1.0-47-amd64", "6.1.0-50-amd64"]
    assert ii.kernel_releases_in(usr, 0) == ii.kernel_releases_in(usr, 0, "/lib/modules")  # the /lib/modules fallback
    assert "VERSION_ID=9001.2.0" in ii.read_file(usr, 0, "/lib/os-release")
    assert ii.read_file(usr, 0, "/share/flatcar/release") == ""  # missing: empty, not an error
    assert ii.list_dir(usr, 0, "/no/such/dir") == []


@NEEDS_TOOLS
def test_not_ext4_is_an_error_not_an_empty_answer(tmp_path: Path) -> None:
    zero = tmp_path / "zero.img"
    zero.write_bytes(bytes(1 << 20))
    with pytest.raises(ii.ImageReadError, match="Filesystem not open|Bad magic"):
        ii.read_file(str(zero), 0, "/lib/os-release")
    with pytest.raises(ii.ImageReadError):
        ii.list_dir(str(zero), 0, "/lib/modules")


def test_parse_debugfs_ls() -> None:
    text = "/2/040755/0/0/.//\n/2/040755/0/0/..//\n/12/040755/0/0/6.1.0-50-amd64//\n/13/100644/0/0/modules.dep/120/\n\n"
    assert ii.parse_debugfs_ls(text) == [("6.1.0-50-amd64", 0o40755), ("modules.dep", 0o100644)]


def test_version_key_orders_numerically() -> None:
    versions = ["9001.10.0", "9001.2.0", "6.1.0-9-amd64", "6.1.0-50-amd64", "8999.0.0"]
    assert sorted(versions, key=ii.version_key) == ["6.1.0-9-amd64", "6.1.0-50-amd64", "8999.0.0", "9001.2.0",
                                                    "9001.10.0"]
