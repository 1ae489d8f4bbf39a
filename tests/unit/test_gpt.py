"""GPT parsing against disk images made by sgdisk (the real tool), including damaged ones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils.gpt import (
    LINUX_FS_TYPE,
    GptError,
    find_root,
    read_gpt_file,
    root_partition,
)

pytestmark = pytest.mark.skipif(shutil.which("sgdisk") is None and not Path("/usr/sbin/sgdisk").exists(),
                                reason="sgdisk (gdisk) is not installed")
SGDISK = shutil.which("sgdisk") or "/usr/sbin/sgdisk"


def make_disk(path: Path, size_mib: int = 8, parts: list[tuple[int, int, str, str]] | None = None) -> Path:
    """A sparse disk image with the given (number, first sector, size, label) partitions."""
    with open(path, "wb") as fh:
        fh.truncate(size_mib << 20)
    if parts is None:
        parts = [(9, 4096, "+4M", "ROOT")]
    args = [SGDISK]
    for number, first, size, label in parts:
        args += ["-n", f"{number}:{first}:{size}", "-c", f"{number}:{label}", "-t", f"{number}:{LINUX_FS_TYPE}"]
    subprocess.run(args + [str(path)], check=True, capture_output=True)
    return path


def test_root_partition_of_a_flatcar_shaped_disk(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.bin", parts=[(1, 2048, "+512K", "EFI-SYSTEM"), (9, 4096, "+4M", "ROOT")])
    table = read_gpt_file(str(disk))
    assert table.sector_size == 512
    assert [p.number for p in table.partitions] == [1, 9]
    part = root_partition(str(disk))
    assert (part.number, part.name, part.type_guid) == (9, "ROOT", LINUX_FS_TYPE)
    assert part.offset == 2097152
    assert part.size == 4 << 20


def test_root_found_by_label_not_number(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.bin", parts=[(3, 4096, "+1M", "ROOT"), (9, 8192, "+1M", "OEM")])
    assert find_root(read_gpt_file(str(disk))).number == 3


def test_missing_root_partition_names_what_exists(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.bin", parts=[(9, 4096, "+1M", "USR-A")])
    with pytest.raises(GptError, match=r"no partition labelled 'ROOT'.*9:USR-A"):
        root_partition(str(disk))


def test_not_a_gpt(tmp_path: Path) -> None:
    path = tmp_path / "zeros.bin"
    path.write_bytes(bytes(1 << 16))
    with pytest.raises(GptError, match="not a GPT disk image"):
        root_partition(str(path))


def test_header_crc_mismatch_is_rejected(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.bin")
    data = bytearray(disk.read_bytes()[: 1 << 20])
    data[512 + 40] ^= 0x01  # first usable LBA
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(GptError, match="header CRC"):
        read_gpt_file(str(bad))


def test_entry_array_crc_mismatch_is_rejected(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.bin")
    data = bytearray(disk.read_bytes())
    data[1024 + 8 * 128 + 56] ^= 0x01  # a character of partition 9's name
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(GptError, match="entry array CRC"):
        read_gpt_file(str(bad))


def test_truncated_image_is_detected(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.bin")
    with open(disk, "r+b") as fh:
        fh.truncate(4 << 20)  # ROOT spans 2 MiB .. 6 MiB
    with pytest.raises(GptError, match="truncated image"):
        root_partition(str(disk))
    assert root_partition(str(disk), check_size=False).offset == 2097152
