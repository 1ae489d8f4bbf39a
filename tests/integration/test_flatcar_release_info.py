"""modulus.kmods.flatcar_release_info through Ansible on the kit's simulated hosts: the release and
kernel of the current and the pending release, read from the host itself (its release files, the
running kernel, update_engine and the not-booted USR partition), with no network."""

from __future__ import annotations

from typing import Callable

import pytest

from sim import ansible_run
from sim.kit import Kit, ReleaseServer

MODULE = "modulus.kmods.flatcar_release_info"


def info(root, **kw) -> tuple[dict, str]:
    return ansible_run.run_module(MODULE, {"host_root": str(root), **kw})


@pytest.mark.parametrize("update", ["need_reboot", "need_reboot_zero"])
def test_pending_release_and_kernel_without_download(kit: Kit, release_server: ReleaseServer,
                                                     host_root_factory: Callable, update: str) -> None:
    root = host_root_factory(update=update)
    release_server.reset()
    res, out = info(root)
    assert not res["failed"] and res["changed"] is False, out
    cur, pend = kit.releases["current"], kit.releases["pending"]
    assert (res["current"]["os_version"], res["current"]["kernel_release"]) == (cur.version, cur.kernel)
    assert res["current"]["kernel_source"] == "running-kernel"
    assert (res["pending"]["os_version"], res["pending"]["kernel_release"]) == (pend.version, pend.kernel)
    assert res["pending"]["kernel_source"] == "usr-partition" and res["pending"]["usr_partition"].endswith("USR-B")
    assert [t["release"] for t in res["targets"]] == ["current", "pending"]
    assert res["update_status"]["current_op"] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert release_server.hits == []


@pytest.mark.parametrize("update", ["idle", "downloading"])
def test_no_pending_release_until_the_update_is_written(kit: Kit, host_root_factory: Callable, update: str) -> None:
    res, out = info(host_root_factory(update=update))
    assert not res["failed"], out
    assert res["pending"] is None and [t["release"] for t in res["targets"]] == ["current"]


def test_legacy_coreos_and_only_pending_asked(kit: Kit, host_root_factory: Callable) -> None:
    res, out = info(host_root_factory(update="need_reboot", legacy=True), releases=["pending"])
    assert not res["failed"], out
    assert res["current"]["os"] == "coreos"
    assert [(t["release"], t["kernel_release"]) for t in res["targets"]] == [("pending", kit.releases["pending"].kernel)]


def test_check_mode_and_a_bad_host_root(kit: Kit, host_root_factory: Callable, tmp_path) -> None:
    res, out = ansible_run.run_module(MODULE, {"host_root": str(host_root_factory(update="need_reboot"))}, check=True)
    assert not res["failed"] and res["pending"]["kernel_release"] == kit.releases["pending"].kernel, out
    res, out = ansible_run.run_module(MODULE, {"host_root": str(tmp_path / "nothing")})
    assert res["failed"] and "no release file under" in res["msg"], out
