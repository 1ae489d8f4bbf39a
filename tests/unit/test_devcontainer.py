"""What coreos_devcontainer does (plan and ensure), without root: real debugfs on a small
Flatcar-shaped image, real files, file:// downloads signed by a throwaway key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_imageinfo import make_image

from ansible_collections.modulus.kmods.plugins.module_utils import devcontainer as dc
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import parse_colons_primaries

NEEDS_TOOLS = pytest.mark.skipif(not all(shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                                     for t in ("sgdisk", "mkfs.ext4", "debugfs", "gpg", "bzip2")),
                                 reason="needs gdisk, e2fsprogs, bzip2 and gpg")
NAME = "flatcar_developer_container.bin.bz2"


class Signer:
    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700)
        self.gpg("--passphrase", "", "--quick-gen-key", "Sim <sim@example.invalid>", "ed25519", "sign", "never")
        self.public = self.gpg("--armor", "--export").stdout.decode()
        self.fingerprint = parse_colons_primaries(self.gpg("--with-colons", "--fingerprint", "--list-keys").stdout.decode())[0]

    def gpg(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["gpg", "--batch", "--no-tty", *args], env=dict(os.environ, GNUPGHOME=str(self.home)),
                              check=True, capture_output=True)


def publish(mirror: Path, signer: Signer, version: str, kernels: dict[str, bool], image_version: str | None = None) -> Path:
    """{mirror}/{version}/flatcar_developer_container.bin.bz2 + .sig"""
    d = mirror / version
    d.mkdir(parents=True)
    raw = make_image(d / "raw.bin", image_version or version, kernels)
    subprocess.run(["bzip2", "-1", "-c", str(raw)], check=True, stdout=open(d / NAME, "wb"))  # noqa: SIM115
    raw.unlink()
    signer.gpg("--detach-sign", "-o", str(d / (NAME + ".sig")), str(d / NAME))
    return d


def host_root(tmp_path: Path, version: str = "9001.1.0", group: str = "stable", legacy: bool = False) -> Path:
    root = tmp_path / "host"
    if legacy:
        (root / "usr/share/coreos").mkdir(parents=True)
        (root / "usr/share/coreos/release").write_text(f"COREOS_RELEASE_VERSION={version}\nCOREOS_RELEASE_BOARD=amd64-usr\n")
        (root / "usr/share/coreos/update.conf").write_text(f"GROUP={group}\n")
    else:
        (root / "usr/share/flatcar").mkdir(parents=True)
        (root / "usr/share/flatcar/release").write_text(f"FLATCAR_RELEASE_VERSION={version}\nFLATCAR_RELEASE_BOARD=amd64-usr\n")
        (root / "usr/share/flatcar/update.conf").write_text(f"GROUP={group}\n")
    return root


# ------------------------------------------------------------------ options and command lines


@pytest.mark.parametrize("value", ["..", "a/b", "", "x y", "stable\0", "stable\n"])
def test_names_are_checked_whole(value: str) -> None:
    with pytest.raises(ValueError, match="channel="):
        dc.check_component("channel", value)


def test_parse_bind() -> None:
    assert dc.parse_bind("binds_ro", "/opt/src:/src") == ("/opt/src", "/src")
    assert dc.parse_bind("binds_rw", "/opt/out") == ("/opt/out", "/opt/out")
    with pytest.raises(dc.RequestError, match="binds_ro entry 'relative:/x'"):
        dc.parse_bind("binds_ro", "relative:/x")


# ------------------------------------------------------------------ plan and ensure (file:// mirror)


def test_plan_from_host_files(tmp_path: Path) -> None:
    root = host_root(tmp_path, group="lts-2022")
    plan = dc.plan(dc.Request(release="current", host_root=str(root)))
    assert (plan["board"], plan["channel"], plan["image_name"]) == ("amd64-usr", "lts", NAME)
    assert plan["entry"].cache_dir == str(root / "var/cache/modulus/devcontainer")
    assert plan["fields"]["arch"] == "amd64"


def test_plan_legacy_coreos_uses_the_coreos_image_name(tmp_path: Path) -> None:
    plan = dc.plan(dc.Request(release="current", host_root=str(host_root(tmp_path, "2512.3.0", legacy=True))))
    assert plan["image_name"] == "coreos_developer_container.bin.bz2"
    assert plan["entry"].image_path.endswith("/2512.3.0/coreos_developer_container.bin")


def test_plan_explicit_release_needs_no_host_files(tmp_path: Path) -> None:
    plan = dc.plan(dc.Request(release="4459.2.1", board="arm64-usr", channel="beta", host_root=str(tmp_path / "none"),
                              cache_dir=str(tmp_path / "c")))
    assert plan["fields"] == {"channel": "beta", "board": "arm64-usr", "version": "4459.2.1", "arch": "arm64",
                              "group": "beta"}


def test_plan_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(dc.RequestError, match="host_root="):
        dc.plan(dc.Request(release="current", host_root=str(tmp_path)))
    with pytest.raises(dc.RequestError, match="release='latest'"):
        dc.plan(dc.Request(release="latest", board="amd64-usr", channel="stable"))
    with pytest.raises(dc.RequestError, match="decompressor="):
        dc.plan(dc.Request(release="1.2.3", board="amd64-usr", channel="stable", decompressor="xz"))
    with pytest.raises(dc.RequestError, match="image_name="):
        dc.plan(dc.Request(release="1.2.3", board="amd64-usr", channel="stable", image_name="a.bin"))


@pytest.mark.parametrize(("option", "value"), [
    ("board", "amd64-usr\n"), ("board", "../amd64-usr"), ("board", "amd64 usr"),
    ("channel", "stable\n"), ("channel", ".."),
    ("release", "4459.2.1\n"),
])
def test_plan_refuses_a_trailing_newline_or_a_path(tmp_path: Path, option: str, value: str) -> None:
    fields = {"release": "4459.2.1", "board": "amd64-usr", "channel": "stable", option: value}
    req = dc.Request(host_root=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"), **fields)
    with pytest.raises(dc.RequestError, match=f"{option}="):
        dc.plan(req)
    with pytest.raises(dc.RequestError, match=f"{option}="):
        dc.ensure(req)
    assert not (tmp_path / "cache").exists()  # no directory named with a newline


@NEEDS_TOOLS
def test_ensure_fetches_caches_and_is_then_unchanged(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "gnupg")
    mirror = tmp_path / "mirror"
    publish(mirror, signer, "9001.1.0", {"6.1.0-47-amd64": True})
    root = host_root(tmp_path)
    req = dc.Request(release="current", host_root=str(root), url_template=f"file://{mirror}/{{version}}",
                     fallback_url_template=None, verify_key=signer.public, cache_dir=str(tmp_path / "cache"),
                     min_free_space=0)
    check = dc.ensure(req, check_mode=True)
    assert check["changed"] is True and check["would_download"] == f"file://{mirror}/9001.1.0/{NAME}"
    assert not (tmp_path / "cache").exists()
    logs: list[str] = []
    first = dc.ensure(req, log=logs.append)
    assert first["changed"] is True and first["kernel_release"] == "6.1.0-47-amd64"
    assert first["signing_fingerprint"] == signer.fingerprint
    assert first["diff"] == {"before": {"versions": []}, "after": {"versions": ["9001.1.0"]}}
    assert any(line.startswith("verified ") for line in logs)
    second = dc.ensure(req)
    assert second["changed"] is False and second["cached"] is True and second["kernel_releases"] == ["6.1.0-47-amd64"]
    # another key: the cached image does not count as verified for it, and the download fails
    other = Signer(tmp_path / "gnupg2")
    with pytest.raises(Exception, match="not in verify_key"):
        dc.ensure(dc.Request(**{**req.__dict__, "verify_key": other.public}))
    absent = dc.ensure(dc.Request(**{**req.__dict__, "state": "absent"}))
    assert absent["changed"] is True and not os.path.exists(first["image_path"])


@NEEDS_TOOLS
def test_ensure_refuses_an_image_whose_release_file_disagrees(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "gnupg")
    mirror = tmp_path / "mirror"
    publish(mirror, signer, "9001.1.0", {"6.1.0-47-amd64": True}, image_version="9001.9.9")
    req = dc.Request(release="current", host_root=str(host_root(tmp_path)), url_template=f"file://{mirror}/{{version}}",
                     fallback_url_template=None, verify_key=signer.public, cache_dir=str(tmp_path / "cache"),
                     min_free_space=0)
    with pytest.raises(dc.DevcontainerError, match="says version 9001.9.9, not 9001.1.0"):
        dc.ensure(req)
    assert not (tmp_path / "cache" / "amd64-usr" / "9001.1.0").exists()
