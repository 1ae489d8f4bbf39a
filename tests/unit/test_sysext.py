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
                manifest_sha256="a" * 64, modules_load="nvidia\n", modules=["nvidia"], fmt=fmt)
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
    for change in ({"release": "9001.3.0"}, {"manifest_sha256": "b" * 64}, {"modules": ["nvidia", "nvidia_uvm"]},
                   {"fmt": "squashfs"}, {"modules_load": "nvidia\nnvidia_uvm\n"}):
        assert spec(**change).content_key() != base, change


def test_content_key_ignores_the_host(tmp_path: Path) -> None:
    """Nothing of the host goes into the key: it is the same whatever /usr/lib/modules shows (merged or not)."""
    import inspect
    fields = set(inspect.signature(sysext.ImageSpec).parameters)
    assert fields == {"driver", "os_id", "release", "kernel_release", "board", "manifest_sha256", "modules_load",
                      "modules", "fmt", "extra"}
    assert spec(modules=["b", "a"]).content_key() == spec(modules=["a", "b"]).content_key()


def test_populate_directory(tmp_path: Path) -> None:
    m = make_build(tmp_path / "b")
    root = tmp_path / "img"
    root.mkdir()
    s = spec()
    res = sysext.populate(str(root), str(tmp_path / "b"), m, s)
    assert res == {"files": 5, "modprobe_conf": "/usr/lib/modprobe.d/10-modulus-nvidia-kmod-sysext.conf",
                   "helper": "/usr/libexec/_modulus-nvidia_modprobe_helper"}
    rel = root / "usr/lib/extension-release.d/extension-release.modulus-nvidia-9001.2.0"
    assert sysext.read_extension_release(str(root), s.name)["VERSION_ID"] == "9001.2.0" and rel.is_file()
    assert (root / "usr/lib/modules-load.d/modulus-nvidia.conf").read_text() == "nvidia\n"
    assert (root / "usr/share/modulus/nvidia/manifest.json").is_file()
    assert (root / "usr/lib64/libnvidia-ml.so.1").is_symlink()
    assert (root / "usr/bin/nvidia-smi").stat().st_mode & 0o777 == 0o755
    assert not (root / "build.log").exists() and not list(root.rglob("build.log"))
    assert sysext.tree_size(str(root)) > 0
    # Flatcar's kmod convention: no index of the kernel, install/remove lines, the helper
    kdir = root / f"usr/lib/modules/{K}"
    assert sorted(p.name for p in kdir.iterdir()) == ["updates"]
    assert not list(root.rglob("modules.*"))
    assert (root / "usr/lib/modprobe.d/10-modulus-nvidia-kmod-sysext.conf").read_text() == (
        "install nvidia /usr/libexec/_modulus-nvidia_modprobe_helper nvidia\n"
        "remove nvidia /usr/libexec/_modulus-nvidia_modprobe_helper -r nvidia\n")
    helper = root / "usr/libexec/_modulus-nvidia_modprobe_helper"
    assert helper.stat().st_mode & 0o777 == 0o755
    text = helper.read_text()
    assert text.startswith("#!/bin/bash\n") and "unshare -m bash -s" in text and "modprobe --ignore-install" in text
    assert subprocess.run(["bash", "-n", str(helper)], check=False).returncode == 0


def test_modprobe_conf_one_line_pair_per_module() -> None:
    from ansible_collections.modulus.kmods.plugins.module_utils._install import kmod_sysext
    text = kmod_sysext.conf_text("modulus-nvidia", ["nvidia_uvm", "nvidia", "nvidia_modeset", "nvidia"])
    assert text.splitlines() == [
        f"{verb} {m} /usr/libexec/_modulus-nvidia_modprobe_helper {'-r ' if verb == 'remove' else ''}{m}"
        for m in ("nvidia", "nvidia_modeset", "nvidia_uvm") for verb in ("install", "remove")]
    with pytest.raises(ValueError, match="not a kernel module name"):
        kmod_sysext.conf_text("modulus-nvidia", ["nvidia; rm -rf /"])
    with pytest.raises(ValueError):
        kmod_sysext.helper_path("../x")


def test_populate_many_modules(tmp_path: Path) -> None:
    m = make_build(tmp_path / "b")
    (tmp_path / f"b/lib/modules/{K}/nvidia-modeset.ko").write_bytes(b"\x7fELF")
    m["files"] = list_files(str(tmp_path / "b"))
    m["modules"].append({"name": "nvidia-modeset", "file": f"lib/modules/{K}/nvidia-modeset.ko", "depends": ["nvidia"]})
    root = tmp_path / "img"
    root.mkdir()
    sysext.populate(str(root), str(tmp_path / "b"), m, spec(modules=["nvidia", "nvidia_modeset"]))
    conf = (root / "usr/lib/modprobe.d/10-modulus-nvidia-kmod-sysext.conf").read_text()
    assert "install nvidia_modeset /usr/libexec/_modulus-nvidia_modprobe_helper nvidia_modeset\n" in conf
    assert (root / f"usr/lib/modules/{K}/updates/modulus/nvidia/nvidia-modeset.ko").is_file()


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


def test_helper_is_flatcars_line_for_line() -> None:
    """The helper is the one Flatcar's sysext_mangle_kmod installs, but for its comment header."""
    from ansible_collections.modulus.kmods.plugins.module_utils._install import kmod_sysext
    source = (Path(__file__).resolve().parents[1] / "fixtures/flatcar/sysext_mangle_kmod").read_text()
    flatcar = source.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0].splitlines()
    ours = [line for line in kmod_sysext.helper_text("modulus-nvidia").splitlines() if not line.startswith("# ")]
    assert ours == flatcar
