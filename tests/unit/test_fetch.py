"""The streaming single-pass download, against a real HTTP server on 127.0.0.1 (no root needed):
signature + decompression + sparse write while bytes arrive, fallbacks, retries, no partial files."""

from __future__ import annotations

import bz2
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_transfer import Server

from ansible_collections.modulus.kmods.plugins.module_utils import fetch as fm
from ansible_collections.modulus.kmods.plugins.module_utils import transfer as http
from ansible_collections.modulus.kmods.plugins.module_utils.gpt import LINUX_FS_TYPE
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import Keyring, parse_colons_primaries
from sim.signing import ExpiredKeySet

NAME = "flatcar_developer_container.bin.bz2"
FIELDS = {"channel": "stable", "board": "amd64-usr", "version": "9001.2.0", "arch": "amd64", "group": "stable"}
SGDISK = shutil.which("sgdisk") or "/usr/sbin/sgdisk"
MKFS = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
pytestmark = pytest.mark.skipif(not (os.path.exists(SGDISK) and os.path.exists(MKFS) and shutil.which("gpg")),
                                reason="needs sgdisk, mkfs.ext4 and gpg")


# ------------------------------------------------------------------ fixtures: a signed image and a server


class Release:
    def __init__(self, base: Path) -> None:
        self.dir = base
        tree = base / "tree"
        (tree / "usr/lib/modules/6.1.0-50-amd64/build").mkdir(parents=True)
        (tree / "usr/share/flatcar").mkdir(parents=True)
        (tree / "usr/share/flatcar/release").write_text("FLATCAR_RELEASE_VERSION=9001.2.0\nFLATCAR_RELEASE_BOARD=amd64-usr\n")
        (tree / "data.bin").write_bytes(os.urandom(1 << 20))  # incompressible, so chunks really stream
        self.raw = base / "flatcar_developer_container.bin"
        with open(self.raw, "wb") as fh:
            fh.truncate(24 << 20)
        subprocess.run([SGDISK, "-n", "9:4096:+20M", "-c", "9:ROOT", "-t", f"9:{LINUX_FS_TYPE}", str(self.raw)],
                       check=True, capture_output=True)
        subprocess.run([MKFS, "-q", "-F", "-L", "ROOT", "-d", str(tree), "-E", "offset=2097152", str(self.raw), "20M"],
                       check=True, capture_output=True)
        # two bzip2 streams back to back, as parallel compressors write them
        data = self.raw.read_bytes()
        half = len(data) // 2
        self.bz2 = bz2.compress(data[:half], 1) + bz2.compress(data[half:], 1)
        self.home = base / "gnupg"
        self.home.mkdir(mode=0o700)
        self._gpg("--quick-gen-key", "--passphrase", "", "Sim <sim@example.invalid>", "ed25519", "sign", "never")
        self.public = self._gpg("--armor", "--export").stdout
        self.fingerprint = parse_colons_primaries(self._gpg("--with-colons", "--fingerprint", "--list-keys").stdout.decode())[0]
        self.sig = self._gpg("--detach-sign", "-o", "-", input=self.bz2).stdout

    def _gpg(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:  # noqa: A002
        env = dict(os.environ, GNUPGHOME=str(self.home))
        try:
            return subprocess.run(["gpg", "--batch", "--no-tty", *args], env=env, check=True, capture_output=True,
                                  input=input)
        finally:  # signing starts a gpg-agent for this home: never leave one behind
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)

    def sha_raw(self) -> str:
        return hashlib.sha256(self.raw.read_bytes()).hexdigest()


class FetchServer(Server):
    def publish(self, prefix: str, release: Release, sig: bytes | None = None, body: bytes | None = None) -> None:
        self.files[f"{prefix}/{NAME}"] = release.bz2 if body is None else body
        self.files[f"{prefix}/{NAME}.sig"] = release.sig if sig is None else sig


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return Release(tmp_path_factory.mktemp("release"))


@pytest.fixture
def server() -> Iterator[FetchServer]:
    srv = FetchServer()
    yield srv
    srv.close()


def fetch(release: Release, server_or_candidates, dest: Path, **kwargs):
    candidates = server_or_candidates
    if isinstance(server_or_candidates, Server):
        candidates = fm.candidate_bases(server_or_candidates.base + "/{channel}/{board}/{version}", [],
                                        server_or_candidates.base + "/bincache/{arch}/{version}", FIELDS)
    kwargs.setdefault("retry_delay", 0.01)
    kwargs.setdefault("timeout", 10)
    with Keyring(release.public, [release.fingerprint]) as ring:
        return fm.fetch_image(candidates, NAME, str(dest), ring, **kwargs)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------ URLs


def test_templates_and_candidate_order() -> None:
    cands = fm.candidate_bases("https://{channel}.release.flatcar-linux.net/{board}/{version}",
                               ["file:///srv/mirror/{version}/", "https://{channel}.release.flatcar-linux.net/{board}/{version}"],
                               "https://bincache.flatcar-linux.net/images/{arch}/{version}", FIELDS)
    assert [c.base for c in cands] == ["https://stable.release.flatcar-linux.net/amd64-usr/9001.2.0",
                                       "file:///srv/mirror/9001.2.0",
                                       "https://bincache.flatcar-linux.net/images/amd64/9001.2.0"]
    assert [c.option for c in cands] == ["url_template", "mirrors[0]", "fallback_url_template"]
    assert cands[0].url(NAME).endswith("/9001.2.0/flatcar_developer_container.bin.bz2")


def test_bad_templates_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"mirrors\[0\]=.*unknown or malformed placeholder"):
        fm.candidate_bases("https://x/{version}", ["https://y/{release}"], None, FIELDS)
    with pytest.raises(ValueError, match=r"url_template=.*only https://, http:// and file://"):
        fm.candidate_bases("ftp://x/{version}", [], None, FIELDS)


# ------------------------------------------------------------------ sparse writing and decompressors


def test_sparse_writer_skips_zero_blocks(tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    data = bytes(8 << 20) + b"x" * 5000 + bytes(4096 * 3 + 17) + b"tail"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = fm.SparseWriter(fd)
        for start in range(0, len(data), 65537):
            writer.write(data[start:start + 65537])
        writer.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert path.stat().st_blocks * 512 <= 64 << 10
    assert writer.written < 3 * 4096 + 5000 + 100


@pytest.mark.parametrize("which_one", ["python", "lbzip2"])
def test_decompressors_multistream_and_truncation(tmp_path: Path, which_one: str) -> None:
    if which_one == "lbzip2" and not shutil.which("lbzip2"):
        pytest.skip("lbzip2 is not installed")
    payload = os.urandom(300000) + bytes(2 << 20)
    stream = bz2.compress(payload[:100000]) + bz2.compress(payload[100000:])
    for data, ok in ((stream, True), (stream[:-10], False), (stream[:50] + b"\0" + stream[51:], False)):
        fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            writer = fm.SparseWriter(fd)
            dec = fm.make_decompressor(writer, which_one)
            try:
                for start in range(0, len(data), 4096):
                    dec.feed(data[start:start + 4096])
                dec.finish(timeout=60)
                finished = True
            except fm.DecompressError:
                dec.abort()
                finished = False
            writer.finish()
        finally:
            os.close(fd)
        assert finished is ok
        if ok:
            assert (tmp_path / "out.bin").read_bytes() == payload


# ------------------------------------------------------------------ the whole pass


@pytest.mark.parametrize("decompressor", ["python", "auto"])
def test_good_download_is_verified_sparse_and_identical(release: Release, server: FetchServer, tmp_path: Path,
                                                        decompressor: str) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    logs: list[str] = []
    dest = tmp_path / "cache" / "flatcar_developer_container.bin"
    result = fetch(release, server, dest, decompressor=decompressor, log=logs.append, progress_interval=0)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == release.sha_raw()
    assert result.primary_fingerprint == release.fingerprint
    assert result.compressed_size == len(release.bz2)
    assert result.compressed_sha256 == hashlib.sha256(release.bz2).hexdigest()
    assert dest.stat().st_blocks * 512 < dest.stat().st_size // 4  # written sparse
    assert leftovers(dest.parent) == [dest.name]
    assert any("100.0%" in line for line in logs)
    assert result.source == "url_template" and result.attempts == 1


def test_flipped_byte_is_rejected_and_nothing_is_left(release: Release, server: FetchServer, tmp_path: Path) -> None:
    body = bytearray(release.bz2)
    body[len(body) // 3] ^= 0x01
    server.publish("/stable/amd64-usr/9001.2.0", release, body=bytes(body))
    dest = tmp_path / "cache" / "img.bin"
    with pytest.raises(http.FetchError) as err:
        fetch(release, server, dest, decompressor="python")
    assert isinstance(err.value, (fm.SignatureError, fm.DecompressError))
    assert leftovers(dest.parent) == []


def test_signature_of_other_data_is_rejected(release: Release, server: FetchServer, tmp_path: Path) -> None:
    other_sig = release._gpg("--detach-sign", "-o", "-", input=b"something else").stdout
    server.publish("/stable/amd64-usr/9001.2.0", release, sig=other_sig)
    dest = tmp_path / "cache" / "img.bin"
    with pytest.raises(fm.SignatureError, match="BAD signature"):
        fetch(release, server, dest)
    assert leftovers(dest.parent) == []
    assert sum(1 for h in server.hits if h.endswith(".bz2")) == 1  # a bad signature is not retried


def test_missing_signature_fails_without_downloading(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.files["/stable/amd64-usr/9001.2.0/" + NAME] = release.bz2
    with pytest.raises(http.NotFound, match=r"\.sig"):
        fetch(release, server, tmp_path / "cache" / "img.bin")
    assert not any(h.endswith(".bz2") for h in server.hits)


def test_404_on_the_channel_host_uses_the_fallback(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/bincache/amd64/9001.2.0", release)
    result = fetch(release, server, tmp_path / "cache" / "img.bin")
    assert result.source == "fallback_url_template"
    assert result.url == f"{server.base}/bincache/amd64/9001.2.0/{NAME}"
    assert "/stable/amd64-usr/9001.2.0/" + NAME + ".sig" in server.hits


def test_interrupted_download_is_restarted(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    cut = ["/stable/amd64-usr/9001.2.0/" + NAME, 200000, 2]
    server.cuts.append(cut)
    logs: list[str] = []
    result = fetch(release, server, tmp_path / "cache" / "img.bin", retries=3, log=logs.append)
    assert result.attempts == 3
    assert any("retry 1/3" in line for line in logs)
    assert hashlib.sha256((tmp_path / "cache" / "img.bin").read_bytes()).hexdigest() == release.sha_raw()


def test_connection_cut_every_time_fails_cleanly(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    server.cuts.append([NAME, 100000, 100])
    dest = tmp_path / "cache" / "img.bin"
    with pytest.raises(http.TransientError, match="after 3 attempt"):
        fetch(release, server, dest, retries=2)
    assert leftovers(dest.parent) == []


def test_server_error_is_transient(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    server.status["/stable/amd64-usr/9001.2.0/" + NAME] = 503
    with pytest.raises(http.TransientError, match="HTTP 503"):
        fetch(release, server, tmp_path / "cache" / "img.bin", retries=1)
    assert leftovers(tmp_path / "cache") == []


def test_file_urls_work(release: Release, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "9001.2.0"
    mirror.mkdir(parents=True)
    (mirror / NAME).write_bytes(release.bz2)
    (mirror / (NAME + ".sig")).write_bytes(release.sig)
    cands = fm.candidate_bases("file://" + str(tmp_path / "mirror") + "/{version}", [], None, FIELDS)
    result = fetch(release, cands, tmp_path / "cache" / "img.bin")
    assert result.url.startswith("file://")


def test_free_space_is_checked_first(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    with pytest.raises(http.FetchError, match="not enough free space"):
        fetch(release, server, tmp_path / "cache" / "img.bin", min_free_space=1 << 60)
    assert leftovers(tmp_path / "cache") == []


def test_signed_file_that_is_not_a_disk_image_is_refused(release: Release, server: FetchServer, tmp_path: Path) -> None:
    body = bz2.compress(b"hello" * 1000)
    sig = release._gpg("--detach-sign", "-o", "-", input=body).stdout
    server.publish("/stable/amd64-usr/9001.2.0", release, sig=sig, body=body)
    with pytest.raises(http.FetchError, match="not a developer container"):
        fetch(release, server, tmp_path / "cache" / "img.bin")
    assert leftovers(tmp_path / "cache") == []


def test_stale_partial_files_are_removed(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    cache = tmp_path / "cache"
    cache.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (cache / (http.PARTIAL_PREFIX + "img.bin.abc123")).write_bytes(b"half")  # an older release's name: no PID
    (cache / (http.PARTIAL_PREFIX + f"img.bin.{gone.pid}-abc123")).write_bytes(b"half")  # its process is gone
    live = http.PARTIAL_PREFIX + "img.bin.1-xyz"  # PID 1 is alive: a download under way elsewhere
    (cache / live).write_bytes(b"half")
    fetch(release, server, cache / "img.bin")
    assert leftovers(cache) == [live, "img.bin"]


# ------------------------------------------------------------------ expired signing keys


@pytest.fixture(scope="module")
def expired_release(release: Release, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExpiredKeySet, bytes]:
    """The test image signed by a key whose signing subkey has expired since (and its refreshed copy)."""
    base = tmp_path_factory.mktemp("expired")
    ks = ExpiredKeySet(base / "keys")
    body = base / NAME
    body.write_bytes(release.bz2)
    sig = ks.sign(body).read_bytes()
    ks.refresh()
    return ks, sig


def test_expired_signing_key_is_refreshed_before_the_download(release: Release, server: FetchServer, tmp_path: Path,
                                                              expired_release: tuple[ExpiredKeySet, bytes]) -> None:
    ks, sig = expired_release
    server.publish("/stable/amd64-usr/9001.2.0", release, sig=sig)
    cands = fm.candidate_bases(server.base + "/{channel}/{board}/{version}", [], None, FIELDS)
    reasons: list[str] = []
    with Keyring(ks.expired_public, [ks.fingerprint]) as ring:
        def refresh(reason: str) -> None:
            reasons.append(reason)
            ring.add_key(ks.refreshed_public, "key_url")
        res = fm.fetch_image(cands, NAME, str(tmp_path / "img.bin"), ring, retry_delay=0.01, refresh_key=refresh)
    assert len(reasons) == 1 and ks.key.signing_fingerprint in reasons[0] and "expired on" in reasons[0]
    assert res.primary_fingerprint == ks.fingerprint and res.attempts == 1
    assert [h for h in server.hits if h.endswith(".bz2")] == ["/stable/amd64-usr/9001.2.0/" + NAME]  # one download
    assert hashlib.sha256((tmp_path / "img.bin").read_bytes()).hexdigest() == release.sha_raw()


def test_expired_signing_key_without_refresh_fails_before_the_download(
        release: Release, server: FetchServer, tmp_path: Path, expired_release: tuple[ExpiredKeySet, bytes]) -> None:
    ks, sig = expired_release
    server.publish("/stable/amd64-usr/9001.2.0", release, sig=sig)
    cands = fm.candidate_bases(server.base + "/{channel}/{board}/{version}", [], None, FIELDS)
    with Keyring(ks.expired_public, [ks.fingerprint]) as ring:
        with pytest.raises(fm.SignatureError, match="EXPKEYSIG") as info:
            fm.fetch_image(cands, NAME, str(tmp_path / "cache" / "img.bin"), ring, retry_delay=0.01)
        assert info.value.keywords == ("EXPKEYSIG",)

        def refuse(reason: str) -> None:
            raise fm.SignatureError(f"{reason}: refused", ("EXPKEYSIG",))
        with pytest.raises(fm.SignatureError, match="refused"):
            fm.fetch_image(cands, NAME, str(tmp_path / "cache" / "img.bin"), ring, retry_delay=0.01, refresh_key=refuse)

        def useless(reason: str) -> None:  # accepted, but it does not extend the subkey
            ring.add_key(ks.expired_public, "key_url")
        with pytest.raises(fm.SignatureError, match="does not extend it"):
            fm.fetch_image(cands, NAME, str(tmp_path / "cache" / "img.bin"), ring, retry_delay=0.01, refresh_key=useless)
    assert not any(h.endswith(".bz2") for h in server.hits)
    assert leftovers(tmp_path / "cache") == []


def test_wrong_key_fails_before_the_body_is_downloaded(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(other))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "O <o@example.invalid>", "ed25519", "sign",
                    "never"], env=env, check=True, capture_output=True)
    subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
    other_public = subprocess.run(["gpg", "--batch", "--armor", "--export"], env=env, check=True, capture_output=True).stdout
    cands = fm.candidate_bases(server.base + "/{channel}/{board}/{version}", [], None, FIELDS)
    with Keyring(other_public) as ring, pytest.raises(fm.SignatureError, match="not in verify_key"):
        fm.fetch_image(cands, NAME, str(tmp_path / "cache" / "img.bin"), ring, retry_delay=0.01)
    assert not any(h.endswith(".bz2") for h in server.hits)
    assert leftovers(tmp_path / "cache") == []


def test_garbage_signature_fails_before_the_body_is_downloaded(release: Release, server: FetchServer, tmp_path: Path) -> None:
    server.publish("/stable/amd64-usr/9001.2.0", release, sig=b"<html>not a signature</html>")
    with pytest.raises(fm.SignatureError, match="not an OpenPGP signature"):
        fetch(release, server, tmp_path / "cache" / "img.bin")
    assert not any(h.endswith(".bz2") for h in server.hits)
