#!/usr/bin/python
# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kmod_archive
short_description: Share kernel module builds through S3, a directory or a mirror
version_added: 0.1.0
description:
  - Moves a build made by M(modulus.kmods.kmod_build) between the host and an archive store, so a
    fleet compiles each (release, kernel, driver) combination once.
  - One object per build, at a key derived from its manifest
    C(<prefix>/<os>/<board>/<os_version>/<kernel_release>/<driver>/<driver_version>/<module_type>-<unsigned|signed-FPR>.tar.gz).
  - The archive is a deterministic tarball (sorted entries, fixed times, owners and modes, gzip header
    without time or name), so the same build gives the same bytes. Its SHA-256 is stored in the object
    metadata (C(x-amz-meta-sha256); a C(<key>.json) sidecar on file and http stores) and in the local manifest.
  - A pull verifies the archive and every file against the manifest, refuses entries that would
    escape O(dest), and makes the tree visible with an atomic rename.
  - A pull checks, before the build is made visible, that the object's C(manifest-sha256) metadata names the
    manifest inside the archive and that every C(.ko) is an ELF kernel module whose vermagic names
    O(kernel_release).
  - With O(signing_key) a push signs the build's manifest (which lists every file's SHA-256) with
    C(ssh-keygen -Y sign) (namespace C(modulus-build)) and stores the signature beside the archive as
    C(<key>.sig). With O(trusted_keys) a pull accepts only builds whose manifest signature verifies with
    one of those keys (C(ssh-keygen -Y verify)); without, it reports RV(authenticated=false).
  - With O(legacy=true), reads the archives of the original modulus tool
    (C(<os_version>-<channel>-<driver>-<driver_version>.tar.gz) holding C(<driver>/<driver_version>/...))
    and imports them with a manifest made from their content.
  - The fleet lock is a lease object beside the archive, created with a conditional write and
    expiring after O(lock_ttl) seconds; a stale lease is taken over with a compare-and-swap.
  - Its holder is named by the machine, C(<hostname>/<id>), the ID derived from C(/etc/machine-id) (see O(lock_owner)),
    and each acquisition by a random token (C(token) in RV(lock)). The holder renews the lease while it works
    (O(state=held)), so the TTL can be short; a holder that died loses its lease within O(lock_ttl) seconds.
author:
  - modulus contributors (@modulus)
extends_documentation_fragment:
  - modulus.kmods.store
options:
  state:
    description:
      - V(present) pushes the build in O(src) to O(store) (one HEAD request when it is already there).
      - V(fetched) makes O(dest) hold the verified build from the store (nothing downloaded when it already does).
      - V(query) tells whether the store has the build (also in the original tool's layout).
      - V(absent) deletes the build from the store.
      - V(locked) takes the fleet lock for the build, unless the archive already exists; waits at most
        O(lock_wait) seconds for another holder to finish. Read RV(lock) to decide what to do.
      - V(held) renews the lock taken by O(lock_owner) with O(lock_token) every third of O(lock_ttl) for as long
        as the async task whose results file is O(job) runs, then returns (C(job) in RV(lock) says how the job ended).
      - V(unlocked) releases the lock taken by O(lock_owner) (with O(lock_token) when given), only when the
        lease is still that one, unchanged.
    type: str
    choices: [present, fetched, query, absent, locked, held, unlocked]
    default: present
  src:
    description:
      - A build directory (C(manifest.json) and the files it lists). Required with O(state=present).
      - The manifest names the build; options naming the build, when given, must agree with it.
    type: path
  dest:
    description:
      - Directory that receives the build with O(state=fetched). Its parent must be writable; the
        previous content is replaced atomically only once the new tree is verified.
      - Defaults to C(<archive_root>/<driver>/<driver_version>/<kernel_release>), where
        M(modulus.kmods.kmod_build) puts its builds.
    type: path
  archive_root:
    description: Directory holding the builds of this host, laid out as described in O(dest).
    type: path
    default: /opt/modulus/archive
  identity:
    description:
      - The build's identity as one dictionary, as RV(modulus.kmods.kmod_build#module:identity) and
        RV(modulus.kmods.flatcar_release_info#module:targets) return it (keys C(os), C(board), C(os_version),
        C(kernel_release), C(driver), C(driver_version), C(module_type), C(signer); other keys are ignored).
      - A separate option that is also given must agree with it.
    type: dict
  os:
    description: Operating system of the build (manifest C(os)). Defaults to C(flatcar).
    type: str
  board:
    description: Board of the build (manifest C(board)). Defaults to C(amd64-usr).
    type: str
  os_version:
    description: OS release the build is for. Required unless O(state=present).
    type: str
  channel:
    description:
      - Release channel (the original tool's C(group)); only used to find archives in the original layout.
    type: str
    default: stable
  kernel_release:
    description: Kernel release the modules are built for (C(uname -r)). Required unless O(state=present).
    type: str
  driver:
    description: Driver name, for example V(nvidia). Required unless O(state=present).
    type: str
  driver_version:
    description: Driver version. Required unless O(state=present).
    type: str
  module_type:
    description:
      - Module variant, V(proprietary) or V(open) for NVIDIA, V(default) for every other driver.
      - V(auto) (the default) resolves the way M(modulus.kmods.kmod_build) does, so a lookup finds
        what it built. For NVIDIA that is V(open) from branch 560 on and V(proprietary) before.
    type: str
    aliases: [kernel_module_type]
  signer:
    description:
      - SHA-256 fingerprint of the certificate that signed the modules (RV(modulus.kmods.kmod_build#module:identity.signer));
        unsigned builds when not set.
    type: str
    aliases: [signing_key_fingerprint]
  legacy:
    description:
      - Also look for the original tool's archive when the build is not found under its own key, and import it.
      - Such an archive has no manifest nor checksum. It is imported only when no member is absolute or leaves
        the archive, it holds modules for O(kernel_release) and no other kernel, and every C(.ko) is an ELF
        kernel module whose vermagic names O(kernel_release).
      - It carries no signature, so it is refused when O(trusted_keys) is set.
    type: bool
    default: false
  signing_key:
    description:
      - With O(state=present), path of an OpenSSH private key (without passphrase) on the managed node that
        signs the build's manifest (C(ssh-keygen -Y sign -n modulus-build)). The signature is stored beside
        the archive as C(<key>.sig) and recorded in the local manifest's C(archive) section.
      - When the store already holds the build, its signature is checked (one more request) and written
        again only when it is missing or made by another key.
      - The key itself is never read by the module nor logged; C(ssh-keygen) reads it.
      - Needs C(ssh-keygen) (OpenSSH 8.2 or later) on the managed node.
    type: path
  trusted_keys:
    description:
      - With O(state=fetched), the OpenSSH public keys (C(ssh-ed25519 AAAA... comment) lines, or absolute paths
        of files holding such lines, one key per line) whose signatures are accepted.
      - A build is accepted only when C(<key>.sig) is a C(modulus-build) signature of the manifest inside
        the archive by one of these keys; a build already in O(dest) only when the signature recorded in its
        manifest verifies. Unsigned builds and the original tool's archives are refused.
      - Each key is written to a temporary allowed_signers file with the one principal C(modulus-build),
        restricted to the namespace C(modulus-build); options and principals given in the lines are
        ignored and certificate authorities are refused.
      - Without it, builds are not authenticated (RV(authenticated=false)) and only their checksums are verified.
      - Needs C(ssh-keygen) (OpenSSH 8.2 or later) on the managed node.
    type: list
    elements: str
  remote_check:
    description:
      - With O(state=fetched) and O(dest) already holding the verified build, compare its checksum with
        the store's (one HEAD request) and download again when the store holds another build.
      - When V(false), a verified local tree is enough and the store is not contacted at all.
    type: bool
    default: true
  compression_level:
    description:
      - Gzip level of new archives. Chunks that do not compress are stored whatever the level.
        Level 1 keeps a push of a large build within 1.2 times the time of a plain upload.
    type: int
    default: 1
  tmp_dir:
    description:
      - Where the archive is written before upload. Defaults to the parent directory of O(src)
        (C(/tmp) is a small tmpfs on Flatcar).
    type: path
  lock_owner:
    description:
      - Who holds the lock.
      - Defaults to C(<hostname>/<id>) of the machine below O(host_root). The hostname is the kernel's
        (C(/proc/sys/kernel/hostname)), else C(/etc/hostname). The ID is systemd's application-specific ID of
        C(/etc/machine-id), the same that C(systemd-id128 machine-id --app-specific=5b0bd2b2c1a24f0e9d4c7c3e8a61f0d7) prints, so
        the machine ID itself is not shown. Fails when C(/etc/machine-id) holds no ID.
      - Two runs on the same machine share the owner; the token (O(lock_token)) tells them apart.
    type: str
  lock_token:
    description:
      - With O(state=held) (required) and O(state=unlocked), the token (C(token) in RV(lock)) of the O(state=locked)
        task that took the lock. A lease with another token (taken over, or taken again by another run on the
        same machine) is neither renewed nor released.
    type: str
  host_root:
    description: Where the host's root file system is visible; C(/etc/machine-id) and the hostname are read below it.
    type: path
    default: /
  job:
    description:
      - With O(state=held), the C(results_file) of an async task (C(async), C(poll=0)) registered before.
      - The lease is renewed until that file holds the job's result, or until no process of the job is left.
    type: path
  lock_ttl:
    description:
      - Seconds after which a lease that was not renewed is stale and may be taken over by another host.
    type: int
    default: 300
  lock_wait:
    description:
      - Seconds O(state=locked) waits for another holder to release the lock or push the build.
      - When not 0, it must be longer than O(lock_ttl), since a holder that died keeps its lease up to O(lock_ttl) seconds.
    type: int
    default: 0
  lock_poll:
    description: Seconds between two looks at the lease while waiting.
    type: float
    default: 5.0
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Returns the key, checksum and size of the archive before and after.
    support: full
requirements:
  - python >= 3.9
"""

EXAMPLES = r"""
- name: Push this build to the fleet store
  modulus.kmods.kmod_archive:
    state: present
    store: s3://gpu-fleet-kmods/flatcar
    src: /opt/modulus/archive/nvidia/535.104.05/6.6.95-flatcar

- name: Fetch the build for the pending release from an S3-compatible store
  modulus.kmods.kmod_archive:
    state: fetched
    store: s3://gpu-fleet-kmods/flatcar
    endpoint_url: https://minio.example.com
    addressing_style: path
    request_checksum_calculation: when_required
    response_checksum_validation: when_required
    access_key: "{{ minio_access_key }}"
    secret_key: "{{ minio_secret_key }}"
    os_version: 4459.2.1
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
  # lands in /opt/modulus/archive/nvidia/535.104.05/6.6.95-flatcar/

- name: Look up the builds for the releases this host runs and boots next, downloading nothing else
  modulus.kmods.kmod_archive:
    state: query
    store: s3://gpu-fleet-kmods/flatcar
    identity: "{{ item | combine({'driver': 'nvidia', 'driver_version': '535.104.05'}) }}"
  loop: "{{ host.targets }}"  # from modulus.kmods.flatcar_release_info

- name: Only one host compiles; the others wait up to 30 minutes, then pull
  modulus.kmods.kmod_archive:
    state: locked
    store: s3://gpu-fleet-kmods/flatcar
    os_version: 4459.2.1
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
    lock_ttl: 300
    lock_wait: 1800
  register: fleet_lock

- name: Compile in the background (the lock holder only)
  modulus.kmods.kmod_build:
    image: /var/cache/modulus/devcontainer/4459.2.1/flatcar_developer_container.bin
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
  async: 7200
  poll: 0
  register: compile_job
  when: fleet_lock.lock.acquired

- name: Keep the lock while it compiles
  modulus.kmods.kmod_archive:
    state: held
    store: s3://gpu-fleet-kmods/flatcar
    os_version: 4459.2.1
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
    lock_token: "{{ fleet_lock.lock.token }}"
    lock_ttl: 300
    job: "{{ compile_job.results_file }}"
  when: fleet_lock.lock.acquired

- name: Collect the compile
  ansible.builtin.async_status:
    jid: "{{ compile_job.ansible_job_id }}"
  register: compiled
  until: compiled is finished
  retries: 720
  delay: 10
  when: fleet_lock.lock.acquired

- name: Push a signed build
  modulus.kmods.kmod_archive:
    state: present
    store: s3://gpu-fleet-kmods/flatcar
    src: /opt/modulus/archive/nvidia/535.104.05/6.6.95-flatcar
    signing_key: /etc/modulus/fleet-signing-key

- name: Fetch only builds signed by the fleet key
  modulus.kmods.kmod_archive:
    state: fetched
    store: https://mirror.example.com/kmods
    os_version: 4459.2.1
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
    trusted_keys:
      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHB1epj72kAd84enbyWAz117yFOtKbndPI5lJvUhhgjo fleet-2026
      - /etc/modulus/trusted-build-keys.pub

- name: Read from a public mirror (read-only)
  modulus.kmods.kmod_archive:
    state: query
    store: https://mirror.example.com/kmods
    os_version: 4459.2.1
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
"""

RETURN = r"""
identity:
  description: The identity of the build the task worked on (C(module_type) resolved, see O(module_type)).
  returned: unless the options are invalid
  type: dict
  sample: {"os": "flatcar", "board": "amd64-usr", "os_version": "4459.2.1", "kernel_release": "6.6.95-flatcar",
           "driver": "nvidia", "driver_version": "535.104.05", "module_type": "proprietary", "signer": null}
key:
  description: Key of the build's archive, relative to the store (its prefix excluded).
  returned: always
  type: str
  sample: flatcar/amd64-usr/4459.2.1/6.6.95-flatcar/nvidia/535.104.05/proprietary-unsigned.tar.gz
store:
  description: The store URL (never with credentials).
  returned: always
  type: str
sha256:
  description: SHA-256 of the archive (null when unknown, for example in check mode before packing).
  returned: when a build was pushed, fetched or found
  type: str
size:
  description: Size of the archive in bytes.
  returned: when a build was pushed, fetched or found
  type: int
manifest_sha256:
  description: SHA-256 of the build's manifest without its C(archive) section (names the content).
  returned: when known
  type: str
exists:
  description: Whether the store holds the build.
  returned: O(state=query)
  type: bool
legacy:
  description: Whether the archive is in the original tool's layout (the manifest was made on import).
  returned: O(state=fetched) or O(state=query)
  type: bool
signed:
  description:
    - With O(state=present), whether the build in the store is signed by O(signing_key).
    - With O(state=fetched), whether a signature was verified (null when O(trusted_keys) is not set, it is not looked at).
  returned: O(state=present) or O(state=fetched)
  type: bool
authenticated:
  description:
    - With O(state=fetched), whether the build in O(dest) is signed by one of O(trusted_keys). Always false
      without O(trusted_keys) (only checksums were verified). Always false with O(state=present).
  returned: O(state=present) or O(state=fetched)
  type: bool
signer_key:
  description:
    - SHA-256 fingerprint (as C(ssh-keygen -l) prints it) of the key that signed the build, O(signing_key)'s
      for a push, the trusted key whose signature verified for a pull.
  returned: O(state=present) or O(state=fetched)
  type: str
  sample: SHA256:sLKaAcLH5eX639zFQRtTf37Nicqh5fo0y/58fc4p1Bc
swept:
  description:
    - What runs that died (killed, crashed) had left beside O(dest) (or O(src)) and this run removed before it
      started, one line each (workspaces, their mounts and processes, temporary files).
  returned: O(state=present) or O(state=fetched), unless in check mode
  type: list
  elements: str
dest:
  description: The directory holding the fetched build.
  returned: O(state=fetched)
  type: str
in_store:
  description:
    - With O(state=fetched), whether the store holds the build that O(dest) already held, as the remote check
      found (O(remote_check=true)). A host can push what the store lacks (O(state=present)).
  returned: when O(dest) already held the verified build and the store was checked
  type: bool
remote_error:
  description:
    - With O(state=fetched), why the store could not be checked while O(dest) already held the verified
      build (the build is kept and the task does not fail; a warning is shown).
  returned: when the store was unreachable or refused the check
  type: str
store_requests:
  description: Number of requests sent to the store by this task (0 when the work was decided locally).
  returned: always
  type: int
lock:
  description:
    - For O(state=locked) C(acquired) (this host builds, pushes, then unlocks), C(archive_exists) (pull
      instead), C(holder) (the current lease when not acquired), C(took_over) (a stale lease was replaced),
      C(waited) (seconds), C(owner), C(token) (give it to O(state=held) and O(state=unlocked)), C(expires)
      (Unix time).
    - For O(state=held) C(job) (V(finished); V(gone) when the job died without a result; V(orphaned) when the
      run that started this task died), C(lost) (the lease lapsed and another host took it, or it was
      released), C(renewals), C(holder) (who has it when lost), C(errors) (store errors, retried).
    - For O(state=unlocked) C(released) and C(holder).
  returned: O(state=locked), O(state=held) or O(state=unlocked)
  type: dict
"""

import os  # noqa: E402  (Ansible modules import after their documentation)
import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.modulus.kmods.plugins.module_utils import archive_ops as ops
from ansible_collections.modulus.kmods.plugins.module_utils import identity as idm
from ansible_collections.modulus.kmods.plugins.module_utils._archive import hold as hd
from ansible_collections.modulus.kmods.plugins.module_utils._host import machine
from ansible_collections.modulus.kmods.plugins.module_utils.archive import ArchiveError
from ansible_collections.modulus.kmods.plugins.module_utils.stores import (
    STORE_ARGUMENT_SPEC,
    StoreError,
    open_store,
    split_store_url,
)


def argument_spec() -> dict:
    spec = dict(
        state=dict(type="str", default="present",
                   choices=["present", "fetched", "query", "absent", "locked", "held", "unlocked"]),
        src=dict(type="path"),
        dest=dict(type="path"),
        archive_root=dict(type="path", default=idm.DEFAULT_ARCHIVE_ROOT),
        identity=dict(type="dict"),
        os=dict(type="str"),
        board=dict(type="str"),
        os_version=dict(type="str"),
        channel=dict(type="str", default="stable"),
        kernel_release=dict(type="str"),
        driver=dict(type="str"),
        driver_version=dict(type="str"),
        module_type=dict(type="str", aliases=["kernel_module_type"]),
        signer=dict(type="str", aliases=["signing_key_fingerprint"]),
        legacy=dict(type="bool", default=False),
        signing_key=dict(type="path", no_log=False),
        trusted_keys=dict(type="list", elements="str", no_log=False),
        remote_check=dict(type="bool", default=True),
        compression_level=dict(type="int", default=1),
        tmp_dir=dict(type="path"),
        lock_owner=dict(type="str"),
        lock_token=dict(type="str", no_log=False),
        host_root=dict(type="path", default="/"),
        job=dict(type="path"),
        lock_ttl=dict(type="int", default=300),
        lock_wait=dict(type="int", default=0),
        lock_poll=dict(type="float", default=5.0),
    )
    spec.update({name: dict(opts) for name, opts in STORE_ARGUMENT_SPEC.items()})
    return spec


NAMING = ("os_version", "kernel_release", "driver", "driver_version")


def merged_identity(params: dict) -> dict:
    """The identity options and the ``identity`` dictionary together; a field given both ways must agree."""
    given = params["identity"] or {}
    merged: dict = {}
    for field in idm.IDENTITY_FIELDS:
        opt, other = params[field], given.get(field)
        if isinstance(other, str) and other == "":
            other = None
        if opt not in (None, "") and other is not None and str(opt) != str(other) and not (
                field == "module_type" and opt == "auto"):
            raise idm.IdentityError(f"{field}={opt!r} disagrees with identity.{field}={other!r}")
        merged[field] = opt if opt not in (None, "") else (None if other is None else str(other))
    return merged


def wanted_identity(params: dict) -> dict:
    """The checked identity of the build a state other than ``present`` works on."""
    merged = merged_identity(params)
    missing = [f for f in NAMING if merged[f] in (None, "")]
    if missing:
        raise idm.IdentityError("state={} needs {} (as options or in identity)".format(params["state"], ", ".join(missing)))
    return idm.make_identity(os=merged["os"] or "flatcar", board=merged["board"] or "amd64-usr",
                             os_version=merged["os_version"], kernel_release=merged["kernel_release"],
                             driver=merged["driver"], driver_version=merged["driver_version"],
                             module_type=merged["module_type"], signer=merged["signer"])


def push_constraints(params: dict) -> dict:
    """What the manifest of ``src`` must agree with: the identity fields that were given."""
    merged = merged_identity(params)
    for field, check in (("os", idm.check_os), ("board", idm.check_board), ("os_version", idm.check_os_version),
                         ("kernel_release", idm.check_kernel_release), ("driver", idm.check_name)):
        if merged[field]:
            check(field, merged[field])
    if merged["module_type"] == "auto":
        merged["module_type"] = None
    if merged["signer"]:
        merged["signer"] = idm.normalize_signer(merged["signer"])
    return {k: v for k, v in merged.items() if v not in (None, "")}


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_if=[("state", "present", ["src"]), ("state", "held", ["job", "lock_token"])],
        mutually_exclusive=[("profile", "access_key"), ("profile", "secret_key")],
        required_together=[("access_key", "secret_key")],
    )
    p = module.params
    if not 0 <= p["compression_level"] <= 9:
        module.fail_json(msg=f"compression_level={p['compression_level']} is out of range (0-9)")
    state = p["state"]
    owner = p["lock_owner"]
    try:
        if state in ("locked", "held", "unlocked"):
            hd.check_lock_options(p["lock_ttl"], p["lock_wait"] if state == "locked" else 0, p["lock_poll"])
            if state == "held":
                hd.job_id_of(p["job"])
            owner = owner or machine.lock_owner(p["host_root"])
    except hd.HoldError as exc:
        module.fail_json(msg=str(exc))
    except machine.MachineError as exc:
        module.fail_json(msg=f"{exc}: give lock_owner, or host_root where the host's /etc is")
    try:
        if state == "present":
            given = push_constraints(p)
            ident = None
        else:
            ident = wanted_identity(p)
            given = {}
        dest = p["dest"] or (idm.build_dir(p["archive_root"], ident) if state == "fetched" else None)
    except idm.IdentityError as exc:
        module.fail_json(msg=str(exc))

    if state == "present" and module.check_mode and not os.path.isfile(os.path.join(p["src"], "manifest.json")):
        # check mode of a whole chain: the build this would push is not made yet
        module.exit_json(changed=True, store=p["store"], key=None, sha256=None, size=None, store_requests=0,
                         identity=None, msg=f"would push the build that src={p['src']!r} will hold once it is built")
    store = None
    try:
        if p["store"]:
            scheme = split_store_url(p["store"])[0]
            if scheme == "s3":
                from ansible_collections.modulus.kmods.plugins.module_utils import s3store
                if not s3store.HAS_BOTO3:
                    module.fail_json(msg=missing_required_lib("boto3"), exception=s3store.BOTO3_IMPORT_ERROR)
        store = open_store(p["store"], p)
        if state == "present":
            result = ops.push(p["src"], store, given, p["compression_level"], module.check_mode, p["tmp_dir"],
                              signing_key=p["signing_key"])
        elif state == "fetched":
            result = ops.pull(dest, store, ident, p["channel"], p["legacy"], p["remote_check"], module.check_mode,
                              trusted_keys=p["trusted_keys"])
        elif state == "query":
            result = ops.query(store, ident, p["channel"], p["legacy"])
        elif state == "absent":
            result = ops.remove(store, ident, module.check_mode)
        elif state == "locked":
            result = ops.lock(store, ident, owner, p["lock_ttl"], p["lock_wait"], p["lock_poll"], module.check_mode)
        elif state == "held":
            result = ops.held(store, ident, owner, p["lock_token"], p["lock_ttl"], p["job"], module.check_mode)
        else:
            result = ops.unlock(store, ident, owner, module.check_mode, token=p["lock_token"])
    except (ArchiveError, StoreError, idm.IdentityError) as exc:
        module.fail_json(msg=str(exc), store_requests=store.requests if store else 0)
    except OSError as exc:
        module.fail_json(msg=f"kmod_archive: {exc}", exception=traceback.format_exc())
    finally:
        if store is not None:
            store.close()
    for line in result.get("swept") or []:
        module.log(line)
    held_errors = (result.get("lock") or {}).get("errors") if state == "held" else None
    if held_errors:
        module.warn(f"the fleet lock could not always be renewed: {held_errors[-1]}")
    if state == "held" and (result.get("lock") or {}).get("lost"):
        holder = (result["lock"].get("holder") or {}).get("owner") or "nobody"
        module.warn(f"the fleet lock lapsed while the job ran and is now held by {holder}")
    if result.get("remote_error"):
        module.warn(f"kept the verified build in {result.get('dest')}: {result['remote_error']}")
    if not module._diff:
        result.pop("diff", None)
    result.setdefault("identity", ident)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
