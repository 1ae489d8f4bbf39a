"""The kit's zfs-style extension (sim.kmodext): laid out as Flatcar's build_library/sysext_mangle_kmod
leaves its kmod extensions, with two real modules (spl, zfs needing spl) built for a kit kernel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sim import kmodext
from sim.booted import SUITES, boot, booted_root
from sim.kit import Kit
from sim.qemu import boot_and_load, kernel_dir


@pytest.fixture(scope="module")
def zfs_ext(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kmodext.zfs_style_extension(kit, tmp_path_factory.mktemp("zfsext"))


def _modinfo(ko: Path, field: str) -> str:
    return subprocess.run(["/usr/sbin/modinfo", "-F", field, str(ko)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_layout_is_flatcars_kmod_sysext(kit: Kit, zfs_ext: Path) -> None:
    rel = kit.releases["current"]
    assert zfs_ext.name == "flatcar-zfs"
    files = sorted(str(p.relative_to(zfs_ext)) for p in zfs_ext.rglob("*") if not p.is_dir())
    assert files == [
        "usr/lib/extension-release.d/extension-release.flatcar-zfs",
        "usr/lib/modprobe.d/10-flatcar-zfs-kmod-sysext.conf",
        f"usr/lib/modules/{rel.kernel}/extra/spl.ko",
        f"usr/lib/modules/{rel.kernel}/extra/zfs.ko",
        "usr/libexec/_flatcar-zfs_modprobe_helper",
    ]
    # no modules.* (nor any file) directly in usr/lib/modules/<kver>: the base index stays the kernel's
    assert not [p for p in (zfs_ext / "usr/lib/modules" / rel.kernel).iterdir() if p.is_file()]
    conf = (zfs_ext / "usr/lib/modprobe.d/10-flatcar-zfs-kmod-sysext.conf").read_text()
    assert conf == ("install spl /usr/libexec/_flatcar-zfs_modprobe_helper spl\n"
                    "remove spl /usr/libexec/_flatcar-zfs_modprobe_helper -r spl\n"
                    "install zfs /usr/libexec/_flatcar-zfs_modprobe_helper zfs\n"
                    "remove zfs /usr/libexec/_flatcar-zfs_modprobe_helper -r zfs\n")
    helper = zfs_ext / "usr/libexec/_flatcar-zfs_modprobe_helper"
    assert helper.stat().st_mode & 0o777 == 0o755
    text = helper.read_text()
    assert text.startswith("#!/bin/bash\n") and "KMOD_PATH=/usr/lib/modules/$(uname -r)" in text
    assert 'modprobe --ignore-install "\\${@}"' in text and "unshare -m bash -s" in text
    release = (zfs_ext / "usr/lib/extension-release.d/extension-release.flatcar-zfs").read_text()
    assert f"ID='flatcar'\nVERSION_ID='{rel.version}'\n" in release and "SYSEXT_ID='flatcar-zfs'" in release
    ext = zfs_ext / "usr/lib/modules" / rel.kernel / "extra"
    assert _modinfo(ext / "zfs.ko", "vermagic").split()[0] == rel.kernel
    assert _modinfo(ext / "zfs.ko", "depends") == "spl" and _modinfo(ext / "spl.ko", "depends") == ""


def test_the_pending_release_gets_its_own_build(kit: Kit, tmp_path: Path) -> None:
    rel = kit.releases["pending"]
    ext = kmodext.zfs_style_extension(kit, tmp_path, release="pending", name="flatcar-zfs")
    ko = ext / "usr/lib/modules" / rel.kernel / "extra/zfs.ko"
    assert _modinfo(ko, "vermagic").split()[0] == rel.kernel
    assert f"VERSION_ID='{rel.version}'" in (ext / "usr/lib/extension-release.d/extension-release.flatcar-zfs").read_text()


def test_modules_load_into_the_kit_kernel(kit: Kit, zfs_ext: Path) -> None:
    rel = kit.releases["current"]
    ext = zfs_ext / "usr/lib/modules" / rel.kernel / "extra"
    res = boot_and_load(rel.kernel, [ext / "spl.ko", ext / "zfs.ko"])
    assert res.booted, res.console[-2000:]
    assert res.results["spl"].ok and res.results["zfs"].ok, res.console[-2000:]
    assert {"spl", "zfs"} <= set(res.loaded)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_merged_beside_the_base_index_the_helper_resolves_the_dependency(kit: Kit, zfs_ext: Path, suite: str) -> None:
    """Merged by systemd-sysext: the base modules.dep stays the kernel's; modprobe goes through the
    install line, and the helper's depmod in a private namespace finds spl for zfs."""
    rel = kit.releases["current"]
    kver = rel.kernel
    helper = kmodext.helper_path()
    probe = f"""
echo "== merged"; systemd-sysext status --no-pager | grep -c flatcar-zfs
echo "== base-dep"; md5sum < /usr/lib/modules/{kver}/modules.dep
echo "== zfs-in-base"; grep -c 'extra/zfs.ko' /usr/lib/modules/{kver}/modules.dep; true
echo "== show"; modprobe -S {kver} --show-depends zfs; echo "rc=$?"
echo "== helper"; /etc/modulus-helper-{kver} --show-depends zfs; echo "rc=$?"
echo "== base-dep-after"; md5sum < /usr/lib/modules/{kver}/modules.dep
echo "== end"
"""
    helper_copy = Path(str(zfs_ext) + f".helper-{suite}")
    helper_copy.write_text(kmodext.helper_for_kernel(kver))
    helper_copy.chmod(0o755)
    res = boot(booted_root(suite=suite), os_release={"ID": "flatcar", "VERSION_ID": rel.version},
               extensions={"flatcar-zfs": zfs_ext}, probe=probe,
               copy_in={f"/usr/lib/modules/{kver}": kernel_dir(kver) / "lib/modules" / kver,
                        f"/etc/modulus-helper-{kver}": helper_copy}, copy_root=True)
    assert not res.timed_out and "== end" in res.output, res.console[-3000:] + res.output
    sec = {}
    for chunk in res.output.split("== ")[1:]:
        title, _, body = chunk.partition("\n")
        sec[title.strip()] = body.strip()
    assert int(sec["merged"].splitlines()[0]) >= 1, res.output
    assert sec["zfs-in-base"] == "0", res.output
    assert sec["show"].splitlines()[0].strip() == f"install {helper} zfs", res.output
    # the helper's depmod found zfs's dependency: spl goes through its own install line (the helper
    # again), zfs itself is inserted from the extension
    lines = [line.strip().replace(" /usr/lib/", " /lib/") for line in sec["helper"].splitlines()
             if line.startswith(("insmod ", "install "))]
    assert lines == [f"install {helper} spl", f"insmod /lib/modules/{kver}/extra/zfs.ko"], res.output
    assert sec["base-dep"] == sec["base-dep-after"], res.output
