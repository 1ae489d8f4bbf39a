#!/usr/bin/python
# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kmod_retire
short_description: Remove the builds of a driver's other versions from a host's archive
version_added: "0.1.0"
description:
  - A host serves one version of each driver. Once O(driver_version) is in place, the builds of every other
    version of O(driver) below O(archive_root) (C(<archive_root>/<driver>/<version>/<kernel>/)) are removed.
  - A build for the running kernel whose modules that kernel has loaded stays (same module name, and the same
    C(srcversion) when the kernel reports one), because the kernel runs that code until the next boot. A later
    run removes it.
  - Images and copies in service are not touched here; M(modulus.kmods.kmod_install) replaces and prunes those.
author:
  - modulus contributors (@modulus)
attributes:
  check_mode:
    support: full
    description: Reports what would be removed; removes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
    support: full
    description: Flatcar Container Linux or legacy CoreOS Container Linux, or a directory laid out like one (O(host_root)).
options:
  driver:
    description: The driver, as in the archive's layout.
    type: str
    required: true
  driver_version:
    description: The version the host keeps.
    type: str
    required: true
  archive_root:
    description: The host's archive, seen from where the module runs (below O(host_root) when that is not C(/)).
    type: path
    default: /opt/modulus/archive
  host_root:
    description: The host's C(/), where C(/proc/modules) and C(/sys/module) tell what is loaded.
    type: path
    default: /
"""

EXAMPLES = r"""
- name: Keep only 550.163.01 of the NVIDIA driver
  modulus.kmods.kmod_retire:
    driver: nvidia
    driver_version: 550.163.01
"""

RETURN = r"""
removed:
  description: The directories removed (or, in check mode, that would be).
  returned: always
  type: list
  elements: str
kept:
  description: Builds of other versions kept because the running kernel has loaded them.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: The build's directory.
      type: str
    version:
      description: Its driver version.
      type: str
    kernel_release:
      description: Its kernel.
      type: str
    reason:
      description: Why it stays.
      type: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.modulus.kmods.plugins.module_utils import identity as idm
from ansible_collections.modulus.kmods.plugins.module_utils._install import retire as rt


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            driver=dict(type="str", required=True),
            driver_version=dict(type="str", required=True),
            archive_root=dict(type="path", default=idm.DEFAULT_ARCHIVE_ROOT),
            host_root=dict(type="path", default="/"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        out = rt.retire(p["archive_root"], p["driver"], p["driver_version"], host_root=p["host_root"],
                        check=module.check_mode)
    except (rt.RetireError, idm.IdentityError) as exc:
        module.fail_json(msg=str(exc), changed=False)
    except OSError as exc:
        module.fail_json(msg=f"{type(exc).__name__}: {exc}", exception=traceback.format_exc(), changed=False)
    module.exit_json(changed=out.changed, removed=out.removed, kept=out.kept)


if __name__ == "__main__":
    main()
