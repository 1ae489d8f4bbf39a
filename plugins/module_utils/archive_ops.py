# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive operations: push, pull, query, remove, lock, unlock.

Each returns a plain dict (the module's result, ``changed`` and ``diff`` included) and
raises ``ArchiveError`` / ``StoreError`` with a message fit for ``fail_json``. Nothing on the
host changes before the new state is complete and verified; temporary files and staging
directories are removed on every path."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import Any, Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar
from ansible_collections.modulus.kmods.plugins.module_utils import fsutil, mounts
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


def _sweep(tree: str, parents: tuple[str, ...] = ()) -> list[str]:
    """Under ``fsutil.dest_lock(tree)``: remove what dead runs left beside ``tree`` (workspaces with
    their mounts and processes: kmod_build shares the directory, temporary files); the lines say what."""
    return fsutil.sweep_dest(tree, release=mounts.release_under, parents=parents).lines()


def _sweep_if_idle(tree: str) -> list[str]:
    """``_sweep`` for a run that changes nothing: only when no other run holds the lock (never waits)."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(tree)) or "/"):
        return []
    try:
        with fsutil.dest_lock(tree, wait=False) as held:
            return _sweep(tree) if held else []
    except OSError:  # a read-only parent: nothing of ours can be there either
        return []


def _signature_fields(signed: Optional[bool], authenticated: bool, signer_key: Optional[str]) -> dict[str, Any]:
    return {"signed": signed, "authenticated": authenticated, "signer_key": signer_key}


def push(src: str, store: Optional[Store], wanted: dict[str, Optional[str]], level: int = ar.DEFAULT_LEVEL,
         check_mode: bool = False, tmp_dir: Optional[str] = None, signing_key: Optional[str] = None) -> dict[str, Any]:
    """Make sure the build in ``src`` is in the store (one HEAD when it already is; with ``signing_key``
    one more GET of its signature, signed again when it is missing or not ours).

    Outside check mode it holds ``<src>.lock`` (kmod_build's lock of that directory) from reading the
    manifest to recording the archive in it, and first sweeps what dead runs left beside ``src``."""
    ours = ar.public_key_of(signing_key) if signing_key else None  # fails early: no ssh-keygen, unusable key
    if check_mode or store is None or not store.writable:
        return _push(src, store, wanted, level, check_mode, tmp_dir, signing_key, ours, [])
    with fsutil.dest_lock(src):
        swept = _sweep(src, (tmp_dir,) if tmp_dir else ())
        return _push(src, store, wanted, level, False, tmp_dir, signing_key, ours, swept)


def _push(src: str, store: Optional[Store], wanted: dict[str, Optional[str]], level: int, check_mode: bool,
          tmp_dir: Optional[str], signing_key: Optional[str], ours: Optional[ar.PublicKey],
          swept: list[str]) -> dict[str, Any]:
    manifest = load_manifest(src)
    check_identity(manifest, wanted)
    problems = mf.verify_tree(src, manifest, hash_files=False)
    if problems:
        raise ar.ArchiveError(f"src {src} does not match its manifest: {_problems_text(problems)}")
    key = ar.archive_key(identity_from_manifest(manifest))
    msha = mf.manifest_sha256(manifest)
    if store is None:
        return _result(False, None, key=key, manifest_sha256=msha, msg="no store configured: the build stays local",
                       swept=swept, **_signature_fields(False, False, None))
    if not store.writable:
        raise StoreError(f"store {store.url} is read-only (http): it cannot receive builds")
    canonical = mf.canonical_manifest(manifest)
    sig_key = key + ar.SIG_SUFFIX
    info = store.head(key)
    if info is not None and info.sha256 and info.manifest_sha256 == msha:
        problems = mf.verify_tree(src, manifest)
        if problems:
            raise ar.ArchiveError(f"src {src} does not match its manifest: {_problems_text(problems)}")
        changed = False
        sig: Optional[bytes] = None
        if ours is not None and signing_key:
            sig = store.get_small(sig_key)
            try:
                ar.verify_manifest(canonical, sig, [ours], f"archive {key}")
            except ar.SignatureError:
                changed = True  # not signed, or not by this key: sign it
                sig = None if check_mode else ar.sign_manifest(canonical, signing_key)
                if sig is not None:
                    store.put_small(sig_key, sig)
        if not check_mode:
            _record(src, manifest, store, info.key, info.sha256, info.size, msha, sig,
                    ours.fingerprint if ours and sig else None)
        return _result(changed, store, key=key, sha256=info.sha256, size=info.size, manifest_sha256=msha, swept=swept,
                       diff={"before": _state(info), "after": _state(info)},
                       **_signature_fields(ours is not None, False, ours.fingerprint if ours else None))
    before = _state(info)
    if check_mode:
        return _result(True, store, key=key, sha256=None, size=None, manifest_sha256=msha,
                       diff={"before": before, "after": {"key": key, "sha256": "(computed on upload)", "size": None}},
                       **_signature_fields(ours is not None, False, ours.fingerprint if ours else None))
    # signed first: a key that cannot sign fails before the upload
    sig = ar.sign_manifest(canonical, signing_key) if ours is not None and signing_key else None
    # next to src by default: /tmp is a small tmpfs on Flatcar, /opt has the room
    workdir = fsutil.make_staging(src, "push", parent=tmp_dir)
    try:
        path = os.path.join(workdir, "build.tar.gz")
        sha, size = ar.pack_tree(src, manifest, path, level)
        store.upload(path, key, sha, msha, size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if sig is not None:
        store.put_small(sig_key, sig)
    elif info is not None:
        store.delete(sig_key)  # the replaced build's signature does not sign this one
    _record(src, manifest, store, key, sha, size, msha, sig, ours.fingerprint if ours else None)
    after = {"key": key, "sha256": sha, "size": size}
    return _result(True, store, key=key, sha256=sha, size=size, manifest_sha256=msha, swept=swept,
                   diff={"before": before, "after": after},
                   **_signature_fields(sig is not None, False, ours.fingerprint if ours else None))


def _record(tree: str, manifest: dict[str, Any], store: Store, key: str, sha: Optional[str],
            size: Optional[int], msha: str, signature: Optional[bytes] = None,
            signer_key: Optional[str] = None) -> None:
    """Write the archive's checksum (and signature) into the local manifest (only when it changes).
    A signature already recorded for the same archive is kept when none is given."""
    section: dict[str, Any] = {"store": store.url, "key": key, "sha256": sha, "size": size, "manifest_sha256": msha}
    old = manifest.get("archive") or {}
    if signature is None and all(old.get(k) == section[k] for k in ("key", "sha256", "manifest_sha256")):
        signature = old.get("signature").encode("ascii") if isinstance(old.get("signature"), str) else None
        signer_key = old.get("signer_key") if signature else None
    if signature is not None:
        section.update(signature=signature.decode("ascii", "replace"), signer_key=signer_key)
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


def _local_signer(local: dict[str, Any], trusted: list[ar.PublicKey]) -> Optional[str]:
    """The fingerprint of the trusted key whose signature the local build records, or None."""
    section = local.get("archive") or {}
    sig = section.get("signature")
    if local.get("imported") == "legacy" or not isinstance(sig, str):
        return None
    try:
        return ar.verify_manifest(mf.canonical_manifest(local), sig.encode("ascii", "replace"), trusted, "dest")
    except ar.SignatureError:
        return None


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
         legacy: bool = False, remote_check: bool = True, check_mode: bool = False,
         trusted_keys: Optional[list[str]] = None) -> dict[str, Any]:
    """Make ``dest`` hold the verified build ``ident`` from the store.

    With ``trusted_keys`` only a build whose packed manifest carries a ``modulus-build`` signature by
    one of them is accepted (also the one already in ``dest``); without, the result says
    ``authenticated: false``."""
    trusted = ar.load_trusted_keys(trusted_keys) if trusted_keys else None
    if trusted:
        ar.ssh_keygen()  # fail before any request when it is missing
    key = ar.archive_key(ident)
    local = _local_match(dest, ident)
    local_state = None
    local_fp = _local_signer(local, trusted) if local is not None and trusted else None
    unauthenticated = trusted is not None and local is not None and local_fp is None

    def kept(msg: str, **kw: Any) -> dict[str, Any]:
        """The result when dest keeps the verified build it holds (only called when it does)."""
        state = local_state or {"key": None, "sha256": None, "size": None}
        return _result(False, store, key=state["key"] or key, sha256=state["sha256"], dest=dest,
                       legacy=(local or {}).get("imported") == "legacy", msg=msg,
                       diff={"before": state, "after": state}, swept=[] if check_mode else _sweep_if_idle(dest),
                       **_signature_fields(True if local_fp else None, bool(local_fp), local_fp), **kw)

    if local is not None:
        section = local.get("archive") or {}
        local_state = {"key": section.get("key"), "sha256": section.get("sha256"), "size": section.get("size")}
        if (store is None or not remote_check) and not unauthenticated:
            return kept("dest already holds this build (verified)")
    if store is None:
        raise ar.ArchiveError(f"dest {dest} does not hold a verified{' and trusted' if trusted else ''} build of {key}"
                              " and no store is configured")
    try:
        if local is not None and local.get("imported") == "legacy" and (local.get("archive") or {}).get("key"):
            info = store.head(local["archive"]["key"])
            if info is not None:
                info.legacy = True
        else:
            info = find_remote(store, ident, channel, legacy)
    except StoreError as exc:
        if local is None or unauthenticated:
            raise
        # the verified local build stays in use: a store outage must not break a converged host
        return kept("dest already holds this build (verified); the store could not be checked", remote_error=str(exc))
    if local is not None and (info is None or (info.sha256 and info.sha256 == local_state["sha256"])
                              or (not info.sha256 and info.size == local_state["size"])):
        if unauthenticated:
            # the same archive: its signature in the store is enough, nothing to download again
            if info is None or info.legacy:
                raise ar.SignatureError(f"dest {dest} holds {'a legacy' if info else 'an unsigned'} build of {key}"
                                        " that no trusted key signed: refused (trusted_keys is set)")
            sig = store.get_small(info.key + ar.SIG_SUFFIX)
            local_fp = ar.verify_manifest(mf.canonical_manifest(local), sig, trusted or [], f"archive {info.key}")
            if not check_mode:
                with fsutil.dest_lock(dest):
                    now = _local_match(dest, ident)  # another run may have replaced dest meanwhile
                    if now is not None and mf.manifest_sha256(now) == mf.manifest_sha256(local):
                        _record(dest, now, store, info.key, info.sha256, info.size,
                                now.get("archive", {}).get("manifest_sha256") or mf.manifest_sha256(now), sig, local_fp)
        return kept("dest already holds this build (verified)%s" % ("; not in the store" if info is None else ""),
                    in_store=info is not None)
    if info is None:
        raise StoreError("store {} has no archive for {}{}".format(
            store.url, key, " (nor the original tool's {})".format(ar.legacy_key(
                str(ident.get("os_version")), channel, str(ident.get("driver")), str(ident.get("driver_version"))))
            if legacy and channel else ""))
    if trusted and info.legacy:
        raise ar.SignatureError(f"archive {info.key} is in the original tool's layout and carries no signature:"
                                " refused (trusted_keys is set)")
    before = local_state or _dest_state(dest)
    if check_mode:
        return _result(True, store, key=info.key, sha256=info.sha256, size=info.size, dest=dest, legacy=info.legacy,
                       diff={"before": before, "after": _state(info)}, **_signature_fields(None, False, None))
    with fsutil.dest_lock(dest):
        swept = _sweep(dest)
        now = _local_match(dest, ident)  # a run that held the lock before us may have pulled it
        now_sha = ((now or {}).get("archive") or {}).get("sha256")
        if now is not None and info.sha256 and now_sha == info.sha256 and (not trusted or _local_signer(now, trusted)):
            section = now.get("archive") or {}
            signer = _local_signer(now, trusted) if trusted else None
            return _result(False, store, key=info.key, sha256=now_sha, size=section.get("size"), dest=dest,
                           legacy=info.legacy, msg="another run pulled this build meanwhile", swept=swept,
                           diff={"before": before, "after": _state(info)},
                           **_signature_fields(True if signer else None, bool(signer), signer))
        res = _download(dest, store, ident, channel, info, trusted)
    res.update(diff={"before": before, "after": {"key": info.key, "sha256": res["sha256"], "size": res["size"]}},
               swept=swept)
    return res


def _download(dest: str, store: Store, ident: dict[str, Optional[str]], channel: Optional[str], info: ObjectInfo,
              trusted: Optional[list[ar.PublicKey]]) -> dict[str, Any]:
    """Download, verify and install the archive ``info`` into ``dest`` (holding dest's lock)."""
    sig = store.get_small(info.key + ar.SIG_SUFFIX) if trusted else None
    if trusted and sig is None:
        raise ar.SignatureError(f"archive {info.key} in {store.url} is not signed (no {info.key}{ar.SIG_SUFFIX}):"
                                " refused (trusted_keys is set)")
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
        signers: list[str] = []

        def check_packed(packed: bytes) -> None:
            """Before anything inside is looked at: the metadata and the signature name these bytes."""
            digest = hashlib.sha256(packed).hexdigest()
            if info.manifest_sha256 and info.manifest_sha256 != digest:
                raise ar.ArchiveError(f"archive {info.key} in {store.url}: its manifest has sha256 {digest} but the"
                                      f" object's manifest-sha256 metadata says {info.manifest_sha256}: refusing it")
            if trusted:
                signers.append(ar.verify_manifest(packed, sig, trusted, f"archive {info.key}", workdir=work))

        manifest, packed = _extract(tmp, staging, info, ident, channel, check_packed)
        os.unlink(tmp)
        msha = hashlib.sha256(packed).hexdigest() if packed is not None else mf.manifest_sha256(manifest)
        signer = signers[0] if signers else None
        manifest["archive"] = {"store": store.url, "key": info.key, "sha256": sha, "size": size, "manifest_sha256": msha}
        if signer:
            manifest["archive"].update(signature=(sig or b"").decode("ascii", "replace"), signer_key=signer)
        mf.write_manifest(staging, manifest)
        try:
            fsutil.swap_into_place(staging, dest)
        except fsutil.UnsafePathError as exc:
            raise ar.ArchiveError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result(True, store, key=info.key, sha256=sha, size=size, dest=dest, legacy=info.legacy,
                   **_signature_fields(True if signer else None, bool(signer), signer))


def _extract(archive_path: str, staging: str, info: ObjectInfo, ident: dict[str, Optional[str]],
             channel: Optional[str], check_packed: Optional[Callable[[bytes], None]] = None,
             ) -> tuple[dict[str, Any], Optional[bytes]]:
    """Extract a downloaded archive into ``staging`` and check it: ``check_packed`` (metadata, signature)
    on the packed manifest's bytes first, then the manifest, identity, every file and every module.
    Returns the manifest and the packed manifest's bytes (None for a legacy import)."""
    if info.legacy:
        root = ar.find_legacy_root(archive_path, str(ident.get("driver")), str(ident.get("driver_version")))
        written = ar.extract_archive(archive_path, staging, root)
        return ar.legacy_manifest(staging, written, ident, str(channel), info.key), None
    written = ar.extract_archive(archive_path, staging)
    if written.pop(mf.MANIFEST_NAME, None) is None:
        raise ar.ArchiveError(f"archive {info.key} holds no {mf.MANIFEST_NAME}")
    with open(os.path.join(staging, mf.MANIFEST_NAME), "rb") as handle:
        packed = handle.read()
    if check_packed is not None:
        check_packed(packed)
    manifest = load_manifest(staging)
    try:
        check_identity(manifest, {k: v for k, v in ident.items() if v is not None})
    except ar.ArchiveError as exc:
        raise ar.ArchiveError(f"archive {info.key} holds another build: {exc}") from None
    problems = mf.compare_files(written, manifest)
    if problems:
        raise ar.ArchiveError(f"archive {info.key} does not match its manifest: {_problems_text(problems)}")
    files = [rel for rel, meta in written.items() if "sha256" in meta]
    ar.check_modules(staging, files, str(manifest.get("kernel_release")), f"archive {info.key}")
    return manifest, packed


def query(store: Optional[Store], ident: dict[str, Optional[str]], channel: Optional[str] = None,
          legacy: bool = False) -> dict[str, Any]:
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
        store.delete(key + ar.SIG_SUFFIX)
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


def held(store: Optional[Store], ident: dict[str, Optional[str]], owner: str, token: str, ttl: float,
         job_file: str, check_mode: bool = False) -> dict[str, Any]:
    """Renew the fleet lock ``owner`` took (``token``) for as long as the async job of ``job_file`` runs
    (``_archive.hold``). Result ``lock``: ``job`` (finished, gone, orphaned), ``lost``, ``renewals``."""
    from ansible_collections.modulus.kmods.plugins.module_utils._archive import hold as hd

    key = ar.archive_key(ident)
    watch = hd.watch_job(job_file)  # checks the job's name first
    if store is None or not store.supports_lock or check_mode:
        nothing = {"job": None, "lost": False, "renewals": 0, "holder": None,
                   "key": None if store is None else ar.lease_key(key)}
        return _result(False, store, key=key, lock=nothing)
    lkey = ar.lease_key(key)
    res = hd.hold(store, lkey, owner, token, ttl, watch, parent_alive=hd.parent_watch())
    res.update(key=lkey, owner=owner)
    return _result(False, store, key=key, lock=res)


def unlock(store: Optional[Store], ident: dict[str, Optional[str]], owner: str,
           check_mode: bool = False, token: Optional[str] = None) -> dict[str, Any]:
    key = ar.archive_key(ident)
    lkey = ar.lease_key(key)
    if store is None:
        return _result(False, None, key=key, lock={"released": False, "holder": None, "key": None})
    if not store.supports_lock:
        raise StoreError(f"store {store.url} is read-only (http): it holds no lock")
    if check_mode:
        seen = ls.inspect(store, lkey)
        mine = ls.ours(seen["holder"] or {}, owner, token)
        return _result(mine, store, key=key, lock={"released": False, "holder": seen["holder"], "key": lkey})
    res = ls.release(store, lkey, owner, token)
    res["key"] = lkey
    return _result(bool(res["released"]), store, key=key, lock=res)
