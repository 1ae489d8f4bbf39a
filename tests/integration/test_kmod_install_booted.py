"""kmod_install's release-bound images in a booted systemd (tests/sim/booted.py: ``systemd-nspawn -b``
of a Debian root with systemd, dressed as Flatcar 9001.1.0).

The images are what kmod_install makes on a kit host root for the two kit releases (directory
extensions: the container has no loop devices for ``.raw`` images), each with the complete module
index of its kernel (Debian's real module trees of 6.1.0-47 and 6.1.0-50 as the base). At boot
systemd-sysext merges only the image whose ``VERSION_ID`` is the container's; ``modprobe -S <kver>
--show-depends`` then resolves the build's module to the extension's file (``-S``: the container's
``uname -r`` is the machine's kernel, not the image's). Changing ``VERSION_ID`` and running
``systemd-sysext refresh`` swaps to the other image. Run on both booted roots: Debian bookworm
(systemd 252) and trixie (systemd 257).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sim import ansible_run
from sim.booted import SUITES, boot, booted_root
from sim.kit import Kit
from sim.qemu import kernel_dir

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "tests" / "fixtures" / "hello"
DRIVER = "modulus-hello"


@pytest.fixture(scope="module")
def images(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directory images of the hello build for both kit releases, made by kmod_install."""
    base = tmp_path_factory.mktemp("hello-b")
    root = kit.host_root(tmp_path_factory.mktemp("host-b"), update="need_reboot")
    for name, rel in kit.releases.items():
        args = {"image": str(rel.image_raw), "recipe": "generic", "name": DRIVER, "version": "1.0",
                "source": str(HELLO), "modules": ["modulus_hello"], "dest": str(base / name)}
        res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
        assert not res.get("failed"), text
        kmods = kernel_dir(rel.kernel) / "lib" / "modules" / rel.kernel
        res, text = ansible_run.run_module("modulus.kmods.kmod_install", {
            "src": str(base / name), "host_root": str(root), "state": "staged", "sysext_format": "directory",
            "kernel_modules_dir": str(kmods)}, timeout=900)
        assert not res.get("failed") and res["image"]["index"], text
    ext = root / "var/lib/extensions"
    return {p.name: p for p in sorted(ext.iterdir())}


@pytest.fixture(scope="module", params=sorted(SUITES))
def systemd_root(request: pytest.FixtureRequest):
    """Each booted root: bookworm (systemd 252) and trixie (systemd 257)."""
    return booted_root(suite=request.param)


def test_only_the_matching_release_merges_and_refresh_swaps(kit: Kit, images: dict[str, Path], systemd_root) -> None:
    cur, pend = kit.releases["current"], kit.releases["pending"]
    names = {r.version: f"modulus-{DRIVER}-{r.version}" for r in (cur, pend)}
    assert set(images) == set(names.values())
    hello_path = f"updates/modulus/{DRIVER}/modulus_hello.ko"
    probe = f"""
echo "== status-1"; systemd-sysext status
echo "== list-1"; systemd-sysext list
echo "== release-files-1"; ls /usr/lib/extension-release.d/
echo "== show-cur-1"; modprobe -S {cur.kernel} --show-depends modulus_hello; echo "rc=$?"
echo "== show-pend-1"; modprobe -S {pend.kernel} --show-depends modulus_hello; echo "rc=$?"
echo "== base-1"; modprobe -S {cur.kernel} --show-depends drm_kms_helper; echo "rc=$?"
sed -i 's/^VERSION_ID=.*/VERSION_ID={pend.version}/' /etc/os-release
echo "== refresh"; systemd-sysext refresh; echo "rc=$?"
echo "== status-2"; systemd-sysext status
echo "== release-files-2"; ls /usr/lib/extension-release.d/
echo "== show-pend-2"; modprobe -S {pend.kernel} --show-depends modulus_hello; echo "rc=$?"
echo "== show-cur-2"; modprobe -S {cur.kernel} --show-depends modulus_hello; echo "rc=$?"
echo "== end"
"""
    res = boot(systemd_root, os_release={"ID": "flatcar", "VERSION_ID": cur.version, "NAME": "Flatcar Container Linux"},
               extensions=images, probe=probe)
    assert not res.timed_out and "== end" in res.output, res.console[-3000:] + res.output
    sec = {}
    for chunk in res.output.split("== ")[1:]:
        title, _, body = chunk.partition("\n")
        sec[title.strip()] = body
    # boot: only the image of the running release is merged
    assert names[cur.version] in sec["status-1"] and names[pend.version] not in sec["status-1"], sec["status-1"]
    assert names[cur.version] in sec["list-1"] and names[pend.version] in sec["list-1"], sec["list-1"]
    assert sec["release-files-1"].split() == [f"extension-release.{names[cur.version]}"]
    assert f"/lib/modules/{cur.kernel}/{hello_path}" in sec["show-cur-1"] and "rc=0" in sec["show-cur-1"]
    assert "rc=0" not in sec["show-pend-1"], sec["show-pend-1"]  # the other kernel's index is not merged
    # the image's index is complete: the kernel's own modules still resolve
    assert f"/lib/modules/{cur.kernel}/kernel/drivers/gpu/drm/drm_kms_helper.ko" in sec["base-1"]
    # VERSION_ID changed + refresh: the other image takes over
    assert sec["refresh"].strip().endswith("rc=0"), sec["refresh"]
    assert names[pend.version] in sec["status-2"] and names[cur.version] not in sec["status-2"], sec["status-2"]
    assert sec["release-files-2"].split() == [f"extension-release.{names[pend.version]}"]
    assert f"/lib/modules/{pend.kernel}/{hello_path}" in sec["show-pend-2"] and "rc=0" in sec["show-pend-2"]
    assert "rc=0" not in sec["show-cur-2"]
    assert res.sysext_merged_s is not None and 0 < res.sysext_merged_s < res.duration
    print(f"\nbooted container: systemd-sysext active {res.sysext_merged_s:.2f} s after start, probe at "
          f"{res.probe_started_s:.2f} s, whole boot {res.duration:.1f} s")
