"""modulus.kmods.kmod_install run through Ansible (``ansible localhost -m``) on kit host roots, with
real builds: the project's hello module compiled by kmod_build for both kit releases, and the
NVIDIA 535 build the kmod_build tests keep in the kit cache (tests that need it are skipped, with
the reason, when it is not there: compiling it takes about 6 minutes of both cores).

Both methods: present, staged, loaded (where it can be: the kit host is not the running system, so
the plan is returned and proven in QEMU by test_kmod_install_qemu.py), absent, idempotence, check
mode and diff, pruning, and a run killed in the middle followed by a rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from sim import ansible_run, faults
from sim.kit import Kit, cache_root

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "tests" / "fixtures" / "hello"
DRIVER = "modulus-hello"


# A stock Flatcar host has no mksquashfs (tests/sim/hosttools.py: no stable or LTS release ships
# squashfs-tools). The tests of an explicit sysext_format squashfs (a host that has it) run with this
# machine's PATH; every other test runs with the PATH of a stock stable host, where the default
# format (auto) makes directory extensions.
MACHINE_PATH = None


def install(args: dict, check: bool = False, diff: bool = False,
            host_tools: str | None = ansible_run.DEFAULT_VARIANT) -> tuple[dict, str]:
    return ansible_run.run_module("modulus.kmods.kmod_install", args, check=check, diff=diff, timeout=900,
                                  host_tools=host_tools)


def hello_build(rel, dest: Path) -> None:
    args = {"image": str(rel.image_raw), "recipe": "generic", "name": DRIVER, "version": "1.0",
            "source": str(HELLO), "modules": ["modulus_hello"], "dest": str(dest), "channel": rel.channel}
    res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
    assert not res.get("failed"), text


@pytest.fixture(scope="module")
def hello(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hello module built by kmod_build for the current (6.1.0-47) and pending (6.1.0-50) release."""
    base = tmp_path_factory.mktemp("hello-builds")
    out = {}
    for name, rel in kit.releases.items():
        hello_build(rel, base / name)
        out[name] = base / name
    return out


def nvidia_build(kver: str) -> Path:
    """A finished NVIDIA build for ``kver`` from the kit cache (read only), or skip."""
    for man in sorted((cache_root() / "nvidia-builds").glob(f"*/nvidia/*/{kver}/manifest.json")):
        if mf.verify_tree(str(man.parent), json.loads(man.read_text()), strict=False, hash_files=False) == []:
            return man.parent
    pytest.skip(f"no NVIDIA build for {kver} in the kit cache (made by the slow kmod_build tests); "
                "not compiled here, it takes about 6 minutes of both cores")


def files_of(root: Path) -> dict[str, str]:
    """Every file and link below a host root (the kit's update_engine_client call log aside)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == "update_engine_client.calls":
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = str(p.stat().st_mtime_ns)
    return out


def unsquash(image: Path, dest: Path) -> Path:
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(dest), str(image)], check=True, stdout=subprocess.DEVNULL)
    return dest


# --------------------------------------------------------------------------- sysext


def test_present_sysext_squashfs_check_diff_idempotent(kit: Kit, host_root_factory, hello) -> None:
    cur = kit.releases["current"]
    root = host_root_factory(update="need_reboot")
    before = files_of(root)
    args = {"src": str(hello["current"]), "host_root": str(root), "sysext_format": "squashfs"}
    res, text = install(args, check=True, diff=True, host_tools=MACHINE_PATH)
    assert res["changed"] is True and not res["failed"], text
    assert res["method"] == "sysext" and res["release"] == cur.version
    assert any("would create /var/lib/extensions/modulus-modulus-hello-9001.1.0.raw" in a for a in res["actions"])
    assert files_of(root) == before, "check mode wrote something"
    res, text = install(args, diff=True, host_tools=MACHINE_PATH)
    assert res["changed"] is True and not res["failed"], text
    img = root / "var/lib/extensions/modulus-modulus-hello-9001.1.0.raw"
    assert img.is_file() and res["image"]["size"] == img.stat().st_size and res["image"]["created"] is True
    listing = subprocess.run(["unsquashfs", "-l", str(img)], capture_output=True, text=True, check=True).stdout
    assert f"usr/lib/modules/{cur.kernel}/updates/modulus/{DRIVER}/modulus_hello.ko" in listing
    assert "usr/lib/extension-release.d/extension-release.modulus-modulus-hello-9001.1.0" in listing
    assert res["merge"]["refreshed"] is False and "host_root" in res["merge"]["reason"]
    assert (root / f"opt/modulus/bin/modulus-load-{DRIVER}").is_file()
    # Flatcar's kmod convention: no index of the kernel, the install/remove lines and the helper
    assert f"usr/lib/modules/{cur.kernel}/modules." not in listing
    assert f"usr/lib/modprobe.d/10-modulus-{DRIVER}-kmod-sysext.conf" in listing
    assert f"usr/libexec/_modulus-{DRIVER}_modprobe_helper" in listing
    assert "warning" not in text.lower(), text
    # only /etc, /opt and /var written
    new = [p for p in files_of(root) if p not in before]
    assert new and {p.split("/")[0] for p in new} <= {"etc", "opt", "var"}, new
    again = files_of(root)
    res, text = install(args, host_tools=MACHINE_PATH)
    assert res["changed"] is False and res["actions"] == [], text
    assert files_of(root) == again


def test_staged_pending_ships_modprobe_lines_not_an_index(kit: Kit, host_root_factory, hello, tmp_path: Path) -> None:
    """The pending release's image ships no module index; merged over Debian's real module tree of
    that kernel, modprobe sends the build's module to the image's helper and the kernel's own
    modules still resolve from the kernel's untouched index."""
    from sim.qemu import kernel_dir

    pend = kit.releases["pending"]
    root = host_root_factory(update="need_reboot")
    args = {"src": str(hello["pending"]), "host_root": str(root), "state": "staged", "sysext_format": "squashfs"}
    res, text = install(args, host_tools=MACHINE_PATH)
    assert res["changed"] is True and not res["failed"], text
    assert res["release"] == pend.version and res["image"]["format_reason"] == "sysext_format=squashfs", text
    assert "merged when the host boots release 9001.2.0" in res["merge"]["reason"]
    res, text = install(args, check=True, host_tools=MACHINE_PATH)
    assert res["changed"] is False, text
    tree = unsquash(root / "var/lib/extensions/modulus-modulus-hello-9001.2.0.raw", tmp_path / "x")
    assert [p.name for p in (tree / f"usr/lib/modules/{pend.kernel}").iterdir()] == ["updates"]
    # /usr as merged: the kernel's tree (its own modules.dep) with the image on top
    merged = tmp_path / "merged"
    shutil.copytree(kernel_dir(pend.kernel) / "lib", merged / "lib", symlinks=True)
    shutil.copytree(tree / "usr/lib", merged / "lib", symlinks=True, dirs_exist_ok=True)
    conf = merged / f"lib/modprobe.d/10-modulus-{DRIVER}-kmod-sysext.conf"
    helper = f"/usr/libexec/_modulus-{DRIVER}_modprobe_helper"
    for name, want in (("modulus_hello", f"install {helper} modulus_hello"),
                       ("modulus-hello", f"install {helper} modulus_hello"),
                       ("drm_kms_helper", "kernel/drivers/gpu/drm/drm_kms_helper.ko")):
        show = subprocess.run(["modprobe", "-d", str(merged), "-S", pend.kernel, "-C", str(conf), "--show-depends",
                               name], capture_output=True, text=True, check=False)
        assert show.returncode == 0 and want in show.stdout, (name, show.stdout, show.stderr)


def test_stock_host_without_image_tools_installs_and_stages(kit: Kit, host_root_factory, hello) -> None:
    """sysext_format=auto (the default) on a host with no image tool: directory extensions for the
    running and the pending release, and a second run changes nothing; squashfs asked for fails clearly."""
    cur, pend = kit.releases["current"], kit.releases["pending"]
    root = host_root_factory(update="need_reboot")  # install() runs with a stock stable host's PATH
    runs = [{"src": str(hello["current"]), "host_root": str(root)},
            {"src": str(hello["pending"]), "host_root": str(root), "state": "staged"}]
    for args, rel in zip(runs, (cur, pend)):
        res, text = install(args)
        assert res["changed"] and not res["failed"], text
        img = res["image"]
        assert img["format"] == "directory" and "neither mkfs.erofs nor mksquashfs" in img["format_reason"], img
        path = root / f"var/lib/extensions/modulus-{DRIVER}-{rel.version}"
        assert path.is_dir() and (path / f"usr/lib/modules/{rel.kernel}/updates/modulus/{DRIVER}/modulus_hello.ko").is_file()
        assert os.access(path / f"usr/libexec/_modulus-{DRIVER}_modprobe_helper", os.X_OK)
    again = files_of(root)
    for args in runs:
        res, text = install(args)
        assert res["changed"] is False and res["actions"] == [], text
    assert files_of(root) == again
    res, text = install(dict(runs[0], sysext_format="squashfs"))
    assert res["failed"] and "sysext_format=squashfs needs mksquashfs (squashfs-tools)" in res["msg"], text
    assert files_of(root) == again


def test_loaded_generic_returns_the_plan(kit: Kit, host_root_factory, hello) -> None:
    root = host_root_factory()
    res, text = install({"src": str(hello["current"]), "host_root": str(root), "state": "loaded",
                         "module_parameters": {"modulus_hello": {"greeting": "hi from kmod_install"}}},
                        host_tools=MACHINE_PATH)
    assert not res["failed"], text
    assert res["load"]["loaded"] is False and "not the running system" in res["load"]["reason"]
    [step] = res["load_plan"]["steps"]
    assert step["action"] == "insmod" and step["params"] == ['greeting="hi from kmod_install"']
    conf = (root / f"etc/modprobe.d/modulus-{DRIVER}.conf").read_text()
    assert 'options modulus_hello greeting="hi from kmod_install"' in conf
    # the pending build cannot be loaded on the running kernel
    res, text = install({"src": str(hello["pending"]), "host_root": str(root), "state": "loaded"},
                        host_tools=MACHINE_PATH)
    assert res["failed"] and "state=loaded needs a build for the running kernel 6.1.0-47-amd64" in res["msg"], text


def test_loaded_nvidia_without_gpu_is_clean(kit: Kit, host_root_factory) -> None:
    cur = kit.releases["current"]
    src = nvidia_build(cur.kernel)
    root = host_root_factory()
    # the default format on a stock host (no image tools): a directory extension
    res, text = install({"src": str(src), "host_root": str(root), "state": "loaded"})
    assert not res["failed"], text
    assert res["image"]["format"] == "directory", res["image"]
    assert res["load"]["loaded"] is False and res["load"]["reason"].startswith("no NVIDIA GPU"), res["load"]
    plan = res["load_plan"]
    assert plan["prerequisites"] == ["ipmi_msghandler", "ipmi_devintf", "i2c_core", "drm", "drm_kms_helper"]
    assert plan["modules"].index("nvidia") < plan["modules"].index("nvidia_modeset") < plan["modules"].index("nvidia_drm")
    assert plan["verify_command"] == ["nvidia-smi"]
    assert "blacklist nouveau" in (root / "etc/modprobe.d/modulus-nvidia.conf").read_text()
    img = root / "var/lib/extensions/modulus-nvidia-9001.1.0"
    for path in ("usr/bin/nvidia-smi", "usr/lib64/libnvidia-ml.so.1",
                 f"usr/lib/modules/{cur.kernel}/updates/modulus/nvidia/nvidia.ko",
                 "usr/lib/modprobe.d/10-modulus-nvidia-kmod-sysext.conf", "usr/libexec/_modulus-nvidia_modprobe_helper"):
        assert (img / path).exists(), path
    # Flatcar's kmod convention: no module index of the kernel in the image
    assert not list((img / "usr/lib/modules" / cur.kernel).glob("modules.*"))
    conf = (img / "usr/lib/modprobe.d/10-modulus-nvidia-kmod-sysext.conf").read_text()
    assert "install nvidia_modeset /usr/libexec/_modulus-nvidia_modprobe_helper nvidia_modeset" in conf, conf


def test_keep_and_absent(kit: Kit, host_root_factory, hello) -> None:
    root = host_root_factory(update="need_reboot")
    common = {"host_root": str(root), "sysext_format": "directory"}
    install({"src": str(hello["current"]), **common})
    install({"src": str(hello["pending"]), "state": "staged", **common})
    for rel in ("9001.3.0", "9001.4.0", "9001.5.0"):
        res, text = install({"src": str(hello["pending"]), "state": "staged", "release": rel, "keep": 3, **common})
        assert not res["failed"], text
    ext = root / "var/lib/extensions"
    assert sorted(p.name for p in ext.iterdir()) == [
        "modulus-modulus-hello-9001.1.0", "modulus-modulus-hello-9001.2.0", "modulus-modulus-hello-9001.5.0"]
    res, text = install({"identity": {"driver": DRIVER}, "state": "absent", "host_root": str(root)}, check=True)
    assert res["changed"] and (ext / "modulus-modulus-hello-9001.1.0").exists(), text
    res, text = install({"identity": {"driver": DRIVER}, "state": "absent", "host_root": str(root)})
    assert res["changed"] and not res["failed"], text
    assert list(ext.iterdir()) == []
    assert not (root / f"opt/modulus/bin/modulus-load-{DRIVER}").exists()
    assert not (root / f"etc/systemd/system/modulus-load-{DRIVER}.service").exists()
    res, _ = install({"identity": {"driver": DRIVER}, "state": "absent", "host_root": str(root)})
    assert res["changed"] is False


# --------------------------------------------------------------------------- tree (legacy CoreOS)


def test_tree_on_legacy_coreos(kit: Kit, host_root_factory, hello) -> None:
    cur, pend = kit.releases["current"], kit.releases["pending"]
    root = host_root_factory(update="need_reboot", legacy=True)
    res, text = install({"src": str(hello["current"]), "host_root": str(root), "state": "present"}, diff=True)
    assert res["changed"] and res["method"] == "tree", text
    target = f"/opt/modulus/installed/{DRIVER}/1.0/{cur.kernel}"
    assert os.readlink(root / f"opt/drivers/{DRIVER}") == target
    assert (root / target.lstrip("/") / f"lib/modules/{cur.kernel}/modulus_hello.ko").is_file()
    assert (root / f"etc/ld.so.conf.d/{DRIVER}.conf").read_text() == f"/opt/drivers/{DRIVER}/lib\n"
    assert f'"path": "{target}"' in text  # the diff (printed by the callback)
    # staged for the pending kernel: in place, found by the boot loader, /opt/drivers untouched
    res, text = install({"src": str(hello["pending"]), "host_root": str(root), "state": "staged"})
    assert res["changed"] and not res["failed"], text
    assert os.readlink(root / f"opt/drivers/{DRIVER}") == target
    assert os.readlink(root / f"opt/modulus/installed/{DRIVER}/by-kernel/{pend.kernel}") == \
        f"/opt/modulus/installed/{DRIVER}/1.0/{pend.kernel}"
    script = (root / f"opt/modulus/bin/modulus-load-{DRIVER}").read_text()
    assert f"/opt/modulus/installed/{DRIVER}/by-kernel" in script
    res, text = install({"src": str(hello["pending"]), "host_root": str(root), "state": "staged"})
    assert res["changed"] is False, text


# --------------------------------------------------------------------------- killed half-way


def big_build(src: Path, dest: Path, mb: int = 4) -> Path:
    """The hello build plus a library of ``mb`` MiB of random bytes."""
    shutil.copytree(src, dest, symlinks=True)
    with open(dest / "lib" / "libbig.so.1", "wb") as fh:
        fh.write(os.urandom(mb << 20))
    man = json.loads((dest / "manifest.json").read_text())
    man["files"] = mf.list_files(str(dest))
    mf.write_manifest(str(dest), man)
    return dest


def test_killed_in_the_middle_then_rerun(kit: Kit, host_root_factory, hello, tmp_path: Path) -> None:
    src = big_build(hello["current"], tmp_path / "big")
    root = host_root_factory()
    args = {"src": str(src), "host_root": str(root), "sysext_format": "squashfs"}
    # mksquashfs makes the image in the run's staging directory, then holds the run there
    hold = faults.ToolHold.make(tmp_path / "bin", "mksquashfs")
    run = faults.start_module("modulus.kmods.kmod_install", args, tag_dir=tmp_path / "run", env=hold.env(),
                              host_tools=MACHINE_PATH)
    try:
        faults.wait_for(hold.held, timeout=120, run=run, what="the image made by mksquashfs")
        found = list((root / "var/lib").glob(".modulus-modulus-hello-9001.1.0.sysext-*"))
        assert len(found) == 1 and (found[0] / "image.raw").is_file(), found
        stage = found[0]
    finally:
        faults.kill_tree(run, dirs=[run.tag_dir, root])  # every process of the run is gone when it returns
    img = root / "var/lib/extensions/modulus-modulus-hello-9001.1.0.raw"
    assert not img.exists(), "a half-made image is visible"
    res, text = install(args, host_tools=MACHINE_PATH)
    assert res["changed"] and not res["failed"], text
    assert not stage.exists() and not list((root / "var/lib").glob(".modulus-*")), "leftover not swept"
    listing = subprocess.run(["unsquashfs", "-l", str(img)], capture_output=True, text=True, check=True).stdout
    assert "usr/lib64/libbig.so.1" in listing
