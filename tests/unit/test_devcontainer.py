"""What coreos_devcontainer does (plan and ensure), without root: real debugfs on a small
Flatcar-shaped image, real files, file:// downloads signed by a throwaway key."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_imageinfo import make_image

from ansible_collections.modulus.kmods.plugins.module_utils import devcontainer as dc
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import parse_colons_primaries
from sim.signing import ExpiredKeySet, PgpKey

NEEDS_TOOLS = pytest.mark.skipif(
    not all(shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
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
        env = dict(os.environ, GNUPGHOME=str(self.home))
        try:
            return subprocess.run(["gpg", "--batch", "--no-tty", *args], env=env, check=True, capture_output=True)
        finally:  # secret-key operations start a gpg-agent: never leave one behind
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)


def publish(mirror: Path, signer, version: str, kernels: dict[str, bool], image_version: str | None = None) -> Path:
    """{mirror}/{version}/flatcar_developer_container.bin.bz2 + .sig (``signer``: a Signer, or
    anything with ``sign(path, out)`` such as sim.signing's ExpiredKeySet)"""
    d = mirror / version
    d.mkdir(parents=True)
    raw = make_image(d / "raw.bin", image_version or version, kernels)
    subprocess.run(["bzip2", "-1", "-c", str(raw)], check=True, stdout=open(d / NAME, "wb"))  # noqa: SIM115
    raw.unlink()
    if isinstance(signer, Signer):
        signer.gpg("--detach-sign", "-o", str(d / (NAME + ".sig")), str(d / NAME))
    else:
        signer.sign(d / NAME, d / (NAME + ".sig"))
    return d


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its content (to prove a cache entry is untouched, byte for byte)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tree_stats(path: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


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


# ------------------------------------------------------------------ a failed fetch never touches a verified entry


@NEEDS_TOOLS
def test_wrong_key_keeps_the_cached_entry_byte_for_byte_then_offline_hit(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "gnupg")
    mirror = tmp_path / "mirror"
    publish(mirror, signer, "9001.1.0", {"6.1.0-47-amd64": True})
    req = dc.Request(release="current", host_root=str(host_root(tmp_path)), url_template=f"file://{mirror}/{{version}}",
                     fallback_url_template=None, verify_key=signer.public, cache_dir=str(tmp_path / "cache"),
                     min_free_space=0, retry_delay=0.01)
    first = dc.ensure(req)
    entry_dir = Path(first["image_path"]).parent
    before, stats = tree_bytes(entry_dir), tree_stats(entry_dir)
    assert sorted(before) == ["flatcar_developer_container.bin", "metadata.json"]
    other = Signer(tmp_path / "gnupg2")
    logs: list[str] = []
    with pytest.raises(Exception, match="not in verify_key"):
        dc.ensure(dc.Request(**{**req.__dict__, "verify_key": other.public}), log=logs.append)
    assert any("does not count for this run" in line for line in logs)
    assert tree_bytes(entry_dir) == before and tree_stats(entry_dir) == stats  # not a byte, not an inode changed
    assert sorted(os.listdir(entry_dir.parent)) == ["9001.1.0"]  # no staging directory left
    assert [n for n in os.listdir(tmp_path / "cache") if n.startswith("modulus-gnupg-")] == []
    # offline now: the mirror is gone, and the right key still finds its verified image
    shutil.move(str(mirror), str(tmp_path / "mirror-away"))
    again = dc.ensure(req)
    assert again["cached"] is True and again["changed"] is False and again["kernel_release"] == "6.1.0-47-amd64"


@NEEDS_TOOLS
def test_a_verified_new_copy_replaces_an_entry_of_another_key_in_one_step(tmp_path: Path) -> None:
    one, two = Signer(tmp_path / "g1"), Signer(tmp_path / "g2")
    publish(tmp_path / "m1", one, "9001.1.0", {"6.1.0-47-amd64": True})
    publish(tmp_path / "m2", two, "9001.1.0", {"6.1.0-50-amd64": True})
    base = dict(release="current", host_root=str(host_root(tmp_path)), fallback_url_template=None,
                cache_dir=str(tmp_path / "cache"), min_free_space=0)
    first = dc.ensure(dc.Request(url_template=f"file://{tmp_path}/m1/{{version}}", verify_key=one.public, **base))
    second = dc.ensure(dc.Request(url_template=f"file://{tmp_path}/m2/{{version}}", verify_key=two.public, **base))
    assert second["changed"] is True and second["fetch"]["replaced"].startswith("it was verified with the key")
    assert (first["kernel_release"], second["kernel_release"]) == ("6.1.0-47-amd64", "6.1.0-50-amd64")
    assert second["signing_fingerprint"] == two.fingerprint
    assert sorted(os.listdir(tmp_path / "cache" / "amd64-usr")) == ["9001.1.0"]


# ------------------------------------------------------------------ key refresh through key_url


@pytest.fixture
def expired_mirror(tmp_path: Path) -> tuple[ExpiredKeySet, Path, dict[str, Path]]:
    ks = ExpiredKeySet(tmp_path / "keys")
    mirror = tmp_path / "mirror"
    publish(mirror, ks, "9001.1.0", {"6.1.0-47-amd64": True})
    publish(mirror, ks, "9001.2.0", {"6.1.0-50-amd64": True})
    ks.refresh()
    return ks, mirror, ks.write()


def expired_request(tmp_path: Path, ks: ExpiredKeySet, mirror: Path, **kw: object) -> dc.Request:
    fields = dict(release="9001.1.0", board="amd64-usr", channel="stable", host_root=str(tmp_path / "none"),
                  url_template=f"file://{mirror}/{{version}}", fallback_url_template=None,
                  verify_key=ks.expired_public.decode(), cache_dir=str(tmp_path / "cache"), min_free_space=0,
                  retry_delay=0.01)
    fields.update(kw)
    return dc.Request(**fields)  # type: ignore[arg-type]


@NEEDS_TOOLS
def test_expired_subkey_is_refreshed_from_key_url_and_cached(tmp_path: Path, expired_mirror) -> None:
    ks, mirror, keys = expired_mirror
    res = dc.ensure(expired_request(tmp_path, ks, mirror, key_url=f"file://{keys['refreshed']}"))
    assert res["changed"] is True and res["signing_fingerprint"] == ks.fingerprint
    refresh = res["key_refresh"]
    assert refresh["url"] == f"file://{keys['refreshed']}" and refresh["fingerprints"] == [ks.fingerprint]
    cached_key = tmp_path / "cache" / "keys" / f"{ks.fingerprint}.asc"
    assert refresh["cached_keys"] == [str(cached_key)] and cached_key.read_bytes().startswith(b"-----BEGIN PGP")
    assert "expired on" in refresh["reason"] and any("key_url" in w for w in res["warnings"])
    assert res["key_expires"] > time.strftime("%Y-%m-%d", time.gmtime(time.time() + 300 * 86400))
    # the next run (another release) uses the cached copy: key_url is not even reachable now
    keys["refreshed"].unlink()
    nxt = dc.ensure(expired_request(tmp_path, ks, mirror, release="9001.2.0", key_url=f"file://{keys['refreshed']}"))
    assert nxt["changed"] is True and "key_refresh" not in nxt and nxt["kernel_release"] == "6.1.0-50-amd64"


@NEEDS_TOOLS
def test_refreshed_key_of_another_primary_is_refused(tmp_path: Path, expired_mirror) -> None:
    ks, mirror, keys = expired_mirror
    with pytest.raises(Exception, match=f"EXPKEYSIG.*{ks.impostor.fingerprint}.*not the pinned {ks.fingerprint}: refused"):
        dc.ensure(expired_request(tmp_path, ks, mirror, key_url=f"file://{keys['impostor']}"))
    assert not (tmp_path / "cache" / "keys").exists()
    assert not (tmp_path / "cache" / "amd64-usr" / "9001.1.0").exists()


@NEEDS_TOOLS
def test_expired_subkey_without_key_url_fails_naming_the_option(tmp_path: Path, expired_mirror) -> None:
    ks, mirror, _keys = expired_mirror
    with pytest.raises(Exception, match=r"EXPKEYSIG.*key_url is empty.*set key_url"):
        dc.ensure(expired_request(tmp_path, ks, mirror, key_url=None))
    with pytest.raises(Exception, match=r"EXPKEYSIG.*key_url=file:///nonexistent.*failed"):
        dc.ensure(expired_request(tmp_path, ks, mirror, key_url="file:///nonexistent/key.asc", retries=0))
    with pytest.raises(dc.RequestError, match="key_url="):
        dc.ensure(expired_request(tmp_path, ks, mirror, key_url="ftp://example.invalid/key.asc"))


@NEEDS_TOOLS
def test_key_expiring_soon_is_warned_about(tmp_path: Path) -> None:
    soon = PgpKey.generate(tmp_path / "soon", "Soon <soon@example.invalid>", subkey_days=30)
    mirror = tmp_path / "mirror"
    publish(mirror, soon, "9001.1.0", {"6.1.0-47-amd64": True})
    req = dc.Request(release="9001.1.0", board="amd64-usr", channel="stable", host_root=str(tmp_path / "none"),
                     url_template=f"file://{mirror}/{{version}}", fallback_url_template=None,
                     verify_key=soon.public().decode(), cache_dir=str(tmp_path / "cache"), min_free_space=0)
    for res in (dc.ensure(req), dc.ensure(req)):  # downloaded, then cached: both warn
        assert res["key_expires"][:10] == time.strftime("%Y-%m-%d", time.gmtime(time.time() + 30 * 86400))
        assert any("expires on" in w and ("in 29 days" in w or "in 30 days" in w) for w in res["warnings"])


# ------------------------------------------------------------------ what killed runs leave behind


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sweep_cache_removes_only_what_dead_runs_left(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    version = cache / "amd64-usr" / "9001.1.0"
    version.mkdir(parents=True)
    gone, alive = dead_pid(), os.getpid()
    dead_paths = [cache / f"modulus-gnupg-{gone}-abcd", cache / "amd64-usr" / f".9001.2.0.fetch-{gone}-x1",
                  cache / f".modulus-devc.run-{gone}-x2"]
    live_paths = [cache / f"modulus-gnupg-{alive}-abcd", cache / "amd64-usr" / f".9001.2.0.fetch-{alive}-x1",
                  cache / f".modulus-devc.run-{alive}-x2"]
    for path in dead_paths + live_paths:
        path.mkdir()
        (path / "f").write_bytes(b"x")
    (cache / "keys").mkdir()
    dead_key_tmp = cache / "keys" / f".{'A' * 40}.asc.tmp-{gone}-zz"
    dead_key_tmp.write_bytes(b"half a key")
    dead_paths.append(dead_key_tmp)
    (version / f".partial-flatcar_developer_container.bin.{gone}-q").write_bytes(b"half")
    (version / f".partial-flatcar_developer_container.bin.{alive}-q").write_bytes(b"half")
    removed = dc.sweep_cache(str(cache))
    assert sorted(removed) == sorted([str(p) for p in dead_paths]
                                     + [str(version / f".partial-flatcar_developer_container.bin.{gone}-q")])
    assert all(p.exists() for p in live_paths)
    assert os.listdir(version) == [f".partial-flatcar_developer_container.bin.{alive}-q"]
    assert dc.sweep_cache(str(tmp_path / "missing")) == []
