"""``make demo``: the main job end to end on the Flatcar simulation.

Builds (or loads from its cache) the simulation kit, starts the simulated release server, lays
out a simulated Flatcar host that has downloaded an update and waits for the reboot, and runs
``playbooks/demo.yml`` with ansible-playbook: fetch and verify the developer containers of the
current and the pending release, run a command inside each, compile the project's own module
for the pending kernel with ``kmod_build``, push the build to a fleet store with ``kmod_archive``
and pull it back on a "second host", verified.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sim.kit import Kit, KitError

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    try:
        kit = Kit.build()
    except KitError as exc:
        print(f"demo: the simulation kit could not be built: {exc}", file=sys.stderr)
        return 1
    # One work dir, kept between runs: a second `make demo` shows the caches at work (nothing is
    # downloaded or compiled again). The simulated host is laid out anew each time.
    work = Path(os.environ.get("MODULUS_DEMO_DIR", REPO / "build" / "demo"))
    shutil.rmtree(work / "host", ignore_errors=True)
    (work / "host").mkdir(parents=True)
    host = kit.host_root(work / "host", update="need_reboot")
    extra = {
        "demo_host_root": str(host),
        "demo_verify_key": kit.key.public_armored.read_text(),
        "demo_work": str(work),
        "demo_module_src": str(REPO / "tests" / "fixtures" / "hello"),
        "ansible_python_interpreter": sys.executable,
    }
    env = dict(os.environ)
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "collections"))
    env.setdefault("ANSIBLE_STDOUT_CALLBACK", "default")
    env["ANSIBLE_LOCALHOST_WARNING"] = "false"
    env["ANSIBLE_INVENTORY_UNPARSED_WARNING"] = "false"
    with kit.serve() as server:
        extra["demo_url_template"] = server.url_template
        print(f"demo: simulated release server {server.base_url}; host root {host}; work dir {work}", flush=True)
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                str(REPO / "playbooks" / "demo.yml"), "-e", json.dumps(extra)]
        rc = subprocess.call(argv, env=env, cwd=str(REPO))
    print(f"demo: {'done' if rc == 0 else 'FAILED'}; everything the demo wrote is under {work}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
