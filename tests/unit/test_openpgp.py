"""Detached signature verification with an isolated keyring, with real gpg and throwaway keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_keys import (
    FLATCAR_KEY_FINGERPRINT,
    FLATCAR_SIGNING_KEY,
)
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import (
    Keyring,
    OpenPGPError,
    judge_status,
    load_key_material,
    normalize_fingerprint,
    parse_colons_keys,
    parse_colons_primaries,
    sweep_homes,
    verify_file,
)
from sim.signing import ExpiredKeySet

REPO = Path(__file__).resolve().parents[2]
SHIPPED_ASC = REPO / "plugins" / "files" / "Flatcar_Image_Signing_Key.asc"
REFERENCE_ASC = REPO.parent / "shared" / "reference" / "keys" / "Flatcar_Image_Signing_Key.asc"

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")


class ThrowawayKey:
    """An ed25519 signing key in its own GNUPGHOME (made in a fraction of a second)."""

    def __init__(self, home: Path, uid: str) -> None:
        self.home = home
        home.mkdir(mode=0o700)
        self._gpg("--quick-gen-key", "--passphrase", "", uid, "ed25519", "sign", "never")
        out = self._gpg("--with-colons", "--fingerprint", "--list-keys").stdout
        self.fingerprint = parse_colons_primaries(out)[0]
        self.public = self._gpg("--armor", "--export").stdout

    def _gpg(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, GNUPGHOME=str(self.home))
        try:
            return subprocess.run(["gpg", "--batch", "--no-tty", *args], env=env, check=True, capture_output=True,
                                  text=True)
        finally:  # secret-key operations start a gpg-agent: never leave one behind
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)

    def sign(self, path: Path) -> Path:
        sig = path.with_name(path.name + ".sig")
        self._gpg("--yes", "--detach-sign", "-o", str(sig), str(path))
        return sig


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[ThrowawayKey, ThrowawayKey]:
    base = tmp_path_factory.mktemp("keys")
    return ThrowawayKey(base / "a", "Signer A <a@example.invalid>"), ThrowawayKey(base / "b", "Other <b@example.invalid>")


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[ThrowawayKey, ThrowawayKey]) -> tuple[Path, Path]:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    return data, keys[0].sign(data)


def test_good_signature(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey]) -> None:
    data, sig = signed
    with Keyring(keys[0].public.encode(), [keys[0].fingerprint]) as ring:
        result = verify_file(ring, str(sig), str(data))
    assert result.good, result.reason
    assert result.primary_fingerprint == keys[0].fingerprint


def test_streaming_in_odd_chunks_matches(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey]) -> None:
    data, sig = signed
    blob = data.read_bytes()
    with Keyring(keys[0].public.encode()) as ring:
        verifier = ring.verifier(str(sig))
        for start in range(0, len(blob), 77777):
            verifier.feed(blob[start:start + 77777])
        assert verifier.finish().good


def test_flipped_byte_is_bad(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey], tmp_path: Path) -> None:
    data, sig = signed
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(blob))
    with Keyring(keys[0].public.encode()) as ring:
        result = verify_file(ring, str(sig), str(bad))
    assert not result.good
    assert "BADSIG" in result.reason


def test_truncated_data_is_bad(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey], tmp_path: Path) -> None:
    data, sig = signed
    short = tmp_path / "short.bin"
    short.write_bytes(data.read_bytes()[:-1])
    with Keyring(keys[0].public.encode()) as ring:
        assert not verify_file(ring, str(sig), str(short)).good


def test_signature_by_another_key_is_rejected(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey]) -> None:
    data, _sig = signed
    other_sig = keys[1].sign(data)
    with Keyring(keys[0].public.encode()) as ring:
        result = verify_file(ring, str(other_sig), str(data))
    assert not result.good
    assert "not in the verification keyring" in result.reason or "could not be checked" in result.reason


def test_garbage_signature_is_rejected(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey], tmp_path: Path) -> None:
    data, _sig = signed
    junk = tmp_path / "junk.sig"
    junk.write_bytes(b"<html>404 Not Found</html>\n")
    with Keyring(keys[0].public.encode()) as ring:
        result = verify_file(ring, str(junk), str(data))
    assert not result.good


def test_keyring_refuses_a_key_without_the_expected_fingerprint(keys: tuple[ThrowawayKey, ThrowawayKey]) -> None:
    with pytest.raises(OpenPGPError, match=FLATCAR_KEY_FINGERPRINT), Keyring(keys[0].public.encode(), [FLATCAR_KEY_FINGERPRINT]):
        pass


def test_keyring_refuses_non_key_material() -> None:
    with pytest.raises(OpenPGPError, match="no OpenPGP public key"), Keyring(b"not a key"):
        pass


def test_keyring_is_private_and_removed(keys: tuple[ThrowawayKey, ThrowawayKey]) -> None:
    with Keyring(keys[0].public.encode()) as ring:
        home = ring.home
        assert home and os.stat(home).st_mode & 0o777 == 0o700
        assert ring.primaries == [keys[0].fingerprint]
    assert not os.path.exists(home)


def test_load_key_material_text_path_and_errors(tmp_path: Path, keys: tuple[ThrowawayKey, ThrowawayKey]) -> None:
    assert load_key_material(keys[0].public).startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    path = tmp_path / "k.asc"
    path.write_text(keys[0].public)
    assert load_key_material(str(path)) == keys[0].public.encode()
    with pytest.raises(ValueError, match="cannot read the key file"):
        load_key_material(str(tmp_path / "missing.asc"))
    with pytest.raises(ValueError, match="empty"):
        load_key_material("  ")


def test_normalize_fingerprint() -> None:
    assert normalize_fingerprint("f88c fede ff29 a5b4 d952  3864 e25d 9aed 0593 b34a") == FLATCAR_KEY_FINGERPRINT
    with pytest.raises(ValueError, match="not a full OpenPGP fingerprint"):
        normalize_fingerprint("0593B34A")
    # whitespace (a trailing newline too) is removed on purpose; anything else must be the whole value
    assert normalize_fingerprint(FLATCAR_KEY_FINGERPRINT + "\n") == FLATCAR_KEY_FINGERPRINT
    for bad in (FLATCAR_KEY_FINGERPRINT + "\nX", FLATCAR_KEY_FINGERPRINT + "00", FLATCAR_KEY_FINGERPRINT[:-1] + "G"):
        with pytest.raises(ValueError, match="not a full OpenPGP fingerprint"):
            normalize_fingerprint(bad)


@pytest.mark.parametrize("keyword", ["BADSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG", "NO_PUBKEY", "EXPSIG"])
def test_judge_status_rejects_every_bad_keyword(keyword: str) -> None:
    status = (f"[GNUPG:] NEWSIG\n[GNUPG:] {keyword} E25D9AED0593B34A Flatcar\n"
              f"[GNUPG:] VALIDSIG AAAA 2026-01-01 0 0 4 0 1 10 00 {FLATCAR_KEY_FINGERPRINT}\n")
    assert not judge_status(status, [FLATCAR_KEY_FINGERPRINT], 0).good


def test_judge_status_checks_the_primary_fingerprint() -> None:
    signing = "1" * 40
    good = (f"[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG E25D9AED0593B34A Flatcar\n"
            f"[GNUPG:] VALIDSIG {signing} 2026-01-01 1 0 4 0 1 10 00 {FLATCAR_KEY_FINGERPRINT}\n")
    result = judge_status(good, [FLATCAR_KEY_FINGERPRINT], 0)
    assert result.good and result.signing_fingerprint == signing
    assert not judge_status(good, ["2" * 40], 0).good
    assert not judge_status(good.replace("VALIDSIG", "XVALIDSIG"), [FLATCAR_KEY_FINGERPRINT], 0).good
    assert not judge_status(good, [FLATCAR_KEY_FINGERPRINT], 1).good
    assert not judge_status("", [FLATCAR_KEY_FINGERPRINT], 2).good


def test_shipped_flatcar_key_matches_the_published_key_and_fingerprint(tmp_path: Path) -> None:
    assert SHIPPED_ASC.read_text() == FLATCAR_SIGNING_KEY
    if REFERENCE_ASC.exists():
        assert REFERENCE_ASC.read_text() == FLATCAR_SIGNING_KEY
    env = dict(os.environ, GNUPGHOME=str(tmp_path))
    os.chmod(tmp_path, 0o700)
    out = subprocess.run(["gpg", "--batch", "--with-colons", "--show-keys"], input=FLATCAR_SIGNING_KEY, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert parse_colons_primaries(out) == [FLATCAR_KEY_FINGERPRINT]
    assert "Flatcar Buildbot (Official Builds)" in out
    with Keyring(FLATCAR_SIGNING_KEY.encode(), [FLATCAR_KEY_FINGERPRINT]) as ring:
        assert ring.primaries == [FLATCAR_KEY_FINGERPRINT]
        # the signing subkey in use expires 2027-03-08 (the primary key never does)
        assert time.strftime("%Y-%m-%d", time.gmtime(ring.expiry())) == "2027-03-08"
        assert ring.expiry("52F145DFD00BBDCD928CBB5A32DA80F91EF52974") == ring.expiry()
        assert ring.expiry(FLATCAR_KEY_FINGERPRINT) is None


# ------------------------------------------------------------------ no agent, homes named by PID, sweeping


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (``pgrep -af`` without pgrep)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_no_gpg_agent_is_started_and_the_home_names_the_pid(signed: tuple[Path, Path], keys: tuple[ThrowawayKey, ThrowawayKey],
                                                            tmp_path: Path) -> None:
    data, sig = signed
    with Keyring(keys[0].public.encode(), tmp_dir=str(tmp_path)) as ring:
        home = ring.home
        assert os.path.basename(home).startswith(f"modulus-gnupg-{os.getpid()}-")
        assert ring.precheck(str(sig)) is None
        assert verify_file(ring, str(sig), str(data)).good
        assert os.path.isfile(ring.keyring_file)
        assert processes_naming(home) == []  # no gpg-agent (nor anything else) runs for this home
        assert not [n for n in os.listdir(home) if n.startswith("S.")]  # no agent socket either
    assert not os.path.exists(home)


def test_sweep_homes_removes_only_those_of_dead_processes(tmp_path: Path) -> None:
    dead = tmp_path / f"modulus-gnupg-{dead_pid()}-abcd"
    live = tmp_path / f"modulus-gnupg-{os.getpid()}-efgh"
    other = tmp_path / "modulus-gnupg-notapid"
    for path in (dead, live, other):
        path.mkdir()
        (path / "pubring.kbx").write_bytes(b"x")
    assert sweep_homes(str(tmp_path)) == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists()


# ------------------------------------------------------------------ expired signing subkeys and refreshed keys


@pytest.fixture(scope="module")
def expired(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExpiredKeySet, Path, Path]:
    base = tmp_path_factory.mktemp("expired")
    ks = ExpiredKeySet(base / "keys")
    data = base / "data.bin"
    data.write_bytes(os.urandom(1 << 20))
    sig = ks.sign(data)
    ks.refresh()
    return ks, data, sig


def test_expired_subkey_is_seen_before_and_reported_as_expkeysig(expired: tuple[ExpiredKeySet, Path, Path]) -> None:
    ks, data, sig = expired
    with Keyring(ks.expired_public, [ks.fingerprint]) as ring:
        assert ring.precheck(str(sig)) is None
        gone = ring.expired_signers(str(sig))
        assert [k.fingerprint for k in gone] == [ks.key.signing_fingerprint]
        assert "expired on" in ring.describe_expired(gone) and ks.key.signing_fingerprint in ring.describe_expired(gone)
        result = verify_file(ring, str(sig), str(data))
        assert not result.good and "EXPKEYSIG" in result.reason
        assert ring.expiry(ks.key.signing_fingerprint) < time.time()


def test_refreshed_copy_of_the_pinned_key_is_merged_and_verifies(expired: tuple[ExpiredKeySet, Path, Path]) -> None:
    ks, data, sig = expired
    with Keyring(ks.expired_public, [ks.fingerprint]) as ring:
        assert ring.add_key(ks.refreshed_public, "refreshed.asc") == [ks.fingerprint]
        assert ring.expired_signers(str(sig)) == []
        result = verify_file(ring, str(sig), str(data))
        assert result.good, result.reason
        assert result.signing_fingerprint == ks.key.signing_fingerprint
        assert ring.expiry(ks.key.signing_fingerprint) > time.time() + 300 * 86400
        assert ring.export_armored(ks.fingerprint).startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_a_refreshed_key_of_another_primary_is_refused(expired: tuple[ExpiredKeySet, Path, Path]) -> None:
    ks, data, sig = expired
    with Keyring(ks.expired_public, [ks.fingerprint]) as ring:
        with pytest.raises(OpenPGPError, match=f"{ks.impostor.fingerprint}.*not the pinned {ks.fingerprint}: refused"):
            ring.add_key(ks.impostor_public, "impostor.asc")
        with pytest.raises(OpenPGPError, match=r"refused"):  # both keys in one file: still refused
            ring.add_key(ks.refreshed_public + ks.impostor_public, "both.asc")
        with pytest.raises(OpenPGPError, match="no OpenPGP public key"):
            ring.add_key(b"<html>not a key</html>", "junk")
        assert ring.primaries == [ks.fingerprint]
        assert ring.expired_signers(str(sig)) != []  # nothing was imported


def test_parse_colons_keys_reads_expiry_and_capabilities() -> None:
    text = ("pub:-:255:22:AAAAAAAAAAAAAAAA:1700000000:::-:::cSC:::::ed25519:::0:\n"
            "fpr:::::::::" + "A" * 40 + ":\n"
            "uid:-::::1700000000::X::Someone::::::::::0:\n"
            "sub:e:255:22:BBBBBBBBBBBBBBBB:1700000000:1710000000:::::s:::::ed25519::\n"
            "fpr:::::::::" + "B" * 40 + ":\n")
    primary, sub = parse_colons_keys(text)
    assert (primary.is_primary, primary.capabilities, primary.expires) == (True, "c", None)
    assert (sub.primary, sub.keyid, sub.can_sign, sub.expires, sub.expired()) == ("A" * 40, "B" * 16, True, 1710000000, True)
