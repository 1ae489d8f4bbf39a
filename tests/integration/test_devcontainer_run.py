"""run_in_image() and image_info() on the kit's real developer container images (root): every method that
works here, binds, environment, timeout, and no loop device, mount or process left; the image is never written."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils.container import ContainerError as DevcontainerError
from ansible_collections.modulus.kmods.plugins.module_utils.container import run_in_image
from ansible_collections.modulus.kmods.plugins.module_utils.imageinfo import image_info
from ansible_collections.modulus.kmods.plugins.module_utils.mounts import mounts_under
from sim.kit import Kit

METHODS = ["overlay", "chroot"] if shutil.which("systemd-nspawn") else ["chroot"]


def loops_of(path: Path, ours: Path) -> list[str]:
    """Loop devices backed by ``path`` that are ours to worry about: unmounted, or mounted under ``ours``
    (TMPDIR, where run_in_image puts its workspace without scratch_dir).

    Others may run the kit image at the same time (kmod_build tests), and ``mount -o loop`` shares one
    autoclear loop device between read-only mounts of the same file and offset; such a loop device,
    mounted elsewhere, belongs to them."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True,
                         text=True, check=False).stdout
    points: dict[str, list[str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            points.setdefault(fields[fields.index("-") + 2], []).append(fields[4])
    mine = []
    for line in out.splitlines():
        name, _sep, back = line.strip().partition(" ")
        if str(path) not in back:
            continue
        where = points.get(name, [])
        if not where or any(p == str(ours) or p.startswith(str(ours) + "/") for p in where):
            mine.append(line)
    return mine


def fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def test_image_info_of_both_releases(kit: Kit) -> None:
    for rel in kit.releases.values():
        info = image_info(str(rel.image_raw))
        assert info.kernel_releases == [rel.kernel]
        assert (info.version, info.board, info.root_offset) == (rel.version, rel.board, 2097152)


@pytest.mark.parametrize("method", METHODS)
def test_command_sees_the_image_binds_and_env(kit: Kit, tmp_path: Path, method: str) -> None:
    rel = kit.releases["current"]
    before = fingerprint(rel.image_raw)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "in.txt").write_text("payload\n")
    script = ("set -e; cat /usr/share/flatcar/release; ls /lib/modules; echo KV=$KVER; pwd; cat /src/in.txt; "
              "test -e /lib/modules/$KVER/build/Makefile; echo made > /out/result; touch /etc/scratch; "
              "if touch /src/x 2>/dev/null; then echo RO-BROKEN; fi")
    res = run_in_image(str(rel.image_raw), ["/bin/sh", "-c", script], binds_ro=[(str(src), "/src")],
                       binds_rw=[(str(out), "/out")], env={"KVER": rel.kernel}, workdir="/src",
                       timeout=300, log_path=str(tmp_path / "run.log"), method=method)
    assert res.rc == 0, res.output_tail
    assert res.method == method and not res.timed_out
    assert f"FLATCAR_RELEASE_VERSION={rel.version}" in res.output_tail
    assert f"KV={rel.kernel}" in res.output_tail and "\n/src\n" in res.output_tail and "payload" in res.output_tail
    assert "RO-BROKEN" not in res.output_tail.splitlines()
    assert (out / "result").read_text() == "made\n"
    assert fingerprint(rel.image_raw) == before
    assert loops_of(rel.image_raw, Path(tempfile.gettempdir())) == []
    assert "=== rc=0" in (tmp_path / "run.log").read_text()


@pytest.mark.parametrize("method", METHODS)
def test_timeout_kills_the_group_and_cleans_up(kit: Kit, tmp_path: Path, method: str) -> None:
    rel = kit.releases["current"]
    started = time.monotonic()
    res = run_in_image(str(rel.image_raw), ["/bin/sh", "-c", "sleep 4243 & sleep 4243; echo never"], timeout=3,
                       log_path=str(tmp_path / "t.log"), method=method)
    wall = time.monotonic() - started
    assert res.timed_out and res.rc != 0
    # stopped at its timeout (not before), not at the command's end (the "never" below)
    assert 3 <= res.duration <= wall, (res.duration, wall)
    assert "never" not in res.output_tail.splitlines()
    assert loops_of(rel.image_raw, Path(tempfile.gettempdir())) == []
    # no "sleep 4243" left running from that container
    procs = subprocess.run(["pgrep", "-f", "sleep 4243"], capture_output=True, text=True, check=False).stdout.split()
    assert [p for p in procs if int(p) != os.getpid()] == []


def test_failing_command_returns_its_rc(kit: Kit, tmp_path: Path) -> None:
    res = run_in_image(str(kit.releases["pending"].image_raw), ["/bin/sh", "-c", "echo oops >&2; exit 7"], timeout=120,
                       log_path=str(tmp_path / "f.log"), method=METHODS[-1])
    assert res.rc == 7 and "oops" in res.output_tail


def test_a_bad_image_fails_before_mounting(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(bytes(1 << 20))
    with pytest.raises(Exception, match="not a GPT"):
        run_in_image(str(bogus), ["true"], method=METHODS[0])
    with pytest.raises(DevcontainerError, match="does not exist"):
        run_in_image(str(tmp_path / "missing.bin"), ["true"], method=METHODS[0])
    assert mounts_under(str(tmp_path)) == []


@pytest.mark.skipif("overlay" not in METHODS, reason="systemd-nspawn is not installed")
def test_overlay_upper_on_a_scratch_dir(kit: Kit, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    res = run_in_image(str(kit.releases["current"].image_raw),
                       ["/bin/sh", "-c", "head -c 8388608 /dev/zero > /var/tmp/big && ls -l /var/tmp/big"],
                       timeout=120, log_path=str(tmp_path / "s.log"), method="overlay", scratch_dir=str(scratch))
    assert res.rc == 0, res.output_tail
    assert list(scratch.iterdir()) == []  # the workspace is gone again
    assert mounts_under(str(tmp_path)) == []
