# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The build manifest (``DEST/manifest.json``, schema 1): the one owner of its format.

kmod_build writes it and checks a build against it (up to date?); kmod_archive packs it, verifies
a tree before a push and after a pull, and names a build's content by ``manifest_sha256``. The
layout is described in docs/internals.md. ``files`` lists every file of the build except
``manifest.json`` itself: ``{"sha256", "size", "mode"}`` for a regular file, ``{"link"}`` for a
symlink. Which build it is (the identity) is read by ``identity.identity_from_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from typing import Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import (
    UnsafePathError,
    check_link,
    safe_relpath,
    sha256_and_size,
    write_json_atomic,
)
from ansible_collections.modulus.kmods.plugins.module_utils.identity import IDENTITY_FIELDS, MANIFEST_SIGNER_KEY

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MODE_RE = re.compile(r"0?[0-7]{3,4}")
_STRING_FIELDS = tuple(MANIFEST_SIGNER_KEY if f == "signer" else f for f in IDENTITY_FIELDS) + (
    "channel", "source_sha256", "inputs_sha256")


class ManifestError(ValueError):
    """A manifest is missing or malformed; the message names the file and the problem."""


# --------------------------------------------------------------------------- describing a tree


def file_entry(path: str) -> dict[str, Any]:
    """The ``files`` entry of one path: a symlink's target, or a regular file's sha256, size and mode."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(path), "mode": "0777"}
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{path} is neither a regular file nor a symlink")
    digest, size = sha256_and_size(path)
    return {"sha256": digest, "size": size, "mode": "%04o" % (st.st_mode & 0o7777)}


def module_entry(info: Any, rel: str) -> dict[str, Any]:
    """The ``modules`` entry of a kernel module (an ``elfmod.ModuleInfo``) installed at ``rel``."""
    sig = info.signature
    return {"name": info.name, "file": rel, "vermagic": info.vermagic, "depends": info.depends,
            "signer": sig.signer if sig else None, "sig_key": sig.key_id if sig else None,
            "sig_hashalgo": sig.hash_algo if sig else None, "size": info.size,
            "srcversion": info.first("srcversion"), "license": info.first("license")}


def tree_paths(tree: str) -> list[str]:
    """Every non-directory path below ``tree`` (relative, '/'-separated, sorted; symlinks to
    directories included, not followed), except the tree's own manifest.json."""
    found = []
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), tree).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def list_files(tree: str) -> dict[str, dict[str, Any]]:
    """The ``files`` object of a tree."""
    return {rel: file_entry(os.path.join(tree, rel)) for rel in tree_paths(tree)}


# --------------------------------------------------------------------------- reading and writing


def check_manifest(data: Any, where: str) -> None:
    """Raise ``ManifestError`` unless ``data`` is a schema-1 manifest whose ``files`` are safe to use."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: a manifest must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ManifestError(f"{where}: unsupported manifest schema {data.get('schema')!r} (expected {SCHEMA})")
    for key in _STRING_FIELDS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ManifestError(f"{where}: {key} must be a string or null, not {data[key]!r}")
    for key, kind in (("modules", list), ("toolchain", dict), ("archive", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise ManifestError(f"{where}: {key} must be a JSON {'array' if kind is list else 'object'}")
    files = data.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"{where}: manifest has no 'files' object")
    for rel, meta in files.items():
        if rel == MANIFEST_NAME:
            raise ManifestError(f"{where}: 'files' may not list {MANIFEST_NAME} itself")
        if not isinstance(meta, dict):
            raise ManifestError(f"{where}: files[{rel!r}] must be an object")
        try:
            safe_relpath(rel)
            if "link" in meta:
                check_link(rel, str(meta["link"]))
        except UnsafePathError as exc:
            raise ManifestError(f"{where}: files: {exc}") from None
        if "link" in meta:
            continue
        if not isinstance(meta.get("sha256"), str) or not _SHA256_RE.fullmatch(meta["sha256"]):
            raise ManifestError(f"{where}: files[{rel!r}] has no valid sha256")
        size = meta.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ManifestError(f"{where}: files[{rel!r}] has an invalid size {size!r}")
        if "mode" in meta and not (isinstance(meta["mode"], str) and _MODE_RE.fullmatch(meta["mode"])):
            raise ManifestError(f"{where}: files[{rel!r}] has an invalid mode {meta['mode']!r}")


def load_manifest(tree: str) -> dict[str, Any]:
    """The checked manifest of the build in ``tree``."""
    path = os.path.join(tree, MANIFEST_NAME)
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{tree} has no {MANIFEST_NAME} (not a kmod_build output directory)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    check_manifest(data, path)
    return data


def write_manifest(tree: str, manifest: dict[str, Any]) -> None:
    """Write ``tree/manifest.json`` atomically (sorted keys, 2-space indent)."""
    write_json_atomic(os.path.join(tree, MANIFEST_NAME), manifest)


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest as packed into an archive: without ``archive``, sorted keys, 2-space indent."""
    body = {k: v for k, v in manifest.items() if k != "archive"}
    return (json.dumps(body, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """Digest naming the *content* of a build (manifest without its ``archive`` section)."""
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


# --------------------------------------------------------------------------- comparing


def _describe(entry: dict[str, Any]) -> str:
    return f"a symlink to {entry['link']!r}" if "link" in entry else "a regular file"


def entry_problem(rel: str, want: dict[str, Any], got: Optional[dict[str, Any]]) -> Optional[str]:
    """How the actual entry ``got`` (None: missing) differs from the manifest's ``want``."""
    if got is None:
        return f"{rel}: missing or not a regular file"
    if "link" in want or "link" in got:
        if want.get("link") != got.get("link"):
            return f"{rel}: {_describe(got)}, manifest says {_describe(want)}"
        return None
    if "sha256" in got and got["sha256"] != want.get("sha256"):
        return f"{rel}: sha256 {got['sha256']}, manifest says {want.get('sha256')}"
    if "size" in want and int(want["size"]) != got.get("size"):
        return f"{rel}: size {got.get('size')}, manifest says {want['size']}"
    return None


def compare_files(have: dict[str, Optional[dict[str, Any]]], manifest: dict[str, Any],
                  strict: bool = True) -> list[str]:
    """Problems of the entries ``have`` (as ``file_entry``/``fsutil.extract_tar`` describe them; an
    entry without sha256 is compared by size) against the manifest's ``files``. ``strict``: an
    entry the manifest does not list is a problem too."""
    want: dict[str, dict[str, Any]] = manifest.get("files") or {}
    problems = []
    for rel in sorted(set(want) | set(have)):
        if rel == MANIFEST_NAME:
            continue
        if rel not in want:
            if strict:
                problems.append(f"{rel}: present but not listed in the manifest")
            continue
        problem = entry_problem(rel, want[rel], have.get(rel))
        if problem:
            problems.append(problem)
    return problems


def _actual(path: str, hash_files: bool) -> Optional[dict[str, Any]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(path)}
    if not stat.S_ISREG(st.st_mode):
        return None
    if not hash_files:
        return {"size": st.st_size}
    digest, size = sha256_and_size(path)
    return {"sha256": digest, "size": size}


def verify_tree(tree: str, manifest: dict[str, Any], strict: bool = True, hash_files: bool = True) -> list[str]:
    """Compare a tree with its manifest; returns the problems (empty when it matches).

    ``strict``: files not listed are problems too. ``hash_files=False``: sizes only (cheap)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return ["manifest has no 'files' object"]
    have: dict[str, Optional[dict[str, Any]]] = {}
    problems = []
    for rel in files:
        try:
            safe_relpath(rel)
        except UnsafePathError as exc:
            problems.append(str(exc))
            continue
        have[rel] = _actual(os.path.join(tree, rel), hash_files)
    if strict:
        for rel in tree_paths(tree):
            have.setdefault(rel, {})
    return problems + compare_files(have, {"files": {k: v for k, v in files.items() if k in have}}, strict)
