"""Flatcar's nvidia.service against modulus (tests/sim/nvidia_service.py: the kit's stand-in, with
Flatcar's own unit and setup-nvidia logic).

- On a simulated host root (nvidia.service enabled as in every Flatcar image) the role, given an
  NVIDIA driver, masks nvidia.service, removes setup-nvidia's /etc/ld.so.conf.d/nvidia.conf and says
  so in its summary; check mode reports it and changes nothing; a second run changes nothing.
- An official ``nvidia-drivers-535`` entry in /etc/flatcar/enabled-sysext.conf makes the role fail,
  naming the file and the entry; with ``modulus_nvidia_official: defer`` the role leaves the driver
  to it (no NVIDIA build, nvidia.service untouched).
- In a booted container (systemd-nspawn -b) with a simulated GPU, setup-nvidia runs at boot, "builds"
  and "loads" its own driver (its log says so), and on the next boot skips the build but loads again;
  after the role, a boot runs nothing of it and nothing loads a second driver.
- On the host itself (host root ``/``, inside that booted container, with a portable Python) the
  module's code masks the service with ``systemctl``, removes an ``/etc`` wants link with
  ``systemctl disable`` and runs ``ldconfig``.

The NVIDIA build is a fake one (tests/sim/kmod_archive_fixtures.py) put in the host's archive:
nothing compiles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sim import nvidia_service as nvsvc
from sim.kit import Kit
from sim.kmod_archive_fixtures import IDENT, make_build
from sim.pullhost import PullHost, portable_python, pull_root

REPO = Path(__file__).resolve().parents[2]
NVIDIA = {"name": "nvidia", "version": IDENT["driver_version"]}
MASK = "etc/systemd/system/nvidia.service"
LD_CONF = "etc/ld.so.conf.d/nvidia.conf"

pytestmark = pytest.mark.slow


def seed(root: Path, kit: Kit) -> None:
    cur = kit.releases["current"]
    ident = dict(IDENT, os_version=cur.version, kernel_release=cur.kernel)
    make_build(root / "opt/modulus/archive/nvidia" / ident["driver_version"] / cur.kernel, ident)


def site(work: Path, root: Path, *extra: str, **host_vars: object) -> subprocess.CompletedProcess:
    """``ansible-playbook site.yml -l gpu_nodes`` on one simulated host (no store: nothing to share)."""
    inv = work / "inventory.yml"
    hostvars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                "modulus_host_root": str(root), "modulus_drivers": [NVIDIA], "modulus_load": False,
                "modulus_python_mode": "none", "modulus_sysext_format": "directory", **host_vars}
    inv.write_text(yaml.safe_dump({"gpu_nodes": {"hosts": {"host1": hostvars}}}))
    env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_NOCOLOR="1")
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "collections"))
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inv), "site.yml",
                           "-l", "gpu_nodes", *extra], cwd=str(REPO), env=env, capture_output=True, text=True,
                          check=False, timeout=900)


def recap_changed(out: str) -> int:
    m = re.search(r"host1\s*:\s*ok=\d+\s+changed=(\d+)", out)
    assert m, out[-3000:]
    return int(m.group(1))


def task_changed(out: str, name: str) -> bool:
    block = out.split(f"TASK [modulus.kmods.modulus : {name}]", 1)[1].split("TASK [", 1)[0]
    return "changed: [host1]" in block


OWNER_TASK = "Make modulus the one owner of the host's NVIDIA driver (Flatcar's nvidia.service)"


def test_the_role_masks_nvidia_service_once(kit: Kit, tmp_path: Path) -> None:
    root = kit.host_root(tmp_path / "layout", gpu=True)
    assert (root / nvsvc.WANTS).is_symlink() and (root / nvsvc.UNIT).is_file()
    seed(root, kit)
    # what setup-nvidia leaves after a boot (its own build and its library path)
    (root / "opt/nvidia/535.274.02" / kit.releases["current"].kernel).mkdir(parents=True)
    (root / LD_CONF).parent.mkdir(parents=True)
    (root / LD_CONF).write_text("/opt/nvidia/current/usr/lib64\n")

    check = site(tmp_path, root, "--check")
    assert check.returncode == 0, check.stdout[-5000:]
    assert task_changed(check.stdout, OWNER_TASK)
    assert "Flatcar's nvidia.service: would be masked" in check.stdout, check.stdout[-3000:]
    assert not os.path.lexists(root / MASK) and (root / LD_CONF).exists()

    first = site(tmp_path, root)
    assert first.returncode == 0, first.stdout[-5000:]
    assert task_changed(first.stdout, OWNER_TASK)
    assert "Flatcar's nvidia.service: masked (only modulus loads the NVIDIA driver)" in first.stdout
    assert f"removed /{LD_CONF}" in first.stdout
    assert os.readlink(root / MASK) == "/dev/null"
    assert not (root / LD_CONF).exists()
    assert (root / nvsvc.WANTS).is_symlink()  # Flatcar's link in /usr stays; the mask wins over it
    record = json.loads((root / "var/lib/modulus/last-run.json").read_text())
    assert record["nvidia_service"]["masked"] and record["nvidia_service"]["changed"], record
    assert [b["source"] for b in record["builds"]] == ["local"], record

    second = site(tmp_path, root)
    assert second.returncode == 0, second.stdout[-5000:]
    assert recap_changed(second.stdout) == 0, second.stdout[-5000:]
    assert "Flatcar's nvidia.service: masked (only modulus loads the NVIDIA driver); unchanged" in second.stdout


def test_an_official_extension_is_refused_or_deferred_to(kit: Kit, tmp_path: Path) -> None:
    root = kit.host_root(tmp_path / "layout", gpu=True)
    seed(root, kit)
    conf = root / "etc/flatcar/enabled-sysext.conf"
    conf.write_text("# GPU driver from Flatcar\nnvidia-drivers-535\n")
    refused = site(tmp_path, root)
    assert refused.returncode != 0
    assert '/etc/flatcar/enabled-sysext.conf line 2 enables \\"nvidia-drivers-535\\"' in refused.stdout \
        or '/etc/flatcar/enabled-sysext.conf line 2 enables "nvidia-drivers-535"' in refused.stdout, refused.stdout[-3000:]
    assert "modulus_nvidia_official: defer" in refused.stdout
    assert not os.path.lexists(root / MASK)
    assert not (root / "var/lib/extensions").exists() or not list((root / "var/lib/extensions").iterdir())

    deferred = site(tmp_path, root, modulus_nvidia_official="defer")
    assert deferred.returncode == 0, deferred.stdout[-5000:]
    assert "Flatcar's nvidia.service: left alone, the NVIDIA driver is Flatcar's official extension's " \
           "(nvidia-drivers-535)" in deferred.stdout, deferred.stdout[-3000:]
    assert not os.path.lexists(root / MASK)
    record = json.loads((root / "var/lib/modulus/last-run.json").read_text())
    assert record["builds"] == [] and record["nvidia_service"]["deferred"], record
    assert not (root / "var/lib/extensions").exists() or not list((root / "var/lib/extensions").iterdir())

    # "-nvidia-drivers-535" in the same file disables it again: modulus owns the driver
    conf.write_text("nvidia-drivers-535\n-nvidia-drivers-535\n")
    owned = site(tmp_path, root, modulus_nvidia_official="defer")
    assert owned.returncode == 0, owned.stdout[-5000:]
    assert os.readlink(root / MASK) == "/dev/null"


def _boot_log(host: PullHost) -> tuple[list[str], str]:
    host.boot()
    try:
        show = host.sh("systemctl show -p LoadState -p ActiveState -p Result nvidia.service; "
                       "echo; systemd-sysext status; echo; journalctl -b -u nvidia.service --no-pager -o cat | tail -n 40; "
                       "echo; journalctl -b -u modulus-load-nvidia.service --no-pager -o cat | tail -n 20",
                       check=False).stdout
    finally:
        host.poweroff()
    return nvsvc.log_lines(host.merged), show


def test_booted_host_before_and_after_the_role(kit: Kit, tmp_path: Path) -> None:
    cur = kit.releases["current"]
    pair = f"/opt/nvidia/{nvsvc.DRIVER_VERSION}/{cur.kernel}"
    video = f"/opt/nvidia/current/usr/lib/modules/{cur.kernel}/video"
    with PullHost(pull_root(), tmp_path / "host", kit) as host:
        host.dress()
        m = host.merged

        # boot 0, no GPU: the service runs and does nothing
        log0, show0 = _boot_log(host)
        assert log0 == ["setup-nvidia start", "setup-nvidia exit 0"], log0
        assert "Result=success" in show0 and not (m / "opt/nvidia").exists(), show0
        (m / nvsvc.LOG).unlink()
        nvsvc.simulate_gpu(m)

        # boot 1: Flatcar's service "builds" its own driver and "loads" it
        log1, show1 = _boot_log(host)
        assert "ActiveState=active" in show1 and "Result=success" in show1, show1 + "\n".join(log1)
        assert log1[0] == "setup-nvidia start" and log1[-1] == "setup-nvidia exit 0", log1
        assert any(f"/tesla//{nvsvc.DRIVER_VERSION}/NVIDIA-Linux-x86_64-{nvsvc.DRIVER_VERSION}.run" in line
                   for line in log1), log1
        assert any(line.startswith("build systemd-nspawn") for line in log1), log1
        for mod in ("nvidia", "nvidia-modeset", "nvidia-uvm"):
            assert f"insmod {video}/{mod}.ko" in log1, log1
        assert (m / pair.lstrip("/") / "usr/lib/extension-release.d/extension-release.nvidia-driver").is_file()
        assert (m / LD_CONF).read_text() == "/opt/nvidia/current/usr/lib64\n"

        # boot 2: the build is there, so it is skipped, but the driver is loaded again
        log2, _show2 = _boot_log(host)
        new2 = log2[len(log1):]
        assert new2[0] == "setup-nvidia start" and new2[-1] == "setup-nvidia exit 0", new2
        assert not any(line.startswith(("download", "build")) for line in new2), new2
        assert f"insmod {video}/nvidia.ko" in new2, new2

        # the role, on the container's root while it is powered off (the files a simulated root has
        # below /proc and /dev are hidden by the real ones at boot)
        for rel, src in (("proc/sys/kernel/osrelease", "etc/modulus-sim/osrelease"),
                         ("proc/cmdline", "etc/modulus-sim/cmdline")):
            (m / rel).parent.mkdir(parents=True, exist_ok=True)
            (m / rel).write_bytes((m / src).read_bytes())
        if not (m / "dev/disk").exists():
            (m / "dev/disk").symlink_to("../etc/modulus-sim/disk")
        seed(m, kit)
        run = site(tmp_path, m)
        assert run.returncode == 0, run.stdout[-5000:]
        assert "Flatcar's nvidia.service: masked" in run.stdout, run.stdout[-3000:]
        assert os.readlink(m / MASK) == "/dev/null" and not (m / LD_CONF).exists()

        # boot 3: nothing of Flatcar's service runs; modulus's build is the one in place
        log3, show3 = _boot_log(host)
        assert log3 == log2, log3[len(log2):]
        assert "LoadState=masked" in show3 and "ActiveState=inactive" in show3, show3
        assert f"modulus-nvidia-{cur.version}" in show3, show3
        # modulus's own boot loader ran and loaded nothing: in the container it sees the machine's kernel
        # (uname -r) and sysfs, for which it has no build and no GPU
        assert re.search(r"modulus-load: .*(nothing to load|not loading)", show3), show3
        assert "insmod" not in show3, show3
        assert not (m / LD_CONF).exists()
        print(f"\nsetup-nvidia stand-in: boot 1 {len(log1)} log lines, boot 2 {len(new2)}, after the role 0")


ENSURE = ("import json; from ansible_collections.modulus.kmods.plugins.module_utils._host import nvidia_service as ns; "
          "r = ns.ensure('/'); print(json.dumps(dict(r.as_dict(), warnings=r.warnings)))")


def test_on_the_host_itself_systemctl_masks(kit: Kit, tmp_path: Path) -> None:
    tarball, _sha = portable_python()
    binds = {"/opt/modulus-test/ansible_collections/modulus/kmods": REPO}
    with PullHost(pull_root(), tmp_path / "host", kit, binds=binds) as host:
        host.dress()
        m = host.merged
        nvsvc.simulate_gpu(m)
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(m / "opt")], check=True)
        # a link in /etc as an older release or an operator's "systemctl enable" leaves it
        wants = m / "etc/systemd/system/multi-user.target.wants/nvidia.service"
        wants.parent.mkdir(parents=True, exist_ok=True)
        wants.symlink_to("/usr/lib/systemd/system/nvidia.service")
        host.boot()
        try:
            assert any(line.startswith("insmod ") for line in nvsvc.log_lines(m))
            assert (m / LD_CONF).exists()
            py = "PYTHONPATH=/opt/modulus-test /opt/python/bin/python3 -c " + subprocess.list2cmdline([ENSURE])
            first = json.loads(host.sh(py).stdout)
            state = host.sh("systemctl is-enabled nvidia.service; systemctl show -p LoadState --value nvidia.service",
                            check=False).stdout.split()
            second = json.loads(host.sh(py).stdout)
        finally:
            host.poweroff()
        assert first["changed"] and first["masked"] and first["warnings"] == [], first
        assert first["removed"] == ["/etc/systemd/system/multi-user.target.wants/nvidia.service", "/" + LD_CONF], first
        assert first["ld_so_conf"]["ldconfig"] is True, first
        assert state == ["masked", "masked"], state
        assert os.readlink(m / MASK) == "/dev/null" and not os.path.lexists(wants) and not (m / LD_CONF).exists()
        assert not second["changed"] and second["actions"] == [], second
        before = nvsvc.log_lines(m)
        host.boot()
        try:
            shown = host.sh("systemctl show -p LoadState -p ActiveState nvidia.service").stdout
        finally:
            host.poweroff()
        assert "LoadState=masked" in shown and "ActiveState=inactive" in shown, shown
        assert nvsvc.log_lines(m) == before

