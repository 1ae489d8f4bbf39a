"""Figures for the role (``ansible-playbook site.yml -l <host>``), side by side in one run on the
simulated fleet of tests/sim/stack.py (release server, S3 endpoint, Flatcar hosts with an update
pending):

1. per host, the real NVIDIA driver (Debian's 535 sources as NVIDIA's ``.run``) for the current and
   the pending release:
   - cold: a fresh host, an empty store: fetch both developer containers, compile twice, push, install, stage;
   - warm: a second fresh host: pull both builds from the store, install, stage;
   - no-op: the first host again: nothing to do;
   with the bytes each downloaded (developer containers from the release server, objects from the store);
2. four fresh hosts in one ``ansible-playbook`` run needing the same builds (the project's own small
   module, so the figure is about coordination, not compile time): how many compiles.

Goals: warm at most 10% of cold; no-op under 15 s with zero bytes downloaded; one compile per
(release, driver) for four hosts.

    sudo .venv/bin/python benchmarks/bench_role.py [--driver nvidia|hello] [--work DIR]

Prints the figures and whether each goal is met (exit 1 when one is not)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "build" / "collections"), str(ROOT / "tests")]

from sim.stack import HELLO_DRIVER, Fleet, nvidia_driver  # noqa: E402

IMAGE = "flatcar_developer_container.bin"


def image_bytes(fleet: Fleet, since: int) -> int:
    """Bytes of developer container images the release server sent since request number ``since``."""
    total = 0
    for method, path, status in fleet.server.requests[since:]:
        if method == "GET" and IMAGE in path and path.endswith(".bz2") and status in (200, 206):
            total += sum(r.image_bz2.stat().st_size for r in fleet.kit.releases.values() if f"/{r.version}/" in path)
    return total


def store_gets(fleet: Fleet, since: int) -> tuple[int, int]:
    """(GET requests, bytes) the S3 endpoint served since log line ``since`` (moto's request log)."""
    if fleet.moto is None:
        return (-1, -1)
    from sim.s3 import client

    s3 = client(fleet.endpoint)
    gets = size = 0
    for line in fleet.moto.request_lines()[since:]:
        m = re.search(r'"GET /([^/ ?]+)/([^ ?]+)(?:\?[^ ]*)? HTTP/[0-9.]+" 20[06]', line)
        if not m:
            continue
        gets += 1
        if m.group(2).endswith(".tar.gz"):  # archives; leases and signatures are a few hundred bytes
            size += s3.head_object(Bucket=m.group(1), Key=m.group(2))["ContentLength"]
    return (gets, size)


def run(fleet: Fleet, limit: str) -> dict:
    req0 = len(fleet.server.requests)
    s3_0 = len(fleet.moto.request_lines()) if fleet.moto else 0
    t0 = time.monotonic()
    proc = fleet.playbook(["site.yml", "-l", limit], check=False, capture_output=True, text=True)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-2000:])
        raise SystemExit(f"bench_role: site.yml -l {limit} failed (rc={proc.returncode})")
    recap = proc.stdout.split("PLAY RECAP")[-1]
    changed = sum(int(n) for n in re.findall(r"changed=(\d+)", recap))
    gets, size = store_gets(fleet, s3_0)
    builds = {}
    for host in limit.split(":"):
        builds[host] = json.loads((fleet.host_root(host) / "var/lib/modulus/last-run.json").read_text())["builds"]
    return {"seconds": round(took, 1), "changed": changed, "image_bytes": image_bytes(fleet, req0),
            "store_gets": gets, "store_bytes": size, "builds": builds}


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver", choices=["nvidia", "hello"], default="nvidia")
    ap.add_argument("--work", default=str(ROOT / "build" / "bench-role"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    driver = nvidia_driver() if args.driver == "nvidia" else dict(HELLO_DRIVER)
    ok = True
    with Fleet(work / "one", ["cold", "warm"], drivers=[driver]) as fleet:
        if fleet.moto is None:
            print("bench_role: note: a shared S3 endpoint ($MODULUS_TEST_S3_ENDPOINT) hides store byte counts; unset it")
        cold = run(fleet, "cold")
        print(f"cold: {cold['seconds']} s", flush=True)
        warm = run(fleet, "warm")
        noop = run(fleet, "cold")
    print(f"\n{args.driver} {driver['version']}, current and pending release, per host:")
    print(f"{'run':8} {'seconds':>8} {'changed':>8} {'image bytes':>12} {'store GETs':>10} {'store bytes':>12}  sources")
    for name, r in (("cold", cold), ("warm", warm), ("no-op", noop)):
        sources = ",".join(b["source"] for bs in r["builds"].values() for b in bs)
        print(f"{name:8} {r['seconds']:8.1f} {r['changed']:8d} {r['image_bytes']:12d} {r['store_gets']:10d} "
              f"{r['store_bytes']:12d}  {sources}")
    ratio = warm["seconds"] / cold["seconds"]
    goal = ratio <= 0.10
    ok &= goal
    print(f"warm/cold = {ratio:.3f} (goal <= 0.10): {'met' if goal else 'NOT met'}")
    goal = noop["seconds"] < 15 and noop["image_bytes"] == 0 and noop["store_bytes"] <= 0 and noop["changed"] == 0
    ok &= goal
    print(f"no-op {noop['seconds']:.1f} s, {noop['image_bytes']} image bytes, {noop['store_bytes']} store bytes, "
          f"changed={noop['changed']} (goal < 15 s, 0 bytes, nothing changed): {'met' if goal else 'NOT met'}")

    hosts = [f"gpu{i}" for i in range(1, 5)]
    with Fleet(work / "four", hosts, drivers=[dict(HELLO_DRIVER)]) as fleet:
        four = run(fleet, ":".join(hosts))
    built: dict[tuple, int] = {}
    for bs in four["builds"].values():
        for b in bs:
            key = (b["os_version"], b["driver"])
            built[key] = built.get(key, 0) + (b["source"] == "built")
    goal = all(n == 1 for n in built.values()) and len(built) == 2
    ok &= goal
    print(f"\nfour hosts, one run ({four['seconds']:.1f} s): compiles per (release, driver) {built}; "
          f"developer container bytes {four['image_bytes']} (goal: one compile each): {'met' if goal else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
