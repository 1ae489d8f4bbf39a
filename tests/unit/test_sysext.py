"""The sysext image of a build (sysext.py): name, extension-release, layout, content key, formats."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import sysext
from ansible_collections.modulus.kmods.plugins.module_utils.manifest import list_files

K = "6.1.0-50-amd64"


def make_build(root: Path, driver: str = "nvidia") -> dict:
    (root / f"lib/modules/{K}").mkdir(parents=True)
    (root / f"lib/modules/{K}/nvidia.ko").write_bytes(b"\x7fELF-not-really")
    (root / "lib/firmware/nvidia/535").mkdir(parents=True)
    (root / "lib/firmware/nvidia/535/gsp.bin").write_bytes(b"fw")
    (root / "lib/libnvidia-ml.so.535.261.03").write_bytes(b"lib")
    (root / "lib/libnvidia-ml.so.1").symlink_to("libnvidia-ml.so.535.261.03")
    (root / "bin").mkdir()
    (root / "bin/nvidia-smi").write_text("#!/bin/sh\necho smi\n")
    (root / "bin/nvidia-smi").chmod(0o755)
    (root / "build.log").write_text("log\n")
    m = {"schema": 1, "driver": driver, "driver_version": "535.261.03", "kernel_release": K, "os": "flatcar",
         "os_version": "9001.2.0", "board": "amd64-usr", "files": list_files(str(root)),
         "modules": [{"name": "nvidia", "file": f"lib/modules/{K}/nvidia.ko", "depends": []}]}
    (root / "manifest.json").write_text(__import__("json").dumps(m))
    return m


def spec(fmt: str = "directory", **kw) -> sysext.ImageSpec:
    args = dict(driver="nvidia", os_id="flatcar", release="9001.2.0", kernel_release=K, board="amd64-usr",
                manifest_sha256="a" * 64, modules_load="nvidia\n", base_index=None, fmt=fmt)
    args.update(kw)
    return sysext.ImageSpec(**args)


def test_names_and_paths() -> None:
    assert sysext.image_name("nvidia", "9001.2.0") == "modulus-nvidia-9001.2.0"
    assert sysext.image_path("/var/lib/extensions", "x", "squashfs") == "/var/lib/extensions/x.raw"
    assert sysext.image_path("/var/lib/extensions", "x", "directory") == "/var/lib/extensions/x"
    with pytest.raises(sysext.SysextError, match="sysext_format='zip'"):
        sysext.image_path("/e", "x", "zip")
    with pytest.raises(ValueError):
        sysext.image_name("../x", "9001.2.0")
    with pytest.raises(ValueError):
        sysext.image_name("nvidia", "9001.2.0\n")


def test_extension_release_binds_to_one_release() -> None:
    text = spec().release_text()
    lines = text.splitlines()
    assert lines[:3] == ["ID=flatcar", "VERSION_ID=9001.2.0", "ARCHITECTURE=x86-64"]
    assert f"MODULUS_KERNEL_RELEASE={K}" in lines and "MODULUS_DRIVER=nvidia" in lines
    values = dict(line.split("=", 1) for line in lines)
    assert sysext.matches(values, {"ID": "flatcar", "VERSION_ID": "9001.2.0"})
    assert not sysext.matches(values, {"ID": "flatcar", "VERSION_ID": "9001.1.0"})
    assert not sysext.matches(values, {"ID": "debian", "VERSION_ID": "9001.2.0"})
    assert sysext.matches({"ID": "_any", "SYSEXT_LEVEL": "1.0"}, {"ID": "flatcar", "SYSEXT_LEVEL": "1.0"})
    with pytest.raises(sysext.SysextError):
        sysext.extension_release("n", "flatcar", "9001.2.0", extra={"X": "a\nb"})


def test_layout(tmp_path: Path) -> None:
    m = make_build(tmp_path / "b")
    got = {e.src: (e.dst, e.link) for e in sysext.layout(m, "nvidia")}
    assert got == {
        f"lib/modules/{K}/nvidia.ko": (f"usr/lib/modules/{K}/updates/modulus/nvidia/nvidia.ko", None),
        "lib/firmware/nvidia/535/gsp.bin": ("usr/lib/firmware/nvidia/535/gsp.bin", None),
        "lib/libnvidia-ml.so.535.261.03": ("usr/lib64/libnvidia-ml.so.535.261.03", None),
        "lib/libnvidia-ml.so.1": ("usr/lib64/libnvidia-ml.so.1", "libnvidia-ml.so.535.261.03"),
        "bin/nvidia-smi": ("usr/bin/nvidia-smi", None),
    }
    assert sysext.module_dir(K, "nvidia") == f"/usr/lib/modules/{K}/updates/modulus/nvidia"


def test_content_key_changes_with_what_matters() -> None:
    base = spec().content_key()
    assert spec().content_key() == base
    for change in ({"release": "9001.3.0"}, {"manifest_sha256": "b" * 64}, {"base_index": "x"},
                   {"fmt": "squashfs"}, {"modules_load": "nvidia\nnvidia_uvm\n"}):
        assert spec(**change).content_key() != base, change


def test_populate_directory(tmp_path: Path) -> None:
    m = make_build(tmp_path / "b")
    root = tmp_path / "img"
    root.mkdir()
    s = spec()
    res = sysext.populate(str(root), str(tmp_path / "b"), m, s)
    assert res == {"files": 5, "index": []}
    rel = root / "usr/lib/extension-release.d/extension-release.modulus-nvidia-9001.2.0"
    assert sysext.read_extension_release(str(root), s.name)["VERSION_ID"] == "9001.2.0" and rel.is_file()
    assert (root / "usr/lib/modules-load.d/modulus-nvidia.conf").read_text() == "nvidia\n"
    assert (root / "usr/share/modulus/nvidia/manifest.json").is_file()
    assert (root / "usr/lib64/libnvidia-ml.so.1").is_symlink()
    assert (root / "usr/bin/nvidia-smi").stat().st_mode & 0o777 == 0o755
    assert not (root / "build.log").exists() and not list(root.rglob("build.log"))
    assert sysext.tree_size(str(root)) > 0


@pytest.mark.parametrize("fmt,tool", [("squashfs", "mksquashfs"), ("erofs", "mkfs.erofs")])
def test_make_image_is_reproducible(tmp_path: Path, fmt: str, tool: str) -> None:
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed (scripts/install-system-deps.sh installs it)")
    m = make_build(tmp_path / "b")
    root = tmp_path / "img"
    root.mkdir()
    sysext.populate(str(root), str(tmp_path / "b"), m, spec(fmt))
    sysext.make_image(str(root), str(tmp_path / "1.raw"), fmt)
    sysext.make_image(str(root), str(tmp_path / "2.raw"), fmt)
    assert (tmp_path / "1.raw").read_bytes() == (tmp_path / "2.raw").read_bytes()
    if fmt == "squashfs":
        listing = subprocess.run(["unsquashfs", "-l", str(tmp_path / "1.raw")], capture_output=True, text=True,
                                 check=True).stdout
        assert "squashfs-root/usr/lib/extension-release.d/extension-release.modulus-nvidia-9001.2.0" in listing


def test_list_images(tmp_path: Path) -> None:
    for name in ("modulus-nvidia-9001.1.0.raw", "modulus-nvidia-9001.2.0", "modulus-nvidia-open-1.raw", "other.raw"):
        (tmp_path / name).mkdir() if "." not in name[-4:] else (tmp_path / name).write_text("")
    found = sysext.list_images(str(tmp_path), "nvidia")
    assert sorted(found) == ["modulus-nvidia-9001.1.0", "modulus-nvidia-9001.2.0", "modulus-nvidia-open-1"]
