#!/usr/bin/python
# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: flatcar_nvidia_service
short_description: Keep Flatcar's own nvidia.service from loading a second NVIDIA driver
version_added: "0.1.0"
description:
  - Every Flatcar image enables C(nvidia.service) (a link in C(/usr), which C(systemctl disable) cannot
    remove). On a host with an NVIDIA GPU, its C(setup-nvidia) builds the driver version of
    C(/usr/share/flatcar/nvidia-metadata) (or C(/etc/flatcar/nvidia-metadata)) into C(/opt/nvidia), writes
    C(/etc/ld.so.conf.d/nvidia.conf) and loads that driver at every boot, unless Flatcar's official
    C(nvidia-drivers-*) extension is merged.
  - This module makes modulus the one owner of the driver. It masks C(nvidia.service)
    (C(/etc/systemd/system/nvidia.service -> /dev/null)), removes the links in C(/etc) that pull it in,
    and removes an C(/etc/ld.so.conf.d/nvidia.conf) that points at another build (anything but what
    M(modulus.kmods.kmod_install) writes there).
  - It looks for Flatcar's official NVIDIA driver extensions, C(nvidia-drivers-*) entries of
    C(/etc/flatcar/enabled-sysext.conf) and C(/usr/share/flatcar/enabled-sysext.conf) (read as Flatcar's
    initrd reads them - C(#) comments, C(-NAME) lines disable) and C(flatcar-nvidia-drivers*) images in
    C(/etc/extensions), C(/run/extensions) and C(/var/lib/extensions). With O(official=refuse) it fails,
    naming the file and the entry. With O(official=defer) it leaves the driver to that extension
    (RV(deferred)) and changes nothing but a stale C(nvidia.conf).
  - C(systemctl) and C(ldconfig) run only when O(host_root) is C(/); below another root the links are
    made and removed directly.
author:
  - modulus contributors (@modulus)
attributes:
  check_mode:
    support: full
    description: Reports in RV(actions) what it would change, and changes nothing.
  diff_mode:
    support: none
    description: The changes are links and one removed file, listed in RV(actions).
  platform:
    platforms: posix
    support: full
    description: Flatcar Container Linux, or a directory laid out like one (O(host_root)).
options:
  host_root:
    description: Where the host's root file system is visible (a container with the host mounted elsewhere).
    type: path
    default: /
  official:
    description:
      - What to do when Flatcar's official NVIDIA driver extension is enabled on the host.
      - V(refuse) - fail, naming the file and the entry that enable it.
      - V(defer) - leave the NVIDIA driver to it; C(nvidia.service) stays as it is (it loads that
        extension's modules), RV(deferred) is true.
    type: str
    choices: [refuse, defer]
    default: refuse
notes:
  - Masking does not unload a driver that C(nvidia.service) loaded in the current boot.
seealso:
  - module: modulus.kmods.kmod_install
"""

EXAMPLES = r"""
- name: Only modulus loads the NVIDIA driver
  modulus.kmods.flatcar_nvidia_service:
  register: nvsvc

- name: Leave the driver to Flatcar's official extension where a host enables one
  modulus.kmods.flatcar_nvidia_service:
    official: defer
  register: nvsvc

- name: Skip modulus's NVIDIA driver there
  ansible.builtin.debug:
    msg: "{{ nvsvc.actions }}"
  when: nvsvc.deferred
"""

RETURN = r"""
masked:
  description: C(nvidia.service) is masked (after the run; in check mode, it would be).
  returned: always
  type: bool
deferred:
  description: An official NVIDIA extension is enabled and O(official=defer); modulus should not install an NVIDIA driver.
  returned: always
  type: bool
official:
  description: The official NVIDIA driver extensions found.
  returned: always
  type: list
  elements: dict
  sample: [{"entry": "nvidia-drivers-535", "file": "/etc/flatcar/enabled-sysext.conf", "line": 2}]
unit:
  description:
    - C(shipped) - the release ships the unit.
    - C(before) - what C(/etc/systemd/system/nvidia.service) was - C(absent), C(masked), C(link) or C(file).
    - C(wants) - links in C(/etc) that pulled the unit in.
  returned: always
  type: dict
removed:
  description: Host paths removed (or that would be, in check mode).
  returned: always
  type: list
  elements: str
ld_so_conf:
  description: C(path), C(removed), the C(lines) it held, C(ldconfig) (it ran and succeeded).
  returned: always
  type: dict
actions:
  description: One line per change, for the run's summary.
  returned: always
  type: list
  elements: str
  sample: ["masked nvidia.service (/etc/systemd/system/nvidia.service -> /dev/null): ..."]
"""

import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.common.text.converters import to_native  # noqa: E402

from ansible_collections.modulus.kmods.plugins.module_utils._host import nvidia_service as ns  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            host_root=dict(type="path", default="/"),
            official=dict(type="str", choices=list(ns.OFFICIAL_CHOICES), default="refuse"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        res = ns.ensure(p["host_root"], official=p["official"], check=module.check_mode)
    except (ns.NvidiaServiceError, ValueError) as exc:
        module.fail_json(msg=to_native(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear fail_json
        module.fail_json(msg=f"{type(exc).__name__}: {to_native(exc)}", exception=traceback.format_exc())
    for warning in res.warnings:
        module.warn(warning)
    module.exit_json(**res.as_dict())


if __name__ == "__main__":
    main()
