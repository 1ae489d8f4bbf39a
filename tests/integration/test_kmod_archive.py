"""modulus.kmods.kmod_archive run through Ansible (``ansible localhost -m``) against real stores:
moto_server (S3 over HTTP on 127.0.0.1), a file:// directory and a read-only http:// server."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from sim import ansible_run, faults
from sim.kmod_archive_fixtures import IDENT, make_build, make_legacy_archive, manifest_of
from sim.s3 import TEST_KEY_ID, TEST_SECRET, MotoServer, client, enable_auth, free_port, new_bucket, s3_endpoint

ROOT = Path(__file__).resolve().parents[2]
MODULE = "modulus.kmods.kmod_archive"
NAMING = {k: IDENT[k] for k in ("os_version", "kernel_release", "driver", "driver_version")}


def module_cmd(args: dict, check: bool = False, diff: bool = False, verbose: bool = False) -> list[str]:
    return ansible_run.module_cmd(MODULE, args, check, diff, verbose)


def run(args: dict, check: bool = False, diff: bool = False, verbose: bool = False) -> tuple[dict, str]:
    return ansible_run.run_module(MODULE, args, check=check, diff=diff, verbose=verbose, timeout=300)


@pytest.fixture(scope="module")
def endpoint():
    with s3_endpoint() as url:
        yield url


def s3_args(endpoint: str, bucket: str, **kw: object) -> dict:
    args = {"store": f"s3://{bucket}/fleet", "endpoint_url": endpoint, "access_key": TEST_KEY_ID,
            "secret_key": TEST_SECRET, "region": "us-east-1", "addressing_style": "path",
            "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    args.update(kw)
    return args


def test_s3_push_pull_idempotence_check_and_diff(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    src = make_build(tmp_path / "src")
    res, out = run(dict(s3_args(endpoint, bucket), src=str(src)), check=True, diff=True)
    assert res["changed"] and "+    \"key\": \"flatcar/amd64-usr" in out
    assert client(endpoint).list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    res, out = run(dict(s3_args(endpoint, bucket), src=str(src)), diff=True)
    assert res["changed"] and res["sha256"] == manifest_of(src)["archive"]["sha256"], out
    assert f'+    "sha256": "{res["sha256"]}"' in out
    res, _ = run(dict(s3_args(endpoint, bucket), src=str(src)))
    assert not res["changed"] and res["store_requests"] == 1
    dest = tmp_path / "opt" / "nvidia"
    pulled, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), **NAMING), diff=True)
    assert pulled["changed"] and pulled["sha256"] == res["sha256"], out
    assert (dest / "lib/modules/6.1.0-47-amd64/nvidia.ko").read_bytes() == (src / "lib/modules/6.1.0-47-amd64/nvidia.ko").read_bytes()
    again, _ = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), **NAMING))
    assert not again["changed"] and again["store_requests"] == 1
    q, _ = run(dict(s3_args(endpoint, bucket), state="query", **NAMING))
    assert q["exists"] and not q["legacy"] and q["sha256"] == res["sha256"]


def test_s3_replaced_object_refused_and_dest_kept(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    src = make_build(tmp_path / "src")
    res, _ = run(dict(s3_args(endpoint, bucket), src=str(src)))
    dest = tmp_path / "dest"
    run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), **NAMING))
    before = {str(p): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    key = "fleet/" + res["key"]
    meta = client(endpoint).head_object(Bucket=bucket, Key=key)["Metadata"]
    meta["sha256"] = "f" * 64  # another build was uploaded by hand under the same key
    other = make_build(tmp_path / "other", seed=9)
    run(dict(s3_args(endpoint, bucket, store=f"s3://{bucket}/scratch"), src=str(other)))
    body = client(endpoint).get_object(Bucket=bucket, Key="scratch/" + res["key"])["Body"].read()
    client(endpoint).put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)
    failed, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), **NAMING))
    assert failed.get("failed") and "metadata says" in failed["msg"], out
    assert {str(p): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before


def test_s3_legacy_archive_is_imported(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    legacy = tmp_path / "legacy.tar.gz"
    files = make_legacy_archive(legacy, with_dot=True)
    client(endpoint).upload_file(str(legacy), bucket, "fleet/9001.1.0-stable-nvidia-535.261.03.tar.gz")
    dest = tmp_path / "dest"
    # the original tool's archives are imported only when asked for (legacy: true)
    res, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), **NAMING))
    assert res["failed"] and "has no archive" in res["msg"] and not dest.exists(), out
    res, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), legacy=True, **NAMING))
    assert res["changed"] and res["legacy"] and res["authenticated"] is False, out
    manifest = manifest_of(dest)
    assert manifest["imported"] == "legacy" and set(manifest["files"]) == set(files)
    # the imported tree can be pushed in the new layout
    pushed, out = run(dict(s3_args(endpoint, bucket), src=str(dest)))
    assert pushed["changed"] and pushed["key"].endswith("535.261.03/proprietary-unsigned.tar.gz"), out


def test_four_concurrent_processes_one_gets_the_lock(endpoint: str) -> None:
    bucket = new_bucket(endpoint)
    args = dict(s3_args(endpoint, bucket), state="locked", lock_ttl=600, **NAMING)
    procs = [subprocess.Popen(module_cmd(dict(args, lock_owner=f"host-{i}")), env=ansible_run.ansible_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(ansible_run.parse_result(out))
    winners = [r for r in results if r["lock"]["acquired"]]
    assert len(winners) == 1, results
    owner = winners[0]["lock"]["owner"]
    assert all(r["lock"]["holder"]["owner"] == owner for r in results if not r["lock"]["acquired"])
    # a loser asking again with a bounded wait gives up once it has waited that long (its own count of
    # the seconds it waited, not more than the run measured here)
    started = time.monotonic()
    loser, _ = run(dict(args, lock_owner="host-late", lock_ttl=1, lock_wait=2, lock_poll=0.5))
    wall = time.monotonic() - started
    assert not loser["lock"]["acquired"] and not loser["lock"]["archive_exists"], loser
    assert loser["lock"]["holder"]["owner"] == owner and 2 <= loser["lock"]["waited"] <= wall, (loser, wall)
    # only the holder can release it
    other, _ = run(dict(args, state="unlocked", lock_owner="host-late"))
    assert not other["changed"] and not other["lock"]["released"]
    mine, _ = run(dict(args, state="unlocked", lock_owner=owner))
    assert mine["changed"] and mine["lock"]["released"]


def test_lock_wait_must_outlast_the_ttl(endpoint: str) -> None:
    bucket = new_bucket(endpoint)
    res, out = run(dict(s3_args(endpoint, bucket), state="locked", lock_owner="a", lock_ttl=300, lock_wait=120, **NAMING))
    assert res["failed"] and "lock_wait=120 must be longer than lock_ttl=300" in res["msg"], out


def test_lock_waits_until_the_build_appears(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    args = dict(s3_args(endpoint, bucket), state="locked", **NAMING)
    first, _ = run(dict(args, lock_owner="builder"))
    assert first["lock"]["acquired"]
    waiter = faults.start_module("modulus.kmods.kmod_archive", dict(args, lock_owner="waiter", lock_ttl=60,
                                                                   lock_wait=120,
                                                                   lock_poll=0.5), tag_dir=tmp_path / "waiter")
    try:
        # the waiter found the lease held and no archive, and sleeps between two looks
        faults.wait_for(lambda: faults.sleeping(waiter, "AnsiballZ_kmod_archive"), timeout=120, run=waiter,
                        what="the waiter's poll sleep")
        src = make_build(tmp_path / "src")
        run(dict(s3_args(endpoint, bucket), src=str(src)))
        res = waiter.result(timeout=120)
    finally:
        if waiter.proc.poll() is None:
            faults.kill_tree(waiter)
    assert not res["lock"]["acquired"] and res["lock"]["archive_exists"], res


def test_file_store(tmp_path: Path) -> None:
    store = tmp_path / "shared"
    store.mkdir()
    src = make_build(tmp_path / "src")
    args = {"store": f"file://{store}"}
    assert run(dict(args, src=str(src)))[0]["changed"]
    assert not run(dict(args, src=str(src)))[0]["changed"]
    dest = tmp_path / "dest"
    assert run(dict(args, state="fetched", dest=str(dest), **NAMING))[0]["changed"]
    assert not run(dict(args, state="fetched", dest=str(dest), **NAMING))[0]["changed"]
    locked, _ = run(dict(args, state="locked", lock_owner="a", driver="other", **{k: v for k, v in NAMING.items() if k != "driver"}))
    assert locked["lock"]["acquired"]
    gone, _ = run(dict(args, state="absent", **NAMING), check=True)
    assert gone["changed"] and (store / "flatcar").exists()


@contextmanager
def http_server(directory: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                             "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)


def test_http_read_only_store(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    src = make_build(tmp_path / "src")
    assert run({"store": f"file://{mirror}", "src": str(src)})[0]["changed"]
    with http_server(mirror) as (url, _proc):
        args = {"store": url}
        dest = tmp_path / "dest"
        res, out = run(dict(args, state="fetched", dest=str(dest), **NAMING))
        assert res["changed"] and res["sha256"] == manifest_of(src)["archive"]["sha256"], out
        again, _ = run(dict(args, state="fetched", dest=str(dest), **NAMING))
        assert not again["changed"]
        pushed, _ = run(dict(args, src=str(src)))
        assert pushed["failed"] and "read-only" in pushed["msg"]
        locked, _ = run(dict(args, state="locked", **NAMING))
        assert locked["failed"] and "read-only" in locked["msg"]
        missing, _ = run(dict(args, state="fetched", dest=str(tmp_path / "d2"), **dict(NAMING, driver_version="999.0.1")))
        assert missing["failed"] and "has no archive" in missing["msg"]


def test_missing_bucket_and_unreachable_store(endpoint: str, tmp_path: Path) -> None:
    src = make_build(tmp_path / "src")
    res, out = run(dict(s3_args(endpoint, "no-such-bucket-kmods"), src=str(src)), verbose=True)
    assert res["failed"] and "no-such-bucket-kmods does not exist" in res["msg"] and "s3://" in res["msg"]
    assert TEST_SECRET not in out
    port = free_port()
    res, out = run(dict(s3_args(f"http://127.0.0.1:{port}", "bucket", connect_timeout=2, max_attempts=1), src=str(src)))
    assert res["failed"] and "unreachable" in res["msg"] and str(port) in res["msg"]
    assert TEST_SECRET not in out


def test_wrong_credentials_clear_error_without_secret(tmp_path: Path) -> None:
    src = make_build(tmp_path / "src")
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as server:
        key_id, secret = enable_auth(server)
        client(server.endpoint, key_id, secret).create_bucket(Bucket="auth-kmods")
        wrong = "Wr0ngSecretValueThatMustNeverBePrinted"
        res, out = run(dict(s3_args(server.endpoint, "auth-kmods", access_key=key_id, secret_key=wrong),
                            src=str(src)), verbose=True)
        assert res["failed"] and "signature does not match" in res["msg"] and "auth-kmods" in res["msg"], out
        assert wrong not in out and secret not in out
        res, out = run(dict(s3_args(server.endpoint, "auth-kmods", access_key="AKIANOTKNOWN00000000", secret_key=wrong),
                            src=str(src)), verbose=True)
        assert res["failed"] and "access key is not known" in res["msg"], out
        assert wrong not in out
        good, out = run(dict(s3_args(server.endpoint, "auth-kmods", access_key=key_id, secret_key=secret), src=str(src)))
        assert good["changed"], out


def test_bad_options_are_named(tmp_path: Path) -> None:
    res, _ = run({"store": "ftp://x/y", "src": str(make_build(tmp_path / "src"))})
    assert res["failed"] and "ftp://x/y" in res["msg"]
    res, _ = run({"store": "file:///tmp", "state": "query", "os_version": "1.0/../x", "kernel_release": "k",
                  "driver": "d", "driver_version": "v"})
    assert res["failed"] and "os_version" in res["msg"]
    res, _ = run({"state": "fetched", "dest": str(tmp_path / "d")})
    assert res["failed"] and "os_version" in res["msg"]
    res, _ = run({"store": f"file://{tmp_path}", "src": str(tmp_path / "src"), "driver_version": "1.0"})
    assert res["failed"] and "driver_version='1.0' does not match" in res["msg"]
    res, _ = run({"store": f"file://{tmp_path}", "src": str(tmp_path / "src"), "compression_level": 12})
    assert res["failed"] and "compression_level=12" in res["msg"]
