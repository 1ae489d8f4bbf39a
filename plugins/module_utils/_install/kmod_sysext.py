# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Flatcar's convention for system extensions that ship kernel modules (flatcar/scripts
``build_library/sysext_mangle_kmod``, PR 2976), applied to every modulus image.

An extension file shadows the base file of the same path, so an image that shipped
``usr/lib/modules/<kver>/modules.dep`` would hide every other extension's modules (Flatcar issue
1576: the nvidia extension hid zfs). Flatcar's own kmod extensions therefore ship no ``modules.*``
file at all. Instead, per module of the image:

    usr/lib/modprobe.d/10-<name>-kmod-sysext.conf
        install <mod> /usr/libexec/_<name>_modprobe_helper <mod>
        remove <mod> /usr/libexec/_<name>_modprobe_helper -r <mod>

and the helper, which in a private mount namespace overlays ``/usr/lib/modules/$(uname -r)`` (upper
dir in a temporary directory), runs ``depmod`` there (so the index covers the base kernel and every
merged extension) and calls ``modprobe --ignore-install``. The base ``modules.dep`` stays the one the
kernel shipped, and any number of such extensions can be merged together.

The helper's logic is Flatcar's, line for line. Adaptations: ``<name>`` is ``modulus-<driver>`` (the
image name without the release: only one release's image is merged at a time); module names are
written the way the kernel names them (``nvidia_modeset``; kmod treats ``-`` and ``_`` alike when it
looks a module up, so ``modprobe nvidia-modeset`` finds the line too). Dependencies between the image's own modules (``nvidia_modeset`` needs
``nvidia``) work as in Flatcar's: ``--ignore-install`` applies to the module asked for, a dependency
with an ``install`` line runs the helper again, which finds ``/usr/lib/modules/<kver>`` already
overlaid in its namespace and goes straight to ``modprobe --ignore-install``.
"""

from __future__ import annotations

import hashlib
import re

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_MODULE_RE = re.compile(r"[A-Za-z0-9_]{1,64}")

HELPER_TEMPLATE = r"""#!/bin/bash
# modprobe helper of the system extension @NAME@ (written by modulus.kmods kmod_install,
# after flatcar/scripts build_library/sysext_mangle_kmod): loads a module of the merged
# extensions with an index made for them in a private mount namespace.

set -euo pipefail

action="Loading"
for arg in "$@"; do
    if [[ $arg == "-r" ]]; then
        action="Unloading"
    fi
done
echo "$action kernel module from a sysext..."

KMOD_PATH=/usr/lib/modules/$(uname -r)
TMP_DIR=$(mktemp -d)
trap "rm -rf -- '${TMP_DIR}'" EXIT
mkdir "${TMP_DIR}"/{upper,work}

unshare -m bash -s -- "${@}" <<FOE
set -euo pipefail
if ! mountpoint -q "${KMOD_PATH}"; then
    mount -t overlay overlay -o lowerdir="${KMOD_PATH}",upperdir="${TMP_DIR}"/upper,workdir="${TMP_DIR}"/work "${KMOD_PATH}"
    depmod
fi
modprobe --ignore-install "\${@}"
FOE
"""


def check_sysext_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"kmod sysext name {name!r} is not a plain extension name")
    return name


def helper_path(name: str) -> str:
    """The helper, relative to the image root: ``usr/libexec/_<name>_modprobe_helper``."""
    return f"usr/libexec/_{check_sysext_name(name)}_modprobe_helper"


def conf_path(name: str) -> str:
    """The modprobe.d file, relative to the image root: ``usr/lib/modprobe.d/10-<name>-kmod-sysext.conf``."""
    return f"usr/lib/modprobe.d/10-{check_sysext_name(name)}-kmod-sysext.conf"


def helper_text(name: str) -> str:
    return HELPER_TEMPLATE.replace("@NAME@", check_sysext_name(name))


def conf_text(name: str, modules: list[str]) -> str:
    """One ``install`` and one ``remove`` line per module (kernel names, each once, sorted)."""
    helper = "/" + helper_path(name)
    lines = []
    for mod in sorted(set(modules)):
        if not _MODULE_RE.fullmatch(mod):
            raise ValueError(f"{mod!r} is not a kernel module name (letters, digits and _)")
        lines.append(f"install {mod} {helper} {mod}")
        lines.append(f"remove {mod} {helper} -r {mod}")
    return "\n".join(lines) + "\n" if lines else ""


def digest() -> str:
    """A digest of the convention (the helper's text): part of an image's content key."""
    return hashlib.sha256(HELPER_TEMPLATE.encode()).hexdigest()[:16]
