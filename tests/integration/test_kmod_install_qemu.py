"""What kmod_install puts on a host, loaded into Debian's real kernel under QEMU (tests/sim/qemu.py).

The kit host is not the running system, so kmod_install's ``loaded`` returns its load plan there;
the plan's shell form is the boot loader ``/opt/modulus/bin/modulus-load-<driver>``. Here that very
script runs with busybox in a guest booted on the build's kernel:

- tree method: ``/opt`` of the host root (running release 9001.1.0, the hello build for the pending
  kernel 6.1.0-50 staged) is the guest's ``/opt``; at "first boot of the new release" the loader
  switches ``/opt/drivers/<driver>`` to the build for ``uname -r`` and loads it with its parameters;
- sysext method: the staged squashfs image is attached in the guest with the kernel's own ``loop`` and
  ``squashfs`` modules and merged read-only over ``/usr`` with ``overlay``, the way systemd-sysext does;
  the image ships no module index (Flatcar's kmod convention: the helper behind its modprobe.d lines
  needs kmod, bash and util-linux, which the busybox guest lacks; the booted container test proves
  that path) and the loader loads the module by path;
- NVIDIA: the loader on a guest without an NVIDIA GPU says so and exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf
from sim import ansible_run
from sim.kit import Kit, cache_root
from sim.qemu import boot_and_run, kernel_dir

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "tests" / "fixtures" / "hello"
DRIVER = "modulus-hello"
GREETING = "hi from kmod_install"


def install(args: dict, host_tools: str | None = ansible_run.DEFAULT_VARIANT) -> dict:
    res, text = ansible_run.run_module("modulus.kmods.kmod_install", args, timeout=900, host_tools=host_tools)
    assert not res.get("failed"), text
    return res


@pytest.fixture(scope="module")
def hello(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hello-q")
    out = {}
    for name, rel in kit.releases.items():
        args = {"image": str(rel.image_raw), "recipe": "generic", "name": DRIVER, "version": "1.0",
                "source": str(HELLO), "modules": ["modulus_hello"], "dest": str(base / name)}
        res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
        assert not res.get("failed"), text
        out[name] = base / name
    return out


def test_tree_boot_loader_loads_the_staged_build_in_its_kernel(kit: Kit, host_root_factory, hello) -> None:
    cur, pend = kit.releases["current"], kit.releases["pending"]
    root = host_root_factory(update="need_reboot", legacy=True)
    params = {"modulus_hello": {"greeting": GREETING}}
    install({"src": str(hello["current"]), "host_root": str(root), "module_parameters": params})
    res = install({"src": str(hello["pending"]), "host_root": str(root), "state": "staged", "module_parameters": params})
    assert res["method"] == "tree"
    assert os.readlink(root / f"opt/drivers/{DRIVER}").endswith(cur.kernel)  # the running one, untouched
    loader = res["boot_loader"]
    script = f"""
{loader}; echo "LOADER-RC=$?"
echo "LINK=$(readlink /opt/drivers/{DRIVER})"
echo "GREETING=$(cat /sys/module/modulus_hello/parameters/greeting)"
"""
    out = boot_and_run(pend.kernel, script, files={"/opt": root / "opt"})
    assert out.booted and out.rc == 0, out.console[-3000:]
    assert "modulus-load: loaded modulus_hello" in out.output and "LOADER-RC=0" in out.output, out.output
    assert f"LINK=/opt/modulus/installed/{DRIVER}/1.0/{pend.kernel}" in out.output, out.output
    assert f"GREETING={GREETING}" in out.output, out.output
    assert "modulus_hello" in out.loaded


def test_sysext_image_mounted_in_the_guest_loads_by_name_and_by_path(kit: Kit, host_root_factory, hello) -> None:
    pend = kit.releases["pending"]
    root = host_root_factory(update="need_reboot")
    # a squashfs image: made with this machine's mksquashfs (no stock host has one)
    res = install({"src": str(hello["pending"]), "host_root": str(root), "state": "staged",
                   "sysext_format": "squashfs"}, host_tools=None)
    assert res["method"] == "sysext" and res["image"]["format"] == "squashfs"
    name = res["image"]["name"]
    raw = root / res["image"]["path"].lstrip("/")
    script = f"""
mkdir -p /run/ext /run/base-usr /usr
mount -t squashfs -o loop,ro /var/lib/extensions/{name}.raw /run/ext || echo MOUNT-FAILED
# merged the way systemd-sysext merges: a read-only overlay, the extension above the base /usr
mount -t overlay overlay -o ro,lowerdir=/run/ext/usr:/run/base-usr /usr || echo OVERLAY-FAILED
ln -s usr/lib /lib
grep VERSION_ID /usr/lib/extension-release.d/extension-release.{name}
echo "INDEX=$(ls /usr/lib/modules/{pend.kernel}/ | tr '\\n' ' ')"
grep -c '^install modulus_hello ' /usr/lib/modprobe.d/10-modulus-{DRIVER}-kmod-sysext.conf
{res["boot_loader"]}; echo "LOADER-RC=$?"
echo "GREETING=$(cat /sys/module/modulus_hello/parameters/greeting)"
"""
    out = boot_and_run(pend.kernel, script, files={f"/var/lib/extensions/{name}.raw": raw, "/opt": root / "opt"},
                       kernel_modules=["loop", "squashfs", "overlay"])
    assert out.booted and out.rc == 0, out.console[-3000:]
    assert "MOUNT-FAILED" not in out.output and "OVERLAY-FAILED" not in out.output, out.output
    assert f"VERSION_ID={pend.version}" in out.output
    assert "INDEX=updates " in out.output, out.output  # no modules.* of the image over the kernel's
    assert "modulus-load: loaded modulus_hello" in out.output and "LOADER-RC=0" in out.output, out.output
    assert "modulus_hello" in out.loaded and {"loop", "squashfs", "overlay"} <= set(out.kernel_modules)


def test_nvidia_loader_without_gpu_says_so(kit: Kit, host_root_factory, tmp_path: Path) -> None:
    builds = [m.parent for m in sorted((cache_root() / "nvidia-builds").glob("*/nvidia/*/*/manifest.json"))
              if mf.verify_tree(str(m.parent), json.loads(m.read_text()), strict=False, hash_files=False) == []]
    rel = next((r for r in kit.releases.values() for b in builds if b.name == r.kernel), None)
    if rel is None:
        pytest.skip("no NVIDIA build in the kit cache (made by the slow kmod_build tests); not compiled here")
    src = next(b for b in builds if b.name == rel.kernel)
    name = next(k for k, r in kit.releases.items() if r is rel)
    root = host_root_factory(release=name)
    res = install({"src": str(src), "host_root": str(root), "state": "loaded", "sysext_format": "directory"})
    assert res["load"]["reason"].startswith("no NVIDIA GPU")
    # the GPU check comes before any insmod: the merged module directory only has to exist
    (tmp_path / "empty").mkdir()
    script = f"""
{res["boot_loader"]}; echo "LOADER-RC=$?"
"""
    out = boot_and_run(rel.kernel, script, files={f"/usr/lib/modules/{rel.kernel}/updates/modulus/nvidia": tmp_path / "empty",
                                                  "/opt": root / "opt"})
    assert out.booted and out.rc == 0, out.console[-3000:]
    assert "no NVIDIA GPU (PCI vendor 10de) on this host: not loading" in out.output and "LOADER-RC=0" in out.output
    assert "nvidia" not in out.loaded


GUEST_LIBS = ("libc.so.6", "libtinfo.so.6", "libcrypto.so.3", "liblzma.so.5", "libzstd.so.1", "libblkid.so.1",
              "libmount.so.1", "libpcre2-8.so.0", "libselinux.so.1")


def guest_tools(dest: Path) -> dict[str, Path]:
    """What the helper needs that busybox lacks, from this machine (Debian bookworm, as a Flatcar host
    has them): bash, kmod (modprobe and depmod with --ignore-install), util-linux's mountpoint, and
    their libraries. Busybox gives the guest sh, mount, unshare and mktemp."""
    bin_dir = dest / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("bash", "kmod", "mountpoint"):
        shutil.copy2(shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin"), bin_dir / tool)
    for name in ("modprobe", "depmod", "insmod", "rmmod", "lsmod"):
        (bin_dir / name).symlink_to("kmod")
    libs = dest / "lib"
    libs.mkdir()
    for lib in GUEST_LIBS:
        shutil.copy2(Path("/lib/x86_64-linux-gnu") / lib, libs / lib)  # follows the symlink
    return {"/real-bin": bin_dir, "/lib64/ld-linux-x86-64.so.2": Path("/lib64/ld-linux-x86-64.so.2").resolve(),
            "/base-usr/lib/x86_64-linux-gnu": libs}


def test_modprobe_through_the_helper_loads_modules_of_two_drivers(kit: Kit, host_root_factory, hello,
                                                                  tmp_path: Path) -> None:
    """Two modulus images merged over a /usr holding the kernel's own index: the real kmod
    ``modprobe`` follows each image's install line into its helper, which runs ``depmod`` in a
    private namespace and loads the module into Debian's real kernel; a dependency inside the
    second driver (``modulus_pair_user`` needs ``modulus_pair_base``) loads through its own line."""
    pend = kit.releases["pending"]
    root = host_root_factory(update="need_reboot")
    args = {"image": str(pend.image_raw), "recipe": "generic", "name": "modulus-pair", "version": "1.0",
            "source": str(ROOT / "tests/fixtures/pair"), "modules": ["modulus_pair_base", "modulus_pair_user"],
            "dest": str(tmp_path / "pair")}
    res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
    assert not res.get("failed"), text
    names = []
    for src in (hello["pending"], tmp_path / "pair"):
        res = install({"src": str(src), "host_root": str(root), "state": "staged", "sysext_format": "directory"})
        names.append(res["image"]["name"])
    k = pend.kernel
    base_mods = tmp_path / "base-modules"
    base_mods.mkdir()
    for index in (kernel_dir(k) / "lib/modules" / k).glob("modules.*"):
        shutil.copy2(index, base_mods / index.name)
    files = guest_tools(tmp_path / "tools")
    files[f"/base-usr/lib/modules/{k}"] = base_mods
    for name in names:
        files[f"/var/lib/extensions/{name}"] = root / "var/lib/extensions" / name
    lower = ":".join(f"/var/lib/extensions/{n}/usr" for n in names) + ":/base-usr"
    script = f"""
# busybox --install put its own applets in /bin: the real ones take their place (bash, kmod, mountpoint)
# for what bash runs; this busybox sh runs its applets by name, so the script names kmod's by path
for t in /real-bin/*; do ln -sf "$t" /bin/"${{t##*/}}"; done
M=/real-bin/modprobe
mkdir -p /usr
mount -t overlay overlay -o ro,lowerdir={lower} /usr || echo OVERLAY-FAILED
ln -s usr/lib /lib
echo "BASE-INDEX=$(grep -c updates/modulus /usr/lib/modules/$(uname -r)/modules.dep)"
$M --version
$M modulus_hello; echo "MP-HELLO-RC=$?"
[ -d /sys/module/modulus_hello ] && echo HELLO-LOADED
$M modulus-pair-user; echo "MP-PAIR-RC=$?"
[ -d /sys/module/modulus_pair_base ] && [ -d /sys/module/modulus_pair_user ] && echo PAIR-LOADED
dmesg | grep -o 'modulus_pair_user: loaded, modulus_pair_base says [0-9]*'
$M -r modulus_pair_user; echo "RM-PAIR-RC=$?"
[ -d /sys/module/modulus_pair_user ] || echo PAIR-USER-REMOVED
echo "MOUNTS=$(grep -c ' /usr/lib/modules' /proc/mounts)"
"""
    out = boot_and_run(k, script, files=files, kernel_modules=["overlay"])
    assert out.booted and out.rc == 0, out.console[-3000:]
    assert "OVERLAY-FAILED" not in out.output and "BASE-INDEX=0" in out.output, out.output
    assert "kmod version" in out.output, out.output
    assert "MP-HELLO-RC=0" in out.output and "HELLO-LOADED" in out.output, out.output
    assert "Loading kernel module from a sysext..." in out.output, out.output
    assert "MP-PAIR-RC=0" in out.output and "PAIR-LOADED" in out.output, out.output
    assert "RM-PAIR-RC=0" in out.output and "PAIR-USER-REMOVED" in out.output, out.output
    assert "MOUNTS=0" in out.output, out.output
    assert "modulus_pair_user: loaded, modulus_pair_base says 42" in out.output, out.output
    # modprobe -r took the unused dependency out too
    assert "modulus_hello" in out.loaded and not {"modulus_pair_base", "modulus_pair_user"} & set(out.loaded)
