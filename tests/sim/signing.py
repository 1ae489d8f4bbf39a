"""Throwaway keys for the tests: a module-signing key and certificate (what an operator enrolls as
a Secure Boot MOK), and OpenPGP keys whose signing subkey has expired, with their refreshed copy
(``ExpiredKeySet``), for the image key-refresh tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def make_signing_pair(directory: Path, common_name: str, days: int = 7) -> tuple[Path, Path, str]:
    """Create an RSA key and a self-signed certificate with ``common_name``; return (key, cert, key id),
    the key id written as ``modinfo -F sig_key`` prints it (the certificate serial, colon-separated hex)."""
    key, cert = directory / "signing.key", directory / "signing.crt"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", str(days), "-subj", f"/O=modulus tests/CN={common_name}"],
                   check=True, capture_output=True)
    serial = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-serial"], check=True,
                            capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    raw = bytes.fromhex(serial if len(serial) % 2 == 0 else "0" + serial).lstrip(b"\0")
    return key, cert, ":".join(f"{b:02X}" for b in raw)


# --------------------------------------------------------------------------- OpenPGP keys that expire

DAY = 86400


class PgpKey:
    """A throwaway OpenPGP key in its own GNUPGHOME: a certify-only primary key and an ed25519
    signing subkey, like Flatcar's image signing key (which rotates its signing subkey yearly).

    ``generate(..., created_days_ago=730, subkey_days=365)`` makes a key whose signing subkey has
    already expired (gpg ``--faked-system-time``); ``sign(path, days_ago=700)`` then makes a
    signature from when it was valid (gpg reports EXPKEYSIG for it today). ``set_subkey_expiry``
    extends it now, which is what Flatcar publishes as the refreshed key. Every operation that
    needs the secret key stops the gpg-agent it started (``close``)."""

    def __init__(self, home: Path, fingerprint: str, signing_fingerprint: str) -> None:
        self.home = home
        self.fingerprint = fingerprint
        self.signing_fingerprint = signing_fingerprint

    def _gpg(self, *args: str, at: int | None = None, data: bytes | None = None) -> subprocess.CompletedProcess:
        cmd = ["gpg", "--homedir", str(self.home), "--batch", "--no-tty", "--quiet", "--pinentry-mode", "loopback",
               "--passphrase", ""]
        if at is not None:
            cmd.append(f"--faked-system-time={at}!")
        try:
            return subprocess.run(cmd + list(args), input=data, capture_output=True, check=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"gpg {' '.join(args)} failed: {exc.stderr.decode(errors='replace')}") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Stop the gpg-agent a secret-key operation started for this home."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], capture_output=True, check=False)

    @classmethod
    def generate(cls, directory: Path, uid: str, *, created_days_ago: int = 0, subkey_days: int | None = None) -> PgpKey:
        """A new key in ``directory`` (created, mode 0700), made ``created_days_ago`` days ago; its
        signing subkey expires ``subkey_days`` days after that (None: never)."""
        directory.mkdir(mode=0o700, parents=True)
        at = int(time.time()) - created_days_ago * DAY if created_days_ago else None
        key = cls(directory, "", "")
        key._gpg("--quick-gen-key", uid, "ed25519", "cert", "never", at=at)
        key.fingerprint = key._listing()[0][0]
        key._gpg("--quick-add-key", key.fingerprint, "ed25519", "sign", f"{subkey_days}d" if subkey_days else "never",
                 at=at)
        key.signing_fingerprint = [fpr for fpr, caps in key._listing() if "s" in caps][-1]
        return key

    def _listing(self) -> list[tuple[str, str]]:
        """(fingerprint, own capabilities) of the primary key and every subkey."""
        out = subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--with-colons", "--with-subkey-fingerprint",
                              "--list-keys"], capture_output=True, text=True, check=True).stdout
        rows, caps = [], ""
        for line in out.splitlines():
            fields = line.split(":")
            if fields[0] in ("pub", "sub"):
                caps = "".join(c for c in fields[11] if c.islower())
            elif fields[0] == "fpr":
                rows.append((fields[9], caps))
        return rows

    def public(self) -> bytes:
        """The armored public key as it is now."""
        return self._gpg("--armor", "--export", self.fingerprint).stdout

    def sign(self, path: Path, out: Path | None = None, days_ago: int = 0) -> Path:
        """A binary detached signature of ``path`` by the signing subkey, made ``days_ago`` days ago."""
        out = out or path.with_name(path.name + ".sig")
        at = int(time.time()) - days_ago * DAY if days_ago else None
        self._gpg("--yes", "--local-user", f"{self.signing_fingerprint}!", "--detach-sign", "-o", str(out), str(path),
                  at=at)
        return out

    def set_subkey_expiry(self, expire: str = "2y") -> bytes:
        """Extend (now) the signing subkey's expiry; return the armored public key: the 'refreshed' key."""
        self._gpg("--quick-set-expire", self.fingerprint, expire, self.signing_fingerprint)
        return self.public()


class ExpiredKeySet:
    """Everything the key-refresh tests need, generated in seconds into ``directory``:

    - ``key``: a key made 2 years ago whose 1-year signing subkey has expired;
      ``expired_public`` its public key as first published (armored);
    - ``refreshed_public``: the same primary key with the subkey's expiry extended now (what the
      publisher serves at key_url after a refresh);
    - ``impostor_public``: a fresh key of *another* primary with the same user id (must be refused);
    - ``sign(path, out)``: a signature made 700 days ago, while the subkey was valid.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = PgpKey.generate(directory / "expired", "Expiring Signer <expiring@example.invalid>",
                                   created_days_ago=730, subkey_days=365)
        self.expired_public = self.key.public()
        self.impostor = PgpKey.generate(directory / "impostor", "Expiring Signer <expiring@example.invalid>")
        self.impostor_public = self.impostor.public()
        self.refreshed_public = b""  # set by refresh(); kept separate so signatures can be made first

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    def sign(self, path: Path, out: Path | None = None) -> Path:
        if self.refreshed_public:
            raise RuntimeError("sign before refresh(): the refreshed key signs nothing")
        return self.key.sign(path, out, days_ago=700)

    def refresh(self) -> bytes:
        self.refreshed_public = self.key.set_subkey_expiry("2y")
        return self.refreshed_public

    def write(self) -> dict[str, Path]:
        """The three public keys as files in ``directory`` (expired.asc, refreshed.asc, impostor.asc)."""
        paths = {}
        for name, data in (("expired", self.expired_public), ("refreshed", self.refreshed_public),
                           ("impostor", self.impostor_public)):
            paths[name] = self.directory / f"{name}.asc"
            paths[name].write_bytes(data)
        return paths
