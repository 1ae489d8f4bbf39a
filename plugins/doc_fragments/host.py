# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options that say where the host's files are and how to ask update_engine (shared by the modules
that read the host's releases)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  host_root:
    description:
      - Where the host's root file system is visible, for running from a container with the host mounted
        elsewhere. Release files, C(update.conf), C(/proc/cmdline), C(/proc/sys/kernel/osrelease) and
        C(/dev/disk/by-partlabel) are read below it.
    type: path
    default: /
  update_engine_client:
    description:
      - Command (a list of arguments, or a string split like a shell would) that prints update_engine's
        status when given C(-status).
      - Defaults to C({host_root}/usr/bin/update_engine_client), else C(update_engine_client) on PATH.
    type: raw
"""
