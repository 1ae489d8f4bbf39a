"""kmod_archive's S3 store against a real moto_server on 127.0.0.1 (HTTP): round trip, request
counts, conditional writes for the lease, multipart abort, clear errors without secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar
from ansible_collections.modulus.kmods.plugins.module_utils import archive_ops as ops
from ansible_collections.modulus.kmods.plugins.module_utils import lease as ls
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from ansible_collections.modulus.kmods.plugins.module_utils.identity import identity_from_manifest
from ansible_collections.modulus.kmods.plugins.module_utils.s3store import S3Store
from ansible_collections.modulus.kmods.plugins.module_utils.stores import StoreError, open_store
from sim.kmod_archive_fixtures import IDENT, make_build, manifest_of
from sim.s3 import TEST_KEY_ID, TEST_SECRET, MotoServer, client, enable_auth, free_port, new_bucket, s3_endpoint

IDENTITY = identity_from_manifest(IDENT)


@pytest.fixture(scope="module")
def endpoint():
    with s3_endpoint() as url:
        yield url


def options(endpoint: str, **kw: object) -> dict:
    opts = {"endpoint_url": endpoint, "access_key": TEST_KEY_ID, "secret_key": TEST_SECRET, "region": "us-east-1",
            "addressing_style": "path", "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required", "connect_timeout": 5, "max_attempts": 2}
    opts.update(kw)
    return opts


def s3(endpoint: str, bucket: str, prefix: str = "fleet", **kw: object) -> S3Store:
    store = open_store(f"s3://{bucket}/{prefix}", options(endpoint, **kw))
    assert isinstance(store, S3Store)
    return store


def test_round_trip_and_request_counts(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    src = make_build(tmp_path / "src")
    res = ops.push(str(src), s3(endpoint, bucket), {})
    assert res["changed"]
    head = client(endpoint).head_object(Bucket=bucket, Key="fleet/" + res["key"])
    assert head["Metadata"]["sha256"] == res["sha256"] == manifest_of(src)["archive"]["sha256"]
    assert head["Metadata"]["manifest-sha256"] == mf.manifest_sha256(manifest_of(src))
    store = s3(endpoint, bucket)
    again = ops.push(str(src), store, {})
    assert not again["changed"] and store.requests == 1 and again["store_requests"] == 1
    dest = tmp_path / "dest"
    pulled = ops.pull(str(dest), s3(endpoint, bucket), IDENTITY, "stable")
    assert pulled["changed"] and mf.verify_tree(str(dest), manifest_of(dest)) == []
    store = s3(endpoint, bucket)
    noop = ops.pull(str(dest), store, IDENTITY, "stable")
    assert not noop["changed"] and store.requests == 1
    store = s3(endpoint, bucket)
    assert not ops.pull(str(dest), store, IDENTITY, "stable", remote_check=False)["changed"] and store.requests == 0


def test_server_side_encryption_is_requested(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    src = make_build(tmp_path / "src")
    res = ops.push(str(src), s3(endpoint, bucket, encryption="AES256"), {})
    head = client(endpoint).head_object(Bucket=bucket, Key="fleet/" + res["key"])
    assert head.get("ServerSideEncryption") == "AES256"


def test_replaced_object_is_refused(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    src = make_build(tmp_path / "src")
    res = ops.push(str(src), s3(endpoint, bucket), {})
    key = "fleet/" + res["key"]
    meta = client(endpoint).head_object(Bucket=bucket, Key=key)["Metadata"]
    client(endpoint).put_object(Bucket=bucket, Key=key, Body=b"other bytes entirely", Metadata=meta)
    with pytest.raises(ar.ArchiveError, match="metadata says"):
        ops.pull(str(tmp_path / "dest"), s3(endpoint, bucket), IDENTITY, "stable")
    assert not (tmp_path / "dest").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_conditional_writes_for_the_lease(endpoint: str) -> None:
    """moto 5.2.5 honours If-None-Match: * and If-Match on PutObject and If-Match on DeleteObject."""
    store = s3(endpoint, new_bucket(endpoint))
    assert store.create_exclusive("k.lease", b"1")
    assert not store.create_exclusive("k.lease", b"2")
    data, etag = store.read_small("k.lease")
    assert data == b"1"
    assert not store.replace_if_match("k.lease", b"3", '"0000"')
    assert store.replace_if_match("k.lease", b"3", etag)
    assert not store.delete_if_match("k.lease", etag)  # etag changed with the overwrite
    assert store.delete_if_match("k.lease", store.read_small("k.lease")[1])
    assert store.read_small("k.lease") is None


def test_lease_takeover_on_s3(endpoint: str) -> None:
    store = s3(endpoint, new_bucket(endpoint))
    key = ar.lease_key(ar.archive_key(IDENTITY))
    assert store.create_exclusive(key, ls.lease_body("dead-host", ttl=1, now=1000))
    res = ls.acquire(store, key, "me", ttl=60, wait=0)
    assert res.acquired and res.took_over and res.holder["owner"] == "dead-host"
    assert not ls.acquire(store, key, "other", ttl=60, wait=0).acquired
    assert ls.release(store, key, "me")["released"]


def test_failed_multipart_upload_is_aborted(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    big = tmp_path / "big.bin"
    with open(big, "wb") as out:
        out.write(os.urandom(70 << 20))  # above the 64 MiB multipart threshold
    store = s3(endpoint, bucket)
    parts = []

    def fail_third_part(**_kw: object) -> None:
        parts.append(1)
        if len(parts) == 3:
            raise RuntimeError("injected failure on part 3")

    store.client.meta.events.register("before-call.s3.UploadPart", fail_third_part)
    with pytest.raises((StoreError, RuntimeError)):
        store.upload(str(big), "big.tar.gz", "0" * 64, "1" * 64, 70 << 20)
    c = client(endpoint)
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert c.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_missing_bucket_is_named(endpoint: str, tmp_path: Path) -> None:
    src = make_build(tmp_path / "src")
    with pytest.raises(StoreError, match="bucket no-such-bucket-modulus does not exist"):
        ops.push(str(src), s3(endpoint, "no-such-bucket-modulus"), {})
    with pytest.raises(StoreError, match="does not exist"):
        ops.pull(str(tmp_path / "dest"), s3(endpoint, "no-such-bucket-modulus"), IDENTITY, "stable")


def test_unreachable_store(tmp_path: Path) -> None:
    src = make_build(tmp_path / "src")
    store = s3(f"http://127.0.0.1:{free_port()}", "bucket", connect_timeout=2, max_attempts=1)
    with pytest.raises(StoreError, match="unreachable") as err:
        ops.push(str(src), store, {})
    assert TEST_SECRET not in str(err.value)


def test_wrong_credentials_are_named_without_the_secret(tmp_path: Path) -> None:
    src = make_build(tmp_path / "src")
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as server:
        key_id, secret = enable_auth(server)
        bucket = "auth-bucket"
        client(server.endpoint, key_id, secret).create_bucket(Bucket=bucket)
        good = s3(server.endpoint, bucket, access_key=key_id, secret_key=secret)
        assert ops.push(str(src), good, {})["changed"]
        wrong_secret = "wrong-secret-value-0123456789"
        with pytest.raises(StoreError, match="signature does not match") as err:
            ops.pull(str(tmp_path / "d"), s3(server.endpoint, bucket, access_key=key_id, secret_key=wrong_secret),
                     IDENTITY, "stable")
        assert wrong_secret not in str(err.value) and secret not in str(err.value)
        # the lease path uses GET/PUT, which carry the error code
        with pytest.raises(StoreError, match="SignatureDoesNotMatch|signature does not match"):
            ops.lock(s3(server.endpoint, bucket, access_key=key_id, secret_key=wrong_secret),
                     dict(IDENTITY, driver_version="1.2.3"), "me", 60, 0, 1)
        with pytest.raises(StoreError, match="access key is not known"):
            ops.lock(s3(server.endpoint, bucket, access_key="AKIAUNKNOWN000000000", secret_key=wrong_secret),
                     dict(IDENTITY, driver_version="1.2.3"), "me", 60, 0, 1)
