"""A simulated GPU fleet for the role: release server, S3 endpoint and Flatcar hosts, with an inventory.

``make demo``, the Molecule scenarios and the role benchmark all run the real role with
``ansible-playbook`` against it. What it brings up:

- the kit's release server (developer containers of the current and pending release, signed);
- an S3 endpoint (``moto_server``; the one in ``$MODULUS_TEST_S3_ENDPOINT`` when set) with a bucket;
- N simulated Flatcar hosts: host roots (``Kit.host_root``) that run the current release and have
  downloaded the pending one (``update_engine`` says ``UPDATED_NEED_REBOOT``);
- an inventory: group ``gpu_nodes``, every host on the local connection, ``modulus_host_root``
  pointing at its root, and group_vars naming the store, its credentials, the kit's signing key
  and release server, and the NVIDIA driver (the kit's real-sources ``.run``) or the project's own
  small module.

In Python::

    with Fleet(work, hosts=["gpu1", "gpu2"]) as fleet:
        fleet.playbook(["site.yml", "-l", "gpu_nodes"])

From a shell (Molecule's create/destroy): ``python -m sim.stack up --work DIR --hosts gpu1,gpu2``
starts a detached server process and returns once the inventory ``DIR/inventory/hosts.yml`` is
written; ``python -m sim.stack down --work DIR`` stops it and releases everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import yaml

from sim.hosttools import DEFAULT_VARIANT, host_env, host_path
from sim.kit import Kit, KitError
from sim.s3 import ENV_ENDPOINT, TEST_KEY_ID, TEST_SECRET, MotoServer, client

REPO = Path(__file__).resolve().parents[2]
STATE = "fleet.json"
REQUEST_LOG = "release-requests.jsonl"  # every request the release server answered, one JSON object a line
HELLO_DRIVER = {"name": "modulus-hello", "version": "1.0.0", "recipe": "generic",
                "source": str(REPO / "tests" / "fixtures" / "hello"), "modules": ["modulus_hello"]}


def nvidia_driver() -> dict[str, Any]:
    """The NVIDIA driver as an operator names it, with the kit's real-sources ``.run`` as its source."""
    from sim.nvidia import nvidia_run

    run = nvidia_run()
    return {"name": "nvidia", "version": run.version, "source": str(run.path), "checksum": f"sha256:{run.sha256}"}


class Fleet:
    """Everything a role run needs, started in ``start()`` and released in ``stop()``."""

    def __init__(self, work: str | os.PathLike[str], hosts: list[str], *, drivers: Optional[list[dict]] = None,
                 update: str = "need_reboot", bucket: str = "", prefix: str = "flatcar",
                 extra_vars: Optional[dict[str, Any]] = None, clean_store: bool = False,
                 host_tools: Optional[str] = DEFAULT_VARIANT, image_format: Optional[str] = None) -> None:
        self.work = Path(work).resolve()
        # The PATH of ansible-playbook and so of every module on the simulated hosts (local
        # connection): a stock Flatcar host's commands (sim.hosttools), "main" for a newer release.
        self.host_tools = host_tools
        self.image_format = image_format  # modulus_sysext_format of the fleet, when given
        self.hosts = list(hosts)
        self.drivers = drivers if drivers is not None else [dict(HELLO_DRIVER)]
        self.update = update
        self.bucket = bucket or f"gpu-fleet-{uuid.uuid4().hex[:8]}"
        self.prefix = prefix
        self.extra_vars = dict(extra_vars or {})
        # Delete what an earlier run left below the prefix (a shared endpoint, $MODULUS_TEST_S3_ENDPOINT,
        # outlives the fleet), so the first host of this fleet really compiles.
        self.clean_store = clean_store
        self.kit: Optional[Kit] = None
        self.server = None
        self.moto: Optional[MotoServer] = None
        self.endpoint = ""

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Fleet:
        self.kit = Kit.build()
        self.server = self.kit.serve().start()
        shared = os.environ.get(ENV_ENDPOINT)
        if shared:
            self.endpoint = shared.rstrip("/")
        else:
            self.moto = MotoServer(log_dir=str(self._mkdir("s3"))).start()
            self.endpoint = self.moto.endpoint
        s3 = client(self.endpoint)
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=self.bucket)
        if self.clean_store:
            for key in self.store_keys():
                s3.delete_object(Bucket=self.bucket, Key=key)
        for name in self.hosts:
            self.reset_host(name)
        self.write_inventory()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.moto is not None:
            self.moto.stop()
            self.moto = None

    def __enter__(self) -> Fleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _mkdir(self, *parts: str) -> Path:
        path = self.work.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- hosts ----------------------------------------------------------------------------------
    def host_dir(self, name: str) -> Path:
        return self.work / "hosts" / name

    def host_root(self, name: str) -> Path:
        return Path((self.host_dir(name) / "root-path").read_text().strip())

    def reset_host(self, name: str) -> Path:
        """The host's root: the one an earlier run laid out when it is still there (a host keeps its
        disk: builds, images, caches), else a new one (release files, update_engine, USR partitions)."""
        assert self.kit is not None
        hdir = self._mkdir("hosts", name)
        record = hdir / "root-path"
        if record.exists() and Path(record.read_text().strip()).exists():
            return Path(record.read_text().strip())
        layout = hdir / "layout"
        shutil.rmtree(layout, ignore_errors=True)
        layout.mkdir()
        root = self.kit.host_root(layout, update=self.update)
        record.write_text(str(root) + "\n")
        return root

    def devcontainer_requests(self) -> list[tuple[str, str, int]]:
        """Requests for developer container images seen by the release server so far."""
        assert self.server is not None
        return [r for r in self.server.requests if "developer_container" in r[1] and r[0] == "GET"]

    # ---- inventory ------------------------------------------------------------------------------
    def group_vars(self) -> dict[str, Any]:
        assert self.kit is not None and self.server is not None
        return {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "modulus_drivers": self.drivers,
            "modulus_store": f"s3://{self.bucket}/{self.prefix}",
            "modulus_store_options": {
                "endpoint_url": self.endpoint, "access_key": TEST_KEY_ID, "secret_key": TEST_SECRET,
                "region": "us-east-1", "addressing_style": "path",
            },
            "modulus_devcontainer_options": {
                "url_template": self.server.url_template,
                "verify_key": self.kit.key.public_armored.read_text(),
                "key_url": "",
            },
            # A simulated host cannot load modules into this machine's kernel (a QEMU test does that).
            "modulus_load": False,
            "modulus_become": False,
            "modulus_python_mode": "none",
            "modulus_lock_poll": 2,
            # The PATH of a stock Flatcar host (sim.hosttools): Molecule's converge sets it for the play;
            # Fleet.playbook() runs ansible-playbook itself with it.
            **({"sim_host_path": host_path(self.host_tools)} if self.host_tools else {}),
            **({"modulus_sysext_format": self.image_format} if self.image_format else {}),
            **self.extra_vars,
        }

    def write_inventory(self) -> Path:
        inv = self._mkdir("inventory")
        hosts = {name: {"modulus_host_root": str(self.host_root(name))} for name in self.hosts}
        (inv / "hosts.yml").write_text(yaml.safe_dump({"gpu_nodes": {"hosts": hosts}}, sort_keys=False))
        gv = inv / "group_vars"
        gv.mkdir(exist_ok=True)
        (gv / "gpu_nodes.yml").write_text("---\n# Written by tests/sim/stack.py: the simulated fleet.\n"
                                          + yaml.safe_dump(self.group_vars(), sort_keys=False, width=200))
        return inv / "hosts.yml"

    def state(self) -> dict[str, Any]:
        return {"work": str(self.work), "hosts": {n: str(self.host_root(n)) for n in self.hosts},
                "inventory": str(self.work / "inventory" / "hosts.yml"), "endpoint": self.endpoint,
                "bucket": self.bucket, "prefix": self.prefix,
                "release_server": self.server.base_url if self.server else None}

    # ---- running the role -----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = host_env(dict(os.environ), self.host_tools)
        env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "collections"))
        env["ANSIBLE_LOCALHOST_WARNING"] = "false"
        env["ANSIBLE_INVENTORY_UNPARSED_WARNING"] = "false"
        env.setdefault("ANSIBLE_FORKS", str(max(5, len(self.hosts))))
        return env

    def playbook(self, args: list[str], *, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.work / "inventory"), *args]
        proc = subprocess.run(argv, env=self.env(), cwd=str(REPO), check=False, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ansible-playbook {' '.join(args)} failed with rc={proc.returncode}")
        return proc

    def store_keys(self) -> list[str]:
        s3 = client(self.endpoint)
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)


# ---- command line: a detached fleet for Molecule's create/destroy -----------------------------------
def _serve(args: argparse.Namespace) -> int:
    drivers = json.loads(args.drivers) if args.drivers else None
    fleet = Fleet(args.work, args.hosts.split(","), drivers=drivers, bucket=args.bucket, prefix=args.prefix,
                  extra_vars=json.loads(args.extra_vars) if args.extra_vars else None, clean_store=args.clean_store,
                  host_tools=None if args.host_tools == "machine" else args.host_tools)
    stop = {"now": False}

    def _term(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    with fleet:
        # the detached server's memory is out of reach of the tests (``Fleet.devcontainer_requests()``
        # works in-process only): it writes each request to the log before answering it, so a client
        # that got an answer finds its request there
        log = fleet.work / REQUEST_LOG
        log.unlink(missing_ok=True)
        assert fleet.server is not None
        fleet.server.request_log = log
        (fleet.work / STATE).write_text(json.dumps({**fleet.state(), "pid": os.getpid(), "request_log": str(log)},
                                                      indent=2))
        print(f"sim.stack: fleet of {len(fleet.hosts)} up, inventory {fleet.work / 'inventory'}", flush=True)
        while not stop["now"]:
            time.sleep(0.5)  # until SIGTERM or SIGINT
    (fleet.work / STATE).unlink(missing_ok=True)
    return 0


def _up(args: argparse.Namespace) -> int:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if _running(work):
        print(f"sim.stack: already up in {work}")
        return 0
    (work / STATE).unlink(missing_ok=True)
    log = open(work / "stack.log", "ab")  # noqa: SIM115 (handed to the detached server)
    argv = [sys.executable, "-m", "sim.stack", "serve", "--work", str(work), "--hosts", args.hosts]
    if args.drivers:
        argv += ["--drivers", args.drivers]
    if args.extra_vars:
        argv += ["--extra-vars", args.extra_vars]
    argv += ["--bucket", args.bucket, "--prefix", args.prefix, "--host-tools", args.host_tools] \
        + (["--clean-store"] if args.clean_store else [])
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(REPO))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if (work / STATE).exists():
            print((work / STATE).read_text())
            return 0
        if proc.poll() is not None:
            print(f"sim.stack: the fleet did not come up (rc={proc.returncode}); see {work / 'stack.log'}:\n"
                  + (work / "stack.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    print(f"sim.stack: the fleet did not come up within {args.timeout} s; see {work / 'stack.log'}", file=sys.stderr)
    return 1


def _running(work: Path) -> Optional[int]:
    try:
        pid = int(json.loads((work / STATE).read_text())["pid"])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, KeyError):
        return None


def _down(args: argparse.Namespace) -> int:
    work = Path(args.work).resolve()
    pid = _running(work)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _running(work):
            time.sleep(0.2)
        if _running(work):
            os.killpg(pid, signal.SIGKILL)
    (work / STATE).unlink(missing_ok=True)
    if args.purge:
        shutil.rmtree(work, ignore_errors=True)
    print(f"sim.stack: down ({work})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("up", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True)
        p.add_argument("--hosts", default="gpu1", help="comma-separated host names")
        p.add_argument("--drivers", default="", help="modulus_drivers as JSON (default: the project's small module)")
        p.add_argument("--extra-vars", default="", help="more group_vars as JSON")
        p.add_argument("--bucket", default="gpu-fleet-kmods")
        p.add_argument("--prefix", default="flatcar", help="key prefix of the fleet store in the bucket")
        p.add_argument("--clean-store", action="store_true",
                       help="delete every object below the prefix first (a shared endpoint keeps them between runs)")
        p.add_argument("--timeout", type=float, default=900.0)
        p.add_argument("--host-tools", default=DEFAULT_VARIANT, choices=["stable", "main", "machine"],
                       help="the commands of the simulated hosts: a stock stable Flatcar host's (default), a newer "
                            "release's (mkfs.erofs too), or this machine's")
    p = sub.add_parser("down")
    p.add_argument("--work", required=True)
    p.add_argument("--purge", action="store_true", help="also remove the work directory")
    args = parser.parse_args(argv)
    try:
        return {"up": _up, "serve": _serve, "down": _down}[args.cmd](args)
    except KitError as exc:
        print(f"sim.stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
