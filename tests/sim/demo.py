"""``make demo``: the main job end to end on the Flatcar simulation.

Brings up a simulated GPU fleet (``tests/sim/stack.py``): the kit's release server, an S3
endpoint, and two simulated Flatcar hosts that run 9001.1.0 and have downloaded 9001.2.0
(update_engine waits for the reboot). Then it runs what an operator runs::

    ansible-playbook -i <fleet inventory> site.yml -l gpu_nodes

The role compiles the real NVIDIA kernel modules (Debian's NVIDIA 535 sources, packaged as
NVIDIA's ``.run``) for the kernel of the current and of the pending release on one host, pushes
them to the store signed, while the other host waits on the fleet lock and pulls them; both
install the current build and stage the pending one as a system extension bound to 9001.2.0.
While it compiles, the demo prints progress lines from the build logs.

The hosts and the developer container cache stay in ``build/demo`` (``MODULUS_DEMO_DIR``): a second
``make demo`` finds every build on the hosts and compiles and downloads nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from sim.kit import KitError
from sim.stack import Fleet, nvidia_driver

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["gpu-node-1", "gpu-node-2"]


class Progress(threading.Thread):
    """Every ``interval`` seconds, one line per log that grew: developer container downloads
    (``fetch.log``) and compiles (``build.log`` of a build in progress)."""

    def __init__(self, roots: list[Path], interval: float = 20.0) -> None:
        super().__init__(daemon=True, name="demo-progress")
        self.roots = roots
        self.interval = interval
        self.stop = threading.Event()
        self.seen: dict[Path, int] = {}

    def logs(self) -> list[Path]:
        found: list[Path] = []
        for root in self.roots:
            found += root.glob("var/cache/modulus/devcontainer/fetch.log")
            found += root.glob("opt/modulus/archive/*/*/.*.build-*/build.log")
        return found

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            for log in self.logs():
                try:
                    size = log.stat().st_size
                    if size == self.seen.get(log, 0):
                        continue
                    with open(log, "rb") as handle:
                        handle.seek(max(self.seen.get(log, 0), size - 4096))
                        lines = [ln for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
                    self.seen[log] = size
                except OSError:
                    continue
                host = next((r.parent.parent.name for r in self.roots if r in log.parents), "?")
                what = "download" if log.name == "fetch.log" else f"compile {log.parent.parent.parent.name}"
                if lines:
                    print(f"  [{host} {what}] {lines[-1][:160]}", flush=True)


def main() -> int:
    work = Path(os.environ.get("MODULUS_DEMO_DIR", REPO / "build" / "demo")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    key = work / "fleet-signing-key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "modulus-demo-fleet", "-f", str(key)],
                       check=True)
    pub = (work / "fleet-signing-key.pub").read_text().strip()
    try:
        print("demo: preparing the simulation (kit, NVIDIA sources) ...", flush=True)
        drivers = [nvidia_driver()]
        fleet = Fleet(work, HOSTS, drivers=drivers,        extra_vars={"modulus_signing_key": str(key), "modulus_trusted_keys": [pub]})
        fleet.__enter__()
    except (KitError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"demo: the simulation could not be brought up: {exc}", file=sys.stderr)
        return 1
    try:
        roots = [fleet.host_root(h) for h in HOSTS]
        print(f"demo: release server {fleet.server.base_url}, S3 store s3://{fleet.bucket}/{fleet.prefix} at "
              f"{fleet.endpoint}", flush=True)
        for name, root in zip(HOSTS, roots):
            print(f"demo: simulated Flatcar host {name}: / is {root}", flush=True)
        print(f"demo: ansible-playbook -i {work / 'inventory'} site.yml -l gpu_nodes", flush=True)
        progress = Progress(roots)
        progress.start()
        t0 = time.monotonic()
        rc = fleet.playbook(["site.yml", "-l", "gpu_nodes"], check=False).returncode
        progress.stop.set()
        took = time.monotonic() - t0
        if rc != 0:
            print(f"demo: FAILED (ansible-playbook rc={rc}); everything the demo wrote is under {work}", flush=True)
            return rc
        print(f"\ndemo: the run took {took:.0f} s; what each host did (from /var/lib/modulus/last-run.json):", flush=True)
        for name, root in zip(HOSTS, roots):
            record = json.loads((root / "var/lib/modulus/last-run.json").read_text())
            for b in record["builds"]:
                how = {"built": f"compiled ({b['compile_seconds']} s)", "pulled": "pulled from the store",
                       "local": "already on the host"}.get(b["source"], b["source"])
                print(f"  {name}: {b['driver']} {b['driver_version']} {b['release']:8} {b['os_version']} "
                      f"{b['kernel_release']}: {how}{', pushed' if b['pushed'] else ''}; {b['state']} "
                      f"{Path(b['image']).name if b.get('image') else ''}")
            for ext in sorted((root / "var/lib/extensions").glob("*")):
                print(f"  {name}: system extension {ext.name} ({ext.stat().st_size} bytes), for the release in its name")
        keys = fleet.store_keys()
        print(f"  store: {len(keys)} objects", flush=True)
        for k in keys:
            print(f"    s3://{fleet.bucket}/{k}")
        if all(b["source"] == "local" for root in roots
               for b in json.loads((root / "var/lib/modulus/last-run.json").read_text())["builds"]):
            print("  (the demo's S3 endpoint keeps nothing between runs: hosts that hold a build push it to an empty store)")
        image_gets = [r for r in fleet.devcontainer_requests() if r[1].endswith(".bin.bz2")]
        print(f"  developer container downloads in this run: {len(image_gets)}", flush=True)
        print(f"demo: done; everything the demo wrote is under {work} (run `make demo` again: nothing is compiled"
              " or downloaded)", flush=True)
        return 0
    finally:
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
