# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The image cache: ``{cache_dir}/{board}/{version}/{image}`` plus ``metadata.json`` written after
verification, the per-image lock, listing, removal and pruning of versions."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import atomic_write
from ansible_collections.modulus.kmods.plugins.module_utils.imageinfo import version_key

IMAGE_FILE = "flatcar_developer_container.bin"
LEGACY_IMAGE_FILE = "coreos_developer_container.bin"
METADATA_FILE = "metadata.json"
METADATA_SCHEMA = 1


@dataclass
class CacheEntry:
    cache_dir: str
    board: str
    version: str
    image_name: str = IMAGE_FILE

    @property
    def directory(self) -> str:
        return os.path.join(self.cache_dir, self.board, self.version)

    @property
    def image_path(self) -> str:
        return os.path.join(self.directory, self.image_name)

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.directory, METADATA_FILE)


def read_metadata(entry: CacheEntry) -> Optional[dict]:
    try:
        with open(entry.metadata_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_metadata(entry: CacheEntry, values: dict) -> dict:
    st = os.stat(entry.image_path)
    meta = dict(values)
    meta.update({"schema": METADATA_SCHEMA, "image_file": entry.image_name, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "board": entry.board, "version": entry.version})
    atomic_write(entry.metadata_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def cached_ok(entry: CacheEntry, fingerprints: Optional[list[str]] = None) -> Optional[dict]:
    """The metadata of a complete, verified cached image, or None when it must be (re)fetched.

    Complete means: metadata written after verification names this image, its size and mtime
    still match the file, and (when given) the verified fingerprint is one of ``fingerprints``.
    """
    meta = read_metadata(entry)
    if not meta or meta.get("schema") != METADATA_SCHEMA or not meta.get("verified"):
        return None
    try:
        st = os.stat(entry.image_path)
    except OSError:
        return None
    if meta.get("image_file") != entry.image_name or meta.get("size") != st.st_size:
        return None
    if meta.get("mtime_ns") != st.st_mtime_ns:
        return None
    if fingerprints and meta.get("fingerprint") not in [f.upper() for f in fingerprints]:
        return None
    return meta


def cached_versions(cache_dir: str, board: str) -> list[str]:
    """Versions with a directory in the cache for this board, oldest first (by version number)."""
    base = os.path.join(cache_dir, board)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if os.path.isdir(os.path.join(base, n)) and not n.startswith(".")),
                  key=version_key)


def remove_entry(entry: CacheEntry, check_mode: bool = False) -> bool:
    """Remove a cached version (image, metadata, leftovers). True when something was there."""
    if not os.path.lexists(entry.directory):
        return False
    if not check_mode:
        with image_lock(entry.image_path, exclusive=True):
            shutil.rmtree(entry.directory)
    return True


def prune(cache_dir: str, board: str, keep: int, protect: tuple[str, ...] = (), check_mode: bool = False) -> list[str]:
    """Keep the ``keep`` newest versions (plus ``protect``) of a board; return what was removed."""
    if keep <= 0:
        return []
    versions = cached_versions(cache_dir, board)
    victims = [v for v in versions[:-keep] if v not in protect] if len(versions) > keep else []
    for version in victims:
        remove_entry(CacheEntry(cache_dir, board, version), check_mode=check_mode)
    return victims


class image_lock:
    """flock on the directory holding an image: shared while a command runs in it, exclusive while it
    is fetched, replaced or removed. No lock file is created (the kit's and the cache's directories stay clean)."""

    def __init__(self, image_path: str, exclusive: bool = False) -> None:
        self.path = os.path.dirname(os.path.abspath(image_path))
        self.exclusive = exclusive
        self.fd: Optional[int] = None

    def __enter__(self) -> image_lock:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            self.fd = None
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
