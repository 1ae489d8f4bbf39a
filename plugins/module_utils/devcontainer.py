# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What coreos_devcontainer does: resolve the release, fetch/verify/cache (or remove) the developer
container image, introspect it, prune the cache and optionally run a command in it.

The pieces have their own owners: imagecache (cache entries, metadata, lock, prune), imageinfo
(reading an image with debugfs), container (running a command in an image), fetch (the streaming
verified download)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils import fetch as fetchmod
from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr
from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log
from ansible_collections.modulus.kmods.plugins.module_utils.container import RUN_METHODS, run_in_image
from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import (
    FLATCAR_KEY_FINGERPRINT,
    FLATCAR_SIGNING_KEY,
)
from ansible_collections.modulus.kmods.plugins.module_utils.identity import check_board, check_os_version
from ansible_collections.modulus.kmods.plugins.module_utils.imagecache import (
    IMAGE_FILE,
    LEGACY_IMAGE_FILE,
    CacheEntry,
    cached_ok,
    cached_versions,
    image_lock,
    prune,
    remove_entry,
    write_metadata,
)
from ansible_collections.modulus.kmods.plugins.module_utils.imageinfo import ImageInfo, image_info, version_key
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import (
    Keyring,
    OpenPGPError,
    load_key_material,
    normalize_fingerprint,
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
        return result
    if meta is None:
        os.makedirs(entry.directory, exist_ok=True)
        with image_lock(entry.image_path, exclusive=True):
            meta = cached_ok(entry, fingerprints or None)  # another run may have fetched it meanwhile
            if meta is None:
                if os.path.lexists(entry.metadata_path):
                    os.unlink(entry.metadata_path)
                try:
                    with Keyring(key_material(req), fingerprints or None,
                                 tmp_dir=os.path.dirname(entry.directory)) as keyring:
                        fetched = fetchmod.fetch_image(
                            candidates, p["image_name"], entry.image_path, keyring, timeout=req.timeout,
                            retries=req.retries, retry_delay=req.retry_delay, validate_certs=req.validate_certs,
                            min_free_space=req.min_free_space, space_factor=req.space_factor,
                            decompressor=req.decompressor, progress_interval=req.progress_interval, log=log)
                except OpenPGPError as exc:
                    _cleanup_empty(entry)
                    raise RequestError(f"verify_key: {exc}") from exc
                except BaseException:
                    _cleanup_empty(entry)
                    raise
                try:
                    info = image_info(entry.image_path)
                    problem = _mismatch(info, resolved.version, p["board"])
                    if problem:
                        raise DevcontainerError(f"{fetched.url} is signed but {problem}: removed it")
                    meta = write_metadata(entry, {
                        "verified": True, "url": fetched.url, "sig_url": fetched.sig_url,
                        "fingerprint": fetched.primary_fingerprint, "signing_fingerprint": fetched.signing_fingerprint,
                        "compressed_size": fetched.compressed_size, "compressed_sha256": fetched.compressed_sha256,
                        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "kernel_releases": info.kernel_releases, "channel": p["channel"],
                    })
                except BaseException:
                    # an image without its metadata would never count as cached: do not keep it around
                    shutil.rmtree(entry.directory, ignore_errors=True)
                    raise
                result.update({"changed": True, "fetch": {
                    "duration": round(fetched.duration, 3), "attempts": fetched.attempts,
                    "decompressor": fetched.decompressor, "source": fetched.source, "tried": fetched.tried,
                    "compressed_size": fetched.compressed_size, "disk_used": fetched.disk_used}})
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
                           method=req.run_method, log=log)
        result.update({"changed": True, "rc": run.rc, "stdout_tail": run.output_tail, "log_path": run.log_path,
                       "timed_out": run.timed_out, "run_method": run.method, "run_duration": round(run.duration, 3)})
    return result


def _mismatch(info: ImageInfo, version: str, board: str) -> Optional[str]:
    if info.version and info.version != version:
        return f"its release file says version {info.version}, not {version}"
    if info.board and info.board != board:
        return f"its release file says board {info.board}, not {board}"
    return None


def _cleanup_empty(entry: CacheEntry) -> None:
    """After a failed first fetch leave no trace: drop the empty version directory."""
    if os.path.exists(entry.image_path):
        return
    with contextlib.suppress(OSError):
        os.rmdir(entry.directory)
