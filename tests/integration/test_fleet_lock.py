"""The fleet lock between hosts that run the pull playbook (``localhost`` to Ansible, ``localhost`` to
their kernel too: a Flatcar host no DHCP server names), told apart by their machine IDs.

Each simulated host has its own root (kit host root: release files, update_engine saying an update
to the pending release is written, ``/etc/machine-id``). The role's units.yml writes its
``/etc/modulus`` (vars.yml, env), and the host's pull run is what ``modulus-pull`` runs:
``ansible-playbook -i localhost, modulus.kmods.pull`` with that vars file and the host's env file.
The module compiled is a copy of the project's hello module whose Kbuild holds the compile until
the test creates a file (``held`` appears in the build's workspace, ``go`` lets it go on).

- Two hosts, one store, the same pending build: one compiles (holding the lock), the other waits and
  pulls; one developer container is downloaded.
- The holder is killed (SIGKILL of its whole tree) mid-compile: the other takes the lease over once it
  lapsed (no renewal after the kill), compiles and pushes; nothing of the killed run is left running.
- A host that is not a builder never takes the lock nor downloads a developer container, and fails
  naming modulus_builder when no builder pushes in time.
- vars.yml holds no store credential the controller read from its environment, and no signing key
  on a host that is not a builder; pull.env is 0600.

The lock takeover time after the kill is printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ansible_collections.modulus.kmods.plugins.module_utils._host import machine
from sim import faults
from sim.ansible_run import REPO, ansible_env
from sim.kit import Kit, ReleaseServer
from sim.s3 import TEST_KEY_ID, TEST_SECRET, client, new_bucket, s3_endpoint

pytestmark = pytest.mark.slow

HELLO = REPO / "tests" / "fixtures" / "hello"
DRIVER = "modulus-hello"
TTL, WAIT, POLL = 20, 900, 1  # lock_wait: far longer than a compile on a busy machine
HOLD = "$(shell touch $(src)/held; while [ ! -e $(src)/go ]; do sleep 0.05; done)\n"
IMAGE = "flatcar_developer_container.bin.bz2"


def held_source(tmp: Path) -> Path:
    """A copy of the hello module whose Kbuild waits for ``go`` beside ``held`` in the build's workspace."""
    src = tmp / "held-hello"
    shutil.copytree(HELLO, src)
    (src / "Kbuild").write_text(HOLD + (HELLO / "Kbuild").read_text())
    return src


class Host:
    """A simulated host: its root, its /etc/modulus (from the role's units.yml), its pull runs."""

    def __init__(self, kit: Kit, work: Path, name: str) -> None:
        self.name, self.work = name, work / name
        self.root = kit.host_root(self.work / "layout", update="need_reboot")
        self.owner = machine.lock_owner(str(self.root))

    def install_units(self, extra: dict, env: dict | None = None) -> subprocess.CompletedProcess:
        """The role's units.yml with modulus_host_root = this root (files only), run from a "controller"
        whose environment is ``env``."""
        pb = self.work / "units.yml"
        pb.write_text("- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
                      "    - ansible.builtin.include_role:\n        name: modulus.kmods.modulus\n"
                      "        tasks_from: units\n")
        args = self.work / "units-vars.json"
        args.write_text(json.dumps({"modulus_host_root": str(self.root), **extra}))
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(pb),
               "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{args}"]
        return subprocess.run(cmd, capture_output=True, text=True, env={**ansible_env(), **(env or {})}, timeout=300,
                              cwd=str(REPO), check=False)

    def node_env(self) -> dict[str, str]:
        """/etc/modulus/env as systemd's EnvironmentFile reads it (the units' environment)."""
        out = {}
        for line in (self.root / "etc/modulus/env").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                out[key] = json.loads(value)  # written double-quoted
        return out

    def start_pull(self, version: str, label: str) -> faults.ModuleRun:
        """What modulus-pull runs for the pending release, in a session of its own (tagged for kill_tree)."""
        tag_dir = self.work / f"run-{label}"
        (tag_dir / "tmp").mkdir(parents=True, exist_ok=True)
        tag = f"modulus-fault-{self.name}-{label}-{os.getpid()}"
        env = {k: v for k, v in ansible_env().items() if not k.startswith("AWS_")}
        env.update(self.node_env())
        env.update({"TMPDIR": str(tag_dir / "tmp"), "MODULUS_FAULT_TAG": tag,
                    "ANSIBLE_ASYNC_DIR": str(tag_dir / "async"), "ANSIBLE_FORCE_COLOR": "0"})
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "modulus.kmods.pull",
               "-e", f"modulus_driver={DRIVER}", "-e", f"modulus_driver_version={version}",
               "-e", f"ansible_python_interpreter={sys.executable}",
               "-e", f"modulus_vars_file={self.root}/etc/modulus/vars.yml",
               "-e", json.dumps({"modulus_releases": ["pending"], "modulus_host_root": str(self.root)})]
        out = tag_dir / "ansible.out"
        with open(out, "wb") as handle:
            proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return faults.ModuleRun(proc, tag, tag_dir, out)

    def held_file(self) -> Path | None:
        """The ``held`` file of a compile of this host that waits for ``go``, if any."""
        for path in (self.root / "opt/modulus/archive").rglob("held"):
            if not (path.parent / "go").exists():
                return path
        return None

    def record(self) -> list[dict]:
        return json.loads((self.root / "var/lib/modulus/last-run.json").read_text())["builds"]


def node_vars(kit: Kit, server: ReleaseServer, endpoint: str, store: str, src: Path, **more: object) -> dict:
    return {
        "modulus_drivers": [{"name": DRIVER, "version": "1.0.0", "recipe": "generic", "source": str(src),
                             "modules": ["modulus_hello"]}],
        "modulus_store": store,
        # the controller's credentials: they must not reach the nodes
        "modulus_store_options": {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path",
                                  "access_key": "{{ lookup('ansible.builtin.env', 'CONTROLLER_KEY_ID') }}",
                                  "secret_key": "{{ lookup('ansible.builtin.env', 'CONTROLLER_SECRET') }}"},
        # the nodes' own credentials: their env file
        "modulus_pull_env": {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET},
        "modulus_devcontainer_options": {"url_template": server.url_template,
                                         "verify_key": kit.key.public_armored.read_text(), "key_url": ""},
        "modulus_load": False,
        "modulus_sysext_format": "directory",
        "modulus_lock_ttl": TTL, "modulus_lock_wait": WAIT, "modulus_lock_poll": POLL,
        "modulus_build_poll": 1,
        **more,
    }


CONTROLLER_ENV = {"CONTROLLER_KEY_ID": "AKIACONTROLLERONLY01", "CONTROLLER_SECRET": "controller-secret-never-on-a-node"}


def lease(endpoint: str, bucket: str) -> dict | None:
    """The one lease in the bucket (its JSON), None when there is none."""
    s3 = client(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []) if o["Key"].endswith(".lease")]
    if not keys:
        return None
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def image_gets(server: ReleaseServer) -> list[str]:
    return [p for m, p, _s in server.requests if m == "GET" and p.endswith(IMAGE)]


def waiting(run: faults.ModuleRun) -> bool:
    return "TASK [modulus.kmods.modulus : Wait for the host that compiles it]" in run.output()


def finish(run: faults.ModuleRun, timeout: float = 900) -> str:
    run.proc.wait(timeout=timeout)
    out = run.output()
    assert run.proc.returncode == 0, out[-6000:]
    return out


def test_one_host_compiles_the_other_pulls_and_takes_over_from_a_killed_holder(
        kit: Kit, release_server: ReleaseServer, tmp_path: Path) -> None:
    src = held_source(tmp_path)
    hosts = [Host(kit, tmp_path, "hostA"), Host(kit, tmp_path, "hostB")]
    assert hosts[0].owner != hosts[1].owner and hosts[0].owner.startswith("localhost/"), [h.owner for h in hosts]
    pend = kit.releases["pending"]
    figures: dict[str, object] = {}
    with s3_endpoint() as endpoint:
        bucket = new_bucket(endpoint)
        for h in hosts:
            res = h.install_units(node_vars(kit, release_server, endpoint, f"s3://{bucket}/fleet", src), CONTROLLER_ENV)
            assert res.returncode == 0, res.stdout[-4000:]
        by_owner = {h.owner: h for h in hosts}

        # 1. both run for the same pending build: one compiles, the other waits, then pulls
        release_server.reset()
        runs = {h.name: h.start_pull("1.0.0", "first") for h in hosts}
        try:
            holder = by_owner[faults.wait_for(lambda: (lease(endpoint, bucket) or {}).get("owner"), 600,
                                              interval=0.2, what="a lease")]
            other = hosts[1] if holder is hosts[0] else hosts[0]
            held = faults.wait_for(holder.held_file, 600, run=runs[holder.name], what="the held compile")
            faults.wait_for(lambda: waiting(runs[other.name]), 300, run=runs[other.name], what="the other host waiting")
            assert other.held_file() is None
            (held.parent / "go").touch()
            finish(runs[holder.name])
            finish(runs[other.name])
        finally:
            for run in runs.values():
                if run.proc.poll() is None:
                    faults.kill_tree(run)
        [built] = holder.record()
        [pulled] = other.record()
        assert (built["source"], built["pushed"], built["os_version"]) == ("built", True, pend.version), built
        assert pulled["source"] == "pulled" and not pulled["pushed"], pulled
        assert len(image_gets(release_server)) == 1, release_server.requests
        assert lease(endpoint, bucket) is None, "the holder released its lock"

        # 2. a new build: the holder is killed mid-compile; the other takes over once its lease lapsed
        for h in hosts:
            res = h.install_units(node_vars(kit, release_server, endpoint, f"s3://{bucket}/fleet", src,
                                            modulus_drivers=[{"name": DRIVER, "version": "2.0.0", "recipe": "generic",
                                                              "source": str(src), "modules": ["modulus_hello"]}]),
                                  CONTROLLER_ENV)
            assert res.returncode == 0, res.stdout[-4000:]
        runs = {h.name: h.start_pull("2.0.0", "second") for h in hosts}
        try:
            victim = by_owner[faults.wait_for(lambda: (lease(endpoint, bucket) or {}).get("owner"), 600,
                                              interval=0.2, what="a lease")]
            taker = hosts[1] if victim is hosts[0] else hosts[0]
            faults.wait_for(victim.held_file, 600, run=runs[victim.name], what="the held compile")
            faults.wait_for(lambda: waiting(runs[taker.name]), 300, run=runs[taker.name], what="the other host waiting")
            escaped = faults.kill_tree(runs[victim.name], dirs=[runs[victim.name].tag_dir, victim.root])
            t_kill, wall_kill = time.monotonic(), time.time()
            dead = lease(endpoint, bucket)
            assert dead is not None and dead["owner"] == victim.owner, dead
            taken = faults.wait_for(lambda: (lambda cur: cur if cur and cur["owner"] == taker.owner else None)(
                lease(endpoint, bucket)), WAIT + 30, interval=0.1, run=runs[taker.name], what="the takeover")
            takeover_s = time.monotonic() - t_kill
            # nothing of the killed run is left: no process of its tree, none in its root
            assert faults.processes_referencing([runs[victim.name].tag_dir, victim.root], [runs[victim.name].tag]) == []
            held = faults.wait_for(taker.held_file, 600, run=runs[taker.name], what="the taker's held compile")
            (held.parent / "go").touch()
            finish(runs[taker.name])
        finally:
            for run in runs.values():
                if run.proc.poll() is None:
                    faults.kill_tree(run)
        # taken over only once the lease lapsed (the killed holder renewed it no more), within lock_wait
        assert taken["acquired"] >= dead["expires"], (dead, taken)
        assert dead["expires"] - wall_kill <= TTL + 1, (dead, wall_kill)
        assert takeover_s < WAIT, takeover_s
        [rebuilt] = taker.record()
        assert rebuilt["source"] == "built" and rebuilt["pushed"] and rebuilt["driver_version"] == "2.0.0", rebuilt
        assert lease(endpoint, bucket) is None
        # the killed host's next run pulls what the other pushed, and sweeps what the kill left (the
        # workspace of its compile, with the developer container's mounts)
        assert faults.mounts_under([victim.root]), "the kill left the compile's mounts (else it was not mid-compile)"
        out = finish(victim.start_pull("2.0.0", "after"))
        [after] = victim.record()
        assert after["source"] == "pulled", (after, out[-3000:])
        assert faults.mounts_under([victim.root]) == [] and faults.loops_backed_by([victim.root]) == []
        assert not list((victim.root / "opt/modulus/archive").rglob(".*.build-*"))
        keys = [o["Key"] for o in client(endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
        assert len([k for k in keys if k.endswith(".tar.gz")]) == 2, keys
        figures.update({
            "lock_ttl (s)": TTL,
            "killed holder's lease left (s after the kill)": round(dead["expires"] - wall_kill, 1),
            "kill to takeover (s)": round(takeover_s, 1),
            "processes of the killed run outside its process group": len(escaped),
        })
    print("\nfleet lock figures:\n" + "\n".join(f"  {k}: {v}" for k, v in figures.items()))


def test_a_host_that_is_not_a_builder_waits_then_fails_naming_the_option(
        kit: Kit, release_server: ReleaseServer, tmp_path: Path) -> None:
    src = held_source(tmp_path)
    host = Host(kit, tmp_path, "puller")
    with s3_endpoint() as endpoint:
        bucket = new_bucket(endpoint)
        res = host.install_units(node_vars(kit, release_server, endpoint, f"s3://{bucket}/fleet", src,
                                           modulus_builder=False, modulus_lock_ttl=2, modulus_lock_wait=4),
                                 CONTROLLER_ENV)
        assert res.returncode == 0, res.stdout[-4000:]
        release_server.reset()
        run = host.start_pull("1.0.0", "alone")
        run.proc.wait(timeout=600)
        out = run.output()
        assert run.proc.returncode != 0, out[-4000:]
        assert "this host is not a builder (modulus_builder: false)" in out, out[-4000:]
        assert "modulus_lock_wait (4 s)" in out, out[-4000:]
        assert image_gets(release_server) == []
        assert client(endpoint).list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0, "no lease, no build"


def test_nodes_get_no_controller_credentials_and_no_signing_key_unless_builders(
        kit: Kit, release_server: ReleaseServer, tmp_path: Path) -> None:
    src = held_source(tmp_path)
    key = "/etc/modulus/fleet-signing-key"
    builder, puller, named = Host(kit, tmp_path, "builder"), Host(kit, tmp_path, "puller"), Host(kit, tmp_path, "named")
    endpoint, store = "http://127.0.0.1:9", "s3://fleet/kmods"
    common = {"modulus_signing_key": key, "modulus_trusted_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB fleet"]}
    for host, more in ((builder, {}), (puller, {"modulus_builder": False}),
                       (named, {"modulus_builder": False,
                                "modulus_pull_store_options": {"access_key": "AKIANAMEDFORTHENODE1",
                                                               "secret_key": "named-for-this-node"}})):
        res = host.install_units(node_vars(kit, release_server, endpoint, store, src, **common, **more), CONTROLLER_ENV)
        assert res.returncode == 0, res.stdout[-4000:]
        assert CONTROLLER_ENV["CONTROLLER_SECRET"] not in res.stdout
    for host in (builder, puller, named):
        etc = host.root / "etc/modulus"
        for path in etc.iterdir():
            text = path.read_text()
            for secret in CONTROLLER_ENV.values():
                assert secret not in text, (path, secret)
        assert stat.S_IMODE((etc / "pull.env").stat().st_mode) == 0o600
        assert stat.S_IMODE((etc / "vars.yml").stat().st_mode) == 0o600
        options = yaml.safe_load((etc / "vars.yml").read_text())["modulus_store_options"]
        assert options["endpoint_url"] == endpoint and options["addressing_style"] == "path", options
    vb, vp, vn = (yaml.safe_load((h.root / "etc/modulus/vars.yml").read_text()) for h in (builder, puller, named))
    assert vb["modulus_builder"] is True and vb["modulus_signing_key"] == key
    assert vp["modulus_builder"] is False and "modulus_signing_key" not in vp
    assert "access_key" not in vb["modulus_store_options"] and "secret_key" not in vp["modulus_store_options"]
    # credentials the operator names for the nodes do reach them
    assert vn["modulus_store_options"]["secret_key"] == "named-for-this-node"
    assert "modulus_signing_key" not in vn
