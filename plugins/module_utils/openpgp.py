# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verify detached OpenPGP signatures with an isolated keyring (a private GNUPGHOME holding only
the given key, exported to a keyring file), fed to ``gpgv`` while the data streams in, judged from
its ``--status-fd`` machine output. No gpg-agent is ever started."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import require_tool, which
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import dead_entries

ARMOR_HEADER = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
HOME_PREFIX = "modulus-gnupg-"
_HOME_RE = re.compile(re.escape(HOME_PREFIX) + r"([0-9]+)-[^/]+")
_FPR_RE = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")
# status keywords that mean the signature must not be trusted, with the reason shown to the user
_BAD = {
    "BADSIG": "BAD signature: the data or the signature was altered",
    "ERRSIG": "the signature could not be checked (unknown key or algorithm)",
    "NO_PUBKEY": "the signature was made by a key that is not in the verification keyring",
    "EXPSIG": "the signature has expired",
    "EXPKEYSIG": "the signature was made by an expired key",
    "REVKEYSIG": "the signature was made by a revoked key",
    "NODATA": "no signature found in the signature file",
    "UNEXPECTED": "the signature file holds unexpected data",
}


class OpenPGPError(RuntimeError):
    """A key could not be loaded, or gpg could not be run."""


def normalize_fingerprint(value: str) -> str:
    fpr = re.sub(r"\s+", "", value or "").upper()
    if fpr.startswith("0X"):
        fpr = fpr[2:]
    if not _FPR_RE.fullmatch(fpr):
        raise ValueError(f"{value!r} is not a full OpenPGP fingerprint (40 or 64 hex digits)")
    return fpr


def load_key_material(value: str) -> bytes:
    """``value`` is either an armored public key block or the path of a key file (armored or binary)."""
    if not value or not value.strip():
        raise ValueError("verify_key is empty: give an armored public key or the path of a key file")
    text = value.strip()
    if text.startswith(ARMOR_HEADER):
        return (text + "\n").encode("utf-8")
    if "\n" in text or len(text) > 4096:
        raise ValueError(f"verify_key is neither an armored public key block ({ARMOR_HEADER}) nor a file path")
    try:
        with open(os.path.expanduser(text), "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ValueError(f"verify_key={text!r}: cannot read the key file: {exc}") from exc
    if not data:
        raise ValueError(f"verify_key={text!r}: the key file is empty")
    return data


def parse_colons_primaries(text: str) -> list[str]:
    """Primary key fingerprints from ``gpg --with-colons`` output (the fpr line after each pub line)."""
    result = []
    want = False
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            want = True
        elif fields[0] in ("sub", "sec", "ssb", "uid"):
            want = fields[0] == "sec"
        elif fields[0] == "fpr" and want and len(fields) > 9:
            result.append(fields[9].upper())
            want = False
    return result


@dataclass
class KeyInfo:
    """One primary key or subkey of the keyring (from ``gpg --with-colons``)."""
    fingerprint: str
    keyid: str
    primary: str  # fingerprint of its primary key
    is_primary: bool
    capabilities: str  # lower case: this key's own (s sign, c certify, e encrypt, a auth)
    validity: str  # gpg's field 2: e expired, r revoked, ...
    created: int
    expires: Optional[int]  # seconds since the epoch, None for never

    def expired(self, now: Optional[float] = None) -> bool:
        now = time.time() if now is None else now
        return self.validity == "e" or (self.expires is not None and self.expires <= now)

    @property
    def revoked(self) -> bool:
        return self.validity == "r"

    @property
    def can_sign(self) -> bool:
        return "s" in self.capabilities


def parse_colons_keys(text: str) -> list[KeyInfo]:
    """Every primary key and subkey of ``gpg --with-colons --with-subkey-fingerprint`` output."""
    keys: list[KeyInfo] = []
    pending: Optional[list[str]] = None
    primary = ""
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub", "sec", "ssb") and len(fields) > 11:
            pending = fields
        elif fields[0] == "fpr" and pending is not None and len(fields) > 9:
            fpr = fields[9].upper()
            is_primary = pending[0] in ("pub", "sec")
            if is_primary:
                primary = fpr
            keys.append(KeyInfo(fingerprint=fpr, keyid=pending[4].upper(), primary=primary, is_primary=is_primary,
                                capabilities="".join(c for c in pending[11] if c.islower()), validity=pending[1],
                                created=int(pending[5] or 0), expires=int(pending[6]) if pending[6] else None))
            pending = None
        elif fields[0] in ("uid", "uat"):
            pending = None
    return keys


def _day(ts: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts)) if ts else "never"


def sweep_homes(parent: str) -> list[str]:
    """Remove the private homes ``modulus-gnupg-<pid>-*`` in ``parent`` whose process is gone
    (a run killed before it could remove its own); return what was removed."""
    removed = []
    for path in dead_entries(parent, _HOME_RE, dirs_only=True):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


class Keyring:
    """A private GNUPGHOME (``modulus-gnupg-<pid>-XXXX`` in ``tmp_dir``) holding only the given public
    key(s), exported to a keyring file for ``gpgv``; removed on exit.

    No gpg-agent is ever started: every gpg call has ``--no-autostart`` (importing, exporting and
    listing public keys need none) and signatures are checked by ``gpgv``. A run killed meanwhile
    leaves its home behind; ``sweep_homes`` removes it once the PID in its name is gone.
    """

    def __init__(self, key_material: bytes, expected_fingerprints: Optional[list[str]] = None,
                 tmp_dir: Optional[str] = None) -> None:
        self.key_material = key_material
        self.expected = [normalize_fingerprint(f) for f in expected_fingerprints or []]
        self.tmp_dir = tmp_dir
        self.home: Optional[str] = None
        self.primaries: list[str] = []
        self.keys: list[KeyInfo] = []
        self.gpg = require_tool("gpg")
        self.gpgv = which("gpgv")

    @property
    def keyring_file(self) -> str:
        return os.path.join(self.home or "", "trusted.gpg")

    def _gpg(self, args: list[str], stdin: Optional[bytes] = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        if self.home is None:
            raise OpenPGPError("internal error: the keyring was used before it was set up")
        return subprocess.run([self.gpg, "--homedir", self.home, "--batch", "--no-tty", "--no-autostart",
                               "--no-auto-key-retrieve"] + args,
                              input=stdin, capture_output=True, timeout=timeout,
                              check=False, env=self.env())

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["GNUPGHOME"] = self.home or ""
        env["LC_ALL"] = "C"
        env.pop("GPG_AGENT_INFO", None)
        return env

    def __enter__(self) -> Keyring:
        if self.tmp_dir:
            os.makedirs(self.tmp_dir, exist_ok=True)
        self.home = tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-", dir=self.tmp_dir)
        os.chmod(self.home, 0o700)
        try:
            proc = self._gpg(["--import"], stdin=self.key_material)
            self._refresh_listing()
            if not self.primaries:
                raise OpenPGPError("no OpenPGP public key could be imported from verify_key: {}".format(proc.stderr.decode("utf-8", "replace").strip()))
            missing = [f for f in self.expected if f not in self.primaries]
            if missing:
                raise OpenPGPError("verify_key holds the key(s) {}, not the expected {}".format(", ".join(self.primaries), ", ".join(missing)))
            if not self.expected:
                self.expected = list(self.primaries)
            self._export()
        except BaseException:
            self.close()
            raise
        return self

    def _refresh_listing(self) -> None:
        listing = self._gpg(["--with-colons", "--with-subkey-fingerprint", "--list-keys"]).stdout.decode("utf-8", "replace")
        self.keys = parse_colons_keys(listing)
        self.primaries = [k.fingerprint for k in self.keys if k.is_primary]

    def _export(self) -> None:
        """The keyring file gpgv reads (binary transferable public keys), written atomically."""
        proc = self._gpg(["--export"])
        if proc.returncode != 0 or not proc.stdout:
            raise OpenPGPError("gpg --export failed: {}".format(proc.stderr.decode("utf-8", "replace").strip()))
        tmp = self.keyring_file + ".tmp"
        with open(tmp, "wb") as handle:
            handle.write(proc.stdout)
        os.replace(tmp, self.keyring_file)

    def show_keys(self, material: bytes) -> list[KeyInfo]:
        """The keys in ``material`` without importing them."""
        proc = self._gpg(["--with-colons", "--with-subkey-fingerprint", "--import-options", "show-only", "--import"],
                         stdin=material)
        return parse_colons_keys(proc.stdout.decode("utf-8", "replace"))

    def add_key(self, material: bytes, source: str) -> list[str]:
        """Merge a newer copy of a pinned key (new subkeys, extended expiry) into the keyring.

        Refused (``OpenPGPError``, nothing imported) unless every primary key in ``material`` is one
        of the expected (pinned) fingerprints. gpg itself checks that new subkeys and expiry dates
        carry valid binding signatures of that primary key. Returns the primary fingerprints."""
        shown = self.show_keys(material)
        primaries = [k.fingerprint for k in shown if k.is_primary]
        if not primaries:
            raise OpenPGPError(f"{source} holds no OpenPGP public key")
        foreign = [f for f in primaries if f not in self.expected]
        if foreign:
            raise OpenPGPError("{} holds the key(s) {}, whose primary fingerprint is not the pinned {}: refused".format(
                source, ", ".join(foreign), ", ".join(self.expected)))
        proc = self._gpg(["--import"], stdin=material)
        if proc.returncode not in (0, 2):
            raise OpenPGPError("importing {} failed: {}".format(source, proc.stderr.decode("utf-8", "replace").strip()))
        self._refresh_listing()
        self._export()
        return primaries

    def export_armored(self, fingerprint: str) -> bytes:
        """The armored public key ``fingerprint`` as merged in this keyring."""
        proc = self._gpg(["--armor", "--export", fingerprint])
        if proc.returncode != 0 or not proc.stdout:
            raise OpenPGPError("gpg --export {} failed: {}".format(fingerprint, proc.stderr.decode("utf-8", "replace").strip()))
        return proc.stdout

    def close(self) -> None:
        if self.home and os.path.isdir(self.home):
            shutil.rmtree(self.home, ignore_errors=True)
        self.home = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key_ids(self) -> list[str]:
        """Long key ids of every primary key and subkey in the keyring."""
        return [k.keyid for k in self.keys]

    def issuers(self, sig_path: str) -> Optional[list[str]]:
        """Issuer key ids of the signature packets in ``sig_path`` (None: not an OpenPGP signature)."""
        proc = self._gpg(["--list-packets", sig_path])
        text = proc.stdout.decode("utf-8", "replace")
        found = re.findall(r":signature packet: algo \d+, keyid ([0-9A-Fa-f]{16})", text)
        if proc.returncode != 0 or not found:
            return None
        return [k.upper() for k in found]

    def precheck(self, sig_path: str) -> Optional[str]:
        """Before streaming gigabytes: is this an OpenPGP signature by a key in the keyring?
        Returns None when it may verify, else the reason it cannot."""
        issuers = self.issuers(sig_path)
        if not issuers:
            return "the signature file is not an OpenPGP signature"
        known = self.key_ids()
        unknown = [k for k in issuers if k not in known]
        if unknown:
            return "the signature was made by key id {}, which is not in verify_key (key ids {})".format(
                ", ".join(unknown), ", ".join(known))
        return None

    def expired_signers(self, sig_path: str, now: Optional[float] = None) -> list[KeyInfo]:
        """The keys that made the signature(s) in ``sig_path`` and are expired now, or whose primary
        key is (gpg would report EXPKEYSIG / KEYEXPIRED for them)."""
        by_id = {k.keyid: k for k in self.keys}
        primaries = {k.fingerprint: k for k in self.keys if k.is_primary}
        out = []
        for keyid in self.issuers(sig_path) or []:
            key = by_id.get(keyid)
            if key is None:
                continue
            primary = primaries.get(key.primary)
            if key.expired(now) or (primary is not None and primary.expired(now)):
                out.append(key)
        return out

    def describe_expired(self, keys: list[KeyInfo]) -> str:
        primaries = {k.fingerprint: k for k in self.keys if k.is_primary}
        parts = []
        for key in keys:
            primary = primaries.get(key.primary)
            if primary is not None and primary.expired() and primary is not key:
                parts.append(f"the primary key {key.primary} expired on {_day(primary.expires)}")
            else:
                what = "primary key" if key.is_primary else "signing subkey"
                parts.append(f"the {what} {key.fingerprint} (primary {key.primary}) expired on {_day(key.expires)}")
        return "; ".join(parts)

    def expiry(self, signing_fingerprint: Optional[str] = None, now: Optional[float] = None) -> Optional[int]:
        """When the key in use stops verifying: the earlier of its primary key's expiry and the
        expiry of the subkey ``signing_fingerprint`` (without it: of the longest-lived usable
        signing subkey, else of a signing-capable primary key). None: never."""
        now = time.time() if now is None else now
        candidates = [k for k in self.keys if k.primary in self.expected]
        if signing_fingerprint:
            used = [k for k in candidates if k.fingerprint == signing_fingerprint.upper()]
        else:  # the signing subkeys are what signs (a signing-capable primary only without any)
            usable = [k for k in candidates if k.can_sign and not k.revoked and not k.expired(now)]
            usable.sort(key=lambda k: (not k.is_primary, k.expires if k.expires is not None else 1 << 62))
            used = usable[-1:]
        if not used:
            return None
        key = used[0]
        primary = next((k for k in self.keys if k.is_primary and k.fingerprint == key.primary), None)
        dates = [d for d in (key.expires, primary.expires if primary else None) if d]
        return min(dates) if dates else None

    def verifier(self, sig_path: str) -> StreamVerifier:
        return StreamVerifier(self, sig_path)


@dataclass
class VerifyResult:
    good: bool
    reason: str
    signing_fingerprint: Optional[str] = None
    primary_fingerprint: Optional[str] = None
    status: list[str] = field(default_factory=list)
    stderr: str = ""


def judge_status(status_text: str, expected_primaries: list[str], returncode: int) -> VerifyResult:
    """Decide from ``--status-fd`` lines: every signature GOOD, a VALIDSIG whose primary key is expected."""
    lines = [ln[len("[GNUPG:] "):] for ln in status_text.splitlines() if ln.startswith("[GNUPG:] ")]
    keywords = [ln.split(" ", 1)[0] for ln in lines]
    for keyword in keywords:
        if keyword in _BAD:
            return VerifyResult(False, f"{_BAD[keyword]} ({keyword})", status=lines)
    if "GOODSIG" not in keywords:
        return VerifyResult(False, f"gpg reported no good signature (rc={returncode})", status=lines)
    signers = []
    for line in lines:
        fields = line.split()
        if fields[0] == "VALIDSIG" and len(fields) >= 11:
            signers.append((fields[1].upper(), fields[10].upper()))
        elif fields[0] == "VALIDSIG" and len(fields) >= 2:
            signers.append((fields[1].upper(), fields[1].upper()))
    if not signers:
        return VerifyResult(False, "gpg reported GOODSIG without VALIDSIG", status=lines)
    if keywords.count("NEWSIG") > 1 and keywords.count("GOODSIG") != keywords.count("NEWSIG"):
        return VerifyResult(False, "not every signature in the signature file is good", status=lines)
    for signing, primary in signers:
        if primary not in expected_primaries:
            expected = ", ".join(expected_primaries)
            return VerifyResult(False, f"signed by key {signing} (primary {primary}), which is not the expected {expected}",
                                signing, primary, lines)
    if returncode != 0:
        return VerifyResult(False, f"gpg exited with rc={returncode} despite GOODSIG", status=lines)
    return VerifyResult(True, f"good signature from {signers[0][1]}", signers[0][0], signers[0][1], lines)


class StreamVerifier:
    """``gpgv --status-fd 1 SIG -`` (gpg --verify without gpgv) fed chunk by chunk; ``finish()``
    closes the input and judges the result. It runs in a process group of its own, killed on abort."""

    def __init__(self, keyring: Keyring, sig_path: str) -> None:
        if keyring.home is None:
            raise OpenPGPError("internal error: the keyring was used before it was set up")
        self.keyring = keyring
        self.broken = False
        self._status = tempfile.TemporaryFile(dir=keyring.home)  # noqa: SIM115 - closed in finish()/abort()
        self._stderr = tempfile.TemporaryFile(dir=keyring.home)  # noqa: SIM115 - closed in finish()/abort()
        if keyring.gpgv:
            args = [keyring.gpgv, "--homedir", keyring.home, "--keyring", keyring.keyring_file, "--status-fd", "1",
                    sig_path, "-"]
        else:
            args = [keyring.gpg, "--homedir", keyring.home, "--batch", "--no-tty", "--no-autostart",
                    "--no-auto-key-retrieve", "--trust-model", "always", "--status-fd", "1", "--verify", sig_path, "-"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=self._status, stderr=self._stderr,
                                     env=keyring.env(), start_new_session=True)

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk:
            return
        try:
            self.proc.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            # gpgv stopped reading (for example an unparsable signature): finish() reports why
            self.broken = True

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def abort(self) -> None:
        if self.proc.poll() is None:
            self._kill()
        self._close_stdin()
        self.proc.wait()
        self._status.close()
        self._stderr.close()

    def _close_stdin(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.close()

    def finish(self, timeout: float = 300.0) -> VerifyResult:
        self._close_stdin()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            return VerifyResult(False, f"gpgv did not finish within {timeout:.0f} s")
        self._status.seek(0)
        self._stderr.seek(0)
        status = self._status.read().decode("utf-8", "replace")
        stderr = self._stderr.read().decode("utf-8", "replace")
        self._status.close()
        self._stderr.close()
        result = judge_status(status, self.keyring.expected, rc)
        result.stderr = stderr.strip()
        return result


def verify_file(keyring: Keyring, sig_path: str, data_path: str, bufsize: int = 1 << 20) -> VerifyResult:
    """Verify a whole file against a detached signature (the streaming verifier fed from disk)."""
    verifier = keyring.verifier(sig_path)
    try:
        with open(data_path, "rb") as handle:
            while True:
                chunk = handle.read(bufsize)
                if not chunk:
                    break
                verifier.feed(chunk)
    except BaseException:
        verifier.abort()
        raise
    return verifier.finish()
