"""Flatcar's nvidia.service and official NVIDIA extensions (plugins/module_utils/_host/nvidia_service.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils._host import nvidia_service as ns


def names(etc: str | None, usr: str | None = None) -> list[str]:
    return [e.name for e in ns.enabled_sysexts(etc, usr)]


# --------------------------------------------------------------------------- enabled-sysext.conf, as Flatcar reads it

BOOTENGINE = (
    "grep -h -o '^[^#]*' \"$1\" \"$2\" | grep -v -x -f <(grep '^-' \"$1\" | cut -d - -f 2-) | grep -v -P '^(-).*'"
)


def bootengine_names(tmp: Path, etc: str, usr: str) -> list[str]:
    """The names bootengine's own pipeline gives (run with bash and GNU grep), for the comparison."""
    (tmp / "etc.conf").write_text(etc)
    (tmp / "usr.conf").write_text(usr)
    out = subprocess.run(["bash", "-c", f"for NAME in $({BOOTENGINE}); do echo \"$NAME\"; done", "x",
                          str(tmp / "etc.conf"), str(tmp / "usr.conf")], capture_output=True, text=True, check=False)
    return out.stdout.split()


CASES = [
    ("nvidia-drivers-535\n", ""),
    ("# nvidia-drivers-535\npython\n", ""),
    ("python # the bootstrap\nnvidia-drivers-570-open\n", ""),
    ("-zfs\n", "zfs\npodman\n"),
    ("-zfs # not here\n", "zfs\n"),
    ("zfs \n-zfs\n", ""),
    ("-nvidia-drivers-535\n", "nvidia-drivers-535\n"),
    ("podman python\n\n  \n", "-podman\n"),
    ("-nvidia-drivers-5.5\n", "nvidia-drivers-535\nnvidia-drivers-5x5\n"),
    ("nvidia-drivers-535 # comment\n-nvidia-drivers-535\n", ""),
    ("", ""),
]


@pytest.mark.parametrize("etc, usr", CASES)
def test_enabled_sysexts_match_bootengine(tmp_path: Path, etc: str, usr: str) -> None:
    assert names(etc, usr) == bootengine_names(tmp_path, etc, usr)


def test_enabled_sysexts_name_file_and_line() -> None:
    found = ns.enabled_sysexts("# ours\npython\nnvidia-drivers-535 # GPU\n", "zfs\n")
    assert [(e.name, e.file, e.line) for e in found] == [
        ("python", ns.ENABLED_SYSEXT_ETC, 2), ("nvidia-drivers-535", ns.ENABLED_SYSEXT_ETC, 3),
        ("zfs", ns.ENABLED_SYSEXT_USR, 1)]


def test_absent_files_enable_nothing() -> None:
    assert ns.enabled_sysexts(None, None) == []


# --------------------------------------------------------------------------- official extensions on a root


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def flatcar_root(tmp: Path) -> Path:
    """What x11-drivers/nvidia-drivers-service installs (the unit and its wants link in /usr)."""
    root = tmp / "root"
    write(root, ns.USR_UNIT, "[Unit]\n")
    wants = root / "usr/lib/systemd/system/multi-user.target.wants/nvidia.service"
    wants.parent.mkdir(parents=True)
    wants.symlink_to("../nvidia.service")
    return root


def test_official_entries_and_images(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.ENABLED_SYSEXT_ETC, "python\nnvidia-drivers-535\n-nvidia-drivers-570\n")
    write(root, ns.ENABLED_SYSEXT_USR, "nvidia-drivers-570\n")
    (root / "etc/extensions").mkdir(parents=True)
    (root / "etc/extensions/flatcar-nvidia-drivers-550-open.raw").symlink_to(
        "/etc/flatcar/sysext/flatcar-nvidia-drivers-550-open-9001.1.0.raw")
    (root / "etc/extensions/modulus-nvidia-9001.1.0.raw").write_text("")
    found = ns.official_nvidia_extensions(str(root))
    assert [o.as_dict() for o in found] == [
        {"entry": "nvidia-drivers-535", "file": ns.ENABLED_SYSEXT_ETC, "line": 2},
        {"entry": "flatcar-nvidia-drivers-550-open.raw", "file": "/etc/extensions/flatcar-nvidia-drivers-550-open.raw",
         "line": None}]


def test_refuse_names_the_file_and_the_entry_and_changes_nothing(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.ENABLED_SYSEXT_ETC, "# GPU\nnvidia-drivers-535\n")
    write(root, ns.LD_CONF, "/opt/nvidia/current/usr/lib64\n")
    with pytest.raises(ns.NvidiaServiceError) as err:
        ns.ensure(str(root), official="refuse")
    msg = str(err.value)
    assert '/etc/flatcar/enabled-sysext.conf line 2 enables "nvidia-drivers-535"' in msg
    assert "modulus_nvidia_official: defer" in msg
    assert not os.path.lexists(root / ns.ETC_UNIT.lstrip("/"))
    assert (root / ns.LD_CONF.lstrip("/")).exists()


def test_refuse_an_entry_of_the_usr_file_says_how_to_disable_it(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.ENABLED_SYSEXT_USR, "nvidia-drivers-570\n")
    with pytest.raises(ns.NvidiaServiceError, match='add the line "-nvidia-drivers-570" to /etc/flatcar/enabled-sysext.conf'):
        ns.ensure(str(root))


def test_defer_leaves_the_service_and_removes_nvidia_conf(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.ENABLED_SYSEXT_ETC, "nvidia-drivers-535\n")
    write(root, ns.LD_CONF, "/opt/nvidia/current/usr/lib64\n")
    res = ns.ensure(str(root), official="defer")
    assert res.deferred and not res.masked and res.changed
    assert res.removed == [ns.LD_CONF]
    assert not os.path.lexists(root / ns.ETC_UNIT.lstrip("/"))
    assert not (root / ns.LD_CONF.lstrip("/")).exists()
    again = ns.ensure(str(root), official="defer")
    assert again.deferred and not again.changed and again.actions[0].startswith("deferred to")


# --------------------------------------------------------------------------- masking


def test_mask_on_a_stock_root_then_nothing(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.LD_CONF, "/opt/nvidia/current/usr/lib64\n")
    check = ns.ensure(str(root), check=True)
    assert check.changed and check.masked and len(check.actions) == 2
    assert not os.path.lexists(root / ns.ETC_UNIT.lstrip("/")) and (root / ns.LD_CONF.lstrip("/")).exists()
    res = ns.ensure(str(root))
    assert res.changed and res.unit["before"] == "absent" and res.unit["shipped"]
    assert os.readlink(root / ns.ETC_UNIT.lstrip("/")) == "/dev/null"
    assert not (root / ns.LD_CONF.lstrip("/")).exists()
    assert res.ld_so_conf["lines"] == ["/opt/nvidia/current/usr/lib64"] and not res.ld_so_conf["ldconfig"]
    # the wants link in /usr stays (read-only on Flatcar); the mask wins over it
    assert (root / "usr/lib/systemd/system/multi-user.target.wants/nvidia.service").is_symlink()
    again = ns.ensure(str(root))
    assert not again.changed and again.actions == [] and again.masked


def test_etc_wants_links_are_removed(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    link = root / "etc/systemd/system/multi-user.target.wants/nvidia.service"
    link.parent.mkdir(parents=True)
    link.symlink_to("/usr/lib/systemd/system/nvidia.service")
    res = ns.ensure(str(root))
    assert res.removed == ["/etc/systemd/system/multi-user.target.wants/nvidia.service"]
    assert not os.path.lexists(link)


def test_a_linked_unit_is_replaced_by_the_mask(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    etc = root / ns.ETC_UNIT.lstrip("/")
    etc.parent.mkdir(parents=True)
    etc.symlink_to("/usr/lib/systemd/system/nvidia.service")
    assert ns.ensure(str(root)).changed
    assert os.readlink(etc) == "/dev/null"


def test_a_unit_file_of_its_own_is_refused(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.ETC_UNIT, "[Service]\nExecStart=/oem/bin/setup-nvidia\n")
    with pytest.raises(ns.NvidiaServiceError, match="unit file of its own"):
        ns.ensure(str(root))


def test_modulus_own_nvidia_conf_stays(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, ns.LD_CONF, "/opt/drivers/nvidia/lib\n")
    res = ns.ensure(str(root))
    assert ns.LD_CONF not in res.removed and (root / ns.LD_CONF.lstrip("/")).exists()


def test_official_value_is_checked() -> None:
    with pytest.raises(ValueError, match="official 'maybe'"):
        ns.ensure("/nonexistent", official="maybe")


@pytest.mark.parametrize("pattern, line, hit", [
    ("zfs", "zfs", True), ("zfs", "zfs ", False), ("nvidia-drivers-5.5", "nvidia-drivers-535", True),
    ("a*", "aaa", True), ("*a", "*a", True), ("x+", "x+", True), ("x+", "xx", False), ("^zfs$", "zfs", True),
    ("[ab]c", "bc", True), ("a\\.b", "a.b", True), ("a\\.b", "axb", False),
])
def test_bre_patterns(pattern: str, line: str, hit: bool) -> None:
    assert bool(ns._bre_fullmatch(pattern).fullmatch(line)) is hit
