"""The simulation kit's own tests: what it builds must look like Flatcar's real artifacts."""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim import faults
from sim.kit import (
    IMAGE_NAME,
    ROOT_OFFSET,
    ROOT_TYPE_GUID,
    USR_A_PARTUUID,
    USR_B_PARTUUID,
    Kit,
    ReleaseServer,
    _locked,
    _parse_range,
    update_engine_status_text,
    version_txt_text,
)

# ---------------------------------------------------------------------------------------------
# helpers (independent of the collection's own parsers on purpose)
# ---------------------------------------------------------------------------------------------


def gpt_entries(path: Path) -> list[dict[str, object]]:
    """Parse the primary GPT of a disk image: one dict per entry slot (unused slots included)."""
    with open(path, "rb") as fh:
        fh.seek(512)
        hdr = fh.read(92)
        assert hdr[:8] == b"EFI PART", "no GPT header at LBA 1"
        entries_lba, n_entries, entry_size = struct.unpack_from("<QII", hdr, 72)
        fh.seek(entries_lba * 512)
        raw = fh.read(n_entries * entry_size)
    out = []
    for i in range(n_entries):
        e = raw[i * entry_size:(i + 1) * entry_size]
        type_guid = uuid.UUID(bytes_le=e[:16])
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le").rstrip("\x00")
        out.append({"number": i + 1, "type": str(type_guid), "first": first, "last": last, "name": name,
                    "used": type_guid.int != 0})
    return out


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@contextlib.contextmanager
def mounted_root(image: Path) -> Iterator[Path]:
    """Loop-mount partition 9 of an image read-only; always unmount and detach."""
    root = next(e for e in gpt_entries(image) if e["number"] == 9)
    offset = int(root["first"]) * 512  # type: ignore[call-overload]
    size = (int(root["last"]) - int(root["first"]) + 1) * 512  # type: ignore[call-overload]
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(offset), "--sizelimit",
                          str(size), str(image)], capture_output=True, text=True, check=True).stdout.strip()
    mnt = Path(tempfile.mkdtemp(prefix="sim-test-mnt-"))
    mounted = False
    try:
        subprocess.run(["mount", "-o", "ro", "-t", "ext4", dev, str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)
        mnt.rmdir()


def debugfs_cat(fs_image: Path, path: str) -> str:
    """Read one file out of an ext4 image without mounting it."""
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(fs_image)], capture_output=True, text=True,
                          check=False)
    return proc.stdout


def btrfs_cat(fs_image: Path, path: str) -> str | None:
    """Read one file out of a btrfs image without mounting it (``btrfs restore`` of that path only);
    None when it is not there."""
    parts = path.strip("/").split("/")
    regex = "^/(|" + "|".join(re.escape("/".join(parts[:i])) for i in range(1, len(parts) + 1)) + ")$"
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["btrfs", "restore", "-i", "--path-regex", regex, str(fs_image), out], capture_output=True,
                       check=True)
        target = Path(out, *parts)
        return target.read_text() if target.is_file() else None


def blkid_value(dev: Path, tag: str) -> str:
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, str(dev)], capture_output=True, text=True,
                          check=False).stdout.strip()


def kv(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["current", "pending"])
def test_image_is_flatcar_gpt_with_root_partition_9(kit: Kit, name: str) -> None:
    rel = kit.releases[name]
    entries = gpt_entries(rel.image_raw)
    used = [e for e in entries if e["used"]]
    assert [e["number"] for e in used] == [9], "only partition 9 may exist (1-8 absent)"
    root = used[0]
    assert root["name"] == "ROOT"
    assert root["type"] == ROOT_TYPE_GUID
    assert int(root["first"]) * 512 == ROOT_OFFSET == 2097152  # type: ignore[call-overload]
    with open(rel.image_raw, "rb") as fh:
        fh.seek(ROOT_OFFSET + 1024)
        sb = fh.read(1024)
    assert sb[0x38:0x3A] == b"\x53\xef", "no ext4 superblock magic at the ROOT partition"
    assert sb[0x78:0x88].rstrip(b"\x00") == b"ROOT", "ext4 label must be ROOT"
    st = rel.image_raw.stat()
    assert st.st_size >= 3 * 1024**3
    assert st.st_blocks * 512 < st.st_size / 3, "the raw image must be sparse"


@pytest.mark.parametrize("name", ["current", "pending"])
def test_compressed_image_starts_like_the_raw_image(kit: Kit, name: str) -> None:
    rel = kit.releases[name]
    with open(rel.image_bz2, "rb") as fh:
        head = fh.read(4)
        assert head[:3] == b"BZh"
        fh.seek(0)
        dec = bz2.BZ2Decompressor()
        out = b""
        while len(out) < ROOT_OFFSET + 8192:
            out += dec.decompress(fh.read(1 << 20))
    with open(rel.image_raw, "rb") as fh:
        assert out[:ROOT_OFFSET + 8192] == fh.read(ROOT_OFFSET + 8192)


@pytest.mark.parametrize("name", ["current", "pending"])
def test_image_contents(kit: Kit, name: str) -> None:
    rel = kit.releases[name]
    with mounted_root(rel.image_raw) as mnt:
        release = kv((mnt / "usr/share/flatcar/release").read_text())
        assert release == {"FLATCAR_RELEASE_VERSION": rel.version, "FLATCAR_RELEASE_BOARD": "amd64-usr",
                           "FLATCAR_RELEASE_APPID": "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"}
        assert (mnt / "usr/share/coreos").is_symlink() and str((mnt / "usr/share/coreos").readlink()) == "flatcar"
        osr = kv((mnt / "usr/lib/os-release").read_text())
        assert (osr["ID"], osr["VERSION"], osr["VERSION_ID"]) == ("flatcar", rel.version, rel.version)
        assert str((mnt / "etc/os-release").readlink()) == "../usr/lib/os-release"
        assert sorted(p.name for p in (mnt / "usr/lib/modules").iterdir()) == [rel.kernel]
        link = mnt / "usr/lib/modules" / rel.kernel / "build"
        assert link.is_symlink()  # Debian's absolute symlink: resolve it inside the image
        build = mnt / str(link.readlink()).lstrip("/")
        for f in ("Makefile", "Module.symvers", ".config", "scripts/sign-file", "scripts/mod/modpost"):
            assert (build / f).exists(), f"{build}/{f} missing"
        assert not list((mnt / "var/cache/apt").iterdir()) if (mnt / "var/cache/apt").exists() else True
        assert not any((mnt / "usr/share/doc").iterdir())
        proc = subprocess.run(["chroot", str(mnt), "sh", "-c",
                               f"gcc --version && make --version && bc --version && xz --version && "
                               f"/usr/lib/modules/{rel.kernel}/build/scripts/sign-file 2>&1; true"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "gcc" in proc.stdout and "GNU Make" in proc.stdout
        assert "Usage: scripts/sign-file" in proc.stdout, "sign-file must run (libssl present)"
        assert "error while loading shared libraries" not in proc.stdout


def test_kit_releases_are_two_kernels(kit: Kit) -> None:
    cur, pend = kit.releases["current"], kit.releases["pending"]
    assert (cur.version, cur.kernel) == ("9001.1.0", "6.1.0-47-amd64")
    assert (pend.version, pend.kernel) == ("9001.2.0", "6.1.0-50-amd64")
    for rel in (cur, pend):
        assert (rel.board, rel.channel) == ("amd64-usr", "stable")
        assert kv(rel.version_txt.read_text()) == {
            "FLATCAR_BUILD": "9001", "FLATCAR_BRANCH": rel.version.split(".")[1], "FLATCAR_PATCH": "0",
            "FLATCAR_VERSION": rel.version, "FLATCAR_VERSION_ID": rel.version,
            "FLATCAR_BUILD_ID": f'"sim-{rel.version}"', "FLATCAR_SDK_VERSION": "9001.0.0"}


def test_rebuild_is_a_cache_hit(kit: Kit) -> None:
    files = [kit.root / "kit.json"] + [p for rel in kit.releases.values()
                                       for p in (rel.image_bz2, rel.image_raw, rel.digests_asc)]
    before = [(st.st_ino, st.st_mtime_ns, st.st_size) for st in (p.stat() for p in files)]
    logs: list[str] = []
    again = Kit.build(cache_dir=kit.cache_dir, log=logs.append)
    assert again.root == kit.root and again.key.fingerprint == kit.key.fingerprint
    # nothing was built or rebuilt (that says so in the log), nothing rewritten
    assert logs == []
    assert [(st.st_ino, st.st_mtime_ns, st.st_size) for st in (p.stat() for p in files)] == before


# ---------------------------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------------------------


def gpgv(pubkey: Path, sig: Path, data: Path) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="sim-test-gpg-") as home:
        kr = Path(home) / "k.gpg"
        subprocess.run(["gpg", "--homedir", home, "--batch", "--quiet", "--no-default-keyring", "--keyring", str(kr),
                        "--import", str(pubkey)], check=True, capture_output=True)
        return subprocess.run(["gpgv", "--homedir", home, "--keyring", str(kr), str(sig), str(data)],
                              capture_output=True, text=True, check=False)


def test_signature_verifies_with_the_kit_key_only(kit: Kit) -> None:
    rel = kit.releases["current"]
    assert rel.image_sig.read_bytes()[:1] != b"-", "the .sig must be binary, like Flatcar's"
    ok = gpgv(kit.key.public_armored, rel.image_sig, rel.image_bz2)
    assert ok.returncode == 0, ok.stderr
    assert kit.key.fingerprint != kit.key.signing_fingerprint  # signed by a subkey, like Flatcar's
    wrong = gpgv(kit.other_key.public_armored, rel.image_sig, rel.image_bz2)
    assert wrong.returncode != 0
    assert kit.key.verify(rel.image_bz2, rel.image_sig)


def test_signature_fails_after_a_flipped_byte(kit: Kit, tmp_path: Path) -> None:
    rel = kit.releases["pending"]
    copy = tmp_path / IMAGE_NAME
    shutil.copyfile(rel.image_bz2, copy)
    with open(copy, "r+b") as fh:
        fh.seek(copy.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x01]))
    res = gpgv(kit.key.public_armored, rel.image_sig, copy)
    assert res.returncode != 0
    assert "BAD signature" in res.stderr


def test_digests_match_and_are_clearsigned(kit: Kit) -> None:
    rel = kit.releases["current"]
    text = rel.digests.read_text()
    assert "# SHA512 HASH" in text and "# MD5 HASH" in text and "# SHA1 HASH" in text
    sha512 = text.split("# SHA512 HASH\n", 1)[1].split()[0]
    h = hashlib.sha512()
    with open(rel.image_bz2, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    assert sha512 == h.hexdigest()
    assert rel.digests_asc.read_text().startswith("-----BEGIN PGP SIGNED MESSAGE-----")


# ---------------------------------------------------------------------------------------------
# release server
# ---------------------------------------------------------------------------------------------


def test_server_layout(kit: Kit, release_server: ReleaseServer) -> None:
    base = release_server.base_url
    cur, pend = kit.releases["current"], kit.releases["pending"]
    assert release_server.url_template.format(channel="stable", board="amd64-usr", version="1") == \
        f"{base}/stable/amd64-usr/1"
    status, headers, body = http_get(f"{base}/stable/amd64-usr/{cur.version}/version.txt")
    assert status == 200 and body == cur.version_txt.read_bytes()
    assert int(headers["Content-Length"]) == len(body)
    # `current` is the channel's newest release
    status, _, body = http_get(f"{base}/stable/amd64-usr/current/version.txt")
    assert status == 200 and kv(body.decode())["FLATCAR_VERSION"] == pend.version
    status, _, body = http_get(f"{base}/stable/amd64-usr/{cur.version}/{IMAGE_NAME}.sig")
    assert status == 200 and body == cur.image_sig.read_bytes()
    status, _, body = http_get(f"{base}/bincache/images/amd64/{pend.version}/{IMAGE_NAME}.sig")
    assert status == 200 and body == pend.image_sig.read_bytes()
    # legacy CoreOS file name of the same artifact
    status, _, body = http_get(f"{base}/stable/amd64-usr/{cur.version}/coreos_developer_container.bin.bz2.sig")
    assert status == 200 and body == cur.image_sig.read_bytes()
    for missing in (f"/stable/amd64-usr/9999.0.0/{IMAGE_NAME}", f"/beta/amd64-usr/{cur.version}/{IMAGE_NAME}",
                    f"/stable/arm64-usr/{cur.version}/{IMAGE_NAME}", f"/bincache/images/arm64/{cur.version}/version.txt",
                    f"/stable/amd64-usr/{cur.version}/../../../etc/passwd", "/"):
        assert http_get(base + missing)[0] == 404, missing
    assert f"/stable/amd64-usr/{cur.version}/version.txt" in release_server.hits


def test_server_head_and_range(kit: Kit, release_server: ReleaseServer) -> None:
    rel = kit.releases["current"]
    url = release_server.release_url(rel.version)
    size = rel.image_bz2.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", release_server.port, timeout=30)
    conn.request("HEAD", url.replace(release_server.base_url, ""))
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == size
    conn.close()
    status, headers, body = http_get(url, {"Range": "bytes=10-19"})
    with open(rel.image_bz2, "rb") as fh:
        fh.seek(10)
        assert (status, body) == (206, fh.read(10))
    assert headers["Content-Range"] == f"bytes 10-19/{size}"
    assert http_get(url, {"Range": f"bytes={size}-"})[0] == 416


def test_server_fail_paths(kit: Kit, release_server: ReleaseServer) -> None:
    rel = kit.releases["pending"]
    with release_server.fail_paths(404, "/stable/"):
        assert http_get(f"{release_server.base_url}/stable/amd64-usr/{rel.version}/version.txt")[0] == 404
        status, _, body = http_get(f"{release_server.base_url}/bincache/images/amd64/{rel.version}/version.txt")
        assert status == 200 and body == rel.version_txt.read_bytes()
    assert http_get(f"{release_server.base_url}/stable/amd64-usr/{rel.version}/version.txt")[0] == 200
    release_server.fail_paths(503, "/stable/", times=1)
    assert http_get(f"{release_server.base_url}/stable/amd64-usr/{rel.version}/version.txt")[0] == 503
    assert http_get(f"{release_server.base_url}/stable/amd64-usr/{rel.version}/version.txt")[0] == 200


def test_server_cut_after(kit: Kit, release_server: ReleaseServer) -> None:
    rel = kit.releases["current"]
    url = release_server.release_url(rel.version)
    release_server.cut_after(IMAGE_NAME, 100_000, times=1)
    with pytest.raises(http.client.IncompleteRead) as err, urllib.request.urlopen(url, timeout=30) as resp:
        assert int(resp.headers["Content-Length"]) == rel.image_bz2.stat().st_size
        resp.read()
    assert len(err.value.partial) == 100_000
    # the fault was used up: the next download is whole
    with urllib.request.urlopen(url, timeout=60) as resp:
        h = hashlib.sha256()
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == rel.image_sha256
    assert release_server.hits.count(f"/stable/amd64-usr/{rel.version}/{IMAGE_NAME}") == 2


def test_server_channel_versions_and_stop(kit: Kit) -> None:
    cur, pend = kit.releases["current"], kit.releases["pending"]
    with kit.serve(channel_versions=[cur.version]) as srv:
        base = srv.base_url
        assert http_get(f"{base}/stable/amd64-usr/{pend.version}/version.txt")[0] == 404
        assert http_get(f"{base}/bincache/images/amd64/{pend.version}/version.txt")[0] == 200
        assert http_get(f"{base}/stable/amd64-usr/{cur.version}/version.txt")[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/stable/amd64-usr/{cur.version}/version.txt", timeout=5)


# ---------------------------------------------------------------------------------------------
# host roots
# ---------------------------------------------------------------------------------------------


def run_uec(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(root / "usr/bin/update_engine_client"), *args], capture_output=True, text=True,
                          timeout=10, check=False)


@pytest.mark.parametrize(("state", "op", "new_version"), [
    ("idle", "UPDATE_STATUS_IDLE", "0.0.0"),
    ("need_reboot", "UPDATE_STATUS_UPDATED_NEED_REBOOT", "9001.2.0"),
    ("need_reboot_zero", "UPDATE_STATUS_UPDATED_NEED_REBOOT", "0.0.0"),
])
def test_update_engine_client_status_format(host_root_factory, state: str, op: str, new_version: str) -> None:
    root = host_root_factory(update=state)
    res = run_uec(root, "-status")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert [ln.split("=", 1)[0] for ln in lines] == ["LAST_CHECKED_TIME", "PROGRESS", "CURRENT_OP", "NEW_VERSION",
                                                      "NEW_SIZE"]
    vals = kv(res.stdout)
    assert vals["CURRENT_OP"] == op and vals["NEW_VERSION"] == new_version
    assert vals["PROGRESS"] == "0.000000" and int(vals["LAST_CHECKED_TIME"]) > 1_700_000_000
    assert (int(vals["NEW_SIZE"]) > 0) == (state == "need_reboot")
    assert "Querying Update Engine status" in res.stderr and "=" not in res.stderr.split("]")[0]
    assert run_uec(root, "--status").stdout == res.stdout
    assert run_uec(root, "-check_for_update").returncode != 0
    assert (root / "run/update_engine_client.calls").read_text().splitlines()[0] == "-status"


def test_flatcar_host_root(kit: Kit, host_root_factory) -> None:
    root = host_root_factory(update="need_reboot", etc_update_conf={"GROUP": "beta"})
    cur = kit.releases["current"]
    assert kv((root / "usr/share/flatcar/release").read_text()) == {
        "FLATCAR_RELEASE_VERSION": cur.version, "FLATCAR_RELEASE_BOARD": "amd64-usr",
        "FLATCAR_RELEASE_APPID": "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"}
    assert kv((root / "usr/share/flatcar/update.conf").read_text())["GROUP"] == "stable"
    assert "SERVER" in kv((root / "usr/share/flatcar/update.conf").read_text())
    assert (root / "etc/flatcar/update.conf").read_text() == "GROUP=beta\n"
    assert kv((root / "etc/os-release").read_text())["ID"] == "flatcar"
    assert kv((root / "etc/os-release").read_text())["VERSION_ID"] == cur.version
    assert (root / "usr/share/coreos/release").read_text() == (root / "usr/share/flatcar/release").read_text()
    assert (root / "usr/share/coreos").is_symlink() and (root / "usr/share/coreos").resolve().name == "flatcar"
    # without override, /etc/flatcar/update.conf is absent (Flatcar ships none since 2022)
    plain = host_root_factory(update="idle")
    assert not (plain / "etc/flatcar/update.conf").exists()


@pytest.mark.parametrize("booted", ["A", "B"])
def test_usr_partitions_for_need_reboot_zero(kit: Kit, host_root_factory, booted: str) -> None:
    root = host_root_factory(update="need_reboot_zero", booted=booted)
    cmdline = (root / "proc/cmdline").read_text()
    booted_uuid = USR_A_PARTUUID if booted == "A" else USR_B_PARTUUID
    assert f"verity.usr=PARTUUID={booted_uuid}" in cmdline and "mount.usr=/dev/mapper/usr" in cmdline
    other = "USR-B" if booted == "A" else "USR-A"
    by_label = root / "dev/disk/by-partlabel"
    assert (root / "dev/disk/by-partuuid" / booted_uuid).resolve() == (by_label / f"USR-{booted}").resolve()
    nxt = kv(btrfs_cat(by_label / other, "/lib/os-release") or "")
    assert (nxt["ID"], nxt["VERSION"], nxt["VERSION_ID"]) == ("flatcar", "9001.2.0", "9001.2.0")
    assert kv(btrfs_cat(by_label / other, "/share/flatcar/release") or "")["FLATCAR_RELEASE_VERSION"] == "9001.2.0"
    now = kv(btrfs_cat(by_label / f"USR-{booted}", "/lib/os-release") or "")
    assert now["VERSION"] == kit.releases["current"].version
    # btrfs, as Flatcar's build_library/disk_layout.json formats USR-A/USR-B since 2021
    for label in ("USR-A", "USR-B"):
        assert (blkid_value(by_label / label, "TYPE"), blkid_value(by_label / label, "LABEL")) == ("btrfs", label)
    assert (by_label / other).read_bytes()[0x10040:0x10048] == b"_BHRfS_M"
    pend = kit.releases["pending"].kernel
    assert btrfs_cat(by_label / other, f"/lib/modules/{pend}/modules.dep") == ""
    assert btrfs_cat(by_label / other, f"/lib/modules/{pend}/modules.missing") is None


def test_idle_host_has_a_blank_other_usr(host_root_factory) -> None:
    """A partition update_engine never wrote holds no file system (Flatcar leaves USR-B unformatted)."""
    root = host_root_factory(update="idle")
    other = root / "dev/disk/by-partlabel/USR-B"
    assert blkid_value(other, "TYPE") == ""
    assert other.read_bytes().count(0) == other.stat().st_size
    assert blkid_value(root / "dev/disk/by-partlabel/USR-A", "TYPE") == "btrfs"


def test_ext2_usr_partitions_of_older_releases(kit: Kit, host_root_factory) -> None:
    """Releases before July 2021 (and CoreOS) formatted /usr as ext2: ``usr_fs="ext2"``, the default when legacy."""
    root = host_root_factory(update="need_reboot_zero", usr_fs="ext2")
    by_label = root / "dev/disk/by-partlabel"
    assert blkid_value(by_label / "USR-B", "TYPE") == "ext2"
    assert kv(debugfs_cat(by_label / "USR-B", "/lib/os-release"))["VERSION_ID"] == "9001.2.0"
    legacy = host_root_factory(update="need_reboot_zero", legacy=True)
    assert blkid_value(legacy / "dev/disk/by-partlabel/USR-B", "TYPE") == "ext2"


def test_legacy_coreos_host_root(kit: Kit, host_root_factory) -> None:
    root = host_root_factory(update="need_reboot", legacy=True, etc_update_conf={"GROUP": "alpha"})
    cur = kit.releases["current"]
    assert not (root / "usr/share/flatcar").exists()
    assert not (root / "usr/share/coreos").is_symlink()
    assert kv((root / "usr/share/coreos/release").read_text()) == {
        "COREOS_RELEASE_VERSION": cur.version, "COREOS_RELEASE_BOARD": "amd64-usr"}
    assert kv((root / "usr/share/coreos/update.conf").read_text())["GROUP"] == "stable"
    assert (root / "etc/coreos/update.conf").read_text() == "GROUP=alpha\n"
    assert kv((root / "etc/os-release").read_text())["ID"] == "coreos"
    assert kv(run_uec(root, "-status").stdout)["NEW_VERSION"] == "9001.2.0"


def test_host_root_rejects_unknown_state(kit: Kit, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="update must be one of"):
        kit.host_root(tmp_path, update="rebooting")
    absent = kit.host_root(tmp_path, update="absent")
    assert not (absent / "usr/bin/update_engine_client").exists()


# ---------------------------------------------------------------------------------------------
# pure helpers (no root, no kit)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-9", (0, 9)), ("bytes=10-", (10, 99)), ("bytes=-5", (95, 99)), ("bytes=90-200", (90, 99)),
    ("bytes=100-", None), ("bytes=5-4", None), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=x-", None),
])
def test_parse_range(header: str, expected: tuple[int, int] | None) -> None:
    assert _parse_range(header, 100) == expected


def test_version_txt_and_status_texts() -> None:
    assert kv(version_txt_text("4459.2.1")) == {
        "FLATCAR_BUILD": "4459", "FLATCAR_BRANCH": "2", "FLATCAR_PATCH": "1", "FLATCAR_VERSION": "4459.2.1",
        "FLATCAR_VERSION_ID": "4459.2.1", "FLATCAR_BUILD_ID": '"sim-4459.2.1"', "FLATCAR_SDK_VERSION": "4459.0.0"}
    assert update_engine_status_text("need_reboot", "4459.2.2", 486539264, 1732571234) == (
        "LAST_CHECKED_TIME=1732571234\nPROGRESS=0.000000\nCURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT\n"
        "NEW_VERSION=4459.2.2\nNEW_SIZE=486539264\n")


def test_build_lock_serializes_processes(tmp_path: Path) -> None:
    """Kit.build holds this lock while building: a second process waits for the first."""
    lock = tmp_path / ".kit-x.lock"
    # the holder keeps the lock until it reads a line
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from sim.kit import _locked\n"
         f"with _locked(__import__('pathlib').Path({str(lock)!r})):\n"
         "    print('held', flush=True); sys.stdin.readline(); print('releasing', flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    events: list[str] = []

    def second() -> None:
        with _locked(lock):
            events.append("acquired")

    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        # the second taker blocks in flock() (had the lock not held, it would have it by now)
        faults.wait_for(lambda: events or faults.in_syscall(os.getpid(), ["flock"], tid=waiter.native_id),
                        timeout=60, what="the second taker of the lock")
        assert events == []
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "releasing"
        waiter.join(timeout=60)
        assert events == ["acquired"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert holder.returncode == 0


# ---- the commands of a stock Flatcar host (sim.hosttools) ------------------------------------------

STOCK_HAS = ("sh", "bash", "systemd-nspawn", "systemd-sysext", "systemd-dissect", "losetup", "mount", "depmod",
             "modprobe", "btrfs", "debugfs", "gpg", "gpgv", "lbzip2", "xz", "zstd", "tar", "git", "curl", "which")
STOCK_LACKS = ("mksquashfs", "gcc", "cc", "make", "python3", "python", "perl")


def _command_v(names: tuple[str, ...], host_tools: str | None) -> dict[str, str]:
    """``command -v`` of each name, run by the ansible.builtin.shell module the way the tests run modules."""
    from sim import ansible_run

    script = "; ".join(f"printf 'cmd:%s=%s\\n' {n} \"$(command -v {n})\"" for n in names)
    proc = subprocess.run(ansible_run.module_cmd("ansible.builtin.shell", {"cmd": script}),
                          env=ansible_run.ansible_env(host_tools), capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "CHANGED | rc=0" in proc.stdout, proc.stdout + proc.stderr
    return dict(line[4:].split("=", 1) for line in proc.stdout.splitlines() if line.startswith("cmd:"))


@pytest.mark.parametrize("variant", ["stable", "main"])
def test_modules_run_with_the_commands_of_a_stock_host(variant: str) -> None:
    from sim import hosttools

    found = _command_v(STOCK_HAS + STOCK_LACKS + ("mkfs.erofs",), variant)
    root = str(hosttools.tools_dir(variant))
    for name in STOCK_HAS:
        assert found[name].startswith(root + "/"), (name, found[name])
    for name in STOCK_LACKS:
        assert found[name] == "", (name, found[name])
    assert bool(found["mkfs.erofs"]) == (variant == "main")
    assert os.path.realpath(found["sh"]) == os.path.realpath(shutil.which("bash") or "/bin/bash")  # Flatcar's sh is bash


def test_the_machine_path_is_only_an_explicit_opt_out() -> None:
    found = _command_v(("mksquashfs",), None)
    assert found["mksquashfs"] and "hosttools-" not in found["mksquashfs"]


def test_module_which_does_not_escape_the_stock_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The collection's which() adds the usual sbin/bin directories only to a PATH without sbin."""
    from ansible_collections.modulus.kmods.plugins.module_utils.common import which
    from sim import hosttools

    monkeypatch.setenv("PATH", hosttools.host_path("stable"))
    assert which("mksquashfs") is None and which("mkfs.erofs") is None and which("gcc") is None
    assert which("mkfs.btrfs") and which("debugfs")
    monkeypatch.setenv("PATH", hosttools.host_path("main"))
    assert which("mkfs.erofs")

def test_flatcar_host_root_has_flatcars_nvidia_service(host_root_factory) -> None:
    """As x11-drivers/nvidia-drivers-service installs it: enabled by a link in /usr, Flatcar's own unit and
    script (with the kit's prelude only), the ebuild's metadata; legacy CoreOS has none of it."""
    from sim import nvidia_service as nvsvc

    root = host_root_factory(update="idle")
    unit = (root / nvsvc.UNIT).read_text()
    assert unit == (nvsvc.SOURCE / "nvidia.service").read_text()
    for line in ("After=network-online.target systemd-sysext.service", "Before=containerd.target",
                 "WantedBy=multi-user.target", "ExecStart=/usr/lib/nvidia/bin/setup-nvidia"):
        assert line in unit.splitlines()
    assert os.readlink(root / nvsvc.WANTS) == "../nvidia.service"
    assert kv((root / "usr/share/flatcar/nvidia-metadata").read_text()) == {
        "NVIDIA_DRIVER_VERSION": nvsvc.DRIVER_VERSION, "NVIDIA_PRODUCT_TYPE": "tesla"}
    script = (root / nvsvc.SETUP).read_text()
    source = (nvsvc.SOURCE / "setup-nvidia").read_text()
    prelude_end = script.index("# ---- end of the stand-ins ----\n") + len("# ---- end of the stand-ins ----\n")
    assert script[:prelude_end].startswith("#!/bin/bash\nset -euo pipefail\n")
    ours = script[prelude_end:].replace('"$SIM_PROC_DEVICES"', "/proc/devices")
    assert "#!/bin/bash\nset -euo pipefail\n" + ours == source
    assert os.access(root / nvsvc.SETUP, os.X_OK) and os.access(root / nvsvc.LSPCI, os.X_OK)
    assert not (root / nvsvc.PCI_DEVICES).exists() and not (root / "sys").exists()
    legacy = host_root_factory(update="idle", legacy=True)
    assert not (legacy / nvsvc.UNIT).exists() and not (legacy / nvsvc.WANTS).is_symlink()


def test_lspci_stand_in(host_root_factory) -> None:
    from sim import nvidia_service as nvsvc

    root = host_root_factory(update="idle", gpu=True)

    def lspci(*args: str) -> str:
        proc = subprocess.run(["sh", str(root / nvsvc.LSPCI), *args], capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/bin:/bin", "MODULUS_SIM_PCI_DEVICES": str(root / nvsvc.PCI_DEVICES)})
        return proc.stdout

    assert lspci("-d", "10de:*:0302") == nvsvc.GPU_LINE.replace(" [0302]:", ":").replace(" [10de:20b0]", "") + "\n"
    assert lspci("-d", "10de:*:0300") == ""
    assert lspci("-d", "8086:*:0302") == ""
    assert lspci("-nn", "-d", "10de:20b0") == nvsvc.GPU_LINE + "\n"
    assert "3D controller: NVIDIA Corporation" in lspci()
    dev = root / "sys/bus/pci/devices/0000:01:00.0"
    assert [(dev / f).read_text() for f in ("vendor", "device", "class")] == ["0x10de\n", "0x20b0\n", "0x030200\n"]

