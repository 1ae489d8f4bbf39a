"""Unit test session fixtures."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _stop_test_gpg_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests make throwaway keys in private GNUPGHOMEs under the session's temp dir; generating a
    key starts a gpg-agent for that home. Stop every one of them when the session ends."""
    yield
    gpgconf = shutil.which("gpgconf")
    if not gpgconf:
        return
    for ring in tmp_path_factory.getbasetemp().rglob("pubring.kbx"):
        subprocess.run([gpgconf, "--homedir", str(ring.parent), "--kill", "all"], check=False,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
