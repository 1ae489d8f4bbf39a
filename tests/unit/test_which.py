"""common.which(): PATH first; the usual sbin/bin directories only for a PATH that names no sbin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import common


def _tool(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("path", "expected"), [
    ("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", True),
    ("/usr/bin:/bin", False),
    ("/opt/tools/usr/sbin/:/opt/tools/usr/bin", True),
    ("/home/sbinx:/usr/bin", False),
    ("", False),
    (None, False),
])
def test_path_has_sbin(path: str | None, expected: bool) -> None:
    assert common.path_has_sbin(path) is expected


def test_which_falls_back_only_without_sbin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = tmp_path / "fallback"
    tool = _tool(fallback, "modulus-test-tool")
    monkeypatch.setattr(common, "SBIN_PATHS", (str(fallback),))
    own = tmp_path / "host"
    _tool(own / "usr/bin", "other")
    monkeypatch.setenv("PATH", f"{own / 'usr/bin'}:/nonexistent/bin")
    assert common.which("modulus-test-tool") == str(tool)  # cron-like PATH: the sbin/bin fallback
    monkeypatch.setenv("PATH", f"{own / 'usr/sbin'}{os.pathsep}{own / 'usr/bin'}")
    assert common.which("modulus-test-tool") is None  # a PATH with sbin is the whole host
    assert common.which("other") == str(own / "usr/bin/other")
    with pytest.raises(FileNotFoundError, match=r"'modulus-test-tool' was not found on PATH \(.*usr/sbin.*\)$"):
        common.require_tool("modulus-test-tool")
