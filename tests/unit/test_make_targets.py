"""`make test` as a non-root user must fail loudly instead of skipping every integration test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_integration_refuses_to_run_without_root() -> None:
    cmd = ["make", "-s", "-C", str(REPO), "need-root"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop root for this test"
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"})
    assert proc.returncode != 0
    assert "did NOT run" in proc.stderr, proc.stderr
