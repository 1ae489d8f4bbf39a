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
  - Reads the archives of the original modulus tool (C(<os_version>-<channel>-<driver>-<driver_version>.tar.gz)
    holding C(<driver>/<driver_version>/...)) and imports them with a manifest made from their content.
  - The fleet lock is a lease object beside the archive, created with a conditional write and
    expiring after O(lock_ttl) seconds; a stale lease is taken over with a compare-and-swap.
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
      - V(unlocked) releases the lock taken by O(lock_owner).
    type: str
    choices: [present, fetched, query, absent, locked, unlocked]
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
    type: path
  os:
    description: Operating system of the build (manifest C(os)).
    type: str
    default: flatcar
  board:
    description: Board of the build (manifest C(board)).
    type: str
    default: amd64-usr
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
      - Module variant as kmod_build recorded it, for example V(proprietary) or V(open) for NVIDIA.
      - Defaults to V(proprietary) for O(driver=nvidia) and to V(default) (builds without a module type,
        such as the generic recipe's) for every other driver.
    type: str
  signing_key_fingerprint:
    description: Fingerprint of the key that signed the modules (unsigned builds when not set).
    type: str
  legacy:
    description:
      - Also look for the original tool's archive when the build is not found under its own key.
    type: bool
    default: true
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
    description: Who holds the lock. Defaults to the host's fully qualified name.
    type: str
  lock_ttl:
    description: Seconds after which a lease is stale and may be taken over by another host.
    type: int
    default: 3600
  lock_wait:
    description:
      - Seconds O(state=locked) waits for another holder to release the lock or push the build.
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
- name: Push this build to the fleet cache
  modulus.kmods.kmod_archive:
    src: /opt/modulus/archive/nvidia/535.104.05
    store: s3://gpu-fleet-kmods/flatcar
    state: present

- name: Fetch the build for the pending release from an S3-compatible store
  modulus.kmods.kmod_archive:
    state: fetched
    dest: /opt/modulus/archive/nvidia/535.104.05-6.6.95
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

- name: Only one host compiles; the others wait up to 30 minutes, then pull
  modulus.kmods.kmod_archive:
    state: locked
    store: s3://gpu-fleet-kmods/flatcar
    os_version: 4459.2.1
    kernel_release: 6.6.95-flatcar
    driver: nvidia
    driver_version: 535.104.05
    lock_wait: 1800
  register: fleet_lock

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
dest:
  description: The directory holding the fetched build.
  returned: O(state=fetched)
  type: str
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
      C(waited) (seconds). For O(state=unlocked) C(released) and C(holder).
  returned: O(state=locked) or O(state=unlocked)
  type: dict
"""

import traceback  # noqa: E402  (Ansible modules import after their documentation)

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.modulus.kmods.plugins.module_utils import archive_ops as ops
from ansible_collections.modulus.kmods.plugins.module_utils.archive import (
    IDENTITY_FIELDS,
    ArchiveError,
    default_module_type,
)
from ansible_collections.modulus.kmods.plugins.module_utils.lease import default_owner
from ansible_collections.modulus.kmods.plugins.module_utils.stores import (
    STORE_ARGUMENT_SPEC,
    StoreError,
    open_store,
    split_store_url,
)


def argument_spec() -> dict:
    spec = dict(
        state=dict(type="str", default="present", choices=["present", "fetched", "query", "absent", "locked", "unlocked"]),
        src=dict(type="path"),
        dest=dict(type="path"),
        os=dict(type="str", default="flatcar"),
        board=dict(type="str", default="amd64-usr"),
        os_version=dict(type="str"),
        channel=dict(type="str", default="stable"),
        kernel_release=dict(type="str"),
        driver=dict(type="str"),
        driver_version=dict(type="str"),
        module_type=dict(type="str"),
        signing_key_fingerprint=dict(type="str", no_log=False),
        legacy=dict(type="bool", default=True),
        remote_check=dict(type="bool", default=True),
        compression_level=dict(type="int", default=1),
        tmp_dir=dict(type="path"),
        lock_owner=dict(type="str"),
        lock_ttl=dict(type="int", default=3600),
        lock_wait=dict(type="int", default=0),
        lock_poll=dict(type="float", default=5.0),
    )
    spec.update({name: dict(opts) for name, opts in STORE_ARGUMENT_SPEC.items()})
    return spec


NAMING = ["os_version", "kernel_release", "driver", "driver_version"]


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_if=[
            ("state", "present", ["src"]),
            ("state", "fetched", ["dest"] + NAMING),
            ("state", "query", NAMING),
            ("state", "absent", NAMING),
            ("state", "locked", NAMING),
            ("state", "unlocked", NAMING),
        ],
        mutually_exclusive=[("profile", "access_key"), ("profile", "secret_key")],
        required_together=[("access_key", "secret_key")],
    )
    p = module.params
    if not 0 <= p["compression_level"] <= 9:
        module.fail_json(msg=f"compression_level={p['compression_level']} is out of range (0-9)")
    for name in ("lock_ttl", "lock_wait"):
        if p[name] < 0:
            module.fail_json(msg=f"{name}={p[name]} must not be negative")
    if p["lock_poll"] <= 0:
        module.fail_json(msg=f"lock_poll={p['lock_poll']} must be positive")

    store = None
    try:
        if p["store"]:
            scheme = split_store_url(p["store"])[0]
            if scheme == "s3":
                from ansible_collections.modulus.kmods.plugins.module_utils import s3store
                if not s3store.HAS_BOTO3:
                    module.fail_json(msg=missing_required_lib("boto3"), exception=s3store.BOTO3_IMPORT_ERROR)
        store = open_store(p["store"], p)
        ident = {field: p[field] for field in IDENTITY_FIELDS}
        ident["module_type"] = p["module_type"] or default_module_type(p["driver"])
        owner = p["lock_owner"] or default_owner()
        state = p["state"]
        if state == "present":
            # options without a default that were given must agree with the manifest
            given = {k: p[k] for k in NAMING + ["signing_key_fingerprint"] if p[k] is not None}
            result = ops.push(p["src"], store, given, p["compression_level"], module.check_mode, p["tmp_dir"])
        elif state == "fetched":
            result = ops.pull(p["dest"], store, ident, p["channel"], p["legacy"], p["remote_check"], module.check_mode)
        elif state == "query":
            result = ops.query(store, ident, p["channel"], p["legacy"])
        elif state == "absent":
            result = ops.remove(store, ident, module.check_mode)
        elif state == "locked":
            result = ops.lock(store, ident, owner, p["lock_ttl"], p["lock_wait"], p["lock_poll"], module.check_mode)
        else:
            result = ops.unlock(store, ident, owner, module.check_mode)
    except (ArchiveError, StoreError) as exc:
        module.fail_json(msg=str(exc), store_requests=store.requests if store else 0)
    except OSError as exc:
        module.fail_json(msg=f"kmod_archive: {exc}", exception=traceback.format_exc())
    finally:
        if store is not None:
            store.close()
    if result.get("remote_error"):
        module.warn(f"kept the verified build in {result.get('dest')}: {result['remote_error']}")
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
