"""The pull units (roles/modulus/tasks/units.yml): rendered by the role into a host root, checked with
``systemd-analyze verify``; the scripts they run (modulus-pull, modulus-update-watch,
modulus-bootstrap-python) on their own with ``sh``.

The watcher is run against the simulation kit's ``update_engine_client`` (the real ``-status``
format for each update state); ``systemctl`` is replaced by a recorder (MODULUS_SYSTEMCTL) because
no systemd runs here: tests/integration/test_pull_unit.py runs the same units under a booted systemd.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sim.kit import update_engine_client_script, update_engine_status_text

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "roles" / "modulus" / "files"
UNITS = ["modulus@.service", "modulus-pending@.service", "modulus-update-watch.service",
         "modulus-update-watch.timer", "modulus-update-dbus.service"]
PLAYBOOK = """- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: modulus.kmods.modulus
        tasks_from: units
"""


def run_units(tmp_path: Path, extra: dict) -> subprocess.CompletedProcess:
    pb = tmp_path / "units.yml"
    pb.write_text(PLAYBOOK)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / ".ansible" / "tmp"))
    args = {"ansible_python_interpreter": sys.executable, **extra}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(pb),
                           "-e", json.dumps(args)], capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("units")
    root = tmp / "root"
    root.mkdir()
    proc = run_units(tmp, {
        "modulus_host_root": str(root),
        "modulus_drivers": [{"name": "nvidia", "version": "535.104.05"}, {"name": "modulus-hello", "version": "1.0.0"}],
        "modulus_store": "s3://fleet/flatcar",
        "modulus_pull_repo": "https://git.example.com/ops/modulus.git?ref=a b&x=$y",
        "modulus_store_options": {"endpoint_url": "http://127.0.0.1:9000"},
        "modulus_pull_env": {"AWS_ACCESS_KEY_ID": "AKIA\"$x`y\\z", "AWS_SECRET_ACCESS_KEY": "s e c"},
        "modulus_pull_extra_args": ["-v", "--tags", "a b"],
        "modulus_pip_packages": ["ansible-core==2.19.14", "boto3"],
        "modulus_units_watch_interval": "90s",
        "modulus_shutdown_build_timeout": 600,
    })
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return root


def test_the_role_installs_units_scripts_and_settings(rendered: Path) -> None:
    units = rendered / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir() if p.is_file()) == sorted(UNITS)
    for name in ("modulus-bootstrap-python", "modulus-pull", "modulus-update-watch"):
        path = rendered / "opt/modulus/bin" / name
        assert path.read_bytes() == (FILES / (name + ".sh" if name == "modulus-bootstrap-python" else name)).read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((rendered / "etc/modulus/env").stat().st_mode) == 0o600
    assert stat.S_IMODE((rendered / "etc/modulus/vars.yml").stat().st_mode) == 0o600
    assert stat.S_IMODE((rendered / "etc/modulus/pull.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((rendered / "etc/modulus/pull.args").stat().st_mode) == 0o600
    svc = (units / "modulus@.service").read_text()
    for line in ("Type=oneshot", "RemainAfterExit=yes", "EnvironmentFile=-/etc/modulus/env",
                 "After=network-online.target update-engine.service systemd-sysext.service",
                 "ExecStartPre=/opt/modulus/bin/modulus-bootstrap-python",
                 "ExecStart=/opt/modulus/bin/modulus-pull run %i", "ExecStop=/opt/modulus/bin/modulus-pull shutdown %i",
                 "TimeoutStopSec=660", "StandardOutput=journal", "WantedBy=multi-user.target"):
        assert line in svc.splitlines(), line
    timer = (units / "modulus-update-watch.timer").read_text()
    assert "OnUnitActiveSec=90s" in timer.splitlines() and "OnBootSec=90s" in timer.splitlines()
    assert (rendered / "etc/modulus/pull.args").read_text().splitlines() == ["-v", "--tags", "a b"]
    import yaml
    pull_vars = yaml.safe_load((rendered / "etc/modulus/vars.yml").read_text())
    assert pull_vars["modulus_store"] == "s3://fleet/flatcar"
    assert pull_vars["modulus_store_options"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert [d["name"] for d in pull_vars["modulus_drivers"]] == ["nvidia", "modulus-hello"]
    assert not any(k.startswith(("modulus_pull_", "modulus_units_", "modulus_python_", "modulus_host_root"))
                   for k in pull_vars)
    # the host root is not /: the driver units are enabled in it (systemctl --root), nothing is started
    assert sorted(p.name for p in (rendered / "etc/systemd/system/multi-user.target.wants").iterdir()) == [
        "modulus@modulus-hello-1.0.0.service", "modulus@nvidia-535.104.05.service"]


def _sourced(path: Path, names: list[str]) -> dict[str, str]:
    script = f". '{path}'\n" + "".join(f'printf "%s\\0" "${n}"\n' for n in names)
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout.decode()
    return dict(zip(names, out.split("\0")[:-1]))


def test_env_files_keep_every_character(rendered: Path) -> None:
    env = _sourced(rendered / "etc/modulus/env", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    assert env == {"AWS_ACCESS_KEY_ID": "AKIA\"$x`y\\z", "AWS_SECRET_ACCESS_KEY": "s e c"}
    pull = _sourced(rendered / "etc/modulus/pull.env", ["MODULUS_PULL_REPO", "MODULUS_PIP_PACKAGES", "MODULUS_PYTHON_MODE"])
    assert pull == {"MODULUS_PULL_REPO": "https://git.example.com/ops/modulus.git?ref=a b&x=$y",
                    "MODULUS_PIP_PACKAGES": "ansible-core==2.19.14 boto3", "MODULUS_PYTHON_MODE": "auto"}


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze (Debian package systemd) is needed")
def test_rendered_units_pass_systemd_analyze_verify(rendered: Path, tmp_path: Path) -> None:
    # verify resolves every Exec path: point them at the scripts the role installed in the host root
    for name in UNITS:
        text = (rendered / "etc/systemd/system" / name).read_text()
        text = text.replace("/opt/modulus/bin/", f"{rendered}/opt/modulus/bin/").replace("/etc/modulus/", f"{rendered}/etc/modulus/")
        (tmp_path / name).write_text(text)
    shutil.copy(tmp_path / "modulus@.service", tmp_path / "modulus@nvidia-535.104.05.service")
    shutil.copy(tmp_path / "modulus-pending@.service", tmp_path / "modulus-pending@nvidia-535.104.05.service")
    files = sorted(str(p) for p in tmp_path.iterdir() if "@." not in p.name)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", *files],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
    # and verify does catch a broken unit (the check can fail)
    broken = tmp_path / "modulus@nvidia-535.104.05.service"
    broken.write_text(broken.read_text().replace("Type=oneshot", "Type=oneshto"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(broken)],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert "Failed to parse service type" in proc.stdout + proc.stderr


def test_the_default_mode_installs_the_collection_it_runs(tmp_path: Path) -> None:
    """modulus_pull_repo "": the tarball built from this collection is copied, checked and unpacked
    below the host root, and /opt/modulus/collections points at it; a second run copies nothing."""
    root = tmp_path / "root"
    root.mkdir()
    args = {"modulus_host_root": str(root), "modulus_drivers": [{"name": "nvidia", "version": "535.104.05"}]}
    proc = run_units(tmp_path, args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    link = root / "opt/modulus/collections"
    assert link.is_symlink() and os.readlink(link).startswith("collection.d/")
    installed = link / "ansible_collections/modulus/kmods"
    manifest = json.loads((installed / "MANIFEST.json").read_text())
    assert (manifest["collection_info"]["namespace"], manifest["collection_info"]["name"]) == ("modulus", "kmods")
    assert os.readlink(link) == "collection.d/" + manifest["file_manifest_file"]["chksum_sha256"]
    assert (installed / "playbooks/pull.yml").read_bytes() == (REPO / "playbooks/pull.yml").read_bytes()
    assert (installed / "roles/modulus/files/modulus-pull").read_bytes() == (FILES / "modulus-pull").read_bytes()
    assert sorted(p.name for p in (root / "opt/modulus/collection.d").iterdir()) == [os.path.basename(os.readlink(link))]
    again = run_units(tmp_path, args)
    assert again.returncode == 0 and "changed=0" in again.stdout.split("PLAY RECAP")[-1], again.stdout[-4000:]
    # a tarball named by the operator with another checksum is refused before anything is copied
    bad = run_units(tmp_path, {**args, "modulus_pull_collection": str(installed / "MANIFEST.json"),
                               "modulus_pull_collection_sha256": "0" * 64})
    assert bad.returncode != 0 and "is not a tarball of modulus.kmods" in bad.stdout, bad.stdout[-3000:]


def test_a_watch_interval_over_5_minutes_is_refused(tmp_path: Path) -> None:
    proc = run_units(tmp_path, {"modulus_host_root": str(tmp_path), "modulus_units_watch_interval": "10min",
                                "modulus_drivers": [{"name": "nvidia", "version": "535.104.05"}]})
    assert proc.returncode != 0 and "modulus_units_watch_interval" in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "etc/systemd/system").exists()


@pytest.mark.parametrize(("instance", "expected"), [
    ("nvidia-535.104.05", "nvidia 535.104.05"),
    ("modulus-hello-1.0.0", "modulus-hello 1.0.0"),
    ("nvidia-open-570.86.10", "nvidia-open 570.86.10"),
    ("a-1-2", "a 1-2"),
    ("foo-2bar:1.0", "foo-2bar 1.0"),
])
def test_instance_names(instance: str, expected: str) -> None:
    out = subprocess.run(["sh", str(FILES / "modulus-pull"), "parse", instance], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("instance", ["nvidia", "nvidia-", "-1.0", "x/y-1.0", "nvidia-535;rm"])
def test_bad_instance_names_are_refused(instance: str) -> None:
    out = subprocess.run(["sh", str(FILES / "modulus-pull"), "parse", instance], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "instance name" in out.stderr, out.stderr


def _watch_env(tmp_path: Path, update: str) -> dict[str, str]:
    uec = tmp_path / "update_engine_client"
    uec.write_text(update_engine_client_script(update_engine_status_text(update, "9001.2.0", 486539264, 1700000000),
                                               tmp_path / "calls"))
    uec.chmod(0o755)
    rec = tmp_path / "systemctl"
    rec.write_text(f"#!/bin/sh\necho \"$*\" >> '{tmp_path}/systemctl.calls'\n")
    rec.chmod(0o755)
    units = tmp_path / "units"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for inst in ("nvidia-535.104.05", "modulus-hello-1.0.0"):
        link = wants / f"modulus@{inst}.service"
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/modulus@.service")
    return dict(os.environ, MODULUS_UPDATE_ENGINE_CLIENT=str(uec), MODULUS_SYSTEMCTL=str(rec),
                MODULUS_STATE_DIR=str(tmp_path / "state"), MODULUS_UNITS_DIR=str(units))


def _starts(tmp_path: Path) -> list[str]:
    calls = tmp_path / "systemctl.calls"
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return sorted(line for line in lines if line.startswith("start"))


@pytest.mark.parametrize("update", ["idle", "downloading"])
def test_the_watcher_does_nothing_without_an_installed_update(tmp_path: Path, update: str) -> None:
    subprocess.run(["sh", str(FILES / "modulus-update-watch"), "check"], env=_watch_env(tmp_path, update), check=True)
    assert _starts(tmp_path) == []


@pytest.mark.parametrize(("update", "version"), [("need_reboot", "9001.2.0"), ("need_reboot_zero", "0.0.0")])
def test_the_watcher_starts_each_pending_run_once(tmp_path: Path, update: str, version: str) -> None:
    env = _watch_env(tmp_path, update)
    subprocess.run(["sh", str(FILES / "modulus-update-watch"), "check"], env=env, check=True)
    assert _starts(tmp_path) == ["start --no-block modulus-pending@modulus-hello-1.0.0.service",
                                 "start --no-block modulus-pending@nvidia-535.104.05.service"]
    # a pending run that finished for this boot and this version is not started again
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "nvidia-535.104.05.pending").write_text(f"{boot} {version}\n")
    subprocess.run(["sh", str(FILES / "modulus-update-watch"), "check"], env=env, check=True)
    assert _starts(tmp_path) == ["start --no-block modulus-pending@modulus-hello-1.0.0.service"]


BOOTSTRAP = FILES / "modulus-bootstrap-python.sh"


def _bootstrap(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(BOOTSTRAP), f"MODULUS_PYTHON_PREFIX={tmp_path}/python", *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PATH="/usr/bin:/bin"), check=False)


def test_bootstrap_mode_none_leaves_python_alone(tmp_path: Path) -> None:
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=none")
    assert res.returncode == 0 and res.stdout.strip() == "MODULUS_BOOTSTRAP_CHANGED=0"
    assert not (tmp_path / "python").exists()


def test_bootstrap_refuses_bad_settings(tmp_path: Path) -> None:
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=conda")
    assert res.returncode != 0 and "must be auto, portable or none" in res.stderr
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=portable", "MODULUS_PYTHON_URL=file:///nonexistent.tar.gz")
    assert res.returncode != 0 and "MODULUS_PYTHON_SHA256 is empty" in res.stderr
    res = _bootstrap(tmp_path, "--mode=portable")
    assert res.returncode == 2 and "unknown argument" in res.stderr


def test_bootstrap_refuses_a_tarball_with_another_checksum(tmp_path: Path) -> None:
    tarball = tmp_path / "python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("python/bin/python3")
        data = b"#!/bin/sh\necho planted\n"
        info.size, info.mode = len(data), 0o755
        import io
        tar.addfile(info, io.BytesIO(data))
    wrong = hashlib.sha256(b"something else").hexdigest()
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=portable", f"MODULUS_PYTHON_URL=file://{tarball}",
                     f"MODULUS_PYTHON_SHA256={wrong}")
    assert res.returncode != 0 and "refused" in res.stderr and wrong in res.stderr, res.stderr
    # nothing was unpacked or left behind but the (empty) prefix and its lock
    assert sorted(p.name for p in (tmp_path / "python").iterdir()) == [".bootstrap.lock"]


def _fake_tarball(tmp_path: Path) -> Path:
    tarball = tmp_path / "python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("python/bin/python3")
        data = b"#!/bin/sh\necho planted; exit 3\n"
        info.size, info.mode = len(data), 0o755
        import io
        tar.addfile(info, io.BytesIO(data))
    return tarball


def _root_with_python(tmp_path: Path, os_id: str, venv_works: bool) -> Path:
    """A root whose os-release has ID=os_id and whose /usr/bin/python3 runs this machine's Python,
    except that, when venv_works is false, ``-m venv`` fails the way it does on a distribution
    that split venv/ensurepip out (the system Python the bootstrap must not depend on)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(f"ID={os_id}\nVERSION_ID=9001.1.0\n")
    (root / "usr/bin").mkdir(parents=True)
    py = root / "usr/bin/python3"
    fail = "" if venv_works else 'if [ "$1" = -m ] && [ "$2" = venv ]; then echo "ensurepip is not available" >&2; exit 1; fi\n'
    py.write_text(f"#!/bin/sh\n{fail}exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    return root


def test_bootstrap_refuses_the_removed_sysext_mode_with_its_reason(tmp_path: Path) -> None:
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=sysext")
    assert res.returncode != 0 and "MODULUS_PYTHON_MODE=sysext is no longer offered" in res.stderr, res.stderr
    assert "enabled-sysext" not in res.stdout and "every later OS update" in res.stderr
    assert not (tmp_path / "python").exists()


def test_bootstrap_on_flatcar_never_uses_a_system_python(tmp_path: Path) -> None:
    """auto on Flatcar: the pinned portable Python only (here its checksum differs: refused), even
    when a python3 that works is on the host (a user's toolbox or sysext)."""
    root = _root_with_python(tmp_path, "flatcar", venv_works=True)
    wrong = hashlib.sha256(b"another file").hexdigest()
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=auto", f"MODULUS_BOOTSTRAP_ROOT={root}",
                     f"MODULUS_PYTHON_URL=file://{_fake_tarball(tmp_path)}", f"MODULUS_PYTHON_SHA256={wrong}")
    assert res.returncode != 0 and "refused" in res.stderr, res.stderr
    assert "from the system" not in res.stderr
    assert not (tmp_path / "python/venv").exists()


def test_bootstrap_auto_falls_back_to_the_portable_python_when_the_system_venv_fails(tmp_path: Path) -> None:
    root = _root_with_python(tmp_path, "debian", venv_works=False)
    tarball = _fake_tarball(tmp_path)
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=auto", f"MODULUS_BOOTSTRAP_ROOT={root}",
                     f"MODULUS_PYTHON_URL=file://{tarball}", f"MODULUS_PYTHON_SHA256={hashlib.sha256(tarball.read_bytes()).hexdigest()}")
    # it tried the system Python, fell back, and went on with the portable one (whose planted
    # python3 does not run: the run stops there, with nothing of the failed venv left)
    assert f"Python from the system: {root}/usr/bin/python3" in res.stderr, res.stderr
    assert "falling back to the portable Python" in res.stderr, res.stderr
    assert "does not run on this host" in res.stderr and res.returncode != 0, res.stderr
    assert not (tmp_path / "python/venv").exists()
    assert not list((tmp_path / "python").glob(".bootstrap.*[!k]"))


def test_bootstrap_check_mode_says_what_it_would_do_and_writes_nothing(tmp_path: Path) -> None:
    root = _root_with_python(tmp_path, "flatcar", venv_works=True)
    res = _bootstrap(tmp_path, "MODULUS_PYTHON_MODE=auto", f"MODULUS_BOOTSTRAP_ROOT={root}", "MODULUS_BOOTSTRAP_CHECK=1",
                     "MODULUS_PYTHON_URL=https://python.example/p.tar.gz", f"MODULUS_PYTHON_SHA256={'cd' * 32}",
                     "MODULUS_PIP_FIND_LINKS=/srv/wheels")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"MODULUS_BOOTSTRAP_WOULD=install the portable Python https://python.example/p.tar.gz (SHA-256 {'cd' * 32}) "
        f"into {tmp_path}/python/dist/{'cd' * 32}; virtual environment {tmp_path}/python/venv with ansible-core==2.19.14 "
        "boto3 from /srv/wheels", "MODULUS_BOOTSTRAP_CHANGED=1"]
    assert not (tmp_path / "python").exists()


def test_scripts_are_posix_sh() -> None:
    for name in ("modulus-bootstrap-python.sh", "modulus-pull", "modulus-update-watch"):
        subprocess.run(["sh", "-n", str(FILES / name)], check=True)
        if shutil.which("shellcheck"):
            proc = subprocess.run(["shellcheck", "-s", "sh", str(FILES / name)], capture_output=True, text=True, check=False)
            assert proc.returncode == 0, proc.stdout


def _git(repo: Path, *args: str, env: dict | None = None) -> str:
    base = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@modulus.invalid", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@modulus.invalid", **(env or {}))
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=base).stdout.strip()


def _gpg_key(home: Path) -> tuple[str, str]:
    """A throwaway signing key in its own GNUPGHOME: (fingerprint, armored public key)."""
    home.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "modulus tests <t@modulus.invalid>",
                    "ed25519", "sign", "never"], capture_output=True, check=True, env=env)
    out = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], capture_output=True, text=True,
                         check=True, env=env).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    pub = subprocess.run(["gpg", "--batch", "--armor", "--export", fpr], capture_output=True, text=True,
                         check=True, env=env).stdout
    return fpr, pub


@pytest.mark.skipif(not shutil.which("gpg") or not shutil.which("git"), reason="gpg and git are needed")
def test_git_mode_runs_the_pinned_commit_and_only_signed_commits(tmp_path: Path) -> None:
    """modulus-pull in git mode with this machine's ansible-pull: a pinned commit is what runs, whatever
    the branch head; with verify keys, a head signed by one of them runs, one signed by another key does not."""
    signer, signer_pub = _gpg_key(tmp_path / "gpg-signer")
    _other, other_pub = _gpg_key(tmp_path / "gpg-other")
    repo = tmp_path / "repo"
    (repo / "playbooks").mkdir(parents=True)
    (repo / "playbooks/pull.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.copy:\n        src: ../marker\n        dest: '{{ out }}'\n        mode: '0644'\n")
    _git(repo, "init", "-q", "-b", "main")
    (repo / "marker").write_text("one\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "one")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "marker").write_text("two\n")
    _git(repo, "commit", "-q", "-a", f"-S{signer}", "-m", "two", env={"GNUPGHOME": str(tmp_path / "gpg-signer")})
    prefix = tmp_path / "python"
    prefix.mkdir()
    (prefix / "venv").symlink_to(Path(sys.executable).parent.parent)
    out = tmp_path / "out"
    (tmp_path / "pull.args").write_text(f"-e\nout={out}\n")
    env = dict(os.environ, MODULUS_PULL_REPO=f"file://{repo}", MODULUS_PULL_BRANCH="main", MODULUS_PULL_DIR=str(tmp_path / "pull"),
               MODULUS_PULL_ARGS_FILE=str(tmp_path / "pull.args"), MODULUS_VARS_FILE=str(tmp_path / "none.yml"),
               MODULUS_PYTHON_PREFIX=str(prefix), MODULUS_STATE_DIR=str(tmp_path / "state"), MODULUS_LOCK=str(tmp_path / "lock"),
               ANSIBLE_HOME=str(tmp_path / "ansible"))

    def pull(**more: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(FILES / "modulus-pull"), "run", "hello-1.0"], capture_output=True, text=True,
                              env=dict(env, **more), timeout=600, check=False)

    res = pull(MODULUS_PULL_COMMIT=first)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.read_text() == "one\n" and f"({first})" in res.stderr
    out.unlink()
    keys = tmp_path / "keys.asc"
    keys.write_text(signer_pub)
    res = pull(MODULUS_PULL_VERIFY_KEYS=str(keys))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.read_text() == "two\n" and "signed by a key of" in res.stderr
    out.unlink()
    keys.write_text(other_pub)
    res = pull(MODULUS_PULL_VERIFY_KEYS=str(keys))
    assert res.returncode != 0 and not out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    # and the first, unsigned commit is refused even by the right key
    keys.write_text(signer_pub)
    res = pull(MODULUS_PULL_VERIFY_KEYS=str(keys), MODULUS_PULL_COMMIT=first)
    assert res.returncode != 0 and not out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
