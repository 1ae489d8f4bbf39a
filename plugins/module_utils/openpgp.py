# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verify detached OpenPGP signatures with an isolated keyring (a private GNUPGHOME holding only
the given key), fed while the data streams in, judged from ``gpg --status-fd`` machine output."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.modulus.kmods.plugins.module_utils.common import require_tool, which

ARMOR_HEADER = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
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


class Keyring:
    """A throwaway GNUPGHOME that holds only the given public key(s); removed on exit."""

    def __init__(self, key_material: bytes, expected_fingerprints: Optional[list[str]] = None,
                 tmp_dir: Optional[str] = None) -> None:
        self.key_material = key_material
        self.expected = [normalize_fingerprint(f) for f in expected_fingerprints or []]
        self.tmp_dir = tmp_dir
        self.home: Optional[str] = None
        self.primaries: list[str] = []
        self.gpg = require_tool("gpg")

    def _gpg(self, args: list[str], stdin: Optional[bytes] = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        if self.home is None:
            raise OpenPGPError("internal error: the keyring was used before it was set up")
        return subprocess.run([self.gpg, "--homedir", self.home, "--batch", "--no-tty", "--no-auto-key-retrieve"] + args,
                              input=stdin, capture_output=True, timeout=timeout,
                              check=False, env=self.env())

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["GNUPGHOME"] = self.home or ""
        env["LC_ALL"] = "C"
        env.pop("GPG_AGENT_INFO", None)
        return env

    def __enter__(self) -> Keyring:
        self.home = tempfile.mkdtemp(prefix="modulus-gnupg-", dir=self.tmp_dir)
        os.chmod(self.home, 0o700)
        try:
            proc = self._gpg(["--import"], stdin=self.key_material)
            listing = self._gpg(["--with-colons", "--fingerprint", "--list-keys"])
            self.primaries = parse_colons_primaries(listing.stdout.decode("utf-8", "replace"))
            if not self.primaries:
                raise OpenPGPError("no OpenPGP public key could be imported from verify_key: {}".format(proc.stderr.decode("utf-8", "replace").strip()))
            missing = [f for f in self.expected if f not in self.primaries]
            if missing:
                raise OpenPGPError("verify_key holds the key(s) {}, not the expected {}".format(", ".join(self.primaries), ", ".join(missing)))
            if not self.expected:
                self.expected = list(self.primaries)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.home and os.path.isdir(self.home):
            gpgconf = which("gpgconf")
            # Importing a key may start gpg-agent; its sockets can live under /run/user/<uid>/gnupg rather
            # than in the home, so always ask gpgconf to stop whatever belongs to this home.
            if gpgconf:
                subprocess.run([gpgconf, "--homedir", self.home, "--kill", "all"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=self.env())
            shutil.rmtree(self.home, ignore_errors=True)
        self.home = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key_ids(self) -> list[str]:
        """Long key ids of every primary key and subkey in the keyring."""
        listing = self._gpg(["--with-colons", "--list-keys"]).stdout.decode("utf-8", "replace")
        return [f.split(":")[4].upper() for f in listing.splitlines() if f.split(":")[0] in ("pub", "sub")
                and len(f.split(":")) > 4]

    def precheck(self, sig_path: str) -> Optional[str]:
        """Before streaming gigabytes: is this an OpenPGP signature by a key in the keyring?
        Returns None when it may verify, else the reason it cannot."""
        proc = self._gpg(["--list-packets", sig_path])
        text = proc.stdout.decode("utf-8", "replace")
        issuers = re.findall(r":signature packet: algo \d+, keyid ([0-9A-Fa-f]{16})", text)
        if proc.returncode != 0 or not issuers:
            return "the signature file is not an OpenPGP signature"
        known = self.key_ids()
        unknown = [k.upper() for k in issuers if k.upper() not in known]
        if unknown:
            return "the signature was made by key id {}, which is not in verify_key (key ids {})".format(
                ", ".join(unknown), ", ".join(known))
        return None

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
    """``gpg --verify SIG -`` fed chunk by chunk; ``finish()`` closes the input and judges the result."""

    def __init__(self, keyring: Keyring, sig_path: str) -> None:
        if keyring.home is None:
            raise OpenPGPError("internal error: the keyring was used before it was set up")
        self.keyring = keyring
        self.broken = False
        self._status = tempfile.TemporaryFile(dir=keyring.home)  # noqa: SIM115 - closed in finish()/abort()
        self._stderr = tempfile.TemporaryFile(dir=keyring.home)  # noqa: SIM115 - closed in finish()/abort()
        self.proc = subprocess.Popen(
            [keyring.gpg, "--homedir", keyring.home, "--batch", "--no-tty", "--no-auto-key-retrieve",
             "--trust-model", "always", "--status-fd", "1", "--verify", sig_path, "-"],
            stdin=subprocess.PIPE, stdout=self._status, stderr=self._stderr, env=keyring.env())

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk:
            return
        try:
            self.proc.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            # gpg stopped reading (for example an unparsable signature): finish() reports why
            self.broken = True

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
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
            return VerifyResult(False, f"gpg did not finish within {timeout:.0f} s")
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
