#!/usr/bin/python
# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: flatcar_release_info
short_description: The release and kernel a Flatcar host runs, and the ones it boots into next
version_added: "0.1.0"
description:
  - Reads, from the host alone, what a kernel module build must fit, without downloading anything.
  - The current release comes from C(/usr/share/flatcar/release) (or C(/usr/share/coreos/release) on
    legacy CoreOS Container Linux) and its kernel from the running kernel (C(/proc/sys/kernel/osrelease)).
  - The pending release is the one update_engine has installed and the host boots into after the next
    reboot (C(CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT)). Its version comes from update_engine, or
    from the not-booted USR partition when update_engine reports C(NEW_VERSION=0.0.0), and its kernel
    from that partition's C(lib/modules/), read without mounting it (btrfs, Flatcar since 2021, with
    C(btrfs restore); ext2 of older releases with C(debugfs)), mounted read-only only when that tool is missing.
  - Feed RV(targets) to M(modulus.kmods.kmod_archive) to look a build up in the fleet store, and only
    fetch the developer container with M(modulus.kmods.coreos_devcontainer) when a build is needed.
author:
  - modulus contributors (@modulus)
extends_documentation_fragment:
  - modulus.kmods.host
attributes:
  check_mode:
    support: full
    description: Only reads; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is no difference to show.
  platform:
    platforms: posix
    support: full
    description: Flatcar Container Linux and legacy CoreOS Container Linux, or a directory laid out like one (O(host_root)).
options:
  releases:
    description:
      - Which releases to report in RV(targets). V(pending) is left out when no update waits for a reboot.
    type: list
    elements: str
    choices: [current, pending]
    default: [current, pending]
  update_engine_timeout:
    description: Seconds C(update_engine_client -status) may take before its process group is killed.
    type: float
    default: 60
notes:
  - Needs C(btrfs) (btrfs-progs) or C(debugfs) (e2fsprogs), both on every Flatcar host, or root (a read-only
    loop mount) to read the not-booted USR partition.
seealso:
  - module: modulus.kmods.coreos_devcontainer
  - module: modulus.kmods.kmod_archive
"""

EXAMPLES = r"""
- name: What must the driver fit, now and after the next reboot?
  modulus.kmods.flatcar_release_info:
  register: host

- name: Look each release's build up in the fleet store, downloading nothing else
  modulus.kmods.kmod_archive:
    state: query
    store: s3://gpu-fleet-kmods/flatcar
    identity: "{{ item | combine({'driver': 'nvidia', 'driver_version': '535.104.05'}) }}"
  loop: "{{ host.targets }}"
  loop_control:
    label: "{{ item.os_version }} {{ item.kernel_release }}"
  register: stored
"""

RETURN = r"""
current:
  description: The booted release and the running kernel.
  returned: always
  type: dict
  contains:
    release:
      description: V(current).
      type: str
    os:
      description: C(flatcar), or C(coreos) on legacy CoreOS Container Linux.
      type: str
    board:
      description: Board, such as C(amd64-usr).
      type: str
    os_version:
      description: Release version.
      type: str
      sample: 4459.2.1
    channel:
      description: Release channel from C(update.conf) (null for an update-server group id).
      type: str
    kernel_release:
      description: Kernel release (C(uname -r) of that release).
      type: str
      sample: 6.6.95-flatcar
    kernel_source:
      description: Where the kernel release was read (C(running-kernel), C(usr-partition), or C(unknown)).
      type: str
    pending:
      description: Whether the release is installed but not booted yet.
      type: bool
    usr_partition:
      description: The USR partition the release was read from (pending release only).
      type: str
    note:
      description: Why the kernel release is unknown, when it is.
      type: str
pending:
  description:
    - The release the host boots into next, with its kernel, in the same form as RV(current); null when no
      update waits for a reboot.
    - Its C(kernel_release) is null when the not-booted USR partition cannot be read; its C(note) says why.
      The kernel is then known only from the developer container (M(modulus.kmods.coreos_devcontainer)).
  returned: always
  type: dict
targets:
  description: RV(current) and RV(pending) (when there is one) as a list, in that order, as asked by O(releases).
  returned: always
  type: list
  elements: dict
update_status:
  description: update_engine's status (C(current_op), C(new_version), C(new_size), C(last_checked_time), C(progress)).
  returned: always
  type: dict
  sample: {"current_op": "UPDATE_STATUS_UPDATED_NEED_REBOOT", "new_version": "4459.2.2"}
"""

import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.common.text.converters import to_native  # noqa: E402

from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            host_root=dict(type="path", default="/"),
            update_engine_client=dict(type="raw"),
            releases=dict(type="list", elements="str", choices=["current", "pending"], default=["current", "pending"]),
            update_engine_timeout=dict(type="float", default=60),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        command = fr.command_argv("update_engine_client", p["update_engine_client"])
        found = fr.host_targets(p["host_root"], command, log=module.log, timeout=p["update_engine_timeout"])
    except (fr.ReleaseError, ValueError) as exc:
        module.fail_json(msg=to_native(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear fail_json
        module.fail_json(msg=f"{type(exc).__name__}: {to_native(exc)}", exception=traceback.format_exc())
    current, pending = found["current"], found["pending"]
    targets = [t.as_dict() for t in (current, pending) if t is not None and t.release in p["releases"]]
    status = found["update_status"]
    if pending is not None and not pending.kernel_release:
        module.warn(f"the kernel of the pending release {pending.os_version} is unknown: {pending.note}")
    module.exit_json(changed=False, current=current.as_dict(), pending=pending.as_dict() if pending else None,
                     targets=targets, update_status=status.as_dict() if status else None)


if __name__ == "__main__":
    main()
