# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small helpers shared by the modulus.kmods module_utils (no Ansible import needed): the log
callback type, finding executables, sizes for humans, KEY=VALUE files. Hashing and atomic writes
are in ``fsutil.py``."""

from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

LogFn = Callable[[str], None]

SBIN_PATHS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def no_log(_msg: str) -> None:
    """A log callback that drops everything."""


def path_has_sbin(path: Optional[str]) -> bool:
    """PATH names a ``sbin`` directory (a login shell's or systemd's PATH; cron's and some ssh
    sessions' ``/usr/bin:/bin`` do not)."""
    return any(os.path.basename(d.rstrip("/")) == "sbin" for d in (path or "").split(os.pathsep) if d)


def which(name: str) -> Optional[str]:
    """Find an executable on PATH; when PATH names no sbin directory, then in the usual sbin/bin
    directories too. A PATH with sbin is taken as the whole of what the host offers."""
    path = os.environ.get("PATH", os.defpath)
    found = shutil.which(name, path=path)
    if found or path_has_sbin(path):
        return found
    return shutil.which(name, path=os.pathsep.join(SBIN_PATHS))


def require_tool(name: str) -> str:
    """Like which() but raise a clear error naming the missing executable."""
    found = which(name)
    if not found:
        raise FileNotFoundError("required executable '{}' was not found on PATH ({}){}".format(
            name, os.environ.get("PATH", ""),
            "" if path_has_sbin(os.environ.get("PATH")) else " or in " + ", ".join(SBIN_PATHS)))
    return found


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024.0 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024.0
    return f"{value:.1f} TiB"


def parse_env_file(text: str) -> dict[str, str]:
    """Parse KEY=VALUE lines (os-release, Flatcar release and update.conf files).

    Comments and blank lines are skipped; one level of single or double quotes is removed.
    """
    result: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _sep, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
            value = value[1:-1]
        if key:
            result[key] = value
    return result
