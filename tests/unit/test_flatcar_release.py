"""Release files, update.conf, update_engine_client -status and release resolution (no root needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import flatcar_release as fr

REAL_STATUS = """LAST_CHECKED_TIME=1732571234
PROGRESS=0.000000
CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT
NEW_VERSION=4459.2.2
NEW_SIZE=486539264
"""
MKFS = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
HAVE_E2FS = os.path.exists(MKFS) and (shutil.which("debugfs") or os.path.exists("/usr/sbin/debugfs"))
MKFS_BTRFS = shutil.which("mkfs.btrfs") or "/usr/sbin/mkfs.btrfs"
HAVE_BTRFS = os.path.exists(MKFS_BTRFS) and bool(shutil.which("btrfs") or os.path.exists("/usr/bin/btrfs"))


def write(root: Path, rel: str, text: str, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def flatcar_root(tmp_path: Path, version: str = "4459.2.1", group: str | None = "stable",
                 etc_group: str | None = None) -> Path:
    root = tmp_path / "root"
    write(root, "usr/share/flatcar/release", f"FLATCAR_RELEASE_VERSION={version}\nFLATCAR_RELEASE_BOARD=amd64-usr\n"
                                             "FLATCAR_RELEASE_APPID={e96281a6-d1af-4bde-9a0a-97b76e56dc57}\n")
    if group is not None:
        write(root, "usr/share/flatcar/update.conf", f"GROUP={group}\nSERVER=https://public.update.flatcar-linux.net/v1/update/\n")
    if etc_group is not None:
        write(root, "etc/flatcar/update.conf", f"# local override\nGROUP={etc_group}\nREBOOT_STRATEGY=off\n")
    return root


def fake_update_engine(root: Path, status: str, rc: int = 0) -> list[str]:
    body = status.replace("'", "")
    script = write(root, "usr/bin/update_engine_client",
                   "#!/bin/sh\n"
                   "echo 'I1125 22:52:41.000000 update_engine_client.cc:245] Querying Update Engine status...' >&2\n"
                   f"[ \"$1\" = -status ] || exit 1\nprintf '%s' '{body}'\nexit {rc}\n", mode=0o755)
    return [str(script)]


def usr_image(path: Path, tmp_path: Path, version: str, kernels: tuple[str, ...] = (), fs: str = "btrfs") -> Path:
    """A USR partition image: btrfs as Flatcar makes it since 2021, or ext2/ext4 of older releases."""
    tree = tmp_path / f"usrtree-{version}-{path.name}"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "os-release").write_text(f'ID=flatcar\nVERSION={version}\nVERSION_ID={version}\nNAME="Flatcar"\n')
    for kver in kernels:
        (tree / "lib" / "modules" / kver / "kernel").mkdir(parents=True)
        (tree / "lib" / "modules" / kver / "modules.dep").write_text("")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(16 << 20)
    if fs == "btrfs":
        cmd = [MKFS_BTRFS, "-q", "-f", "--mixed", "-m", "single", "-d", "single", "--rootdir", str(tree), str(path)]
    else:
        cmd = [MKFS, "-q", "-F", "-t", fs, "-d", str(tree), str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


USR_FS = [pytest.param("btrfs", marks=pytest.mark.skipif(not HAVE_BTRFS, reason="btrfs-progs is not installed")),
          pytest.param("ext2", marks=pytest.mark.skipif(not HAVE_E2FS, reason="e2fsprogs is not installed"))]


# ------------------------------------------------------------------ parsing


def test_flatcar_release_file(tmp_path: Path) -> None:
    host = fr.read_host_release(str(flatcar_root(tmp_path)))
    assert (host.os_id, host.version, host.board, host.legacy) == ("flatcar", "4459.2.1", "amd64-usr", False)
    assert host.appid == "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"


def test_legacy_coreos_release_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "usr/share/coreos/release", "COREOS_RELEASE_VERSION=2512.3.0\nCOREOS_RELEASE_BOARD=amd64-usr\n")
    host = fr.read_host_release(str(root))
    assert (host.os_id, host.version, host.legacy) == ("coreos", "2512.3.0", True)


def test_os_release_fallback_and_foreign_os(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "etc/os-release", 'ID=flatcar\nVERSION_ID="3975.2.0"\n')
    assert fr.read_host_release(str(root)).version == "3975.2.0"
    write(root, "etc/os-release", "ID=debian\nVERSION_ID=12\n")
    with pytest.raises(fr.ReleaseError, match="not a Flatcar or CoreOS"):
        fr.read_host_release(str(root))


def test_no_release_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(fr.ReleaseError, match="usr/share/flatcar/release"):
        fr.read_host_release(str(tmp_path))


def test_group_lookup_order(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path, group="beta")
    assert fr.read_group(str(root))[0] == "beta"
    write(root, "etc/flatcar/update.conf", "REBOOT_STRATEGY=off\n")  # no GROUP: falls through
    assert fr.read_group(str(root))[0] == "beta"
    write(root, "etc/flatcar/update.conf", "GROUP='alpha'\n")
    group, source = fr.read_group(str(root))
    assert group == "alpha" and source.endswith("etc/flatcar/update.conf")


@pytest.mark.parametrize(("group", "channel"), [("stable", "stable"), ("Beta", "beta"), ("lts", "lts"),
                                                ("lts-2022", "lts"), ("alpha", "alpha")])
def test_channel_of_group(group: str, channel: str) -> None:
    assert fr.channel_of_group(group) == channel


def test_group_id_is_not_a_channel() -> None:
    with pytest.raises(fr.ReleaseError, match="set the channel option"):
        fr.channel_of_group("6e5c2e4c-d3b8-4a7b-9a7d-1c2b3d4e5f60")


def test_parse_real_status() -> None:
    status = fr.parse_update_engine_status(REAL_STATUS)
    assert status.need_reboot
    assert (status.new_version, status.new_size, status.last_checked_time, status.progress) == (
        "4459.2.2", 486539264, 1732571234, 0.0)


def test_parse_status_zero_and_missing_version() -> None:
    zero = fr.parse_update_engine_status(REAL_STATUS.replace("4459.2.2", "0.0.0"))
    assert zero.need_reboot and zero.new_version == fr.ZERO_VERSION
    missing = fr.parse_update_engine_status("CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT\n")
    assert missing.new_version is None and missing.new_size is None
    idle = fr.parse_update_engine_status("I1125 log line\nCURRENT_OP=UPDATE_STATUS_IDLE\nPROGRESS=x\n")
    assert not idle.need_reboot and idle.progress is None


@pytest.mark.parametrize(("cmdline", "booted"), [
    ("BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr verity.usr=PARTUUID=7130c94a-213a-4e5a-8e26-6cce9662f132 rootflags=rw", "USR-A"),
    ("verity.usr=PARTUUID=E03DD35C-7C2D-4A47-B3FE-27F15780A57C", "USR-B"),
    ("mount.usr=PARTLABEL=USR-B", "USR-B"),
    ("usr=/dev/disk/by-partlabel/USR-A", "USR-A"),
    ("console=ttyS0 root=LABEL=ROOT", None),
])
def test_booted_usr(cmdline: str, booted: str | None) -> None:
    assert fr.booted_usr(cmdline) == booted


def test_resolve_in_root_keeps_absolute_links_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dev" / "disk" / "by-partlabel").mkdir(parents=True)
    (root / "dev" / "vda4").write_text("x")
    os.symlink("/dev/vda4", root / "dev" / "disk" / "by-partlabel" / "USR-B")
    assert fr.resolve_in_root(str(root), "/dev/disk/by-partlabel/USR-B") == str(root / "dev" / "vda4")
    os.symlink("../../../../../../etc/passwd", root / "dev" / "disk" / "evil")
    assert fr.resolve_in_root(str(root), "dev/disk/evil") == str(root / "etc" / "passwd")


@pytest.mark.parametrize("value", ["4459.2.1", "9001.2.0", "2512.3.0", "3033.3.18"])
def test_valid_versions(value: str) -> None:
    assert fr.check_version("release", value) == value


@pytest.mark.parametrize("value", ["", "latest", "../../etc", "4459", "4459.2.1/../x", "4459.2.1 ; rm"])
def test_invalid_versions_name_the_option(value: str) -> None:
    with pytest.raises(ValueError, match="release="):
        fr.check_version("release", value)


# ------------------------------------------------------------------ resolution


def test_resolve_current_and_explicit(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    current = fr.resolve_release("current", str(root))
    assert (current.version, current.pending, current.source) == ("4459.2.1", False, "release-file")
    explicit = fr.resolve_release("4230.2.4", str(root))
    assert (explicit.version, explicit.pending, explicit.source) == ("4230.2.4", False, "explicit")


def test_resolve_pending_from_update_engine(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    fake_update_engine(root, REAL_STATUS)
    resolved = fr.resolve_release("pending", str(root))  # found at {host_root}/usr/bin/update_engine_client
    assert (resolved.version, resolved.pending, resolved.source) == ("4459.2.2", True, "update_engine")
    assert resolved.update_status.current_op == fr.NEED_REBOOT


def test_resolve_pending_when_idle_is_the_current_release(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    command = fake_update_engine(root, REAL_STATUS.replace("UPDATED_NEED_REBOOT", "IDLE").replace("4459.2.2", "0.0.0"))
    resolved = fr.resolve_release("pending", str(root), command)
    assert (resolved.version, resolved.pending) == ("4459.2.1", False)


def test_update_engine_failure_is_reported(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    command = fake_update_engine(root, "", rc=1)
    with pytest.raises(fr.ReleaseError, match=r"-status failed \(rc=1\)"):
        fr.resolve_release("pending", str(root), command)


def test_missing_update_engine_client_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(fr, "which", lambda _name: None)
    with pytest.raises(fr.ReleaseError, match="update_engine_client was found neither"):
        fr.resolve_release("pending", str(flatcar_root(tmp_path)))


def test_zero_version_without_usr_partitions_fails_saying_why(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    fake_update_engine(root, REAL_STATUS.replace("4459.2.2", "0.0.0"))
    write(root, "proc/cmdline", "verity.usr=PARTUUID=7130c94a-213a-4e5a-8e26-6cce9662f132\n")
    with pytest.raises(fr.ReleaseError, match=r"NEW_VERSION=0\.0\.0.*\(USR-B\) was not found"):
        fr.resolve_release("pending", str(root))


@pytest.mark.parametrize("fs", USR_FS)
@pytest.mark.parametrize("booted", ["A", "B"])
def test_zero_version_reads_the_not_booted_usr_partition(tmp_path: Path, booted: str, fs: str) -> None:
    root = flatcar_root(tmp_path)
    fake_update_engine(root, REAL_STATUS.replace("4459.2.2", "0.0.0"))
    uuid = fr.USR_A_UUID if booted == "A" else fr.USR_B_UUID
    write(root, "proc/cmdline", f"BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr verity.usr=PARTUUID={uuid}\n")
    labels = {"A": ("USR-A", "USR-B"), "B": ("USR-B", "USR-A")}[booted]
    usr_image(root / "dev/disk/by-partlabel" / labels[0], tmp_path, "4459.2.1", fs=fs)
    usr_image(root / "dev/disk/by-partlabel" / labels[1], tmp_path, "4459.2.3", fs=fs)
    resolved = fr.resolve_release("pending", str(root))
    assert (resolved.version, resolved.pending, resolved.source) == ("4459.2.3", True, "usr-partition")
    assert resolved.usr_partition.endswith(labels[1])


@pytest.mark.skipif(not HAVE_BTRFS, reason="btrfs-progs is not installed")
def test_zero_version_without_cmdline_picks_the_partition_that_differs(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    fake_update_engine(root, REAL_STATUS.replace("4459.2.2", "0.0.0"))
    usr_image(root / "dev/disk/by-partlabel/USR-A", tmp_path, "4459.2.1")
    usr_image(root / "dev" / "vda4", tmp_path, "4459.2.4")
    (root / "dev/disk/by-partuuid").mkdir(parents=True)
    os.symlink("/dev/vda4", root / "dev/disk/by-partuuid" / fr.USR_B_UUID)  # absolute: inside host_root
    assert fr.resolve_release("pending", str(root)).version == "4459.2.4"


# ------------------------------------------------------------------ the target of a build, read from the host


def test_unknown_update_engine_state_is_refused_with_its_raw_text(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    fake_update_engine(root, REAL_STATUS.replace("UPDATE_STATUS_UPDATED_NEED_REBOOT", "UPDATE_STATUS_NEW_THING"))
    with pytest.raises(fr.ReleaseError, match=r"CURRENT_OP='UPDATE_STATUS_NEW_THING'.*NEW_VERSION=4459\.2\.2"):
        fr.resolve_release("pending", str(root))


def test_a_hung_update_engine_client_is_killed_with_its_children(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "child.pid"
    script = write(tmp_path, "uec", f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n", mode=0o755)

    class Started(subprocess.Popen):
        """The client's timeout runs from the moment it has started its child (it wrote the pid file),
        however long the machine takes to get there."""

        def communicate(self, input=None, timeout=None):  # Popen's signature
            if timeout is not None and self.args[0] == str(script):
                while not (pidfile.exists() and pidfile.read_text().endswith("\n")):
                    assert self.poll() is None, "the client ended before it started its child"
                    time.sleep(0.01)
            return super().communicate(input, timeout)

    monkeypatch.setattr(fr.subprocess, "Popen", Started)
    with pytest.raises(fr.ReleaseError, match="did not answer within 0.5 s"):
        fr.query_update_engine([str(script)], timeout=0.5)
    monkeypatch.undo()
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            return " Z " in Path(f"/proc/{child}/stat").read_text()  # a zombie waiting for init is dead
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 5
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()


@pytest.mark.parametrize("value", ["4459.2.1\n", " 4459.2.1", "4459.2.1\nX=1"])
def test_versions_with_a_newline_or_space_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="release="):
        fr.check_version("release", value)


def test_running_kernel_is_read_below_host_root(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, "proc/sys/kernel/osrelease", "6.6.95-flatcar\n")
    assert fr.running_kernel(str(root)) == "6.6.95-flatcar"
    write(root, "proc/sys/kernel/osrelease", "../../etc\n")
    with pytest.raises(ValueError, match="running kernel="):
        fr.running_kernel(str(root))


def test_targets_of_an_idle_host_are_the_current_release_only(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, "proc/sys/kernel/osrelease", "6.6.95-flatcar\n")
    fake_update_engine(root, REAL_STATUS.replace("UPDATE_STATUS_UPDATED_NEED_REBOOT", "UPDATE_STATUS_IDLE"))
    found = fr.host_targets(str(root))
    assert found["pending"] is None
    assert found["current"].as_dict() | {"usr_partition": None} == {
        "release": "current", "os": "flatcar", "board": "amd64-usr", "os_version": "4459.2.1", "channel": "stable",
        "kernel_release": "6.6.95-flatcar", "kernel_source": "running-kernel", "pending": False, "usr_partition": None,
        "note": None}


@pytest.mark.parametrize("fs", USR_FS)
@pytest.mark.parametrize("zero", [False, True])
def test_pending_kernel_comes_from_the_not_booted_usr_partition(tmp_path: Path, zero: bool, fs: str) -> None:
    root = flatcar_root(tmp_path)
    write(root, "proc/sys/kernel/osrelease", "6.6.95-flatcar\n")
    fake_update_engine(root, REAL_STATUS.replace("4459.2.2", "0.0.0") if zero else REAL_STATUS)
    write(root, "proc/cmdline", f"mount.usr=/dev/mapper/usr verity.usr=PARTUUID={fr.USR_A_UUID}\n")
    usr_image(root / "dev/disk/by-partlabel/USR-A", tmp_path, "4459.2.1", ("6.6.95-flatcar",), fs=fs)
    usr_image(root / "dev/disk/by-partlabel/USR-B", tmp_path, "4459.2.2", ("6.6.100-flatcar",), fs=fs)
    pending = fr.host_targets(str(root))["pending"]
    assert (pending.os_version, pending.kernel_release, pending.kernel_source) == (
        "4459.2.2", "6.6.100-flatcar", "usr-partition")
    assert pending.usr_partition.endswith("USR-B") and pending.note is None


@pytest.mark.skipif(not HAVE_BTRFS, reason="btrfs-progs is not installed")
def test_pending_kernel_is_unknown_when_the_partition_disagrees(tmp_path: Path) -> None:
    root = flatcar_root(tmp_path)
    write(root, "proc/sys/kernel/osrelease", "6.6.95-flatcar\n")
    fake_update_engine(root, REAL_STATUS)  # says 4459.2.2
    write(root, "proc/cmdline", f"verity.usr=PARTUUID={fr.USR_A_UUID}\n")
    usr_image(root / "dev/disk/by-partlabel/USR-A", tmp_path, "4459.2.1", ("6.6.95-flatcar",))
    usr_image(root / "dev/disk/by-partlabel/USR-B", tmp_path, "4459.2.0", ("6.6.90-flatcar",))
    pending = fr.host_targets(str(root))["pending"]
    assert pending.os_version == "4459.2.2" and pending.kernel_release is None
    assert pending.kernel_source == "unknown" and "holds 4459.2.0, update_engine says 4459.2.2" in pending.note
