# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Flatcar's own NVIDIA driver service and extensions, and how modulus stays the one owner of the driver.

Every Flatcar image ships ``nvidia.service`` (package ``x11-drivers/nvidia-drivers-service``), enabled by
a link in ``/usr`` (``/usr/lib/systemd/system/multi-user.target.wants/nvidia.service``, made by the
ebuild's ``systemd_enable_service``), which ``systemctl disable`` cannot remove: only a mask in ``/etc``
stops it. On a host with an NVIDIA GPU its ``setup-nvidia`` builds a driver of its own into
``/opt/nvidia/<version>/<kernel>``, writes ``/etc/ld.so.conf.d/nvidia.conf`` and ``insmod``s it at every
boot, unless Flatcar's official ``nvidia-drivers-*`` extension is merged (then it ``modprobe``s that one).

Official extensions are enabled by name in ``/etc/flatcar/enabled-sysext.conf`` (and
``/usr/share/flatcar/enabled-sysext.conf``), parsed here exactly as bootengine's
``initrd-setup-root-after-ignition`` and update_engine's ``flatcar-postinst`` parse them, and linked by the
initrd as ``/etc/extensions/flatcar-<name>.raw``.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import fsutil
from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_release import in_root as hp
from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import switch_symlink

UNIT = "nvidia.service"
ETC_UNIT = "/etc/systemd/system/nvidia.service"
USR_UNIT = "/usr/lib/systemd/system/nvidia.service"
ENABLED_SYSEXT_ETC = "/etc/flatcar/enabled-sysext.conf"
ENABLED_SYSEXT_USR = "/usr/share/flatcar/enabled-sysext.conf"
EXTENSION_DIRS = ("/etc/extensions", "/run/extensions", "/var/lib/extensions")
LD_CONF = "/etc/ld.so.conf.d/nvidia.conf"
# What kmod_install's tree method writes into /etc/ld.so.conf.d/nvidia.conf (install.activate_tree).
MODULUS_LD_LINES = ["/opt/drivers/nvidia/lib"]
# The names of Flatcar's official NVIDIA driver extensions: nvidia-drivers-535, nvidia-drivers-570-open ...
OFFICIAL_NAME_RE = re.compile(r"nvidia-drivers-[A-Za-z0-9._+-]+")
# setup-nvidia: `systemd-sysext list | grep -q flatcar-nvidia-drivers`
OFFICIAL_IMAGE_MARK = "flatcar-nvidia-drivers"
OFFICIAL_CHOICES = ("refuse", "defer")

Runner = Callable[[list[str]], "tuple[int, str]"]


class NvidiaServiceError(Exception):
    """A state modulus refuses to change: the message names the file and the entry."""


_read = fsutil.read_text


# --------------------------------------------------------------------------- enabled-sysext.conf


@dataclass(frozen=True)
class SysextEntry:
    """A name that enabled-sysext.conf enables: where it is written (file, line number)."""

    name: str
    file: str
    line: int


def _bre_fullmatch(pattern: str) -> re.Pattern:
    """A grep basic regular expression as a Python one for ``grep -x`` (the whole line): ``.``, ``*``,
    ``[...]`` and ``\\c`` keep their meaning, a leading ``^`` and a trailing ``$`` are anchors, every other
    character (``+ ? { } | ( )`` included, as in a BRE) is literal."""
    out, i = [], 0
    if pattern.startswith("^"):
        i = 1
    end = len(pattern) - 1 if pattern.endswith("$") and not pattern.endswith("\\$") and len(pattern) > i else len(pattern)
    while i < end:
        c = pattern[i]
        if c == "\\" and i + 1 < end:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "[":
            close = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("]", "^") else i + 1)
            if close != -1 and close < end:
                out.append(pattern[i:close + 1])
                i = close + 1
                continue
        if c == "." or (c == "*" and out):
            out.append(c)
        else:
            out.append(re.escape(c))
        i += 1
    try:
        return re.compile("".join(out))
    except re.error:
        return re.compile(re.escape(pattern))


def enabled_sysexts(etc_text: Optional[str], usr_text: Optional[str], etc_file: str = ENABLED_SYSEXT_ETC,
                    usr_file: str = ENABLED_SYSEXT_USR) -> list[SysextEntry]:
    """The names Flatcar enables, exactly as bootengine and flatcar-postinst compute them::

        grep -h -o '^[^#]*' /etc/flatcar/enabled-sysext.conf /usr/share/flatcar/enabled-sysext.conf \\
          | grep -v -x -f <(grep '^-' /etc/flatcar/enabled-sysext.conf | cut -d - -f 2-) | grep -v -P '^(-).*'

    then split on white space (``for NAME in $(...)``). So: the part of each line before ``#`` (the /etc
    file first); ``-NAME`` lines of the /etc file only disable, and only lines that are exactly ``NAME``
    (a pattern of grep: ``-NAME # why`` disables the line ``NAME # why``, and ``NAME `` with a trailing
    blank before a comment is not disabled by ``-NAME``); lines starting with ``-`` are dropped; several
    names on one line each count."""
    disable: list[re.Pattern] = []
    for raw in (etc_text or "").splitlines():
        if raw.startswith("-"):
            disable.append(_bre_fullmatch(raw.split("-", 1)[1]))
    found: list[SysextEntry] = []
    for text, name in ((etc_text, etc_file), (usr_text, usr_file)):
        for number, raw in enumerate((text or "").splitlines(), start=1):
            prefix = raw.split("#", 1)[0]
            if not prefix:  # grep -o prints nothing for an empty match
                continue
            if any(p.fullmatch(prefix) for p in disable):
                continue
            if prefix.startswith("-"):
                continue
            found.extend(SysextEntry(word, name, number) for word in prefix.split())
    return found


# --------------------------------------------------------------------------- official NVIDIA extensions


@dataclass(frozen=True)
class Official:
    """Flatcar's official NVIDIA driver extension, enabled or present on the host."""

    entry: str  # the name in enabled-sysext.conf, or the image's file name
    file: str  # the file that names it (enabled-sysext.conf) or the image itself (host path)
    line: Optional[int] = None

    def describe(self) -> str:
        if self.line is not None:
            return f'{self.file} line {self.line} enables "{self.entry}"'
        return f"{self.file} is the extension image \"{self.entry}\""

    def as_dict(self) -> dict:
        return {"entry": self.entry, "file": self.file, "line": self.line}


def official_nvidia_extensions(host_root: str) -> list[Official]:
    """Official ``nvidia-drivers-*`` entries of enabled-sysext.conf, and ``flatcar-nvidia-drivers*``
    images in the extension directories (what setup-nvidia's ``systemd-sysext list`` check finds)."""
    found: list[Official] = []
    entries = enabled_sysexts(_read(hp(host_root, ENABLED_SYSEXT_ETC)), _read(hp(host_root, ENABLED_SYSEXT_USR)))
    for entry in entries:
        if OFFICIAL_NAME_RE.fullmatch(entry.name):
            found.append(Official(entry.name, entry.file, entry.line))
    for directory in EXTENSION_DIRS:
        try:
            names = sorted(os.listdir(hp(host_root, directory)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if OFFICIAL_IMAGE_MARK in name and not name.startswith("."):
                found.append(Official(name, f"{directory}/{name}"))
    return found


def refusal_message(found: list[Official]) -> str:
    first = found[0]
    where = "; ".join(o.describe() for o in found)
    how = (f'remove "{first.entry}" from {first.file}' if first.file == ENABLED_SYSEXT_ETC
           else f'add the line "-{first.entry}" to {ENABLED_SYSEXT_ETC}' if first.line is not None
           else f"remove {first.file}")
    return (f"Flatcar's official NVIDIA driver extension is enabled: {where}. It and modulus would each put an "
            f"NVIDIA driver on this host. Either {how} (and reboot), or set official=defer "
            f"(the role's modulus_nvidia_official: defer) to leave the NVIDIA driver to that extension")


# --------------------------------------------------------------------------- nvidia.service and nvidia.conf


@dataclass
class UnitState:
    shipped: bool  # /usr/lib/systemd/system/nvidia.service exists (every Flatcar release)
    etc: str  # absent | masked | link (a link elsewhere: a linked unit) | file (a unit of its own)
    wants: list[str] = field(default_factory=list)  # host paths of /etc links that pull it in

    @property
    def masked(self) -> bool:
        return self.etc == "masked"


def unit_state(host_root: str) -> UnitState:
    etc = hp(host_root, ETC_UNIT)
    if os.path.islink(etc):
        kind = "masked" if os.readlink(etc) == "/dev/null" else "link"
    elif os.path.lexists(etc):
        kind = "file"
    else:
        kind = "absent"
    wants = []
    base = hp(host_root, "/")
    for suffix in ("wants", "requires", "upholds"):
        for path in sorted(glob.glob(hp(host_root, f"/etc/systemd/system/*.{suffix}/{UNIT}"))):
            wants.append("/" + os.path.relpath(path, base))
    return UnitState(shipped=os.path.lexists(hp(host_root, USR_UNIT)), etc=kind, wants=wants)


def ld_conf_lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def ld_conf_foreign(host_root: str, deferred: bool) -> Optional[list[str]]:
    """The lines of /etc/ld.so.conf.d/nvidia.conf when it must go, else None: when modulus owns the driver,
    anything but what kmod_install writes (setup-nvidia writes ``/opt/nvidia/current/usr/lib64``); when
    deferring to the official extension (its libraries are in ``/usr``), any content."""
    path = hp(host_root, LD_CONF)
    if not os.path.lexists(path):
        return None
    text = _read(path)
    lines = ld_conf_lines(text) if text is not None else []
    if not deferred and lines == MODULUS_LD_LINES:
        return None
    return lines


# --------------------------------------------------------------------------- the plan and its application


@dataclass
class Result:
    changed: bool = False
    masked: bool = False
    deferred: bool = False
    official: list[dict] = field(default_factory=list)
    unit: dict = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    ld_so_conf: dict = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"changed": self.changed, "masked": self.masked, "deferred": self.deferred, "official": self.official,
                "unit": self.unit, "removed": self.removed, "ld_so_conf": self.ld_so_conf, "actions": self.actions}


def run_tool(argv: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def check_official(value: str) -> str:
    if value not in OFFICIAL_CHOICES:
        raise ValueError(f"official {value!r} must be one of {', '.join(OFFICIAL_CHOICES)}")
    return value


def ensure(host_root: str, official: str = "refuse", check: bool = False, run: Runner = run_tool) -> Result:
    """Make modulus the one owner of the host's NVIDIA driver (see the module's documentation).

    ``official``: ``refuse`` - an official NVIDIA extension is an error (NvidiaServiceError naming the
    file and the entry); ``defer`` - leave the driver to it (``deferred``), change nothing but a stale
    ``nvidia.conf``. Otherwise mask nvidia.service (``/etc/systemd/system/nvidia.service -> /dev/null``),
    remove the ``/etc`` links that pull it in, and remove an ``nvidia.conf`` that is not modulus's.
    ``systemctl`` and ``ldconfig`` run only when ``host_root`` is ``/``."""
    check_official(official)
    on_host = (host_root or "/").rstrip("/") == ""
    res = Result()
    found = official_nvidia_extensions(host_root)
    res.official = [o.as_dict() for o in found]
    state = unit_state(host_root)
    res.unit = {"shipped": state.shipped, "before": state.etc, "wants": list(state.wants)}
    if found and official == "refuse":
        raise NvidiaServiceError(refusal_message(found))
    res.deferred = bool(found)
    if res.deferred:
        res.actions.append("deferred to Flatcar's official NVIDIA extension: " + "; ".join(o.describe() for o in found))
        res.masked = state.masked
        if state.masked:
            res.warnings.append(f"{ETC_UNIT} masks nvidia.service, which loads the official extension's driver at "
                                "boot: unmask it (systemctl unmask nvidia.service) for that driver to load")
    else:
        if state.etc == "file":
            raise NvidiaServiceError(
                f"{ETC_UNIT} is a unit file of its own, not Flatcar's nvidia.service: modulus does not replace it. "
                f"Remove it, or replace it with a link to /dev/null, so that only modulus loads the NVIDIA driver")
        for link in state.wants:
            res.actions.append(f"removed {link} (it pulls nvidia.service in)")
            res.removed.append(link)
        if not state.masked:
            res.actions.append(f"masked nvidia.service ({ETC_UNIT} -> /dev/null): Flatcar's setup-nvidia would "
                               "build and load an NVIDIA driver of its own at every boot")
        if not check:
            _mask(host_root, state, on_host, run)
        res.masked = True
    lines = ld_conf_foreign(host_root, res.deferred)
    res.ld_so_conf = {"path": LD_CONF, "removed": lines is not None, "lines": lines or [], "ldconfig": False}
    if lines is not None:
        res.actions.append(f"removed {LD_CONF} ({', '.join(lines) or 'empty'}): it points the dynamic linker at "
                           "another NVIDIA build")
        res.removed.append(LD_CONF)
        if not check:
            os.unlink(hp(host_root, LD_CONF))
            if on_host:
                rc, text = run(["ldconfig"])
                res.ld_so_conf["ldconfig"] = rc == 0
                if rc != 0:
                    res.warnings.append(f"ldconfig failed (rc={rc}): {text[-300:]}")
    res.changed = bool(res.removed) or (not res.deferred and not state.masked)
    return res


def _mask(host_root: str, state: UnitState, on_host: bool, run: Runner) -> None:
    if on_host:
        if state.wants:
            run(["systemctl", "disable", UNIT])  # removes the /etc links; fails when the unit is not shipped
        for link in state.wants:
            if os.path.lexists(link):
                os.unlink(link)
        if not state.masked:
            if state.etc == "link":
                os.unlink(ETC_UNIT)
            rc, text = run(["systemctl", "mask", UNIT])
            if rc != 0 or not (os.path.islink(ETC_UNIT) and os.readlink(ETC_UNIT) == "/dev/null"):
                raise NvidiaServiceError(f"systemctl mask {UNIT} failed (rc={rc}): {text[-500:]}")
        return
    for link in state.wants:
        path = hp(host_root, link)
        if os.path.lexists(path):
            os.unlink(path)
    if not state.masked:
        switch_symlink(hp(host_root, ETC_UNIT), "/dev/null")
