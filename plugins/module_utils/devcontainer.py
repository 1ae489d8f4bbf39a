# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What coreos_devcontainer does: resolve the release, fetch/verify/cache (or remove) the developer
container image, introspect it, prune the cache and optionally run a command in it.

The pieces have their own owners: imagecache (cache entries, metadata, lock, prune), imageinfo
(reading an image with debugfs), container (running a command in an image), fetch (the streaming
verified download)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils import fetch as fetchmod
from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr
from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log
from ansible_collections.modulus.kmods.plugins.module_utils.container import RUN_METHODS, run_in_image, sweep_workspaces
from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import (
    FLATCAR_KEY_FINGERPRINT,
    FLATCAR_KEY_URL,
    FLATCAR_SIGNING_KEY,
)
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import atomic_write, sweep_stale
from ansible_collections.modulus.kmods.plugins.module_utils.identity import check_board, check_os_version
from ansible_collections.modulus.kmods.plugins.module_utils.imagecache import (
    IMAGE_FILE,
    LEGACY_IMAGE_FILE,
    CacheEntry,
    cached_ok,
    cached_unverified_reason,
    cached_versions,
    image_lock,
    make_entry_staging,
    prune,
    remove_entry,
    replace_entry,
    staged,
    sweep_board,
    write_metadata,
)
from ansible_collections.modulus.kmods.plugins.module_utils.imageinfo import ImageInfo, image_info, version_key
from ansible_collections.modulus.kmods.plugins.module_utils.mounts import RO_PREFIX, sweep_dead_dirs
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import (
    Keyring,
    OpenPGPError,
    load_key_material,
    normalize_fingerprint,
    sweep_homes,
)
from ansible_collections.modulus.kmods.plugins.module_utils.transfer import (
    FetchError,
    fetch_small,
    sweep_partials,
    with_retries,
)

_NAME_RE = re.compile(r"[A-Za-z0-9._+-]+")


class DevcontainerError(RuntimeError):
    """A fetched image is not the one asked for."""


def check_component(option: str, value: str) -> str:
    """A name used in a URL or path: the whole string must be letters, digits, '.', '_', '+', '-'
    (a trailing newline never passes); '.' and '..' are refused."""
    if not isinstance(value, str) or value in (".", "..") or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{option}={value!r} is not a valid name (letters, digits, '.', '_', '+', '-')")
    return value


# --------------------------------------------------------------------------------------------
# the module's whole job: resolve, fetch/verify/cache (or remove), introspect, prune, run

DEFAULT_URL_TEMPLATE = "https://{channel}.release.flatcar-linux.net/{board}/{version}"
DEFAULT_FALLBACK_URL_TEMPLATE = "https://bincache.flatcar-linux.net/images/{arch}/{version}"
DEFAULT_IMAGE_NAME = IMAGE_FILE + ".bz2"
LEGACY_IMAGE_NAME = LEGACY_IMAGE_FILE + ".bz2"
DEFAULT_CACHE_SUBDIR = "var/cache/modulus/devcontainer"
DEFAULT_CHANNEL = "stable"
DEFAULT_KEY_URL = FLATCAR_KEY_URL
KEYS_SUBDIR = "keys"
MAX_KEY_BYTES = 1 << 20
EXPIRY_WARNING_DAYS = 60
_ATOMIC_TMP_RE = re.compile(r"\.(.+)\.tmp-[0-9]+-[^/]+")


@dataclass
class Request:
    release: str = "current"
    state: str = "present"
    channel: Optional[str] = None
    board: Optional[str] = None
    host_root: str = "/"
    update_engine_client: Optional[list[str]] = None
    url_template: str = DEFAULT_URL_TEMPLATE
    mirrors: list[str] = field(default_factory=list)
    fallback_url_template: Optional[str] = DEFAULT_FALLBACK_URL_TEMPLATE
    image_name: Optional[str] = None
    verify_key: Optional[str] = None
    verify_fingerprints: list[str] = field(default_factory=list)
    key_url: Optional[str] = DEFAULT_KEY_URL
    cache_dir: Optional[str] = None
    keep: int = 3
    timeout: float = 60.0
    retries: int = 3
    retry_delay: float = 2.0
    validate_certs: bool = True
    min_free_space: int = 1 << 30
    space_factor: float = 4.0
    decompressor: str = "auto"
    progress_interval: float = 5.0
    command: Optional[list[str]] = None
    binds_ro: list[tuple[str, str]] = field(default_factory=list)
    binds_rw: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: Optional[str] = None
    run_timeout: float = 3600.0
    run_method: str = "auto"
    log_path: Optional[str] = None


class RequestError(ValueError):
    """Bad input; the message names the option and the value."""


def parse_bind(option: str, value: str) -> tuple[str, str]:
    """'SRC:DST' or 'SRC' (same path inside), as systemd-nspawn --bind takes them."""
    text = str(value)
    src, sep, dst = text.partition(":")
    if not sep:
        dst = src
    if not os.path.isabs(src) or not os.path.isabs(dst) or ":" in dst:
        raise RequestError(f"{option} entry {text!r} must be 'HOST_PATH[:CONTAINER_PATH]' with absolute paths")
    return src, dst


def expected_fingerprints(req: Request) -> list[str]:
    if req.verify_fingerprints:
        try:
            return [normalize_fingerprint(f) for f in req.verify_fingerprints]
        except ValueError as exc:
            raise RequestError(f"verify_fingerprint: {exc}") from exc
    if req.verify_key is None:
        return [FLATCAR_KEY_FINGERPRINT]
    try:
        with Keyring(key_material(req)) as keyring:  # every primary key of the given key material
            return list(keyring.primaries)
    except OpenPGPError as exc:
        raise RequestError(f"verify_key: {exc}") from exc


def key_material(req: Request) -> bytes:
    if req.verify_key is None:
        return FLATCAR_SIGNING_KEY.encode("ascii")
    try:
        return load_key_material(req.verify_key)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


def _host_needed(req: Request) -> bool:
    return req.release in ("current", "pending") or not req.board or not req.channel


def plan(req: Request, log: LogFn = no_log) -> dict:
    """Resolve release, board, channel, image name and cache entry (reads host files, no network)."""
    if req.state not in ("present", "absent"):
        raise RequestError(f"state={req.state!r} is not one of present, absent")
    if req.keep < 0:
        raise RequestError(f"keep={req.keep} must be 0 (keep everything) or more")
    if req.decompressor not in ("auto", "lbzip2", "python"):
        raise RequestError(f"decompressor={req.decompressor!r} is not one of auto, lbzip2, python")
    if req.run_method not in RUN_METHODS:
        raise RequestError(f"run_method={req.run_method!r} is not one of {', '.join(RUN_METHODS)}")
    if req.retries < 0 or req.timeout <= 0:
        raise RequestError(f"retries={req.retries} must be >= 0 and timeout={req.timeout} > 0")
    host = None
    if _host_needed(req):
        try:
            host = fr.read_host_release(req.host_root)
        except fr.ReleaseError as exc:
            raise RequestError(f"{exc} (host_root={req.host_root!r}; with an explicit release, "
                               "give board and channel to work without host files)") from exc
    try:
        resolved = fr.resolve_release(req.release, req.host_root, req.update_engine_client, host=host, log=log)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    board = req.board or (host.board if host else None)
    group, group_file = fr.read_group(req.host_root) if host else (None, None)
    if req.channel:
        channel = req.channel
    elif group:
        channel = fr.channel_of_group(group)
    else:
        channel = DEFAULT_CHANNEL
    legacy = bool(host and host.legacy)
    image_name = req.image_name or (LEGACY_IMAGE_NAME if legacy else DEFAULT_IMAGE_NAME)
    if "/" in image_name or not image_name.endswith(".bz2"):
        raise RequestError(f"image_name={image_name!r} must be a file name ending in .bz2")
    try:
        check_board("board", board or "")
        check_os_version("release", resolved.version)
        check_component("channel", channel)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    cache_dir = req.cache_dir or os.path.join(req.host_root or "/", DEFAULT_CACHE_SUBDIR)
    entry = CacheEntry(os.path.abspath(cache_dir), board, resolved.version, image_name[:-len(".bz2")])
    fields = {"channel": channel, "board": board, "version": resolved.version,
              "arch": fr.arch_of_board(board), "group": group or channel}
    return {"resolved": resolved, "host": host, "board": board, "channel": channel, "group": group,
            "group_file": group_file, "legacy": legacy, "image_name": image_name, "entry": entry, "fields": fields}


def _info_dict(info: ImageInfo) -> dict:
    return {"kernel_releases": info.kernel_releases,
            "kernel_release": info.kernel_releases[-1] if info.kernel_releases else None,
            "image_release": info.release, "image_version": info.version, "image_board": info.board,
            "root_offset": info.root_offset, "root_size": info.root_size}


def ensure(req: Request, check_mode: bool = False, log: LogFn = no_log) -> dict:
    """Do what the module asks; return its result dict (without 'failed')."""
    p = plan(req, log)
    resolved = p["resolved"]
    entry: CacheEntry = p["entry"]
    result: dict = {
        "changed": False, "release_version": resolved.version, "pending": resolved.pending,
        "release_source": resolved.source, "board": p["board"], "channel": p["channel"],
        "current_version": resolved.host.version if resolved.host else None,
        "image_path": entry.image_path, "cache_dir": entry.cache_dir,
        "update_status": resolved.update_status.as_dict() if resolved.update_status else None,
    }
    if resolved.usr_partition:
        result["usr_partition"] = resolved.usr_partition
    before = cached_versions(entry.cache_dir, entry.board)
    result["diff"] = {"before": {"versions": before}, "after": {"versions": list(before)}}
    try:
        return _ensure(req, p, result, check_mode, log)
    finally:
        _finish_diff(result, entry, req, check_mode)


def _finish_diff(result: dict, entry: CacheEntry, req: Request, check_mode: bool) -> None:
    after = cached_versions(entry.cache_dir, entry.board)
    if check_mode:
        after = [v for v in result["diff"]["before"]["versions"] if v not in result.get("pruned", [])]
        if req.state == "absent":
            after = [v for v in after if v != entry.version]
        elif entry.version not in after:
            after = sorted(after + [entry.version], key=version_key)
    result["diff"]["after"] = {"versions": after}


def _ensure(req: Request, p: dict, result: dict, check_mode: bool, log: LogFn) -> dict:
    resolved = p["resolved"]
    entry: CacheEntry = p["entry"]
    try:
        candidates = fetchmod.candidate_bases(req.url_template, req.mirrors, req.fallback_url_template, p["fields"])
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    result["urls"] = [c.url(p["image_name"]) for c in candidates]
    result["url"] = result["urls"][0]
    if req.key_url:
        check_key_url(req.key_url)

    if not check_mode:
        swept = sweep_cache(entry.cache_dir, log)
        if swept:
            result["swept"] = swept

    if req.state == "absent":
        result["changed"] = remove_entry(entry, check_mode=check_mode)
        result["image_path"] = None
        return result

    fingerprints = expected_fingerprints(req)
    meta = cached_ok(entry, fingerprints or None)
    if meta is None and check_mode:
        result.update({"changed": True, "cached": False, "would_download": result["url"],
                       "destination": entry.image_path})
        if req.command:
            result["would_run"] = list(req.command)
        _key_expiry(req, fingerprints, None, None, result, log)
        return result
    if meta is None:
        with image_lock(entry.image_path, exclusive=True, create=True):
            sweep_partials(entry.directory, every=True)  # nobody else writes here while we hold the lock
            meta = cached_ok(entry, fingerprints or None)  # another run may have fetched it meanwhile
            if meta is None:
                meta = _fetch_entry(req, p, candidates, fingerprints, result, log)
    if "key_expires" not in result:  # a cached image: the key's expiry, without any network access
        _key_expiry(req, fingerprints, None if check_mode else entry.cache_dir, meta.get("signing_fingerprint"),
                    result, log)
    result["cached"] = not result["changed"]
    result["url"] = meta.get("url", result["url"])
    result["signing_fingerprint"] = meta.get("fingerprint")
    result["compressed_sha256"] = meta.get("compressed_sha256")
    result["image_size"] = meta.get("size")
    result.update(_info_dict(image_info(entry.image_path)))
    protect = tuple(v for v in (resolved.version, result["current_version"]) if v)
    result["pruned"] = prune(entry.cache_dir, p["board"], req.keep, protect=protect, check_mode=check_mode)
    if result["pruned"]:
        result["changed"] = True
    if req.command:
        if check_mode:
            result["would_run"] = list(req.command)
            return result
        log_path = req.log_path or os.path.join(
            entry.cache_dir, "logs", f"run-{resolved.version}-{time.strftime('%Y%m%dT%H%M%S')}.log")
        run = run_in_image(entry.image_path, req.command, binds_ro=req.binds_ro, binds_rw=req.binds_rw,
                           env=req.env, workdir=req.workdir, timeout=req.run_timeout, log_path=log_path,
                           method=req.run_method, log=log, workspace_dir=entry.cache_dir)
        result.update({"changed": True, "rc": run.rc, "stdout_tail": run.output_tail, "log_path": run.log_path,
                       "timed_out": run.timed_out, "run_method": run.method, "run_duration": round(run.duration, 3)})
    return result


def _fetch_entry(req: Request, p: dict, candidates: list, fingerprints: list[str], result: dict, log: LogFn) -> dict:
    """Download, verify and introspect a new copy of the entry in a staging directory beside it,
    then exchange it with the entry in one step. Any failure removes the staging directory and
    leaves the old entry (a verified image and its metadata) exactly as it was."""
    entry: CacheEntry = p["entry"]
    resolved = p["resolved"]
    why = cached_unverified_reason(entry, fingerprints)
    if why:
        log(f"the cached {entry.version} does not count for this run: {why}; fetching a new copy beside it "
            "(the cached one stays unless the new one verifies)")
    staging: Optional[str] = make_entry_staging(entry)
    try:
        target = staged(entry, staging)
        try:
            with open_keyring(req, fingerprints, entry.cache_dir, log) as keyring:
                refresher = KeyRefresher(req, keyring, entry.cache_dir, log)
                fetched = fetchmod.fetch_image(
                    candidates, p["image_name"], target.image_path, keyring, timeout=req.timeout,
                    retries=req.retries, retry_delay=req.retry_delay, validate_certs=req.validate_certs,
                    min_free_space=req.min_free_space, space_factor=req.space_factor,
                    decompressor=req.decompressor, progress_interval=req.progress_interval, log=log,
                    refresh_key=refresher)
                if refresher.done:
                    result["key_refresh"] = refresher.done
                    result.setdefault("warnings", []).append(
                        "{}: fetched a current copy of the key from key_url={} and cached it at {}; consider updating "
                        "the collection or verify_key".format(refresher.done["reason"], refresher.done["url"],
                                                              ", ".join(refresher.done["cached_keys"])))
                _record_expiry(keyring, fetched.signing_fingerprint, result)
        except OpenPGPError as exc:
            raise RequestError(f"verify_key: {exc}") from exc
        info = image_info(target.image_path)
        problem = _mismatch(info, resolved.version, p["board"])
        if problem:
            raise DevcontainerError(f"{fetched.url} is signed but {problem}: not cached")
        meta = write_metadata(target, {
            "verified": True, "url": fetched.url, "sig_url": fetched.sig_url,
            "fingerprint": fetched.primary_fingerprint, "signing_fingerprint": fetched.signing_fingerprint,
            "compressed_size": fetched.compressed_size, "compressed_sha256": fetched.compressed_sha256,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel_releases": info.kernel_releases, "channel": p["channel"],
        })
        replace_entry(staging, entry)
        staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            _cleanup_empty(entry)
    result.update({"changed": True, "fetch": {
        "duration": round(fetched.duration, 3), "attempts": fetched.attempts,
        "decompressor": fetched.decompressor, "source": fetched.source, "tried": fetched.tried,
        "compressed_size": fetched.compressed_size, "disk_used": fetched.disk_used}})
    if why:
        result["fetch"]["replaced"] = why
    return meta


# --------------------------------------------------------------------------------------------
# keys: the pinned key, refreshed copies of it, expiry


def keys_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, KEYS_SUBDIR)


def check_key_url(url: str) -> str:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file") or any(c in url for c in "\n\r\0 "):
        raise RequestError(f"key_url={url!r}: only https://, http:// and file:// URLs are supported (empty disables)")
    return url


@contextlib.contextmanager
def open_keyring(req: Request, fingerprints: list[str], cache_dir: Optional[str], log: LogFn) -> Iterator[Keyring]:
    """The private keyring of this run: ``verify_key`` (or the bundled key), merged with the copies of
    the pinned keys refreshed by earlier runs (``{cache_dir}/keys/<fingerprint>.asc``), if any."""
    with Keyring(key_material(req), fingerprints or None, tmp_dir=cache_dir) as keyring:
        if cache_dir:
            for fpr in list(keyring.expected):
                path = os.path.join(keys_dir(cache_dir), f"{fpr}.asc")
                if not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as handle:
                        keyring.add_key(handle.read(), path)
                except (OSError, OpenPGPError) as exc:
                    log(f"ignored the cached key {path}: {exc}")
        yield keyring


class KeyRefresher:
    """fetch.KeyRefresh for a run: fetch ``key_url``, accept it only if every primary key in it is
    pinned (the expected fingerprints), merge it and cache it for the next runs."""

    def __init__(self, req: Request, keyring: Keyring, cache_dir: str, log: LogFn) -> None:
        self.req = req
        self.keyring = keyring
        self.cache_dir = cache_dir
        self.log = log
        self.done: Optional[dict] = None

    def __call__(self, reason: str) -> None:
        url = self.req.key_url
        if not url:
            raise fetchmod.SignatureError(
                f"{reason}, so gpg reports EXPKEYSIG for the signature; key refresh is disabled (key_url is empty): set "
                f"key_url to the published key ({FLATCAR_KEY_URL}) or a mirror or file:// copy of it, or give a "
                "current key with verify_key", ("EXPKEYSIG",))
        try:
            data = with_retries(lambda: fetch_small(url, self.req.timeout, self.req.validate_certs, MAX_KEY_BYTES),
                                f"fetch {url}", self.req.retries, self.req.retry_delay, self.log)
        except FetchError as exc:
            raise fetchmod.SignatureError(f"{reason} (EXPKEYSIG); fetching a current copy of the key from key_url={url} "
                                          f"failed: {exc}", ("EXPKEYSIG",)) from exc
        try:
            primaries = self.keyring.add_key(data, f"the key from key_url={url}")
        except OpenPGPError as exc:
            raise fetchmod.SignatureError(f"{reason} (EXPKEYSIG); {exc}", ("EXPKEYSIG",)) from exc
        cached = []
        directory = keys_dir(self.cache_dir)
        os.makedirs(directory, exist_ok=True)
        for fpr in primaries:
            path = os.path.join(directory, f"{fpr}.asc")
            atomic_write(path, self.keyring.export_armored(fpr))
            cached.append(path)
        self.done = {"url": url, "fingerprints": primaries, "cached_keys": cached, "reason": reason}
        self.log(f"refreshed the key {', '.join(primaries)} from {url}; cached at {', '.join(cached)}")


def _record_expiry(keyring: Keyring, signing_fingerprint: Optional[str], result: dict) -> None:
    expires = keyring.expiry(signing_fingerprint)
    result["key_expires"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)) if expires else None
    if expires is None:
        return
    left = expires - time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(expires))
    if left <= 0:
        result.setdefault("warnings", []).append(
            f"the signing key in use ({signing_fingerprint or 'its signing subkey'}) expired on {day}: cached images "
            "stay usable; a new download refreshes the key from key_url (or give a current key with verify_key)")
    elif left < EXPIRY_WARNING_DAYS * 86400:
        result.setdefault("warnings", []).append(
            f"the signing key in use ({signing_fingerprint or 'its signing subkey'}) expires on {day} "
            f"(in {int(left // 86400)} days): after that, downloads need a current copy of the key, which key_url "
            "fetches (keep it reachable) or verify_key gives")


def _key_expiry(req: Request, fingerprints: list[str], cache_dir: Optional[str], signing_fingerprint: Optional[str],
                result: dict, log: LogFn) -> None:
    """``key_expires`` (and a warning when it is near) without any network access."""
    try:
        with open_keyring(req, fingerprints, cache_dir if cache_dir and os.path.isdir(cache_dir) else None,
                          log) as keyring:
            _record_expiry(keyring, signing_fingerprint, result)
    except (OpenPGPError, OSError) as exc:
        log(f"could not read the key's expiry: {exc}")


def _sweep_atomic_temps(directory: str) -> list[str]:
    """Temporary files ``.<name>.tmp-<pid>-*`` of atomic writes (the cached keys) of dead runs."""
    try:
        bases = sorted({m.group(1) for m in (_ATOMIC_TMP_RE.fullmatch(n) for n in os.listdir(directory)) if m})
    except OSError:
        return []
    removed: list[str] = []
    for base in bases:
        removed += sweep_stale(directory, base).removed
    return removed


def sweep_cache(cache_dir: str, log: LogFn = no_log) -> list[str]:
    """At the start of a run: remove what killed runs left (their PID is gone) in the cache and in
    TMPDIR: private GNUPGHOMEs, run workspaces (their mounts released first, which frees the loop
    devices), read-only mount directories, staging directories of fetches and ``.partial-*`` files.
    One run sweeps at a time (a non-blocking flock on ``cache_dir``; a busy lock skips the sweep)."""
    if not os.path.isdir(cache_dir):
        return []
    try:
        fd = os.open(cache_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return []
    removed: list[str] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return []
        tmp = tempfile.gettempdir()
        removed += sweep_homes(cache_dir)
        removed += sweep_homes(tmp)
        removed += sweep_workspaces(cache_dir, log)
        removed += sweep_workspaces(tmp, log)
        removed += sweep_dead_dirs(tmp, RO_PREFIX, log)
        for name in sorted(os.listdir(cache_dir)):
            if not name.startswith(".") and name not in (KEYS_SUBDIR, "logs") \
                    and os.path.isdir(os.path.join(cache_dir, name)):
                removed += sweep_board(cache_dir, name)
        removed += _sweep_atomic_temps(keys_dir(cache_dir))
    finally:
        os.close(fd)
    if removed:
        log("removed what killed runs left: " + ", ".join(removed))
    return removed


def _mismatch(info: ImageInfo, version: str, board: str) -> Optional[str]:
    if info.version and info.version != version:
        return f"its release file says version {info.version}, not {version}"
    if info.board and info.board != board:
        return f"its release file says board {info.board}, not {board}"
    return None


def _cleanup_empty(entry: CacheEntry) -> None:
    """After a failed first fetch leave no trace: drop the empty version directory (never one
    that holds anything)."""
    with contextlib.suppress(OSError):
        os.rmdir(entry.directory)
