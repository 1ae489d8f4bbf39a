"""Developer container cache, introspection and the module's plan, without root: real debugfs on a
small Flatcar-shaped image, real files, file:// downloads signed by a throwaway key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import devcontainer as dc
from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import FLATCAR_KEY_FINGERPRINT
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import LINUX_FS_TYPE
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import parse_colons_primaries

SGDISK = shutil.which("sgdisk") or "/usr/sbin/sgdisk"
MKFS = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
DEBUGFS = shutil.which("debugfs") or "/usr/sbin/debugfs"
NEEDS_TOOLS = pytest.mark.skipif(not all(os.path.exists(t) for t in (SGDISK, MKFS, DEBUGFS)) or not shutil.which("gpg"),
                                 reason="needs gdisk, e2fsprogs and gpg")
NAME = "flatcar_developer_container.bin.bz2"


def make_image(path: Path, version: str, kernels: dict[str, bool], board: str = "amd64-usr") -> Path:
    """GPT + ext4 ROOT at 2 MiB holding /usr/lib/modules/<k>[/build] and the release files."""
    tree = path.parent / f"tree-{path.name}"
    for kver, with_build in kernels.items():
        (tree / "usr/lib/modules" / kver).mkdir(parents=True)
        if with_build:
            (tree / "usr/lib/modules" / kver / "build").mkdir()
    (tree / "usr/share/flatcar").mkdir(parents=True)
    (tree / "usr/share/flatcar/release").write_text(f"FLATCAR_RELEASE_VERSION={version}\nFLATCAR_RELEASE_BOARD={board}\n")
    (tree / "usr/lib/os-release").write_text(f'ID=flatcar\nVERSION_ID={version}\nNAME="Flatcar Container Linux"\n')
    with open(path, "wb") as fh:
        fh.truncate(12 << 20)
    subprocess.run([SGDISK, "-n", "9:4096:+8M", "-c", "9:ROOT", "-t", f"9:{LINUX_FS_TYPE}", str(path)], check=True,
                   capture_output=True)
    subprocess.run([MKFS, "-q", "-F", "-L", "ROOT", "-d", str(tree), "-E", "offset=2097152", str(path), "8M"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return path


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


# ------------------------------------------------------------------ introspection


@NEEDS_TOOLS
def test_image_info_reads_kernels_and_release_without_mounting(tmp_path: Path) -> None:
    kernels = {"6.1.0-50-amd64": True, "6.1.0-9-amd64": True, "6.1.0-10-amd64": False}
    image = make_image(tmp_path / "img.bin", "9001.2.0", kernels)
    info = dc.image_info(str(image))
    assert info.kernel_releases == ["6.1.0-9-amd64", "6.1.0-50-amd64"]  # numeric order, only those with build
    assert (info.version, info.board, info.root_offset, info.root_size) == ("9001.2.0", "amd64-usr", 2097152, 8 << 20)
    assert info.release["ID"] == "flatcar"


@NEEDS_TOOLS
def test_image_info_without_build_dirs_lists_every_kernel(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img.bin", "9001.2.0", {"5.15.0": False})
    assert dc.image_info(str(image)).kernel_releases == ["5.15.0"]


def test_parse_debugfs_ls() -> None:
    text = "/2/040755/0/0/.//\n/2/040755/0/0/..//\n/12/040755/0/0/6.1.0-50-amd64//\n/13/100644/0/0/modules.dep/120/\n\n"
    assert dc.parse_debugfs_ls(text) == [("6.1.0-50-amd64", 0o40755), ("modules.dep", 0o100644)]


# ------------------------------------------------------------------ cache


def fake_cached(cache: Path, version: str, fingerprint: str = FLATCAR_KEY_FINGERPRINT) -> dc.CacheEntry:
    entry = dc.CacheEntry(str(cache), "amd64-usr", version)
    os.makedirs(entry.directory)
    Path(entry.image_path).write_bytes(b"image " + version.encode())
    dc.write_metadata(entry, {"verified": True, "fingerprint": fingerprint, "url": "file:///x"})
    return entry


def test_cached_ok_checks_metadata_size_mtime_and_fingerprint(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    assert dc.cached_ok(entry, [FLATCAR_KEY_FINGERPRINT])["url"] == "file:///x"
    assert dc.cached_ok(entry, ["A" * 40]) is None
    with open(entry.image_path, "ab") as fh:
        fh.write(b"tampered")
    assert dc.cached_ok(entry) is None
    os.unlink(entry.metadata_path)
    assert dc.cached_ok(entry) is None


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    for version in ("9001.1.0", "9001.10.0", "9001.2.0", "8999.0.0"):
        fake_cached(tmp_path, version)
    assert dc.cached_versions(str(tmp_path), "amd64-usr") == ["8999.0.0", "9001.1.0", "9001.2.0", "9001.10.0"]
    assert dc.prune(str(tmp_path), "amd64-usr", 2, protect=("8999.0.0",), check_mode=True) == ["9001.1.0"]
    assert len(dc.cached_versions(str(tmp_path), "amd64-usr")) == 4
    assert dc.prune(str(tmp_path), "amd64-usr", 2, protect=("8999.0.0",)) == ["9001.1.0"]
    assert dc.cached_versions(str(tmp_path), "amd64-usr") == ["8999.0.0", "9001.2.0", "9001.10.0"]
    assert dc.prune(str(tmp_path), "amd64-usr", 0) == []


def test_remove_entry(tmp_path: Path) -> None:
    entry = fake_cached(tmp_path, "9001.1.0")
    assert dc.remove_entry(entry, check_mode=True) is True and os.path.exists(entry.image_path)
    assert dc.remove_entry(entry) is True and not os.path.exists(entry.directory)
    assert dc.remove_entry(entry) is False


@pytest.mark.parametrize("value", ["..", "a/b", "", "x y", "9001.1.0\0"])
def test_path_components_are_checked(value: str) -> None:
    with pytest.raises(ValueError, match="board="):
        dc.check_component("board", value)


# ------------------------------------------------------------------ options and command lines


def test_parse_bind() -> None:
    assert dc.parse_bind("binds_ro", "/opt/src:/src") == ("/opt/src", "/src")
    assert dc.parse_bind("binds_rw", "/opt/out") == ("/opt/out", "/opt/out")
    with pytest.raises(dc.RequestError, match="binds_ro entry 'relative:/x'"):
        dc.parse_bind("binds_ro", "relative:/x")


def test_nspawn_command_line(tmp_path: Path) -> None:
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is not installed")
    args = dc.nspawn_args(["-D", "/m"], ["make", "-C", "/src"], [("/h/src", "/src")], [("/h/out", "/out")],
                          {"B": "2", "A": "1"}, "/src")
    assert args[1:6] == ["--keep-unit", "--register=no", "--as-pid2", "--quiet", "--console=pipe"]
    assert args[args.index("--") + 1:] == ["make", "-C", "/src"]
    assert "--bind-ro=/h/src:/src" in args and "--bind=/h/out:/out" in args
    assert args.index("--setenv=A=1") < args.index("--setenv=B=2") and "--chdir=/src" in args


def test_run_in_image_validates_before_touching_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="command must be a non-empty list"):
        dc.run_in_image(str(tmp_path / "x"), [])
    with pytest.raises(ValueError, match="binds_rw entry"):
        dc.run_in_image(str(tmp_path / "x"), ["true"], binds_rw=[(str(tmp_path / "missing"), "/out")])
    with pytest.raises(ValueError, match="env key"):
        dc.run_in_image(str(tmp_path / "x"), ["true"], env={"BAD-NAME": "1"})
    with pytest.raises(ValueError, match="method='vm'"):
        dc.run_in_image(str(tmp_path / "x"), ["true"], method="vm")


def test_choose_method() -> None:
    assert dc.choose_method("chroot") == "chroot"
    auto = dc.choose_method("auto")
    if not shutil.which("systemd-nspawn"):
        assert auto == "chroot"
    elif os.path.isdir("/run/systemd/system"):
        assert auto == "image"
    else:
        assert auto == "overlay"


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
