"""kmod_install's load plan (kload.py): ordering, prerequisites, parameters, config files, device
nodes, GPU detection and the shell script (run by /bin/sh here, busybox in the QEMU test)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import kload

K = "6.1.0-50-amd64"


def nvidia_manifest(**kw) -> dict:
    mods = [("nvidia", ["drm"]), ("nvidia_drm", ["drm", "drm_kms_helper", "nvidia-modeset"]),
            ("nvidia_modeset", ["nvidia", "video"]), ("nvidia_peermem", []), ("nvidia_uvm", ["nvidia"])]
    m = {"driver": "nvidia", "driver_version": "535.261.03", "kernel_release": K,
         "modules": [{"name": n, "file": f"lib/modules/{K}/{n.replace('_', '-')}.ko", "depends": d,
                      "srcversion": "ABC" + n} for n, d in mods],
         "files": {"bin/nvidia-smi": {}}}
    m.update(kw)
    return m


def test_dependency_order_and_external() -> None:
    order, ext = kload.dependency_order({"a": ["b", "x"], "b": ["c"], "c": [], "d": ["a"]}, ["d"])
    assert order == ["c", "b", "a", "d"] and ext == ["x"]
    with pytest.raises(kload.LoadError, match="cycle: a -> b -> a"):
        kload.dependency_order({"a": ["b"], "b": ["a"]}, ["a"])
    with pytest.raises(kload.LoadError, match="'zz' is not a module of this build"):
        kload.dependency_order({"a": []}, ["zz"])


def test_nvidia_plan_order_prerequisites_and_defaults() -> None:
    plan = kload.load_plan(nvidia_manifest())
    assert plan.modules == ["nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_peermem", "nvidia_uvm"]
    assert plan.prerequisites == ["ipmi_msghandler", "ipmi_devintf", "i2c_core", "drm", "drm_kms_helper"]
    assert plan.external == ["video"]
    steps = [(s.action, s.module) for s in plan.steps]
    assert steps[:6] == [("modprobe", m) for m in plan.prerequisites + ["video"]]
    assert [m for a, m in steps if a == "insmod"] == plan.modules
    assert plan.steps[6].argv("/d") == ["insmod", "/d/nvidia.ko"]
    assert plan.device_nodes and plan.verify_command == ["nvidia-smi"] and plan.blacklist == ["nouveau"]
    # only nvidia-uvm asked: nvidia comes first, no drm prerequisites
    plan = kload.load_plan(nvidia_manifest(), modules=["nvidia-uvm"], verify_command="")
    assert plan.modules == ["nvidia", "nvidia_uvm"] and "drm" not in plan.prerequisites
    assert plan.verify_command == []


def test_generic_plan_has_no_prerequisites_or_nodes() -> None:
    m = {"driver": "modulus-hello", "kernel_release": K, "files": {},
         "modules": [{"name": "modulus_hello", "file": f"lib/modules/{K}/modulus_hello.ko", "depends": []}]}
    plan = kload.load_plan(m, parameters={"modulus_hello": {"greeting": "hi there"}})
    assert [s.as_dict()["action"] for s in plan.steps] == ["insmod"]
    assert plan.steps[0].params == ['greeting="hi there"']
    assert not plan.device_nodes and plan.verify_command == [] and plan.blacklist == []
    assert kload.modprobe_conf(plan).endswith('options modulus_hello greeting="hi there"\n')
    assert kload.modules_load_conf(plan).splitlines()[1:] == ["modulus_hello"]


def test_parameters() -> None:
    assert kload.parse_parameters("nvidia", {"NVreg_X": True, "a": 3, "l": [1, 2]}) == ["NVreg_X=1", "a=3", "l=1,2"]
    assert kload.parse_parameters("nvidia", "NVreg_A=1 b='two words'") == ["NVreg_A=1", 'b="two words"']
    with pytest.raises(kload.LoadError, match="not key=value"):
        kload.parse_parameters("m", "=x")
    with pytest.raises(kload.LoadError, match="newline"):
        kload.parse_parameters("m", {"a": "x\ny"})
    with pytest.raises(kload.LoadError, match="not a module this plan loads"):
        kload.load_plan(nvidia_manifest(), parameters={"nouveau": "x=1"})


def test_modprobe_conf_blacklists_nouveau() -> None:
    plan = kload.load_plan(nvidia_manifest(), parameters={"nvidia": {"NVreg_OpenRmEnableUnsupportedGpus": 1}})
    text = kload.modprobe_conf(plan)
    assert "blacklist nouveau\noptions nouveau modeset=0\n" in text
    assert "options nvidia NVreg_OpenRmEnableUnsupportedGpus=1" in text


def test_proc_devices_and_node_plan() -> None:
    text = "Character devices:\n  1 mem\n195 nvidia-frontend\n237 nvidia-uvm\n\nBlock devices:\n  7 loop\n"
    majors = kload.parse_proc_devices(text)
    assert majors == {"mem": 1, "nvidia-frontend": 195, "nvidia-uvm": 237}
    plan = kload.load_plan(nvidia_manifest())
    nodes = {n.path: (n.major, n.minor) for n in kload.device_node_plan(plan, majors, 2)}
    assert nodes == {"/dev/nvidia0": (195, 0), "/dev/nvidia1": (195, 1), "/dev/nvidiactl": (195, 255),
                     "/dev/nvidia-modeset": (195, 254), "/dev/nvidia-uvm": (237, 0), "/dev/nvidia-uvm-tools": (237, 1)}
    assert kload.device_node_plan(plan, majors, 0) == []
    plan = kload.load_plan(nvidia_manifest(), device_nodes=False)
    assert kload.device_node_plan(plan, majors, 1) == []


def pci(root: Path, addr: str, vendor: str, klass: str) -> None:
    d = root / "sys/bus/pci/devices" / addr
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "class").write_text(klass + "\n")


def test_nvidia_gpus(tmp_path: Path) -> None:
    assert kload.nvidia_gpus(str(tmp_path)) == []
    pci(tmp_path, "0000:00:02.0", "0x8086", "0x030000")
    pci(tmp_path, "0000:01:00.0", "0x10de", "0x030200")
    pci(tmp_path, "0000:01:00.1", "0x10de", "0x040300")  # its HDMI audio function
    assert kload.nvidia_gpus(str(tmp_path)) == ["0000:01:00.0"]


def test_loaded_modules(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text("nvidia 100 2 nvidia_uvm, Live 0x0\ndrm 5 0 - Live 0x0\n")
    (tmp_path / "sys/module/nvidia").mkdir(parents=True)
    (tmp_path / "sys/module/nvidia/srcversion").write_text("ABC\n")
    assert kload.loaded_modules(str(tmp_path)) == {"nvidia": 2, "drm": 0}
    assert kload.loaded_srcversion("nvidia", str(tmp_path)) == "ABC"
    assert kload.loaded_srcversion("drm", str(tmp_path)) is None


def fake_bin(tmp_path: Path, log: Path) -> Path:
    """modprobe/insmod/uname stand-ins that record their arguments (the script only runs them)."""
    b = tmp_path / "bin"
    b.mkdir()
    for tool in ("modprobe", "insmod", "mknod", "ldconfig"):
        (b / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (b / tool).chmod(0o755)
    (b / "uname").write_text(f"#!/bin/sh\necho {K}\n")
    (b / "uname").chmod(0o755)
    return b


def test_script_runs_the_plan_in_order(tmp_path: Path) -> None:
    m = {"driver": "modulus-hello", "kernel_release": K, "files": {},
         "modules": [{"name": "a", "file": f"lib/modules/{K}/a.ko", "depends": ["b", "ext"]},
                     {"name": "b", "file": f"lib/modules/{K}/b.ko", "depends": []}]}
    plan = kload.load_plan(m, parameters={"a": "x=1"})
    moddir = tmp_path / "mods" / K
    moddir.mkdir(parents=True)
    script = tmp_path / "load"
    script.write_text(kload.render_script(plan, [str(tmp_path / "nope/$K"), str(tmp_path / "mods/$K")]))
    script.chmod(0o755)
    log = tmp_path / "calls"
    env = dict(os.environ, PATH=f"{fake_bin(tmp_path, log)}:{os.environ['PATH']}")
    # the script puts /usr/sbin first; run it with sh and our PATH re-prepended through a wrapper
    wrapper = tmp_path / "run"
    wrapper.write_text(f"#!/bin/sh\nsed 's|^PATH=.*|PATH={tmp_path}/bin:$PATH|' {script} | sh\n")
    wrapper.chmod(0o755)
    proc = subprocess.run([str(wrapper)], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == ["modprobe ext", f"insmod {moddir}/b.ko", f"insmod {moddir}/a.ko x=1"]
    assert "modulus-load: done" in proc.stdout


def test_nvidia_script_without_gpu_loads_nothing(tmp_path: Path) -> None:
    text = kload.render_script(kload.load_plan(nvidia_manifest()), ["/"])
    assert 'no NVIDIA GPU (PCI vendor 10de) on this host: not loading"; exit 0' in text
    assert "mknod -m 666 /dev/nvidiactl" in text
    assert subprocess.run(["sh", "-n"], input=text, text=True, check=False).returncode == 0
