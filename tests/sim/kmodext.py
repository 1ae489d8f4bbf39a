"""An extension that ships its own kernel modules the way Flatcar's ``zfs`` extension does.

Flatcar's kmod extensions (``flatcar-zfs``, ``flatcar-nvidia-drivers-*``) are shaped by
``build_library/sysext_mangle_kmod`` (flatcar/scripts, PR 2976, commit 9c51990f8a; the same on
``main`` and ``flatcar-4593``) so that several of them can be merged at once:

- no file directly in ``usr/lib/modules/<kver>/`` (``modules.dep``, ``modules.alias`` ... deleted):
  the merged ``/usr`` keeps the kernel's own index;
- ``usr/lib/modprobe.d/10-<name>-kmod-sysext.conf``: per module an ``install <mod>
  /usr/libexec/_<name>_modprobe_helper <mod>`` and a ``remove <mod> ... -r <mod>`` line;
- ``usr/libexec/_<name>_modprobe_helper`` (below, copied verbatim): overlays
  ``/usr/lib/modules/$(uname -r)`` in a private mount namespace, runs ``depmod`` there and calls
  ``modprobe --ignore-install``.

``zfs_style_extension(kit, dest)`` lays out such an extension, ``flatcar-zfs`` by default, for a kit
release: two small real modules, ``spl`` and ``zfs`` (``zfs`` needs a symbol of ``spl``, so loading it
needs the dependency that only the helper's depmod records), compiled for the release's kernel in
the kit's developer container (``container.run_in_image``, as ``kmod_build`` runs builds) and cached
in the kit cache as ``kmodext-<hash>/<kver>/`` (``<hash>``: the kit's recipe and the sources).
``extension-release.<name>`` is what ``build_sysext`` writes (``ID='flatcar'``, ``VERSION_ID`` of the
release, ``ARCHITECTURE``, ``EXTENSION_RELOAD_MANAGER=1``, ``SYSEXT_ID``).

The helper calls ``uname -r``: in a booted container that is this machine's kernel, not the kit's.
``helper_for_kernel`` gives the tests the same helper with the kernel named (``KMOD_PATH`` fixed),
the one change needed to run it there; the fixture itself ships Flatcar's text unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sim.kit import Kit, _locked

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "tests" / "fixtures" / "zfs-style"
MODULES = ("spl", "zfs")  # zfs depends on spl
DEFAULT_NAME = "flatcar-zfs"
RECIPE_VERSION = "1"
MODULE_SUBDIR = "extra"  # where sys-fs/zfs-kmod installs its modules: /lib/modules/<kver>/extra/

# build_library/sysext_mangle_kmod, configure_modprobe(): the helper, verbatim.
FLATCAR_HELPER = r'''#!/bin/bash

set -euo pipefail

action="Loading"
for arg in "$@"; do
    if [[ $arg == "-r" ]]; then
        action="Unloading"
    fi
done
echo "$action kernel module from a sysext..."

KMOD_PATH=/usr/lib/modules/$(uname -r)
TMP_DIR=$(mktemp -d)
trap "rm -rf -- '${TMP_DIR}'" EXIT
mkdir "${TMP_DIR}"/{upper,work}

unshare -m bash -s -- "${@}" <<FOE
set -euo pipefail
if ! mountpoint -q "${KMOD_PATH}"; then
    mount -t overlay overlay -o lowerdir="${KMOD_PATH}",upperdir="${TMP_DIR}"/upper,workdir="${TMP_DIR}"/work "${KMOD_PATH}"
    depmod
fi
modprobe --ignore-install "\${@}"
FOE
'''


def helper_path(name: str = DEFAULT_NAME) -> str:
    return f"/usr/libexec/_{name}_modprobe_helper"


def modprobe_conf(name: str, modules: list[str]) -> str:
    """The ``10-<name>-kmod-sysext.conf`` lines of configure_modprobe for ``modules``."""
    helper = helper_path(name)
    return "".join(f"install {m} {helper} {m}\nremove {m} {helper} -r {m}\n" for m in modules)


def helper_for_kernel(kver: str) -> str:
    """Flatcar's helper with the kernel named instead of ``uname -r`` (and ``depmod`` told which):
    for a container whose ``uname -r`` is this machine's kernel."""
    text = FLATCAR_HELPER.replace("KMOD_PATH=/usr/lib/modules/$(uname -r)", f"KMOD_PATH=/usr/lib/modules/{kver}")
    return text.replace("    depmod\n", f"    depmod {kver}\n").replace(
        'modprobe --ignore-install "\\${@}"', f'modprobe -S {kver} --ignore-install "\\${{@}}"')


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_modules(kit: Kit, release: str = "current", log=lambda _msg: None) -> Path:
    """``spl.ko`` and ``zfs.ko`` built for ``release``'s kernel in its developer container; cached."""
    rel = kit.releases[release]
    key = hashlib.sha256(json.dumps({"v": RECIPE_VERSION, "kit": kit.recipe_hash, "src": _source_hash()},
                                    sort_keys=True).encode()).hexdigest()[:16]
    base = kit.cache_dir / f"kmodext-{key}"
    final = base / rel.kernel
    if all((final / f"{m}.ko").is_file() for m in MODULES):
        return final
    from ansible_collections.modulus.kmods.plugins.module_utils.container import run_in_image

    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f".{rel.kernel}.lock"):
        if all((final / f"{m}.ko").is_file() for m in MODULES):
            return final
        with tempfile.TemporaryDirectory(prefix=".build-", dir=base) as td:
            src = Path(td) / "src"
            shutil.copytree(SOURCE, src)
            log(f"building {', '.join(MODULES)} for {rel.kernel} in the {rel.version} developer container")
            res = run_in_image(str(rel.image_raw), ["make", "-C", "/src", f"KERNEL_UNAME={rel.kernel}", "modules"],
                               binds_rw=[(str(src), "/src")], timeout=900, scratch_dir=td,
                               log_path=str(Path(td) / "build.log"))
            if res.rc != 0 or res.timed_out:
                raise RuntimeError(f"building the zfs-style modules for {rel.kernel} failed (rc={res.rc}):\n"
                                   f"{res.output_tail}")
            out = Path(td) / "out"
            out.mkdir()
            for m in MODULES:
                shutil.copy2(src / f"{m}.ko", out / f"{m}.ko")
            os.rename(out, final)
    return final


def zfs_style_extension(kit: Kit, dest: str | os.PathLike[str], release: str = "current", name: str = DEFAULT_NAME,
                        fmt: str = "directory", log=lambda _msg: None) -> Path:
    """Lay out ``dest/<name>`` (a directory extension) or ``dest/<name>.raw`` (squashfs, made on this
    machine, as Flatcar ships its own) the way sysext_mangle_kmod leaves Flatcar's kmod extensions."""
    if fmt not in ("directory", "squashfs"):
        raise ValueError(f"fmt must be 'directory' or 'squashfs', got {fmt!r}")
    rel = kit.releases[release]
    built = build_modules(kit, release, log)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tree = dest / name if fmt == "directory" else Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest))
    if fmt == "directory" and tree.exists():
        raise FileExistsError(tree)
    moddir = tree / "usr/lib/modules" / rel.kernel / MODULE_SUBDIR
    moddir.mkdir(parents=True)
    for m in MODULES:
        shutil.copy2(built / f"{m}.ko", moddir / f"{m}.ko")
    conf = tree / "usr/lib/modprobe.d" / f"10-{name}-kmod-sysext.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(modprobe_conf(name, sorted(MODULES)))
    helper = tree / helper_path(name).lstrip("/")
    helper.parent.mkdir(parents=True)
    helper.write_text(FLATCAR_HELPER)
    helper.chmod(0o755)
    release_file = tree / "usr/lib/extension-release.d" / f"extension-release.{name}"
    release_file.parent.mkdir(parents=True)
    release_file.write_text(f"ID='flatcar'\nVERSION_ID='{rel.version}'\nARCHITECTURE='x86-64'\n"
                            f"EXTENSION_RELOAD_MANAGER=1\nSYSEXT_ID='{name}'\n"
                            "SYSEXT_BUG_REPORT_URL='https://issues.flatcar.org'\n")
    if fmt == "directory":
        return tree
    raw = dest / f"{name}.raw"
    try:
        subprocess.run(["mksquashfs", str(tree), str(raw), "-all-root", "-noappend", "-quiet"], check=True,
                       capture_output=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return raw
