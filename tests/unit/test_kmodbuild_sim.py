"""The kmod_build test fixtures' own parsing: modules.dep order and the QEMU console protocol."""

from __future__ import annotations

import pytest

from sim.qemu import dependency_order, parse_console, parse_modules_dep

DEP = """kernel/drivers/gpu/drm/drm.ko: kernel/drivers/video/fbdev/core/fb_sys_fops.ko
kernel/drivers/gpu/drm/drm_kms_helper.ko: kernel/drivers/gpu/drm/drm.ko kernel/drivers/i2c/algos/i2c-algo-bit.ko
kernel/drivers/video/fbdev/core/fb_sys_fops.ko:
kernel/drivers/i2c/algos/i2c-algo-bit.ko:
kernel/drivers/x/cyc-a.ko.xz: kernel/drivers/x/cyc-b.ko.xz
kernel/drivers/x/cyc-b.ko.xz: kernel/drivers/x/cyc-a.ko.xz
"""


def test_modules_dep_and_order() -> None:
    dep = parse_modules_dep(DEP)
    assert dep["drm"] == ("kernel/drivers/gpu/drm/drm.ko", ["fb_sys_fops"])
    assert dep["i2c_algo_bit"][1] == []
    assert dep["cyc_a"][0].endswith(".ko.xz")
    assert dependency_order(["drm_kms_helper"], dep) == ["fb_sys_fops", "drm", "i2c_algo_bit", "drm_kms_helper"]
    assert dependency_order(["drm", "drm"], dep) == ["fb_sys_fops", "drm"]
    with pytest.raises(RuntimeError, match="cycle"):
        dependency_order(["cyc_a"], dep)
    with pytest.raises(RuntimeError, match="not a module"):
        dependency_order(["i2c_core"], dep)


CONSOLE = """SeaBIOS (version 1.16.2-debian-1.16.2-1)\r
MODULUS-QEMU-START\r
MODRESULT dep drm 000-drm.ko rc=0 \r
[    3.28] nvidia: loading out-of-tree module taints kernel.\r
MODRESULT test nvidia 000-nvidia.ko rc=19 insmod: can't insert '/m/000-nvidia.ko': No such device\r
MODULES-BEGIN\r
drm 614400 0 - Live 0xffffffffc0400000\r
[    4.10] some kernel line in between\r
MODULES-END\r
MODULUS-QEMU-END\r
"""


def test_console_protocol() -> None:
    results, loaded, booted = parse_console(CONSOLE)
    assert booted
    assert results["drm"].ok and results["drm"].is_dependency
    nv = results["nvidia"]
    assert nv.rc == 19 and not nv.ok and nv.message.endswith("No such device")
    assert loaded == ["drm"]
    assert parse_console("no marker here")[2] is False
