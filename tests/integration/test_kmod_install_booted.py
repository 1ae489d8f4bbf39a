"""kmod_install's release-bound images in a booted systemd (tests/sim/booted.py: ``systemd-nspawn -b``
of a Debian root with systemd, dressed as Flatcar).

- Only the image whose ``VERSION_ID`` is the container's merges; ``modprobe`` finds the image's
  ``install`` line (Flatcar's kmod convention: the image ships no module index); changing
  ``VERSION_ID`` and ``systemd-sysext refresh`` swaps to the other image.
- Three kmod extensions merged together: a Flatcar-zfs-style extension (two modules, ``zfs`` needs
  ``spl``, laid out by Flatcar's own ``sysext_mangle_kmod``), the hello driver and a second modulus
  driver of two modules (``modulus_pair_user`` needs ``modulus_pair_base``). The kernel's index stays
  the kernel's; each extension's helper resolves its modules through a ``depmod`` made in its private
  mount namespace, and leaves no mount behind. The container runs this machine's kernel, not the
  kit's, so nothing is loaded here (``--show-depends``/``--dry-run`` only), and the test files the
  extensions' modules and the kernel's tree (Debian's real 6.1.0-50 tree) under the container's
  ``uname -r`` (the helpers use ``uname -r``, as Flatcar's does). That boot runs on a copy of the
  root, not an overlay of it: on a host ``/usr`` is a plain filesystem, and the kernel stacks
  overlays only two deep (the sysext's, then the helper's).
- kmod_install run again on the merged ``/usr`` (what the booted container shows once merged,
  copied out) changes nothing and would not refresh.

The Flatcar-zfs-style extension is the kit's (``sim.kmodext``). Every test runs on both booted roots:
Debian bookworm (systemd 252) and trixie (systemd 257). kmod_install runs with a stock stable host's
PATH (``sim.hosttools``).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from sim import ansible_run, kmodext
from sim.booted import SUITES, boot, booted_root
from sim.kit import Kit
from sim.qemu import kernel_dir

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
DRIVER = "modulus-hello"
PAIR = "modulus-pair"


def build(rel, name: str, source: Path, modules: list[str], dest: Path) -> Path:
    args = {"image": str(rel.image_raw), "recipe": "generic", "name": name, "version": "1.0",
            "source": str(source), "modules": modules, "dest": str(dest)}
    res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
    assert not res.get("failed"), text
    return dest


def install(args: dict) -> dict:
    res, text = ansible_run.run_module("modulus.kmods.kmod_install", args, timeout=900)
    assert not res.get("failed"), text
    return res


def sections(output: str) -> dict[str, str]:
    sec = {}
    for chunk in output.split("== ")[1:]:
        title, _, body = chunk.partition("\n")
        sec[title.strip()] = body
    return sec


@pytest.fixture(scope="module")
def hello(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hello-b")
    return {name: build(rel, DRIVER, FIXTURES / "hello", ["modulus_hello"], base / name)
            for name, rel in kit.releases.items()}


@pytest.fixture(scope="module")
def images(kit: Kit, hello, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directory images of the hello build for both kit releases, made by kmod_install."""
    root = kit.host_root(tmp_path_factory.mktemp("host-b"), update="need_reboot")
    for name in kit.releases:
        res = install({"src": str(hello[name]), "host_root": str(root), "state": "staged",
                       "sysext_format": "directory"})
        assert res["image"]["format"] == "directory"
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
    helper = f"/usr/libexec/_modulus-{DRIVER}_modprobe_helper"
    probe = f"""
echo "== status-1"; systemd-sysext status
echo "== list-1"; systemd-sysext list
echo "== release-files-1"; ls /usr/lib/extension-release.d/
echo "== index-1"; ls /usr/lib/modules/{cur.kernel}/
echo "== show-1"; modprobe -S {cur.kernel} --show-depends modulus_hello; echo "rc=$?"
sed -i 's/^VERSION_ID=.*/VERSION_ID={pend.version}/' /etc/os-release
echo "== refresh"; systemd-sysext refresh; echo "rc=$?"
echo "== status-2"; systemd-sysext status
echo "== release-files-2"; ls /usr/lib/extension-release.d/
echo "== show-2"; modprobe -S {pend.kernel} --show-depends modulus_hello; echo "rc=$?"
echo "== end"
"""
    res = boot(systemd_root, os_release={"ID": "flatcar", "VERSION_ID": cur.version, "NAME": "Flatcar Container Linux"},
               extensions=images, probe=probe)
    assert not res.timed_out and "== end" in res.output, res.console[-3000:] + res.output
    sec = sections(res.output)
    assert names[cur.version] in sec["status-1"] and names[pend.version] not in sec["status-1"], sec["status-1"]
    assert names[cur.version] in sec["list-1"] and names[pend.version] in sec["list-1"], sec["list-1"]
    assert sec["release-files-1"].split() == [f"extension-release.{names[cur.version]}"]
    assert sec["index-1"].split() == ["updates"], sec["index-1"]  # no modules.* from the image
    assert f"install {helper} modulus_hello" in sec["show-1"] and "rc=0" in sec["show-1"], sec["show-1"]
    assert sec["refresh"].strip().endswith("rc=0"), sec["refresh"]
    assert names[pend.version] in sec["status-2"] and names[cur.version] not in sec["status-2"], sec["status-2"]
    assert sec["release-files-2"].split() == [f"extension-release.{names[pend.version]}"]
    assert f"install {helper} modulus_hello" in sec["show-2"] and "rc=0" in sec["show-2"], sec["show-2"]
    assert res.sysext_merged_s is not None and 0 < res.sysext_merged_s < res.duration
    print(f"\nbooted container: systemd-sysext active {res.sysext_merged_s:.2f} s after start, probe at "
          f"{res.probe_started_s:.2f} s, whole boot {res.duration:.1f} s")


# --------------------------------------------------------------------------- three kmod extensions


def relocated(image: Path, kver: str, to: str, dest: Path) -> Path:
    """A copy of ``image`` with ``usr/lib/modules/<kver>`` filed under ``to`` (the container's kernel)."""
    shutil.copytree(image, dest, symlinks=True)
    os.rename(dest / f"usr/lib/modules/{kver}", dest / f"usr/lib/modules/{to}")
    return dest


def test_three_kmod_extensions_resolve_side_by_side(kit: Kit, hello, systemd_root, tmp_path: Path) -> None:
    pend = kit.releases["pending"]
    k = pend.kernel
    pair = build(pend, PAIR, FIXTURES / "pair", ["modulus_pair_base", "modulus_pair_user"], tmp_path / "pair")
    man = __import__("json").loads((pair / "manifest.json").read_text())
    assert {m["name"]: m["depends"] for m in man["modules"]}["modulus_pair_user"] == ["modulus_pair_base"]
    root = kit.host_root(tmp_path / "host", update="need_reboot")
    for src in (hello["pending"], pair):
        install({"src": str(src), "host_root": str(root), "state": "staged", "sysext_format": "directory"})
    machine = os.uname().release
    ext = root / "var/lib/extensions"
    images = {p.name: relocated(p, k, machine, tmp_path / "boot" / p.name) for p in sorted(ext.iterdir())}
    images["flatcar-zfs"] = relocated(kmodext.zfs_style_extension(kit, tmp_path / "zfs", release="pending"), k, machine,
                                      tmp_path / "boot/flatcar-zfs")
    assert not (images["flatcar-zfs"] / f"usr/lib/modules/{machine}/modules.dep").exists()
    hello_helper = f"/usr/libexec/_modulus-{DRIVER}_modprobe_helper"
    pair_helper = f"/usr/libexec/_modulus-{PAIR}_modprobe_helper"
    zfs_helper = "/usr/libexec/_flatcar-zfs_modprobe_helper"
    probe = f"""
K=$(uname -r)
echo "== status"; systemd-sysext status
echo "== index"; ls /usr/lib/modules/$K/ | grep -c '^modules\\.dep$'; grep -c -E 'updates/modulus|extra/' /usr/lib/modules/$K/modules.dep
echo "== conf"; ls /usr/lib/modprobe.d/
for m in modulus_hello modulus-hello modulus_pair_user zfs drm_kms_helper; do
  echo "== show-$m"; modprobe --show-depends $m; echo "rc=$?"
done
echo "== dry-hello"; modprobe --dry-run -v modulus_hello; echo "rc=$?"
echo "== helper-hello"; {hello_helper} --show-depends modulus_hello; echo "rc=$?"
echo "== helper-pair"; {pair_helper} --show-depends modulus-pair-user; echo "rc=$?"
echo "== helper-pair-dry"; {pair_helper} --dry-run -v modulus_pair_user; echo "rc=$?"
echo "== helper-zfs"; {zfs_helper} --show-depends zfs; echo "rc=$?"
echo "== helper-cross"; {hello_helper} --show-depends zfs; echo "rc=$?"
echo "== after"; grep -c -E 'updates/modulus|extra/' /usr/lib/modules/$K/modules.dep; grep -c " /usr/lib/modules" /proc/self/mounts
echo "== end"
"""
    files = {f"/usr/lib/modules/{machine}": kernel_dir(k) / "lib/modules" / k}
    res = boot(systemd_root, os_release={"ID": "flatcar", "VERSION_ID": pend.version, "NAME": "Flatcar Container Linux"},
               extensions=images, probe=probe, copy_in=files, copy_root=True)
    assert not res.timed_out and "== end" in res.output, res.console[-3000:] + res.output
    sec = sections(res.output)
    for name in (f"modulus-{DRIVER}-{pend.version}", f"modulus-{PAIR}-{pend.version}", "flatcar-zfs"):
        assert name in sec["status"], sec["status"]
    # the kernel's own index is visible and knows none of the extensions' modules
    assert sec["index"].split() == ["1", "0"], sec["index"]
    assert [c for c in sec["conf"].split() if c.endswith("-kmod-sysext.conf")] == ["10-flatcar-zfs-kmod-sysext.conf", f"10-modulus-{DRIVER}-kmod-sysext.conf",
                                   f"10-modulus-{PAIR}-kmod-sysext.conf"], sec["conf"]
    mods = f"/lib/modules/{machine}"
    assert f"install {hello_helper} modulus_hello" in sec["show-modulus_hello"]
    assert f"install {hello_helper} modulus_hello" in sec["show-modulus-hello"]
    assert f"install {pair_helper} modulus_pair_user" in sec["show-modulus_pair_user"]
    assert f"install {zfs_helper} zfs" in sec["show-zfs"]
    assert f"insmod {mods}/kernel/drivers/gpu/drm/drm_kms_helper.ko" in sec["show-drm_kms_helper"]
    assert f"install {hello_helper} modulus_hello" in sec["dry-hello"] and "rc=0" in sec["dry-hello"]
    # through each helper: the index made in its namespace has every merged extension's modules
    assert f"insmod {mods}/updates/modulus/{DRIVER}/modulus_hello.ko" in sec["helper-hello"], sec["helper-hello"]
    assert "rc=0" in sec["helper-hello"] and "Loading kernel module from a sysext..." in sec["helper-hello"]
    pair_out = sec["helper-pair"]
    assert f"insmod {mods}/updates/modulus/{PAIR}/modulus_pair_user.ko" in pair_out and "rc=0" in pair_out, pair_out
    # the dependency inside the driver goes through its own install line (kmod ignores only the
    # asked-for module's line), so its helper runs again in the namespace already overlaid
    assert f"install {pair_helper} modulus_pair_base" in pair_out, pair_out
    assert "modulus_pair_user.ko" in sec["helper-pair-dry"] and "rc=0" in sec["helper-pair-dry"], sec["helper-pair-dry"]
    zfs_out = sec["helper-zfs"]
    assert f"insmod {mods}/extra/zfs.ko" in zfs_out and "rc=0" in zfs_out, zfs_out
    assert f"install {zfs_helper} spl" in zfs_out, zfs_out
    assert f"insmod {mods}/extra/zfs.ko" in sec["helper-cross"], sec["helper-cross"]  # any helper sees all
    assert sec["after"].split() == ["0", "0"], sec["after"]  # nothing left behind
    print("\n" + "\n".join(f"{t}: {b.strip()}" for t, b in sec.items() if t.startswith("helper-")))


# --------------------------------------------------------------------------- a second run on a merged /usr


def test_second_run_on_the_merged_usr_changes_nothing(kit: Kit, hello, systemd_root, tmp_path: Path) -> None:
    """A stock host (no image tools, the default sysext_format auto) installs for its running
    release, boots with the image merged, and a second run on that /usr changes nothing."""
    cur = kit.releases["current"]
    root = kit.host_root(tmp_path / "host", update="need_reboot")
    args = {"src": str(hello["current"]), "host_root": str(root)}
    first = install(args)
    assert first["changed"] and first["image"]["created"] and first["image"]["format"] == "directory", first
    name = first["image"]["name"]
    probe = "tar -C / -cf /out/usr.tar usr/lib/extension-release.d usr/lib/modules usr/lib/modprobe.d usr/libexec\n" \
            "echo \"== status\"; systemd-sysext status\necho \"== end\"\n"
    out = tmp_path / "out"
    res = boot(systemd_root, os_release={"ID": "flatcar", "VERSION_ID": cur.version, "NAME": "Flatcar Container Linux"},
               extensions={name: root / "var/lib/extensions" / name}, probe=probe, out_dir=out)
    assert not res.timed_out and name in sections(res.output)["status"], res.console[-3000:] + res.output
    with tarfile.open(out / "usr.tar") as tar:
        tar.extractall(root)  # the host's /usr as it is once the image is merged
    assert (root / f"usr/lib/extension-release.d/extension-release.{name}").is_file()
    again = install(args)
    assert again["changed"] is False and again["actions"] == [], again
    assert again["image"]["content"] == first["image"]["content"] and again["image"]["created"] is False
    assert again["merge"] == {"refreshed": False, "reason": "already in place"}, again["merge"]
