"""The README's flow, as written in playbooks/build_or_pull.yml, on two simulated Flatcar hosts and
one S3 store (moto_server): the first host builds the project's own module and the real NVIDIA
modules (``module_type: auto``) for the release it runs and the one it boots next, and pushes them;
the second finds each build by its identity and pulls it, without downloading any developer
container. Then: a push that failed is made by the next run, and the whole chain runs in check mode
on a fresh host without downloading, building or writing anything.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import yaml

from sim import ansible_run
from sim.kit import Kit, ReleaseServer
from sim.nvidia import build_cache, keep_archive, nvidia_run, seed_archive
from sim.s3 import TEST_KEY_ID, TEST_SECRET, client, new_bucket, s3_endpoint

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "build_or_pull.yml"
HELLO = REPO / "tests" / "fixtures" / "hello"
IMAGE = "flatcar_developer_container.bin.bz2"

pytestmark = pytest.mark.slow


def hello_driver() -> dict:
    return {"recipe": "generic", "driver": "modulus-hello", "driver_version": "1.0.0", "source": str(HELLO),
            "modules": ["modulus_hello"]}


def nvidia_driver() -> dict:
    run = nvidia_run()
    return {"recipe": "nvidia", "driver_version": run.version, "source": str(run.path),
            "checksum": f"sha256:{run.sha256}", "module_type": "auto"}


def write_inventory(path: Path, hosts: dict[str, dict], group_vars: dict) -> Path:
    inv = {"all": {"children": {"gpu_nodes": {"hosts": hosts, "vars": group_vars}}}}
    path.write_text(yaml.safe_dump(inv, sort_keys=True))
    return path


def host_vars(kit: Kit, server: ReleaseServer, root: Path, work: Path) -> dict:
    return {
        "modulus_host_root": str(root),
        "modulus_archive_root": str(work / "archive"),
        "modulus_devcontainer_options": {
            "url_template": server.url_template, "fallback_url_template": "",
            "verify_key": str(kit.key.public_armored), "cache_dir": str(work / "devcontainer"),
        },
    }


def common_vars(store: str, store_options: dict, drivers: list[dict]) -> dict:
    import sys
    return {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "modulus_store": store, "modulus_store_options": store_options, "modulus_drivers": drivers}


def image_requests(server: ReleaseServer) -> list[str]:
    return [p for p in server.hits if IMAGE in p]


def summary(last: dict, host: str) -> list[dict]:
    return last[host]["modulus_summary"]


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    out = client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in out)


@pytest.fixture(scope="module")
def s3() -> Optional[str]:
    with s3_endpoint() as endpoint:
        yield endpoint


def s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "access_key": TEST_KEY_ID, "secret_key": TEST_SECRET, "region": "us-east-1"}


def test_two_hosts_one_store_first_builds_second_pulls(kit: Kit, release_server: ReleaseServer, s3: str,
                                                        tmp_path: Path) -> None:
    bucket = new_bucket(s3)
    drivers = [hello_driver(), nvidia_driver()]
    hosts = {}
    for name in ("host1", "host2"):
        root = kit.host_root(tmp_path / name, update="need_reboot")
        hosts[name] = host_vars(kit, release_server, root, tmp_path / name)
    inv = write_inventory(tmp_path / "inventory.yml", hosts,
                          common_vars(f"s3://{bucket}/fleet", s3_options(s3), drivers))
    cache = build_cache(kit.recipe_hash)
    reused = seed_archive(tmp_path / "host1" / "archive", cache)

    release_server.reset()
    rc, out, last = ansible_run.run_playbook(PLAYBOOK, inv, limit="host1", tree_dir=tmp_path / "tree1")
    assert rc == 0, out[-8000:]
    keep_archive(tmp_path / "host1" / "archive", cache)
    first = summary(last, "host1")
    cur, pend = kit.releases["current"], kit.releases["pending"]
    assert {(s["driver"], s["os_version"], s["kernel_release"]) for s in first} == {
        (d, r.version, r.kernel) for d in ("modulus-hello", "nvidia") for r in (cur, pend)}
    for s in first:
        assert s["pushed"] and not s["pulled"], s
        if s["driver"] == "modulus-hello":
            assert s["built"], s
        else:
            # a cached NVIDIA build is reused only if kmod_build found it up to date for these inputs
            assert s["built"] == (f"nvidia/{s['driver_version']}/{s['kernel_release']}" not in reused), (s, reused)
    # both developer containers were downloaded by the host that builds
    assert {p.split("/")[-2] for p in image_requests(release_server) if p.endswith(IMAGE)} == {cur.version, pend.version}
    keys = s3_keys(s3, bucket)
    assert len([k for k in keys if k.endswith(".tar.gz")]) == 4, keys
    # module_type auto resolves the same way everywhere: the 535 build is stored as proprietary
    assert any(k.endswith("/nvidia/535.261.03/proprietary-unsigned.tar.gz") for k in keys), keys
    for s in first:
        manifest = json.loads((Path(s["dest"]) / "manifest.json").read_text())
        assert manifest["kernel_release"] == s["kernel_release"]
        assert s["dest"] == str(tmp_path / "host1" / "archive" / s["driver"] / s["driver_version"] / s["kernel_release"])

    release_server.reset()
    rc, out, last = ansible_run.run_playbook(PLAYBOOK, inv, limit="host2", tree_dir=tmp_path / "tree2")
    assert rc == 0, out[-8000:]
    second = summary(last, "host2")
    assert len(second) == 4
    for s in second:
        assert s["pulled"] and not s["built"] and not s["pushed"], s
        manifest = json.loads((Path(s["dest"]) / "manifest.json").read_text())
        assert manifest["driver"] == s["driver"] and manifest["kernel_release"] == s["kernel_release"]
    # the second host downloaded 0 bytes of developer container
    assert image_requests(release_server) == [], release_server.hits
    assert not (tmp_path / "host2" / "devcontainer").exists() or not any((tmp_path / "host2" / "devcontainer").rglob("*.bin"))

    # a third run on the second host changes nothing
    rc, out, last = ansible_run.run_playbook(PLAYBOOK, inv, limit="host2", tree_dir=tmp_path / "tree3")
    assert rc == 0, out[-8000:]
    assert "changed=0" in out, out[-3000:]


def test_a_failed_push_is_made_by_the_next_run(kit: Kit, release_server: ReleaseServer, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    root = kit.host_root(tmp_path / "host", update="idle")
    inv = write_inventory(tmp_path / "inventory.yml", {"host1": host_vars(kit, release_server, root, tmp_path / "h")},
                          common_vars(f"file://{store}", {}, [hello_driver()]))
    # the store can be read (the lookup works) but not written: the push fails
    subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
        rc, out, _last = ansible_run.run_playbook(PLAYBOOK, inv, limit="host1")
    finally:
        subprocess.run(["umount", str(store)], check=True)
    assert rc != 0 and "Push it to the fleet store" in out, out[-5000:]
    assert not any(store.rglob("*.tar.gz"))
    built = tmp_path / "h" / "archive" / "modulus-hello" / "1.0.0" / kit.releases["current"].kernel
    assert (built / "manifest.json").is_file()

    rc, out, last = ansible_run.run_playbook(PLAYBOOK, inv, limit="host1", tree_dir=tmp_path / "tree")
    assert rc == 0, out[-5000:]
    [s] = summary(last, "host1")
    assert s["pushed"] and not s["built"], s
    assert len(list(store.rglob("*.tar.gz"))) == 1


def test_check_mode_runs_the_whole_chain_and_touches_nothing(kit: Kit, release_server: ReleaseServer,
                                                             tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    root = kit.host_root(tmp_path / "host", update="need_reboot")
    work = tmp_path / "h"
    inv = write_inventory(tmp_path / "inventory.yml", {"host1": host_vars(kit, release_server, root, work)},
                          common_vars(f"file://{store}", {}, [hello_driver(), nvidia_driver()]))
    release_server.reset()
    rc, out, last = ansible_run.run_playbook(PLAYBOOK, inv, limit="host1", check=True, tree_dir=tmp_path / "tree")
    assert rc == 0, out[-8000:]
    report = summary(last, "host1")
    assert len(report) == 4
    for s in report:
        assert s["built"] and s["pushed"] and not s["pulled"], s  # what would happen
    assert {s["kernel_release"] for s in report} == {r.kernel for r in kit.releases.values()}
    assert image_requests(release_server) == []
    assert not work.exists() or not any(p.is_file() for p in work.rglob("*")), sorted(work.rglob("*"))
    assert list(store.iterdir()) == []
