"""kmodbuild: validation, NVIDIA URL and module type rules, .manifest handling, inputs, DEST state."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import kmodbuild as kb
from ansible_collections.modulus.kmods.plugins.module_utils.devcontainer import ImageInfo

FLATCAR = {"FLATCAR_RELEASE_VERSION": "9001.2.0", "FLATCAR_RELEASE_BOARD": "amd64-usr", "ID": "flatcar"}


def info(kernels: list[str] | None = None, board: str = "amd64-usr") -> ImageInfo:
    return ImageInfo(kernel_releases=kernels if kernels is not None else ["6.1.0-50-amd64"], release=dict(FLATCAR),
                     version="9001.2.0", board=board, root_offset=2097152, root_size=1 << 30)


@pytest.mark.parametrize("v", ["535.104.05", "550.54.14", "390.157", "570.133.20", "1000.1.1"])
def test_nvidia_versions_ok(v: str) -> None:
    assert kb.validate_nvidia_version(v) == v


@pytest.mark.parametrize("v", ["", "535", "535.104.05.1", "535.104.05;rm -rf /", "../535.1", "5.1.0", "latest", "535.1a.2"])
def test_nvidia_versions_rejected(v: str) -> None:
    with pytest.raises(kb.InputError, match="version="):
        kb.validate_nvidia_version(v)


def test_url_template() -> None:
    assert kb.nvidia_url("535.104.05", "x86_64") == \
        "https://us.download.nvidia.com/XFree86/Linux-x86_64/535.104.05/NVIDIA-Linux-x86_64-535.104.05.run"
    assert kb.nvidia_url("550.54.14", "aarch64") == \
        "https://us.download.nvidia.com/XFree86/Linux-aarch64/550.54.14/NVIDIA-Linux-aarch64-550.54.14.run"
    assert kb.nvidia_url("535.261.03", "x86_64", kb.NVIDIA_TESLA_URL_TEMPLATE) == \
        "https://us.download.nvidia.com/tesla/535.261.03/NVIDIA-Linux-x86_64-535.261.03.run"
    assert kb.nvidia_url("535.261.03", "x86_64", "http://m/{branch}/{version}.run") == "http://m/535/535.261.03.run"
    with pytest.raises(kb.InputError, match="arch="):
        kb.nvidia_url("535.104.05", "ppc64le")
    with pytest.raises(kb.InputError, match="url_template="):
        kb.nvidia_url("535.104.05", "x86_64", "http://m/{nope}.run")


def test_module_type_rule() -> None:
    assert kb.resolve_module_type("auto", "535.104.05") == "proprietary"
    assert kb.resolve_module_type("auto", "555.58.02") == "proprietary"
    assert kb.resolve_module_type("auto", "560.35.03") == "open"
    assert kb.resolve_module_type("auto", "570.133.20") == "open"
    assert kb.resolve_module_type("open", "535.104.05") == "open"
    assert kb.resolve_module_type("proprietary", "570.133.20") == "proprietary"
    with pytest.raises(kb.InputError, match="no open kernel modules"):
        kb.resolve_module_type("open", "470.256.02")
    with pytest.raises(kb.InputError, match="kernel_module_type="):
        kb.resolve_module_type("closed", "535.104.05")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 80, "a b", "..", "a..b"])
def test_names_rejected(name: str) -> None:
    with pytest.raises(kb.InputError, match="modules="):
        kb.validate_name("modules", name)


def test_make_args_and_subdir() -> None:
    assert kb.validate_make_args(["CONFIG_X=m", "-k", "V=1", "modules"]) == ["CONFIG_X=m", "-k", "V=1", "modules"]
    with pytest.raises(kb.InputError, match="make_args"):
        kb.validate_make_args(["$(shell id)"])
    assert kb.validate_subdir("src/kmod/") == "src/kmod"
    for bad in ("/abs", "../up", "a/../../b"):
        with pytest.raises(kb.InputError, match="subdir="):
            kb.validate_subdir(bad)


def test_checksum_forms() -> None:
    h = "ab" * 32
    assert kb.validate_sha256(h.upper()) == h
    assert kb.validate_sha256("sha256:" + h) == h
    assert kb.validate_sha256(None) is None
    with pytest.raises(kb.InputError, match="checksum="):
        kb.validate_sha256("md5:abc")


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
    header, entries = kb.parse_nvidia_manifest(MANIFEST)
    assert header == {"description": "NVIDIA Accelerated Graphics Driver for Linux-x86_64", "version": "535.261.03"}
    plan = {f.dest: f for f in kb.plan_userspace(entries, "535.261.03")}
    assert set(plan) == {
        "lib/libnvidia-ml.so.535.261.03", "lib/libnvidia-ml.so.1", "lib/libnvidia-ml.so",
        "lib/libcuda.so.535.261.03", "lib/libcuda.so.1", "bin/nvidia-smi", "bin/nvidia-modprobe",
        "lib/firmware/nvidia/535.261.03/gsp_ga10x.bin",
    }
    assert plan["lib/libnvidia-ml.so.1"].link_target == "libnvidia-ml.so.535.261.03"
    assert plan["bin/nvidia-smi"].src == "nvidia-smi" and plan["bin/nvidia-smi"].mode == 0o755
    assert plan["bin/nvidia-modprobe"].mode == 0o755  # setuid bit dropped
    assert plan["lib/libcuda.so.535.261.03"].src == "libcuda.so.535.261.03"  # the native one, not 32/


def test_manifest_traversal_rejected() -> None:
    _h, entries = kb.parse_nvidia_manifest("d\n1.2.3\n../../etc/evil.so 0755 UTILITY_LIB NATIVE\n")
    with pytest.raises(kb.BuildError, match="leaves the extracted tree"):
        kb.plan_userspace(entries, "1.2.3")
    _h, entries = kb.parse_nvidia_manifest("d\n1.2.3\nlibx.so.1 0000 UTILITY_LIB_SYMLINK NATIVE ../../etc/passwd\n")
    assert kb.plan_userspace(entries, "1.2.3") == []  # a symlink leaving lib/ is not created


def test_source_kind(tmp_path: Path) -> None:
    assert kb.source_kind("nvidia", None, None) == "url"
    assert kb.source_kind("nvidia", "https://mirror/x.run", None) == "url"
    assert kb.source_kind("generic", "https://github.com/x/y.git", None) == "git"
    assert kb.source_kind("generic", "https://h/x.tar.gz", "v1") == "git"
    assert kb.source_kind("generic", str(tmp_path), None) == "dir"
    t = tmp_path / "s.tar.gz"
    t.write_bytes(b"x")
    assert kb.source_kind("generic", str(t), None) == "file"
    with pytest.raises(kb.InputError, match="source is required"):
        kb.source_kind("generic", None, None)
    with pytest.raises(kb.InputError, match="absolute path"):
        kb.source_kind("generic", "relative/dir", None)
    with pytest.raises(kb.InputError, match="does not exist"):
        kb.source_kind("nvidia", str(tmp_path / "missing.run"), None)
    with pytest.raises(kb.InputError, match="directory"):
        kb.source_kind("nvidia", str(tmp_path), None)
    with pytest.raises(kb.InputError, match="scheme"):
        kb.source_kind("nvidia", "ftp://h/x.run", None)


def nvidia_req(tmp_path: Path, **kw) -> kb.BuildRequest:
    base = dict(recipe="nvidia", image=str(tmp_path / "img"), dest=str(tmp_path / "out"), version="535.261.03")
    base.update(kw)
    return kb.BuildRequest(**base)


def test_resolve_nvidia_defaults(tmp_path: Path) -> None:
    r = kb.resolve(nvidia_req(tmp_path), info())
    assert r.kernel_release == "6.1.0-50-amd64"
    assert r.module_type == "proprietary" and r.arch == "x86_64"
    assert r.source.endswith("/Linux-x86_64/535.261.03/NVIDIA-Linux-x86_64-535.261.03.run")
    assert r.source_identity == "url:" + r.source
    assert r.expected_modules == list(kb.NVIDIA_DEFAULT_MODULES)
    pinned = kb.resolve(nvidia_req(tmp_path, checksum="cd" * 32), info())
    assert pinned.source_identity == "sha256:" + "cd" * 32
    assert pinned.inputs_sha256 != r.inputs_sha256
    arm = kb.resolve(nvidia_req(tmp_path), info(board="arm64-usr"))
    assert arm.arch == "aarch64" and "Linux-aarch64" in arm.source


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(kb.InputError, match="recipe="):
        kb.resolve(nvidia_req(tmp_path, recipe="dkms"), info())
    with pytest.raises(kb.InputError, match="several kernels"):
        kb.resolve(nvidia_req(tmp_path), info(["6.1.0-47-amd64", "6.1.0-50-amd64"]))
    with pytest.raises(kb.InputError, match="not in the image"):
        kb.resolve(nvidia_req(tmp_path, kernel_release="6.1.0-99-amd64"), info())
    with pytest.raises(kb.InputError, match="kernel_release="):
        kb.resolve(nvidia_req(tmp_path, kernel_release="../../etc"), info([]))
    with pytest.raises(kb.InputError, match="dest="):
        kb.resolve(nvidia_req(tmp_path, dest="relative/out"), info())
    with pytest.raises(kb.InputError, match="dest="):
        kb.resolve(nvidia_req(tmp_path, dest="/"), info())
    with pytest.raises(kb.InputError, match="version="):
        kb.resolve(nvidia_req(tmp_path, version="535.104.05; reboot"), info())
    with pytest.raises(kb.InputError, match="modules is required"):
        kb.resolve(kb.BuildRequest(recipe="generic", image="/i", dest=str(tmp_path / "o"), name="x",
                                   source=str(tmp_path)), info())
    with pytest.raises(kb.InputError, match="modules="):
        kb.resolve(kb.BuildRequest(recipe="generic", image="/i", dest=str(tmp_path / "o"), name="x",
                                   source=str(tmp_path), modules=["../evil"]), info())
    run = tmp_path / "d.run"
    run.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(kb.InputError, match="does not match"):
        kb.resolve(nvidia_req(tmp_path, source=str(run), checksum="00" * 32), info())


def test_inputs_change_with_what_matters(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.c").write_text("int x;\n")

    def gen(**kw) -> str:
        base = dict(recipe="generic", image="/i", dest=str(tmp_path / "o"), name="hello", source=str(src),
                    modules=["hello"])
        base.update(kw)
        return kb.resolve(kb.BuildRequest(**base), info()).inputs_sha256

    first = gen()
    assert gen() == first
    assert gen(jobs=7, timeout=5.0) == first  # how, not what
    assert gen(make_args=["V=1"]) != first
    assert gen(modules=["hello", "world"]) != first
    (src / "a.c").write_text("int y;\n")
    assert gen() != first


def test_build_script_names_the_kernel(tmp_path: Path) -> None:
    r = kb.resolve(nvidia_req(tmp_path), info())
    s = kb.build_script(r, 0, False)
    assert 'KERNEL_UNAME="$KVER"' in s and "KVER=6.1.0-50-amd64" in s
    assert "--extract-only --target" in s and '"$W/tree/kernel"' in s
    assert "sign-file" not in s
    r_open = kb.resolve(nvidia_req(tmp_path, kernel_module_type="open"), info())
    assert '"$W/tree/kernel-open"' in kb.build_script(r_open, 2, False)
    signing = kb.SigningSpec(key_path="/k", cert_path="/c", hash_algo="sha512", cert_fingerprint="f")
    r_sign = kb.resolve(nvidia_req(tmp_path, signing=signing), info())
    s = kb.build_script(r_sign, 2, True)
    assert "sign-file" in s and "sha512" in s and "JOBS=2" in s


def test_up_to_date_and_tamper(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "lib/modules/k").mkdir(parents=True)
    (dest / "lib/modules/k/a.ko").write_bytes(b"module")
    (dest / "lib").joinpath("libx.so.1").symlink_to("libx.so.1.0")
    (dest / "lib/libx.so.1.0").write_bytes(b"lib")
    m = {"inputs_sha256": "i1", "files": kb.list_files(str(dest))}
    (dest / "manifest.json").write_text(json.dumps(m))
    assert kb.up_to_date(str(dest), "i1")[0]
    assert kb.up_to_date(str(dest), "i2") == (False, m, "inputs changed")
    (dest / "lib/modules/k/a.ko").write_bytes(b"modulE")
    ok, _m, why = kb.up_to_date(str(dest), "i1")
    assert not ok and "a.ko" in why
    assert kb.up_to_date(str(tmp_path / "none"), "i1")[0] is False


def test_failure_marker_roundtrip(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    log = tmp_path / "b.log"
    log.write_text("make: *** [Makefile] Error 2\n")
    path = kb.write_failure_marker(str(dest), "abc", "build exited with rc 2", str(log))
    assert path == str(dest) + ".failed.json"
    doc = kb.read_failure_marker(str(dest))
    assert doc["inputs_sha256"] == "abc" and Path(doc["log"]).read_text() == log.read_text()
    kb.clear_failure_marker(str(dest))
    assert kb.read_failure_marker(str(dest)) is None and not Path(str(dest) + ".failed.log").exists()


def _tar(entries: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for ti in entries:
            t.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    return buf.getvalue()


@pytest.mark.parametrize("name,kind,link", [("../evil.c", tarfile.REGTYPE, ""), ("/etc/evil", tarfile.REGTYPE, ""),
                                            ("src/l", tarfile.SYMTYPE, "../../etc/passwd"),
                                            ("src/dev", tarfile.CHRTYPE, "")])
def test_safe_extract_rejects(tmp_path: Path, name: str, kind: bytes, link: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.size = 1 if kind == tarfile.REGTYPE else 0
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(_tar([ti]))
    with pytest.raises(kb.BuildError):
        kb.safe_extract_tar(str(arc), str(tmp_path / "x"))
    assert not (tmp_path / "evil.c").exists()


def test_safe_extract_ok(tmp_path: Path) -> None:
    a = tarfile.TarInfo("proj-1.0/Kbuild")
    a.size = 1
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(_tar([a]))
    kb.safe_extract_tar(str(arc), str(tmp_path / "x"))
    assert (tmp_path / "x/proj-1.0/Kbuild").read_bytes() == b"x"


def test_swap_keeps_nothing_half_done(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("1")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "new").write_text("2")
    kb.swap_into_place(str(stage), str(dest))
    assert (dest / "new").exists() and not (dest / "old").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
