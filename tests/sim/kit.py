"""The Flatcar simulation kit: Flatcar-shaped developer containers, a release server and host roots.

Everything is built from real parts (debootstrap of Debian bookworm with the real headers of a
Debian kernel ABI, GPT + ext4 in Flatcar's exact developer container format, bzip2, an OpenPGP
signature by a throwaway key) and cached under ``$MODULUS_SIM_CACHE`` (default
``/var/cache/modulus-sim``), keyed by a hash of the recipe, so a rerun takes seconds.

See ``tests/sim/README.md`` for the layout of what is built and served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

# Bump when anything that changes the built artifacts changes (it is part of the cache key).
KIT_RECIPE_VERSION = 3

DEFAULT_CACHE = "/var/cache/modulus-sim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"

# What a Kbuild build of out-of-tree modules (NVIDIA included) needs inside the container, and
# openssl/libssl3 so the kernel's scripts/sign-file runs. linux-headers-<kver> is added per release.
BASE_PACKAGES = (
    "gcc",
    "make",
    "libc6-dev",
    "libelf-dev",
    "kmod",
    "bc",
    "xz-utils",
    "bzip2",
    "ca-certificates",
    "openssl",
    "libssl3",
    "patch",
    "pkg-config",
)

ROOT_TYPE_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ROOT_PARTITION_NUMBER = 9
ROOT_START_SECTOR = 4096
ROOT_OFFSET = ROOT_START_SECTOR * 512  # 2097152, where Flatcar puts partition 9 ROOT
ROOT_FS_SIZE = 3 * 1024**3
DISK_SIZE = ROOT_OFFSET + ROOT_FS_SIZE + 1024**2  # room for the backup GPT at the end

FLATCAR_APPID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
IMAGE_NAME = "flatcar_developer_container.bin.bz2"
LEGACY_IMAGE_NAME = "coreos_developer_container.bin.bz2"
USR_A_PARTUUID = "7130c94a-213a-4e5a-8e26-6cce9662f132"
USR_B_PARTUUID = "e03dd35c-7c2d-4a47-b3fe-27f15780a57c"
FLATCAR_UPDATE_SERVER = "https://public.update.flatcar-linux.net/v1/update/"
COREOS_UPDATE_SERVER = "https://public.update.core-os.net/v1/update/"

UPDATE_STATES = ("idle", "need_reboot", "need_reboot_zero", "downloading", "absent")

Log = Callable[[str], None]


class KitError(RuntimeError):
    """A step of the kit build failed (the message names the step and shows the tool's output)."""


def _default_log(msg: str) -> None:
    print(f"[sim] {msg}", file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The kit cache directory: the argument, else $MODULUS_SIM_CACHE, else /var/cache/modulus-sim."""
    if cache_dir is None:
        cache_dir = os.environ.get("MODULUS_SIM_CACHE") or DEFAULT_CACHE
    return Path(cache_dir).resolve()


def _run(cmd: list[str], what: str, *, env: dict[str, str] | None = None, log_file: Path | None = None,
         timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; raise KitError naming the step with the output tail when it fails."""
    full_env = dict(os.environ)
    full_env.setdefault("LC_ALL", "C")
    if env:
        full_env.update(env)
    if log_file is not None:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  text=True, env=full_env, timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise KitError(f"{what} failed (rc={proc.returncode}, log {log_file}):\n{tail}")
        return proc
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, text=True, env=full_env,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise KitError(f"{what} failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                       f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _symlink(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(target)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/self/mountinfo."""
    prefix = str(path.resolve()) if path.exists() else str(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix.rstrip("/") + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def umount_below(path: Path) -> None:
    """Unmount whatever a failed debootstrap may have left mounted in its target (proc, sys, dev)."""
    for mnt in mounts_below(path):
        subprocess.run(["umount", mnt], capture_output=True, check=False)
    left = mounts_below(path)
    for mnt in left:
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    if mounts_below(path):
        raise KitError(f"cannot unmount {', '.join(mounts_below(path))}: refusing to delete {path}")


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        umount_below(path)  # never recurse into a mounted /proc, /sys or /dev of a chroot
        shutil.rmtree(path)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock, so two processes building the same cache wait for each other."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Recipe and result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSpec:
    """A made-up Flatcar release on a real Debian kernel ABI."""

    name: str  # "current" or "pending"
    version: str
    kernel: str
    board: str = "amd64-usr"
    channel: str = "stable"


DEFAULT_RELEASES = (
    ReleaseSpec("current", "9001.1.0", "6.1.0-47-amd64"),
    ReleaseSpec("pending", "9001.2.0", "6.1.0-50-amd64"),
)


def board_arch(board: str) -> str:
    """Flatcar board name to the architecture name bincache uses (amd64-usr -> amd64)."""
    return board[:-4] if board.endswith("-usr") else board


def flatcar_release_text(version: str, board: str) -> str:
    """/usr/share/flatcar/release, exactly as Flatcar writes it."""
    return (f"FLATCAR_RELEASE_VERSION={version}\n"
            f"FLATCAR_RELEASE_BOARD={board}\n"
            f"FLATCAR_RELEASE_APPID={FLATCAR_APPID}\n")


def coreos_release_text(version: str, board: str) -> str:
    """/usr/share/coreos/release of legacy CoreOS Container Linux."""
    return f"COREOS_RELEASE_VERSION={version}\nCOREOS_RELEASE_BOARD={board}\n"


def flatcar_os_release_text(version: str, board: str) -> str:
    """/usr/lib/os-release of a Flatcar release."""
    return (
        'NAME="Flatcar Container Linux by Kinvolk"\n'
        "ID=flatcar\n"
        "ID_LIKE=coreos\n"
        f"VERSION={version}\n"
        f"VERSION_ID={version}\n"
        f"BUILD_ID=sim-{version}\n"
        "SYSEXT_LEVEL=1.0\n"
        f'PRETTY_NAME="Flatcar Container Linux by Kinvolk {version} (Simulated)"\n'
        'ANSI_COLOR="38;5;75"\n'
        'HOME_URL="https://flatcar.org/"\n'
        'BUG_REPORT_URL="https://issues.flatcar.org"\n'
        f'FLATCAR_BOARD="{board}"\n'
        f'CPE_NAME="cpe:2.3:o:flatcar-linux:flatcar_linux:{version}:*:*:*:*:*:*:*"\n'
    )


def coreos_os_release_text(version: str, board: str) -> str:
    """/usr/lib/os-release of legacy CoreOS Container Linux."""
    return (
        "NAME=\"Container Linux by CoreOS\"\n"
        "ID=coreos\n"
        f"VERSION={version}\n"
        f"VERSION_ID={version}\n"
        f"BUILD_ID=sim-{version}\n"
        f'PRETTY_NAME="Container Linux by CoreOS {version} (Simulated)"\n'
        'ANSI_COLOR="38;5;75"\n'
        'HOME_URL="https://coreos.com/"\n'
        f'COREOS_BOARD="{board}"\n'
    )


def version_txt_text(version: str) -> str:
    """version.txt as the Flatcar release server publishes it beside each release's artifacts."""
    build, branch, patch = (version.split(".") + ["0", "0"])[:3]
    return (f"FLATCAR_BUILD={build}\n"
            f"FLATCAR_BRANCH={branch}\n"
            f"FLATCAR_PATCH={patch}\n"
            f"FLATCAR_VERSION={version}\n"
            f"FLATCAR_VERSION_ID={version}\n"
            f'FLATCAR_BUILD_ID="sim-{version}"\n'
            f"FLATCAR_SDK_VERSION={build}.0.0\n")


@dataclass
class SimKey:
    """A throwaway OpenPGP key (primary key certifies, a subkey signs, like Flatcar's)."""

    gnupghome: Path
    public_armored: Path
    fingerprint: str  # primary key fingerprint
    signing_fingerprint: str  # signing subkey fingerprint

    def sign(self, path: Path, out: Path | None = None, armor: bool = False, clearsign: bool = False) -> Path:
        """Detach-sign ``path`` (binary .sig by default), or clear-sign it."""
        if clearsign:
            out = out or path.with_name(path.name + ".asc")
            args = ["--clearsign"]
        else:
            out = out or path.with_name(path.name + (".asc" if armor else ".sig"))
            args = ["--detach-sign"] + (["--armor"] if armor else [])
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            _run(["gpg", "--homedir", str(self.gnupghome), "--batch", "--yes", "--quiet", "--pinentry-mode",
                  "loopback", "--passphrase", "", "--local-user", f"{self.signing_fingerprint}!", *args, "-o", str(tmp),
                  str(path)], f"signing {path}")
            os.replace(tmp, out)
        finally:
            self.close()  # no gpg-agent left running after a signature
            if tmp.exists():
                tmp.unlink()
        return out

    def close(self) -> None:
        """Stop the gpg-agent that signing started for this key's private home."""
        subprocess.run(["gpgconf", "--homedir", str(self.gnupghome), "--kill", "all"], capture_output=True,
                       check=False)

    def verify(self, path: Path, sig: Path) -> bool:
        """Verify a detached signature against this key only (a fresh private keyring)."""
        with tempfile.TemporaryDirectory(prefix="sim-gpgv-") as home:
            os.chmod(home, 0o700)
            kr = Path(home) / "trusted.gpg"
            _run(["gpg", "--homedir", home, "--batch", "--quiet", "--no-default-keyring", "--keyring", str(kr),
                  "--import", str(self.public_armored)], "importing the kit key")
            proc = subprocess.run(["gpgv", "--homedir", home, "--keyring", str(kr), str(sig), str(path)],
                                  capture_output=True, text=True, check=False)
            return proc.returncode == 0

    @classmethod
    def load(cls, directory: Path) -> SimKey:
        meta = json.loads((directory / "key.json").read_text(encoding="utf-8"))
        return cls(gnupghome=directory / "gnupg", public_armored=directory / "public.asc",
                   fingerprint=meta["fingerprint"], signing_fingerprint=meta["signing_fingerprint"])

    @classmethod
    def generate(cls, directory: Path, uid: str, log: Log) -> SimKey:
        """Generate the key into ``directory`` (built in a temp dir, renamed when complete)."""
        if (directory / "key.json").is_file():
            return cls.load(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            home = tmp / "gnupg"
            home.mkdir(mode=0o700)
            base = ["gpg", "--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback",
                    "--passphrase", ""]
            log(f"generating throwaway signing key {uid!r}")
            _run(base + ["--quick-gen-key", uid, "rsa3072", "cert", "never"], "gpg --quick-gen-key")
            fpr = _primary_fingerprint(home)
            _run(base + ["--quick-add-key", fpr, "rsa3072", "sign", "never"], "gpg --quick-add-key")
            sub = _signing_subkey_fingerprint(home)
            _run(["gpg", "--homedir", str(home), "--batch", "--armor", "--output", str(tmp / "public.asc"),
                  "--export", fpr], "gpg --export")
            (tmp / "key.json").write_text(json.dumps({"uid": uid, "fingerprint": fpr, "signing_fingerprint": sub}),
                                          encoding="utf-8")
            # the gpg-agent started for the private home must not outlive the build
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)
            os.rename(tmp, directory)
        except BaseException:
            subprocess.run(["gpgconf", "--homedir", str(tmp / "gnupg"), "--kill", "all"], capture_output=True,
                           check=False)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.load(directory)


def _gpg_colons(home: Path) -> list[list[str]]:
    out = _run(["gpg", "--homedir", str(home), "--batch", "--with-colons", "--fingerprint", "--fingerprint",
                "--list-secret-keys"], "gpg --list-secret-keys").stdout
    return [line.split(":") for line in out.splitlines()]


def _primary_fingerprint(home: Path) -> str:
    rows = _gpg_colons(home)
    for i, row in enumerate(rows):
        if row[0] == "sec":
            for nxt in rows[i + 1:]:
                if nxt[0] == "fpr":
                    return nxt[9]
    raise KitError("no primary key found after gpg --quick-gen-key")


def _signing_subkey_fingerprint(home: Path) -> str:
    rows = _gpg_colons(home)
    for i, row in enumerate(rows):
        if row[0] == "ssb" and "s" in row[11]:
            for nxt in rows[i + 1:]:
                if nxt[0] == "fpr":
                    return nxt[9]
    raise KitError("no signing subkey found after gpg --quick-add-key")


@dataclass
class SimRelease:
    """One simulated Flatcar release and its built artifacts (all under the kit cache)."""

    name: str
    version: str
    kernel: str
    board: str
    channel: str
    directory: Path  # the release folder as served: image, .sig, version.txt, DIGESTS
    image_bz2: Path
    image_sig: Path
    image_raw: Path  # uncompressed sparse GPT image (read-only use: never modify it)
    version_txt: Path
    digests: Path
    digests_asc: Path
    image_sha256: str = ""
    image_size: int = 0

    @property
    def arch(self) -> str:
        return board_arch(self.board)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def recipe(specs: Iterable[ReleaseSpec], mirror: str) -> dict[str, object]:
    return {
        "kit_recipe_version": KIT_RECIPE_VERSION,
        "suite": SUITE,
        "mirror": mirror,
        "packages": list(BASE_PACKAGES),
        "root_offset": ROOT_OFFSET,
        "root_fs_size": ROOT_FS_SIZE,
        "disk_size": DISK_SIZE,
        "releases": [[s.name, s.version, s.kernel, s.board, s.channel] for s in specs],
    }


def recipe_hash(rec: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def _deterministic_uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "modulus-sim:" + ":".join(parts)))


def debootstrap_rootfs(spec: ReleaseSpec, dest: Path, debs_cache: Path, mirror: str, log: Log,
                       log_file: Path) -> None:
    """debootstrap bookworm (minbase) with the build toolchain and the kernel's headers into dest."""
    debs_cache.mkdir(parents=True, exist_ok=True)
    include = ",".join([*BASE_PACKAGES, f"linux-headers-{spec.kernel}"])
    log(f"debootstrap {SUITE} for {spec.name} {spec.version} (kernel {spec.kernel}) -> {dest} (log {log_file})")
    t0 = time.monotonic()
    try:
        _run(["debootstrap", "--variant=minbase", f"--include={include}", f"--cache-dir={debs_cache}",
              "--components=main", SUITE, str(dest), mirror],
             f"debootstrap of the {spec.name} release ({spec.kernel})", log_file=log_file, timeout=3600)
    finally:
        umount_below(dest)
    log(f"debootstrap for {spec.kernel} done in {time.monotonic() - t0:.0f} s")


def customize_rootfs(rootfs: Path, spec: ReleaseSpec) -> None:
    """Make a debootstrapped Debian tree look like a Flatcar developer container of ``spec``."""
    build = rootfs / "usr/lib/modules" / spec.kernel / "build"
    if build.is_symlink():  # Debian's absolute symlink, resolved inside the tree
        target = os.readlink(build)
        build = rootfs / target.lstrip("/") if target.startswith("/") else build.parent / target
    if not (build / "Makefile").is_file() or not (build / "Module.symvers").is_file():
        raise KitError(f"{build} (Debian's headers symlink) is missing or incomplete after debootstrap")
    share = rootfs / "usr/share"
    _write(share / "flatcar/release", flatcar_release_text(spec.version, spec.board))
    _symlink("flatcar", share / "coreos")
    _write(rootfs / "usr/lib/os-release", flatcar_os_release_text(spec.version, spec.board))
    _symlink("../usr/lib/os-release", rootfs / "etc/os-release")
    _write(rootfs / "etc/hostname", "localhost\n")
    # keep it small: no package caches, lists or documentation
    for rel in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
                "usr/share/locale", "usr/share/lintian", "var/cache/debconf/templates.dat-old", "var/log"):
        p = rootfs / rel
        if p.is_dir() and not p.is_symlink():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif p.exists():
            p.unlink()


def make_gpt_image(rootfs: Path, out: Path, spec: ReleaseSpec, log: Log, log_file: Path) -> None:
    """Flatcar's developer container disk: GPT, partitions 1-8 absent, 9 = ROOT (ext4) at 2 MiB. Sparse."""
    log(f"making GPT image {out.name} for {spec.version} (ext4 ROOT at {ROOT_OFFSET}, {ROOT_FS_SIZE >> 20} MiB)")
    t0 = time.monotonic()
    if out.exists():
        out.unlink()
    with open(out, "wb") as fh:
        fh.truncate(DISK_SIZE)
    sectors = ROOT_FS_SIZE // 512
    _run(["sgdisk", "-Z", "-U", _deterministic_uuid("disk", spec.version),
          "-n", f"{ROOT_PARTITION_NUMBER}:{ROOT_START_SECTOR}:+{sectors}",
          "-c", f"{ROOT_PARTITION_NUMBER}:ROOT", "-t", f"{ROOT_PARTITION_NUMBER}:{ROOT_TYPE_GUID}",
          "-u", f"{ROOT_PARTITION_NUMBER}:{_deterministic_uuid('root', spec.version)}", str(out)],
         "sgdisk (GPT with partition 9 ROOT)", log_file=log_file)
    blocks = ROOT_FS_SIZE // 4096
    _run(["mkfs.ext4", "-q", "-F", "-L", "ROOT", "-b", "4096", "-U", _deterministic_uuid("rootfs", spec.version),
          "-d", str(rootfs), "-E", f"offset={ROOT_OFFSET},nodiscard,root_owner=0:0", str(out), str(blocks)],
         "mkfs.ext4 -d (ROOT filesystem)", log_file=log_file, env={"E2FSPROGS_FAKE_TIME": "1764000000"})
    _run(["sgdisk", "-v", str(out)], "sgdisk -v (GPT check)", log_file=log_file)
    log(f"image {out.name} for {spec.version} done in {time.monotonic() - t0:.0f} s "
        f"({out.stat().st_blocks * 512 >> 20} MiB allocated of {DISK_SIZE >> 20} MiB)")


def compress(src: Path, dest: Path, log: Log) -> None:
    """bzip2 with lbzip2 (both cores) when present, bzip2 otherwise; temp file + rename."""
    tool = shutil.which("lbzip2")
    cmd = [tool, "-9", "-c", str(src)] if tool else ["bzip2", "-9", "-c", str(src)]
    log(f"compressing {src.name} with {Path(cmd[0]).name}")
    t0 = time.monotonic()
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise KitError(f"{cmd[0]} of {src} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"compressed {dest.name}: {dest.stat().st_size >> 20} MiB in {time.monotonic() - t0:.0f} s")


def write_digests(path: Path, key: SimKey) -> tuple[Path, Path]:
    """<file>.DIGESTS (MD5/SHA1/SHA512 blocks, Flatcar's format) and the clear-signed <file>.DIGESTS.asc."""
    hs = {"MD5": hashlib.md5(), "SHA1": hashlib.sha1(), "SHA512": hashlib.sha512()}  # noqa: S324 (format)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for h in hs.values():
                h.update(chunk)
    text = "".join(f"# {name} HASH\n{h.hexdigest()}  {path.name}\n" for name, h in hs.items())
    digests = path.with_name(path.name + ".DIGESTS")
    _write(digests, text)
    asc = key.sign(digests, clearsign=True)
    return digests, asc


@dataclass
class Kit:
    """The built kit. Use ``Kit.build()``; everything lives under ``root`` in the cache."""

    cache_dir: Path
    root: Path
    recipe_hash: str
    releases: dict[str, SimRelease]
    key: SimKey
    other_key: SimKey  # a second throwaway key that signed nothing (for "wrong key" tests)
    log: Log = field(default=_default_log, repr=False)

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def build(cls, cache_dir: str | os.PathLike[str] | None = None, *, log: Log | None = None,
              releases: Iterable[ReleaseSpec] = DEFAULT_RELEASES, mirror: str | None = None) -> Kit:
        """Build (or load from the cache) both releases' developer containers, signed by the kit key."""
        log = log or _default_log
        specs = tuple(releases)
        mirror = mirror or os.environ.get("MODULUS_SIM_MIRROR") or DEFAULT_MIRROR
        cache = cache_root(cache_dir)
        rec = recipe(specs, mirror)
        digest = recipe_hash(rec)
        root = cache / f"kit-{digest}"
        manifest = root / "kit.json"
        if manifest.is_file():
            kit = cls._load(cache, root, log)
            if kit is not None:
                return kit
        check_build_requirements()
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with _locked(cache / f".kit-{digest}.lock"):
            if manifest.is_file():  # another process finished it while we waited
                kit = cls._load(cache, root, log)
                if kit is not None:
                    return kit
            log(f"building the simulation kit {digest} in {root}")
            root.mkdir(parents=True, exist_ok=True)
            (root / "recipe.json").write_text(json.dumps(rec, indent=2, sort_keys=True), encoding="utf-8")
            key = SimKey.generate(root / "key", "Modulus Simulated Flatcar Buildbot <buildbot@sim.modulus.invalid>",
                                  log)
            SimKey.generate(root / "other-key", "Someone Else <other@sim.modulus.invalid>", log)
            try:
                _build_releases(specs, root, cache, mirror, key, log)
            finally:
                key.close()
            _write(manifest, json.dumps({"recipe_hash": digest, "releases": [s.name for s in specs],
                                         "specs": rec["releases"], "built": int(time.time())}, indent=2))
            log(f"simulation kit {digest} built in {time.monotonic() - t0:.0f} s")
        kit = cls._load(cache, root, log)
        if kit is None:
            raise KitError(f"kit {root} is incomplete right after building it")
        return kit

    @classmethod
    def _load(cls, cache: Path, root: Path, log: Log) -> Optional[Kit]:
        try:
            meta = json.loads((root / "kit.json").read_text(encoding="utf-8"))
            releases: dict[str, SimRelease] = {}
            for name, version, kernel, board, channel in meta["specs"]:
                d = root / "releases" / version
                info = json.loads((d / "release.json").read_text(encoding="utf-8"))
                rel = SimRelease(name=name, version=version, kernel=kernel, board=board, channel=channel,
                                 directory=d, image_bz2=d / IMAGE_NAME, image_sig=d / f"{IMAGE_NAME}.sig",
                                 image_raw=d / "flatcar_developer_container.bin", version_txt=d / "version.txt",
                                 digests=d / f"{IMAGE_NAME}.DIGESTS", digests_asc=d / f"{IMAGE_NAME}.DIGESTS.asc",
                                 image_sha256=info["bz2_sha256"], image_size=info["bz2_size"])
                for p in (rel.image_bz2, rel.image_sig, rel.image_raw, rel.version_txt, rel.digests, rel.digests_asc):
                    if not p.is_file():
                        log(f"kit cache {root}: {p} is missing, rebuilding")
                        return None
                if rel.image_bz2.stat().st_size != rel.image_size:
                    log(f"kit cache {root}: {rel.image_bz2} changed size, rebuilding")
                    return None
                releases[name] = rel
            return cls(cache_dir=cache, root=root, recipe_hash=meta["recipe_hash"], releases=releases,
                       key=SimKey.load(root / "key"), other_key=SimKey.load(root / "other-key"), log=log)
        except (OSError, KeyError, ValueError) as exc:
            log(f"kit cache {root} unreadable ({exc}), rebuilding")
            return None

    # ---- serving ----------------------------------------------------------------------------

    def serve(self, *, current: str | None = None, channel_versions: Iterable[str] | None = None) -> ReleaseServer:
        """An HTTP release server on 127.0.0.1 (ephemeral port); use as a context manager.

        ``current``: the version the ``current`` alias points to (default: the newest release).
        ``channel_versions``: versions published on the channel host (default: all); the bincache
        layout always has every release.
        """
        rels = list(self.releases.values())
        newest = max(rels, key=lambda r: tuple(int(x) for x in r.version.split("."))).version
        return ReleaseServer(rels, current=current or newest,
                             channel_versions=set(channel_versions) if channel_versions is not None else None)

    # ---- host roots -------------------------------------------------------------------------

    def host_root(self, tmp: str | os.PathLike[str], update: str = "idle", legacy: bool = False, *,
                  etc_update_conf: dict[str, str] | str | None = None, group: str | None = None,
                  server: str | None = None, booted: str = "A", release: str = "current",
                  usr_fs: str | None = None, gpu: bool = False) -> Path:
        """A directory laid out like a Flatcar (or legacy CoreOS) host's / for the modules to read.

        ``usr_fs``: the file system of the USR partitions, ``btrfs`` (Flatcar since July 2021, the
        default) or ``ext2`` (older Flatcar and CoreOS releases, the default with ``legacy``).
        ``gpu``: an NVIDIA GPU on the host (sim.nvidia_service).
        See tests/sim/README.md for every file. Returns the new root (a fresh directory under ``tmp``).
        """
        cur = self.releases[release]
        pend = self.releases.get("pending", cur)
        return make_host_root(Path(tmp), current=cur, pending=pend, update=update, legacy=legacy,
                              etc_update_conf=etc_update_conf, group=group, server=server, booted=booted,
                              usr_fs=usr_fs or ("ext2" if legacy else "btrfs"), gpu=gpu)


RELEASE_FILES = (IMAGE_NAME, f"{IMAGE_NAME}.sig", f"{IMAGE_NAME}.DIGESTS", f"{IMAGE_NAME}.DIGESTS.asc", "version.txt",
                 "flatcar_developer_container.bin")


def release_complete(directory: Path) -> bool:
    """A built release folder has every artifact, and the .bz2 has the size recorded when it was built."""
    try:
        info = json.loads((directory / "release.json").read_text(encoding="utf-8"))
        return (all((directory / n).is_file() for n in RELEASE_FILES)
                and (directory / IMAGE_NAME).stat().st_size == info["bz2_size"])
    except (OSError, KeyError, ValueError):
        return False


BUILD_TOOLS = {  # command -> Debian package
    "debootstrap": "debootstrap",
    "sgdisk": "gdisk",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.btrfs": "btrfs-progs",
    "gpg": "gnupg",
    "gpgv": "gpgv",
    "gpgconf": "gpgconf",
    "bzip2": "bzip2",
}


def check_build_requirements() -> None:
    """Fail early, naming what is missing, when the kit cannot be built here."""
    if os.geteuid() != 0:
        raise KitError("building the simulation kit needs root (debootstrap, mkfs.ext4 -d with ownership); "
                       "run as root or point MODULUS_SIM_CACHE at an already built kit")
    missing = sorted({pkg for cmd, pkg in BUILD_TOOLS.items() if shutil.which(cmd) is None})
    if missing:
        raise KitError(f"missing tools to build the simulation kit: install the Debian packages {' '.join(missing)}")


def prune(cache_dir: str | os.PathLike[str] | None = None, keep: Iterable[str] = (), log: Log | None = None) -> list[Path]:
    """Remove kit-<hash> directories of other recipes (not ``keep``) from the cache; return them."""
    log = log or _default_log
    cache = cache_root(cache_dir)
    removed = []
    for d in sorted(cache.glob("kit-*")):
        digest = d.name[4:]
        if not d.is_dir() or digest in set(keep):
            continue
        with _locked(cache / f".kit-{digest}.lock"):
            log(f"removing old kit {d}")
            _rmtree(d)
        (cache / f".kit-{digest}.lock").unlink(missing_ok=True)
        removed.append(d)
    return removed


def _build_releases(specs: tuple[ReleaseSpec, ...], root: Path, cache: Path, mirror: str, key: SimKey,
                    log: Log) -> None:
    """Build every release not yet complete. Compression and signing of one release overlap the
    debootstrap of the next (at most two heavy jobs at once)."""
    (root / "releases").mkdir(exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    debs = cache / "debs"
    keep_rootfs = os.environ.get("MODULUS_SIM_KEEP_ROOTFS") == "1"
    pending_jobs: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-finish") as pool:
        try:
            for spec in specs:
                final = root / "releases" / spec.version
                if release_complete(final):
                    log(f"release {spec.version} already built")
                    continue
                work = root / "work" / spec.version
                work.mkdir(parents=True, exist_ok=True)
                log_file = root / "logs" / f"{spec.version}.log"
                rootfs = root / "rootfs" / spec.version
                if not (rootfs / "usr/share/flatcar/release").is_file():
                    _rmtree(rootfs)
                    tmp_rootfs = root / "rootfs" / f".{spec.version}.tmp"
                    _rmtree(tmp_rootfs)
                    tmp_rootfs.parent.mkdir(parents=True, exist_ok=True)
                    debootstrap_rootfs(spec, tmp_rootfs, debs, mirror, log, log_file)
                    customize_rootfs(tmp_rootfs, spec)
                    os.rename(tmp_rootfs, rootfs)
                raw = work / "flatcar_developer_container.bin"
                make_gpt_image(rootfs, raw, spec, log, log_file)
                pending_jobs.append(pool.submit(_finish_release, spec, work, final, rootfs, key, log, keep_rootfs))
            for job in pending_jobs:
                job.result()
        except BaseException:
            for job in pending_jobs:
                job.cancel()
            raise
    with contextlib.suppress(OSError):
        (root / "work").rmdir()
    with contextlib.suppress(OSError):
        (root / "rootfs").rmdir()


def _finish_release(spec: ReleaseSpec, work: Path, final: Path, rootfs: Path, key: SimKey, log: Log,
                    keep_rootfs: bool) -> None:
    raw = work / "flatcar_developer_container.bin"
    bz2 = work / IMAGE_NAME
    compress(raw, bz2, log)
    sig = key.sign(bz2)
    if not key.verify(bz2, sig):  # fail closed: never publish an image whose signature does not verify
        raise KitError(f"the signature just made for {bz2} does not verify with {key.public_armored}")
    write_digests(bz2, key)
    _write(work / "version.txt", version_txt_text(spec.version))
    _write(work / "release.json", json.dumps({
        "name": spec.name, "version": spec.version, "kernel": spec.kernel, "board": spec.board,
        "channel": spec.channel, "bz2_sha256": sha256_file(bz2), "bz2_size": bz2.stat().st_size,
        "raw_size": raw.stat().st_size, "signing_key": key.fingerprint}, indent=2))
    _rmtree(final)
    os.rename(work, final)
    log(f"release {spec.version} ready in {final}")
    if not keep_rootfs:
        _rmtree(rootfs)


# --------------------------------------------------------------------------------------------
# The release server
# --------------------------------------------------------------------------------------------


@dataclass
class _Fault:
    kind: str  # "status" or "cut"
    match: str
    status: int = 404
    nbytes: int = 0
    times: Optional[int] = None  # None = forever
    owner: Optional[ReleaseServer] = field(default=None, repr=False)

    def remove(self) -> None:
        if self.owner is not None:
            self.owner._remove_fault(self)

    def __enter__(self) -> _Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ReleaseServer:
    """Flatcar's release server layout on 127.0.0.1 (see tests/sim/README.md)."""

    def __init__(self, releases: list[SimRelease], current: str, channel_versions: set[str] | None) -> None:
        self._releases = {r.version: r for r in releases}
        self._current = current
        self._channel_versions = channel_versions
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._extra: dict[str, bytes | Path] = {}  # add_file(): URL path -> content or file
        self.hits: list[str] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        # when set, each request is also appended to this file as a JSON line, before it is answered
        self.request_log: Optional[Path] = None
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # lifecycle
    def start(self) -> ReleaseServer:
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sim-release-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> ReleaseServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("release server is not running (use it as a context manager)")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_template(self) -> str:
        """Channel host template: '{base}/{channel}/{board}/{version}' with base filled in."""
        return self.base_url + "/{channel}/{board}/{version}"

    @property
    def bincache_template(self) -> str:
        """bincache fallback template: '{base}/bincache/images/{arch}/{version}' with base filled in."""
        return self.base_url + "/bincache/images/{arch}/{version}"

    def release_url(self, version: str, channel: str = "stable", board: str = "amd64-usr",
                    name: str = IMAGE_NAME) -> str:
        return f"{self.base_url}/{channel}/{board}/{version}/{name}"

    # fault injection
    def fail_paths(self, status: int, prefix: str, times: int | None = None) -> _Fault:
        """Answer ``status`` (and no body) for every path starting with ``prefix`` (``times`` times, or forever)."""
        f = _Fault("status", prefix, status=status, times=times, owner=self)
        with self._lock:
            self._faults.append(f)
        return f

    def cut_after(self, path_substr: str, nbytes: int, times: int = 1) -> _Fault:
        """For paths containing ``path_substr``: send the full Content-Length header, then close the
        connection after ``nbytes`` bytes of body, ``times`` times."""
        f = _Fault("cut", path_substr, nbytes=nbytes, times=times, owner=self)
        with self._lock:
            self._faults.append(f)
        return f

    # extra files
    def add_file(self, url_path: str, data: bytes | Path) -> str:
        """Serve ``data`` (bytes, or the file at that Path, read when requested) at ``url_path``
        (e.g. ``/keys/refreshed.asc``), with HEAD, Range and the faults like every file; ``reset()``
        removes it. Returns its full URL."""
        if not url_path.startswith("/") or "?" in url_path:
            raise ValueError(f"url_path {url_path!r} must be an absolute URL path without a query")
        with self._lock:
            self._extra[url_path] = data if isinstance(data, Path) else bytes(data)
        return self.base_url + url_path

    def remove_file(self, url_path: str) -> None:
        with self._lock:
            self._extra.pop(url_path, None)

    def _extra_file(self, path: str) -> bytes | Path | None:
        with self._lock:
            return self._extra.get(path)

    def reset(self) -> None:
        """Forget every fault, every recorded hit and every file added with add_file()."""
        with self._lock:
            self._faults.clear()
            self._extra.clear()
            self.hits.clear()
            self.requests.clear()

    def _remove_fault(self, fault: _Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def _take_fault(self, path: str) -> Optional[_Fault]:
        with self._lock:
            for f in self._faults:
                hit = path.startswith(f.match) if f.kind == "status" else f.match in path
                if not hit:
                    continue
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        self._faults.remove(f)
                return f
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.hits.append(path)
            self.requests.append((method, path, status))
            if self.request_log is not None:
                with open(self.request_log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"method": method, "path": path, "status": status}) + "\n")

    # routing
    def resolve(self, path: str) -> Optional[Path]:
        """The file served for a URL path, or None (404)."""
        parts = [p for p in path.split("/") if p]
        if len(parts) == 5 and parts[0] == "bincache" and parts[1] == "images":
            _, _, arch, version, name = parts
            rel = self._releases.get(version)
            if rel is None or rel.arch != arch:
                return None
        elif len(parts) == 4:
            channel, board, version, name = parts
            if version == "current":
                version = self._current
            rel = self._releases.get(version)
            if rel is None or rel.channel != channel or rel.board != board:
                return None
            if self._channel_versions is not None and version not in self._channel_versions:
                return None
        else:
            return None
        if name.startswith("coreos_developer_container.bin.bz2"):
            name = IMAGE_NAME + name[len(LEGACY_IMAGE_NAME):]
        allowed = {IMAGE_NAME, f"{IMAGE_NAME}.sig", f"{IMAGE_NAME}.DIGESTS", f"{IMAGE_NAME}.DIGESTS.asc",
                   "version.txt"}
        if name not in allowed:
            return None
        return rel.directory / name


def _parse_range(header: str, size: int) -> Optional[tuple[int, int]]:
    """'bytes=a-b' / 'bytes=a-' / 'bytes=-n' -> (start, end inclusive); None if unsatisfiable."""
    if not header.startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    first, _, last = spec.partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def _make_handler(server: ReleaseServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "modulus-sim-release-server/1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
            return

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            method = "GET" if body else "HEAD"
            fault = server._take_fault(path)
            if fault is not None and fault.kind == "status":
                server._record(method, path, fault.status)
                self._empty(fault.status)
                return
            extra = server._extra_file(path)
            if isinstance(extra, bytes):
                ctype = "text/plain" if path.endswith((".txt", ".asc")) else "application/octet-stream"
                self._send(method, path, body, fault, extra, None, ctype, None)
                return
            target = extra if extra is not None else server.resolve(path)
            if target is None or not target.is_file():
                server._record(method, path, 404)
                self._empty(HTTPStatus.NOT_FOUND)
                return
            ctype = "text/plain" if target.name.endswith((".txt", ".DIGESTS", ".asc")) else "application/octet-stream"
            self._send(method, path, body, fault, None, target, ctype, int(target.stat().st_mtime))

        def _send(self, method: str, path: str, body: bool, fault: Optional[_Fault], data: bytes | None,
                  target: Path | None, ctype: str, mtime: int | None) -> None:
            """Answer with ``data`` or the file ``target`` (Range, Content-Length, a cut fault)."""
            size = len(data) if data is not None else target.stat().st_size
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range")
            if rng:
                parsed = _parse_range(rng, size)
                if parsed is None:
                    server._record(method, path, 416)
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = parsed
                status = 206
            length = end - start + 1 if size else 0
            server._record(method, path, status)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if mtime is not None:
                self.send_header("Last-Modified", self.date_time_string(mtime))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            limit = length if fault is None else min(length, fault.nbytes)
            try:
                self.wfile.flush()
                if limit > 0 and data is not None:
                    self.wfile.write(data[start:start + limit])
                    self.wfile.flush()
                elif limit > 0:
                    with open(target, "rb") as fh:  # zero-copy: leave the CPU to the client under test
                        self.connection.sendfile(fh, start, limit)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            if fault is not None:  # the cut: drop the connection mid-body
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


# --------------------------------------------------------------------------------------------
# Host roots
# --------------------------------------------------------------------------------------------

_STATUS = {
    # state: (CURRENT_OP, new version is pending?, PROGRESS)
    "idle": ("UPDATE_STATUS_IDLE", False, "0.000000"),
    "need_reboot": ("UPDATE_STATUS_UPDATED_NEED_REBOOT", True, "0.000000"),
    "need_reboot_zero": ("UPDATE_STATUS_UPDATED_NEED_REBOOT", False, "0.000000"),
    "downloading": ("UPDATE_STATUS_DOWNLOADING", True, "0.420000"),
}


def update_engine_status_text(update: str, pending_version: str, new_size: int, checked: int) -> str:
    """The stdout of ``update_engine_client -status`` for a state (the real format and order)."""
    op, has_version, progress = _STATUS[update]
    new_version = pending_version if has_version else "0.0.0"
    size = new_size if has_version else 0
    return (f"LAST_CHECKED_TIME={checked}\n"
            f"PROGRESS={progress}\n"
            f"CURRENT_OP={op}\n"
            f"NEW_VERSION={new_version}\n"
            f"NEW_SIZE={size}\n")


def update_engine_client_script(status_text: str, calls_log: Path) -> str:
    return f"""#!/bin/sh
# Simulated update_engine_client (modulus Flatcar simulation kit): answers -status like the real one.
echo "$*" >> '{calls_log}' 2>/dev/null || true
case " $* " in
  *" -status "*|*" --status "*|*" -status=true "*|*" --status=true "*)
    printf 'I%s %s update_engine_client.cc:245] Querying Update Engine status...\\n' \\
      "$(date -u +%m%d)" "$(date -u +%H:%M:%S.000000)" >&2
    cat <<'EOF'
{status_text}EOF
    exit 0 ;;
  *)
    echo "update_engine_client (simulated): only -status is supported, got: $*" >&2
    exit 1 ;;
esac
"""


USR_PARTITION_SIZE = 16 * 1024**2  # sparse; mkfs.btrfs --mixed fits a small tree in 16 MiB


def _usr_partition_image(path: Path, label: str, version: str | None, board: str, legacy: bool,
                         kernel: str | None = None, fs: str = "btrfs") -> None:
    """A small image file of a /usr partition: btrfs as Flatcar formats it since 2021
    (``mkfs.btrfs --mixed -m single -d single`` as build_library/disk_util does, filled with
    ``--rootdir``, no mount), or ext2 as releases before that (``fs="ext2"``), with its release files
    and its kernel's module directory ``lib/modules/<kernel>/`` (with an index). A partition never
    written (``version=None``) is all zeros: Flatcar leaves USR-B unformatted until the first update."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(USR_PARTITION_SIZE)
    if version is None:
        return
    with tempfile.TemporaryDirectory(prefix="sim-usr-") as d:
        tree = Path(d)
        if kernel is not None:
            moddir = tree / "lib/modules" / kernel
            _write(moddir / "modules.dep", "")
            _write(moddir / "modules.builtin", "")
            (moddir / "kernel").mkdir(parents=True, exist_ok=True)
        if legacy:
            _write(tree / "lib/os-release", coreos_os_release_text(version, board))
            _write(tree / "share/coreos/release", coreos_release_text(version, board))
        else:
            _write(tree / "lib/os-release", flatcar_os_release_text(version, board))
            _write(tree / "share/flatcar/release", flatcar_release_text(version, board))
            _symlink("flatcar", tree / "share/coreos")
        if fs == "btrfs":
            _run(["mkfs.btrfs", "-q", "-f", "-L", label, "--mixed", "-m", "single", "-d", "single",
                  "--rootdir", str(tree), str(path)], f"mkfs.btrfs of the simulated {label} partition")
        elif fs == "ext2":
            _run(["mkfs.ext2", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", str(tree), str(path)],
                 f"mkfs.ext2 of the simulated {label} partition")
        else:
            raise ValueError(f"usr_fs must be 'btrfs' or 'ext2', got {fs!r}")


def _kv(d: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in d.items())


def make_host_root(tmp: Path, *, current: SimRelease, pending: SimRelease, update: str = "idle",
                   legacy: bool = False, etc_update_conf: dict[str, str] | str | None = None,
                   group: str | None = None, server: str | None = None, booted: str = "A",
                   usr_fs: str = "btrfs", gpu: bool = False) -> Path:
    """Lay out a Flatcar (or legacy CoreOS) host root under a new directory in ``tmp``."""
    if update not in UPDATE_STATES:
        raise ValueError(f"update must be one of {', '.join(UPDATE_STATES)}, got {update!r}")
    if booted not in ("A", "B"):
        raise ValueError(f"booted must be 'A' or 'B', got {booted!r}")
    tmp.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hostroot-", dir=tmp))
    os.chmod(root, 0o755)
    version, board = current.version, current.board
    grp = group or current.channel
    if legacy:
        share = root / "usr/share/coreos"
        _write(share / "release", coreos_release_text(version, board))
        _write(share / "update.conf", _kv({"GROUP": grp, "SERVER": server or COREOS_UPDATE_SERVER}))
        _write(root / "usr/lib/os-release", coreos_os_release_text(version, board))
        etc_dir = root / "etc/coreos"
    else:
        share = root / "usr/share/flatcar"
        _write(share / "release", flatcar_release_text(version, board))
        _write(share / "update.conf", _kv({"GROUP": grp, "SERVER": server or FLATCAR_UPDATE_SERVER}))
        _symlink("flatcar", root / "usr/share/coreos")
        _write(root / "usr/lib/os-release", flatcar_os_release_text(version, board))
        etc_dir = root / "etc/flatcar"
        etc_dir.mkdir(parents=True, exist_ok=True)
        _symlink("flatcar", root / "etc/coreos")
    _symlink("../usr/lib/os-release", root / "etc/os-release")
    if etc_update_conf is not None:
        text = etc_update_conf if isinstance(etc_update_conf, str) else _kv(etc_update_conf)
        _write(etc_dir / "update.conf", text)
    (root / "usr/lib/modules" / current.kernel).mkdir(parents=True, exist_ok=True)
    _write(root / "proc/sys/kernel/osrelease", current.kernel + "\n")
    # who the machine is: systemd writes a random machine ID at the first boot; a Flatcar host that no
    # DHCP server or cloud names is "localhost" (Flatcar ships no /etc/hostname)
    _write(root / "etc/machine-id", uuid.uuid4().hex + "\n", mode=0o444)
    _write(root / "proc/sys/kernel/hostname", "localhost\n")

    # the two /usr partitions and the kernel command line naming the booted one
    written = update in ("need_reboot", "need_reboot_zero")
    other_version = pending.version if written else None
    booted_uuid, other_uuid = (USR_A_PARTUUID, USR_B_PARTUUID) if booted == "A" else (USR_B_PARTUUID, USR_A_PARTUUID)
    booted_label, other_label = ("USR-A", "USR-B") if booted == "A" else ("USR-B", "USR-A")
    by_label = root / "dev/disk/by-partlabel"
    _usr_partition_image(by_label / booted_label, booted_label, version, board, legacy, current.kernel, usr_fs)
    _usr_partition_image(by_label / other_label, other_label, other_version, pending.board, legacy,
                         pending.kernel if written else None, usr_fs)
    _symlink(f"../by-partlabel/{booted_label}", root / "dev/disk/by-partuuid" / booted_uuid)
    _symlink(f"../by-partlabel/{other_label}", root / "dev/disk/by-partuuid" / other_uuid)
    prefix = "coreos" if legacy else "flatcar"
    _write(root / "proc/cmdline",
           f"BOOT_IMAGE=/{prefix}/vmlinuz-{booted.lower()} mount.usr=/dev/mapper/usr "
           f"verity.usr=PARTUUID={booted_uuid} rootflags=rw mount.usrflags=ro consoleblank=0 root=LABEL=ROOT "
           f"console=ttyS0,115200n8 {prefix}.oem.id=qemu\n")

    if update != "absent":
        status = update_engine_status_text(update, pending.version, 486539264, int(time.time()) - 60)
        calls = root / "run/update_engine_client.calls"
        calls.parent.mkdir(parents=True, exist_ok=True)
        _write(root / "usr/bin/update_engine_client", update_engine_client_script(status, calls), mode=0o755)
    if not legacy:  # every Flatcar image enables nvidia.service (x11-drivers/nvidia-drivers-service)
        from sim import nvidia_service

        nvidia_service.install(root)
        if gpu:
            nvidia_service.simulate_gpu(root)
    return root
