"""kmodbuild: resolving a request (validation, module type, inputs), the build script, DEST state
(up-to-date check, failure marker) and the build logic hash. The NVIDIA recipe, sources, the
manifest format and file safety have their own test files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import kmodbuild as kb
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from ansible_collections.modulus.kmods.plugins.module_utils.imageinfo import ImageInfo

FLATCAR = {"FLATCAR_RELEASE_VERSION": "9001.2.0", "FLATCAR_RELEASE_BOARD": "amd64-usr", "ID": "flatcar"}


def info(kernels: list[str] | None = None, board: str = "amd64-usr") -> ImageInfo:
    return ImageInfo(kernel_releases=kernels if kernels is not None else ["6.1.0-50-amd64"], release=dict(FLATCAR),
                     version="9001.2.0", board=board, root_offset=2097152, root_size=1 << 30)


def test_make_args() -> None:
    assert kb.validate_make_args(["CONFIG_X=m", "-k", "V=1", "modules"]) == ["CONFIG_X=m", "-k", "V=1", "modules"]
    for bad in ("$(shell id)", "V=1\n", "modules\n", "-k\n"):
        with pytest.raises(kb.InputError, match="make_args"):
            kb.validate_make_args([bad])


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
    assert r.expected_modules == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"]
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
    m = {"schema": 1, "inputs_sha256": "i1", "files": mf.list_files(str(dest))}
    mf.write_manifest(str(dest), m)
    assert kb.up_to_date(str(dest), "i1")[0]
    assert kb.up_to_date(str(dest), "i2") == (False, m, "inputs changed")
    (dest / "lib/modules/k/a.ko").write_bytes(b"modulE")
    ok, _m, why = kb.up_to_date(str(dest), "i1")
    assert not ok and "a.ko" in why
    assert kb.up_to_date(str(tmp_path / "none"), "i1") == (False, None, "no manifest in dest")
    (dest / "manifest.json").write_text(json.dumps(dict(m, schema=7)))
    ok, none, why = kb.up_to_date(str(dest), "i1")
    assert not ok and none is None and "schema 7" in why
    assert kb.read_manifest(str(dest)) is None


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


@pytest.mark.parametrize("field,value", [("name", "hello\n"), ("version", "1.0\n"), ("modules", ["hello\n"]),
                                         ("kernel_release", "6.1.0-50-amd64\n"), ("git_ref", "v1\n"),
                                         ("subdir", "src\n"), ("checksum", "ab" * 32 + "\n")])
def test_generic_values_refuse_a_trailing_newline(tmp_path: Path, field: str, value: object) -> None:
    base = dict(recipe="generic", image="/i", dest=str(tmp_path / "o"), name="hello", source=str(tmp_path),
                modules=["hello"])
    base[field] = value
    with pytest.raises(kb.InputError, match=field):
        kb.resolve(kb.BuildRequest(**base), info())


@pytest.mark.parametrize("field,value", [("version", "535.104.05\n"), ("kernel_release", "6.1.0-50-amd64\n"),
                                         ("modules", ["nvidia\n"])])
def test_nvidia_values_refuse_a_trailing_newline(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(kb.InputError, match=field):
        kb.resolve(nvidia_req(tmp_path, **{field: value}), info())


def test_module_type_rule(tmp_path: Path) -> None:
    def mtype(version: str, kind: str = "auto") -> str:
        return kb.resolve(nvidia_req(tmp_path, version=version, kernel_module_type=kind), info()).module_type

    assert mtype("535.104.05") == "proprietary" and mtype("555.58.02") == "proprietary"
    assert mtype("560.35.03") == "open" and mtype("570.133.20") == "open"
    assert mtype("535.104.05", "open") == "open" and mtype("570.133.20", "proprietary") == "proprietary"
    with pytest.raises(kb.InputError, match="no open kernel modules"):
        mtype("470.256.02", "open")
    with pytest.raises(kb.InputError, match="kernel_module_type="):
        mtype("535.104.05", "closed")


def test_generic_build_has_the_default_module_type(tmp_path: Path) -> None:
    base = dict(recipe="generic", image="/i", dest=str(tmp_path / "o"), name="hello", source=str(tmp_path),
                modules=["hello"])
    assert kb.resolve(kb.BuildRequest(**base), info()).module_type == "default"
    # kernel_module_type is NVIDIA's: a generic build has one variant whatever it says
    assert kb.resolve(kb.BuildRequest(**base, kernel_module_type="open"), info()).module_type == "default"


def test_dest_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    for name in ("file", "link"):
        with pytest.raises(kb.InputError, match="not a directory"):
            kb.resolve(nvidia_req(tmp_path, dest=str(tmp_path / name)), info())


def test_build_logic_hash_covers_the_build_code(tmp_path: Path) -> None:
    digest = kb.build_logic_hash()
    assert len(digest) == 64 and digest == kb.build_logic_hash()
    r = kb.resolve(nvidia_req(tmp_path), info())
    kb.build_logic_hash.cache_clear()
    original = kb._source_text
    try:
        kb._source_text = lambda module: original(module) + (b"# changed\n" if module is kb.nvidia else b"")
        assert kb.build_logic_hash() != digest
        assert kb.resolve(nvidia_req(tmp_path), info()).inputs_sha256 != r.inputs_sha256
    finally:
        kb._source_text = original
        kb.build_logic_hash.cache_clear()
    assert kb.build_logic_hash() == digest


def test_build_logic_hash_reads_modules_from_a_zip(tmp_path: Path) -> None:
    """Ansible imports module_utils from a zip: the source is read through the module's loader."""
    import sys
    import zipfile

    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped_mod.py", "X = 1\n")
    sys.path.insert(0, str(archive))
    try:
        import zipped_mod  # type: ignore[import-not-found]

        assert kb._source_text(zipped_mod) == b"X = 1\n"
    finally:
        sys.path.remove(str(archive))
        sys.modules.pop("zipped_mod", None)


def test_summary_names_the_signer() -> None:
    m = {"kernel_release": "k", "driver": "nvidia", "signing_key_fingerprint": "ab" * 32, "files": {}}
    assert kb.summary(m)["signing_key_fingerprint"] == "ab" * 32 and "files" not in kb.summary(m)
    assert kb.summary(None) == {}


BUILD_LOG = """modulus kmod_build generic hello 1.0 for kernel 6.1.0-50-amd64
=== modulus devcontainer run (overlay) 2026-11-27T08:00:00Z: /bin/sh /modulus/in/build.sh
modulus: [+0 s] building: make -C /lib/modules/6.1.0-50-amd64/build M=/modulus/work/src modules
  CC [M]  /modulus/work/src/modulus_hello.o
/modulus/work/src/modulus_hello.c: In function 'hello_init':
/modulus/work/src/modulus_hello.c:20:18: error: expected ';' before 'this'
/modulus/work/src/modulus_hello.c:20:18: error: expected ';' before 'this'
/modulus/work/src/modulus_hello.c:21:5: error: 'wrong' undeclared (first use in this function)
make[2]: *** [scripts/Makefile.build:250: /modulus/work/src/modulus_hello.o] Error 1
make[1]: *** [Makefile:2010: /modulus/work/src] Error 2
=== rc=2 in 3.0 s
"""


def generic_resolved(tmp_path: Path) -> kb.Resolved:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "Kbuild").write_text("obj-m += hello.o\n")
    req = kb.BuildRequest(recipe="generic", image=str(tmp_path / "img"), dest=str(tmp_path / "out"), name="hello",
                          version="1.0", source=str(src), modules=["hello"])
    return kb.resolve(req, info())


def test_first_errors_quote_the_compiler(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text(BUILD_LOG)
    errors = kb.first_errors(str(log))
    assert errors[0] == "/modulus/work/src/modulus_hello.c:20:18: error: expected ';' before 'this'"
    assert len(errors) == 4 and errors[-1].endswith("Error 2")  # each line once
    assert kb.first_errors(str(tmp_path / "missing")) == [] and kb.first_errors(None) == []


@pytest.mark.parametrize("rc,timed_out,tail,kind,remembered", [
    (2, False, "error: x", "compile", True),
    (-9, True, "", "timeout", False),
    (2, False, "cc1: fatal error: No space left on device", "no_space", False),
    (137, False, "", "killed", False),
])
def test_container_failures_are_classified(tmp_path: Path, rc: int, timed_out: bool, tail: str, kind: str,
                                           remembered: bool) -> None:
    r = generic_resolved(tmp_path)
    log = tmp_path / "build.log"
    log.write_text(BUILD_LOG)
    res = kb.container.RunResult(rc=rc, output_tail=tail, log_path=str(log), timed_out=timed_out, method="overlay",
                                 duration=1.0)
    exc = kb.container_failure(r.req, res, str(log))
    assert exc.kind == kind and exc.remembered is remembered
    if kind == "compile":
        assert "exited with rc 2; first errors:" in exc.msg and "error: expected ';'" in exc.msg


def test_only_deterministic_failures_are_remembered(tmp_path: Path) -> None:
    r = generic_resolved(tmp_path)
    dest = r.req.dest
    log = tmp_path / "build.log"
    log.write_text(BUILD_LOG)
    # a download that failed: reported, its log kept, nothing remembered
    out = kb.record_failure(r, kb.BuildError("download of http://x/y failed: HTTP 503", kind="download"), None, 1.5)
    assert not out.remembered and out.marker is None and kb.read_failure_marker(dest) is None
    assert "transient" in kb.failure_reason(out) and kb.known_failure(r) is None
    # a compile error: remembered with the first error lines, the log beside dest
    out = kb.record_failure(r, kb.BuildError("build in img exited with rc 2", "tail", str(log), kind="compile"),
                            str(log), 12.25)
    assert out.remembered and out.marker == dest + ".failed.json" and out.log_path == dest + ".failed.log"
    marker = kb.known_failure(r)
    assert marker and marker["kind"] == "compile" and marker["duration"] == 12.25
    assert marker["errors"][0].endswith("error: expected ';' before 'this'")
    msg = kb.known_failure_message(dest, marker)
    assert "compile error: build in img exited with rc 2" in msg and "error: expected ';' before 'this'" in msg
    assert f"build log: {dest}.failed.log" in msg and "not retrying until the inputs change or force=true" in msg
    assert "remembered in " + dest + ".failed.json" in kb.failure_reason(out)
    # a later transient failure drops the marker (it was for these inputs only when the run did not start)
    kb.record_failure(r, kb.BuildError("git clone failed", kind="git"), str(log), 0.5)
    assert kb.read_failure_marker(dest) is None and Path(dest + ".failed.log").read_text() == BUILD_LOG
    # a marker that names a transient kind (older code remembered downloads) never blocks
    kb.write_failure_marker(dest, r.inputs_sha256, "download failed", None, kind="download")
    assert kb.known_failure(r) is None
