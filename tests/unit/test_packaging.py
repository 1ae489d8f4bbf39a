"""The collection as users get it: the artifact `ansible-galaxy collection build` makes, installed
with `ansible-galaxy collection install`, read by `ansible-doc`; and the changelog sources.

The repository root is the collection, so building it from a working tree also proves that
`build_ignore` in galaxy.yml keeps untracked development output (.venv/, build/...) out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Paths (relative to the collection root) users must never receive.
DEV_ONLY_DIRS = (".venv/", "build/", ".ci/", "benchmarks/", "scripts/", "tests/", "extensions/",
                 "changelogs/fragments/", ".pytest_cache/", ".ruff_cache/", ".git/")
DEV_ONLY_FILES = ("Makefile", "requirements-dev.txt", "pytest.ini", "ruff.toml", ".yamllint", ".ansible-lint",
                  ".gitignore", "changelogs/.plugin-cache.yaml")


def _tool(name: str) -> str:
    """An Ansible CLI next to the running interpreter (the project's venv), else on PATH."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is neither next to {sys.executable} nor on PATH")
    return found


def _modules() -> list[str]:
    return sorted(p.stem for p in (REPO / "plugins" / "modules").glob("*.py") if p.stem != "__init__")


def _run(cmd: list[str], env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, check=False)


def _clean_env(tmp: Path) -> dict[str, str]:
    """Ansible reads only what the test gives it: no PYTHONPATH or collection path from `make`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "PYTHONPATH"}
    env["ANSIBLE_LOCAL_TEMP"] = str(tmp / "ansible-tmp")
    env["ANSIBLE_COLLECTIONS_SCAN_SYS_PATH"] = "false"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("galaxy-build")
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    res = _run([_tool("ansible-galaxy"), "collection", "build", "--output-path", str(out), str(REPO)],
               env=_clean_env(out))
    assert res.returncode == 0, res.stdout + res.stderr
    tarball = out / f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    assert tarball.is_file(), (res.stdout, sorted(out.iterdir()))
    return tarball


@pytest.fixture(scope="module")
def members(artifact: Path) -> set[str]:
    with tarfile.open(artifact) as tar:
        return {m.name[2:] if m.name.startswith("./") else m.name for m in tar.getmembers()}


@pytest.fixture(scope="module")
def installed(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("galaxy-install")
    coll = root / "coll"
    env = _clean_env(root)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(coll)
    res = _run([_tool("ansible-galaxy"), "collection", "install", "--offline", str(artifact), "-p", str(coll)], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (coll / "ansible_collections" / "modulus" / "kmods" / "MANIFEST.json").is_file(), res.stdout
    return coll, env


def test_artifact_ships_what_users_need(members: set[str]) -> None:
    expected = {"MANIFEST.json", "FILES.json", "README.md", "LICENSE", "CHANGELOG.md", "meta/runtime.yml",
                "changelogs/changelog.yaml", "changelogs/config.yaml"}
    expected |= {f"plugins/modules/{m}.py" for m in _modules()}
    for folder in ("docs", "meta", "playbooks", "plugins", "roles"):
        expected |= {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "plugins/modules/kmod_build.py" in expected
    assert sorted(expected - members) == []


def test_artifact_leaves_out_development_files(members: set[str]) -> None:
    leaked = sorted(m for m in members
                    if m.startswith(DEV_ONLY_DIRS) or m.rstrip("/") in {d.rstrip("/") for d in DEV_ONLY_DIRS}
                    or m in DEV_ONLY_FILES or "__pycache__" in m.split("/") or m.endswith((".pyc", ".tar.gz")))
    assert leaked == []


def test_artifact_license(artifact: Path) -> None:
    with tarfile.open(artifact) as tar:
        manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
        shipped_license = tar.extractfile("LICENSE").read()  # type: ignore[union-attr]
    info = manifest["collection_info"]
    assert info["license"] == ["GPL-3.0-or-later"]
    assert shipped_license == (REPO / "LICENSE").read_bytes()
    text = shipped_license.decode()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice
    assert "https://github.com/BugRoger/modulus" in info["description"]


@pytest.mark.parametrize("module", _modules())
def test_installed_module_documented(installed: tuple[Path, dict[str, str]], module: str) -> None:
    coll, env = installed
    fqcn = f"modulus.kmods.{module}"
    res = _run([_tool("ansible-doc"), "-t", "module", fqcn], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert fqcn in res.stdout
    res = _run([_tool("ansible-doc"), "-t", "module", "--json", fqcn], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)[fqcn]["doc"]
    # Read from the installed artifact, not from the working tree.
    assert Path(doc["filename"]).resolve().is_relative_to(coll.resolve()), doc["filename"]


def test_installed_module_list(installed: tuple[Path, dict[str, str]]) -> None:
    _coll, env = installed
    res = _run([_tool("ansible-doc"), "-t", "module", "--list", "--json", "modulus.kmods"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(json.loads(res.stdout)) == [f"modulus.kmods.{m}" for m in _modules()]


def test_every_module_in_action_group() -> None:
    runtime = yaml.safe_load((REPO / "meta" / "runtime.yml").read_text())
    group = runtime["action_groups"]["modulus"]
    assert sorted(set(_modules()) - set(group)) == []


def test_changelog_fragments_lint() -> None:
    tool = BIN / "antsibull-changelog"
    if not tool.exists() and not shutil.which("antsibull-changelog"):
        pytest.skip("antsibull-changelog is not installed (it is in requirements-dev.txt: run `make deps`)")
    cmd = str(tool) if tool.exists() else "antsibull-changelog"
    for args in (["lint"], ["lint-changelog-yaml", "changelogs/changelog.yaml"]):
        res = _run([cmd, *args], cwd=REPO)
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_installed_role_documented(installed: tuple[Path, dict[str, str]]) -> None:
    """``ansible-doc -t role`` renders every variable of the role's argument spec from the installed copy."""
    _coll, env = installed
    res = _run([_tool("ansible-doc"), "-t", "role", "--json", "modulus.kmods.modulus"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    options = json.loads(res.stdout)["modulus.kmods.modulus"]["entry_points"]["main"]["options"]
    specs = yaml.safe_load((REPO / "roles/modulus/meta/argument_specs.yml").read_text())
    assert set(options) == set(specs["argument_specs"]["main"]["options"])
    defaults = yaml.safe_load((REPO / "roles/modulus/defaults/main.yml").read_text())
    # every default the role ships is a documented option, with the same default
    for name, value in defaults.items():
        assert name in options, name
        assert options[name].get("default") == value, (name, options[name].get("default"), value)


@pytest.mark.parametrize("playbook", ["modulus.kmods.site", "modulus.kmods.pull", "modulus.kmods.bootstrap"])
def test_installed_playbooks_parse(installed: tuple[Path, dict[str, str]], playbook: str, tmp_path: Path) -> None:
    """The playbooks run by name from the installed collection (``ansible-playbook modulus.kmods.site``)."""
    _coll, env = installed
    res = _run([_tool("ansible-playbook"), "-i", "localhost,", "--syntax-check", playbook], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
