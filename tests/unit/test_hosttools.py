"""sim.hosttools: the commands of a stock Flatcar host, as links to this machine's binaries."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sim import hosttools

pytestmark = pytest.mark.skipif(not shutil.which("dpkg-query"), reason="needs a Debian machine (dpkg)")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODULUS_SIM_CACHE", str(tmp_path))
    hosttools.tools_dir.cache_clear()
    yield tmp_path
    hosttools.tools_dir.cache_clear()


def test_stable_has_the_host_tools_and_none_of_the_others(cache: Path) -> None:
    names = set(hosttools.commands("stable"))
    assert {"sh", "bash", "mount", "losetup", "modprobe", "depmod", "gpg", "tar", "systemd-sysext"} <= names
    assert not names & set(hosttools.NEVER + hosttools.NEVER_ON_STABLE)
    assert not [n for n in names if n.startswith("python")]
    root = hosttools.tools_dir("stable")
    assert root.parent.parent == cache and (root / "tools.json").is_file()
    sh = root / "usr/bin/sh"
    assert sh.is_symlink() and os.path.basename(os.path.realpath(sh)) == "bash"
    assert hosttools.host_path("stable") == f"{root / 'usr/sbin'}:{root / 'usr/bin'}"
    assert hosttools.tools_dir("stable") == root  # cached, and a second build finds the same directory
    hosttools.tools_dir.cache_clear()
    assert hosttools.tools_dir("stable") == root


def test_main_adds_erofs_utils_only(cache: Path) -> None:
    extra = set(hosttools.commands("main")) - set(hosttools.commands("stable"))
    if shutil.which("mkfs.erofs") or os.path.exists("/usr/bin/mkfs.erofs"):
        assert "mkfs.erofs" in extra
    assert extra <= {"mkfs.erofs", "fsck.erofs", "dump.erofs"}


def test_a_package_no_host_has_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.exists("/usr/bin/mksquashfs"):
        pytest.skip("squashfs-tools is not installed here")
    monkeypatch.setitem(hosttools.FLATCAR_PACKAGES, "sys-fs/squashfs-tools", ("squashfs-tools",))
    with pytest.raises(RuntimeError, match="mksquashfs"):
        hosttools.resolve("stable")


def test_host_env_and_variants(cache: Path) -> None:
    env = hosttools.host_env({"PATH": "/usr/bin", "X": "1"}, "stable")
    assert env["X"] == "1" and env["PATH"] == hosttools.host_path("stable")
    assert hosttools.host_env({"PATH": "/usr/bin"}, None) == {"PATH": "/usr/bin"}
    with pytest.raises(ValueError, match="host tools variant"):
        hosttools.debian_packages("lts")
