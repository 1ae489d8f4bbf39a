"""A self-extracting NVIDIA driver archive built from Debian's real NVIDIA kernel module sources.

NVIDIA ships its Linux driver as a makeself ``.run`` file: a shell stub followed by a compressed
tarball of ``NVIDIA-Linux-<arch>-<version>/`` holding ``kernel/`` (the proprietary modules, with
the binary blob), ``kernel-open/`` (the open modules), the userspace libraries and tools, and a
``.manifest`` listing every file with its permissions and type. ``kmod_build`` only relies on
``sh FILE.run --extract-only --target DIR`` (and ``-x``) and on that layout.

This fixture builds the same shape from real parts: Debian non-free's ``nvidia-kernel-source``
(``kernel/``) and contrib's ``nvidia-open-kernel-source`` (``kernel-open/``), fetched with
``apt-get download`` and unpacked with ``dpkg -x``. The userspace part is test data compiled here:
a tiny ELF shared library ``libnvidia-ml.so.<version>`` and an executable ``nvidia-smi`` that
says it is a modulus test stand-in. The result is cached under the kit cache keyed by its recipe.

Usage::

    from sim.nvidia import nvidia_run
    run = nvidia_run()          # NvidiaRun(path, version, sha256, arch, has_open)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sim.kit import cache_root, sha256_file

# Debian bookworm non-free carries 535.261.03-1 (and bookworm-security a newer 535.309.01); the
# open sources exist only as 535.261.03-1, so that version keeps kernel/ and kernel-open/ matched.
# If the mirror no longer has it, the fixture takes the version Debian offers (kernel-open/ only
# when the open sources exist in that same version).
DEBIAN_VERSION = os.environ.get("MODULUS_SIM_NVIDIA_DEB", "535.261.03-1")
ARCH = "x86_64"
RECIPE_REV = "3"  # bump when the archive's layout or stub changes

STUB = r"""#!/bin/sh
# NVIDIA-style self-extracting archive made by modulus.kmods tests/sim/nvidia.py (TEST DATA).
# Kernel sources: Debian nvidia-kernel-source / nvidia-open-kernel-source @DEBVER@.
# Userspace files are modulus test stand-ins, not NVIDIA binaries.
label="NVIDIA Accelerated Graphics Driver for Linux-@ARCH@ @VERSION@ (modulus test fixture)"
targetdir="NVIDIA-Linux-@ARCH@-@VERSION@"
skip=@SKIP@
sha256="@SHA256@"
size=@SIZE@
extract=""
target=""
check=1
while [ $# -gt 0 ]; do
    case "$1" in
    -x|--extract-only) extract=1 ;;
    --target) shift; target="$1"; extract=1 ;;
    --target=*) target="${1#--target=}"; extract=1 ;;
    --nocheck) check="" ;;
    --info|-i) echo "Identification: $label"; echo "Target directory: $targetdir"; echo "Uncompressed size: $size bytes"; exit 0 ;;
    --list) tail -n +$skip "$0" | gzip -cd | tar -tf -; exit $? ;;
    --check)
        got=$(tail -n +$skip "$0" | sha256sum | cut -d' ' -f1)
        [ "$got" = "$sha256" ] && { echo "Verifying archive integrity... OK"; exit 0; }
        echo "Verifying archive integrity... Error in SHA256 checksums: $got is different from $sha256" >&2; exit 1 ;;
    -h|--help) echo "$label"; echo "usage: sh $0 [-x|--extract-only] [--target DIR] [--check] [--list] [--info]"; exit 0 ;;
    *) echo "$0: unknown option $1 (this test fixture only extracts)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$extract" ]; then
    echo "$label: this test fixture cannot install; use --extract-only [--target DIR]" >&2
    exit 1
fi
[ -n "$target" ] || target="$targetdir"
if [ -n "$check" ] && command -v sha256sum >/dev/null 2>&1; then
    printf 'Verifying archive integrity... '
    got=$(tail -n +$skip "$0" | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$sha256" ]; then
        echo "Error in SHA256 checksums: $got is different from $sha256" >&2
        exit 1
    fi
    echo "OK"
fi
echo "Uncompressing $label"
mkdir -p "$target" || exit 1
tail -n +$skip "$0" | gzip -cd | tar -xf - -C "$target" --no-same-owner || {
    echo "Extraction failed" >&2; exit 1; }
exit 0
"""

LIB_C = r"""
/* modulus test data: stands in for NVIDIA's libnvidia-ml; it is not NVIDIA code. */
const char *nvmlSystemGetDriverVersionString(void) { return "@VERSION@ (modulus test stand-in)"; }
int nvmlInit_v2(void) { return 0; }
"""

SMI_C = r"""
/* modulus test data: stands in for nvidia-smi; it is not NVIDIA code. */
#include <stdio.h>
int main(int argc, char **argv) {
    (void)argc; (void)argv;
    printf("NVIDIA-SMI @VERSION@ (modulus test stand-in, no GPU access)\n");
    return 0;
}
"""


@dataclass
class NvidiaRun:
    path: Path
    version: str
    sha256: str
    arch: str
    has_open: bool
    debian_version: str


def recipe_key(debian_version: str = DEBIAN_VERSION) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"deb": debian_version, "arch": ARCH, "rev": RECIPE_REV, "stub": STUB,
                         "lib": LIB_C, "smi": SMI_C}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {p.returncode}): {p.stdout[-2000:]}")


def _download_sources(work: Path, debian_version: str) -> tuple[Path, Path | None, str]:
    """apt-get download + dpkg -x; returns (proprietary tree, open tree or None, Debian version used)."""
    debs = work / "debs"
    debs.mkdir()
    os.chmod(debs, 0o777)  # apt's sandbox user may write here
    pinned = subprocess.run(["apt-get", "download", "-q", f"nvidia-kernel-source={debian_version}"], cwd=debs,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if pinned.returncode != 0:  # the mirror moved on: take what Debian has now
        _run(["apt-get", "download", "-q", "nvidia-kernel-source"], cwd=debs)
    [deb] = list(debs.glob("nvidia-kernel-source_*.deb"))
    actual = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, stdout=subprocess.PIPE,
                            text=True).stdout.strip()
    have_open = subprocess.run(["apt-get", "download", "-q", f"nvidia-open-kernel-source={actual}"], cwd=debs,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False).returncode == 0
    root = work / "root"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    trees = work / "trees"
    trees.mkdir()
    _run(["tar", "-xJf", str(root / "usr/src/nvidia-kernel.tar.xz"), "-C", str(trees)])
    prop = trees / "modules" / "nvidia-kernel"
    opn = None
    if have_open and (root / "usr/src/nvidia-open-kernel.tar.xz").exists():
        _run(["tar", "-xJf", str(root / "usr/src/nvidia-open-kernel.tar.xz"), "-C", str(trees)])
        opn = trees / "modules" / "nvidia-open-kernel"
    return prop, opn, actual


def _lay_out(pkg: Path, prop: Path, opn: Path | None, version: str) -> None:
    pkg.mkdir()
    shutil.copytree(prop, pkg / "kernel", symlinks=True)
    if opn is not None:
        shutil.copytree(opn, pkg / "kernel-open", symlinks=True)
    for t in ("kernel", "kernel-open"):  # Debian packaging files are not part of NVIDIA's layout
        for extra in ("debian", "dkms.conf"):
            p = pkg / t / extra
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    src = pkg.parent / "src"
    src.mkdir()
    (src / "lib.c").write_text(LIB_C.replace("@VERSION@", version))
    (src / "smi.c").write_text(SMI_C.replace("@VERSION@", version))
    lib = f"libnvidia-ml.so.{version}"
    _run(["cc", "-O2", "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1", "-o", str(pkg / lib), str(src / "lib.c")])
    _run(["cc", "-O2", "-o", str(pkg / "nvidia-smi"), str(src / "smi.c")])
    os.chmod(pkg / lib, 0o755)
    os.chmod(pkg / "nvidia-smi", 0o755)
    lines = [
        f"NVIDIA Accelerated Graphics Driver for Linux-{ARCH} (modulus test fixture)",
        version,
        "nvidia nvidia-uvm nvidia-modeset nvidia-drm nvidia-peermem",
        f"{lib} 0755 UTILITY_LIB NATIVE",
        f"libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE {lib}",
        "libnvidia-ml.so 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.1",
        "nvidia-smi 0755 UTILITY_BINARY",
    ]
    for tree, typ in (("kernel", "KERNEL_MODULE_SRC"), ("kernel-open", "KERNEL_MODULE_SRC")):
        base = pkg / tree
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            if f.is_file() and not f.is_symlink():
                mode = "0755" if os.access(f, os.X_OK) else "0644"
                lines.append("{} {} {} INHERIT_PATH_DEPTH:1 MODULE:{}".format(f.relative_to(pkg), mode, typ,
                                                                        "resman" if tree == "kernel" else "open"))
    (pkg / ".manifest").write_text("\n".join(lines) + "\n")


def _tar_payload(pkg: Path, out: Path) -> None:
    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = 1700000000
        return ti
    # gzip level 6 through the tool (faster than Python's zlib); the tar stream is deterministic.
    with open(out, "wb") as f:
        gz = subprocess.Popen(["gzip", "-6", "-n", "-c"], stdin=subprocess.PIPE, stdout=f)
        assert gz.stdin is not None
        with tarfile.open(fileobj=gz.stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for p in sorted(pkg.rglob("*"), key=lambda x: str(x.relative_to(pkg))):
                tar.add(p, arcname=str(p.relative_to(pkg)), recursive=False, filter=norm)
        gz.stdin.close()
        if gz.wait() != 0:
            raise RuntimeError("gzip failed")


def build_run(directory: Path, debian_version: str = DEBIAN_VERSION) -> NvidiaRun:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nvrun-", dir=directory) as td:
        work = Path(td)
        prop, opn, debian_version = _download_sources(work, debian_version)
        version = debian_version.split("-")[0].split(":")[-1]
        dest = directory / f"NVIDIA-Linux-{ARCH}-{version}.run"
        pkg = work / (f"NVIDIA-Linux-{ARCH}-{version}")
        _lay_out(pkg, prop, opn, version)
        payload = work / "payload.tar.gz"
        _tar_payload(pkg, payload)
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        stub = (STUB.replace("@ARCH@", ARCH).replace("@VERSION@", version)
                .replace("@DEBVER@", debian_version).replace("@SHA256@", sha256_file(payload))
                .replace("@SIZE@", str(size)))
        skip = stub.count("\n") + 1
        stub = stub.replace("@SKIP@", str(skip))
        assert stub.count("\n") + 1 == skip
        tmp = work / "out.run"
        with open(tmp, "wb") as f:
            f.write(stub.encode())
            with open(payload, "rb") as p:
                shutil.copyfileobj(p, f, 1 << 20)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    meta = NvidiaRun(path=dest, version=version, sha256=sha256_file(dest), arch=ARCH,
                     has_open=opn is not None, debian_version=debian_version)
    dest.with_suffix(".json").write_text(json.dumps({"version": version, "sha256": meta.sha256,
                                                     "has_open": meta.has_open, "deb": debian_version}))
    return meta


def nvidia_run(cache_dir: str | os.PathLike[str] | None = None, debian_version: str = DEBIAN_VERSION) -> NvidiaRun:
    """The cached NVIDIA-style .run (built on first use: about 1 minute)."""
    d = cache_root(cache_dir) / "nvidia" / recipe_key(debian_version)
    for meta_path in sorted(d.glob("NVIDIA-Linux-*.json")):
        meta = json.loads(meta_path.read_text())
        path = meta_path.with_suffix(".run")
        if path.is_file() and sha256_file(path) == meta["sha256"]:
            return NvidiaRun(path=path, version=meta["version"], sha256=meta["sha256"], arch=ARCH,
                             has_open=meta["has_open"], debian_version=meta["deb"])
    return build_run(d, debian_version)


if __name__ == "__main__":
    r = nvidia_run()
    print(r)


def build_cache(kit_recipe_hash: str) -> Path:
    """An archive root (``nvidia/<version>/<kernel>/``) where NVIDIA builds made by the tests are kept
    between runs, keyed by the kit, the ``.run`` and a hash of the code that builds
    (``kmodbuild.build_logic_hash``): no test reuses what older code made. Older keys are removed."""
    from ansible_collections.modulus.kmods.plugins.module_utils import kmodbuild

    run = nvidia_run()
    parent = cache_root() / "nvidia-builds"
    key = f"{kit_recipe_hash[:16]}-{run.sha256[:16]}-{kmodbuild.build_logic_hash()[:16]}"
    if parent.is_dir():
        for old in parent.iterdir():
            if old.name != key and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    (parent / key).mkdir(parents=True, exist_ok=True)
    return parent / key


def seed_archive(archive_root: Path, cache: Path) -> list[str]:
    """Copy the finished NVIDIA builds of ``cache`` into a host's archive root; kmod_build then decides
    from their manifests whether they are up to date. Returns the relative paths copied."""
    copied = []
    for kdir in sorted(cache.glob("nvidia/*/*")):
        if (kdir / "manifest.json").is_file():
            dest = archive_root / kdir.relative_to(cache)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(kdir, dest, symlinks=True)
            copied.append(str(kdir.relative_to(cache)))
    return copied


def keep_archive(archive_root: Path, cache: Path) -> None:
    """Save the NVIDIA builds of a host's archive root into ``cache`` (each renamed into place whole)."""
    for kdir in sorted(archive_root.glob("nvidia/*/*")):
        target = cache / kdir.relative_to(archive_root)
        if not (kdir / "manifest.json").is_file() or (target / "manifest.json").is_file():
            continue  # not a finished build (a lock file, a workspace), or already kept
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(kdir, tmp, symlinks=True)
        os.rename(tmp, target)
