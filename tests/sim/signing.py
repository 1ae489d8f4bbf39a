"""A throwaway module-signing key and certificate (what an operator enrolls as a Secure Boot MOK),
for the signing tests."""

from __future__ import annotations

import subprocess
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
