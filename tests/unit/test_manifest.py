"""The build manifest format: describing a tree, writing and loading (schema check), comparing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from sim.kmod_archive_fixtures import make_build, manifest_of


def _tree(root: Path) -> Path:
    (root / "lib/modules/k").mkdir(parents=True)
    (root / "lib/modules/k/a.ko").write_bytes(b"module")
    (root / "lib/libx.so.1.0").write_bytes(b"lib")
    (root / "lib/libx.so.1").symlink_to("libx.so.1.0")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\n")
    (root / "bin/tool").chmod(0o755)
    (root / "share").symlink_to("lib")  # a symlink to a directory is listed, not followed
    (root / "manifest.json").write_text("{}")
    return root


def test_list_files(tmp_path: Path) -> None:
    files = mf.list_files(str(_tree(tmp_path / "t")))
    assert list(files) == ["bin/tool", "lib/libx.so.1", "lib/libx.so.1.0", "lib/modules/k/a.ko", "share"]
    assert files["bin/tool"]["mode"] == "0755" and files["lib/modules/k/a.ko"]["size"] == 6
    assert files["lib/libx.so.1"] == {"link": "libx.so.1.0", "mode": "0777"} and files["share"]["link"] == "lib"


def test_write_load_round_trip(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "t")
    m = {"schema": 1, "driver": "x", "module_type": "default", "signing_key_fingerprint": None,
         "files": mf.list_files(str(tree))}
    mf.write_manifest(str(tree), m)
    assert mf.load_manifest(str(tree)) == m
    assert (tree / "manifest.json").read_text() == json.dumps(m, sort_keys=True, indent=2) + "\n"
    assert mf.verify_tree(str(tree), m) == []


@pytest.mark.parametrize("doc,pattern", [
    ([], "JSON object"),
    ({"schema": 2, "files": {}}, "schema 2"),
    ({"schema": 1}, "no 'files'"),
    ({"schema": 1, "files": {"../x": {"sha256": "0" * 64}}}, "unsafe path"),
    ({"schema": 1, "files": {"lib/a": {"link": "../../etc"}}}, "outside"),
    ({"schema": 1, "files": {"a": {"sha256": "0" * 64 + "\n"}}}, "no valid sha256"),
    ({"schema": 1, "files": {"a": {"sha256": "0" * 64, "size": "12"}}}, "invalid size"),
    ({"schema": 1, "files": {"a": {"sha256": "0" * 64, "mode": "0644\n"}}}, "invalid mode"),
    ({"schema": 1, "files": {"manifest.json": {"sha256": "0" * 64}}}, "itself"),
    ({"schema": 1, "files": {}, "driver": 7}, "driver must be a string"),
    ({"schema": 1, "files": {}, "modules": {}}, "modules must be a JSON array"),
])
def test_check_manifest_names_the_problem(doc: object, pattern: str) -> None:
    with pytest.raises(mf.ManifestError, match=pattern):
        mf.check_manifest(doc, "here")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(mf.ManifestError, match="not a kmod_build output directory"):
        mf.load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(mf.ManifestError, match="not valid JSON"):
        mf.load_manifest(str(tmp_path))


def test_verify_tree_reports_each_problem(tmp_path: Path) -> None:
    build = make_build(tmp_path / "b")
    m = manifest_of(build)
    assert mf.verify_tree(str(build), m) == []
    (build / "extra.txt").write_text("x")
    (build / "lib/modules/6.1.0-47-amd64/nvidia.ko").unlink()
    (build / "build.log").write_bytes(b"y" * (build / "build.log").stat().st_size)  # same size, other bytes
    (build / "lib/libnvidia-ml.so.1").unlink()
    (build / "lib/libnvidia-ml.so.1").write_bytes(b"not a link")
    problems = "\n".join(mf.verify_tree(str(build), m))
    assert "extra.txt: present but not listed" in problems and "nvidia.ko: missing" in problems
    assert "build.log: sha256" in problems and "libnvidia-ml.so.1: a regular file, manifest says a symlink" in problems
    assert "extra.txt" not in "\n".join(mf.verify_tree(str(build), m, strict=False))
    cheap = "\n".join(mf.verify_tree(str(build), m, hash_files=False))
    assert "build.log" not in cheap and "nvidia.ko" in cheap  # sizes only: same size passes
    assert mf.verify_tree(str(build), {"files": {"../etc/passwd": {"sha256": "0" * 64}}}, strict=False) == \
        ["unsafe path '../etc/passwd' (escapes or is not normalized)"]


def test_compare_files_against_what_was_extracted() -> None:
    manifest = {"files": {"a": {"sha256": "1" * 64, "size": 1}, "l": {"link": "a"}}}
    assert mf.compare_files({"a": {"sha256": "1" * 64, "size": 1, "mode": "0644"}, "l": {"link": "a"}}, manifest) == []
    problems = mf.compare_files({"a": {"sha256": "2" * 64, "size": 1}, "x": {"sha256": "3" * 64, "size": 1},
                                 "manifest.json": {}}, manifest)
    assert problems == ["a: sha256 2222222222222222222222222222222222222222222222222222222222222222, manifest says "
                        "1111111111111111111111111111111111111111111111111111111111111111",
                        "l: missing or not a regular file", "x: present but not listed in the manifest"]


def test_manifest_sha256_ignores_the_archive_section(tmp_path: Path) -> None:
    m = manifest_of(make_build(tmp_path / "b"))
    digest = mf.manifest_sha256(m)
    assert mf.manifest_sha256(dict(m, archive={"key": "k"})) == digest
    assert mf.manifest_sha256(dict(m, driver_version="1")) != digest
    assert mf.canonical_manifest(m).endswith(b"}\n") and b'"archive"' not in mf.canonical_manifest(dict(m, archive={}))
