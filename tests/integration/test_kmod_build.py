"""modulus.kmods.kmod_build run through Ansible (``ansible localhost -m``) in the kit's developer
containers, against real sources: the project's own small module (tests/fixtures/hello) and
NVIDIA 535 from Debian non-free packed as a self-extracting ``.run`` (tests/sim/nvidia.py).
What was built is then loaded into Debian's real kernel under QEMU (tests/sim/qemu.py).

The NVIDIA builds (about 3 minutes each on 2 cores) are marked ``slow``; they run once per
session, shared by the tests that need them, and their output directory lives in the kit cache so
kmod_build's own idempotence skips them on a rerun with the same inputs (set
MODULUS_TEST_FRESH_NVIDIA=1 to force a rebuild).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import elfmod, fsutil, kmodbuild, manifest
from ansible_collections.modulus.kmods.plugins.module_utils.container import run_in_image
from sim import ansible_run, faults
from sim.kit import Kit
from sim.nvidia import build_cache, nvidia_run
from sim.qemu import boot_and_load
from sim.signing import make_signing_pair

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "tests" / "fixtures" / "hello"
MODINFO = shutil.which("modinfo") or "/usr/sbin/modinfo"


def run_module(args: dict, check: bool = False, diff: bool = False, timeout: float = 1800) -> tuple[dict, str]:
    return ansible_run.run_module("modulus.kmods.kmod_build", args, check=check, diff=diff, timeout=timeout)


def hello_args(rel, dest: Path, **kw) -> dict:
    args = {"image": str(rel.image_raw), "recipe": "generic", "name": "modulus-hello", "version": "1.0",
            "source": str(HELLO), "modules": ["modulus_hello"], "dest": str(dest)}
    args.update(kw)
    return args


def kernel_symvers(rel, tmp: Path) -> dict[str, tuple[int, str]]:
    """The image kernel's Module.symvers, read inside the image."""
    log = tmp / f"symvers-{rel.kernel}.log"
    res = run_in_image(str(rel.image_raw), ["cat", f"/lib/modules/{rel.kernel}/build/Module.symvers"],
                       log_path=str(log), timeout=120)
    assert res.rc == 0, res.output_tail
    syms = elfmod.parse_symvers(log.read_text())
    assert len(syms) > 10000
    return syms


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".build-" in p.name or ".old-" in p.name)


def stamps(*paths: Path) -> list[tuple[int, int, int]]:
    """(inode, mtime in ns, size) of each path: equal before and after a run that wrote none of them
    (a build swaps a new dest into place and rewrites the failure marker and log)."""
    return [(st.st_ino, st.st_mtime_ns, st.st_size) for st in (p.stat() for p in paths)]


def assert_nothing_built(res: dict, wall: float) -> None:
    """A run that decided without building: no build timings, and a duration that is a number of
    seconds, not longer than the run measured around it."""
    assert "timings" not in res, res
    assert isinstance(res["duration"], float) and 0 <= res["duration"] <= wall, (res["duration"], wall)


@pytest.fixture(scope="module")
def hello_builds(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The hello module built through kmod_build for both releases (first run: changed)."""
    base = tmp_path_factory.mktemp("hello")
    out = {}
    for name, rel in kit.releases.items():
        dest = base / name
        res, text = run_module(hello_args(rel, dest, channel=rel.channel))
        assert not res.get("failed"), text
        out[name] = {"result": res, "dest": dest, "rel": rel}
    return out


# --------------------------------------------------------------------------- generic recipe


def test_generic_hello_builds_for_each_release(hello_builds: dict[str, dict]) -> None:
    for name, b in hello_builds.items():
        res, dest, rel = b["result"], b["dest"], b["rel"]
        assert res["changed"] is True, name
        assert res["kernel_release"] == rel.kernel
        ko = dest / "lib" / "modules" / rel.kernel / "modulus_hello.ko"
        assert ko.is_file()
        [mod] = res["modules"]
        assert mod["name"] == "modulus_hello" and mod["vermagic"].split()[0] == rel.kernel
        assert mod["signer"] is None and mod["size"] == ko.stat().st_size
        m = json.loads((dest / "manifest.json").read_text())
        assert m["schema"] == 1 and m["os"] == "flatcar" and m["os_version"] == rel.version
        assert m["board"] == rel.board and m["channel"] == rel.channel
        assert m["driver"] == "modulus-hello" and m["driver_version"] == "1.0" and m["module_type"] == "default"
        assert m["crc_checked"] >= 5  # printk, kmalloc, kfree, strscpy ... checked against the image's table
        assert m["toolchain"]["gcc"].startswith("gcc")
        assert set(m["files"]) == {"build.log", f"lib/modules/{rel.kernel}/modulus_hello.ko"}
        assert manifest.verify_tree(str(dest), m, strict=False) == []
        log = (dest / "build.log").read_text()
        assert "M=/modulus/work/src" in log and rel.kernel in log
        assert leftovers(dest.parent) == []
        # modinfo (kmod) reads what we read
        vm = subprocess.run([MODINFO, "-F", "vermagic", str(ko)], capture_output=True, text=True).stdout.strip()
        assert vm == mod["vermagic"].strip()


def test_second_run_is_unchanged_and_builds_nothing(hello_builds: dict[str, dict]) -> None:
    b = hello_builds["pending"]
    before = (b["dest"] / "manifest.json").read_bytes()
    files = [b["dest"], b["dest"] / "manifest.json", b["dest"] / "build.log"]
    untouched = stamps(*files)
    started = time.monotonic()
    res, text = run_module(hello_args(b["rel"], b["dest"], channel=b["rel"].channel))
    wall = time.monotonic() - started
    assert res["changed"] is False, text
    assert res["reason"] == "up to date"
    # nothing was built: dest is the same directory with the same files, "0 when nothing was built"
    assert_nothing_built(res, wall)
    assert res["duration"] == 0
    assert stamps(*files) == untouched
    assert (b["dest"] / "manifest.json").read_bytes() == before
    # check mode on a new destination says it would build and writes nothing
    new = b["dest"].parent / "check-only"
    res, text = run_module(hello_args(b["rel"], new), check=True, diff=True)
    assert res["changed"] is True and "would build" in res["reason"], text
    assert not new.exists() and leftovers(new.parent) == []
    # force rebuilds
    res, text = run_module(hello_args(b["rel"], b["dest"], channel=b["rel"].channel, force=True))
    assert res["changed"] is True, text
    assert manifest.verify_tree(str(b["dest"]), res["manifest"], strict=False) == []


def test_tampered_output_is_rebuilt(hello_builds: dict[str, dict], kit: Kit, tmp_path: Path) -> None:
    rel = kit.releases["current"]
    dest = tmp_path / "out"
    shutil.copytree(hello_builds["current"]["dest"], dest, symlinks=True)
    ko = dest / "lib" / "modules" / rel.kernel / "modulus_hello.ko"
    data = bytearray(ko.read_bytes())
    data[100] ^= 0xFF
    ko.write_bytes(bytes(data))
    res, text = run_module(hello_args(rel, dest, channel=rel.channel))
    assert res["changed"] is True, text
    assert manifest.verify_tree(str(dest), res["manifest"], strict=False) == []


def test_module_built_for_one_kernel_fails_the_others_check(hello_builds: dict[str, dict], kit: Kit,
                                                             tmp_path: Path) -> None:
    cur, pend = kit.releases["current"], kit.releases["pending"]
    ko_cur = hello_builds["current"]["dest"] / "lib" / "modules" / cur.kernel / "modulus_hello.ko"
    mi = elfmod.read_module(str(ko_cur))
    # the check itself, against the other image's kernel and Module.symvers
    res = elfmod.check_module(mi, pend.kernel, kernel_symvers(pend, tmp_path))
    assert not res.ok and not res.vermagic_ok
    # the two Debian ABIs differ in CRCs too: the symbols are named
    assert {sym for sym, _have, _want, _exp in res.bad_crcs} & {"kmalloc_caches", "kmalloc_trace", "module_layout"}
    assert elfmod.check_module(mi, cur.kernel, kernel_symvers(cur, tmp_path)).ok

    # and through the module: a source that ships a module prebuilt for the other kernel
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(HELLO / "modulus_hello.c", src / "modulus_other.c")
    (src / "Kbuild").write_text("obj-m += modulus_other.o\n")
    shutil.copy(ko_cur, src / "modulus_hello.ko")
    dest = tmp_path / "cross"
    args = {"image": str(pend.image_raw), "recipe": "generic", "name": "cross", "source": str(src),
            "modules": ["modulus_other", "modulus_hello"], "dest": str(dest)}
    res, text = run_module(args)
    assert res.get("failed") is True, text
    assert "modulus_hello.ko: vermagic" in res["msg"] and cur.kernel in res["msg"]
    assert "modulus_hello.ko: symbol kmalloc_trace CRC" in res["msg"]
    assert "modulus_other.ko" not in res["msg"]  # the one built here fits
    assert not dest.exists() and leftovers(tmp_path) == []
    marker = json.loads((tmp_path / "cross.failed.json").read_text())
    assert marker["inputs_sha256"] == res["inputs_sha256"]
    assert (tmp_path / "cross.failed.log").is_file()
    # a known-failing combination is not retried: fails at once, no container (the marker and the
    # failed log stay as they are: a build would rewrite both)
    marked = [tmp_path / "cross.failed.json", tmp_path / "cross.failed.log"]
    untouched, contents = stamps(*marked), [p.read_bytes() for p in marked]
    started = time.monotonic()
    res2, text = run_module(args)
    wall = time.monotonic() - started
    assert res2.get("failed") is True and "previous build with the same inputs failed" in res2["msg"], text
    assert res2["failure"]["known"] is True and res2["reason"].startswith("known failure"), res2
    assert_nothing_built(res2, wall)
    assert stamps(*marked) == untouched and [p.read_bytes() for p in marked] == contents
    assert not dest.exists() and leftovers(tmp_path) == []
    # force retries for real (and fails the same way)
    res3, text = run_module(dict(args, force=True))
    assert res3.get("failed") is True and "modulus_hello.ko: vermagic" in res3["msg"], text


def test_compile_error_reports_log_tail_and_marker(kit: Kit, tmp_path: Path) -> None:
    rel = kit.releases["pending"]
    # every build of this source is held in the container until the test lets it go (sim.faults.HeldSource)
    held = faults.HeldSource.make(HELLO, tmp_path / "broken")
    src = held.path
    (src / "modulus_hello.c").write_text((src / "modulus_hello.c").read_text().replace("kfree(buf);",
                                                                                       "kfree(buf) this is wrong;"))
    dest = tmp_path / "out"
    args = hello_args(rel, dest, source=str(src))
    # held half a second in make: the failed run lasts at least that long, whatever the machine's speed
    first = faults.run_released("modulus.kmods.kmod_build", args, held, tmp_path, tag_dir=tmp_path / "run1", hold=0.5)
    res, text = first.result, first.output
    assert res.get("failed") is True, text
    assert "exited with rc" in res["msg"] and "end of the build log" in res["msg"]
    assert "error:" in res["msg"]  # the compiler's message is in the tail
    assert Path(res["build_log"]).is_file() and "this is wrong" in Path(res["build_log"]).read_text()
    assert not dest.exists() and leftovers(tmp_path) == []
    # the failed run says what failed and how long it ran (at least while it was held, at most the
    # run as measured here; the duration is rounded to ms); the failure is remembered
    assert isinstance(res["duration"], float) and first.held_for <= res["duration"] + 0.001, (res, first)
    assert res["duration"] <= first.wall, (res, first)
    assert "compile error" in res["reason"] and "remembered in" in res["reason"], res
    failure = res["failure"]
    assert failure["kind"] == "compile" and failure["remembered"] is True and failure["known"] is False
    first = failure["errors"][0]
    assert "error:" in first and "modulus_hello.c" in first, failure
    assert "first errors:" in res["msg"] and first in res["msg"]
    marker = json.loads((tmp_path / "out.failed.json").read_text())
    assert marker["kind"] == "compile" and marker["errors"] == failure["errors"]
    # the same inputs again: fail without a build (no make is held; the marker and the failed log
    # stay as they are), quoting the compiler's first errors and naming the log
    marked = [tmp_path / "out.failed.json", tmp_path / "out.failed.log"]
    untouched = stamps(*marked)
    again, text, wall = faults.run_without_build("modulus.kmods.kmod_build", args, tmp_path, tag_dir=tmp_path / "run2")
    assert again.get("failed") is True, text
    assert stamps(*marked) == untouched
    assert "a previous build with the same inputs failed" in again["msg"] and "compile error" in again["msg"]
    assert "first errors:" in again["msg"] and first in again["msg"]
    assert f"build log: {tmp_path / 'out.failed.log'}" in again["msg"]
    assert again["reason"].startswith("known failure: compile error") and again["failure"]["known"] is True
    assert_nothing_built(again, wall)
    assert again["duration"] > 0
    # fixing the source changes the inputs: the marker no longer blocks
    shutil.copy(HELLO / "modulus_hello.c", src / "modulus_hello.c")
    fixed = faults.run_released("modulus.kmods.kmod_build", args, held, tmp_path, tag_dir=tmp_path / "run3")
    res, text = fixed.result, fixed.output
    assert res["changed"] is True, text
    assert not (tmp_path / "out.failed.json").exists()


@pytest.fixture
def flaky_http(tmp_path: Path):
    """HTTP on 127.0.0.1 serving a directory; answers 503 while ``state["down"]`` is true."""
    import functools
    import http.server
    import threading

    root = tmp_path / "flaky"
    root.mkdir()
    state = {"down": True, "hits": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            state["hits"] += 1
            if state["down"]:
                self.send_error(503, "Service Unavailable")
                return
            super().do_GET()

        def log_message(self, *_a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}", state
    finally:
        srv.shutdown()
        srv.server_close()


def test_transient_download_failure_is_not_remembered(kit: Kit, tmp_path: Path, flaky_http) -> None:
    """A source server answering 503 fails the run, but the next run (no force) tries again."""
    rel = kit.releases["pending"]
    www, base, state = flaky_http
    tarball = www / "modulus-hello-1.0.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(HELLO.parent), "--transform", "s,^hello,modulus-hello-1.0,",
                    "hello"], check=True)
    dest = tmp_path / "out"
    args = hello_args(rel, dest, source=f"{base}/{tarball.name}", checksum=fsutil.sha256_file(str(tarball)))
    res, text = run_module(args)
    assert res.get("failed") is True and "503" in res["msg"], text
    assert state["hits"] >= 2  # retried before giving up
    assert res["failure"]["kind"] == "download" and res["failure"]["remembered"] is False, res
    assert "download failed" in res["reason"] and "not remembered" in res["reason"] and res["duration"] > 0
    assert not (tmp_path / "out.failed.json").exists() and not dest.exists() and leftovers(tmp_path) == []
    # the server is back: the same inputs build without force
    state["down"] = False
    res, text = run_module(args)
    assert res["changed"] is True and not res.get("failed"), text
    assert (dest / "lib" / "modules" / rel.kernel / "modulus_hello.ko").is_file()


def test_bad_input_is_named_and_nothing_is_written(kit: Kit, tmp_path: Path) -> None:
    rel = kit.releases["pending"]
    dest = tmp_path / "out"
    cases = [
        (dict(recipe="nvidia", name=None, version="535.104.05; reboot"), "version="),
        (dict(recipe="nvidia", name=None, version="../535"), "version="),
        (dict(recipe="nvidia", version="535.104.05"), "the nvidia recipe always builds driver nvidia"),
        (dict(recipe="dkms"), "recipe"),
        (dict(modules=["../../etc/evil"]), "modules="),
        (dict(kernel_release="6.1.0-99-amd64"), "not in the image"),
        (dict(source="relative/path"), "absolute path"),
        (dict(subdir="../.."), "subdir="),
        (dict(make_args=["$(shell reboot)"]), "make_args"),
        (dict(checksum="nothex"), "checksum="),
        (dict(signing_key=str(tmp_path / "missing.key"), signing_cert=str(tmp_path / "missing.crt")),
         "signing_key="),
    ]
    for extra, needle in cases:
        res, text = run_module(hello_args(rel, dest, **extra))
        assert res.get("failed") is True and needle in res["msg"], (extra, text)
    # a module the build does not produce
    res, text = run_module(hello_args(rel, dest, modules=["modulus_hello", "modulus_missing"]))
    assert res.get("failed") is True and "modulus_missing" in res["msg"], text
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.failed.json", "out.failed.log", "out.lock"]


def test_signing_with_sign_file_in_the_image(kit: Kit, tmp_path: Path) -> None:
    rel = kit.releases["pending"]
    key, cert, want_key_id = make_signing_pair(tmp_path, "modulus test Secure Boot key")
    dest = tmp_path / "signed"
    res, text = run_module(hello_args(rel, dest, signing_key=str(key), signing_cert=str(cert)))
    assert res["changed"] is True, text
    ko = dest / "lib" / "modules" / rel.kernel / "modulus_hello.ko"
    signer = subprocess.run([MODINFO, "-F", "signer", str(ko)], capture_output=True, text=True).stdout.strip()
    sig_key = subprocess.run([MODINFO, "-F", "sig_key", str(ko)], capture_output=True, text=True).stdout.strip()
    assert signer == "modulus test Secure Boot key"
    assert sig_key == want_key_id
    [mod] = res["modules"]
    assert mod["signer"] == signer and mod["sig_key"] == sig_key
    assert res["manifest"]["signing_key_fingerprint"] == kmodbuild.cert_fingerprint(str(cert))
    assert "sign-file" in (dest / "build.log").read_text()
    key_body = key.read_text().split("-----")[2].strip()[:40]
    assert key_body not in text  # the key never shows up in the output
    for p in dest.rglob("*"):
        assert key_body.encode() not in p.read_bytes() if p.is_file() else True
    # a different certificate is a different build
    res2, text = run_module(hello_args(rel, dest))
    assert res2["changed"] is True, text
    assert res2["modules"][0]["signer"] is None


@pytest.fixture
def http_dir(tmp_path: Path):
    """A plain HTTP server on 127.0.0.1 serving a directory, with the request log."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_a: object) -> None:
            hits.append(self.path)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}", hits
    finally:
        srv.shutdown()
        srv.server_close()


def test_generic_from_tarball_url_and_git(kit: Kit, tmp_path: Path, http_dir) -> None:
    rel = kit.releases["pending"]
    www, base, hits = http_dir
    tarball = www / "modulus-hello-1.0.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(HELLO.parent), "--transform", "s,^hello,modulus-hello-1.0,",
                    "hello"], check=True)
    digest = fsutil.sha256_file(str(tarball))
    dest = tmp_path / "from-url"
    res, text = run_module(hello_args(rel, dest, source=f"{base}/modulus-hello-1.0.tar.gz", checksum=digest))
    assert res["changed"] is True, text
    assert res["source_sha256"] == digest and hits == ["/modulus-hello-1.0.tar.gz"]
    assert (dest / "lib" / "modules" / rel.kernel / "modulus_hello.ko").is_file()
    # pinned: the second run is decided without downloading anything
    res, text = run_module(hello_args(rel, dest, source=f"{base}/modulus-hello-1.0.tar.gz", checksum=digest))
    assert res["changed"] is False and hits == ["/modulus-hello-1.0.tar.gz"], text
    # a wrong pin fails and leaves nothing
    bad = tmp_path / "bad-pin"
    res, text = run_module(hello_args(rel, bad, source=f"{base}/modulus-hello-1.0.tar.gz", checksum="0" * 64))
    assert res.get("failed") is True and "does not match" in res["msg"], text
    assert not bad.exists() and leftovers(tmp_path) == []

    # git: a local repository, a tag
    repo = tmp_path / "repo"
    shutil.copytree(HELLO, repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "hello"], check=True)
    subprocess.run(git + ["tag", "v1.0"], check=True)
    dest = tmp_path / "from-git"
    res, text = run_module(hello_args(rel, dest, source=f"file://{repo}", git_ref="v1.0"))
    assert res["changed"] is True, text
    assert res["manifest"]["source"] == f"file://{repo}"
    assert (dest / "lib" / "modules" / rel.kernel / "modulus_hello.ko").is_file()


@pytest.mark.qemu
def test_hello_loads_into_its_kernel_and_not_into_the_other(hello_builds: dict[str, dict], kit: Kit) -> None:
    pend, cur = kit.releases["pending"], kit.releases["current"]
    ko = hello_builds["pending"]["dest"] / "lib" / "modules" / pend.kernel / "modulus_hello.ko"
    boot = boot_and_load(pend.kernel, [ko])
    assert boot.booted, boot.console[-3000:]
    r = boot.results["modulus_hello"]
    assert r.ok, (r, boot.console[-3000:])
    assert "modulus_hello" in boot.loaded
    assert "modulus_hello: hello from modulus" in boot.console
    # the current release's build is refused by the pending release's kernel
    other = hello_builds["current"]["dest"] / "lib" / "modules" / cur.kernel / "modulus_hello.ko"
    boot = boot_and_load(pend.kernel, [other])
    r = boot.results["modulus_hello"]
    assert not r.ok and "invalid module format" in r.message.lower(), (r, boot.console[-3000:])
    # the kernel's own checks say why: symbol CRCs (modversions) or the version magic
    assert ("modulus_hello: disagrees about version of symbol" in boot.console
            or "modulus_hello: version magic" in boot.console), boot.console[-3000:]


# --------------------------------------------------------------------------- NVIDIA recipe (slow)


@pytest.fixture(scope="module")
def nvidia_builds(kit: Kit) -> dict[str, dict]:
    """The real NVIDIA 535 kernel modules built through kmod_build for both releases, once."""
    run = nvidia_run()
    base = build_cache(kit.recipe_hash)  # keyed by the code that builds: nothing made by older code is reused
    out = {}
    for name, rel in kit.releases.items():
        dest = base / "nvidia" / run.version / rel.kernel
        args = {"image": str(rel.image_raw), "recipe": "nvidia", "driver_version": run.version, "source": str(run.path),
                "checksum": f"sha256:{run.sha256}", "module_type": "proprietary", "archive_root": str(base),
                "channel": rel.channel}
        if os.environ.get("MODULUS_TEST_FRESH_NVIDIA") == "1":
            args["force"] = True
        started = time.monotonic()
        res, text = run_module(args, timeout=3000)
        assert not res.get("failed"), text[-5000:]
        out[name] = {"result": res, "dest": dest, "rel": rel, "args": args, "seconds": time.monotonic() - started}
    return out


@pytest.mark.slow
def test_nvidia_builds_for_both_releases(nvidia_builds: dict[str, dict]) -> None:
    for name, b in nvidia_builds.items():
        res, dest, rel = b["result"], b["dest"], b["rel"]
        m = json.loads((dest / "manifest.json").read_text())
        assert m["driver"] == "nvidia" and m["driver_version"] == b["args"]["driver_version"], name
        assert m["module_type"] == "proprietary" and m["kernel_release"] == rel.kernel
        assert m["source_sha256"] == b["args"]["checksum"].split(":", 1)[1]
        names = {mod["name"] for mod in m["modules"]}
        assert {"nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"} <= names
        for mod in m["modules"]:
            assert mod["vermagic"].split()[0] == rel.kernel
        deps = {mod["name"]: mod["depends"] for mod in m["modules"]}
        assert "nvidia" in deps["nvidia_uvm"] and "nvidia" in deps["nvidia_modeset"]
        assert m["crc_checked"] > 300  # every imported symbol of five modules, kernel's and siblings'
        kdir = dest / "lib" / "modules" / rel.kernel
        assert (kdir / "nvidia.ko").stat().st_size > 10_000_000
        lib = dest / "lib"
        assert (lib / f"libnvidia-ml.so.{m['driver_version']}").is_file()
        assert os.readlink(lib / "libnvidia-ml.so.1") == f"libnvidia-ml.so.{m['driver_version']}"
        assert os.readlink(lib / "libnvidia-ml.so") == "libnvidia-ml.so.1"
        smi = dest / "bin" / "nvidia-smi"
        assert os.access(smi, os.X_OK)
        assert b"modulus test stand-in" in smi.read_bytes()
        assert manifest.verify_tree(str(dest), m, strict=False) == []
        assert "with its own self-extractor" in (dest / "build.log").read_text()
        assert "KERNEL_UNAME" in (dest / "build.log").read_text()
        assert res["kernel_release"] == rel.kernel and res["module_type"] == "proprietary"
        assert res["dest"] == str(dest)
        # a build reused from the cache is one kmod_build itself found up to date for these inputs
        assert res["changed"] or (res["reason"] == "up to date" and m["inputs_sha256"] == res["inputs_sha256"]), res
        assert res["identity"] == {"os": "flatcar", "board": "amd64-usr", "os_version": rel.version,
                                   "kernel_release": rel.kernel, "driver": "nvidia", "driver_version": m["driver_version"],
                                   "module_type": "proprietary", "signer": None}


@pytest.mark.slow
def test_nvidia_second_run_is_unchanged(nvidia_builds: dict[str, dict]) -> None:
    b = nvidia_builds["pending"]
    files = [b["dest"], b["dest"] / "manifest.json", b["dest"] / "build.log"]
    untouched = stamps(*files)
    started = time.monotonic()
    res, text = run_module(b["args"] | {"force": False})
    wall = time.monotonic() - started
    assert res["changed"] is False and res["reason"] == "up to date", text
    # nothing was built: dest is the same directory with the same files
    assert_nothing_built(res, wall)
    assert res["duration"] == 0 and stamps(*files) == untouched


@pytest.mark.slow
def test_nvidia_url_template_with_pinned_checksum_needs_no_download(nvidia_builds: dict[str, dict],
                                                                    http_dir) -> None:
    """The same .run named by a URL template and its checksum is the same input: no request is made."""
    b = nvidia_builds["pending"]
    _www, base, hits = http_dir
    args = {k: v for k, v in b["args"].items() if k not in ("source", "force")}
    args["url_template"] = base + "/XFree86/Linux-{arch}/{version}/NVIDIA-Linux-{arch}-{version}.run"
    res, text = run_module(args)
    assert res["changed"] is False and res["reason"] == "up to date", text
    assert hits == []


@pytest.mark.slow
def test_nvidia_for_one_kernel_fails_the_others_check(nvidia_builds: dict[str, dict], kit: Kit,
                                                      tmp_path: Path) -> None:
    cur, pend = nvidia_builds["current"], nvidia_builds["pending"]
    kdir = cur["dest"] / "lib" / "modules" / cur["rel"].kernel
    mods = {p.stem: str(p) for p in kdir.glob("*.ko")}
    infos, problems, checked = elfmod.check_build(mods, pend["rel"].kernel, None, None)
    assert problems and all("vermagic" in p for p in problems)
    symvers = tmp_path / "pending.symvers"
    syms = kernel_symvers(pend["rel"], tmp_path)
    symvers.write_text("".join(f"0x{crc:08x}\t{s}\t{mod}\tEXPORT_SYMBOL\t\n" for s, (crc, mod) in syms.items()))
    infos, problems, checked = elfmod.check_build(mods, cur["rel"].kernel, str(symvers), None)
    # against the other kernel's CRC table, symbols that changed between the two ABIs are named
    assert checked > 0
    crc_problems = [p for p in problems if " CRC 0x" in p]
    assert any(p.startswith("nvidia.ko: symbol ") for p in crc_problems), problems[:10]


@pytest.mark.slow
@pytest.mark.qemu
def test_nvidia_is_accepted_by_its_kernel(nvidia_builds: dict[str, dict]) -> None:
    b = nvidia_builds["pending"]
    ko = b["dest"] / "lib" / "modules" / b["rel"].kernel / "nvidia.ko"
    boot = boot_and_load(b["rel"].kernel, [ko], timeout=300)
    assert boot.booted, boot.console[-3000:]
    r = boot.results["nvidia"]
    assert all(boot.results[d].ok for d in boot.dependencies), boot.console[-3000:]
    msg = r.message.lower()
    assert "invalid module format" not in msg and "unknown symbol" not in msg, r
    assert "disagrees about version of symbol" not in boot.console
    assert "Unknown symbol" not in boot.console
    assert r.rc != 0 and "no such device" in msg, (r, boot.console[-3000:])
    assert "NVRM: No NVIDIA GPU found." in boot.console
