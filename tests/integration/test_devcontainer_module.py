"""coreos_devcontainer end to end, run as Ansible runs it (``ansible localhost -m``), against the
simulation kit: its release server on 127.0.0.1, its signed images and its simulated host roots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sim import ansible_run, faults
from sim.kit import Kit, ReleaseServer
from sim.signing import ExpiredKeySet

REPO = Path(__file__).resolve().parents[2]
MODULE = "modulus.kmods.coreos_devcontainer"
NAME = "flatcar_developer_container.bin.bz2"


def run_module(args: dict, check: bool = False) -> dict:
    """Run the module once through the ansible CLI; return its result (with 'failed' set on failure)."""
    return ansible_run.run_module(MODULE, args, check=check)[0]


def base_args(kit: Kit, server: ReleaseServer, host_root: Path, cache: Path, **extra: object) -> dict:
    args = {"host_root": str(host_root), "url_template": server.url_template,
            "fallback_url_template": server.bincache_template, "verify_key": str(kit.key.public_armored),
            "verify_fingerprint": [kit.key.fingerprint], "cache_dir": str(cache), "retry_delay": 0.2}
    args.update(extra)
    return args


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the tests that may reuse a download (each full fetch takes several seconds)."""
    return tmp_path_factory.mktemp("devc-cache")


def test_current_release_then_unchanged_without_network(kit: Kit, release_server: ReleaseServer,
                                                        host_root_factory, shared_cache: Path) -> None:
    root = host_root_factory(update="idle")
    current = kit.releases["current"]
    first = run_module(base_args(kit, release_server, root, shared_cache, release="current"))
    assert not first.get("failed"), first.get("msg")
    assert first["changed"] is True and first["cached"] is False
    assert (first["release_version"], first["pending"], first["release_source"]) == (current.version, False, "release-file")
    assert first["kernel_release"] == current.kernel
    assert first["kernel_releases"] == [current.kernel]
    assert first["image_release"]["FLATCAR_RELEASE_VERSION"] == current.version
    assert first["signing_fingerprint"] == kit.key.fingerprint
    assert first["compressed_sha256"] == current.image_sha256
    assert first["fetch"]["source"] == "url_template"
    image = Path(first["image_path"])
    assert image == shared_cache / current.board / current.version / "flatcar_developer_container.bin"
    st = image.stat()
    assert st.st_size == current.image_raw.stat().st_size
    assert st.st_blocks * 512 <= current.image_raw.stat().st_blocks * 512  # at least as sparse as the original
    assert files_under(image.parent) == ["flatcar_developer_container.bin", "metadata.json"]
    assert any("100.0%" in line for line in Path(first["fetch_log"]).read_text().splitlines())

    release_server.reset()
    second = run_module(base_args(kit, release_server, root, shared_cache, release="current"))
    assert not second.get("failed"), second.get("msg")
    assert second["changed"] is False and second["cached"] is True
    assert second["kernel_release"] == current.kernel
    assert release_server.hits == []  # no network at all


def test_pending_release_from_update_engine(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                            shared_cache: Path) -> None:
    root = host_root_factory(update="need_reboot")
    pending = kit.releases["pending"]
    res = run_module(base_args(kit, release_server, root, shared_cache, release="pending"))
    assert not res.get("failed"), res.get("msg")
    assert (res["release_version"], res["pending"], res["release_source"]) == (pending.version, True, "update_engine")
    assert res["update_status"]["current_op"] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert res["kernel_release"] == pending.kernel
    assert res["current_version"] == kit.releases["current"].version
    # the pending image must be whole and identical to what was signed
    assert subprocess.run(["cmp", "--silent", res["image_path"], str(pending.image_raw)], check=False).returncode == 0


def test_pending_with_zero_new_version_reads_the_usr_partition(kit: Kit, release_server: ReleaseServer,
                                                               host_root_factory, shared_cache: Path) -> None:
    root = host_root_factory(update="need_reboot_zero")
    pending = kit.releases["pending"]
    res = run_module(base_args(kit, release_server, root, shared_cache, release="pending"))
    assert not res.get("failed"), res.get("msg")
    assert (res["release_version"], res["pending"], res["release_source"]) == (pending.version, True, "usr-partition")
    assert res["usr_partition"].endswith("USR-B")
    assert res["kernel_release"] == pending.kernel


def test_pending_when_idle_is_current(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                      shared_cache: Path) -> None:
    root = host_root_factory(update="idle")
    res = run_module(base_args(kit, release_server, root, shared_cache, release="pending"))
    assert not res.get("failed"), res.get("msg")
    assert (res["release_version"], res["pending"]) == (kit.releases["current"].version, False)


def test_check_mode_downloads_nothing(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                      tmp_path: Path) -> None:
    root = host_root_factory(update="need_reboot")
    cache = tmp_path / "cache"
    res = run_module(base_args(kit, release_server, root, cache, release="pending"), check=True)
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is True
    assert res["would_download"] == release_server.release_url(kit.releases["pending"].version)
    assert res["destination"].startswith(str(cache))
    assert release_server.hits == []
    assert files_under(cache) == []


def test_flipped_byte_is_rejected_and_nothing_cached(kit: Kit, host_root_factory, tmp_path: Path) -> None:
    current = kit.releases["current"]
    mirror = tmp_path / "mirror" / current.version
    mirror.mkdir(parents=True)
    data = bytearray(current.image_bz2.read_bytes())
    data[len(data) // 2] ^= 0x10
    (mirror / NAME).write_bytes(bytes(data))
    shutil.copy(current.image_sig, mirror / (NAME + ".sig"))
    cache = tmp_path / "cache"
    res = run_module({"host_root": str(host_root_factory()), "release": "current", "cache_dir": str(cache),
                      "url_template": f"file://{tmp_path}/mirror/{{version}}", "fallback_url_template": "",
                      "verify_key": str(kit.key.public_armored)})
    assert res.get("failed") is True
    assert "signature" in res["msg"].lower() or "decompress" in res["msg"].lower() or "bzip2" in res["msg"].lower()
    assert [f for f in files_under(cache) if f != "fetch.log"] == [current.board]  # an empty board directory at most
    assert not any((cache / current.board).iterdir())


def test_image_signed_for_another_release_is_rejected(kit: Kit, host_root_factory, tmp_path: Path) -> None:
    current, pending = kit.releases["current"], kit.releases["pending"]
    mirror = tmp_path / "mirror" / current.version
    mirror.mkdir(parents=True)
    os.symlink(current.image_bz2, mirror / NAME)
    shutil.copy(pending.image_sig, mirror / (NAME + ".sig"))  # a valid signature, of other bytes
    cache = tmp_path / "cache"
    res = run_module({"host_root": str(host_root_factory()), "release": "current", "cache_dir": str(cache),
                      "url_template": f"file://{tmp_path}/mirror/{{version}}", "fallback_url_template": "",
                      "verify_key": str(kit.key.public_armored)})
    assert res.get("failed") is True
    assert "BAD signature" in res["msg"]
    assert not (cache / current.board / current.version).exists()


def test_wrong_key_is_rejected_before_downloading(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                                  tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = base_args(kit, release_server, host_root_factory(), cache, release="current",
                     verify_key=str(kit.other_key.public_armored))
    del args["verify_fingerprint"]
    res = run_module(args)
    assert res.get("failed") is True
    assert "not in verify_key" in res["msg"]
    assert not any(h.endswith(".bz2") for h in release_server.hits)
    assert not (cache / "amd64-usr" / kit.releases["current"].version).exists()


def test_bundled_flatcar_key_rejects_the_simulated_signature(kit: Kit, release_server: ReleaseServer,
                                                             host_root_factory, tmp_path: Path) -> None:
    args = base_args(kit, release_server, host_root_factory(), tmp_path / "cache", release="current")
    del args["verify_key"], args["verify_fingerprint"]
    res = run_module(args)
    assert res.get("failed") is True and "not in verify_key" in res["msg"]


def test_404_on_channel_host_uses_fallback_and_a_cut_is_retried(kit: Kit, release_server: ReleaseServer,
                                                                 host_root_factory, tmp_path: Path) -> None:
    current = kit.releases["current"]
    release_server.fail_paths(404, "/stable/")
    # the kit matches a substring, so the .sig request (438 bytes, sent whole) takes the first cut
    release_server.cut_after(f"/bincache/images/amd64/{current.version}/{NAME}", 5 << 20, times=2)
    res = run_module(base_args(kit, release_server, host_root_factory(), tmp_path / "cache", release="current"))
    assert not res.get("failed"), res.get("msg")
    assert res["fetch"]["source"] == "fallback_url_template"
    assert res["fetch"]["attempts"] == 2
    assert res["url"] == f"{release_server.base_url}/bincache/images/amd64/{current.version}/{NAME}"
    assert res["kernel_release"] == current.kernel
    assert files_under(Path(res["image_path"]).parent) == ["flatcar_developer_container.bin", "metadata.json"]


def test_connection_cut_every_time_fails_with_no_partial_file(kit: Kit, release_server: ReleaseServer,
                                                              host_root_factory, tmp_path: Path) -> None:
    release_server.cut_after(NAME, 3 << 20, times=10)
    cache = tmp_path / "cache"
    res = run_module(base_args(kit, release_server, host_root_factory(), cache, release="current", retries=1))
    assert res.get("failed") is True
    assert "after 2 attempt" in res["msg"]
    assert not (cache / "amd64-usr" / kit.releases["current"].version).exists()
    assert [p for p in cache.rglob("*") if p.is_file() and p.name != "fetch.log"] == []


def test_run_command_reads_the_kernel_release_and_image_stays_pristine(kit: Kit, release_server: ReleaseServer,
                                                                      host_root_factory, shared_cache: Path,
                                                                      tmp_path: Path) -> None:
    root = host_root_factory(update="need_reboot")
    pending = kit.releases["pending"]
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("from the host\n")
    args = base_args(kit, release_server, root, shared_cache, release="pending",
                     command=["sh", "-c", "ls /lib/modules; cat /src/hello.txt; echo $GREETING; pwd; "
                                          "uname -r > /out/uname; ls /lib/modules > /out/kernels; "
                                          "touch /usr/should-vanish; ! touch /src/nope"],
                     binds_ro=[f"{src}:/src"], binds_rw=[f"{out}:/out"], env={"GREETING": "hi"}, workdir="/tmp",
                     log_path=str(tmp_path / "run.log"))
    res = run_module(args)
    assert not res.get("failed"), res.get("msg")
    assert res["rc"] == 0 and res["timed_out"] is False
    assert pending.kernel in res["stdout_tail"]
    assert "from the host" in res["stdout_tail"] and "\nhi\n" in res["stdout_tail"] and "/tmp" in res["stdout_tail"]
    assert (out / "kernels").read_text().split() == [pending.kernel]
    assert res["run_method"] in ("overlay", "chroot", "image")
    assert Path(res["log_path"]).read_text().count(pending.kernel) >= 1
    meta = json.loads((Path(res["image_path"]).parent / "metadata.json").read_text())
    st = Path(res["image_path"]).stat()
    assert (meta["size"], meta["mtime_ns"]) == (st.st_size, st.st_mtime_ns)  # never written
    # the next run still finds it verified and unchanged, and /usr/should-vanish was only in the overlay
    res2 = run_module(base_args(kit, release_server, root, shared_cache, release="pending",
                                command=["sh", "-c", "test ! -e /usr/should-vanish"]))
    assert not res2.get("failed"), res2.get("msg")
    assert res2["cached"] is True


def test_failing_command_fails_the_task(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                        shared_cache: Path) -> None:
    res = run_module(base_args(kit, release_server, host_root_factory(update="need_reboot"), shared_cache,
                               release="pending", command="sh -c 'echo boom; exit 3'"))
    assert res.get("failed") is True
    assert res["rc"] == 3 and "boom" in res["stdout_tail"]
    assert "rc=3" in res["msg"]


def test_keep_prunes_and_absent_removes(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                        shared_cache: Path) -> None:
    root = host_root_factory(update="need_reboot")
    current, pending = kit.releases["current"], kit.releases["pending"]
    board_dir = shared_cache / current.board
    for release, update in (("current", "idle"), ("pending", "need_reboot")):  # no-ops after the tests above
        res = run_module(base_args(kit, release_server, host_root_factory(update=update), shared_cache, release=release))
        assert not res.get("failed"), res.get("msg")
    assert {current.version, pending.version} <= {p.name for p in board_dir.iterdir()}
    # an old leftover version that keep=2 must prune (current and pending are protected)
    old = board_dir / "9000.0.0"
    old.mkdir()
    (old / "flatcar_developer_container.bin").write_bytes(b"old")
    res = run_module(base_args(kit, release_server, root, shared_cache, release="pending", keep=2))
    assert not res.get("failed"), res.get("msg")
    assert res["pruned"] == ["9000.0.0"] and res["changed"] is True
    assert not old.exists()
    # state=absent, first in check mode
    args = base_args(kit, release_server, root, shared_cache, release=current.version, board=current.board,
                     channel="stable", state="absent")
    res = run_module(args, check=True)
    assert res["changed"] is True and (board_dir / current.version).exists()
    res = run_module(args)
    assert res["changed"] is True and not (board_dir / current.version).exists()
    assert run_module(args)["changed"] is False


def test_channel_comes_from_the_etc_override(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                             tmp_path: Path) -> None:
    root = host_root_factory(update="idle", etc_update_conf={"GROUP": "beta"})
    res = run_module(base_args(kit, release_server, root, tmp_path / "cache", release="current"), check=True)
    assert res["channel"] == "beta"
    assert res["would_download"] == release_server.release_url(kit.releases["current"].version, channel="beta")
    assert res["urls"][-1].startswith(f"{release_server.base_url}/bincache/images/amd64/")


def test_legacy_coreos_host_gets_the_coreos_image(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                                  tmp_path: Path) -> None:
    root = host_root_factory(update="idle", legacy=True)
    current = kit.releases["current"]
    res = run_module(base_args(kit, release_server, root, tmp_path / "cache", release="current"))
    assert not res.get("failed"), res.get("msg")
    assert res["url"].endswith(f"/{current.version}/coreos_developer_container.bin.bz2")
    assert res["image_path"].endswith(f"/{current.version}/coreos_developer_container.bin")
    assert (res["release_version"], res["kernel_release"]) == (current.version, current.kernel)


# ------------------------------------------------------------------ a failed fetch never touches a verified entry


def entry_snapshot(directory: Path) -> dict[str, tuple[int, int, int, str]]:
    """(inode, size, mtime_ns, sha256) of every file of a cache entry."""
    out = {}
    for path in sorted(directory.iterdir()):
        st = path.stat()
        digest = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
        out[path.name] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return out


def test_wrong_key_run_keeps_the_verified_entry_then_an_offline_run_uses_it(kit: Kit, release_server: ReleaseServer,
                                                                           host_root_factory, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = host_root_factory()
    good = base_args(kit, release_server, root, cache, release="current")
    assert not run_module(good).get("failed")
    entry = cache / "amd64-usr" / kit.releases["current"].version
    before = entry_snapshot(entry)
    wrong = dict(good, verify_key=str(kit.other_key.public_armored), verify_fingerprint=[kit.other_key.fingerprint])
    res = run_module(wrong)
    assert res.get("failed") is True and "not in verify_key" in res["msg"]
    assert entry_snapshot(entry) == before  # image and metadata.json, byte for byte (and the same inodes)
    assert sorted(p.name for p in (cache / "amd64-usr").iterdir()) == [entry.name]
    release_server.reset()
    offline = dict(good, url_template="http://127.0.0.1:9/nothing/{version}", fallback_url_template="")
    res = run_module(offline)
    assert not res.get("failed"), res.get("msg")
    assert res["cached"] is True and res["changed"] is False and release_server.hits == []
    assert entry_snapshot(entry) == before


# ------------------------------------------------------------------ key refresh through key_url


@pytest.fixture(scope="module")
def expired_signed(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExpiredKeySet, Path, Path, dict[str, Path]]:
    """A copy of the current release's image signed (700 days ago) by a key whose signing subkey has expired
    since, the key as first published, its refreshed copy and an impostor's key (another primary)."""
    base = tmp_path_factory.mktemp("expired-key")
    ks = ExpiredKeySet(base / "keys")
    copy = base / NAME
    shutil.copyfile(kit.releases["current"].image_bz2, copy)  # never touch the kit cache
    sig = ks.sign(copy, base / (NAME + ".sig"))
    ks.refresh()
    return ks, copy, sig, ks.write()


def expired_args(kit: Kit, server: ReleaseServer, signed, host_root: Path, cache: Path, key: str | None) -> dict:
    ks, copy, sig, keys = signed
    version = kit.releases["current"].version
    server.add_file(f"/expired/{version}/{NAME}", copy)
    server.add_file(f"/expired/{version}/{NAME}.sig", sig.read_bytes())
    args = base_args(kit, server, host_root, cache, release="current", verify_key=str(keys["expired"]),
                     verify_fingerprint=[ks.fingerprint], url_template=server.base_url + "/expired/{version}",
                     fallback_url_template="")
    if key is None:
        args["key_url"] = ""
    else:
        args["key_url"] = server.add_file(f"/keys/{key}.asc", keys[key].read_bytes())
    return args


def test_expired_signing_subkey_is_refreshed_from_key_url(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                                          tmp_path: Path, expired_signed) -> None:
    ks = expired_signed[0]
    cache = tmp_path / "cache"
    args = expired_args(kit, release_server, expired_signed, host_root_factory(), cache, "refreshed")
    res, out = ansible_run.run_module(MODULE, args)
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is True and res["signing_fingerprint"] == ks.fingerprint
    assert res["key_refresh"]["url"] == args["key_url"] and res["key_refresh"]["fingerprints"] == [ks.fingerprint]
    assert "expired on" in res["key_refresh"]["reason"]
    assert res["key_refresh"]["cached_keys"] == [str(cache / "keys" / f"{ks.fingerprint}.asc")]
    assert "[WARNING]" in out and "fetched a current copy of the key from key_url" in " ".join(out.split())
    assert res["key_expires"] > time.strftime("%Y-%m-%d", time.gmtime(time.time() + 300 * 86400))
    assert release_server.hits.count("/keys/refreshed.asc") == 1
    assert Path(res["image_path"]).stat().st_size == kit.releases["current"].image_raw.stat().st_size
    # the refreshed key is cached: the entry is hit without any request, and a refetch would not fetch the key
    release_server.reset()
    again = run_module(expired_args(kit, release_server, expired_signed, host_root_factory(), cache, "refreshed"))
    assert again["cached"] is True and release_server.hits == [] and "key_refresh" not in again
    assert [a for a in faults.gpg_agents() if str(tmp_path) in a.cmdline] == []


def test_refreshed_key_of_another_primary_is_refused(kit: Kit, release_server: ReleaseServer, host_root_factory,
                                                     tmp_path: Path, expired_signed) -> None:
    ks = expired_signed[0]
    cache = tmp_path / "cache"
    res = run_module(expired_args(kit, release_server, expired_signed, host_root_factory(), cache, "impostor"))
    assert res.get("failed") is True
    assert "EXPKEYSIG" in res["msg"] and "refused" in res["msg"]
    assert ks.impostor.fingerprint in res["msg"] and f"not the pinned {ks.fingerprint}" in res["msg"]
    assert not any(h.endswith(".bz2") for h in release_server.hits)
    assert not (cache / "keys").exists() and not (cache / "amd64-usr" / kit.releases["current"].version).exists()


def test_expired_signing_subkey_with_key_url_disabled_fails_naming_the_option(
        kit: Kit, release_server: ReleaseServer, host_root_factory, tmp_path: Path, expired_signed) -> None:
    res = run_module(expired_args(kit, release_server, expired_signed, host_root_factory(), tmp_path / "cache", None))
    assert res.get("failed") is True
    assert "EXPKEYSIG" in res["msg"] and "key_url is empty" in res["msg"] and "set key_url" in res["msg"]
    assert not any(h.endswith(".bz2") or h.startswith("/keys/") for h in release_server.hits)


def test_release_server_serves_added_files(release_server: ReleaseServer, tmp_path: Path) -> None:
    url = release_server.add_file("/extra/data.bin", b"0123456789")
    path = tmp_path / "file.txt"
    path.write_text("from a file\n")
    file_url = release_server.add_file("/extra/file.txt", path)
    assert urllib.request.urlopen(url).read() == b"0123456789"
    req = urllib.request.Request(url, headers={"Range": "bytes=2-4"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206 and resp.read() == b"234"
    assert urllib.request.urlopen(file_url).read() == b"from a file\n"
    with pytest.raises(ValueError):
        release_server.add_file("relative", b"x")
    release_server.reset()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url)
