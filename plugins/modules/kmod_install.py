#!/usr/bin/python
# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kmod_install
short_description: Put a kernel module build in service, loaded now or staged for the next release
version_added: "0.1.0"
description:
  - Installs a build made by M(modulus.kmods.kmod_build) or pulled by M(modulus.kmods.kmod_archive) (a
    directory holding C(manifest.json)) on a Flatcar or legacy CoreOS Container Linux host. Every file is
    checked against the manifest before anything on the host changes.
  - With O(method=sysext) the build becomes a systemd-sysext image C(modulus-<driver>-<release>) in
    O(extensions_dir). Its C(usr/lib/extension-release.d/extension-release.<name>) holds C(ID=flatcar) and
    C(VERSION_ID=<release>), so systemd merges it only while the host runs that release. The image carries
      the modules under C(usr/lib/modules/<kernel>/updates/modulus/<driver>/), the tools in C(usr/bin), the
      libraries in C(usr/lib64) and the firmware in C(usr/lib/firmware).
  - The image follows Flatcar's convention for extensions with kernel modules, so it never hides the
    kernel's or another extension's modules (Flatcar's C(zfs), a second driver). It ships no
    C(usr/lib/modules/<kernel>/modules.*) index. Instead C(usr/lib/modprobe.d/10-modulus-<driver>-kmod-sysext.conf)
    sends C(modprobe <module>) to C(/usr/libexec/_modulus-<driver>_modprobe_helper), which runs C(depmod) over
    the merged C(/usr) in a private mount namespace and loads the module with C(modprobe --ignore-install).
  - With O(method=tree) the build is copied to C(/opt/modulus/installed/<driver>/<driver_version>/<kernel>)
    and C(/opt/drivers/<driver>) (the original modulus layout) is switched to it atomically;
    C(/etc/ld.so.conf.d/<driver>.conf) is written and C(ldconfig) runs.
  - Both methods install a boot loader, C(/opt/modulus/bin/modulus-load-<driver>) (a plain shell script),
    started by C(modulus-load-<driver>.service) after C(systemd-sysext.service). It loads the build made for
    C(uname -r), so a build staged for the pending release is loaded at its first boot without network or
    compiler.
  - Only C(/etc), C(/opt) and C(/var) below O(host_root) are written. Images and copies are made in a
    temporary directory and renamed into place; a run killed half-way leaves nothing the next run does not sweep.
author:
  - modulus contributors (@modulus)
extends_documentation_fragment:
  - modulus.kmods.host
attributes:
  check_mode:
    support: full
    description: Reports what would be created, switched, pruned or loaded; writes and loads nothing.
  diff_mode:
    support: full
    description: Shows the image or tree (name, release, driver version, content key) before and after.
  platform:
    platforms: posix
    support: full
    description: Flatcar Container Linux (sysext from release 3185), legacy CoreOS Container Linux (tree), or a directory laid out like one (O(host_root)).
options:
  state:
    description:
      - V(present) installs the build for the release it was made for. For the running release that means
        the image is merged (C(systemd-sysext refresh)) or C(/opt/drivers/<driver>) is switched; for another
        release it is the same as V(staged).
      - V(loaded) is V(present) and loads the modules into the running kernel (prerequisites, modules in
        dependency order with O(module_parameters), device nodes, O(verify_command)). The build must be for
        the running kernel. An NVIDIA build on a host without an NVIDIA GPU is installed, not loaded, and the
        result says so without failing.
      - V(staged) only puts the build in place for the next boot of its release; the running system is not touched.
      - V(absent) removes every image, copy and boot file of the driver this module installed. Loaded modules
        stay loaded (RV(still_loaded) lists them).
    type: str
    choices: [present, loaded, staged, absent]
    default: present
  src:
    description:
      - The build directory (holding C(manifest.json)), for example RV(modulus.kmods.kmod_build#module:dest).
      - Defaults to C(<archive_root>/<driver>/<driver_version>/<kernel_release>) from O(identity).
    type: path
  identity:
    description:
      - The build's identity as M(modulus.kmods.kmod_build) returns it; C(driver), C(driver_version) and
        C(kernel_release) name the directory below O(archive_root) when O(src) is not given.
      - With O(state=absent) only C(driver) is needed.
    type: dict
  archive_root:
    description: Directory holding the builds of this host, laid out as C(<driver>/<driver_version>/<kernel_release>).
    type: path
    default: /opt/modulus/archive
  method:
    description:
      - V(auto) picks V(sysext) on Flatcar 3185 and later (per the host's release file) and V(tree) on legacy
        CoreOS Container Linux and older Flatcar releases.
    type: str
    choices: [auto, sysext, tree]
    default: auto
  release:
    description:
      - The OS release (C(VERSION_ID)) the image is bound to. Defaults to the build manifest's C(os_version).
      - For the running or the pending release the build's kernel must be that release's kernel.
    type: str
  module_parameters:
    description:
      - Parameters per module name, each a dict of parameter names and values, or a string of
        C(key=value) words as on a C(modprobe) line. Written to C(/etc/modprobe.d/modulus-<driver>.conf) and passed
        when loading.
    type: dict
    default: {}
  modules:
    description:
      - Which of the build's modules to load (C(-) and C(_) are alike); their dependencies in the build
        are added. Defaults to all of the build's modules, in dependency order.
    type: list
    elements: str
  prerequisites:
    description:
      - Kernel modules of the release loaded with C(modprobe) before the build's.
      - Defaults per driver. For C(nvidia) they are C(ipmi_msghandler), C(ipmi_devintf), C(i2c_core), plus
        C(drm) and C(drm_kms_helper) when C(nvidia-drm) is loaded. Other drivers have none.
    type: list
    elements: str
  device_nodes:
    description:
      - Create the NVIDIA device nodes after loading (C(nvidia-modprobe) when the build ships it, else
        C(mknod) with the majors of C(/proc/devices), one C(/dev/nvidiaN) per GPU of PCI vendor C(10de)).
      - Defaults to true for NVIDIA builds; other drivers have none.
    type: bool
  persistenced:
    description: Start C(nvidia-persistenced) after loading when the build ships it.
    type: bool
    default: false
  verify_command:
    description:
      - Command run after loading; a non-zero exit fails the task. A list of arguments or a string split
        like a shell would. Found in the build's C(bin/) first.
      - Defaults to C(nvidia-smi) for NVIDIA builds that ship it; an empty value runs nothing.
    type: raw
  keep:
    description:
      - How many images (sysext) or copies (tree) of the driver to keep. The ones for the running and the
        pending release are always kept, then the newest. The default keeps the running, the pending and the
        previous one, so an OS rollback finds its build.
    type: int
    default: 3
  extensions_dir:
    description:
      - Where the sysext images go. C(/var/lib/extensions) is where systemd-sysext looks for images managed by
        tools; C(/etc/extensions) is left to the administrator and Flatcar's own extensions.
      - Must be below C(/etc), C(/var) or C(/run).
    type: path
    default: /var/lib/extensions
  sysext_format:
    description:
      - V(auto) picks what the host can make with nothing added. That is V(erofs) when C(mkfs.erofs) is on PATH,
        else V(squashfs) when C(mksquashfs) is, else V(directory). Stock stable and LTS Flatcar hosts have
        neither tool and get a directory extension. An image already in place and up to date keeps its format.
        C(format_reason) in RV(image) says why a format was picked.
      - V(erofs) makes a C(<name>.raw) EROFS image (LZ4HC) and needs C(mkfs.erofs) on the managed host.
      - V(squashfs) makes a compressed C(<name>.raw) image and needs C(mksquashfs) on the managed host.
      - V(directory) places a plain directory extension C(<name>/). It needs no tool and also merges where
        no loop device can be attached (containers), and it is larger on disk.
    type: str
    choices: [auto, erofs, squashfs, directory]
    default: auto
notes:
  - Needs root on the host. O(sysext_format=erofs) and O(sysext_format=squashfs) need their tool on the host;
    V(auto) and V(directory) need none.
  - Loading only happens with O(host_root=/), on the kernel the build was made for.
  - Rollback is O(state=present) with the older build's O(src); the last O(keep) images or copies stay on the host.
seealso:
  - module: modulus.kmods.kmod_build
  - module: modulus.kmods.kmod_archive
  - module: modulus.kmods.flatcar_release_info
"""

EXAMPLES = r"""
- name: Load the driver built for the running release
  modulus.kmods.kmod_install:
    state: loaded
    src: /opt/modulus/archive/nvidia/535.104.05/6.6.95-flatcar
    module_parameters:
      nvidia: {NVreg_PreserveVideoMemoryAllocations: 1}

- name: Stage the build for the pending release, so its first boot has a driver
  modulus.kmods.kmod_install:
    state: staged
    identity: "{{ build.identity }}"

- name: Legacy CoreOS, the original /opt/drivers layout
  modulus.kmods.kmod_install:
    state: loaded
    method: tree
    src: "{{ build.dest }}"

- name: Remove everything of the driver
  modulus.kmods.kmod_install:
    state: absent
    identity: {driver: nvidia}
"""

RETURN = r"""
method:
  description: The method used, C(sysext) or C(tree).
  returned: unless state is absent
  type: str
driver:
  description: Driver name.
  returned: always
  type: str
driver_version:
  description: Driver version of the build.
  returned: unless state is absent
  type: str
kernel_release:
  description: Kernel the build is for.
  returned: unless state is absent
  type: str
release:
  description: The OS release the build is installed for (the image's C(VERSION_ID)).
  returned: unless state is absent
  type: str
running_release:
  description: The release the host runs.
  returned: unless state is absent
  type: str
running_kernel:
  description: The kernel the host runs.
  returned: unless state is absent
  type: str
pending_release:
  description: The release the host boots next, or null.
  returned: unless state is absent
  type: str
identity:
  description: The build's identity, read from its manifest.
  returned: unless state is absent
  type: dict
image:
  description:
    - The sysext image, with C(name), C(path) (as seen on the host), C(format), C(release), C(kernel_release),
      C(driver_version), C(content) (the content key), C(format_reason) (why that format), C(modprobe_conf)
      and C(helper) (the modprobe.d file and the helper in the image), C(created), C(size) (bytes) and
      C(seconds) (time to make it).
  returned: with method sysext
  type: dict
  sample: {"name": "modulus-nvidia-4459.2.2", "path": "/var/lib/extensions/modulus-nvidia-4459.2.2",
           "format": "directory", "format_reason": "auto: neither mkfs.erofs nor mksquashfs is on the host",
           "release": "4459.2.2", "created": true, "size": 134217728}
tree:
  description: The installed copy (C(path), C(driver_version), C(kernel_release), C(content)) and, when switched, C(link) and C(target).
  returned: with method tree
  type: dict
merge:
  description: Whether C(systemd-sysext refresh) ran (C(refreshed)) and otherwise why not (C(reason)).
  returned: with method sysext, and when state is absent and images were removed
  type: dict
load:
  description:
    - The load (state V(loaded) only). C(loaded) is true once the modules are in; C(reason) says why nothing
      was loaded (no NVIDIA GPU, another build in use, not the running system, already loaded).
    - After a load, C(commands) lists every command with its C(rc) and C(output), and C(verify) the verify command.
  returned: when state is loaded
  type: dict
  sample: {"loaded": false, "gpus": [], "reason": "no NVIDIA GPU (PCI vendor 10de) on this host: the build is installed and staged, nothing was loaded"}
load_plan:
  description:
    - The load plan, the same one the boot loader script runs. C(modules) lists the build's modules in load
      order, C(prerequisites) and C(external) the kernel's modules loaded first, and C(steps) every
      C(modprobe) or C(insmod) step with its parameters.
  returned: unless state is absent
  type: dict
boot_loader:
  description: Path of the boot loader script.
  returned: unless state is absent
  type: str
  sample: /opt/modulus/bin/modulus-load-nvidia
pruned:
  description: Images or copies removed because more than O(keep) were there.
  returned: unless state is absent
  type: list
  elements: str
removed:
  description: What O(state=absent) removed (or would remove).
  returned: when state is absent
  type: list
  elements: str
still_loaded:
  description: Modules of the driver still loaded after O(state=absent).
  returned: when state is absent
  type: list
  elements: str
actions:
  description: One line per change made (or, in check mode, that would be made).
  returned: always
  type: list
  elements: str
"""

import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils import identity as idm  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils import install  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils.sysext import SysextError  # noqa: E402


def request_from(p: dict) -> install.Request:
    ident = p["identity"] or {}
    src = p["src"]
    driver = None
    if ident:
        driver = idm.check_name("identity.driver", ident.get("driver"))
        if not src and p["state"] != "absent":
            src = idm.build_dir(p["archive_root"], ident)
    return install.Request(
        state=p["state"], src=src, driver=driver, host_root=p["host_root"], method=p["method"], release=p["release"],
        module_parameters=p["module_parameters"], modules=p["modules"], prerequisites=p["prerequisites"],
        device_nodes=p["device_nodes"], persistenced=p["persistenced"],
        verify_command=p["verify_command"], keep=p["keep"], extensions_dir=p["extensions_dir"],
        sysext_format=p["sysext_format"],
        update_engine_client=fr.command_argv("update_engine_client", p["update_engine_client"]))


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="present", choices=list(install.STATES)),
            src=dict(type="path"),
            identity=dict(type="dict"),
            archive_root=dict(type="path", default=idm.DEFAULT_ARCHIVE_ROOT),
            host_root=dict(type="path", default="/"),
            update_engine_client=dict(type="raw"),
            method=dict(type="str", default="auto", choices=list(install.METHODS)),
            release=dict(type="str"),
            module_parameters=dict(type="dict", default={}),
            modules=dict(type="list", elements="str"),
            prerequisites=dict(type="list", elements="str"),
            device_nodes=dict(type="bool"),
            persistenced=dict(type="bool", default=False),
            verify_command=dict(type="raw"),
            keep=dict(type="int", default=3),
            extensions_dir=dict(type="path", default="/var/lib/extensions"),
            sysext_format=dict(type="str", default="auto", choices=["auto", "erofs", "squashfs", "directory"]),
        ),
        required_one_of=[("src", "identity")],
        supports_check_mode=True,
    )
    p = module.params
    try:
        req = request_from(p)
        out = install.run(req, check=module.check_mode, log=module.log)
    except (install.InstallError, idm.IdentityError, fr.ReleaseError, SysextError, ValueError) as exc:
        module.fail_json(msg=str(exc), changed=False, actions=[])
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear fail_json
        module.fail_json(msg=f"{type(exc).__name__}: {exc}", exception=traceback.format_exc(), changed=False, actions=[])
    for warning in out.warnings:
        module.warn(warning)
    result = dict(out.result, changed=out.changed, actions=out.actions)
    if module._diff and out.changed:
        result["diff"] = dict(before=out.before, after=out.after)
    if out.failed:
        module.fail_json(msg=out.failed, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
