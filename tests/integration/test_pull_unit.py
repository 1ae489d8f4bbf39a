"""The pull units under a real systemd: a booted container (tests/sim/pullhost.py) dressed as a
Flatcar host running kit release 9001.1.0 (kernel 6.1.0-47), with the kit's update_engine_client and
no Python at all.

1. The role's units.yml installs the units into the container's root (from outside, as files).
   Inside, ``systemctl enable --now modulus@modulus-hello-1.0.0.service``: the bootstrap installs a
   portable Python (a locally built, checksum-pinned tarball) and a virtual environment from a
   wheel directory, then ansible-pull clones a git repository of this work tree and runs
   playbooks/pull.yml, which pulls the hello build for the running kernel from the S3 endpoint
   (pushed beforehand from the machine: nothing compiles in the container) and installs it.
2. update_engine switches to UPDATED_NEED_REBOOT (9001.2.0 written to USR-B) and says so on D-Bus:
   the watcher starts modulus-pending@, which stages the build of the pending kernel while a block
   inhibitor holds the reboot.
3. The container "reboots" into 9001.2.0 (kernel 6.1.0-50), without network, Python or the
   checkout: systemd-sysext merges the staged image before any modulus unit runs.

The figures (update to staged build, reboot held, boot to merged modules) are printed (pytest -s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim import ansible_run
from sim.kit import Kit
from sim.pullhost import PullHost, mono_s, portable_python, pull_root, snapshot_repo, wheelhouse
from sim.s3 import TEST_KEY_ID, TEST_SECRET, new_bucket, s3_endpoint

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "tests" / "fixtures" / "hello"
DRIVER, VERSION = "modulus-hello", "1.0.0"
INSTANCE = f"{DRIVER}-{VERSION}"
PACKAGES = ["ansible-core==2.19.14", "boto3"]

pytestmark = pytest.mark.slow


def hello_builds(kit: Kit) -> dict[str, dict]:
    """kmod_build of the hello module for both kit releases on the machine (cached between runs by
    kmod_build's own up-to-date check): name -> the module's result."""
    from sim.kit import cache_root
    base = cache_root() / "pull" / f"hello-{kit.recipe_hash}"
    out = {}
    for name, rel in kit.releases.items():
        args = {"image": str(rel.image_raw), "recipe": "generic", "driver": DRIVER, "driver_version": VERSION,
                "source": str(HELLO), "modules": ["modulus_hello"], "dest": str(base / name)}
        res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
        assert not res.get("failed"), text
        out[name] = res
    return out


def install_units(root: Path, tmp: Path, extra: dict) -> None:
    """The role's units.yml with modulus_host_root = the container's root (files only)."""
    pb = tmp / "units.yml"
    pb.write_text("- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
                  "    - ansible.builtin.include_role:\n        name: modulus.kmods.modulus\n        tasks_from: units\n")
    inv = tmp / "inventory.yml"
    inv.write_text(json.dumps({"all": {"hosts": {"localhost": {"ansible_connection": "local",
                                                                "ansible_python_interpreter": sys.executable}}}}))
    extra_file = tmp / "extra.json"
    extra_file.write_text(json.dumps({"modulus_host_root": str(root), **extra}))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inv), str(pb),
                           "-e", f"@{extra_file}"], capture_output=True, text=True, env=ansible_run.ansible_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def wait_for(cond, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return None


def test_pull_unit_keeps_a_flatcar_host_current(kit: Kit, tmp_path: Path) -> None:
    builds = hello_builds(kit)
    cur, pend = kit.releases["current"], kit.releases["pending"]
    tarball, sha = portable_python()
    wheels = wheelhouse(PACKAGES)
    repo = snapshot_repo(REPO, tmp_path / "repo")
    figures: dict[str, object] = {}

    with s3_endpoint() as endpoint:
        bucket = new_bucket(endpoint)
        store = f"s3://{bucket}/fleet"
        opts = {"endpoint_url": endpoint, "access_key": TEST_KEY_ID, "secret_key": TEST_SECRET, "region": "us-east-1"}
        for name in ("current", "pending"):
            res, text = ansible_run.run_module("modulus.kmods.kmod_archive", {
                "state": "present", "store": store, "src": builds[name]["dest"], "identity": builds[name]["identity"],
                **opts}, timeout=300)
            assert not res.get("failed"), text

        root = pull_root()
        assert not list(root.path.glob("usr/bin/python*")), "the container must start without Python"
        with PullHost(root, tmp_path / "host", kit, binds={"/srv/modulus.git": repo, "/srv/python": tarball.parent,
                                                           "/srv/wheels": wheels}) as host:
            host.dress(release="current", update="idle")
            install_units(host.merged, tmp_path, {
                "modulus_drivers": [{"name": DRIVER, "version": VERSION, "recipe": "generic", "source": "/nonexistent",
                                     "modules": ["modulus_hello"]}],
                "modulus_store": store,
                "modulus_store_options": {"endpoint_url": endpoint, "region": "us-east-1"},
                "modulus_pull_env": {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET},
                "modulus_load": False,  # nspawn keeps CAP_SYS_MODULE from the container
                "modulus_sysext_format": "directory",  # no loop devices in the container
                "modulus_pull_repo": "file:///srv/modulus.git",
                "modulus_pull_branch": "main",
                "modulus_python_mode": "portable",
                "modulus_python_url": f"file:///srv/python/{tarball.name}",
                "modulus_python_sha256": sha,
                "modulus_pip_find_links": "/srv/wheels",
                "modulus_pip_packages": PACKAGES,
                "modulus_units_watch_interval": "4min",  # far longer than the test waits: D-Bus starts the run
            })
            boot_s = host.boot()
            assert host.sh("command -v python3 || echo none").stdout.strip() == "none"

            # the watchers, as docs/pull.md has them enabled by hand (the role does it on a real host)
            host.sh("systemctl enable --now modulus-update-watch.timer modulus-update-dbus.service")
            # 1. enable --now: bootstrap, ansible-pull, pull + install of the running release's build
            t0 = time.monotonic()
            res = host.sh(f"systemctl enable --now modulus@{INSTANCE}.service", timeout=900, check=False)
            first_run_s = time.monotonic() - t0
            journal = host.sh(f"journalctl -b -o cat -u modulus@{INSTANCE}.service", check=False).stdout
            assert res.returncode == 0, res.stderr + journal[-6000:]
            marker = host.sh("cat /opt/modulus/python/.modulus-bootstrap").stdout
            assert "how=portable" in marker and "ansible_core=2.19.14" in marker, marker
            assert host.sh("/opt/modulus/python/venv/bin/python -c 'import boto3, ansible; print(ansible.__file__)'"
                           ).stdout.startswith("/opt/modulus/python/venv/")
            assert f"/opt/modulus/python/dist/{sha}/bin/python3" in marker
            cur_dir = f"/opt/modulus/archive/{DRIVER}/{VERSION}/{cur.kernel}"
            assert host.sh(f"test -f {cur_dir}/manifest.json && echo ok").stdout.strip() == "ok"
            status = host.sh("systemd-sysext status").stdout
            assert f"modulus-{DRIVER}-{cur.version}" in status, status
            assert "ansible-pull file:///srv/modulus.git" in journal, journal[-4000:]
            assert f"{DRIVER} {VERSION} for current {cur.version} ({cur.kernel}): pulled from the store" in journal, \
                journal[-4000:]
            assert not host.sh("ls /var/cache/modulus/devcontainer 2>/dev/null", check=False).stdout.strip()
            # a second start of the bootstrap changes nothing (its marker)
            again = host.sh("set -a; . /etc/modulus/pull.env; /opt/modulus/bin/modulus-bootstrap-python")
            assert "MODULUS_BOOTSTRAP_CHANGED=0" in again.stdout

            # 2. update_engine installs 9001.2.0 and says so on D-Bus: the watcher starts the pending run
            # the listener is subscribed: busctl says so in its journal once BecomeMonitor succeeded
            assert wait_for(lambda: "Monitoring bus message stream." in host.sh(
                "journalctl -b -o cat -u modulus-update-dbus.service", check=False).stdout, 60), host.sh(
                "systemctl status modulus-update-dbus.service; journalctl -b -o cat -u modulus-update-dbus.service",
                check=False).stdout
            host.set_update("need_reboot")
            t_update = time.monotonic()
            host.sh("busctl emit /com/coreos/update1 com.coreos.update1.Manager StatusUpdate xdssx "
                    f"{int(time.time())} 0 UPDATE_STATUS_UPDATED_NEED_REBOOT {pend.version} 486539264")
            pend_image = f"/var/lib/extensions/modulus-{DRIVER}-{pend.version}"
            inhibited: list[str] = []

            def staged() -> bool:
                lst = host.sh("systemd-inhibit --list --no-pager --no-legend 2>/dev/null", check=False).stdout
                if "modulus" in lst:
                    inhibited.append(lst)
                state = host.sh(f"systemctl show -p ActiveState,Result --value modulus-pending@{INSTANCE}.service",
                                check=False).stdout.split()
                done = host.sh(f"test -f /var/lib/modulus/units/{INSTANCE}.pending && test -d {pend_image} && echo yes",
                               check=False).stdout.strip() == "yes"
                return done and "inactive" in state and "success" in state

            assert wait_for(staged, 300, 0.25), host.sh(
                f"ls -la /var/lib/modulus/units /var/lib/extensions; systemctl show -p ActiveState,Result "
                f"modulus-pending@{INSTANCE}.service; journalctl -b -o short-monotonic -u modulus-pending@{INSTANCE}.service "
                "-u modulus-update-watch.service -u modulus-update-dbus.service | grep -v Invoked | tail -n 80",
                check=False).stdout
            staged_s = time.monotonic() - t_update
            pjournal = host.sh(f"journalctl -b -o cat -u modulus-pending@{INSTANCE}.service -u modulus-update-watch.service",
                               check=False).stdout
            assert "starting modulus-pending@" in pjournal and "the reboot waits" in pjournal, pjournal[-4000:]
            assert inhibited and "block" in inhibited[0] and "shutdown" in inhibited[0], inhibited
            pend_dir = f"/opt/modulus/archive/{DRIVER}/{VERSION}/{pend.kernel}"
            assert host.sh(f"test -f {pend_dir}/manifest.json && echo ok").stdout.strip() == "ok"
            # staged, not merged: the running release is still 9001.1.0
            status = host.sh("systemd-sysext status").stdout
            assert f"modulus-{DRIVER}-{pend.version}" not in status and f"modulus-{DRIVER}-{cur.version}" in status
            figures["inhibitor while pending"] = inhibited[0].strip().splitlines()[0]
            host.poweroff()

            # 3. reboot into 9001.2.0: no network, no Python, no checkout: the staged image merges
            host.dress(release="pending", update="idle", booted="B")
            host.binds.clear()
            for gone in ("opt/modulus/python", "var/lib/modulus/pull"):
                shutil.rmtree(host.merged / gone)
            second_boot_s = host.boot(private_network=True)
            show = host.sh("systemctl show -p ActiveEnterTimestampMonotonic --value systemd-sysext.service; "
                           f"systemctl show -p ActiveEnterTimestampMonotonic --value modulus-load-{DRIVER}.service; "
                           f"systemctl show -p InactiveExitTimestampMonotonic --value modulus@{INSTANCE}.service").stdout.split()
            merged_at, loader_at, pull_at = (mono_s(v) for v in show)
            status = host.sh("systemd-sysext status").stdout
            assert f"modulus-{DRIVER}-{pend.version}" in status and f"modulus-{DRIVER}-{cur.version}" not in status, status
            # the build's module is in /usr now (no module index here: the container cannot mount USR-B, so
            # kmod_install warned and the loader loads by path)
            ko = f"/usr/lib/modules/{pend.kernel}/updates/modulus/{DRIVER}/modulus_hello.ko"
            assert host.sh(f"test -f {ko} && echo ok").stdout.strip() == "ok"
            assert merged_at and (pull_at is None or merged_at < pull_at), (merged_at, pull_at)
            assert host.sh("test -e /opt/modulus/python/venv/bin/python || echo absent", check=False).stdout.strip() == "absent"
            host.poweroff()

    merged_s = merged_at - host.started if merged_at else None
    loader_s = loader_at - host.started if loader_at else None
    figures.update({
        "first boot to multi-user (s)": round(boot_s, 2),
        "enable --now: bootstrap + ansible-pull + pull + install (s)": round(first_run_s, 1),
        "UPDATED_NEED_REBOOT to staged pending build, store hit (s)": round(staged_s, 1),
        "reboot held meanwhile": bool(inhibited),
        "boot to merged modules (s)": round(merged_s, 2) if merged_s else None,
        "boot to loader done (s)": round(loader_s, 2) if loader_s else None,
        "second boot to multi-user (s)": round(second_boot_s, 2),
    })
    print("\npull unit figures:\n" + "\n".join(f"  {k}: {v}" for k, v in figures.items()))


def test_default_mode_unit_starts_on_a_fresh_host(kit: Kit, tmp_path: Path) -> None:
    """modulus_pull_repo "" (the default): the container has only what the role's units.yml put there
    (units, scripts, settings and the collection tarball it built, unpacked in /opt/modulus/collection.d)
    and no Python; ``systemctl enable --now`` bootstraps Python (auto: the portable one on Flatcar)
    and runs the installed collection with no git and no checkout."""
    builds = hello_builds(kit)
    cur = kit.releases["current"]
    tarball, sha = portable_python()
    wheels = wheelhouse(PACKAGES)
    with s3_endpoint() as endpoint:
        bucket = new_bucket(endpoint)
        store = f"s3://{bucket}/fleet"
        opts = {"endpoint_url": endpoint, "access_key": TEST_KEY_ID, "secret_key": TEST_SECRET, "region": "us-east-1"}
        res, text = ansible_run.run_module("modulus.kmods.kmod_archive", {
            "state": "present", "store": store, "src": builds["current"]["dest"], "identity": builds["current"]["identity"],
            **opts}, timeout=300)
        assert not res.get("failed"), text
        root = pull_root()
        with PullHost(root, tmp_path / "host", kit, binds={"/srv/python": tarball.parent, "/srv/wheels": wheels}) as host:
            host.dress(release="current", update="idle")
            install_units(host.merged, tmp_path, {
                "modulus_drivers": [{"name": DRIVER, "version": VERSION, "recipe": "generic", "source": "/nonexistent",
                                     "modules": ["modulus_hello"]}],
                "modulus_store": store,
                "modulus_store_options": {"endpoint_url": endpoint, "region": "us-east-1"},
                "modulus_pull_env": {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET},
                "modulus_load": False,
                "modulus_sysext_format": "directory",
                "modulus_python_url": f"file:///srv/python/{tarball.name}",
                "modulus_python_sha256": sha,
                "modulus_pip_find_links": "/srv/wheels",
                "modulus_pip_packages": PACKAGES,
            })
            link = host.merged / "opt/modulus/collections"
            assert link.is_symlink() and (link / "ansible_collections/modulus/kmods/MANIFEST.json").is_file()
            host.boot()
            assert host.sh("command -v python3 || echo none").stdout.strip() == "none"
            assert host.sh("test -e /var/lib/modulus/pull || echo none").stdout.strip() == "none"
            res = host.sh(f"systemctl enable --now modulus@{INSTANCE}.service", timeout=900, check=False)
            journal = host.sh(f"journalctl -b -o cat -u modulus@{INSTANCE}.service", check=False).stdout
            assert res.returncode == 0, res.stderr + journal[-6000:]
            assert "ansible-playbook modulus.kmods.pull (installed collection in /opt/modulus/collections)" in journal
            assert f"{DRIVER} {VERSION} for current {cur.version} ({cur.kernel}): pulled from the store" in journal, \
                journal[-4000:]
            assert "how=portable" in host.sh("cat /opt/modulus/python/.modulus-bootstrap").stdout
            assert host.sh("test -e /var/lib/modulus/pull || echo none").stdout.strip() == "none"
            status = host.sh("systemd-sysext status").stdout
            assert f"modulus-{DRIVER}-{cur.version}" in status, status
            host.poweroff()
