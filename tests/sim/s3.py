"""An S3 endpoint on 127.0.0.1 for tests and benchmarks: a real ``moto_server`` (HTTP).

``s3_endpoint()`` reuses ``$MODULUS_TEST_S3_ENDPOINT`` (set by ``.ci/run``) or starts a private
server; ``MotoServer`` starts one explicitly (for example with authentication turned on).
Every server started here is stopped (and its process reaped) when the context exits."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

ENV_ENDPOINT = "MODULUS_TEST_S3_ENDPOINT"
TEST_KEY_ID = "AKIAMODULUSTEST00001"
TEST_SECRET = "modulus-test-secret-do-not-print-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_server_path() -> str:
    here = Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: install moto[server] into the venv (make deps)")
    return found


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` in its own process group; ``log`` holds its request log."""

    def __init__(self, env: Optional[dict] = None, log_dir: Optional[str] = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._env = dict(os.environ)
        self._env.update(env or {})
        self._own_dir = log_dir is None
        self._dir = log_dir or tempfile.mkdtemp(prefix="moto-")
        self.log = Path(self._dir) / "moto_server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([moto_server_path(), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self._env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/data.json", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def request_lines(self) -> list[str]:
        """The request lines moto logged so far (``"PUT /bucket/key HTTP/1.1" 200``)."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines() if '"' in line and "HTTP/1" in line]

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a running S3 server: the CI one when set, else a private one."""
    shared = os.environ.get(ENV_ENDPOINT)
    if shared:
        yield shared.rstrip("/")
        return
    with MotoServer() as server:
        yield server.endpoint


def client(endpoint: str, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                        region_name="us-east-1")


def new_bucket(endpoint: str, prefix: str = "kmods") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def enable_auth(server: MotoServer) -> tuple[str, str]:
    """Turn on moto's IAM authentication and return (access key id, secret) of a user allowed to use S3.

    The server must be started with ``INITIAL_NO_AUTH_ACTION_COUNT`` big enough for the calls made here."""
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id=TEST_KEY_ID,
                       aws_secret_access_key=TEST_SECRET, region_name="us-east-1")
    iam.create_user(UserName="modulus")
    iam.put_user_policy(UserName="modulus", PolicyName="s3", PolicyDocument=(
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'))
    key = iam.create_access_key(UserName="modulus")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]
