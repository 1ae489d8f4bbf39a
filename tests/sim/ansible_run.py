"""Run one of the collection's modules the way Ansible runs it (``ansible localhost -m``), for the
integration tests: the real AnsiballZ packaging, argument validation, check and diff mode.

Every run gets the PATH of a stock Flatcar host (``sim.hosttools``): ``host_tools="stable"`` (the
default: no image tools, compiler or Python), ``"main"`` (a newer release with ``mkfs.erofs``), or
``None`` for what is no simulated host's business (the machine's own PATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from sim.hosttools import DEFAULT_VARIANT, host_env

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = str(Path(sys.executable).parent / "ansible")


HostTools = Optional[str]


def ansible_env(host_tools: HostTools = DEFAULT_VARIANT) -> dict[str, str]:
    """The environment for ansible commands: this checkout's collection, this interpreter, no colour,
    and the PATH of a stock Flatcar host of ``host_tools`` (see the module docstring)."""
    env = host_env(dict(os.environ), host_tools)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "build" / "collections"),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false",
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
    })
    return env


def module_cmd(module: str, args: dict, check: bool = False, diff: bool = False, verbose: bool = False) -> list[str]:
    cmd = [ANSIBLE, "localhost", "-m", module, "-a", json.dumps(args)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    if verbose:
        cmd.append("-vvv")
    return cmd


def parse_result(out: str) -> dict:
    """The result of the default (minimal) callback: ``localhost | CHANGED => {json}``; ``failed`` is
    set when the status says FAILED."""
    idx = out.rfind("localhost | ")
    if idx < 0:
        raise AssertionError(f"no module result in the ansible output:\n{out}")
    status, _sep, body = out[idx:].partition(" => ")
    result = json.loads(body)
    result.setdefault("failed", "FAILED" in status)
    return result


def run_module(module: str, args: dict, *, check: bool = False, diff: bool = False, verbose: bool = False,
               timeout: float = 1800, host_tools: HostTools = DEFAULT_VARIANT) -> tuple[dict, str]:
    """Run ``module`` once; return its result and the whole output (stdout then stderr)."""
    proc = subprocess.run(module_cmd(module, args, check, diff, verbose), env=ansible_env(host_tools), cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout, check=False)
    try:
        return parse_result(proc.stdout), proc.stdout + proc.stderr
    except ValueError as exc:
        raise AssertionError(f"unexpected ansible output (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from exc


def run_playbook(playbook: str | os.PathLike[str], inventory: str | os.PathLike[str], *, limit: str | None = None,
                 extra_vars: dict | None = None, check: bool = False, diff: bool = False,
                 tree_dir: str | os.PathLike[str] | None = None, timeout: float = 3600,
                 host_tools: HostTools = DEFAULT_VARIANT) -> tuple[int, str, dict]:
    """``ansible-playbook`` of one of the collection's playbooks; return (rc, output, last result per host).

    The last result of each host (the ``tree`` callback's file, so the playbook's closing task) is read
    back as JSON when ``tree_dir`` is given."""
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(playbook)]
    if limit:
        cmd += ["--limit", limit]
    if extra_vars:
        cmd += ["--extra-vars", json.dumps(extra_vars)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    env = ansible_env(host_tools)
    if tree_dir is not None:
        env.update({"ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.tree", "ANSIBLE_CALLBACK_TREE_DIR": str(tree_dir)})
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout, check=False)
    last: dict = {}
    if tree_dir is not None and Path(tree_dir).is_dir():
        for path in Path(tree_dir).iterdir():
            last[path.name] = json.loads(path.read_text())
    return proc.returncode, proc.stdout + proc.stderr, last
