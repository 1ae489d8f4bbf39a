"""The NVIDIA recipe: versions, download URLs, the .run's .manifest, the userspace layout, the script part."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import nvidia
from ansible_collections.modulus.kmods.plugins.module_utils.identity import IdentityError
from ansible_collections.modulus.kmods.plugins.module_utils.sources import BuildError, InputError


@pytest.mark.parametrize("v", ["535.104.05", "550.54.14", "390.157", "570.133.20", "1000.1.1"])
def test_nvidia_versions_ok(v: str) -> None:
    assert nvidia.check_version(v) == v


@pytest.mark.parametrize("v", ["", None, "535", "535.104.05.1", "535.104.05;rm -rf /", "../535.1", "5.1.0", "latest",
                               "535.1a.2", "535.104.05\n", "\n535.104.05"])
def test_nvidia_versions_rejected(v: str) -> None:
    with pytest.raises(IdentityError, match="version="):
        nvidia.check_version(v)


def test_url_template() -> None:
    assert nvidia.nvidia_url("535.104.05", "x86_64") == \
        "https://us.download.nvidia.com/XFree86/Linux-x86_64/535.104.05/NVIDIA-Linux-x86_64-535.104.05.run"
    assert nvidia.nvidia_url("550.54.14", "aarch64") == \
        "https://us.download.nvidia.com/XFree86/Linux-aarch64/550.54.14/NVIDIA-Linux-aarch64-550.54.14.run"
    assert nvidia.nvidia_url("535.261.03", "x86_64", nvidia.NVIDIA_TESLA_URL_TEMPLATE) == \
        "https://us.download.nvidia.com/tesla/535.261.03/NVIDIA-Linux-x86_64-535.261.03.run"
    assert nvidia.nvidia_url("535.261.03", "x86_64", "http://m/{branch}/{version}.run") == "http://m/535/535.261.03.run"
    with pytest.raises(InputError, match="arch="):
        nvidia.nvidia_url("535.104.05", "ppc64le")
    with pytest.raises(InputError, match="url_template="):
        nvidia.nvidia_url("535.104.05", "x86_64", "http://m/{nope}.run")
    with pytest.raises(IdentityError, match="version="):
        nvidia.nvidia_url("535.104.05\n", "x86_64")


MANIFEST = """NVIDIA Accelerated Graphics Driver for Linux-x86_64
535.261.03
nvidia nvidia-uvm nvidia-modeset nvidia-drm nvidia-peermem
kernel/nvidia/nv.c 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman
libnvidia-ml.so.535.261.03 0755 UTILITY_LIB NATIVE
libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.535.261.03
libnvidia-ml.so 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.1
32/libcuda.so.535.261.03 0755 CUDA_LIB COMPAT32
libcuda.so.535.261.03 0755 CUDA_LIB NATIVE
libcuda.so.1 0000 CUDA_SYMLINK NATIVE libcuda.so.535.261.03
nvidia-smi 0755 UTILITY_BINARY
nvidia-smi.1.gz 0644 MANPAGE
nvidia_drv.so 0755 XMODULE_SHARED_LIB
firmware/gsp_ga10x.bin 0644 FIRMWARE REPLACE_PATH:nvidia/535.261.03/
nvidia-modprobe 4755 UTILITY_BINARY
"""


def test_parse_manifest_and_plan() -> None:
    header, entries = nvidia.parse_nvidia_manifest(MANIFEST)
    assert header == {"description": "NVIDIA Accelerated Graphics Driver for Linux-x86_64", "version": "535.261.03"}
    plan = {f.dest: f for f in nvidia.plan_userspace(entries, "535.261.03")}
    assert set(plan) == {
        "lib/libnvidia-ml.so.535.261.03", "lib/libnvidia-ml.so.1", "lib/libnvidia-ml.so",
        "lib/libcuda.so.535.261.03", "lib/libcuda.so.1", "bin/nvidia-smi", "bin/nvidia-modprobe",
        "lib/firmware/nvidia/535.261.03/gsp_ga10x.bin",
    }
    assert plan["lib/libnvidia-ml.so.1"].link_target == "libnvidia-ml.so.535.261.03"
    assert plan["bin/nvidia-smi"].src == "nvidia-smi" and plan["bin/nvidia-smi"].mode == 0o755
    assert plan["bin/nvidia-modprobe"].mode == 0o755  # setuid bit dropped
    assert plan["lib/libcuda.so.535.261.03"].src == "libcuda.so.535.261.03"  # the native one, not 32/


def test_manifest_lines_are_matched_whole() -> None:
    _h, entries = nvidia.parse_nvidia_manifest("d\n1.2.3\nlibx.so.1 07555 UTILITY_LIB NATIVE\nliby.so.1 0755 UTILITY_lib\n")
    assert entries == []


def test_manifest_traversal_rejected() -> None:
    _h, entries = nvidia.parse_nvidia_manifest("d\n1.2.3\n../../etc/evil.so 0755 UTILITY_LIB NATIVE\n")
    with pytest.raises(BuildError, match="leaves the extracted tree"):
        nvidia.plan_userspace(entries, "1.2.3")
    _h, entries = nvidia.parse_nvidia_manifest("d\n1.2.3\n/etc/evil 0755 UTILITY_BINARY\n")
    with pytest.raises(BuildError, match="leaves the extracted tree"):
        nvidia.plan_userspace(entries, "1.2.3")
    _h, entries = nvidia.parse_nvidia_manifest("d\n1.2.3\nlibx.so.1 0000 UTILITY_LIB_SYMLINK NATIVE ../../etc/passwd\n")
    assert nvidia.plan_userspace(entries, "1.2.3") == []  # a symlink leaving lib/ is not created


def _tree(tmp_path: Path, manifest: str = MANIFEST) -> Path:
    tree = tmp_path / "tree"
    (tree / "firmware").mkdir(parents=True)
    (tree / ".manifest").write_text(manifest)
    for name in ("libnvidia-ml.so.535.261.03", "libcuda.so.535.261.03", "nvidia-smi", "nvidia-modprobe",
                 "firmware/gsp_ga10x.bin"):
        (tree / name).write_bytes(name.encode())
    return tree


def test_stage_userspace_lays_out_dest(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    nvidia.stage_userspace(str(_tree(tmp_path)), str(stage), "535.261.03")
    assert os.readlink(stage / "lib/libnvidia-ml.so") == "libnvidia-ml.so.1"
    assert (stage / "lib/libnvidia-ml.so").read_bytes() == b"libnvidia-ml.so.535.261.03"
    assert (stage / "bin/nvidia-modprobe").stat().st_mode & 0o7777 == 0o755
    assert (stage / "lib/firmware/nvidia/535.261.03/gsp_ga10x.bin").stat().st_mode & 0o777 == 0o644


def test_stage_userspace_refuses_what_does_not_fit(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not version=535.104.05"):
        nvidia.stage_userspace(str(_tree(tmp_path)), str(tmp_path / "s1"), "535.104.05")
    tree = _tree(tmp_path / "b")
    (tree / "nvidia-smi").unlink()
    (tree / "nvidia-smi").symlink_to("/etc/passwd")
    with pytest.raises(BuildError, match="no such regular file"):
        nvidia.stage_userspace(str(tree), str(tmp_path / "s2"), "535.261.03")
    dangling = MANIFEST + "libgone.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libgone.so.535.261.03\n"
    with pytest.raises(BuildError, match="points to nothing"):
        nvidia.stage_userspace(str(_tree(tmp_path / "c", dangling)), str(tmp_path / "s3"), "535.261.03")
    with pytest.raises(BuildError, match="no .manifest"):
        nvidia.stage_userspace(str(tmp_path / "nothing"), str(tmp_path / "s4"), "535.261.03")


def test_script_lines_build_one_flavour() -> None:
    text = "\n".join(nvidia.script_lines("open", "'V=1'", "/in"))
    assert "sh /in/driver.run --extract-only" in text and 'make -C "$W/tree/kernel-open"' in text
    assert 'rm -rf "$W/tree/kernel"' in text and "'V=1' modules" in text
    assert 'MODDIR="$W/tree/kernel"' in "\n".join(nvidia.script_lines("proprietary", "", "/in"))
