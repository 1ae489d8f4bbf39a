# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_install's logic: put a build in service on a host (``present``, ``loaded``, ``staged``,
``absent``) with one of two methods.

- ``sysext`` (Flatcar >= 3185): the build becomes ``<extensions_dir>/modulus-<driver>-<release>.raw``
  (or a directory), bound to that release by its extension-release (``sysext.py``).
- ``tree`` (legacy CoreOS, or when asked): a verified copy in
  ``/opt/modulus/installed/<driver>/<driver_version>/<kernel_release>``, the per-kernel pointer
  ``/opt/modulus/installed/<driver>/by-kernel/<kernel_release>`` and the original tool's
  ``/opt/drivers/<driver>`` symlink (switched atomically), ``/etc/ld.so.conf.d/<driver>.conf``.

Both methods install the boot path: ``/opt/modulus/bin/modulus-load-<driver>`` (``kload.render_script``,
plain sh) run by ``/etc/systemd/system/modulus-load-<driver>.service`` after systemd-sysext, and
``/etc/modprobe.d/modulus-<driver>.conf``. Only ``/etc``, ``/opt`` and ``/var`` below ``host_root`` are written.
State (what was installed when, with which content) is ``/var/lib/modulus/kmod_install/<driver>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr
from ansible_collections.modulus.kmods.plugins.module_utils import kload, sysext
from ansible_collections.modulus.kmods.plugins.module_utils._install import image_format, kmod_sysext
from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log, parse_env_file, which
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import (
    _rename_exchange,
    atomic_write,
    dest_lock,
    make_staging,
    swap_into_place,
    sweep_stale,
    switch_symlink,
    write_json_atomic,
)
from ansible_collections.modulus.kmods.plugins.module_utils.identity import check_name, identity_from_manifest
from ansible_collections.modulus.kmods.plugins.module_utils.manifest import (
    ManifestError,
    load_manifest,
    manifest_sha256,
    verify_tree,
)

STATES = ("present", "loaded", "staged", "absent")
METHODS = ("auto", "sysext", "tree")
SYSEXT_FIRST_RELEASE = 3185  # first Flatcar major with systemd-sysext for user images
INSTALL_ROOT = "/opt/modulus/installed"
DRIVERS_DIR = "/opt/drivers"
BIN_DIR = "/opt/modulus/bin"
STATE_DIR = "/var/lib/modulus/kmod_install"
UNIT_DIR = "/etc/systemd/system"
RETIRED_DIR = ".modulus-retired-images"  # beside the extensions dir: replaced directory images still merged
WRITABLE = ("/etc/", "/opt/", "/var/", "/run/")


class InstallError(RuntimeError):
    """The request cannot be carried out; the message names the option or the problem."""


@dataclass
class Request:
    state: str
    src: Optional[str] = None
    driver: Optional[str] = None
    host_root: str = "/"
    method: str = "auto"
    release: Optional[str] = None
    module_parameters: Optional[dict[str, Any]] = None
    modules: Optional[list[str]] = None
    prerequisites: Optional[list[str]] = None
    device_nodes: Optional[bool] = None
    persistenced: bool = False
    verify_command: Optional[Union[str, list[str]]] = None
    keep: int = 3
    extensions_dir: str = sysext.DEFAULT_EXTENSIONS_DIR
    sysext_format: str = sysext.DEFAULT_FORMAT
    update_engine_client: Optional[list[str]] = None


@dataclass
class Outcome:
    changed: bool = False
    method: str = ""
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    failed: Optional[str] = None

    def did(self, what: str) -> None:
        self.changed = True
        self.actions.append(what)


# --------------------------------------------------------------------------- small helpers


def hp(host_root: str, path: str) -> str:
    """``path`` of the host, seen from here."""
    return os.path.join(host_root or "/", path.lstrip("/"))


def check_writable(option: str, path: str) -> str:
    if not os.path.isabs(path) or not any(path.rstrip("/") + "/" == w or path.startswith(w) for w in WRITABLE):
        raise InstallError(f"{option}={path!r} must be below /etc, /var, /opt or /run (Flatcar's /usr is read-only)")
    return path


def resolve_method(method: str, host: fr.HostRelease) -> str:
    """``auto``: sysext on Flatcar >= 3185, tree on legacy CoreOS and older Flatcar."""
    if method not in METHODS:
        raise InstallError("method={!r} is not one of {}".format(method, ", ".join(METHODS)))
    if method != "auto":
        return method
    if host.legacy:
        return "tree"
    try:
        major = int(host.version.split(".")[0])
    except ValueError:
        return "tree"
    return "sysext" if major >= SYSEXT_FIRST_RELEASE else "tree"


def write_text(path: str, text: str, check: bool, mode: int = 0o644) -> bool:
    """Write ``text`` atomically unless the file already holds it; True when it changed (would change)."""
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text and (os.stat(path).st_mode & 0o777) == mode:
                return False
    except OSError:
        pass
    if not check:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, text, mode)
    return True


def set_link(path: str, target: str, check: bool) -> bool:
    if os.path.islink(path) and os.readlink(path) == target:
        return False
    if not check:
        switch_symlink(path, target)
    return True


def remove_path(path: str, check: bool) -> bool:
    if not os.path.lexists(path):
        return False
    if not check:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return True


def read_state(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        data = {}
    data.setdefault("images", {})
    data.setdefault("trees", {})
    return data


@contextlib.contextmanager
def driver_lock(host_root: str, driver: str, check: bool) -> Iterator[None]:
    """The flock every writing run for this driver holds (none in check mode)."""
    if check:
        yield
        return
    with dest_lock(hp(host_root, f"{STATE_DIR}/{driver}")):
        yield


def run_tool(argv: list[str], timeout: float = 300.0) -> tuple[int, str]:
    return kload.run_command(argv, timeout)


# --------------------------------------------------------------------------- the host


@dataclass
class HostView:
    host: fr.HostRelease
    running_release: str
    running_kernel: str
    pending_release: Optional[str]
    pending_kernel: Optional[str]
    pending_usr: Optional[str]
    os_release: dict[str, str]


def host_view(req: Request, log: LogFn = no_log) -> HostView:
    try:
        targets = fr.host_targets(req.host_root, req.update_engine_client, log=log)
        cur, pend = targets["current"], targets["pending"]
    except fr.ReleaseError as exc:
        if "update_engine" not in str(exc):
            raise
        log(f"pending release unknown: {exc}")
        rel = fr.read_host_release(req.host_root)
        cur = fr.Target(release="current", os=rel.os_id, board=rel.board, os_version=rel.version, channel=None,
                        kernel_release=fr.running_kernel(req.host_root), kernel_source="running-kernel", pending=False)
        pend = None
    host = fr.read_host_release(req.host_root)
    os_release: dict[str, str] = {}
    for rel in ("etc/os-release", "usr/lib/os-release"):
        try:
            with open(hp(req.host_root, rel), encoding="utf-8") as handle:
                os_release = parse_env_file(handle.read())
                break
        except OSError:
            continue
    return HostView(host=host, running_release=cur.os_version, running_kernel=cur.kernel_release or "",
                    pending_release=pend.os_version if pend else None,
                    pending_kernel=pend.kernel_release if pend else None,
                    pending_usr=pend.usr_partition if pend else None, os_release=os_release)


def in_use_elsewhere(plan: kload.LoadPlan, manifest: dict[str, Any], host_root: str) -> list[str]:
    """Modules of the build that are loaded from another build (different srcversion) and in use."""
    loaded = kload.loaded_modules(host_root)
    mods = kload.build_modules(manifest)
    out = []
    for name in plan.modules:
        if name not in loaded:
            continue
        have = kload.loaded_srcversion(name, host_root)
        want = mods.get(name, {}).get("srcversion")
        if have and want and have != want:
            out.append(f"{name} (loaded srcversion {have}, this build {want}, use count {loaded[name]})")
    return out


# --------------------------------------------------------------------------- the build


@dataclass
class Build:
    path: str
    manifest: dict[str, Any]
    ident: dict[str, Any]
    sha256: str

    @property
    def kver(self) -> str:
        return str(self.manifest["kernel_release"])

    @property
    def driver(self) -> str:
        return str(self.manifest["driver"])


def load_build(src: str, verify: bool = True) -> Build:
    """The build in ``src`` with its manifest; every file checked against it (sha256) when ``verify``."""
    if not os.path.isdir(src):
        raise InstallError(f"src={src!r} is not a directory")
    try:
        man = load_manifest(src)
    except ManifestError as exc:
        raise InstallError(str(exc)) from None
    for key in ("driver", "kernel_release", "driver_version"):
        if not man.get(key):
            raise InstallError(f"{src}/manifest.json has no {key}")
    if verify:
        problems = verify_tree(src, man, strict=False)
        if problems:
            raise InstallError(f"src={src!r} does not match its manifest: " + "; ".join(problems[:5]))
    return Build(path=src, manifest=man, ident=identity_from_manifest(man), sha256=manifest_sha256(man))


# --------------------------------------------------------------------------- boot path files


def unit_text(driver: str) -> str:
    return (f"# modulus.kmods kmod_install: load {driver} at boot (managed file)\n"
            "[Unit]\n"
            f"Description=Load the {driver} kernel modules installed by modulus.kmods\n"
            "After=systemd-sysext.service systemd-modules-load.service ensure-sysext.service\n"
            f"ConditionPathExists={BIN_DIR}/modulus-load-{driver}\n\n"
            "[Service]\n"
            "Type=oneshot\n"
            "RemainAfterExit=yes\n"
            f"ExecStart={BIN_DIR}/modulus-load-{driver}\n\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n")


def loader_script(plan: kload.LoadPlan, driver: str) -> str:
    tree_root = f"{INSTALL_ROOT}/{driver}"
    return kload.render_script(
        plan, [sysext.module_dir("$K", driver), f"{DRIVERS_DIR}/{driver}/lib/modules/$K"],
        tree_link=f"{DRIVERS_DIR}/{driver}", tree_by_kernel=f"{tree_root}/by-kernel",
        firmware_dir=f"{DRIVERS_DIR}/{driver}/lib/firmware")


def boot_files(req: Request, plan: kload.LoadPlan, driver: str) -> dict[str, tuple[str, int]]:
    """Host path -> (content, mode) of the boot path files."""
    return {
        f"{BIN_DIR}/modulus-load-{driver}": (loader_script(plan, driver), 0o755),
        f"{UNIT_DIR}/modulus-load-{driver}.service": (unit_text(driver), 0o644),
        f"/etc/modprobe.d/modulus-{driver}.conf": (kload.modprobe_conf(plan), 0o644),
    }


def install_boot_path(req: Request, plan: kload.LoadPlan, driver: str, out: Outcome, check: bool) -> None:
    for path, (text, mode) in boot_files(req, plan, driver).items():
        if write_text(hp(req.host_root, path), text, check, mode):
            out.did(f"wrote {path}")
    wants = f"{UNIT_DIR}/multi-user.target.wants/modulus-load-{driver}.service"
    if set_link(hp(req.host_root, wants), f"{UNIT_DIR}/modulus-load-{driver}.service", check):
        out.did(f"enabled modulus-load-{driver}.service ({wants})")
    out.result["boot_loader"] = f"{BIN_DIR}/modulus-load-{driver}"


# --------------------------------------------------------------------------- sysext


def image_spec(build: Build, release: str, fmt: str, plan: kload.LoadPlan) -> sysext.ImageSpec:
    return sysext.ImageSpec(driver=build.driver, os_id=build.ident.get("os") or "flatcar", release=release,
                            kernel_release=build.kver, board=build.ident.get("board"),
                            manifest_sha256=build.sha256, modules_load=kload.modules_load_conf(plan),
                            modules=sorted(kload.build_modules(build.manifest)), fmt=fmt,
                            extra={"MODULUS_DRIVER_VERSION": str(build.manifest["driver_version"])})


def boot_id(host_root: str) -> str:
    try:
        with open(hp(host_root, "proc/sys/kernel/random/boot_id"), encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def retired_dir(ext_dir: str) -> str:
    """Where replaced directory images wait for the next boot: beside the extensions directory (the
    same filesystem, so moving one there is a rename) and outside it (systemd would merge it)."""
    return os.path.join(os.path.dirname(ext_dir.rstrip("/")), RETIRED_DIR)


def retire(ext_dir: str, host_root: str, path: str, name: str) -> None:
    top = retired_dir(ext_dir)
    os.makedirs(top, exist_ok=True)
    os.rename(path, os.path.join(top, f"{name}.{time.time_ns()}.{boot_id(host_root)}"))


def sweep_retired(ext_dir: str, host_root: str, log: LogFn) -> None:
    """Remove directory images retired in an earlier boot (no overlay of this boot uses them)."""
    top = retired_dir(ext_dir)
    try:
        names = os.listdir(top)
    except OSError:
        return
    now = boot_id(host_root)
    for entry in names:
        if not now or not entry.endswith("." + now):
            shutil.rmtree(os.path.join(top, entry), ignore_errors=True)
            log(f"removed the retired image {top}/{entry}")


def place_directory(ext_dir: str, host_root: str, root: str, path: str, name: str, merged: bool) -> None:
    """Switch the directory image at ``path`` to ``root`` atomically (RENAME_EXCHANGE). A directory
    that is merged now is a lower layer of the live ``/usr`` overlay: it is kept (``RETIRED_DIR``)
    until the host has booted again, not deleted under running programs."""
    if not (merged and os.path.isdir(path) and not os.path.islink(path)):
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)
        swap_into_place(root, path)
        return
    top = retired_dir(ext_dir)
    os.makedirs(top, exist_ok=True)
    retired = os.path.join(top, f"{name}.{time.time_ns()}.{boot_id(host_root)}")
    # the overlay keeps its lower layer by inode, so moving the old tree is safe
    if _rename_exchange(root, path):  # no moment without an image; the old tree is at ``root`` now
        os.rename(root, retired)
        return
    os.rename(path, retired)
    try:
        os.rename(root, path)
    except OSError:
        os.rename(retired, path)
        raise


def existing_format(path_of: dict[str, str], have: dict[str, Any], key_of: Any) -> Optional[str]:
    """The format of the image in place when its content is what this build makes in that format."""
    fmt = have.get("format")
    if fmt in path_of and os.path.lexists(path_of[fmt]) and have.get("content") == key_of(fmt):
        return str(fmt)
    return None


def install_image(req: Request, build: Build, release: str, plan: kload.LoadPlan, view: HostView,
                  state: dict[str, Any], out: Outcome, check: bool, log: LogFn) -> dict[str, Any]:
    """Make (or keep) the release-bound image of the build in the extensions directory."""
    ext_dir = hp(req.host_root, req.extensions_dir)
    name = sysext.image_name(build.driver, release)
    path_of = {f: sysext.image_path(ext_dir, name, f) for f in sysext.FORMATS}
    have = state["images"].get(name) or {}

    def key_of(fmt: str) -> str:
        return image_spec(build, release, fmt, plan).content_key()

    try:
        choice = image_format.choose(req.sysext_format, existing_format(path_of, have, key_of)
                                     if req.sysext_format == "auto" else None)
    except image_format.FormatError as exc:
        raise InstallError(str(exc)) from None
    fmt = choice.fmt
    path = path_of[fmt]
    spec = image_spec(build, release, fmt, plan)
    key = spec.content_key()
    info = {"name": name, "path": sysext.image_path(req.extensions_dir, name, fmt),
            "format": fmt, "format_reason": choice.reason, "release": release, "kernel_release": build.kver,
            "driver_version": build.manifest["driver_version"], "content": key,
            "modprobe_conf": "/" + kmod_sysext.conf_path(spec.kmod_name),
            "helper": "/" + kmod_sysext.helper_path(spec.kmod_name)}
    out.before["image"] = {k: have.get(k) for k in ("name", "format", "release", "driver_version", "content")} \
        if have else None
    out.after["image"] = {k: info[k] for k in ("name", "format", "release", "driver_version", "content")}
    if have.get("content") == key and have.get("format") == fmt and os.path.lexists(path):
        info.update(size=have.get("size"), created=False, seconds=0.0)
        return info
    if check:
        out.did(f"would create {info['path']} ({choice.reason})")
        info.update(created=True)
        return info
    started = time.monotonic()
    parent = os.path.dirname(ext_dir)
    os.makedirs(ext_dir, exist_ok=True)
    for line in sweep_stale(parent, name).lines():
        log(line)
    sweep_retired(ext_dir, req.host_root, log)
    merged = os.path.exists(hp(req.host_root, sysext.release_file(name)))
    stage = make_staging(os.path.join(parent, name), "sysext", mode=0o755)
    try:
        root = os.path.join(stage, "root")
        os.mkdir(root, 0o755)
        sysext.populate(root, build.path, build.manifest, spec, log)
        if fmt == "directory":
            place_directory(ext_dir, req.host_root, root, path, name, merged)
        else:
            raw = os.path.join(stage, "image.raw")
            sysext.make_image(root, raw, fmt, log)
            os.chmod(raw, 0o644)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            os.replace(raw, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    # an image of another format under the same name would be merged too: remove it (a merged
    # directory is retired, not deleted)
    for other in ("directory", "squashfs"):
        other_path = path_of[other]
        if other_path != path and os.path.lexists(other_path):
            if other == "directory" and merged and os.path.isdir(other_path):
                retire(ext_dir, req.host_root, other_path, name)
            else:
                remove_path(other_path, False)
    info.update(size=sysext.tree_size(path), created=True, seconds=round(time.monotonic() - started, 3),
                installed_at=time.time())
    keys = ("name", "path", "format", "release", "kernel_release", "driver_version", "content", "size",
            "installed_at")
    state["images"][name] = {k: info[k] for k in keys}
    out.did(f"created {info['path']} ({info['size']} bytes, VERSION_ID={release}, {choice.reason})")
    return info


def refresh_sysext(req: Request, out: Outcome, check: bool, why: str) -> dict[str, Any]:
    """``systemd-sysext refresh`` on the running system (host_root ``/`` only)."""
    if (req.host_root or "/") != "/":
        return {"refreshed": False, "reason": f"host_root={req.host_root}: not the running system"}
    tool = which("systemd-sysext")
    if not tool:
        return {"refreshed": False, "reason": "systemd-sysext not found"}
    if check:
        out.did(f"would run systemd-sysext refresh ({why})")
        return {"refreshed": True}
    rc, text = run_tool([tool, "refresh"])
    if rc != 0:
        raise InstallError(f"systemd-sysext refresh failed (rc={rc}): {text[-1000:]}")
    out.did(f"systemd-sysext refresh ({why})")
    return {"refreshed": True, "output": text[-1000:]}


# --------------------------------------------------------------------------- tree


def tree_dest(driver: str, driver_version: str, kver: str) -> str:
    return f"{INSTALL_ROOT}/{driver}/{driver_version}/{kver}"


def install_tree(req: Request, build: Build, state: dict[str, Any], out: Outcome, check: bool,
                 log: LogFn) -> dict[str, Any]:
    """Copy the build (verified) to its place under /opt/modulus/installed and point
    ``by-kernel/<kver>`` at it."""
    ver = str(build.manifest["driver_version"])
    dest = tree_dest(build.driver, ver, build.kver)
    host_dest = hp(req.host_root, dest)
    key = f"{ver}/{build.kver}"
    have = state["trees"].get(key) or {}
    info = {"path": dest, "driver_version": ver, "kernel_release": build.kver, "content": build.sha256}
    out.before["tree"] = {"path": have.get("path"), "content": have.get("content")} if have else None
    out.after["tree"] = {"path": dest, "content": build.sha256}
    current_ok = have.get("content") == build.sha256 and os.path.isfile(os.path.join(host_dest, "manifest.json"))
    if not current_ok:
        if check:
            out.did(f"would copy the build to {dest}")
        else:
            parent = os.path.dirname(host_dest)
            os.makedirs(parent, exist_ok=True)
            for line in sweep_stale(parent, build.kver).lines():
                log(line)
            stage = make_staging(host_dest, "install", mode=0o755)
            try:
                tree = os.path.join(stage, "tree")
                shutil.copytree(build.path, tree, symlinks=True)
                problems = verify_tree(tree, build.manifest, strict=False)
                if problems:
                    raise InstallError(f"the copy in {tree} does not match the manifest: " + "; ".join(problems[:5]))
                os.chmod(tree, 0o755)
                swap_into_place(tree, host_dest)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            state["trees"][key] = {"path": dest, "driver_version": ver, "kernel_release": build.kver,
                                   "content": build.sha256, "installed_at": time.time()}
            out.did(f"copied the build to {dest}")
    link = f"{INSTALL_ROOT}/{build.driver}/by-kernel/{build.kver}"
    if set_link(hp(req.host_root, link), dest, check):
        out.did(f"{link} -> {dest}")
    return info


def activate_tree(req: Request, build: Build, out: Outcome, check: bool) -> dict[str, Any]:
    """Point /opt/drivers/<driver> at the installed build and register its libraries."""
    dest = tree_dest(build.driver, str(build.manifest["driver_version"]), build.kver)
    link = f"{DRIVERS_DIR}/{build.driver}"
    changed = set_link(hp(req.host_root, link), dest, check)
    if changed:
        out.did(f"{link} -> {dest}")
    conf = f"/etc/ld.so.conf.d/{build.driver}.conf"
    if write_text(hp(req.host_root, conf), f"{link}/lib\n", check):
        out.did(f"wrote {conf}")
        changed = True
    ld = {"ldconfig": False}
    if changed and not check:
        tool = which("ldconfig")
        if tool:
            argv = [tool] if (req.host_root or "/") == "/" else [tool, "-r", req.host_root]
            rc, text = run_tool(argv)
            ld = {"ldconfig": rc == 0, "output": text[-500:]}
            if rc != 0:
                out.warnings.append(f"{' '.join(argv)} failed (rc={rc}): {text[-300:]}")
    return {"link": link, "target": dest, **ld}


# --------------------------------------------------------------------------- pruning


def prune(req: Request, driver: str, state: dict[str, Any], protect_images: set[str], protect_trees: set[str],
          out: Outcome, check: bool) -> list[str]:
    """Keep ``keep`` images and trees: the protected ones (running, pending, active) and the newest."""
    removed: list[str] = []
    keep = max(1, int(req.keep))
    images = sorted(state["images"].items(), key=lambda kv: -float(kv[1].get("installed_at") or 0))
    kept = [name for name in dict(images) if name in protect_images]
    for name, entry in images:
        if name in kept:
            continue
        if len(kept) < keep:
            kept.append(name)
            continue
        path = hp(req.host_root, entry.get("path") or "")
        if entry.get("path") and remove_path(path, check):
            removed.append(entry["path"])
        if not check:
            del state["images"][name]
    trees = sorted(state["trees"].items(), key=lambda kv: -float(kv[1].get("installed_at") or 0))
    kept = [key for key in dict(trees) if key in protect_trees]
    for key, entry in trees:
        if key in kept:
            continue
        if len(kept) < keep:
            kept.append(key)
            continue
        link = hp(req.host_root, f"{INSTALL_ROOT}/{driver}/by-kernel/{entry['kernel_release']}")
        if os.path.islink(link) and os.readlink(link) == entry["path"]:
            remove_path(link, check)
        if remove_path(hp(req.host_root, entry["path"]), check):
            removed.append(entry["path"])
        if not check:
            del state["trees"][key]
    for path in removed:
        out.did(f"pruned {path}")
    return removed


# --------------------------------------------------------------------------- the states


def plan_for(req: Request, build: Build) -> kload.LoadPlan:
    try:
        return kload.load_plan(build.manifest, modules=req.modules, prerequisites=req.prerequisites,
                               parameters=req.module_parameters, device_nodes=req.device_nodes,
                               persistenced=req.persistenced, verify_command=req.verify_command)
    except kload.LoadError as exc:
        raise InstallError(str(exc)) from None


def check_request(req: Request) -> None:
    if req.state not in STATES:
        raise InstallError("state={!r} is not one of {}".format(req.state, ", ".join(STATES)))
    if req.sysext_format not in image_format.FORMATS:
        raise InstallError("sysext_format={!r} is not one of {}".format(
            req.sysext_format, ", ".join(image_format.FORMATS)))
    check_writable("extensions_dir", req.extensions_dir)
    if int(req.keep) < 1:
        raise InstallError(f"keep={req.keep!r} must be at least 1")
    if req.release:
        fr.check_version("release", req.release)


def run(req: Request, check: bool = False, log: LogFn = no_log) -> Outcome:
    """Carry out ``req``; in check mode nothing is written and the outcome says what would change."""
    check_request(req)
    out = Outcome()
    if req.state == "absent":
        driver = req.driver or (load_build(req.src, verify=False).driver if req.src else None)
        if not driver:
            raise InstallError("state=absent needs src, or identity with at least driver")
        check_name("driver", driver)
        with driver_lock(req.host_root, driver, check):
            remove_all(req, driver, out, check)
        return out
    if not req.src:
        raise InstallError(f"state={req.state} needs src (or identity)")
    build = load_build(req.src)
    view = host_view(req, log)
    out.method = method = resolve_method(req.method, view.host)
    release = req.release or str(build.manifest.get("os_version") or "")
    if not release:
        raise InstallError(f"{req.src}/manifest.json has no os_version: set release")
    fr.check_version("release", release)
    running = release == view.running_release
    if running and build.kver != view.running_kernel:
        raise InstallError(f"the build is for kernel {build.kver} but release {release} runs kernel "
                           f"{view.running_kernel}: it cannot fit this release")
    if release == view.pending_release and view.pending_kernel and build.kver != view.pending_kernel:
        raise InstallError(f"the build is for kernel {build.kver} but the pending release {release} boots "
                           f"kernel {view.pending_kernel}")
    if req.state == "loaded" and build.kver != view.running_kernel:
        raise InstallError(f"state=loaded needs a build for the running kernel {view.running_kernel}; this build "
                           f"is for {build.kver} (release {release}): use state=staged for the next release")
    plan = plan_for(req, build)
    activate = req.state in ("present", "loaded") and running
    res = out.result
    res.update(driver=build.driver, driver_version=build.manifest["driver_version"], kernel_release=build.kver,
               release=release, running_release=view.running_release, running_kernel=view.running_kernel,
               pending_release=view.pending_release, identity=build.ident, load_plan=plan.as_dict())
    state_path = hp(req.host_root, f"{STATE_DIR}/{build.driver}.json")
    with driver_lock(req.host_root, build.driver, check):
        state = read_state(state_path)
        before_state = json.dumps(state, sort_keys=True)
        busy = in_use_elsewhere(plan, build.manifest, req.host_root) if activate else []
        if busy:
            out.warnings.append("another build of {} is loaded and in use: {}; this build takes over at the next "
                                "boot".format(build.driver, "; ".join(busy)))
        if method == "sysext":
            res["image"] = install_image(req, build, release, plan, view, state, out, check, log)
            merged = os.path.exists(hp(req.host_root, f"{sysext.RELEASE_DIR}/extension-release.{res['image']['name']}"))
            if activate and not busy and (res["image"].get("created") or not merged):
                res["merge"] = refresh_sysext(req, out, check, f"merge {res['image']['name']}")
            elif not running:
                res["merge"] = {"refreshed": False, "reason": f"merged when the host boots release {release}"}
            elif busy:
                res["merge"] = {"refreshed": False, "reason": "another build is in use: merged at the next boot"}
            elif not activate:
                res["merge"] = {"refreshed": False, "reason": "state=staged: merged at the next boot"}
            else:
                res["merge"] = {"refreshed": False, "reason": "already in place"}
        else:
            res["tree"] = install_tree(req, build, state, out, check, log)
            if activate and not busy:
                res["tree"].update(activate_tree(req, build, out, check))
        install_boot_path(req, plan, build.driver, out, check)
        protect_images = {sysext.image_name(build.driver, r) for r in (view.running_release, view.pending_release, release) if r}
        protect_trees = {f"{build.manifest['driver_version']}/{build.kver}"}
        active_link = hp(req.host_root, f"{DRIVERS_DIR}/{build.driver}")
        active = os.readlink(active_link) if os.path.islink(active_link) else None
        for entry_key, entry in state["trees"].items():
            if entry.get("path") == active:
                protect_trees.add(entry_key)  # what /opt/drivers/<driver> serves now is never pruned
            if entry.get("kernel_release") in (view.running_kernel, view.pending_kernel):
                link = hp(req.host_root, f"{INSTALL_ROOT}/{build.driver}/by-kernel/{entry['kernel_release']}")
                if os.path.islink(link) and os.readlink(link) == entry.get("path"):
                    protect_trees.add(entry_key)
        res["pruned"] = prune(req, build.driver, state, protect_images, protect_trees, out, check)
        if not check and json.dumps(state, sort_keys=True) != before_state:
            os.makedirs(os.path.dirname(state_path), exist_ok=True)
            write_json_atomic(state_path, state)
        if req.state == "loaded":
            res["load"] = load(req, build, plan, method, busy, out, check, log)
    res["method"] = method
    return out


def load(req: Request, build: Build, plan: kload.LoadPlan, method: str, busy: list[str], out: Outcome,
         check: bool, log: LogFn) -> dict[str, Any]:
    """Load the plan on the running kernel, or say cleanly why not."""
    info: dict[str, Any] = {"loaded": False}
    if plan.is_nvidia:
        gpus = kload.nvidia_gpus(req.host_root)
        info["gpus"] = gpus
        if not gpus:
            info["reason"] = ("no NVIDIA GPU (PCI vendor 10de) on this host: the build is installed and staged, "
                              "nothing was loaded")
            return info
    else:
        gpus = []
    if busy:
        info["reason"] = "another build is loaded and in use; this one takes over at the next boot"
        return info
    loaded = kload.loaded_modules(req.host_root)
    mods = kload.build_modules(build.manifest)
    todo = [m for m in plan.modules if m not in loaded or
            (kload.loaded_srcversion(m, req.host_root) not in (None, mods[m].get("srcversion")))]
    if not todo:
        info.update(loaded=True, reason="already loaded")
        return info
    if (req.host_root or "/") != "/":
        info["reason"] = f"host_root={req.host_root} is not the running system: the load plan was not executed"
        return info
    if check:
        out.did("would load " + ", ".join(todo))
        info["reason"] = "check mode"
        return info
    if method == "tree":
        moddir = os.path.join(DRIVERS_DIR, build.driver, "lib", "modules", build.kver)
        bdir = os.path.join(DRIVERS_DIR, build.driver)
    else:
        moddir = sysext.module_dir(build.kver, build.driver)
        bdir = build.path
        if not os.path.isdir(moddir):
            moddir = os.path.join(build.path, "lib", "modules", build.kver)
    done = kload.execute(plan, moddir, build_dir=bdir, gpu_count=len(gpus), log=log)
    info.update(commands=done.commands, modules_loaded=done.loaded, already=done.already,
                device_nodes=done.device_nodes, verify=done.verify, module_dir=moddir)
    if done.loaded:
        out.did("loaded " + ", ".join(done.loaded))
    if done.failed:
        out.failed = done.failed
        info["reason"] = done.failed
        return info
    info["loaded"] = True
    return info


def remove_all(req: Request, driver: str, out: Outcome, check: bool) -> None:
    """state=absent: every image, tree and boot file of ``driver`` that kmod_install put in place.
    Loaded modules stay loaded (the result lists them)."""
    removed: list[str] = []
    ext_dir = hp(req.host_root, req.extensions_dir)
    for _name, path in sysext.list_images(ext_dir, driver).items():
        if remove_path(path, check):
            removed.append(os.path.join(req.extensions_dir, os.path.basename(path)))
    paths = [f"{INSTALL_ROOT}/{driver}", f"{DRIVERS_DIR}/{driver}", f"/etc/ld.so.conf.d/{driver}.conf",
             f"{BIN_DIR}/modulus-load-{driver}", f"{UNIT_DIR}/multi-user.target.wants/modulus-load-{driver}.service",
             f"{UNIT_DIR}/modulus-load-{driver}.service", f"/etc/modprobe.d/modulus-{driver}.conf",
             f"{STATE_DIR}/{driver}.json"]
    for path in paths:
        if remove_path(hp(req.host_root, path), check):
            removed.append(path)
    out.before = {"installed": sorted(removed)}
    out.after = {"installed": []}
    for path in removed:
        out.did(("would remove " if check else "removed ") + path)
    out.result.update(driver=driver, removed=removed)
    if any(p.startswith(req.extensions_dir) for p in removed):
        out.result["merge"] = refresh_sysext(req, out, check, "unmerge removed images")
    if not check:
        sweep_retired(ext_dir, req.host_root, no_log)
    still = [m for m in kload.loaded_modules(req.host_root) if m.startswith(driver.replace("-", "_"))]
    if still:
        out.warnings.append("still loaded (not unloaded by state=absent): " + ", ".join(still))
    out.result["still_loaded"] = still
