# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The image cache: ``{cache_dir}/{board}/{version}/{image}`` plus ``metadata.json`` written after
verification, the per-image lock, listing, removal and pruning of versions."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import (
    atomic_write,
    make_staging,
    swap_into_place,
    sweep_stale,
)
from ansible_collections.modulus.kmods.plugins.module_utils.imageinfo import version_key
from ansible_collections.modulus.kmods.plugins.module_utils.transfer import sweep_partials

IMAGE_FILE = "flatcar_developer_container.bin"
LEGACY_IMAGE_FILE = "coreos_developer_container.bin"
METADATA_FILE = "metadata.json"
METADATA_SCHEMA = 1
_STAGING_RE = re.compile(r"\.(.+)\.(?:fetch|old)-[0-9]+-[^/]+")


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


def cached_unverified_reason(entry: CacheEntry, fingerprints: Optional[list[str]]) -> Optional[str]:
    """Why a complete entry does not count for ``fingerprints`` (None: it counts, or there is no
    complete entry at all)."""
    meta = cached_ok(entry)
    if meta is None or cached_ok(entry, fingerprints) is not None:
        return None
    return "it was verified with the key {}, not one of {}".format(meta.get("fingerprint"), ", ".join(fingerprints or []))


def make_entry_staging(entry: CacheEntry) -> str:
    """``{cache_dir}/{board}/.{version}.fetch-<pid>-XXXX``: where a new entry is built (image and
    metadata) before ``replace_entry`` puts it in place; ``sweep_board`` removes it if the run dies."""
    return make_staging(entry.directory, "fetch", mode=0o755)


def staged(entry: CacheEntry, staging: str) -> CacheEntry:
    """The entry as it is laid out in a staging directory (same names)."""
    return _StagedEntry(entry.cache_dir, entry.board, entry.version, entry.image_name, staging)


@dataclass
class _StagedEntry(CacheEntry):
    staging: str = ""

    @property
    def directory(self) -> str:
        return self.staging


def replace_entry(staging: str, entry: CacheEntry) -> None:
    """Put the complete, verified entry built in ``staging`` at ``entry.directory`` in one atomic
    exchange (the old entry stays whole until then; the caller holds its exclusive lock)."""
    swap_into_place(staging, entry.directory)


def sweep_board(cache_dir: str, board: str) -> list[str]:
    """What killed runs left in ``{cache_dir}/{board}``: staging directories ``.{version}.fetch-<pid>-*``
    (and ``.old-``) of processes that are gone, ``.partial-*`` files of gone processes inside
    version directories, and empty version directories nobody holds locked. Returns what was removed."""
    base = os.path.join(cache_dir, board)
    removed: list[str] = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return removed
    stale_bases = sorted({m.group(1) for m in (_STAGING_RE.fullmatch(n) for n in names) if m})
    for version in stale_bases:
        removed += sweep_stale(base, version).removed
    for name in names:
        path = os.path.join(base, name)
        if not name.startswith(".") and os.path.isdir(path) and not os.path.islink(path):
            removed += sweep_partials(path)
            if _remove_if_empty_and_free(path):
                removed.append(path)
    return removed


def _remove_if_empty_and_free(path: str) -> bool:
    """An empty version directory is what a first fetch killed before it finished leaves (a live fetch
    holds its exclusive lock, so it is skipped): remove it, so it does not count as a cached version."""
    try:
        if os.listdir(path):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.listdir(path):
            return False
        os.rmdir(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
    is fetched, replaced or removed. No lock file is created (the kit's and the cache's directories stay clean).

    A verified entry is replaced by exchanging the whole directory (``replace_entry``), so after the
    lock is granted it is checked to still be on the directory at that path; if the directory was
    exchanged meanwhile, the new one is locked instead."""

    def __init__(self, image_path: str, exclusive: bool = False, create: bool = False) -> None:
        self.path = os.path.dirname(os.path.abspath(image_path))
        self.exclusive = exclusive
        self.create = create  # make the directory when missing (also if it was removed while we waited)
        self.fd: Optional[int] = None

    def __enter__(self) -> image_lock:
        for _attempt in range(100):
            if self.create:
                os.makedirs(self.path, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                if self.create:
                    continue
                self.fd = None
                return self
            fcntl.flock(fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)
        raise OSError(f"{self.path} keeps being replaced: cannot lock it")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
