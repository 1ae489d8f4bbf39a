# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Developer container images: the per board/version cache, introspection without mounting
(debugfs on the ROOT partition) and running a command inside an image without modifying it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import (
    LogFn,
    atomic_write,
    no_log,
    parse_env_file,
    require_tool,
    which,
)
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import root_partition

IMAGE_FILE = "flatcar_developer_container.bin"
LEGACY_IMAGE_FILE = "coreos_developer_container.bin"
METADATA_FILE = "metadata.json"
METADATA_SCHEMA = 1
RELEASE_FILES = (
    "/usr/share/flatcar/release",
    "/usr/share/coreos/release",
    "/usr/lib/os-release",
    "/etc/os-release",
)
MODULE_DIRS = ("/usr/lib/modules", "/lib/modules")
RUN_METHODS = ("auto", "image", "overlay", "chroot")
TAIL_BYTES = 8192
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DevcontainerError(RuntimeError):
    """Running or inspecting a developer container failed."""


# --------------------------------------------------------------------------------------------
# introspection


@dataclass
class ImageInfo:
    kernel_releases: list[str]
    release: dict[str, str]
    version: Optional[str]
    board: Optional[str]
    root_offset: int
    root_size: int


def _debugfs(image_path: str, offset: int, request: str, timeout: float = 60.0) -> str:
    debugfs = require_tool("debugfs")
    spec = f"{image_path}?offset={offset}"
    proc = subprocess.run([debugfs, "-R", request, spec], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise DevcontainerError(f"debugfs -R {request!r} {spec} failed (rc={proc.returncode}): {err}")
    return proc.stdout.decode("utf-8", "replace")


def parse_debugfs_ls(text: str) -> list[tuple[str, int]]:
    """Parse ``debugfs -R 'ls -p DIR'`` output into (name, mode) pairs, without . and .."""
    entries = []
    for line in text.splitlines():
        # /inode/mode/uid/gid/name/size/  (the name may not contain '/')
        parts = line.strip().split("/")
        if len(parts) < 7 or parts[0] != "":
            continue
        try:
            mode = int(parts[2], 8)
        except ValueError:
            continue
        name = parts[5]
        if name in (".", "..", ""):
            continue
        entries.append((name, mode))
    return entries


def _version_key(text: str) -> list:
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"[.\-+~_]", text)]


def kernel_releases_in(image_path: str, offset: int) -> list[str]:
    """Kernel releases under /usr/lib/modules that carry a ``build`` entry (all of them if none do)."""
    for mod_dir in MODULE_DIRS:
        listing = parse_debugfs_ls(_debugfs(image_path, offset, f"ls -p {mod_dir}"))
        dirs = [name for name, mode in listing if (mode & 0o170000) == 0o040000]
        if not dirs:
            continue
        with_build = []
        for name in dirs:
            inner = parse_debugfs_ls(_debugfs(image_path, offset, f"ls -p {mod_dir}/{name}"))
            if any(entry == "build" for entry, _mode in inner):
                with_build.append(name)
        return sorted(with_build or dirs, key=_version_key)
    return []


def release_of(image_path: str, offset: int) -> dict[str, str]:
    """The image's own release file, parsed (Flatcar release first, then os-release)."""
    merged: dict[str, str] = {}
    for path in RELEASE_FILES:
        text = _debugfs(image_path, offset, f"cat {path}")
        values = parse_env_file(text)
        for key, value in values.items():
            merged.setdefault(key, value)
    return merged


def image_info(image_path: str) -> ImageInfo:
    """Kernel releases and release file of a developer container image, read without mounting it."""
    part = root_partition(image_path)
    release = release_of(image_path, part.offset)
    version = (release.get("FLATCAR_RELEASE_VERSION") or release.get("COREOS_RELEASE_VERSION")
               or release.get("VERSION_ID") or None)
    board = release.get("FLATCAR_RELEASE_BOARD") or release.get("COREOS_RELEASE_BOARD") or None
    return ImageInfo(kernel_releases=kernel_releases_in(image_path, part.offset), release=release,
                     version=version, board=board, root_offset=part.offset, root_size=part.size)


# --------------------------------------------------------------------------------------------
# the cache: {cache_dir}/{board}/{version}/{IMAGE_FILE} + metadata.json


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


def check_component(option: str, value: str) -> str:
    """Board and version become path components: refuse anything that could escape the cache."""
    if not value or value in (".", "..") or "/" in value or "\0" in value or not re.match(r"^[A-Za-z0-9._+-]+$", value):
        raise ValueError(f"{option}={value!r} is not a valid name (letters, digits, '.', '_', '+', '-')")
    return value


def read_metadata(entry: CacheEntry) -> Optional[dict]:
    try:
        with open(entry.metadata_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def write_metadata(entry: CacheEntry, values: dict) -> dict:
    st = os.stat(entry.image_path)
    meta = dict(values)
    meta.update({"schema": METADATA_SCHEMA, "image_file": entry.image_name, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "board": entry.board, "version": entry.version})
    atomic_write(entry.metadata_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def cached_versions(cache_dir: str, board: str) -> list[str]:
    """Versions with a directory in the cache for this board, oldest first (by version number)."""
    base = os.path.join(cache_dir, board)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if os.path.isdir(os.path.join(base, n)) and not n.startswith(".")),
                  key=_version_key)


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


# --------------------------------------------------------------------------------------------
# running a command inside an image


@dataclass
class RunResult:
    rc: int
    output_tail: str
    log_path: str
    timed_out: bool
    method: str
    duration: float
    command: list[str] = field(default_factory=list)


def _systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system")


def choose_method(method: str) -> str:
    """Resolve ``auto``: --image needs systemd as PID 1 (and its udev); else overlay+nspawn; else chroot."""
    if method not in RUN_METHODS:
        raise ValueError("method={!r} is not one of {}".format(method, ", ".join(RUN_METHODS)))
    if method != "auto":
        return method
    if which("systemd-nspawn"):
        return "image" if _systemd_booted() else "overlay"
    return "chroot"


def _check_binds(option: str, binds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for item in binds or []:
        if len(item) != 2:
            raise ValueError(f"{option} entry {item!r} is not a (host_path, container_path) pair")
        src, dst = str(item[0]), str(item[1])
        if not os.path.isabs(src) or not os.path.isabs(dst):
            raise ValueError(f"{option} entry {(src, dst)!r}: both paths must be absolute")
        if ":" in src or ":" in dst:
            raise ValueError(f"{option} entry {(src, dst)!r}: paths must not contain ':'")
        if not os.path.exists(src):
            raise ValueError(f"{option} entry {(src, dst)!r}: host path {src} does not exist")
        out.append((src, dst))
    return out


def _check_env(env: Optional[dict[str, str]]) -> dict[str, str]:
    out = {}
    for key, value in (env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
            raise ValueError(f"env key {key!r} is not a valid variable name")
        out[str(key)] = str(value)
    return out


def nspawn_args(root_args: list[str], command: list[str], binds_ro: list[tuple[str, str]],
                binds_rw: list[tuple[str, str]], env: dict[str, str], workdir: Optional[str]) -> list[str]:
    """The systemd-nspawn command line (works without systemd as PID 1 thanks to --keep-unit)."""
    args = [require_tool("systemd-nspawn"), "--keep-unit", "--register=no", "--as-pid2", "--quiet",
            "--console=pipe"] + root_args
    args += ["--bind-ro={}:{}".format(*pair) for pair in binds_ro]
    args += ["--bind={}:{}".format(*pair) for pair in binds_rw]
    args += ["--setenv={}={}".format(*kv) for kv in sorted(env.items())]
    if workdir:
        args.append(f"--chdir={workdir}")
    return args + ["--"] + list(command)


def _run_cmd(args: list[str], what: str, timeout: float = 120.0) -> str:
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise DevcontainerError(f"{what} failed (rc={proc.returncode}): {' '.join(args)}: {err}")
    return proc.stdout.decode("utf-8", "replace").strip()


class MountStack:
    """Mounts and loop devices set up in order and always torn down in reverse (lazy as a last resort)."""

    def __init__(self, log: LogFn = no_log) -> None:
        self.log = log
        self.mounts: list[str] = []
        self.loops: list[str] = []
        self.errors: list[str] = []

    def loop(self, image_path: str, offset: int, size: int) -> str:
        dev = _run_cmd([require_tool("losetup"), "--find", "--show", "--read-only", "--offset", str(offset),
                        "--sizelimit", str(size), image_path], "losetup")
        self.loops.append(dev)
        return dev

    def mount(self, args: list[str], target: str) -> None:
        _run_cmd([require_tool("mount")] + args + [target], "mount")
        self.mounts.append(target)

    def close(self) -> None:
        umount = which("umount") or "umount"
        while self.mounts:
            target = self.mounts.pop()
            ok = False
            for attempt in range(3):
                proc = subprocess.run([umount, target], stdin=subprocess.DEVNULL, capture_output=True,
                                      check=False)
                if proc.returncode == 0:
                    ok = True
                    break
                time.sleep(0.2 * (attempt + 1))
            if not ok:
                proc = subprocess.run([umount, "-l", target], stdin=subprocess.DEVNULL, capture_output=True,
                                      check=False)
                self.errors.append(f"umount {target} was busy; lazily detached (rc={proc.returncode})")
        losetup = which("losetup") or "losetup"
        while self.loops:
            dev = self.loops.pop()
            for attempt in range(5):
                proc = subprocess.run([losetup, "-d", dev], stdin=subprocess.DEVNULL, capture_output=True,
                                      check=False)
                if proc.returncode == 0:
                    break
                time.sleep(0.2 * (attempt + 1))
            else:
                self.errors.append("losetup -d {} failed: {}".format(dev, proc.stderr.decode("utf-8", "replace").strip()))
        for err in self.errors:
            self.log(err)


def _mount_root_overlay(stack: MountStack, image_path: str, offset: int, size: int, workspace: str,
                        scratch_dir: Optional[str]) -> str:
    lower = os.path.join(workspace, "lower")
    rw = os.path.join(workspace, "rw")
    merged = os.path.join(workspace, "merged")
    for path in (lower, rw, merged):
        os.mkdir(path, 0o755)
    dev = stack.loop(image_path, offset, size)
    stack.mount(["-t", "ext4", "-o", "ro,noload", dev], lower)
    if scratch_dir:
        os.chmod(rw, 0o755)
    else:
        stack.mount(["-t", "tmpfs", "-o", "mode=0755", "modulus-devc"], rw)
    os.mkdir(os.path.join(rw, "upper"), 0o755)
    os.mkdir(os.path.join(rw, "work"), 0o755)
    stack.mount(["-t", "overlay", "-o", f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work",
                 "modulus-devc"], merged)
    return merged


def _chroot_prepare(stack: MountStack, merged: str, binds_ro: list[tuple[str, str]],
                    binds_rw: list[tuple[str, str]]) -> None:
    def target_of(inner: str, is_dir: bool) -> str:
        path = os.path.join(merged, inner.lstrip("/"))
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                open(path, "a").close()
        return path

    stack.mount(["-t", "proc", "proc"], target_of("/proc", True))
    stack.mount(["--bind", "/dev"], target_of("/dev", True))
    stack.mount(["-t", "sysfs", "-o", "ro", "sysfs"], target_of("/sys", True))
    for src, dst in binds_ro:
        target = target_of(dst, os.path.isdir(src))
        stack.mount(["--bind", src], target)
        stack.mount(["-o", "remount,bind,ro"], target)
        stack.mounts.pop()  # the remount is the same mount point: unmount it once
    for src, dst in binds_rw:
        stack.mount(["--bind", src], target_of(dst, os.path.isdir(src)))


def _chroot_into(root: str, workdir: str):
    """A preexec function: chroot into ``root`` and change to ``workdir`` (no shell needed in the image)."""

    def enter() -> None:
        os.chroot(root)
        os.chdir(workdir)

    return enter


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4:
                    point = fields[4].replace("\\040", " ")
                    if point == real or point.startswith(real.rstrip("/") + "/"):
                        found.append(point)
    except OSError:
        pass
    return found


def _remove_workspace(workspace: str) -> None:
    """Remove the temporary tree, but never recurse into something still mounted (a rw bind!)."""
    if mounts_under(workspace):
        return
    shutil.rmtree(workspace, ignore_errors=True)


def _tail(path: str, start: int, limit: int = TAIL_BYTES) -> str:
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        handle.seek(max(start, end - limit))
        return handle.read().decode("utf-8", "replace")


def run_in_image(image_path: str, command: list[str], binds_ro: Optional[list[tuple[str, str]]] = None,
                 binds_rw: Optional[list[tuple[str, str]]] = None, env: Optional[dict[str, str]] = None,
                 workdir: Optional[str] = None, timeout: float = 3600.0, log_path: Optional[str] = None,
                 method: str = "auto", log: Optional[LogFn] = None, scratch_dir: Optional[str] = None) -> RunResult:
    """Run ``command`` inside the developer container ``image_path``; the image is never written.

    ``image``: systemd-nspawn --image with --read-only --volatile=overlay (needs systemd as PID 1).
    ``overlay``: ROOT partition loop-mounted read-only, a tmpfs (or ``scratch_dir``) overlay on top,
    systemd-nspawn -D on the merged tree. ``chroot``: the same tree with proc/dev/sys and the binds
    mounted by hand. Every mount, loop device and process is released before returning.
    """
    log = log or no_log
    if not command or not all(isinstance(c, str) for c in command):
        raise ValueError(f"command must be a non-empty list of strings, got {command!r}")
    if timeout is None or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if workdir is not None and not os.path.isabs(workdir):
        raise ValueError(f"workdir={workdir!r} must be an absolute path inside the container")
    binds_ro = _check_binds("binds_ro", binds_ro or [])
    binds_rw = _check_binds("binds_rw", binds_rw or [])
    env = _check_env(env)
    chosen = choose_method(method)
    if not os.path.isfile(image_path):
        raise DevcontainerError(f"image {image_path} does not exist")
    part = root_partition(image_path)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="modulus-devc-", suffix=".log")
        os.close(fd)
    log_dir = os.path.dirname(os.path.abspath(log_path))
    os.makedirs(log_dir, exist_ok=True)

    stack = MountStack(log)
    workspace = tempfile.mkdtemp(prefix="modulus-devc-", dir=scratch_dir)
    started = time.monotonic()
    timed_out = False
    rc = -1
    args: list[str] = []
    with open(log_path, "ab") as log_handle:
        start_offset = log_handle.seek(0, os.SEEK_END)
        try:
            with image_lock(image_path):
                popen_env = None
                preexec = None
                if chosen == "image":
                    args = nspawn_args(["--read-only", "--volatile=overlay", f"--image={image_path}"],
                                       command, binds_ro, binds_rw, env, workdir)
                else:
                    merged = _mount_root_overlay(stack, image_path, part.offset, part.size, workspace,
                                                 scratch_dir)
                    if chosen == "overlay":
                        args = nspawn_args(["-D", merged], command, binds_ro, binds_rw, env, workdir)
                    else:
                        _chroot_prepare(stack, merged, binds_ro, binds_rw)
                        popen_env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
                        popen_env.update(env)
                        args = list(command)
                        preexec = _chroot_into(merged, workdir or "/")
                header = "=== modulus devcontainer run ({}) {}: {}\n".format(
                    chosen, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), " ".join(command))
                log_handle.write(header.encode("utf-8"))
                log_handle.flush()
                log("running in {} ({}): {}".format(os.path.basename(image_path), chosen, " ".join(command)))
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=popen_env,
                                        preexec_fn=preexec)
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    log(f"command timed out after {timeout:.0f} s: killing its process group")
                    _kill_group(proc)
                    rc = proc.returncode if proc.returncode is not None else -9
                except BaseException:
                    _kill_group(proc, grace=2.0)
                    raise
                finally:
                    # stragglers that left the session but stayed in the group
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
        finally:
            stack.close()
            _remove_workspace(workspace)
            took = time.monotonic() - started
            log_handle.write("=== rc={}{} in {:.1f} s\n".format(rc, " (timed out)" if timed_out else "", took).encode("utf-8"))
    if stack.errors:
        raise DevcontainerError("cleanup after the run left problems: {}".format("; ".join(stack.errors)))
    return RunResult(rc=rc, output_tail=_tail(log_path, start_offset), log_path=log_path, timed_out=timed_out,
                     method=chosen, duration=time.monotonic() - started, command=list(command))


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
    from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import FLATCAR_KEY_FINGERPRINT
    from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import normalize_fingerprint

    if req.verify_fingerprints:
        try:
            return [normalize_fingerprint(f) for f in req.verify_fingerprints]
        except ValueError as exc:
            raise RequestError(f"verify_fingerprint: {exc}") from exc
    if req.verify_key is None:
        return [FLATCAR_KEY_FINGERPRINT]
    from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import Keyring, OpenPGPError

    try:
        with Keyring(key_material(req)) as keyring:  # every primary key of the given key material
            return list(keyring.primaries)
    except OpenPGPError as exc:
        raise RequestError(f"verify_key: {exc}") from exc


def key_material(req: Request) -> bytes:
    from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import FLATCAR_SIGNING_KEY
    from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import load_key_material

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
    from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr

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
        check_component("board", board or "")
        check_component("release", resolved.version)
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
            after = sorted(after + [entry.version], key=_version_key)
    result["diff"]["after"] = {"versions": after}


def _ensure(req: Request, p: dict, result: dict, check_mode: bool, log: LogFn) -> dict:
    from ansible_collections.modulus.kmods.plugins.module_utils import fetch as fetchmod
    from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import Keyring, OpenPGPError

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
