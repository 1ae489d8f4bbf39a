#!/usr/bin/python
# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: coreos_devcontainer
short_description: Fetch, verify, cache and run the Flatcar (or CoreOS) developer container
version_added: "0.1.0"
description:
  - Resolves a Flatcar Container Linux release (the booted one, the one the host reboots into next,
    or an explicit version) from the host's release files and C(update_engine_client -status).
  - Downloads the developer container of that release in a single streaming pass. While the bytes arrive
    they are checked against the detached OpenPGP signature (isolated keyring holding only O(verify_key)),
    decompressed (C(lbzip2) on all cores when installed, else Python's bz2) and written sparse to a
    temporary file, which is renamed into the cache only when the signature is good, decompression ended
    cleanly and the image has its C(ROOT) partition.
  - Caches images per board and version, keeps the O(keep) newest and removes a version with O(state=absent).
    A second run with a verified image in the cache touches no network and reports no change.
  - Reports the kernel release(s) inside the image and the image's own release file, read without mounting.
  - Optionally runs O(command) inside the image (C(systemd-nspawn --image) where systemd runs the host,
    otherwise the C(ROOT) partition loop-mounted read-only under a tmpfs overlay with C(systemd-nspawn -D),
    or a chroot). The cached image is never modified; every mount and loop device is released.
  - Legacy CoreOS Container Linux hosts are recognised (C(/usr/share/coreos/release)); their servers are
    gone, so point O(url_template) or O(mirrors) at a copy.
author:
  - modulus contributors (@modulus)
extends_documentation_fragment:
  - modulus.kmods.host
requirements:
  - gpg (GnuPG 2) on the managed node
  - debugfs (e2fsprogs) on the managed node
  - lbzip2 (optional, faster decompression on several cores)
  - systemd-nspawn, losetup and mount for O(command) (root)
attributes:
  check_mode:
    support: full
    description: Reports what would be downloaded (C(would_download), C(destination)) or removed; downloads and runs nothing.
  diff_mode:
    support: full
    description: Shows the cached versions of the board before and after (downloads, removals, pruning).
options:
  release:
    description:
      - V(current) is the booted release (C(/usr/share/flatcar/release), or C(/usr/share/coreos/release) on legacy hosts).
      - V(pending) is the release update_engine has installed and the host boots into next
        (C(CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT)). When update_engine reports C(NEW_VERSION=0.0.0)
        (it restarted after applying the update), the version is read from the os-release of the
        not-booted USR partition. When no update waits for a reboot, V(pending) resolves to the current
        release and the module returns RV(pending=false).
      - Any other value is an explicit version such as C(4459.2.1).
    type: str
    default: current
  state:
    description:
      - V(present) makes sure the verified image is in the cache (and runs O(command) if given).
      - V(absent) removes the cached image of that release.
    type: str
    choices: [present, absent]
    default: present
  channel:
    description:
      - Release channel (V(alpha), V(beta), V(stable), V(lts)) used in the URL templates.
      - Defaults to C(GROUP) from C(/etc/flatcar/update.conf), then C(/usr/share/flatcar/update.conf)
        (frozen LTS streams such as C(lts-2022) map to V(lts)), else V(stable).
    type: str
  board:
    description: Board such as V(amd64-usr) or V(arm64-usr). Defaults to the host's release file.
    type: str
  url_template:
    description:
      - Base URL of a release, with placeholders C({channel}), C({board}), C({version}), C({arch}) and C({group}).
        C(https://), C(http://) and C(file://) are supported. The image and C(.sig) are fetched below it.
    type: str
    default: https://{channel}.release.flatcar-linux.net/{board}/{version}
  mirrors:
    description: Further base URL templates tried in order when the previous location answers 404.
    type: list
    elements: str
    default: []
  fallback_url_template:
    description:
      - Tried last, when the channel host and the mirrors answer 404 (releases not yet on the channel host).
        Set to an empty string to disable.
    type: str
    default: https://bincache.flatcar-linux.net/images/{arch}/{version}
  image_name:
    description:
      - File name of the compressed image. Defaults to C(flatcar_developer_container.bin.bz2), or
        C(coreos_developer_container.bin.bz2) on legacy CoreOS hosts.
    type: str
  verify_key:
    description:
      - OpenPGP public key the image must be signed with, as armored text or the path of a key file.
      - Defaults to the Flatcar image signing key shipped in the collection (primary fingerprint
        C(F88CFEDEFF29A5B4D9523864E25D9AED0593B34A)). Its signing subkey rotates about once a year;
        when the subkey that made a signature has expired, O(key_url) supplies a current copy.
    type: str
  key_url:
    description:
      - Where to fetch a current copy of the verification key when the (sub)key that made the image's
        signature has expired (gpg reports C(EXPKEYSIG)). C(https://), C(http://) and C(file://) are
        supported, for example a mirror or a copy on an air-gapped site.
      - The copy is accepted only if every primary key in it has one of the expected (pinned) fingerprints
        (O(verify_fingerprint), else the primary keys of O(verify_key) or the bundled key); new subkeys and
        expiry dates count only with a valid binding signature of that primary key. Anything else is refused
        and the task fails.
      - An accepted copy is merged into the private keyring, the signature is checked again, and the copy is
        cached as C({cache_dir}/keys/<fingerprint>.asc), so later runs use it without fetching it again.
      - Set to an empty string to disable the refresh; an expired signing key then fails the task.
    type: str
    default: https://www.flatcar.org/security/image-signing-key/Flatcar_Image_Signing_Key.asc
  verify_fingerprint:
    description:
      - Primary key fingerprint(s) a good signature must come from. Defaults to the Flatcar key's with
        the shipped key, and to every primary key in O(verify_key) otherwise.
    type: list
    elements: str
    default: []
  cache_dir:
    description: Image cache, laid out C({cache_dir}/{board}/{version}/). Defaults to C({host_root}/var/cache/modulus/devcontainer).
    type: path
  keep:
    description: Keep this many newest versions per board (the requested and the booted ones are never pruned); V(0) keeps all.
    type: int
    default: 3
  network_timeout:
    description: Seconds a download may go without progress before it counts as failed.
    type: float
    default: 60
    aliases: [timeout]
  retries:
    description: How many times a transient failure (connection reset or refused, short read, timeout, HTTP 5xx) restarts the download.
    type: int
    default: 3
  retry_delay:
    description: Seconds before the first retry; doubles on each further retry (at most 30).
    type: float
    default: 2
  validate_certs:
    description: Verify TLS certificates. The OpenPGP signature is checked either way.
    type: bool
    default: true
  min_free_space:
    description:
      - Bytes that must be free in O(cache_dir) before downloading; the check uses the larger of this and
        four times the compressed size.
    type: int
    default: 1073741824
  decompressor:
    description: V(auto) uses C(lbzip2) when installed and Python's bz2 otherwise.
    type: str
    choices: [auto, lbzip2, python]
    default: auto
  fetch_log:
    description: File that progress lines are appended to (also sent to syslog). Defaults to C({cache_dir}/fetch.log).
    type: path
  command:
    description:
      - Command to run inside the image after it is ready (a list of arguments, or a string split like a shell would).
      - The module fails when it exits non-zero or times out.
    type: raw
  binds_ro:
    description: Host paths bound read-only into the container, as C(HOST_PATH) or C(HOST_PATH:CONTAINER_PATH).
    type: list
    elements: str
    default: []
  binds_rw:
    description: Host paths bound read-write into the container, as C(HOST_PATH) or C(HOST_PATH:CONTAINER_PATH).
    type: list
    elements: str
    default: []
  env:
    description: Environment variables set for O(command).
    type: dict
    default: {}
  workdir:
    description: Working directory of O(command) inside the container.
    type: str
  run_timeout:
    description: Seconds O(command) may run before its whole process group is killed.
    type: float
    default: 3600
  run_method:
    description:
      - V(image) uses C(systemd-nspawn --image) (needs systemd as PID 1); V(overlay) loop-mounts the C(ROOT)
        partition read-only under a tmpfs overlay and runs C(systemd-nspawn -D); V(chroot) does the same
        without nspawn. V(auto) picks the first that works on this host.
    type: str
    choices: [auto, image, overlay, chroot]
    default: auto
  log_path:
    description: File the whole output of O(command) is appended to. Defaults to C({cache_dir}/logs/run-<version>-<time>.log).
    type: path
notes:
  - The signature is verified by C(gpgv) with a keyring file in a private, temporary GNUPGHOME
    (C(modulus-gnupg-<pid>-*) in O(cache_dir)); the user's keyring is never read or changed and no gpg-agent is started.
  - Nothing is cached unless the signature is good; a failed or interrupted download leaves no partial file.
  - A cached image verified with another key than the expected one is replaced only when a new copy has been
    downloaded and verified (the new entry is built beside the old one and exchanged in one step); a failed
    download leaves the cached image and its metadata as they were.
  - Each run first removes what killed runs left behind (private GNUPGHOMEs, partial downloads, staging and run
    directories, whose mounts are released; loop devices are set to clear themselves when unmounted).
  - The result warns when the signing key in use expires within 60 days (RV(key_expires)).
seealso:
  - name: Flatcar developer container
    description: How Flatcar documents building kernel modules in the developer container.
    link: https://www.flatcar.org/docs/latest/reference/developer-guides/kernel-modules/
"""

EXAMPLES = r"""
- name: Developer container of the release this host will boot next
  modulus.kmods.coreos_devcontainer:
    release: pending
  register: devc

- name: Show what it holds
  ansible.builtin.debug:
    msg: "{{ devc.os_version }} (pending={{ devc.pending }}) kernel {{ devc.kernel_release }} at {{ devc.image_path }}"

- name: An explicit release from an internal mirror, air-gapped
  modulus.kmods.coreos_devcontainer:
    release: 4459.2.1
    board: amd64-usr
    channel: stable
    url_template: "file:///srv/flatcar/{channel}/{board}/{version}"
    fallback_url_template: ""
    verify_key: /etc/modulus/Flatcar_Image_Signing_Key.asc

- name: Compile inside the image (the cached image stays untouched)
  modulus.kmods.coreos_devcontainer:
    release: current
    command: ["make", "-C", "/lib/modules/{{ devc.kernel_release }}/build", "M=/src", "modules"]
    binds_ro: ["/opt/src/hello:/src"]
    binds_rw: ["/opt/out:/out"]
    env:
      KERNEL_UNAME: "{{ devc.kernel_release }}"
    workdir: /src
    run_timeout: 1800

- name: Drop an old release from the cache
  modulus.kmods.coreos_devcontainer:
    release: 4230.2.0
    board: amd64-usr
    channel: stable
    state: absent
"""

RETURN = r"""
os_version:
  description: The resolved release version (the name every module of the collection uses).
  returned: always
  type: str
  sample: 4459.2.1
release_version:
  description: The resolved release version; the same as RV(os_version), kept for playbooks written before it.
  returned: always
  type: str
  sample: 4459.2.1
pending:
  description: Whether the release is one the host has installed but not booted yet.
  returned: always
  type: bool
  sample: true
release_source:
  description: Where the version came from (C(release-file), C(update_engine), C(usr-partition) or C(explicit)).
  returned: always
  type: str
  sample: update_engine
current_version:
  description: The booted release (when the host's release files were read).
  returned: always
  type: str
  sample: 4459.2.0
update_status:
  description: update_engine's status (C(current_op), C(new_version), C(new_size), C(last_checked_time), C(progress)) when it was asked.
  returned: when release=pending
  type: dict
  sample: {"current_op": "UPDATE_STATUS_UPDATED_NEED_REBOOT", "new_version": "4459.2.1"}
usr_partition:
  description: The not-booted USR partition the pending version was read from.
  returned: when update_engine reported NEW_VERSION=0.0.0
  type: str
  sample: /dev/disk/by-partlabel/USR-B
board:
  description: Board of the image.
  returned: always
  type: str
  sample: amd64-usr
channel:
  description: Channel used in the URL templates.
  returned: always
  type: str
  sample: stable
url:
  description: URL the image was (or would be) downloaded from.
  returned: always
  type: str
  sample: https://stable.release.flatcar-linux.net/amd64-usr/4459.2.1/flatcar_developer_container.bin.bz2
urls:
  description: Every location tried, in order.
  returned: always
  type: list
  elements: str
image_path:
  description: Path of the cached, verified, uncompressed GPT image (null with state=absent).
  returned: always
  type: str
  sample: /var/cache/modulus/devcontainer/amd64-usr/4459.2.1/flatcar_developer_container.bin
cached:
  description: True when the image was already in the cache (no network was used).
  returned: state=present
  type: bool
would_download:
  description: URL that would be downloaded.
  returned: check mode, when the image is not cached
  type: str
destination:
  description: Where the image would be written.
  returned: check mode, when the image is not cached
  type: str
kernel_release:
  description: The kernel release the image builds for (the newest with a C(build) directory).
  returned: state=present and not check mode
  type: str
  sample: 6.6.95-flatcar
kernel_releases:
  description: Every kernel release under C(/usr/lib/modules) in the image that has a C(build) entry.
  returned: state=present and not check mode
  type: list
  elements: str
image_release:
  description: The image's own release file (C(/usr/share/flatcar/release) merged with its os-release).
  returned: state=present and not check mode
  type: dict
  sample: {"FLATCAR_RELEASE_VERSION": "4459.2.1", "FLATCAR_RELEASE_BOARD": "amd64-usr"}
key_expires:
  description:
    - When the key in use stops verifying new downloads (UTC), the earlier of the expiry of the subkey that made the
      signature and that of its primary key; null when it never expires. A warning is added within 60 days.
  returned: state=present
  type: str
  sample: "2027-03-08T09:14:02Z"
key_refresh:
  description:
    - Set when the signing key had expired and a current copy was fetched from O(key_url) and accepted
      (C(url), C(fingerprints), C(cached_keys), C(reason)).
  returned: when the key was refreshed
  type: dict
  sample: {"url": "https://www.flatcar.org/security/image-signing-key/Flatcar_Image_Signing_Key.asc",
           "fingerprints": ["F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"],
           "cached_keys": ["/var/cache/modulus/devcontainer/keys/F88CFEDEFF29A5B4D9523864E25D9AED0593B34A.asc"],
           "reason": "the signing subkey ... expired on 2027-03-08"}
swept:
  description: What killed earlier runs had left behind and this run removed.
  returned: when something was removed
  type: list
  elements: str
signing_fingerprint:
  description: Primary fingerprint of the key whose good signature was verified.
  returned: state=present and not check mode
  type: str
  sample: F88CFEDEFF29A5B4D9523864E25D9AED0593B34A
compressed_sha256:
  description: SHA-256 of the compressed image as downloaded.
  returned: state=present and not check mode
  type: str
image_size:
  description: Apparent size of the image in bytes.
  returned: state=present and not check mode
  type: int
fetch:
  description: Figures of the download (C(duration), C(attempts), C(decompressor), C(source), C(tried), C(compressed_size), C(disk_used)).
  returned: when the image was downloaded
  type: dict
diff:
  description: Cached versions of the board before and after the task.
  returned: always
  type: dict
  sample: {"before": {"versions": ["4459.2.0"]}, "after": {"versions": ["4459.2.0", "4459.2.1"]}}
pruned:
  description: Versions removed from the cache because of O(keep).
  returned: state=present and not check mode
  type: list
  elements: str
fetch_log:
  description: File the progress lines were appended to.
  returned: always
  type: str
rc:
  description: Exit code of O(command).
  returned: when command was run
  type: int
  sample: 0
stdout_tail:
  description: The last few KiB of the output of O(command) (stdout and stderr merged).
  returned: when command was run
  type: str
log_path:
  description: File holding the whole output of O(command).
  returned: when command was run
  type: str
timed_out:
  description: Whether O(command) was killed at O(run_timeout).
  returned: when command was run
  type: bool
run_method:
  description: How O(command) was run (C(image), C(overlay) or C(chroot)).
  returned: when command was run
  type: str
"""

import os  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.common.text.converters import to_native  # noqa: E402

from ansible_collections.modulus.kmods.plugins.module_utils.devcontainer import (  # noqa: E402
    DEFAULT_CACHE_SUBDIR,
    DEFAULT_FALLBACK_URL_TEMPLATE,
    DEFAULT_KEY_URL,
    DEFAULT_URL_TEMPLATE,
    Request,
    RequestError,
    ensure,
    parse_bind,
)
from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_release import command_argv  # noqa: E402


def argument_spec() -> dict:
    return dict(
        release=dict(type="str", default="current"),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        channel=dict(type="str"),
        board=dict(type="str"),
        host_root=dict(type="path", default="/"),
        update_engine_client=dict(type="raw"),
        url_template=dict(type="str", default=DEFAULT_URL_TEMPLATE),
        mirrors=dict(type="list", elements="str", default=[]),
        fallback_url_template=dict(type="str", default=DEFAULT_FALLBACK_URL_TEMPLATE),
        image_name=dict(type="str"),
        verify_key=dict(type="str", no_log=False),
        verify_fingerprint=dict(type="list", elements="str", default=[]),
        key_url=dict(type="str", default=DEFAULT_KEY_URL, no_log=False),
        cache_dir=dict(type="path"),
        keep=dict(type="int", default=3),
        network_timeout=dict(type="float", default=60, aliases=["timeout"]),
        retries=dict(type="int", default=3),
        retry_delay=dict(type="float", default=2),
        validate_certs=dict(type="bool", default=True),
        min_free_space=dict(type="int", default=1 << 30),
        decompressor=dict(type="str", choices=["auto", "lbzip2", "python"], default="auto"),
        fetch_log=dict(type="path"),
        command=dict(type="raw"),
        binds_ro=dict(type="list", elements="str", default=[]),
        binds_rw=dict(type="list", elements="str", default=[]),
        env=dict(type="dict", default={}),
        workdir=dict(type="str"),
        run_timeout=dict(type="float", default=3600),
        run_method=dict(type="str", choices=["auto", "image", "overlay", "chroot"], default="auto"),
        log_path=dict(type="path"),
    )


def build_request(params: dict) -> Request:
    return Request(
        release=params["release"].strip(),
        state=params["state"],
        channel=params["channel"],
        board=params["board"],
        host_root=params["host_root"],
        update_engine_client=command_argv("update_engine_client", params["update_engine_client"]),
        url_template=params["url_template"],
        mirrors=params["mirrors"],
        fallback_url_template=params["fallback_url_template"] or None,
        image_name=params["image_name"],
        verify_key=params["verify_key"],
        verify_fingerprints=params["verify_fingerprint"],
        key_url=params["key_url"] or None,
        cache_dir=params["cache_dir"],
        keep=params["keep"],
        timeout=params["network_timeout"],
        retries=params["retries"],
        retry_delay=params["retry_delay"],
        validate_certs=params["validate_certs"],
        min_free_space=params["min_free_space"],
        decompressor=params["decompressor"],
        command=command_argv("command", params["command"]),
        binds_ro=[parse_bind("binds_ro", b) for b in params["binds_ro"]],
        binds_rw=[parse_bind("binds_rw", b) for b in params["binds_rw"]],
        env={str(k): to_native(v) for k, v in params["env"].items()},
        workdir=params["workdir"],
        run_timeout=params["run_timeout"],
        run_method=params["run_method"],
        log_path=params["log_path"],
    )


class ProgressLog:
    """Progress lines to a file (appended, timestamped) and to syslog through module.log."""

    def __init__(self, module: AnsibleModule, path: str) -> None:
        self.module = module
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} coreos_devcontainer: {message}\n"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError:
            pass
        self.module.log(f"coreos_devcontainer: {message}")


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    cache_dir = params["cache_dir"] or os.path.join(params["host_root"], DEFAULT_CACHE_SUBDIR)
    fetch_log = params["fetch_log"] or os.path.join(cache_dir, "fetch.log")
    request = None
    result: dict = {}
    try:
        request = build_request(params)
        result = ensure(request, check_mode=module.check_mode, log=ProgressLog(module, fetch_log))
    except (RequestError, ValueError) as exc:
        module.fail_json(msg=to_native(exc), fetch_log=fetch_log)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear fail_json
        module.fail_json(msg=f"{type(exc).__name__}: {to_native(exc)}", exception=traceback.format_exc(),
                         fetch_log=fetch_log)
    for warning in result.pop("warnings", []):
        module.warn(warning)
    result["fetch_log"] = fetch_log
    result["os_version"] = result.get("release_version")
    if request is not None and request.command and "rc" in result and (result["rc"] != 0 or result.get("timed_out")):
        why = f"timed out after {request.run_timeout} s" if result.get("timed_out") else f"exited with rc={result['rc']}"
        module.fail_json(msg=f"command {' '.join(request.command)} inside the developer container {why}; "
                         f"see {result['log_path']}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
