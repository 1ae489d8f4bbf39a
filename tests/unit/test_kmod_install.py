"""kmod_install's logic (install.py) on a hand-made host root: both methods, idempotence, check
mode, pruning, absent, and the clean 'no NVIDIA GPU' answer. No root, no kit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import install
from ansible_collections.modulus.kmods.plugins.module_utils.manifest import list_files

K1, K2 = "6.1.0-47-amd64", "6.1.0-50-amd64"
R1, R2 = "9001.1.0", "9001.2.0"


def host(tmp_path: Path, pending: bool = False, version: str = R1) -> Path:
    root = tmp_path / "host"
    (root / "usr/share/flatcar").mkdir(parents=True)
    (root / "usr/share/flatcar/release").write_text(
        f"FLATCAR_RELEASE_VERSION={version}\nFLATCAR_RELEASE_BOARD=amd64-usr\n")
    (root / "usr/lib").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/os-release").write_text(f"ID=flatcar\nVERSION_ID={version}\n")
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text(K1 + "\n")
    (root / "usr/bin").mkdir(parents=True)
    op, new = ("UPDATE_STATUS_UPDATED_NEED_REBOOT", R2) if pending else ("UPDATE_STATUS_IDLE", "0.0.0")
    uec = root / "usr/bin/update_engine_client"
    uec.write_text(f"#!/bin/sh\necho LAST_CHECKED_TIME=1\necho PROGRESS=0.0\necho CURRENT_OP={op}\n"
                   f"echo NEW_VERSION={new}\necho NEW_SIZE=1\n")
    uec.chmod(0o755)
    return root


def build(tmp_path: Path, kver: str = K1, release: str = R1, driver: str = "modulus-hello", name: str = "b",
          version: str = "1.0") -> Path:
    b = tmp_path / f"{name}-{kver}"
    (b / f"lib/modules/{kver}").mkdir(parents=True)
    mod = driver.replace("-", "_") if driver != "nvidia" else "nvidia"
    (b / f"lib/modules/{kver}/{mod}.ko").write_bytes(b"ko " + name.encode())
    (b / "build.log").write_text("ok\n")
    if driver == "nvidia":
        (b / "bin").mkdir()
        (b / "bin/nvidia-smi").write_text("#!/bin/sh\n")
    m = {"schema": 1, "os": "flatcar", "board": "amd64-usr", "os_version": release, "kernel_release": kver,
         "driver": driver, "driver_version": version, "module_type": "default", "files": list_files(str(b)),
         "modules": [{"name": mod, "file": f"lib/modules/{kver}/{mod}.ko", "depends": [], "srcversion": "S"}]}
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def req(root: Path, src: Path, **kw) -> install.Request:
    args = dict(state="present", src=str(src), host_root=str(root), sysext_format="directory")
    args.update(kw)
    return install.Request(**args)


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = os.readlink(p) if p.is_symlink() else ("dir" if p.is_dir() else str(p.stat().st_mtime_ns))
    return out


def test_method_auto() -> None:
    from ansible_collections.modulus.kmods.plugins.module_utils.flatcar_release import HostRelease

    def mk(version: str, legacy: bool = False) -> HostRelease:
        return HostRelease("coreos" if legacy else "flatcar", version, "amd64-usr", None, legacy, "x")

    assert install.resolve_method("auto", mk("3185.0.0")) == "sysext"
    assert install.resolve_method("auto", mk("3139.2.3")) == "tree"
    assert install.resolve_method("auto", mk("2512.3.0", legacy=True)) == "tree"
    assert install.resolve_method("tree", mk("9001.1.0")) == "tree"


def test_sysext_present_idempotent_and_check_mode(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path)
    before = snapshot(root)
    out = install.run(req(root, src), check=True)
    assert out.changed and out.method == "sysext" and snapshot(root) == before
    out = install.run(req(root, src))
    assert out.changed
    img = root / f"var/lib/extensions/modulus-modulus-hello-{R1}"
    rel = (img / f"usr/lib/extension-release.d/extension-release.modulus-modulus-hello-{R1}").read_text()
    assert f"VERSION_ID={R1}" in rel and (img / f"usr/lib/modules/{K1}/updates/modulus/modulus-hello/modulus_hello.ko").is_file()
    assert not out.warnings, out.warnings
    assert not list((img / f"usr/lib/modules/{K1}").glob("modules.*"))
    assert (img / "usr/lib/modprobe.d/10-modulus-modulus-hello-kmod-sysext.conf").read_text().startswith(
        "install modulus_hello /usr/libexec/_modulus-modulus-hello_modprobe_helper modulus_hello\n")
    assert os.access(img / "usr/libexec/_modulus-modulus-hello_modprobe_helper", os.X_OK)
    script = root / "opt/modulus/bin/modulus-load-modulus-hello"
    assert script.stat().st_mode & 0o111 and "insmod" in script.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/modulus-load-modulus-hello.service").is_symlink()
    assert (root / "etc/modprobe.d/modulus-modulus-hello.conf").is_file()
    assert out.result["merge"]["refreshed"] is False  # host_root is not the running system
    # nothing outside /etc, /opt, /var
    assert not [p for p in snapshot(root) if p not in before and p.split("/")[0] not in ("etc", "opt", "var")]
    again = snapshot(root)
    out = install.run(req(root, src))
    assert not out.changed, out.actions
    assert snapshot(root) == again


def test_staged_for_pending_and_kernel_checks(tmp_path: Path) -> None:
    root = host(tmp_path, pending=True)
    src = build(tmp_path, K2, R2)
    out = install.run(req(root, src, state="staged"))
    assert out.changed and out.result["release"] == R2 and out.result["pending_release"] == R2
    assert "merged when the host boots release 9001.2.0" in out.result["merge"]["reason"]
    with pytest.raises(install.InstallError, match="state=loaded needs a build for the running kernel"):
        install.run(req(root, src, state="loaded"))
    wrong = build(tmp_path, K2, R1, name="wrong")
    with pytest.raises(install.InstallError, match="cannot fit this release"):
        install.run(req(root, wrong))


def test_tampered_build_is_refused(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path)
    (src / f"lib/modules/{K1}/modulus_hello.ko").write_bytes(b"evil")
    with pytest.raises(install.InstallError, match="does not match its manifest"):
        install.run(req(root, src))
    assert not (root / "var/lib/extensions").exists()


def test_tree_method_and_absent(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path)
    out = install.run(req(root, src, method="tree"))
    dest = f"/opt/modulus/installed/modulus-hello/1.0/{K1}"
    assert out.method == "tree" and os.readlink(root / "opt/drivers/modulus-hello") == dest
    assert os.readlink(root / f"opt/modulus/installed/modulus-hello/by-kernel/{K1}") == dest
    assert (root / dest.lstrip("/") / "manifest.json").is_file()
    assert (root / "etc/ld.so.conf.d/modulus-hello.conf").read_text() == "/opt/drivers/modulus-hello/lib\n"
    assert not install.run(req(root, src, method="tree")).changed
    out = install.run(install.Request(state="absent", driver="modulus-hello", host_root=str(root)), check=True)
    assert out.changed and (root / "opt/drivers/modulus-hello").is_symlink()
    out = install.run(install.Request(state="absent", driver="modulus-hello", host_root=str(root)))
    assert out.changed and "/opt/drivers/modulus-hello" in out.result["removed"]
    left = [p for p in root.rglob("*") if "modulus-hello" in p.name and not p.name.endswith(".lock")]
    assert left == []
    assert not install.run(install.Request(state="absent", driver="modulus-hello", host_root=str(root))).changed


def test_keep_prunes_old_images_but_not_running_or_pending(tmp_path: Path) -> None:
    root = host(tmp_path, pending=True)
    install.run(req(root, build(tmp_path, K1, R1)))
    install.run(req(root, build(tmp_path, K2, R2), state="staged"))
    for i, rel in enumerate(("9001.3.0", "9001.4.0")):
        install.run(req(root, build(tmp_path, K2, R2, name=f"x{i}"), state="staged", release=rel, keep=3))
    names = sorted(p.name for p in (root / "var/lib/extensions").iterdir())
    assert names == [f"modulus-modulus-hello-{v}" for v in (R1, R2, "9001.4.0")]
    state = json.loads((root / "var/lib/modulus/kmod_install/modulus-hello.json").read_text())
    assert sorted(state["images"]) == names


def test_loaded_without_gpu_is_clean(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path, driver="nvidia", version="535.261.03")
    out = install.run(req(root, src, state="loaded"))
    assert out.failed is None and out.changed
    assert out.result["load"]["loaded"] is False
    assert out.result["load"]["reason"].startswith("no NVIDIA GPU")
    assert out.result["load_plan"]["prerequisites"][:3] == ["ipmi_msghandler", "ipmi_devintf", "i2c_core"]


def test_bad_options(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path)
    with pytest.raises(install.InstallError, match="extensions_dir='/usr/lib/extensions'"):
        install.run(req(root, src, extensions_dir="/usr/lib/extensions"))
    with pytest.raises(install.InstallError, match="keep=0"):
        install.run(req(root, src, keep=0))
    with pytest.raises(install.InstallError, match="is not a directory"):
        install.run(req(root, tmp_path / "nope"))


def test_other_build_in_use_is_not_switched(tmp_path: Path) -> None:
    """A different build of the module is loaded and in use: the new one is installed for the next
    boot, /opt/drivers is not switched, nothing is refreshed or loaded, and the task does not fail."""
    root = host(tmp_path)
    old, new = build(tmp_path, name="old"), build(tmp_path, name="new", version="2.0")
    install.run(req(root, old, method="tree"))
    (root / "proc/modules").write_text("modulus_hello 16384 1 - Live 0x0\n")
    (root / "sys/module/modulus_hello").mkdir(parents=True)
    (root / "sys/module/modulus_hello/srcversion").write_text("OLDSRC\n")
    manifest = json.loads((new / "manifest.json").read_text())
    manifest["modules"][0]["srcversion"] = "NEWSRC"
    (new / "manifest.json").write_text(json.dumps(manifest))
    out = install.run(req(root, new, method="tree", state="loaded", keep=1))
    assert out.failed is None and out.result["pruned"] == []  # the copy in use is kept, whatever keep says and any("in use" in w for w in out.warnings)
    assert os.readlink(root / "opt/drivers/modulus-hello").endswith(f"/1.0/{K1}")
    assert os.readlink(root / f"opt/modulus/installed/modulus-hello/by-kernel/{K1}").endswith(f"/2.0/{K1}")
    assert "takes over at the next boot" in out.result["load"]["reason"]
    out = install.run(req(root, new, state="present"))  # sysext: no refresh either
    assert "in use" in out.result["merge"]["reason"]


def merge_into_usr(root: Path, image: Path) -> None:
    """What systemd-sysext shows once the directory image is merged: its usr/ over the host's usr/."""
    shutil.copytree(image / "usr", root / "usr", dirs_exist_ok=True, symlinks=True)


def test_second_run_on_a_merged_usr_changes_nothing(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path)
    kdir = root / f"usr/lib/modules/{K1}"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "modules.dep").write_text("kernel/drivers/x.ko:\n")
    out = install.run(req(root, src))
    assert out.changed and out.result["image"]["created"]
    key = out.result["image"]["content"]
    merge_into_usr(root, root / f"var/lib/extensions/modulus-modulus-hello-{R1}")
    (kdir / "modules.dep").write_text("kernel/drivers/x.ko:\nupdates/modulus/modulus-hello/modulus_hello.ko:\n")
    again = snapshot(root)
    out = install.run(req(root, src))
    assert not out.changed, out.actions
    assert out.result["image"]["content"] == key and out.result["image"]["created"] is False
    assert snapshot(root) == again


def strict_path(tmp_path: Path, tools: tuple[str, ...]) -> str:
    """A PATH holding only ``tools`` (symlinks), like a stock host's."""
    d = tmp_path / "strict-bin"
    d.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        if found and not (d / tool).exists():
            (d / tool).symlink_to(found)
    return str(d)


def test_auto_format_follows_the_tools_and_never_flips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("mksquashfs"):
        pytest.skip("mksquashfs is not installed (scripts/install-system-deps.sh installs it)")
    root, src = host(tmp_path), build(tmp_path)
    monkeypatch.setenv("PATH", strict_path(tmp_path, ("sh",)))
    out = install.run(req(root, src, sysext_format="auto"))
    img = out.result["image"]
    assert img["format"] == "directory" and "neither mkfs.erofs nor mksquashfs" in img["format_reason"]
    with pytest.raises(install.InstallError, match="sysext_format=squashfs needs mksquashfs"):
        install.run(req(root, src, sysext_format="squashfs"))
    # the tool appears: the image in place is up to date and keeps its format
    monkeypatch.setenv("PATH", strict_path(tmp_path, ("sh", "mksquashfs")))
    out = install.run(req(root, src, sysext_format="auto"))
    assert not out.changed and out.result["image"]["format"] == "directory", out.actions
    assert "in place" in out.result["image"]["format_reason"]
    # a new build is made in the format the host can make now; the directory goes
    src2 = build(tmp_path, version="1.1", name="b2")
    out = install.run(req(root, src2, sysext_format="auto"))
    assert out.result["image"]["format"] == "squashfs" and out.result["image"]["created"], out.result["image"]
    ext = root / "var/lib/extensions"
    assert sorted(p.name for p in ext.iterdir()) == [f"modulus-modulus-hello-{R1}.raw"]
    out = install.run(req(root, src2, sysext_format="auto"))
    assert not out.changed, out.actions


def test_replacing_a_merged_directory_image_keeps_the_old_one_until_reboot(tmp_path: Path) -> None:
    root, src = host(tmp_path), build(tmp_path)
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-1\n")
    install.run(req(root, src))
    image = root / f"var/lib/extensions/modulus-modulus-hello-{R1}"
    merge_into_usr(root, image)
    inode = image.stat().st_ino
    install.run(req(root, build(tmp_path, version="1.1", name="b2")))
    retired = list((root / "var/lib/.modulus-retired-images").iterdir())
    assert len(retired) == 1 and retired[0].name.endswith(".boot-1") and retired[0].stat().st_ino == inode
    assert image.stat().st_ino != inode and "MODULUS_DRIVER_VERSION=1.1" in (
        image / f"usr/lib/extension-release.d/extension-release.modulus-modulus-hello-{R1}").read_text()
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-2\n")
    install.run(req(root, build(tmp_path, version="1.2", name="b3")))
    left = [p.name for p in (root / "var/lib/.modulus-retired-images").iterdir()]
    assert len(left) == 1 and left[0].endswith(".boot-2"), left  # boot-1's is gone, 1.1 retired in boot 2
