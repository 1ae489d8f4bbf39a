"""Signed builds in the store, through Ansible (``ansible localhost -m modulus.kmods.kmod_archive``):
a push signs the manifest with an OpenSSH key (``ssh-keygen -Y sign``, object ``<key>.sig``); a pull
with ``trusted_keys`` accepts only builds whose manifest signature verifies. Forged archives
(self-consistent: rewritten manifest, matching or missing metadata), manifests that disagree with
the object's metadata, non-ELF modules and hostile legacy archives are refused, and ``dest`` is
left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from sim import ansible_run
from sim.kmod_archive_fixtures import (
    IDENT,
    archive_path_for,
    make_build,
    make_ko,
    make_legacy_archive,
    make_ssh_key,
    manifest_of,
    rewrite_manifest,
    ssh_fingerprint,
)
from sim.s3 import TEST_KEY_ID, TEST_SECRET, client, new_bucket, s3_endpoint

MODULE = "modulus.kmods.kmod_archive"
NAMING = {k: IDENT[k] for k in ("os_version", "kernel_release", "driver", "driver_version")}
KVER = IDENT["kernel_release"]


def run(args: dict, verbose: bool = False) -> tuple[dict, str]:
    return ansible_run.run_module(MODULE, args, verbose=verbose, timeout=300)


@pytest.fixture(scope="module")
def endpoint():
    with s3_endpoint() as url:
        yield url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    where = tmp_path_factory.mktemp("keys")
    return {name: make_ssh_key(where, name) for name in ("fleet", "intruder")}


def s3_args(endpoint: str, bucket: str, **kw: object) -> dict:
    args = {"store": f"s3://{bucket}/fleet", "endpoint_url": endpoint, "access_key": TEST_KEY_ID,
            "secret_key": TEST_SECRET, "region": "us-east-1", "addressing_style": "path",
            "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    args.update(kw)
    return args


def snapshot(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def test_signed_push_and_trusted_pull_on_s3(endpoint: str, tmp_path: Path, keys: dict) -> None:
    bucket = new_bucket(endpoint)
    key, pub = keys["fleet"]
    src = make_build(tmp_path / "src")
    pushed, out = run(dict(s3_args(endpoint, bucket), src=str(src), signing_key=str(key)), verbose=True)
    assert pushed["changed"] and pushed["signed"] and pushed["signer_key"] == ssh_fingerprint(pub), out
    private_body = key.read_text().split("-----")[2].strip()[:40]
    assert private_body not in out  # the key material is never read into the output
    sig = client(endpoint).get_object(Bucket=bucket, Key=f"fleet/{pushed['key']}.sig")["Body"].read()
    assert sig.startswith(b"-----BEGIN SSH SIGNATURE-----")
    assert manifest_of(src)["archive"]["signer_key"] == ssh_fingerprint(pub)
    again, _ = run(dict(s3_args(endpoint, bucket), src=str(src), signing_key=str(key)))
    assert not again["changed"] and again["signed"] and again["store_requests"] == 2  # HEAD + GET .sig

    dest = tmp_path / "dest"
    pulled, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), trusted_keys=[pub], **NAMING))
    assert pulled["changed"] and pulled["authenticated"] is True and pulled["signed"] is True, out
    assert pulled["signer_key"] == ssh_fingerprint(pub)
    noop, _ = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest),
                       trusted_keys=[str(key) + ".pub"], **NAMING))
    assert not noop["changed"] and noop["authenticated"] and noop["store_requests"] == 1
    plain, _ = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(tmp_path / "plain"), **NAMING))
    assert plain["changed"] and plain["authenticated"] is False and plain["signer_key"] is None
    # a key that did not sign it is not enough
    other, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(tmp_path / "other"),
                          trusted_keys=[keys["intruder"][1]], **NAMING))
    assert other["failed"] and "does not verify" in other["msg"] and not (tmp_path / "other").exists(), out


def test_planted_archives_are_refused_with_trusted_keys(tmp_path: Path, keys: dict) -> None:
    store = tmp_path / "store"
    store.mkdir()
    key, pub = keys["fleet"]
    src = make_build(tmp_path / "src")
    pushed, out = run({"store": f"file://{store}", "src": str(src), "signing_key": str(key)})
    assert pushed["signed"], out
    archive = archive_path_for(store, pushed["key"])
    dest = tmp_path / "dest"
    args = {"store": f"file://{store}", "state": "fetched", "dest": str(dest), "trusted_keys": [pub], **NAMING}
    ok, out = run(args)
    assert ok["changed"] and ok["authenticated"], out
    good = snapshot(dest)

    # 1. a self-consistent forgery: another (valid ELF) module, the manifest rewritten to match,
    #    the metadata forged to match too, planted over the signed archive (the .sig stays)
    forged = tmp_path / "forged"
    shutil.copytree(src, forged, symlinks=True)
    (forged / f"lib/modules/{KVER}/nvidia.ko").write_bytes(make_ko("nvidia", KVER, b"\x0f\x0b" * 4000))
    manifest = rewrite_manifest(forged)
    sha, size = ar.pack_tree(str(forged), manifest, str(tmp_path / "forged.tar.gz"))
    shutil.copyfile(tmp_path / "forged.tar.gz", archive)
    Path(str(archive) + ".json").write_text(json.dumps(
        {"sha256": sha, "manifest_sha256": mf.manifest_sha256(manifest), "size": size}))
    res, out = run(dict(args, dest=str(tmp_path / "d1")))
    assert res["failed"] and "signature does not verify" in res["msg"], out
    res, out = run(dict(args, remote_check=True))  # over the good build: dest is kept
    assert res["failed"] and "signature does not verify" in res["msg"] and snapshot(dest) == good, out
    # without trusted keys the checksums alone cannot tell: accepted, but not authenticated
    res, out = run({k: v for k, v in dict(args, dest=str(tmp_path / "d2")).items() if k != "trusted_keys"})
    assert res["changed"] and res["authenticated"] is False, out

    # 2. no metadata at all, a module that is not ELF
    (forged / f"lib/modules/{KVER}/nvidia.ko").write_bytes(b"#!/bin/sh\necho pwned\n")
    manifest = rewrite_manifest(forged)
    (tmp_path / "forged.tar.gz").unlink()
    ar.pack_tree(str(forged), manifest, str(tmp_path / "forged.tar.gz"))
    shutil.copyfile(tmp_path / "forged.tar.gz", archive)
    Path(str(archive) + ".json").unlink()
    res, out = run(dict(args, dest=str(tmp_path / "d3")))
    assert res["failed"] and "signature does not verify" in res["msg"], out
    res, out = run({k: v for k, v in dict(args, dest=str(tmp_path / "d3")).items() if k != "trusted_keys"})
    assert res["failed"] and "nvidia.ko: not an ELF kernel module" in res["msg"], out
    # 3. the signature removed: unsigned builds are refused
    Path(str(archive) + ".sig").unlink()
    res, out = run(dict(args, dest=str(tmp_path / "d4")))
    assert res["failed"] and "is not signed" in res["msg"], out
    assert not any((tmp_path / d).exists() for d in ("d1", "d3", "d4")) and snapshot(dest) == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_manifest_sha256_metadata_must_match_the_archive(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    src = make_build(tmp_path / "src")
    pushed, out = run(dict(s3_args(endpoint, bucket), src=str(src)))
    assert pushed["changed"], out
    s3 = client(endpoint)
    key = "fleet/" + pushed["key"]
    meta = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    assert meta["manifest-sha256"] == pushed["manifest_sha256"]
    meta["manifest-sha256"] = "d" * 64
    s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key}, Metadata=meta,
                   MetadataDirective="REPLACE")
    dest = tmp_path / "dest"
    res, out = run(dict(s3_args(endpoint, bucket), state="fetched", dest=str(dest), **NAMING))
    assert res["failed"] and "manifest-sha256 metadata says " + "d" * 64 in res["msg"], out
    assert not dest.exists()


@pytest.mark.parametrize("kwargs,needle", [
    ({"raw_members": {"/etc/cron.d/modulus": b"* * * * * root true\n"}}, "is absolute or leaves the archive"),
    ({"raw_members": {"../outside": b"x"}}, "is absolute or leaves the archive"),
    ({"extra": {f"lib/modules/{KVER}/nvidia.ko": b"\x7fELF but not a module"}}, "not an ELF kernel module"),
    ({"extra": {f"lib/modules/{KVER}/nvidia.ko": make_ko("nvidia", "6.1.0-50-amd64")}}, "does not name kernel"),
    ({"extra": {"lib/modules/6.1.0-50-amd64/nvidia.ko": make_ko("nvidia", "6.1.0-50-amd64")}},
     "other kernel(s) 6.1.0-50-amd64"),
])
def test_legacy_import_refusals(tmp_path: Path, kwargs: dict, needle: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_legacy_archive(store / "9001.1.0-stable-nvidia-535.261.03.tar.gz", **kwargs)
    dest = tmp_path / "dest"
    res, out = run({"store": f"file://{store}", "state": "fetched", "dest": str(dest), "legacy": True, **NAMING})
    assert res["failed"] and needle in res["msg"], out
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_legacy_import_needs_legacy_and_no_trusted_keys(tmp_path: Path, keys: dict) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_legacy_archive(store / "9001.1.0-stable-nvidia-535.261.03.tar.gz")
    base = {"store": f"file://{store}", "state": "fetched", "dest": str(tmp_path / "dest"), **NAMING}
    res, out = run(base)
    assert res["failed"] and "has no archive" in res["msg"], out
    res, out = run(dict(base, legacy=True, trusted_keys=[keys["fleet"][1]]))
    assert res["failed"] and "carries no signature" in res["msg"], out
    res, out = run(dict(base, legacy=True))
    assert res["changed"] and res["legacy"] and res["authenticated"] is False, out
    assert manifest_of(tmp_path / "dest")["imported"] == "legacy"


def test_bad_trust_options_are_named(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    res, out = run({"store": f"file://{store}", "state": "fetched", "dest": str(tmp_path / "d"),
                    "trusted_keys": ["ssh-ed25519 notbase64!"], **NAMING})
    assert res["failed"] and "trusted_keys[0]" in res["msg"], out
    res, out = run({"store": f"file://{store}", "src": str(make_build(tmp_path / "src")),
                    "signing_key": str(tmp_path / "missing-key")})
    assert res["failed"] and "signing_key=" in res["msg"] and res["store_requests"] == 0, out
