# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive operations: push, pull, query, remove, lock, unlock.

Each returns a plain dict (the module's result, ``changed`` and ``diff`` included) and
raises ``ArchiveError`` / ``StoreError`` with a message fit for ``fail_json``. Nothing on the
host changes before the new state is complete and verified; temporary files and staging
directories are removed on every path."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar
from ansible_collections.modulus.kmods.plugins.module_utils import fsutil
from ansible_collections.modulus.kmods.plugins.module_utils import lease as ls
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from ansible_collections.modulus.kmods.plugins.module_utils.identity import identity_from_manifest
from ansible_collections.modulus.kmods.plugins.module_utils.stores import ObjectInfo, Store, StoreError

MAX_PROBLEMS = 5


def _problems_text(problems: list[str]) -> str:
    text = "; ".join(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        text += f"; and {len(problems) - MAX_PROBLEMS} more"
    return text


def _state(info: Optional[ObjectInfo]) -> dict[str, Any]:
    if info is None:
        return {"key": None, "sha256": None, "size": None}
    return {"key": info.key, "sha256": info.sha256, "size": info.size}


def _result(changed: bool, store: Optional[Store], **kw: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"changed": changed, "store": store.url if store else None,
                           "store_requests": store.requests if store else 0}
    res.update(kw)
    return res


def _signer(value: Optional[str]) -> Optional[str]:
    return value.replace(" ", "").replace(":", "").lower() if value else value


def check_identity(manifest: dict[str, Any], wanted: dict[str, Optional[str]]) -> None:
    """Options given explicitly must agree with the manifest (fail closed on a mix-up)."""
    have = identity_from_manifest(manifest)
    for field, value in wanted.items():
        if value is None or field not in have:
            continue
        mine = have[field]
        if field == "signer" and mine:
            mine, value = _signer(mine), _signer(value)
        if mine != value:
            raise ar.ArchiveError(f"{field}={value!r} does not match the build's manifest ({mine!r})")


def load_manifest(tree: str) -> dict[str, Any]:
    """``manifest.load_manifest`` with its errors as ``ArchiveError`` (what the module reports)."""
    try:
        return mf.load_manifest(tree)
    except mf.ManifestError as exc:
        raise ar.ArchiveError(str(exc)) from None


def push(src: str, store: Optional[Store], wanted: dict[str, Optional[str]], level: int = ar.DEFAULT_LEVEL,
         check_mode: bool = False, tmp_dir: Optional[str] = None) -> dict[str, Any]:
    """Make sure the build in ``src`` is in the store (one HEAD when it already is)."""
    manifest = load_manifest(src)
    check_identity(manifest, wanted)
    problems = mf.verify_tree(src, manifest, hash_files=False)
    if problems:
        raise ar.ArchiveError(f"src {src} does not match its manifest: {_problems_text(problems)}")
    key = ar.archive_key(identity_from_manifest(manifest))
    msha = mf.manifest_sha256(manifest)
    if store is None:
        return _result(False, None, key=key, manifest_sha256=msha, msg="no store configured: the build stays local")
    if not store.writable:
        raise StoreError(f"store {store.url} is read-only (http): it cannot receive builds")
    info = store.head(key)
    if info is not None and info.sha256 and info.manifest_sha256 == msha:
        problems = mf.verify_tree(src, manifest)
        if problems:
            raise ar.ArchiveError(f"src {src} does not match its manifest: {_problems_text(problems)}")
        if not check_mode:
            _record(src, manifest, store, info.key, info.sha256, info.size, msha)
        return _result(False, store, key=key, sha256=info.sha256, size=info.size, manifest_sha256=msha,
                       diff={"before": _state(info), "after": _state(info)})
    before = _state(info)
    if check_mode:
        return _result(True, store, key=key, sha256=None, size=None, manifest_sha256=msha,
                       diff={"before": before, "after": {"key": key, "sha256": "(computed on upload)", "size": None}})
    # next to src by default: /tmp is a small tmpfs on Flatcar, /opt has the room
    workdir = fsutil.make_staging(src, "push", parent=tmp_dir)
    try:
        path = os.path.join(workdir, "build.tar.gz")
        sha, size = ar.pack_tree(src, manifest, path, level)
        store.upload(path, key, sha, msha, size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _record(src, manifest, store, key, sha, size, msha)
    after = {"key": key, "sha256": sha, "size": size}
    return _result(True, store, key=key, sha256=sha, size=size, manifest_sha256=msha,
                   diff={"before": before, "after": after})


def _record(tree: str, manifest: dict[str, Any], store: Store, key: str, sha: Optional[str],
            size: Optional[int], msha: str) -> None:
    """Write the archive's checksum into the local manifest (only when it changes)."""
    section = {"store": store.url, "key": key, "sha256": sha, "size": size, "manifest_sha256": msha}
    if manifest.get("archive") != section:
        updated = dict(manifest)
        updated["archive"] = section
        mf.write_manifest(tree, updated)


def _local_match(dest: str, ident: dict[str, Optional[str]]) -> Optional[dict[str, Any]]:
    """The manifest of ``dest`` when it holds a complete, verified build of ``ident``."""
    if not os.path.isfile(os.path.join(dest, mf.MANIFEST_NAME)):
        return None
    try:
        manifest = load_manifest(dest)
        check_identity(manifest, {k: v for k, v in ident.items() if v is not None})
    except ar.ArchiveError:
        return None
    if mf.verify_tree(dest, manifest):
        return None
    return manifest


def _dest_state(dest: str) -> dict[str, Any]:
    """What ``dest`` holds now, for the diff (whatever build it is)."""
    try:
        section = load_manifest(dest).get("archive") or {}
    except ar.ArchiveError:
        section = {}
    return {"key": section.get("key"), "sha256": section.get("sha256"), "size": section.get("size")}


def find_remote(store: Store, ident: dict[str, Optional[str]], channel: Optional[str],
                legacy: bool) -> Optional[ObjectInfo]:
    info = store.head(ar.archive_key(ident))
    if info is None and legacy and channel:
        lkey = ar.legacy_key(str(ident.get("os_version")), channel, str(ident.get("driver")),
                             str(ident.get("driver_version")))
        info = store.head(lkey)
        if info is not None:
            info.legacy = True
    return info


def pull(dest: str, store: Optional[Store], ident: dict[str, Optional[str]], channel: Optional[str] = None,
         legacy: bool = True, remote_check: bool = True, check_mode: bool = False) -> dict[str, Any]:
    """Make ``dest`` hold the verified build ``ident`` from the store."""
    key = ar.archive_key(ident)
    local = _local_match(dest, ident)
    local_state = None
    if local is not None:
        section = local.get("archive") or {}
        local_state = {"key": section.get("key"), "sha256": section.get("sha256"), "size": section.get("size")}
        if store is None or not remote_check:
            return _result(False, store, key=section.get("key") or key, sha256=section.get("sha256"), dest=dest,
                           legacy=local.get("imported") == "legacy", msg="dest already holds this build (verified)",
                           diff={"before": local_state, "after": local_state})
    if store is None:
        raise ar.ArchiveError(f"dest {dest} does not hold a verified build of {key} and no store is configured")
    try:
        if local is not None and local.get("imported") == "legacy" and (local.get("archive") or {}).get("key"):
            info = store.head(local["archive"]["key"])
            if info is not None:
                info.legacy = True
        else:
            info = find_remote(store, ident, channel, legacy)
    except StoreError as exc:
        if local is None:
            raise
        # the verified local build stays in use: a store outage must not break a converged host
        return _result(False, store, key=local_state["key"] or key, sha256=local_state["sha256"], dest=dest,
                       legacy=local.get("imported") == "legacy", remote_error=str(exc),
                       msg="dest already holds this build (verified); the store could not be checked",
                       diff={"before": local_state, "after": local_state})
    if local is not None and (info is None or (info.sha256 and info.sha256 == local_state["sha256"])
                              or (not info.sha256 and info.size == local_state["size"])):
        return _result(False, store, key=local_state["key"] or key, sha256=local_state["sha256"], dest=dest,
                       legacy=local.get("imported") == "legacy",
                       msg="dest already holds this build (verified)%s" % ("; not in the store" if info is None else ""),
                       diff={"before": local_state, "after": local_state})
    if info is None:
        raise StoreError("store {} has no archive for {}{}".format(
            store.url, key, " (nor the original tool's {})".format(ar.legacy_key(
                str(ident.get("os_version")), channel, str(ident.get("driver")), str(ident.get("driver_version"))))
            if legacy and channel else ""))
    is_legacy = info.legacy
    before = local_state or _dest_state(dest)
    if check_mode:
        return _result(True, store, key=info.key, sha256=info.sha256, size=info.size, dest=dest, legacy=is_legacy,
                       diff={"before": before, "after": _state(info)})
    work = fsutil.make_staging(dest, "pull")  # beside dest: the tree is renamed into place
    try:
        tmp = os.path.join(work, "archive.tar.gz")
        store.download(info.key, tmp)
        sha, size = fsutil.sha256_and_size(tmp)
        if info.sha256 and sha != info.sha256:
            raise ar.ArchiveError(f"archive {info.key} in {store.url} has sha256 {sha} but its metadata says {info.sha256}: refusing it")
        staging = os.path.join(work, "tree")
        os.mkdir(staging)
        os.chmod(staging, 0o755)  # becomes dest: readable like any installed tree
        manifest = _extract(tmp, staging, info, ident, channel)
        os.unlink(tmp)
        manifest["archive"] = {"store": store.url, "key": info.key, "sha256": sha, "size": size,
                               "manifest_sha256": info.manifest_sha256 or mf.manifest_sha256(manifest)}
        mf.write_manifest(staging, manifest)
        try:
            fsutil.swap_into_place(staging, dest)
        except fsutil.UnsafePathError as exc:
            raise ar.ArchiveError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result(True, store, key=info.key, sha256=sha, size=size, dest=dest, legacy=is_legacy,
                   diff={"before": before, "after": {"key": info.key, "sha256": sha, "size": size}})


def _extract(archive_path: str, staging: str, info: ObjectInfo, ident: dict[str, Optional[str]],
             channel: Optional[str]) -> dict[str, Any]:
    """Extract a downloaded archive into ``staging`` and check it; returns its manifest."""
    if info.legacy:
        root = ar.find_legacy_root(archive_path, str(ident.get("driver")), str(ident.get("driver_version")))
        written = ar.extract_archive(archive_path, staging, root)
        return ar.legacy_manifest(staging, written, ident, str(channel), info.key)
    written = ar.extract_archive(archive_path, staging)
    if written.pop(mf.MANIFEST_NAME, None) is None:
        raise ar.ArchiveError(f"archive {info.key} holds no {mf.MANIFEST_NAME}")
    manifest = load_manifest(staging)
    try:
        check_identity(manifest, {k: v for k, v in ident.items() if v is not None})
    except ar.ArchiveError as exc:
        raise ar.ArchiveError(f"archive {info.key} holds another build: {exc}") from None
    problems = mf.compare_files(written, manifest)
    if problems:
        raise ar.ArchiveError(f"archive {info.key} does not match its manifest: {_problems_text(problems)}")
    return manifest


def query(store: Optional[Store], ident: dict[str, Optional[str]], channel: Optional[str] = None,
          legacy: bool = True) -> dict[str, Any]:
    key = ar.archive_key(ident)
    if store is None:
        return _result(False, None, key=key, exists=False, legacy=False, sha256=None, size=None)
    info = find_remote(store, ident, channel, legacy)
    if info is None:
        return _result(False, store, key=key, exists=False, legacy=False, sha256=None, size=None)
    return _result(False, store, key=info.key, exists=True, legacy=info.legacy,
                   sha256=info.sha256, size=info.size, manifest_sha256=info.manifest_sha256)


def remove(store: Optional[Store], ident: dict[str, Optional[str]], check_mode: bool = False) -> dict[str, Any]:
    key = ar.archive_key(ident)
    if store is None:
        return _result(False, None, key=key, msg="no store configured")
    if not store.writable:
        raise StoreError(f"store {store.url} is read-only (http): cannot delete {key}")
    info = store.head(key)
    if info is None:
        return _result(False, store, key=key, diff={"before": _state(None), "after": _state(None)})
    if not check_mode:
        store.delete(key)
    return _result(True, store, key=key, diff={"before": _state(info), "after": _state(None)})


def lock(store: Optional[Store], ident: dict[str, Optional[str]], owner: str, ttl: float, wait: float,
         poll: float, check_mode: bool = False, clock: Callable[[], float] = time.time,
         sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Take the fleet lock for ``ident`` unless the archive already exists.

    Result ``lock``: acquired (this host must build and push, then unlock), archive_exists
    (someone already pushed it: pull), or neither after ``wait`` seconds (holder shown)."""
    key = ar.archive_key(ident)
    lkey = ar.lease_key(key)
    if store is None:
        return _result(False, None, key=key, lock={
            "acquired": True, "archive_exists": False, "holder": None, "key": None,
            "msg": "no store configured: nothing to coordinate"})
    if not store.supports_lock:
        raise StoreError(f"store {store.url} is read-only (http): it cannot hold a fleet lock")
    if store.head(key) is not None:
        return _result(False, store, key=key, lock={"acquired": False, "archive_exists": True, "holder": None, "key": lkey})
    if check_mode:
        seen = ls.inspect(store, lkey, clock)
        return _result(not seen["held"], store, key=key,
                       lock={"acquired": False, "archive_exists": False, "holder": seen["holder"], "key": lkey})
    res = ls.acquire(store, lkey, owner, ttl, wait, poll, done=lambda: store.head(key) is not None,
                     clock=clock, sleep=sleep)
    out = res.as_dict()
    out.update({"archive_exists": res.done, "key": lkey, "owner": owner})
    return _result(res.acquired and not res.renewed, store, key=key, lock=out)


def unlock(store: Optional[Store], ident: dict[str, Optional[str]], owner: str,
           check_mode: bool = False) -> dict[str, Any]:
    key = ar.archive_key(ident)
    lkey = ar.lease_key(key)
    if store is None:
        return _result(False, None, key=key, lock={"released": False, "holder": None, "key": None})
    if not store.supports_lock:
        raise StoreError(f"store {store.url} is read-only (http): it holds no lock")
    if check_mode:
        seen = ls.inspect(store, lkey)
        mine = (seen["holder"] or {}).get("owner") == owner
        return _result(mine, store, key=key, lock={"released": False, "holder": seen["holder"], "key": lkey})
    res = ls.release(store, lkey, owner)
    res["key"] = lkey
    return _result(bool(res["released"]), store, key=key, lock=res)
