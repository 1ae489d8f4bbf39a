# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Who this machine is, read below a host root: its machine ID and its hostname.

The fleet lock names its holder ``<hostname>/<id>``: the hostname for people, and an ID derived
from ``/etc/machine-id`` for the lock, since many hosts share a hostname (every host that runs
ansible-pull is ``localhost`` to Ansible, and a Flatcar host without a name from DHCP or its
cloud is ``localhost`` to the kernel too). machine-id(5) asks applications not to expose the ID
itself: the lock uses systemd's application-specific derivation (``sd_id128_get_machine_app_specific``,
HMAC-SHA256 keyed with the machine ID), so ``systemd-id128 machine-id --app-specific=<APP_ID>``
prints the same ID on the host."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
import uuid

# The application ID of modulus' fleet lock (a fixed random UUID, as systemd-id128 new would give).
LOCK_APP_ID = "5b0bd2b2c1a24f0e9d4c7c3e8a61f0d7"

MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,252})")


class MachineError(Exception):
    """The machine's identity cannot be read; the message names the file."""


def _below(host_root: str, path: str) -> str:
    return os.path.join(host_root or "/", path.lstrip("/"))


def read_machine_id(host_root: str = "/") -> str:
    """The 32 lower-case hex digits of ``<host_root>/etc/machine-id``."""
    path = _below(host_root, "/etc/machine-id")
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read(4096).strip()
    except OSError as exc:
        raise MachineError(f"cannot read the machine ID {path}: {exc.strerror}") from None
    if not MACHINE_ID_RE.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise MachineError(f"{path} holds no machine ID ({shown!r}; 32 hex digits expected, as systemd writes it"
                           " at the first boot)")
    return text


def read_hostname(host_root: str = "/") -> str:
    """The host's name: the kernel's (``<host_root>/proc/sys/kernel/hostname``), else ``/etc/hostname``,
    else (on the machine itself) ``socket.gethostname()``; ``localhost`` when none names it."""
    for rel in ("/proc/sys/kernel/hostname", "/etc/hostname"):
        try:
            with open(_below(host_root, rel), encoding="utf-8", errors="replace") as handle:
                name = handle.readline(256).strip()
        except OSError:
            continue
        if name:
            return name if HOSTNAME_RE.fullmatch(name) else "localhost"
    if os.path.realpath(host_root or "/") == "/":
        name = socket.gethostname()
        if name and HOSTNAME_RE.fullmatch(name):
            return name
    return "localhost"


def app_specific_id(machine_id: str, app_id: str = LOCK_APP_ID) -> str:
    """systemd's ``sd_id128_get_app_specific``: the first 16 bytes of HMAC-SHA256(key=machine ID,
    message=application ID), made a version 4 UUID; 32 hex digits."""
    digest = bytearray(hmac.new(bytes.fromhex(machine_id), bytes.fromhex(app_id), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(digest)).hex


def lock_owner(host_root: str = "/") -> str:
    """The fleet lock's owner for this machine: ``<hostname>/<application-specific machine ID>``."""
    return f"{read_hostname(host_root)}/{app_specific_id(read_machine_id(host_root))}"
