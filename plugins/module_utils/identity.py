# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The identity of a build: the one vocabulary every module speaks.

A build is named by ``os, board, os_version, kernel_release, driver, driver_version, module_type,
signer``. kmod_build returns it, kmod_archive takes it (as one ``identity`` option or as separate
options), kmod_install reads it from the manifest. Every check of those values lives here, and
each checks the whole string (``re.fullmatch``), so a trailing newline never passes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

IDENTITY_FIELDS = ("os", "board", "os_version", "kernel_release", "driver", "driver_version",
                   "module_type", "signer")
# The manifest (schema 1) records the signer under this key.
MANIFEST_SIGNER_KEY = "signing_key_fingerprint"

NVIDIA = "nvidia"
NVIDIA_OPEN_FIRST_BRANCH = 515  # first branch that ships kernel-open/
NVIDIA_OPEN_DEFAULT_BRANCH = 560  # NVIDIA's guidance: open modules are the default from R560 on
MODULE_TYPES = ("proprietary", "open", "auto")
DEFAULT_MODULE_TYPE = "default"  # builds that have no variant (every non-NVIDIA driver)

DEFAULT_ARCHIVE_ROOT = "/opt/modulus/archive"

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+~-]{0,63}")
NVIDIA_VERSION_RE = re.compile(r"[0-9]{2,4}\.[0-9]{1,3}(\.[0-9]{1,3})?")
OS_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+([.+~-][0-9A-Za-z.+~-]*)?")
KERNEL_RELEASE_RE = re.compile(r"[0-9]+\.[0-9]+[A-Za-z0-9_.+~-]{0,120}")
BOARD_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
OS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
FINGERPRINT_RE = re.compile(r"[0-9A-Fa-f:]{16,128}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){7,63}")


class IdentityError(ValueError):
    """A value that names a build is malformed; the message names the option and the value."""


def _check(option: str, value: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise IdentityError(f"{option}={value!r} is not {what}")
    return value


def check_name(option: str, value: Any) -> str:
    """A driver or module name: a plain path component."""
    return _check(option, value, NAME_RE, "a plain name (letters, digits, '_', '.', '+', '-'; no '/' or '..')")


def check_driver_version(option: str, value: Any, driver: Optional[str] = None) -> str:
    if (driver or "").lower() == NVIDIA:
        return _check(option, value, NVIDIA_VERSION_RE, "an NVIDIA driver version such as 535.104.05")
    return _check(option, value, VERSION_RE, "a version (letters, digits, '.', '_', '+', '~', '-')")


def check_os_version(option: str, value: Any) -> str:
    return _check(option, value, OS_VERSION_RE, "a release version such as 4459.2.1")


def check_kernel_release(option: str, value: Any) -> str:
    return _check(option, value, KERNEL_RELEASE_RE, "a kernel release such as 6.6.95-flatcar")


def check_board(option: str, value: Any) -> str:
    return _check(option, value, BOARD_RE, "a board such as amd64-usr")


def check_os(option: str, value: Any) -> str:
    return _check(option, value, OS_RE, "an OS id such as flatcar")


def check_fingerprint(option: str, value: Any) -> str:
    return _check(option, value, FINGERPRINT_RE, "a key fingerprint (hex digits, optionally ':'-separated)")


def nvidia_branch(version: str, option: str = "driver_version") -> int:
    return int(check_driver_version(option, version, NVIDIA).split(".")[0])


def resolve_module_type(driver: Optional[str], driver_version: Optional[str], requested: Optional[str],
                        option: str = "module_type") -> str:
    """The module type a build of ``driver``/``driver_version`` has when ``requested`` is asked for.

    The one rule every module uses. For NVIDIA, ``auto`` (or nothing) means the open modules from
    branch 560 on (NVIDIA's default there, for Turing and newer GPUs) and the proprietary ones before
    (the only choice before R515, NVIDIA's recommendation up to R555). Every other driver has one
    variant, ``default``.
    """
    if (driver or "").lower() != NVIDIA:
        if requested in (None, "", "auto", DEFAULT_MODULE_TYPE):
            return DEFAULT_MODULE_TYPE
        return check_name(option, requested)
    kind = requested or "auto"
    if kind not in MODULE_TYPES:
        raise IdentityError("{}={!r} is not one of {}".format(option, kind, ", ".join(MODULE_TYPES)))
    branch = nvidia_branch(driver_version or "")
    if kind == "auto":
        return "open" if branch >= NVIDIA_OPEN_DEFAULT_BRANCH else "proprietary"
    if kind == "open" and branch < NVIDIA_OPEN_FIRST_BRANCH:
        raise IdentityError(f"{option}=open: driver {driver_version} has no open kernel modules"
                            f" (they start with R{NVIDIA_OPEN_FIRST_BRANCH})")
    return kind


def normalize_signer(value: Optional[str]) -> Optional[str]:
    if value in (None, ""):
        return None
    return check_fingerprint("signer", str(value)).replace(":", "").lower()


def make_identity(os: Optional[str] = "flatcar", board: Optional[str] = "amd64-usr",  # noqa: A002
                  os_version: Optional[str] = None, kernel_release: Optional[str] = None,
                  driver: Optional[str] = None, driver_version: Optional[str] = None,
                  module_type: Optional[str] = None, signer: Optional[str] = None,
                  require: tuple[str, ...] = ("os_version", "kernel_release", "driver", "driver_version"),
                  ) -> dict[str, Optional[str]]:
    """A checked identity. ``module_type`` is resolved (``auto`` or nothing -> the real variant)."""
    ident: dict[str, Optional[str]] = {"os": os, "board": board, "os_version": os_version,
                                       "kernel_release": kernel_release, "driver": driver,
                                       "driver_version": driver_version}
    for field in require:
        if ident.get(field) in (None, ""):
            raise IdentityError(f"{field} is required to name a build")
    checks = {"os": check_os, "board": check_board, "os_version": check_os_version,
              "kernel_release": check_kernel_release, "driver": check_name}
    for field, check in checks.items():
        if ident[field] not in (None, ""):
            check(field, ident[field])
    if driver_version not in (None, ""):
        check_driver_version("driver_version", driver_version, driver)
    if driver not in (None, "") and (driver_version not in (None, "") or (driver or "").lower() != NVIDIA):
        ident["module_type"] = resolve_module_type(driver, driver_version, module_type)
    else:
        ident["module_type"] = module_type
    ident["signer"] = normalize_signer(signer)
    return ident


def identity_from_manifest(manifest: dict[str, Any]) -> dict[str, Optional[str]]:
    """The identity a build's manifest records (a build without a module type is ``default``)."""
    ident: dict[str, Optional[str]] = {}
    for field in IDENTITY_FIELDS:
        value = manifest.get(MANIFEST_SIGNER_KEY if field == "signer" else field)
        ident[field] = None if value in (None, "") else str(value)
    if not ident["module_type"]:
        ident["module_type"] = DEFAULT_MODULE_TYPE
    if ident["signer"]:
        ident["signer"] = ident["signer"].replace(":", "").lower()
    return ident


def identity_mismatches(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``field: have != want`` for every field ``want`` sets that ``have`` does not match."""
    out = []
    for field in IDENTITY_FIELDS:
        wanted = want.get(field)
        if wanted in (None, ""):
            continue
        got = have.get(field)
        if field == "signer":
            got, wanted = (got or "").replace(":", "").lower(), str(wanted).replace(":", "").lower()
        if str(got) != str(wanted):
            out.append(f"{field}: {got!r} != {wanted!r}")
    return out


def build_dir(archive_root: str, ident: dict[str, Any]) -> str:
    """Where a build lives on a host: ``<archive_root>/<driver>/<driver_version>/<kernel_release>``."""
    driver = check_name("driver", ident.get("driver"))
    version = check_driver_version("driver_version", ident.get("driver_version"), driver)
    kver = check_kernel_release("kernel_release", ident.get("kernel_release"))
    return os.path.join(archive_root, driver, version, kver)
