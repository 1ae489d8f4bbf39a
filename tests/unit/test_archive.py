"""kmod_archive module_utils, called directly: keys, deterministic tarball, verified extraction,
legacy import, file store round trip and idempotence, the lease with a controlled clock."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar
from ansible_collections.modulus.kmods.plugins.module_utils import archive_ops as ops
from ansible_collections.modulus.kmods.plugins.module_utils import lease as ls
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from ansible_collections.modulus.kmods.plugins.module_utils.identity import identity_from_manifest
from ansible_collections.modulus.kmods.plugins.module_utils.stores import FileStore, StoreError, open_store
from sim.kmod_archive_fixtures import (
    IDENT,
    make_build,
    make_ko,
    make_legacy_archive,
    make_ssh_key,
    manifest_of,
    rewrite_manifest,
    ssh_fingerprint,
)

IDENTITY = identity_from_manifest(IDENT)
KEY = "flatcar/amd64-usr/9001.1.0/6.1.0-47-amd64/nvidia/535.261.03/proprietary-unsigned.tar.gz"


@pytest.fixture()
def build(tmp_path: Path) -> Path:
    return make_build(tmp_path / "build")


@pytest.fixture()
def store(tmp_path: Path) -> FileStore:
    (tmp_path / "store").mkdir()
    st = open_store(f"file://{tmp_path / 'store'}")
    assert isinstance(st, FileStore)
    return st


# ----------------------------------------------------------------------------- keys

def test_key_layout_from_manifest(build: Path) -> None:
    ident = identity_from_manifest(manifest_of(build))
    assert ar.archive_key(ident) == KEY
    assert ar.archive_key(ident, "/fleet//flatcar/") == "fleet/flatcar/" + KEY
    signed = dict(ident, signer="AB12 CD34", module_type="open")
    assert ar.archive_key(signed).endswith("/open-signed-ab12cd34.tar.gz")
    assert ar.archive_key(dict(ident, signer="ab:12:cd:34")).endswith("/proprietary-signed-ab12cd34.tar.gz")
    assert ar.legacy_key("9001.1.0", "stable", "nvidia", "535.261.03", "old") == "old/9001.1.0-stable-nvidia-535.261.03.tar.gz"
    assert ar.lease_key(KEY) == KEY[: -len(".tar.gz")] + ".lease"


@pytest.mark.parametrize("field,value", [("driver", "../etc"), ("os_version", "a/b"), ("kernel_release", ""),
                                         ("driver_version", ".."), ("driver", "nvidia\n"),
                                         ("kernel_release", "6.1.0-47-amd64\n"), ("signer", "ab/cd")])
def test_key_refuses_unsafe_components(field: str, value: str) -> None:
    with pytest.raises(ar.ArchiveError, match=field):
        ar.archive_key(dict(IDENTITY, **{field: value}))


# ----------------------------------------------------------------------------- deterministic tarball

def test_pack_is_deterministic_and_normalized(build: Path, tmp_path: Path) -> None:
    manifest = manifest_of(build)
    sha1, size1 = ar.pack_tree(str(build), manifest, str(tmp_path / "a.tar.gz"))
    # touch every file and change the umask-visible mode: the bytes must not change
    for path in build.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (1234567, 7654321))
    os.chmod(build / "build.log", 0o600)
    sha2, size2 = ar.pack_tree(str(build), manifest, str(tmp_path / "b.tar.gz"))
    assert (sha1, size1) == (sha2, size2)
    assert hashlib.sha256((tmp_path / "a.tar.gz").read_bytes()).hexdigest() == sha1
    raw = (tmp_path / "a.tar.gz").read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\x00\x00\x00\x00"  # no name, mtime 0
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    modes = {m.name: m.mode for m in members}
    assert modes["bin/nvidia-smi"] == 0o755 and modes["build.log"] == 0o644 and modes["lib"] == 0o755
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        packed = json.loads(tar.extractfile("manifest.json").read())
    assert "archive" not in packed and packed["files"] == manifest["files"]


def test_multimember_gzip_reads_with_gnu_tar(tmp_path: Path) -> None:
    src = make_build(tmp_path / "big", big_random=9 << 20, big_text=3 << 20)
    sha, size = ar.pack_tree(str(src), manifest_of(src), str(tmp_path / "big.tar.gz"))
    # several members (4 MiB chunks); the random one is stored, not deflated
    assert size > 9 << 20
    out = subprocess.run(["tar", "-tzf", str(tmp_path / "big.tar.gz")], check=True, capture_output=True, text=True)
    assert "lib/modules/6.1.0-47-amd64/nvidia-big.ko" in out.stdout.split()


def test_incompressible_chunks_are_stored() -> None:
    rnd = os.urandom(ar.CHUNK_SIZE)
    member = ar.gzip_member(rnd, 6)
    assert len(member) < len(rnd) + 1024 and gzip.decompress(member) == rnd
    text = b"compressible text line\n" * 200000
    assert len(ar.gzip_member(text, 1)) < len(text) / 20


def test_pack_refuses_a_tree_that_does_not_match(build: Path, tmp_path: Path) -> None:
    (build / "bin/nvidia-smi").write_bytes(b"#!/bin/sh\necho tampered\n")
    out = tmp_path / "x.tar.gz"
    with pytest.raises(ar.ArchiveError, match="bin/nvidia-smi"):
        ar.pack_tree(str(build), manifest_of(build), str(out))
    assert not out.exists()


def test_verify_tree_reports_each_problem(build: Path) -> None:
    manifest = manifest_of(build)
    assert mf.verify_tree(str(build), manifest) == []
    (build / "extra.txt").write_text("x")
    (build / "lib/modules/6.1.0-47-amd64/nvidia.ko").unlink()
    (build / "build.log").write_text("changed")
    problems = "\n".join(mf.verify_tree(str(build), manifest))
    assert "extra.txt" in problems and "nvidia.ko" in problems and "build.log" in problems


# ----------------------------------------------------------------------------- hostile archives

def _evil(path: Path, *members: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("members,pattern", [
    ([_member("/etc/passwd")], "absolute"),
    ([_member("../outside")], "escapes"),
    ([_member("a/../../outside")], "escapes"),
    ([_member("lib/evil", tarfile.SYMTYPE, "../../etc/shadow")], "outside"),
    ([_member("lib/evil", tarfile.SYMTYPE, "/etc/shadow")], "absolute"),
    ([_member("lib", tarfile.SYMTYPE, "sub"), _member("lib/x")], "symlink"),
    ([_member("hl", tarfile.LNKTYPE, "/etc/passwd")], "hard link"),
    ([_member("dev", tarfile.CHRTYPE)], "device"),
    ([_member("fifo", tarfile.FIFOTYPE)], "device, FIFO"),
])
def test_extraction_refuses_entries_escaping_dest(tmp_path: Path, members: list, pattern: str) -> None:
    archive = _evil(tmp_path / "evil.tar.gz", *members)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ar.ArchiveError, match=pattern):
        ar.extract_archive(str(archive), str(staging))
    assert not (tmp_path / "outside").exists()


def test_extraction_keeps_inner_links(tmp_path: Path) -> None:
    archive = _evil(tmp_path / "ok.tar.gz", _member("lib/a.so.1"), _member("lib/a.so", tarfile.SYMTYPE, "a.so.1"),
                    _member("lib/b.so", tarfile.LNKTYPE, "lib/a.so.1"))
    staging = tmp_path / "staging"
    staging.mkdir()
    written = ar.extract_archive(str(archive), str(staging))
    assert written["lib/a.so"] == {"link": "a.so.1"}
    assert written["lib/b.so"]["sha256"] == hashlib.sha256(b"x").hexdigest()


# ----------------------------------------------------------------------------- file store round trip

def test_file_store_round_trip_and_idempotence(build: Path, store: FileStore, tmp_path: Path) -> None:
    first = ops.push(str(build), store, {})
    assert first["changed"] and first["key"] == KEY and first["diff"]["before"]["sha256"] is None
    recorded = manifest_of(build)["archive"]
    assert recorded["sha256"] == first["sha256"] and recorded["key"] == KEY
    requests = store.requests
    again = ops.push(str(build), store, {})
    assert not again["changed"] and store.requests - requests == 1  # one HEAD
    dest = tmp_path / "dest"
    pulled = ops.pull(str(dest), store, IDENTITY, "stable")
    assert pulled["changed"] and pulled["sha256"] == first["sha256"]
    assert mf.verify_tree(str(dest), manifest_of(dest)) == []
    assert (dest / "lib/libnvidia-ml.so.1").is_symlink()
    assert dest.stat().st_mode & 0o777 == 0o755 and (dest / "bin/nvidia-smi").stat().st_mode & 0o777 == 0o755
    requests = store.requests
    noop = ops.pull(str(dest), store, IDENTITY, "stable")
    assert not noop["changed"] and store.requests - requests == 1
    local = ops.pull(str(dest), store, IDENTITY, "stable", remote_check=False)
    assert not local["changed"] and store.requests - requests == 1  # decided locally: no request


def test_check_mode_changes_nothing(build: Path, store: FileStore, tmp_path: Path) -> None:
    before = (build / "manifest.json").read_bytes()
    res = ops.push(str(build), store, {}, check_mode=True)
    assert res["changed"] and store.head(KEY) is None and (build / "manifest.json").read_bytes() == before
    ops.push(str(build), store, {})
    res = ops.pull(str(tmp_path / "dest"), store, IDENTITY, "stable", check_mode=True)
    assert res["changed"] and res["diff"]["after"]["key"] == KEY and not (tmp_path / "dest").exists()
    res = ops.remove(store, IDENTITY, check_mode=True)
    assert res["changed"] and store.head(KEY) is not None
    assert ops.remove(store, IDENTITY)["changed"] and store.head(KEY) is None
    assert not ops.remove(store, IDENTITY)["changed"]


def test_replaced_object_is_refused_and_dest_kept(build: Path, store: FileStore, tmp_path: Path) -> None:
    ops.push(str(build), store, {})
    dest = tmp_path / "dest"
    ops.pull(str(dest), store, IDENTITY, "stable")
    snapshot = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    # other bytes under the same key (metadata untouched)
    other = make_build(tmp_path / "other", seed=7)
    ar.pack_tree(str(other), manifest_of(other), str(tmp_path / "other.tar.gz"))
    Path(store.root, *KEY.split("/")).write_bytes((tmp_path / "other.tar.gz").read_bytes())
    with pytest.raises(ar.ArchiveError, match="metadata says"):
        ops.pull(str(tmp_path / "dest2"), store, IDENTITY, "stable")
    assert not (tmp_path / "dest2").exists()
    # other bytes with matching metadata: caught by the manifest of another build
    bad = make_build(tmp_path / "bad", ident={"driver_version": "999.1"})
    sha, size = ar.pack_tree(str(bad), manifest_of(bad), str(tmp_path / "bad.tar.gz"))
    store.upload(str(tmp_path / "bad.tar.gz"), KEY, sha, mf.manifest_sha256(manifest_of(bad)), size)
    with pytest.raises(ar.ArchiveError, match="another build"):
        ops.pull(str(dest), store, IDENTITY, "stable", remote_check=True)
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == snapshot
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no workspace left


def test_legacy_archive_is_imported(store: FileStore, tmp_path: Path) -> None:
    legacy = Path(store.root, "9001.1.0-stable-nvidia-535.261.03.tar.gz")
    files = make_legacy_archive(legacy)
    # the original tool's layout is looked at only with legacy=True (the default is off)
    assert not ops.query(store, IDENTITY, "stable")["exists"]
    with pytest.raises(StoreError, match="has no archive"):
        ops.pull(str(tmp_path / "no-legacy"), store, IDENTITY, "stable")
    q = ops.query(store, IDENTITY, "stable", legacy=True)
    assert q["exists"] and q["legacy"] and q["key"] == legacy.name
    dest = tmp_path / "dest"
    res = ops.pull(str(dest), store, IDENTITY, "stable", legacy=True)
    assert res["changed"] and res["legacy"] and res["authenticated"] is False
    manifest = manifest_of(dest)
    assert manifest["imported"] == "legacy" and manifest["kernel_release"] == "6.1.0-47-amd64"
    assert set(manifest["files"]) == set(files)
    assert {m["name"] for m in manifest["modules"]} == {"nvidia", "nvidia_uvm"}
    assert manifest["modules"][0]["vermagic"].startswith("6.1.0-47-amd64")
    assert (dest / "bin/nvidia-smi").read_bytes() == files["bin/nvidia-smi"]
    requests = store.requests
    assert not ops.pull(str(dest), store, IDENTITY, "stable", legacy=True)["changed"]
    assert store.requests - requests == 1
    # a legacy archive for another kernel is refused
    with pytest.raises(ar.ArchiveError, match="not kernel_release"):
        ops.pull(str(tmp_path / "d2"), store, dict(IDENTITY, kernel_release="6.1.0-50-amd64"), "stable", legacy=True)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"raw_members": {"/etc/cron.d/evil": b"* * * * * root sh\n"}}, "absolute or leaves the archive"),
    ({"raw_members": {"nvidia/../../evil": b"x"}}, "absolute or leaves the archive"),
    ({"extra": {"lib/modules/6.1.0-47-amd64/nvidia.ko": b"not an ELF file at all"}}, "not an ELF kernel module"),
    ({"extra": {"lib/modules/6.1.0-47-amd64/nvidia.ko": make_ko("nvidia", "6.1.0-50-amd64")}},
     "vermagic '6.1.0-50-amd64 .*' does not name kernel 6.1.0-47-amd64"),
    ({"extra": {"lib/modules/6.1.0-50-amd64/nvidia.ko": make_ko("nvidia", "6.1.0-50-amd64")}},
     "other kernel\\(s\\) 6.1.0-50-amd64"),
])
def test_legacy_import_refusals(store: FileStore, tmp_path: Path, kwargs: dict, pattern: str) -> None:
    make_legacy_archive(Path(store.root, "9001.1.0-stable-nvidia-535.261.03.tar.gz"), **kwargs)
    dest = tmp_path / "dest"
    with pytest.raises(ar.ArchiveError, match=pattern):
        ops.pull(str(dest), store, IDENTITY, "stable", legacy=True)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_no_store_keeps_everything_local(build: Path, tmp_path: Path) -> None:
    assert not ops.push(str(build), None, {})["changed"]
    with pytest.raises(ar.ArchiveError, match="no store"):
        ops.pull(str(tmp_path / "dest"), None, IDENTITY)
    assert ops.lock(None, IDENTITY, "me", 60, 0, 1)["lock"]["acquired"]


def test_identity_options_must_match_manifest(build: Path, store: FileStore) -> None:
    with pytest.raises(ar.ArchiveError, match="driver_version='1.0'"):
        ops.push(str(build), store, {"driver_version": "1.0"})


def test_store_urls() -> None:
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="does not exist"):
        open_store("file:///nonexistent/dir/for/test")
    with pytest.raises(StoreError, match="credentials"):
        open_store("https://user:pw@host/x")


# ----------------------------------------------------------------------------- lease

class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_lease_exclusive_reentrant_and_takeover(store: FileStore) -> None:
    clock = Clock()
    key = ar.lease_key(KEY)
    assert ls.acquire(store, key, "a", ttl=100, wait=0, clock=clock, sleep=clock.sleep).acquired
    res = ls.acquire(store, key, "b", ttl=100, wait=30, poll=10, clock=clock, sleep=clock.sleep)
    assert not res.acquired and res.holder["owner"] == "a" and res.waited == pytest.approx(30)
    assert ls.acquire(store, key, "a", ttl=100, wait=0, clock=clock, sleep=clock.sleep).renewed
    clock.now += 101  # a's lease is stale now
    took = ls.acquire(store, key, "b", ttl=100, wait=0, clock=clock, sleep=clock.sleep)
    assert took.acquired and took.took_over and took.holder["owner"] == "a"
    assert ls.release(store, key, "a") == {"released": False, "holder": ls.parse_lease(store.read_small(key)[0])}
    assert ls.release(store, key, "b")["released"]
    assert store.read_small(key) is None


def test_lease_wait_ends_when_archive_appears(store: FileStore) -> None:
    clock = Clock()
    key = ar.lease_key(KEY)
    ls.acquire(store, key, "a", ttl=100, wait=0, clock=clock, sleep=clock.sleep)
    calls = []

    def done() -> bool:
        calls.append(clock.now)
        return len(calls) >= 3

    res = ls.acquire(store, key, "b", ttl=100, wait=600, poll=5, done=done, clock=clock, sleep=clock.sleep)
    assert not res.acquired and res.done and res.waited == pytest.approx(10)


def test_lease_takeover_race_has_one_winner(store: FileStore) -> None:
    key = ar.lease_key(KEY)
    store.create_exclusive(key, ls.lease_body("old", ttl=1, now=time.time() - 100))
    data, etag = store.read_small(key)
    assert store.replace_if_match(key, ls.lease_body("x", 100, time.time()), etag)
    assert not store.replace_if_match(key, ls.lease_body("y", 100, time.time()), etag)  # stale etag loses
    assert ls.parse_lease(store.read_small(key)[0])["owner"] == "x"


def test_failed_push_leaves_nothing_behind(build: Path, store: FileStore) -> None:
    (build / "build.log").write_bytes(b"x" * (build / "build.log").stat().st_size)  # same size, other bytes
    with pytest.raises(ar.ArchiveError, match="build.log"):
        ops.push(str(build), store, {})
    assert [p.name for p in build.parent.iterdir() if p.name.startswith(".")] == []
    assert store.head(KEY) is None and "archive" not in manifest_of(build)


def test_module_utils_import_without_boto3(tmp_path: Path) -> None:
    """archive/stores/s3store/lease import with boto3 unavailable; an s3 store then fails clearly."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('boto3', 'botocore'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ansible_collections.modulus.kmods.plugins.module_utils import archive_ops, lease, s3store, stores\n"
        "assert not s3store.HAS_BOTO3 and 'blocked' in s3store.BOTO3_IMPORT_ERROR\n"
        "try:\n"
        "    stores.open_store('s3://bucket/prefix', {})\n"
        "except stores.StoreError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "needs the Python library boto3" in out.stdout


def test_store_outage_keeps_the_local_build(build: Path, store: FileStore, tmp_path: Path) -> None:
    ops.push(str(build), store, {})
    dest = tmp_path / "dest"
    ops.pull(str(dest), store, IDENTITY, "stable")
    snapshot = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    down = open_store("http://127.0.0.1:9/unreachable", {"connect_timeout": 2})
    res = ops.pull(str(dest), down, IDENTITY, "stable")
    assert not res["changed"] and "unreachable" in res["remote_error"]
    with pytest.raises(StoreError, match="unreachable"):
        ops.pull(str(tmp_path / "other"), down, IDENTITY, "stable")
    assert not (tmp_path / "other").exists()
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == snapshot


def test_legacy_root_detection(tmp_path: Path) -> None:
    """Older uploads of the original tool held ./out/...; an archive with no lib/modules is refused."""
    out_layout = _evil(tmp_path / "out.tar.gz", _member("./out/lib/modules/6.1.0-47-amd64/nvidia.ko"),
                       _member("./out/bin/nvidia-smi"))
    assert ar.find_legacy_root(str(out_layout), "nvidia", "535.261.03") == "out/"
    staging = tmp_path / "staging"
    staging.mkdir()
    written = ar.extract_archive(str(out_layout), str(staging), "out/")
    assert set(written) == {"lib/modules/6.1.0-47-amd64/nvidia.ko", "bin/nvidia-smi"}
    nothing = _evil(tmp_path / "none.tar.gz", _member("README"))
    with pytest.raises(ar.ArchiveError, match="cannot find the build"):
        ar.find_legacy_root(str(nothing), "nvidia", "535.261.03")


def _race_for_lease(args: tuple[str, str, str]) -> bool:
    root, key, owner = args
    store = open_store(f"file://{root}")
    return ls.acquire(store, key, owner, ttl=60, wait=0).acquired


def test_four_processes_one_file_lease(store: FileStore) -> None:
    import multiprocessing

    key = ar.lease_key(KEY)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        won = pool.map(_race_for_lease, [(store.root, key, f"host-{i}") for i in range(4)])
    assert sum(won) == 1, won


def test_pull_replaces_another_build_atomically(store: FileStore, tmp_path: Path) -> None:
    first = make_build(tmp_path / "a")
    second = make_build(tmp_path / "b", ident={"kernel_release": "6.1.0-50-amd64"}, seed=3)
    ops.push(str(first), store, {})
    ops.push(str(second), store, {})
    dest = tmp_path / "dest"
    ops.pull(str(dest), store, IDENTITY, "stable")
    res = ops.pull(str(dest), store, dict(IDENTITY, kernel_release="6.1.0-50-amd64"), "stable")
    assert res["changed"] and res["diff"]["before"]["key"] == KEY
    assert manifest_of(dest)["kernel_release"] == "6.1.0-50-amd64"
    assert not (dest / "lib/modules/6.1.0-47-amd64").exists()
    # the lock files (<dir>.lock, as kmod_build keeps them) stay; no workspace nor old tree does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.lock", "b", "b.lock", "dest", "dest.lock", "store"]


def test_lock_check_mode_predicts_without_touching(store: FileStore) -> None:
    lkey = ar.lease_key(KEY)
    res = ops.lock(store, IDENTITY, "me", 60, 0, 1, check_mode=True)
    assert res["changed"] and not res["lock"]["acquired"] and store.read_small(lkey) is None
    assert ops.lock(store, IDENTITY, "me", 60, 0, 1)["changed"]
    assert not ops.lock(store, IDENTITY, "me", 60, 0, 1, check_mode=True)["changed"]  # a renewal
    assert not ops.lock(store, IDENTITY, "me", 60, 0, 1)["changed"]
    assert ops.unlock(store, IDENTITY, "me", check_mode=True)["changed"] and store.read_small(lkey) is not None
    assert not ops.unlock(store, IDENTITY, "other")["changed"]
    assert ops.unlock(store, IDENTITY, "me")["changed"] and store.read_small(lkey) is None


def test_build_without_module_type_is_stored_as_default(tmp_path: Path) -> None:
    """A generic build (or an old manifest with module_type null) gets the ``default`` variant."""
    generic = make_build(tmp_path / "g", ident={"driver": "modulus-hello", "driver_version": "1.0",
                                                "module_type": None})
    ident = identity_from_manifest(manifest_of(generic))
    assert ident["module_type"] == "default"
    assert ar.archive_key(ident).endswith("/modulus-hello/1.0/default-unsigned.tar.gz")


# ----------------------------------------------------------------------------- signatures and trust

@pytest.fixture(scope="module")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    keys = tmp_path_factory.mktemp("keys")
    return {name: make_ssh_key(keys, name) for name in ("fleet", "other")}


def test_signed_push_and_trusted_pull(build: Path, store: FileStore, tmp_path: Path,
                                      fleet_keys: dict[str, tuple[Path, str]]) -> None:
    key, pub = fleet_keys["fleet"]
    pushed = ops.push(str(build), store, {}, signing_key=str(key))
    assert pushed["changed"] and pushed["signed"] and pushed["signer_key"] == ssh_fingerprint(pub)
    sig = Path(store.root, *KEY.split("/")).with_name(Path(KEY).name + ".sig").read_text()
    assert sig.startswith("-----BEGIN SSH SIGNATURE-----")
    assert manifest_of(build)["archive"]["signature"].strip() == sig.strip()
    # signed again only when needed: HEAD + GET of the signature
    requests = store.requests
    again = ops.push(str(build), store, {}, signing_key=str(key))
    assert not again["changed"] and again["signed"] and store.requests - requests == 2
    # trusted pull: by key text and by file path
    dest = tmp_path / "dest"
    pulled = ops.pull(str(dest), store, IDENTITY, "stable", trusted_keys=[pub])
    assert pulled["changed"] and pulled["authenticated"] and pulled["signer_key"] == ssh_fingerprint(pub)
    assert manifest_of(dest)["archive"]["signer_key"] == ssh_fingerprint(pub)
    requests = store.requests
    noop = ops.pull(str(dest), store, IDENTITY, "stable", trusted_keys=[str(key) + ".pub"])
    assert not noop["changed"] and noop["authenticated"] and store.requests - requests == 1  # the local record verifies
    plain = ops.pull(str(dest), store, IDENTITY, "stable")
    assert not plain["changed"] and plain["authenticated"] is False and plain["signed"] is None
    # a key that did not sign it
    with pytest.raises(ar.SignatureError, match="does not verify"):
        ops.pull(str(tmp_path / "d2"), store, IDENTITY, "stable", trusted_keys=[fleet_keys["other"][1]])
    with pytest.raises(ar.SignatureError, match="does not verify"):
        ops.pull(str(dest), store, IDENTITY, "stable", trusted_keys=[fleet_keys["other"][1]])
    assert not (tmp_path / "d2").exists() and manifest_of(dest)["archive"]["signer_key"] == ssh_fingerprint(pub)
    # deleting the build deletes its signature too
    ops.remove(store, IDENTITY)
    assert not any(p.name.endswith(".sig") for p in Path(store.root).rglob("*"))


def test_unsigned_and_forged_builds_are_refused_with_trusted_keys(
        build: Path, store: FileStore, tmp_path: Path, fleet_keys: dict[str, tuple[Path, str]]) -> None:
    key, pub = fleet_keys["fleet"]
    ops.push(str(build), store, {})
    with pytest.raises(ar.SignatureError, match="is not signed"):
        ops.pull(str(tmp_path / "d1"), store, IDENTITY, "stable", trusted_keys=[pub])
    # a planted, self-consistent archive (rewritten manifest, matching metadata) beside the real signature
    ops.push(str(build), store, {}, signing_key=str(key))
    forged = tmp_path / "forged"
    shutil.copytree(build, forged, symlinks=True)
    (forged / "lib/modules/6.1.0-47-amd64/nvidia.ko").write_bytes(b"#!/bin/sh\nnot a module\n")
    manifest = rewrite_manifest(forged)
    sha, size = ar.pack_tree(str(forged), manifest, str(tmp_path / "forged.tar.gz"))
    store.upload(str(tmp_path / "forged.tar.gz"), KEY, sha, mf.manifest_sha256(manifest), size)
    dest = tmp_path / "dest"
    with pytest.raises(ar.SignatureError, match="does not verify"):
        ops.pull(str(dest), store, IDENTITY, "stable", trusted_keys=[pub])
    # without trusted keys the module check still refuses the non-ELF module
    with pytest.raises(ar.ArchiveError, match="nvidia.ko: not an ELF kernel module"):
        ops.pull(str(dest), store, IDENTITY, "stable")
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_manifest_sha256_metadata_must_name_the_packed_manifest(build: Path, store: FileStore, tmp_path: Path) -> None:
    pushed = ops.push(str(build), store, {})
    sidecar = Path(store.root, *KEY.split("/")).with_name(Path(KEY).name + ".json")
    meta = json.loads(sidecar.read_text())
    meta["manifest_sha256"] = "e" * 64
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ar.ArchiveError, match="manifest-sha256 metadata says e{64}"):
        ops.pull(str(tmp_path / "dest"), store, IDENTITY, "stable")
    assert not (tmp_path / "dest").exists() and pushed["sha256"] == meta["sha256"]


def test_module_vermagic_must_name_the_kernel(build: Path, store: FileStore, tmp_path: Path) -> None:
    (build / "lib/modules/6.1.0-47-amd64/nvidia.ko").write_bytes(make_ko("nvidia", "6.1.0-50-amd64"))
    rewrite_manifest(build)
    ops.push(str(build), store, {})
    with pytest.raises(ar.ArchiveError, match="vermagic '6.1.0-50-amd64 .*' does not name kernel 6.1.0-47-amd64"):
        ops.pull(str(tmp_path / "dest"), store, IDENTITY, "stable")


def test_unsigned_local_build_is_authenticated_by_the_store_signature(build: Path, store: FileStore, tmp_path: Path,
                                                                      fleet_keys: dict[str, tuple[Path, str]]) -> None:
    key, pub = fleet_keys["fleet"]
    ops.push(str(build), store, {})
    dest = tmp_path / "dest"
    assert ops.pull(str(dest), store, IDENTITY, "stable")["authenticated"] is False
    with pytest.raises(ar.SignatureError, match="is not signed"):
        ops.pull(str(dest), store, IDENTITY, "stable", trusted_keys=[pub])
    ops.push(str(build), store, {}, signing_key=str(key))  # signs the stored build, uploads nothing else
    requests = store.requests
    res = ops.pull(str(dest), store, IDENTITY, "stable", trusted_keys=[pub])
    assert not res["changed"] and res["authenticated"] and store.requests - requests == 2  # HEAD + GET .sig
    assert manifest_of(dest)["archive"]["signer_key"] == ssh_fingerprint(pub)


def test_legacy_archive_is_refused_with_trusted_keys(store: FileStore, tmp_path: Path,
                                                     fleet_keys: dict[str, tuple[Path, str]]) -> None:
    make_legacy_archive(Path(store.root, "9001.1.0-stable-nvidia-535.261.03.tar.gz"))
    with pytest.raises(ar.SignatureError, match="carries no signature"):
        ops.pull(str(tmp_path / "dest"), store, IDENTITY, "stable", legacy=True, trusted_keys=[fleet_keys["fleet"][1]])


@pytest.mark.parametrize("entry,pattern", [
    ("not a key", "not an OpenSSH public key"),
    ("ssh-ed25519 !!!notbase64", "not valid base64"),
    ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIHB1epj72kAd84enbyWAz117yFOtKbndPI5lJvUhhgjo", "does not match its type"),
    ('cert-authority ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHB1epj72kAd84enbyWAz117yFOtKbndPI5lJvUhhgjo',
     "certificate authorities"),
    ("/nonexistent/keys.pub", "cannot read /nonexistent/keys.pub"),
    ("# only a comment", "holds no public key"),
])
def test_trusted_keys_are_checked(entry: str, pattern: str) -> None:
    with pytest.raises(ar.ArchiveError, match=pattern):
        ar.load_trusted_keys([entry])


def test_trusted_keys_accept_allowed_signers_and_authorized_keys_lines(fleet_keys: dict[str, tuple[Path, str]]) -> None:
    pub = fleet_keys["fleet"][1]
    keys = ar.load_trusted_keys([f'someone@example.com namespaces="git" {pub}', f"from=\"10.0.0.1\" {pub}", pub])
    assert [k.fingerprint for k in keys] == [ssh_fingerprint(pub)]
    assert keys[0].allowed_signers_line().startswith('modulus-build namespaces="modulus-build" ssh-ed25519 ')


def test_missing_ssh_keygen_is_a_clear_error(build: Path, store: FileStore, tmp_path: Path,
                                             fleet_keys: dict[str, tuple[Path, str]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ar, "which", lambda _name: None)
    with pytest.raises(ar.ArchiveError, match="need ssh-keygen"):
        ops.push(str(build), store, {}, signing_key=str(fleet_keys["fleet"][0]))
    with pytest.raises(ar.ArchiveError, match="need ssh-keygen"):
        ops.pull(str(tmp_path / "dest"), store, IDENTITY, "stable", trusted_keys=[fleet_keys["fleet"][1]])
    assert store.requests == 0


def test_pull_sweeps_what_a_killed_run_left(build: Path, store: FileStore, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ops.push(str(build), store, {})
    left = [tmp_path / f".dest.pull-{dead.pid}-abc", tmp_path / f".dest.build-{dead.pid}-def"]
    for path in left:
        (path / "tree").mkdir(parents=True)
    (tmp_path / f".dest.failed.json.tmp-{dead.pid}-xyz").write_text("{")
    mine = tmp_path / f".dest.pull-{os.getpid()}-alive"
    mine.mkdir()
    res = ops.pull(str(tmp_path / "dest"), store, IDENTITY, "stable")
    assert res["changed"] and len(res["swept"]) == 3 and all("removed leftover" in line for line in res["swept"])
    assert not any(p.exists() for p in left) and mine.exists()
    assert not (tmp_path / f".dest.failed.json.tmp-{dead.pid}-xyz").exists()
