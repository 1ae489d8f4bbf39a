#!/usr/bin/python
# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kmod_build
short_description: Compile kernel modules (NVIDIA or any Kbuild source) inside a developer container
version_added: "0.1.0"
description:
  - Compiles out-of-tree kernel modules inside a Flatcar (or legacy CoreOS Container Linux) developer
    container image, for the kernel of that image, and lays the result out the way the original
    C(modulus) tool did, C(DEST/lib/modules/<kver>/*.ko), C(DEST/lib/*.so*), C(DEST/bin/*), with
    C(DEST/manifest.json) and C(DEST/build.log).
  - The C(nvidia) recipe takes NVIDIA's C(.run) installer (downloaded from NVIDIA by a URL template,
    a mirror URL, or a local file), extracts it with its own self-extractor
    (C(--extract-only --target)) inside the container, builds C(kernel/) (proprietary) or
    C(kernel-open/) (open) with C(make KERNEL_UNAME=<kver> modules) the way DKMS does, and collects the
    userspace libraries and tools its C(.manifest) lists.
  - The C(generic) recipe builds any Kbuild out-of-tree source (a directory, a tarball path or URL, or a
    git URL and ref) with C(make -C /lib/modules/<kver>/build M=<src> modules) plus O(make_args).
  - Before the build is called good every C(.ko) is read (ELF C(.modinfo) and C(__versions)) and its
    vermagic must name the target kernel and every imported symbol CRC must match the kernel's
    C(Module.symvers) (or the build's own for symbols of sibling modules). A mismatch fails and names
    the symbols.
  - Idempotent. When O(dest) holds a manifest for the same inputs and its files verify, nothing is
    built and no container starts. A failed build leaves C(DEST.failed.json) and C(DEST.failed.log)
    next to O(dest). Later runs with the same inputs fail at once until the inputs change or
    O(force=true).
  - The new build is assembled in a temporary directory next to O(dest) and renamed into place. The
    previous O(dest) stays until then.
  - Legacy images without C(/lib/modules/<kver>/build) get kernel sources prepared the old way
    (C(emerge-gitclone), C(emerge -gKv coreos-sources), C(make modules_prepare)), which the build log says.
author:
  - modulus contributors (@modulus)
attributes:
  check_mode:
    support: full
    description: Reports whether a build would run; downloads and builds nothing.
  diff_mode:
    support: full
    description: Shows the driver, version, kernel and inputs checksum before and after.
options:
  image:
    description:
      - Path of the developer container image (the uncompressed GPT disk image), for example
        RV(modulus.kmods.coreos_devcontainer#module:image_path). It is never modified.
      - In check mode it may be missing (not fetched yet); the module then reports what it would build
        from O(kernel_release) and O(os_version).
    type: path
    required: true
  recipe:
    description: What to build.
    type: str
    required: true
    choices: [nvidia, generic]
  dest:
    description:
      - Output directory. It is replaced as a whole when a new build succeeds.
      - Defaults to C(<archive_root>/<driver>/<driver_version>/<kernel_release>), the layout every module
        of this collection uses, so the builds for the running and the pending kernel live side by side.
    type: path
  archive_root:
    description: Directory holding the builds of this host, laid out as described in O(dest).
    type: path
    default: /opt/modulus/archive
  kernel_release:
    description:
      - Kernel release to build for. Defaults to the only kernel under C(/usr/lib/modules) of the image.
      - C(uname -r) inside the container is the host's kernel, so the kernel is always named explicitly.
    type: str
  os_version:
    description:
      - Release of the developer container. When given, the image must be of this release.
      - Only needed in check mode before the image is fetched, to name the build that would be made.
    type: str
  board:
    description:
      - Board of the developer container, such as C(amd64-usr). Read from the image; only used in check
        mode before the image is fetched.
    type: str
  driver_version:
    description:
      - With O(recipe=nvidia), the driver version, such as C(535.104.05) (required).
      - With O(recipe=generic), a version string recorded in the manifest (default C(0)).
    type: str
    aliases: [version]
  driver:
    description:
      - Driver name recorded in the manifest; required with O(recipe=generic).
      - With O(recipe=nvidia) it is always C(nvidia).
    type: str
    aliases: [name]
  arch:
    description: Architecture of the NVIDIA download. Defaults from the image board (C(amd64-usr) is C(x86_64)).
    type: str
    choices: [x86_64, aarch64]
  source:
    description:
      - With O(recipe=nvidia), a URL (C(https), C(http), C(file)) or an absolute path of the C(.run).
        Defaults to O(url_template) filled in.
      - With O(recipe=generic), an absolute path of a source directory or tarball, a tarball URL, or a
        git URL (with O(git_ref), or a C(git+) prefix, or a C(.git) suffix).
    type: str
  url_template:
    description:
      - Download URL of the NVIDIA C(.run) when O(source) is not given. C({version}), C({arch}) and
        C({branch}) are replaced.
      - NVIDIA's datacenter (tesla) location is
        C(https://us.download.nvidia.com/tesla/{version}/NVIDIA-Linux-{arch}-{version}.run).
    type: str
    default: https://us.download.nvidia.com/XFree86/Linux-{arch}/{version}/NVIDIA-Linux-{arch}-{version}.run
  checksum:
    description:
      - SHA-256 of the source file (C(.run) or tarball), optionally prefixed with C(sha256:). Enforced when given.
      - It also identifies a downloaded source for idempotence; without it a URL source is identified by its URL.
    type: str
  module_type:
    description:
      - NVIDIA only. V(proprietary) builds C(kernel/), V(open) builds C(kernel-open/).
      - V(auto) picks V(open) from driver branch 560 on (NVIDIA's default there, for Turing and newer
        GPUs) and V(proprietary) before (the only choice before R515, NVIDIA's recommendation up to R555).
        M(modulus.kmods.kmod_archive) resolves V(auto) the same way, so a lookup finds the build.
      - Builds of other drivers have one variant, recorded as C(default).
    type: str
    default: auto
    choices: [proprietary, open, auto]
    aliases: [kernel_module_type]
  git_ref:
    description: Branch, tag or commit to check out with a git O(source).
    type: str
  subdir:
    description: Directory inside a generic source that holds the Kbuild file.
    type: str
    default: ""
  make_args:
    description: Extra C(make) arguments (C(VAR=value), options or targets).
    type: list
    elements: str
    default: []
  modules:
    description:
      - Names of the modules the build must produce (C(-) and C(_) are alike). A missing one fails the build.
      - Required with O(recipe=generic). Defaults to C(nvidia), C(nvidia-uvm), C(nvidia-modeset), C(nvidia-drm) with O(recipe=nvidia).
    type: list
    elements: str
  signing_key:
    description:
      - Path of the private key to sign the modules with (Secure Boot), using the kernel's own
        C(scripts/sign-file) inside the container. Requires O(signing_cert).
      - The key is copied into a private temporary directory, bound read-only and removed after the build.
    type: path
  signing_cert:
    description: Path of the X.509 certificate (PEM or DER) that goes with O(signing_key).
    type: path
  signing_hash:
    description: Digest algorithm for C(sign-file).
    type: str
    default: sha256
    choices: [sha256, sha384, sha512]
  channel:
    description: Release channel recorded in the manifest (for example C(stable)).
    type: str
  force:
    description: Build even when O(dest) is up to date or a failure marker exists for these inputs.
    type: bool
    default: false
  jobs:
    description: Parallel make jobs; C(0) uses every CPU the container sees.
    type: int
    default: 0
  run_timeout:
    description: Seconds the build may take inside the container before its whole process group is killed.
    type: int
    default: 3600
    aliases: [timeout]
  run_method:
    description: How to run the container (see M(modulus.kmods.coreos_devcontainer)).
    type: str
    default: auto
    choices: [auto, image, overlay, chroot]
  legacy_prepare:
    description:
      - V(auto) prepares emerged kernel sources only when the image has no C(/lib/modules/<kver>/build);
        V(always) forces it; V(never) fails instead.
    type: str
    default: auto
    choices: [auto, always, never]
  validate_certs:
    description: Verify TLS certificates of downloads.
    type: bool
    default: true
  network_timeout:
    description:
      - Seconds a download may go without progress before it counts as failed (the same meaning as in
        M(modulus.kmods.coreos_devcontainer)); a git clone may take ten times this in all.
    type: int
    default: 600
    aliases: [download_timeout]
notes:
  - Needs root on the host (loop devices and systemd-nspawn, see M(modulus.kmods.coreos_devcontainer)).
  - NVIDIA builds need about 1.5 GB of free space next to O(dest).
seealso:
  - module: modulus.kmods.coreos_devcontainer
  - module: modulus.kmods.kmod_archive
"""

EXAMPLES = r"""
- name: NVIDIA driver for the kernel of the pending release
  modulus.kmods.kmod_build:
    image: "{{ devc.image_path }}"
    recipe: nvidia
    driver_version: 535.104.05
    module_type: proprietary
  register: build
  # the build lands in /opt/modulus/archive/nvidia/535.104.05/<kernel_release>/

- name: Same, from a local mirror, checksum pinned, modules signed for Secure Boot
  modulus.kmods.kmod_build:
    image: "{{ devc.image_path }}"
    recipe: nvidia
    driver_version: 550.54.14
    source: https://mirror.example.com/nvidia/NVIDIA-Linux-x86_64-550.54.14.run
    checksum: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
    signing_key: /etc/modulus/mok.key
    signing_cert: /etc/modulus/mok.crt

- name: Any Kbuild module from git
  modulus.kmods.kmod_build:
    image: "{{ devc.image_path }}"
    recipe: generic
    driver: v4l2loopback
    driver_version: 0.13.2
    source: https://github.com/umlaeute/v4l2loopback.git
    git_ref: v0.13.2
    modules: [v4l2loopback]

- name: Hand the build's identity to the store
  modulus.kmods.kmod_archive:
    state: present
    store: s3://gpu-fleet-kmods/flatcar
    src: "{{ build.dest }}"
    identity: "{{ build.identity }}"
"""

RETURN = r"""
dest:
  description: The output directory.
  returned: always
  type: str
  sample: /opt/modulus/archive/nvidia/535.104.05/6.6.95-flatcar
identity:
  description:
    - What names the build, the keys M(modulus.kmods.kmod_archive) takes as O(modulus.kmods.kmod_archive#module:identity).
    - Returned in check mode and when the build is up to date too.
  returned: unless the options are invalid
  type: dict
  contains:
    os:
      description: OS of the developer container (C(flatcar), or C(coreos) for legacy CoreOS Container Linux).
      type: str
    board:
      description: Board, such as C(amd64-usr).
      type: str
    os_version:
      description: Release of the developer container (null in check mode with no image and no O(os_version)).
      type: str
    kernel_release:
      description: Kernel the modules are built for.
      type: str
    driver:
      description: Driver name.
      type: str
    driver_version:
      description: Driver version.
      type: str
    module_type:
      description: C(proprietary) or C(open) for NVIDIA, C(default) for other drivers.
      type: str
    signer:
      description: SHA-256 fingerprint of the module signing certificate, null for unsigned builds.
      type: str
  sample: {"os": "flatcar", "board": "amd64-usr", "os_version": "4459.2.1", "kernel_release": "6.6.95-flatcar",
           "driver": "nvidia", "driver_version": "535.104.05", "module_type": "proprietary", "signer": null}
kernel_release:
  description: Kernel the modules were built for.
  returned: success
  type: str
  sample: 6.1.0-50-amd64
driver:
  description: Driver name.
  returned: success
  type: str
  sample: nvidia
driver_version:
  description: Driver version.
  returned: success
  type: str
  sample: 535.261.03
module_type:
  description: C(proprietary) or C(open) for NVIDIA, C(default) for other drivers.
  returned: success
  type: str
inputs_sha256:
  description: Checksum of everything that determines the build (source identity, kernel, image release, options).
  returned: success
  type: str
source_sha256:
  description: SHA-256 of the source that was built (the C(.run), the tarball or the source tree).
  returned: when a build exists
  type: str
modules:
  description: The modules built.
  returned: when a build exists
  type: list
  elements: dict
  contains:
    name:
      description: Module name from C(.modinfo).
      type: str
    file:
      description: Path relative to O(dest).
      type: str
    size:
      description: File size in bytes.
      type: int
    vermagic:
      description: The module's vermagic string.
      type: str
    depends:
      description: Modules it depends on.
      type: list
      elements: str
    signer:
      description: Signer of the appended signature (as C(modinfo) prints it), or null.
      type: str
    sig_key:
      description: Key id (certificate serial) of the signature, or null.
      type: str
manifest:
  description: The content of C(DEST/manifest.json).
  returned: when a build exists
  type: dict
build_log:
  description: Path of the build log (C(DEST/build.log), or C(DEST.failed.log) after a failure).
  returned: when a build ran or exists
  type: str
timings:
  description: Seconds spent preparing the source, in the container, checking and staging, installing and cleaning up.
  returned: when a build ran
  type: dict
  sample: {"prepare": 0.2, "container": 110.5, "check_and_stage": 1.1, "install_and_cleanup": 0.9}
reason:
  description:
    - Why the module did or did not build (C(up to date), C(inputs changed), C(force) ...).
    - For a failed run, what failed and whether it is remembered; it starts with C(build failed) (then the
      failure, for example C(compile error) or C(download failed), and either where it is remembered or
      C(transient) and not remembered) or with C(known failure) (a remembered failure, nothing was run).
  returned: always
  type: str
duration:
  description:
    - Seconds the whole build took (0 when nothing was built). For a failed run, the seconds it ran
      until it failed (a known failure fails within a fraction of a second).
  returned: always
  type: float
failure:
  description:
    - What failed, for a failed build. C(kind) is one of C(compile), C(missing_module), C(abi), C(source),
      C(build) (remembered), C(download), C(git), C(timeout), C(no_space), C(killed), C(error) (transient, not remembered).
    - C(remembered) tells whether the failure is in C(DEST.failed.json) (the same inputs then fail at once,
      C(known=true), until they change or O(force=true)); C(errors) holds the compiler's first error lines.
  returned: when the build failed
  type: dict
  sample: {"kind": "compile", "remembered": true, "known": false, "marker": "/opt/modulus/archive/x.failed.json",
           "errors": ["/modulus/work/src/modulus_hello.c:20:18: error: expected ';' before 'this'"]}
swept:
  description:
    - What runs that died (killed, crashed) had left beside O(dest) and this run removed before it started,
      one line each, for example C(removed leftover /opt/x/.dest.build-1234-abcd), C(released leftover mount ...),
      C(killed leftover process ...) or C(kept leftover ...) with the reason.
  returned: unless in check mode or the options are invalid
  type: list
  elements: str
"""

import os  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.modulus.kmods.plugins.module_utils import identity as idm  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils import (
    imageinfo,  # noqa: E402
    kmodbuild,  # noqa: E402
)


def request_from(params: dict, dest: str) -> kmodbuild.BuildRequest:
    signing = None
    key, cert = params["signing_key"], params["signing_cert"]
    if key:
        for opt, path in (("signing_key", key), ("signing_cert", cert)):
            if not path or not os.path.isfile(path):
                raise kmodbuild.InputError(f"{opt}={path!r} is not a readable file")
        signing = kmodbuild.SigningSpec(key_path=key, cert_path=cert, hash_algo=params["signing_hash"],
                                        cert_fingerprint=kmodbuild.cert_fingerprint(cert))
    return kmodbuild.BuildRequest(
        recipe=params["recipe"], image=params["image"], dest=dest,
        kernel_release=params["kernel_release"], version=params["driver_version"], name=params["driver"],
        arch=params["arch"], source=params["source"], url_template=params["url_template"],
        checksum=params["checksum"], kernel_module_type=params["module_type"], git_ref=params["git_ref"],
        subdir=params["subdir"] or "", make_args=list(params["make_args"] or []), modules=params["modules"],
        signing=signing, force=params["force"], timeout=float(params["run_timeout"]), jobs=params["jobs"],
        run_method=params["run_method"], legacy_prepare=params["legacy_prepare"], channel=params["channel"],
        validate_certs=params["validate_certs"], download_timeout=float(params["network_timeout"]),
    )


def wanted_identity(params: dict, kernel_release: str | None) -> dict:
    """The identity the options name, before the image is read (check mode with no image)."""
    nvidia = params["recipe"] == "nvidia"
    return idm.make_identity(
        os="flatcar", board=params["board"] or "amd64-usr", os_version=params["os_version"],
        kernel_release=kernel_release, driver="nvidia" if nvidia else params["driver"],
        driver_version=params["driver_version"] or ("" if nvidia else "0"), module_type=params["module_type"],
        signer=kmodbuild.cert_fingerprint(params["signing_cert"]) if params["signing_cert"] else None,
        require=("kernel_release", "driver", "driver_version"))


def identity_of(resolved: kmodbuild.Resolved) -> dict:
    """The identity of a resolved build (read from the image)."""
    release = resolved.image_release or {}
    os_id = (release.get("ID") or ("coreos" if release.get("COREOS_RELEASE_VERSION") else "flatcar")).lower()
    return idm.make_identity(
        os=os_id, board=resolved.board or "amd64-usr", os_version=resolved.image_version,
        kernel_release=resolved.kernel_release, driver=resolved.driver, driver_version=resolved.driver_version,
        module_type=resolved.module_type or idm.DEFAULT_MODULE_TYPE,
        signer=resolved.req.signing.cert_fingerprint if resolved.req.signing else None,
        require=("kernel_release", "driver", "driver_version"))


def default_dest(params: dict) -> str:
    """<archive_root>/<driver>/<driver_version>/<kernel_release>; the kernel from the image when not given."""
    kver = params["kernel_release"]
    if not kver:
        if not os.path.isfile(params["image"]):
            raise kmodbuild.InputError(f"image={params['image']!r} is not a file; set kernel_release (or dest)")
        kernels = list(imageinfo.image_info(params["image"]).kernel_releases)
        if len(kernels) != 1:
            raise kmodbuild.InputError("image={!r} holds {} kernels ({}); set kernel_release".format(
                params["image"], len(kernels), ", ".join(kernels) or "no"))
        kver = kernels[0]
    return idm.build_dir(params["archive_root"], wanted_identity(params, kver))


def check_without_image(module: AnsibleModule, result: dict) -> None:
    """Check mode before the developer container is fetched: say what would be built."""
    p = module.params
    ident = wanted_identity(p, p["kernel_release"])
    result.update(changed=True, identity=ident, kernel_release=ident["kernel_release"], driver=ident["driver"],
                  driver_version=ident["driver_version"], module_type=ident["module_type"],
                  reason=f"would fetch the developer container and build (image={p['image']!r} is not there yet)")
    if module._diff:
        result["diff"] = dict(before=kmodbuild.summary(kmodbuild.read_manifest(result["dest"])),
                              after={k: ident[k] for k in ("kernel_release", "driver", "driver_version", "module_type")})
    module.exit_json(**result)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            image=dict(type="path", required=True),
            recipe=dict(type="str", required=True, choices=["nvidia", "generic"]),
            dest=dict(type="path"),
            archive_root=dict(type="path", default=idm.DEFAULT_ARCHIVE_ROOT),
            kernel_release=dict(type="str"),
            os_version=dict(type="str"),
            board=dict(type="str"),
            driver_version=dict(type="str", aliases=["version"]),
            driver=dict(type="str", aliases=["name"]),
            arch=dict(type="str", choices=["x86_64", "aarch64"]),
            source=dict(type="str"),
            url_template=dict(type="str", default=kmodbuild.NVIDIA_URL_TEMPLATE),
            checksum=dict(type="str"),
            module_type=dict(type="str", default="auto", choices=["proprietary", "open", "auto"],
                             aliases=["kernel_module_type"]),
            git_ref=dict(type="str"),
            subdir=dict(type="str", default=""),
            make_args=dict(type="list", elements="str", default=[]),
            modules=dict(type="list", elements="str"),
            signing_key=dict(type="path", no_log=False),
            signing_cert=dict(type="path"),
            signing_hash=dict(type="str", default="sha256", choices=["sha256", "sha384", "sha512"]),
            channel=dict(type="str"),
            force=dict(type="bool", default=False),
            jobs=dict(type="int", default=0),
            run_timeout=dict(type="int", default=3600, aliases=["timeout"]),
            run_method=dict(type="str", default="auto", choices=["auto", "image", "overlay", "chroot"]),
            legacy_prepare=dict(type="str", default="auto", choices=["auto", "always", "never"]),
            validate_certs=dict(type="bool", default=True),
            network_timeout=dict(type="int", default=600, aliases=["download_timeout"]),
        ),
        required_if=[("recipe", "nvidia", ("driver_version",)), ("recipe", "generic", ("driver", "source", "modules"))],
        required_together=[("signing_key", "signing_cert")],
        supports_check_mode=True,
    )
    p = module.params
    started = time.monotonic()
    result: dict = dict(changed=False, dest=p["dest"], reason="", duration=0.0)
    try:
        if p["recipe"] == "nvidia" and p["driver"] not in (None, "nvidia"):
            raise kmodbuild.InputError(f"driver={p['driver']!r}: the nvidia recipe always builds driver nvidia")
        if p["board"]:
            idm.check_board("board", p["board"])
        if p["os_version"]:
            idm.check_os_version("os_version", p["os_version"])
        if module.check_mode and not os.path.exists(p["image"]):
            result["dest"] = p["dest"] or idm.build_dir(p["archive_root"], wanted_identity(p, p["kernel_release"]))
            check_without_image(module, result)
        result["dest"] = dest = p["dest"] or default_dest(p)
        req = request_from(p, dest)
        resolved, up_to_date, existing, why = kmodbuild.plan(req)
        ident = identity_of(resolved)
    except (kmodbuild.InputError, idm.IdentityError) as exc:
        module.fail_json(msg=str(exc), **result)
    except Exception as exc:  # image unreadable, debugfs missing ...
        module.fail_json(msg=f"cannot inspect image={p['image']!r}: {exc}", exception=traceback.format_exc(), **result)
    if p["os_version"] and ident["os_version"] != p["os_version"]:
        module.fail_json(msg=f"os_version={p['os_version']!r} but image={p['image']!r} is release {ident['os_version']}",
                         **result)

    result.update(identity=ident, kernel_release=resolved.kernel_release, driver=resolved.driver,
                  driver_version=resolved.driver_version, module_type=ident["module_type"],
                  inputs_sha256=resolved.inputs_sha256, reason=why)
    marker = None if up_to_date else kmodbuild.known_failure(resolved)
    if (up_to_date or marker) and not module.check_mode:
        # nothing is built: still remove what killed runs left beside dest (when no build runs now)
        swept = kmodbuild.sweep_if_idle(dest, module.log)
        result["swept"] = swept.lines() if swept else []
    if up_to_date:
        result.update(modules=existing.get("modules", []), manifest=existing,
                      source_sha256=existing.get("source_sha256"), build_log=f"{dest}/build.log")
        module.exit_json(**result)

    if marker:
        kind = marker.get("kind") or "build"
        result.update(build_log=marker.get("log"), duration=round(time.monotonic() - started, 3),
                      reason="known failure: " + kmodbuild.FAILURE_TEXT.get(kind, kind),
                      failure=dict(kind=kind, remembered=True, errors=marker.get("errors") or [],
                                   marker=kmodbuild.marker_paths(dest)[0], known=True))
        module.fail_json(msg=kmodbuild.known_failure_message(dest, marker), **result)

    before = kmodbuild.summary(existing)
    after = {"kernel_release": resolved.kernel_release, "driver": resolved.driver,
             "driver_version": resolved.driver_version, "module_type": ident["module_type"],
             "inputs_sha256": resolved.inputs_sha256}
    if module._diff:
        result["diff"] = dict(before=before, after=after)
    result["changed"] = True
    if module.check_mode:
        result["reason"] = f"would build: {why}"
        module.exit_json(**result)

    swept_lines: list = []
    result["swept"] = swept_lines
    try:
        out = kmodbuild.run_build(resolved, log=module.log, swept=swept_lines)
    except kmodbuild.BuildError as exc:
        result.update(changed=False, build_log=exc.log_path, duration=round(time.monotonic() - started, 3),
                      reason=kmodbuild.failure_reason(exc),
                      failure=dict(kind=exc.kind, remembered=exc.remembered, errors=exc.errors, marker=exc.marker,
                                   known=False))
        tail = exc.log_tail.strip()[-3000:]
        module.fail_json(msg=f"{exc.msg}\n--- end of the build log ---\n{tail}" if tail else exc.msg, **result)
    except kmodbuild.InputError as exc:
        result.update(changed=False, duration=round(time.monotonic() - started, 3), reason=f"bad input: {exc}")
        module.fail_json(msg=str(exc), **result)
    except Exception as exc:
        result.update(changed=False, duration=round(time.monotonic() - started, 3),
                      reason=f"build failed: {type(exc).__name__} (not remembered)",
                      failure=dict(kind="error", remembered=False, errors=[], marker=None, known=False))
        module.fail_json(msg=f"build failed: {exc}", exception=traceback.format_exc(), **result)
    manifest = out.manifest or {}
    result["changed"] = out.changed
    result.update(modules=manifest.get("modules", []), manifest=manifest, source_sha256=manifest.get("source_sha256"),
                  build_log=out.log_path, duration=round(out.duration, 3), reason=out.reason, timings=out.timings)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
