# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read a GUID partition table (UEFI spec 2.x, chapter 5) and find the ROOT partition of a
Flatcar developer container (partition 9, label ``ROOT``, ext4 at byte offset 2097152)."""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

GPT_SIGNATURE = b"EFI PART"
LINUX_FS_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ROOT_LABEL = "ROOT"
ROOT_NUMBER = 9
# header layout after the signature: revision, header size, header crc, reserved, my lba,
# alternate lba, first usable, last usable, disk guid, entries lba, entry count, entry size, entries crc
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
MAX_ENTRIES_BYTES = 1 << 20


class GptError(ValueError):
    """The data is not a valid GPT disk, or it lacks the partition asked for."""


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int
    attributes: int
    sector_size: int

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector_size


@dataclass(frozen=True)
class GptTable:
    sector_size: int
    disk_guid: str
    first_usable_lba: int
    last_usable_lba: int
    alternate_lba: int
    partitions: list[Partition] = field(default_factory=list)

    @property
    def disk_size_min(self) -> int:
        """Smallest disk size consistent with the header (the backup header sits at the last LBA)."""
        return (self.alternate_lba + 1) * self.sector_size

    def by_name(self, name: str) -> Optional[Partition]:
        for part in self.partitions:
            if part.name == name:
                return part
        return None

    def by_number(self, number: int) -> Optional[Partition]:
        for part in self.partitions:
            if part.number == number:
                return part
        return None


def _read_at(handle: BinaryIO, offset: int, size: int) -> bytes:
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise GptError(f"short read at byte {offset}: wanted {size} bytes, got {len(data)}")
    return data


def _parse_header(block: bytes) -> Optional[tuple]:
    if block[:8] != GPT_SIGNATURE:
        return None
    fields = _HEADER.unpack_from(block, 0)
    header_size = fields[2]
    if header_size < 92 or header_size > len(block):
        raise GptError(f"GPT header size {header_size} is out of range")
    expected_crc = fields[3]
    header = bytearray(block[:header_size])
    header[16:20] = b"\0\0\0\0"
    if zlib.crc32(bytes(header)) & 0xFFFFFFFF != expected_crc:
        raise GptError("GPT header CRC mismatch")
    return fields


def read_gpt(handle: BinaryIO) -> GptTable:
    """Parse the primary GPT of an open disk image (512 or 4096-byte sectors)."""
    for sector_size in (512, 4096):
        try:
            block = _read_at(handle, sector_size, sector_size)
        except GptError:
            continue
        fields = _parse_header(block)
        if fields is None:
            continue
        (_sig, _rev, _hsize, _hcrc, _res, my_lba, alt_lba, first_usable, last_usable,
         disk_guid, entries_lba, entry_count, entry_size, entries_crc) = fields
        if my_lba != 1:
            raise GptError(f"primary GPT header claims to be at LBA {my_lba}, not 1")
        if entry_size < 128 or entry_size % 8 or entry_count * entry_size > MAX_ENTRIES_BYTES:
            raise GptError(f"GPT partition entry array of {entry_count} x {entry_size} bytes is not plausible")
        entries = _read_at(handle, entries_lba * sector_size, entry_count * entry_size)
        if zlib.crc32(entries) & 0xFFFFFFFF != entries_crc:
            raise GptError("GPT partition entry array CRC mismatch")
        parts = []
        for index in range(entry_count):
            type_raw, unique_raw, first, last, attrs, name_raw = _ENTRY.unpack_from(entries, index * entry_size)
            if type_raw == b"\0" * 16:
                continue
            if last < first:
                raise GptError(f"partition {index + 1} ends (LBA {last}) before it starts (LBA {first})")
            name = name_raw.decode("utf-16-le", errors="replace").split("\0", 1)[0]
            parts.append(Partition(
                number=index + 1, name=name,
                type_guid=str(uuid.UUID(bytes_le=type_raw)), unique_guid=str(uuid.UUID(bytes_le=unique_raw)),
                first_lba=first, last_lba=last, attributes=attrs, sector_size=sector_size,
            ))
        return GptTable(sector_size=sector_size, disk_guid=str(uuid.UUID(bytes_le=disk_guid)),
                        first_usable_lba=first_usable, last_usable_lba=last_usable, alternate_lba=alt_lba,
                        partitions=parts)
    raise GptError("no GPT header ('EFI PART') at LBA 1: not a GPT disk image")


def read_gpt_file(path: str) -> GptTable:
    with open(path, "rb") as handle:
        return read_gpt(handle)


def find_root(table: GptTable, label: str = ROOT_LABEL) -> Partition:
    """The developer container's root partition: the one labelled ROOT (Flatcar puts it at number 9)."""
    part = table.by_name(label)
    if part is None:
        names = ", ".join(f"{p.number}:{p.name or '-'}" for p in table.partitions) or "none"
        raise GptError(f"no partition labelled {label!r} in the GPT (partitions: {names})")
    return part


def root_partition(path: str, label: str = ROOT_LABEL, check_size: bool = True) -> Partition:
    """Find the ROOT partition of a disk image file and check it lies inside the file."""
    with open(path, "rb") as handle:
        table = read_gpt(handle)
        part = find_root(table, label)
        if check_size:
            size = os.fstat(handle.fileno()).st_size
            if part.offset + part.size > size:
                raise GptError(f"partition {label} (bytes {part.offset}-{part.offset + part.size}) extends past the end "
                               f"of {path} ({size} bytes): truncated image")
    return part
