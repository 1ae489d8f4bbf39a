"""Running in an image, the parts that need no root: input checks, the nspawn command line, the
method choice, and killing the whole process group on timeout (real processes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import container as ct


def test_nspawn_command_line() -> None:
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is not installed")
    args = ct.nspawn_args(["-D", "/m"], ["make", "-C", "/src"], [("/h/src", "/src")], [("/h/out", "/out")],
                          {"B": "2", "A": "1"}, "/src")
    assert args[1:6] == ["--keep-unit", "--register=no", "--as-pid2", "--quiet", "--console=pipe"]
    assert args[args.index("--") + 1:] == ["make", "-C", "/src"]
    assert "--bind-ro=/h/src:/src" in args and "--bind=/h/out:/out" in args
    assert args.index("--setenv=A=1") < args.index("--setenv=B=2") and "--chdir=/src" in args


def test_run_in_image_validates_before_touching_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="command must be a non-empty list"):
        ct.run_in_image(str(tmp_path / "x"), [])
    with pytest.raises(ValueError, match="binds_rw entry"):
        ct.run_in_image(str(tmp_path / "x"), ["true"], binds_rw=[(str(tmp_path / "missing"), "/out")])
    with pytest.raises(ValueError, match="paths must not contain ':'"):
        ct.run_in_image(str(tmp_path / "x"), ["true"], binds_ro=[(str(tmp_path), "/a:b")])
    with pytest.raises(ValueError, match="env key"):
        ct.run_in_image(str(tmp_path / "x"), ["true"], env={"BAD-NAME": "1"})
    with pytest.raises(ValueError, match="method='vm'"):
        ct.run_in_image(str(tmp_path / "x"), ["true"], method="vm")
    with pytest.raises(ValueError, match="workdir="):
        ct.run_in_image(str(tmp_path / "x"), ["true"], workdir="src")
    with pytest.raises(ct.ContainerError, match="does not exist"):
        ct.run_in_image(str(tmp_path / "x"), ["true"], method="chroot")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("key", ["A\n", "PATH\nX", "1A", ""])
def test_env_names_must_match_whole(key: str) -> None:
    with pytest.raises(ValueError, match="env key"):
        ct._check_env({key: "v"})


def test_choose_method() -> None:
    assert ct.choose_method("chroot") == "chroot"
    auto = ct.choose_method("auto")
    if not shutil.which("systemd-nspawn"):
        assert auto == "chroot"
    elif os.path.isdir("/run/systemd/system"):
        assert auto == "image"
    else:
        assert auto == "overlay"


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen(["/bin/sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], start_new_session=True)
    while not pid_file.exists() or not pid_file.read_text().strip():
        time.sleep(0.05)
    child = int(pid_file.read_text())
    logs: list[str] = []
    rc, timed_out = ct._wait(proc, 0.5, logs.append)
    # the shell (waiting for its 300 s sleep) was ended by the first signal to its group, SIGTERM
    assert timed_out and rc == -signal.SIGTERM
    assert any("timed out" in line for line in logs)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)  # the background child of the timed-out command went with its group


def test_a_quick_command_keeps_its_rc() -> None:
    proc = subprocess.Popen(["/bin/sh", "-c", "exit 7"], start_new_session=True)
    assert ct._wait(proc, 30, lambda _m: None) == (7, False)


def test_workspaces_name_the_pid_and_dead_ones_are_swept(tmp_path: Path) -> None:
    ws = ct.make_workspace(str(tmp_path))
    assert os.path.dirname(ws) == str(tmp_path)
    assert os.path.basename(ws).startswith(f".modulus-devc.run-{os.getpid()}-")
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / f".modulus-devc.run-{proc.pid}-abcd"
    (dead / "rw" / "upper").mkdir(parents=True)
    assert ct.sweep_workspaces(str(tmp_path)) == [str(dead)]
    assert os.path.isdir(ws) and not dead.exists()


def test_a_container_is_recognised_by_its_root_mount_only() -> None:
    ws = b"/var/cache/modulus/devcontainer/.modulus-devc.run-42-abcd"
    container = (b"1 0 0:50 / / rw - overlay modulus-devc rw,lowerdir=" + ws + b"/lower,upperdir=" + ws
                 + b"/rw/upper\n2 1 0:5 / /proc rw - proc proc rw\n")
    daemon = (b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
              b"7 1 0:50 / " + ws + b"/merged rw - overlay modulus-devc rw,lowerdir=" + ws + b"/lower\n")
    assert ct._root_mount_names(container, ws) is True
    assert ct._root_mount_names(daemon, ws) is False
    assert ct._root_mount_names(container, ws + b"x") is False
