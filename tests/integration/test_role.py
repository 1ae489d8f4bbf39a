"""The role as operators run it, ``ansible-playbook site.yml -l <hosts>``, on simulated Flatcar hosts
(tests/sim/stack.py: the kit's release server, an S3 endpoint, host roots with an update pending).

- Two hosts, one S3 store: the first compiles the project's own module and the real NVIDIA modules
  (``module_type: auto``) for the release it runs and the one it boots next, pushes them, installs
  the current build and stages the pending one; the second pulls every build without downloading
  any developer container; a third run changes nothing.
- A push that failed is made by the next run, from the host's archive.
- Check mode runs the whole chain on a fresh host without downloading, building or writing anything.
- Bad input fails before anything changes, with a message naming the variable and the value.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sim.nvidia import build_cache, keep_archive, seed_archive
from sim.stack import HELLO_DRIVER, Fleet, nvidia_driver

IMAGE = "flatcar_developer_container.bin.bz2"
ARCHIVE = "opt/modulus/archive"

pytestmark = pytest.mark.slow


def site(fleet: Fleet, limit: str, *extra: str) -> subprocess.CompletedProcess:
    return fleet.playbook(["site.yml", "-l", limit, *extra], check=False, capture_output=True, text=True)


def record(fleet: Fleet, host: str) -> list[dict]:
    return json.loads((fleet.host_root(host) / "var/lib/modulus/last-run.json").read_text())["builds"]


def files(root: Path) -> list[str]:
    """Everything below a host root, except the simulated update_engine_client's own call log."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "update_engine_client.calls")


def image_gets(fleet: Fleet) -> list[str]:
    return [path for method, path, _status in fleet.server.requests if method == "GET" and path.endswith(IMAGE)]


def test_two_hosts_one_store_first_builds_second_pulls(tmp_path: Path) -> None:
    with Fleet(tmp_path, ["host1", "host2"], drivers=[dict(HELLO_DRIVER), nvidia_driver()]) as fleet:
        cur, pend = fleet.kit.releases["current"], fleet.kit.releases["pending"]
        cache = build_cache(fleet.kit.recipe_hash)
        archive1 = fleet.host_root("host1") / ARCHIVE
        # NVIDIA builds of an earlier test run, if any: the host finds them in its archive (verified)
        reused = seed_archive(archive1, cache)

        proc = site(fleet, "host1")
        assert proc.returncode == 0, proc.stdout[-8000:]
        keep_archive(archive1, cache)
        first = record(fleet, "host1")
        assert {(b["driver"], b["os_version"], b["kernel_release"]) for b in first} == {
            (d, r.version, r.kernel) for d in ("modulus-hello", "nvidia") for r in (cur, pend)}
        for b in first:
            key = f"{b['driver']}/{b['driver_version']}/{b['kernel_release']}"
            assert b["source"] == ("local" if key in reused else "built"), (b, reused)
            assert b["pushed"], b
            assert b["state"] == ("staged" if b["pending"] else "present"), b
            assert b["dir"] == str(archive1 / key)
            manifest = json.loads((Path(b["dir"]) / "manifest.json").read_text())
            assert manifest["kernel_release"] == b["kernel_release"]
        # the host that compiles downloaded both developer containers
        assert sorted(p.split("/")[-2] for p in image_gets(fleet)) == sorted({cur.version, pend.version})
        keys = fleet.store_keys()
        assert len([k for k in keys if k.endswith(".tar.gz")]) == 4, keys
        # module_type auto resolves the same way everywhere: the 535 build is stored as proprietary
        assert any(k.endswith("/nvidia/535.261.03/proprietary-unsigned.tar.gz") for k in keys), keys
        # the pending builds are staged as images bound to the pending release
        ext = fleet.host_root("host1") / "var/lib/extensions"
        # (a .raw where the host has an image tool, a directory where it has none: sysext_format auto)
        assert {p.name.removesuffix(".raw") for p in ext.iterdir()} >= {f"modulus-nvidia-{pend.version}",
                                                                         f"modulus-nvidia-{cur.version}"}

        fleet.server.reset()
        proc = site(fleet, "host2")
        assert proc.returncode == 0, proc.stdout[-8000:]
        second = record(fleet, "host2")
        assert len(second) == 4
        for b in second:
            assert b["source"] == "pulled" and not b["pushed"], b
            manifest = json.loads((Path(b["dir"]) / "manifest.json").read_text())
            assert manifest["driver"] == b["driver"] and manifest["kernel_release"] == b["kernel_release"]
        # the second host downloaded 0 bytes of developer container
        assert image_gets(fleet) == [], fleet.server.requests
        cache2 = fleet.host_root("host2") / "var/cache/modulus/devcontainer"
        assert not cache2.exists() or not any(cache2.rglob("*.bin"))

        # a third run on the second host changes nothing and downloads nothing
        proc = site(fleet, "host2")
        assert proc.returncode == 0, proc.stdout[-8000:]
        assert "changed=0" in proc.stdout.split("PLAY RECAP")[-1], proc.stdout[-3000:]
        assert {b["source"] for b in record(fleet, "host2")} == {"local"}
        assert image_gets(fleet) == []


def test_a_failed_push_is_made_by_the_next_run(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    key = tmp_path / "fleet-key"
    with Fleet(tmp_path / "fleet", ["host1"], update="idle", extra_vars={"modulus_store": f"file://{store}", "modulus_signing_key": str(key)}) as fleet:
        # the fleet signing key is not deployed yet: the push fails after the compile
        proc = site(fleet, "host1")
        assert proc.returncode != 0 and "Push the build to the fleet store" in proc.stdout, proc.stdout[-5000:]
        assert str(key) in proc.stdout, proc.stdout[-5000:]
        assert not any(store.rglob("*.tar.gz"))
        assert not any(store.rglob("*.lease")), "the lock was not released"
        built = fleet.host_root("host1") / ARCHIVE / "modulus-hello/1.0.0" / fleet.kit.releases["current"].kernel
        assert (built / "manifest.json").is_file()

        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        proc = site(fleet, "host1")
        assert proc.returncode == 0, proc.stdout[-5000:]
        [b] = record(fleet, "host1")
        assert b["source"] == "local" and b["pushed"], b
        assert len(list(store.rglob("*.tar.gz"))) == 1
        assert len(list(store.rglob("*.tar.gz.sig"))) == 1


def test_check_mode_runs_the_whole_chain_and_touches_nothing(tmp_path: Path) -> None:
    with Fleet(tmp_path, ["host1"], drivers=[dict(HELLO_DRIVER), nvidia_driver()]) as fleet:
        root = fleet.host_root("host1")
        before = files(root)
        fleet.server.reset()
        proc = site(fleet, "host1", "--check")
        assert proc.returncode == 0, proc.stdout[-8000:]
        # what would happen, as the run printed it (check mode writes no record)
        assert proc.stdout.count("would be compiled (here, or by the host that takes the fleet lock first) and pushed"
                                 ) == 4, proc.stdout[-6000:]
        assert "compiled in" not in proc.stdout and ", pushed" not in proc.stdout, proc.stdout[-6000:]
        assert image_gets(fleet) == []
        assert files(root) == before
        assert fleet.store_keys() == []


def test_check_mode_on_a_fresh_fleet_reports_per_host_and_writes_nothing(tmp_path: Path) -> None:
    """A fleet nothing has run on yet: the bootstrap says what it would install, each host what it would
    compile or pull, and no host root, store or release server sees a write or a download."""
    with Fleet(tmp_path, ["host1", "host2"], extra_vars={"modulus_python_mode": "portable",
                                                         "modulus_python_url": "https://python.example/cpython.tar.gz",
                                                         "modulus_python_sha256": "ab" * 32}) as fleet:
        roots = {h: fleet.host_root(h) for h in fleet.hosts}
        before = {h: files(r) for h, r in roots.items()}
        proc = site(fleet, "gpu_nodes", "--check")
        assert proc.returncode == 0, proc.stdout[-8000:]
        recap = proc.stdout.split("PLAY RECAP")[-1]
        for host, root in roots.items():
            assert f"{host}" in recap and "failed=0" in recap.split(host)[1].splitlines()[0], recap
            assert files(root) == before[host], host
            assert not (root / "opt/modulus").exists() and not (root / "var/lib/modulus").exists()
        # a report per host: the bootstrap, then each build of each release
        plays = proc.stdout.split("PLAY [")
        boot = next(p for p in plays if p.startswith("Python for Ansible"))
        assert boot.count("bootstrap would install the portable Python https://python.example/cpython.tar.gz") == 2, boot
        cur, pend = fleet.kit.releases["current"], fleet.kit.releases["pending"]
        for rel in (cur, pend):
            line = (f"check mode: modulus-hello 1.0.0 for {'pending' if rel is pend else 'current'} {rel.version} "
                    f"({rel.kernel}): would be compiled (here, or by the host that takes the fleet lock first) and "
                    f"pushed, then {'staged' if rel is pend else 'installed'}")
            assert proc.stdout.count(line) == 2, (line, proc.stdout[-6000:])
        assert image_gets(fleet) == []
        assert fleet.store_keys() == []

        # once a build is in the store, check mode says the other hosts would pull it
        assert site(fleet, "host1").returncode == 0
        fleet.server.reset()
        before2 = files(roots["host2"])
        proc = site(fleet, "host2", "--check")
        assert proc.returncode == 0, proc.stdout[-8000:]
        assert proc.stdout.count("would be pulled from the store") == 2, proc.stdout[-6000:]
        assert "would be compiled" not in proc.stdout
        assert files(roots["host2"]) == before2 and image_gets(fleet) == []


def test_a_driver_version_change_retires_the_old_version(tmp_path: Path) -> None:
    """1.0.0 -> 2.0.0 of the hello module on a host with a pending release: one run serves 2.0.0 for
    both releases, only the 2.0.0 unit stays enabled, and 1.0.0's builds go, except the one the
    running kernel has loaded, which the first run after it is unloaded removes."""
    v1 = dict(HELLO_DRIVER)
    v2 = dict(HELLO_DRIVER, version="2.0.0")
    units = {"modulus_units_enabled": True, "modulus_pull_repo": "https://git.example.invalid/modulus.git"}
    with Fleet(tmp_path, ["host1"], drivers=[v1], extra_vars=units) as fleet:
        cur, pend = fleet.kit.releases["current"], fleet.kit.releases["pending"]
        root = fleet.host_root("host1")
        wants = root / "etc/systemd/system/multi-user.target.wants"
        proc = site(fleet, "host1")
        assert proc.returncode == 0, proc.stdout[-8000:]
        assert sorted(p.name for p in wants.glob("modulus@*")) == ["modulus@modulus-hello-1.0.0.service"]
        old = root / ARCHIVE / "modulus-hello/1.0.0"
        assert sorted(p.name for p in old.iterdir() if p.is_dir()) == sorted([cur.kernel, pend.kernel])
        (root / "var/lib/modulus/units").mkdir(parents=True, exist_ok=True)
        (root / "var/lib/modulus/units/modulus-hello-1.0.0.pending").write_text("boot 9001.2.0\n")
        # the running kernel has 1.0.0 loaded (as /proc/modules and /sys/module show it)
        manifest = json.loads((old / cur.kernel / "manifest.json").read_text())
        srcversion = manifest["modules"][0]["srcversion"]
        (root / "proc/modules").write_text("modulus_hello 16384 0 - Live 0x0000000000000000 (O)\n")
        (root / "sys/module/modulus_hello").mkdir(parents=True)
        (root / "sys/module/modulus_hello/srcversion").write_text(srcversion + "\n")

        fleet.drivers = [v2]
        fleet.write_inventory()
        proc = site(fleet, "host1")
        assert proc.returncode == 0, proc.stdout[-8000:]
        builds = record(fleet, "host1")
        assert {(b["driver_version"], b["release"], b["state"]) for b in builds} == {
            ("2.0.0", "current", "present"), ("2.0.0", "pending", "staged")}, builds
        state = json.loads((root / "var/lib/modulus/kmod_install/modulus-hello.json").read_text())
        assert {e["driver_version"] for e in state["images"].values()} == {"2.0.0"}, state["images"]
        assert sorted(p.name for p in wants.glob("modulus@*")) == ["modulus@modulus-hello-2.0.0.service"]
        assert not (root / "var/lib/modulus/units/modulus-hello-1.0.0.pending").exists()
        assert "modulus-hello 1.0.0 is retired" in proc.stdout
        # the loaded 1.0.0 build stays; the other one is gone
        assert sorted(p.name for p in old.iterdir() if p.is_dir()) == [cur.kernel]
        assert f"kept 1.0.0 for {cur.kernel} (loaded in the running kernel: modulus_hello)" in proc.stdout
        # a pull run of the old unit (still queued somewhere) stages nothing
        vars_file = root / "etc/modulus/vars.yml"
        assert "2.0.0" in vars_file.read_text()

        # after the reboot 1.0.0 is no longer loaded: the next run removes it and changes nothing else
        (root / "proc/modules").write_text("")
        proc = site(fleet, "host1")
        assert proc.returncode == 0, proc.stdout[-8000:]
        assert not old.exists()
        assert sorted(p.name for p in (root / ARCHIVE / "modulus-hello").iterdir()) == ["2.0.0"]


@pytest.mark.parametrize("bad, words", [
    ({"modulus_drivers": [{"name": "nvidia", "version": "535.104.05\n"}]}, ["modulus_drivers[0]", "535.104.05\\n"]),
    ({"modulus_drivers": [{"name": "zfs", "version": "2.2.4"}]}, ["modulus_drivers[0]", "unknown driver", '"zfs"']),
    ({"modulus_store": "s3:/gpu-fleet"}, ["modulus_store", '"s3:/gpu-fleet"']),
    ({"modulus_archive_root": "/usr/lib/modulus"}, ["modulus_archive_root", '"/usr/lib/modulus"']),
    ({"modulus_min_free_space": 1 << 60}, ["no space left", "modulus_min_free_space"]),
    ({"modulus_store_options": {"endpoint_url": "http://127.0.0.1:9", "access_key": "AKIAX", "secret_key": "s3cr3t-never-shown",
                                "region": "us-east-1"}}, ["Reach the fleet store"]),
])
def test_bad_input_fails_early_and_changes_nothing(tmp_path: Path, bad: dict, words: list[str]) -> None:
    with Fleet(tmp_path, ["host1"], extra_vars=bad) as fleet:
        root = fleet.host_root("host1")
        before = files(root)
        proc = site(fleet, "host1")
        assert proc.returncode != 0, proc.stdout[-3000:]
        for word in words:
            assert word in proc.stdout, (word, proc.stdout[-3000:])
        assert "s3cr3t-never-shown" not in proc.stdout
        assert files(root) == before
        assert fleet.server.requests == [] or image_gets(fleet) == []


def test_boto3_missing_fails_early(tmp_path: Path) -> None:
    """An s3:// store on a host whose Python has no boto3 fails at the first look at the store."""
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    with Fleet(tmp_path / "fleet", ["host1"], extra_vars={"ansible_python_interpreter": str(venv / "bin/python")}) as fleet:
        root = fleet.host_root("host1")
        before = files(root)
        proc = site(fleet, "host1")
        assert proc.returncode != 0
        assert "boto3" in proc.stdout and "Reach the fleet store" in proc.stdout, proc.stdout[-3000:]
        assert files(root) == before
    shutil.rmtree(venv, ignore_errors=True)
