"""kmod_retire's logic (_install/retire.py): the builds of a driver's other versions leave the
archive, except one whose modules the running kernel has loaded (/proc/modules, /sys/module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils._install import retire as rt

K1, K2 = "6.1.0-47-amd64", "6.1.0-50-amd64"


def build(archive: Path, version: str, kernel: str, srcversion: str | None = "ABC") -> Path:
    d = archive / "hello" / version / kernel
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"modules": [{"name": "modulus_hello", "srcversion": srcversion}]}))
    return d


def load(root: Path, name: str, srcversion: str | None, kernel: str = K1) -> None:
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/osrelease").write_text(kernel + "\n")
    (root / "proc/modules").write_text(f"{name} 16384 0 - Live 0x0 (O)\n")
    if srcversion:
        (root / "sys/module" / name).mkdir(parents=True)
        (root / "sys/module" / name / "srcversion").write_text(srcversion + "\n")


def test_other_versions_go_the_kept_one_stays(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    for k in (K1, K2):
        build(archive, "1.0", k)
        build(archive, "2.0", k)
    (archive / "hello/1.0" / f"{K2}.failed.json").write_text("{}")
    out = rt.retire(str(archive), "hello", "2.0", host_root=str(tmp_path))
    assert out.changed and out.removed == [str(archive / "hello/1.0")] and out.kept == []
    assert sorted(p.name for p in (archive / "hello").iterdir()) == ["2.0"]
    assert not rt.retire(str(archive), "hello", "2.0", host_root=str(tmp_path)).changed


def test_a_loaded_build_stays_until_it_is_unloaded(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    build(archive, "1.0", K1, "OLD")
    build(archive, "1.0", K2, "OLD")
    (archive / "hello/1.0" / f"{K2}.lock").write_text("")
    build(archive, "2.0", K1, "NEW")
    load(tmp_path, "modulus_hello", "OLD")
    check = rt.retire(str(archive), "hello", "2.0", host_root=str(tmp_path), check=True)
    assert check.removed == [str(archive / "hello/1.0" / K2)] and (archive / "hello/1.0" / K2).exists()
    out = rt.retire(str(archive), "hello", "2.0", host_root=str(tmp_path))
    assert [k["kernel_release"] for k in out.kept] == [K1] and "loaded" in out.kept[0]["reason"]
    assert sorted(p.name for p in (archive / "hello/1.0").iterdir()) == [K1]
    # the 2.0 build is what the kernel runs (another srcversion): 1.0 goes
    (tmp_path / "sys/module/modulus_hello/srcversion").write_text("NEW\n")
    out = rt.retire(str(archive), "hello", "2.0", host_root=str(tmp_path))
    assert out.removed == [str(archive / "hello/1.0")] and not (archive / "hello/1.0").exists()


def test_without_a_srcversion_a_module_of_that_name_counts_as_loaded(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    build(archive, "1.0", K1, None)
    load(tmp_path, "modulus_hello", None)
    out = rt.retire(str(archive), "hello", "2.0", host_root=str(tmp_path))
    assert not out.changed and len(out.kept) == 1


@pytest.mark.parametrize(("driver", "version", "word"), [("../x", "1.0", "driver"), ("hello", "..", "driver_version"),
                                                          ("hello", "1.0/../..", "driver_version")])
def test_bad_names_are_refused(tmp_path: Path, driver: str, version: str, word: str) -> None:
    with pytest.raises(ValueError if word == "driver" else rt.RetireError) as exc:
        rt.retire(str(tmp_path), driver, version)
    assert word in str(exc.value)
