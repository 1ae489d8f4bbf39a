"""Figures for kmod_install, side by side with what they compare to:

1. ``state=staged`` from a build directory (sysext creation: verify, lay out, pack), per image
   format, against a plain ``cp -a`` of the same build tree and ``mksquashfs`` of it alone. The
   ``directory`` row runs with a stock host's PATH (no mksquashfs, no mkfs.erofs) and the default
   ``sysext_format: auto``, which is what a stock stable or LTS Flatcar host does; then the same
   request again (the no-op second run) and its ratio to the first;
2. the size of the image against the build tree (ratio);
3. in the booted systemd container (tests/sim/booted.py), the time from the container's start to
   ``systemd-sysext.service`` active with the image merged, against the same boot without an image.

Builds: the hello module (compiled once by kmod_build into build/bench-kmod-install, then reused) and
the NVIDIA 535 build the slow kmod_build tests keep in the kit cache (left out when absent).

    sudo .venv/bin/python benchmarks/bench_kmod_install.py [--runs 3]

Prints figures; no targets are asserted (exit 0)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "build" / "collections"), str(ROOT / "tests")]

from ansible_collections.modulus.kmods.plugins.module_utils import install, sysext  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils import manifest as mf  # noqa: E402
from sim import ansible_run  # noqa: E402
from sim.booted import boot, booted_root  # noqa: E402
from sim.kit import Kit, cache_root  # noqa: E402

WORK = ROOT / "build" / "bench-kmod-install"


def mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def hello_build(kit: Kit) -> Path:
    rel = kit.releases["pending"]
    dest = WORK / "hello" / rel.kernel
    args = {"image": str(rel.image_raw), "recipe": "generic", "name": "modulus-hello", "version": "1.0",
            "source": str(ROOT / "tests/fixtures/hello"), "modules": ["modulus_hello"], "dest": str(dest)}
    res, text = ansible_run.run_module("modulus.kmods.kmod_build", args, timeout=1800)
    if res.get("failed"):
        raise SystemExit(f"hello build failed:\n{text[-2000:]}")
    return dest


def nvidia_build() -> Path | None:
    for man in sorted((cache_root() / "nvidia-builds").glob("*/nvidia/*/*/manifest.json")):
        if mf.verify_tree(str(man.parent), json.loads(man.read_text()), strict=False, hash_files=False) == []:
            return man.parent
    return None


def timed_cmd(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


STOCK_TOOLS = ("sh", "bash", "cat", "cp", "ln", "ls", "mkdir", "mv", "rm", "uname", "depmod", "modprobe", "ldconfig")


@contextlib.contextmanager
def stock_path(tmp: Path):
    """PATH holding only what a stock Flatcar host has of the tools kmod_install may call."""
    d = tmp / "stock-bin"
    d.mkdir(exist_ok=True)
    for tool in STOCK_TOOLS:
        found = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found and not (d / tool).exists():
            (d / tool).symlink_to(found)
    old = os.environ["PATH"]
    os.environ["PATH"] = str(d)
    try:
        yield
    finally:
        os.environ["PATH"] = old


def stage_once(kit: Kit, src: Path, fmt: str, tmp: Path) -> tuple[float, int, float, str, float]:
    """Seconds for state=staged on a fresh kit host root, the image's size, seconds of the same
    request again (nothing to do), the format kmod_install chose, and (directory images) seconds of
    the request once more after the image's usr/ is copied over the host's usr/ (what /usr shows
    once merged; NaN for .raw images)."""
    man = json.loads((src / "manifest.json").read_text())
    kver = man["kernel_release"]
    name = next(k for k, r in kit.releases.items() if r.kernel == kver)
    host = kit.host_root(tmp / "host", update="need_reboot", release=name)
    stock = fmt == "stock"
    req = install.Request(state="staged", src=str(src), host_root=str(host), sysext_format="auto" if stock else fmt)
    with stock_path(tmp) if stock else contextlib.nullcontext():
        start = time.perf_counter()
        out = install.run(req)
        seconds = time.perf_counter() - start
        assert out.result["image"]["created"], out.actions
        start = time.perf_counter()
        again = install.run(req)
        noop = time.perf_counter() - start
        image = host / out.result["image"]["path"].lstrip("/")
        merged = float("nan")
        if image.is_dir():
            shutil.copytree(image / "usr", host / "usr", dirs_exist_ok=True, symlinks=True)
            start = time.perf_counter()
            third = install.run(req)
            merged = time.perf_counter() - start
            assert not third.changed, third.actions
    assert not again.changed, again.actions
    size = sysext.tree_size(str(image))
    shutil.rmtree(host)
    return seconds, size, noop, out.result["image"]["format"], merged


def bench_staged(kit: Kit, builds: dict[str, Path], runs: int) -> None:
    print("\n1-2. state=staged from a build directory (sysext creation), then the same again (no-op), median of",
          runs, "runs")
    print(f"{'build':8} {'tree':>10} {'format':22} {'staged':>9} {'no-op':>8} {'no-op/staged':>13} {'merged no-op':>13} "
          f"{'cp -a':>8} {'mksquashfs':>11} {'staged/cp':>10} {'image':>10} {'image/tree':>11}")
    for label, src in builds.items():
        tree = sysext.tree_size(str(src))
        with tempfile.TemporaryDirectory(prefix="bench-ki-") as td:
            tmp = Path(td)
            cps = []
            for _ in range(runs):
                cps.append(timed_cmd(["cp", "-a", str(src), str(tmp / "cp")]))
                shutil.rmtree(tmp / "cp")
            cp = statistics.median(cps)
            sq = statistics.median(timed_cmd(["mksquashfs", str(src), str(tmp / "x.raw"), "-noappend", "-quiet",
                                              "-no-progress", "-all-root"]) for _ in range(runs))
            for fmt in ("stock", "squashfs", "erofs", "directory"):
                got = [stage_once(kit, src, fmt, tmp) for _ in range(runs)]
                sec = statistics.median(g[0] for g in got)
                noop = statistics.median(g[2] for g in got)
                merged = statistics.median(g[4] for g in got)
                size = got[0][1]
                shown = f"auto={got[0][3]} (stock)" if fmt == "stock" else fmt
                after = f"{merged:12.3f}s" if merged == merged else "            -"
                print(f"{label:8} {mib(tree):>10} {shown:22} {sec:8.2f}s {noop:7.3f}s {noop / sec:12.3f}x {after} "
                      f"{cp:7.2f}s {sq:10.2f}s {sec / cp:9.1f}x {mib(size):>10} {size / tree:10.2f}x")


def bench_boot(kit: Kit, src: Path, runs: int) -> None:
    print("\n3. booted systemd container (systemd-nspawn -b): start -> systemd-sysext.service active, median of", runs)
    man = json.loads((src / "manifest.json").read_text())
    kver = man["kernel_release"]
    name = next(k for k, r in kit.releases.items() if r.kernel == kver)
    rel = kit.releases[name]
    root = booted_root()
    with tempfile.TemporaryDirectory(prefix="bench-kib-") as td:
        host = kit.host_root(Path(td), update="need_reboot", release=name)
        out = install.run(install.Request(state="staged", src=str(src), host_root=str(host), sysext_format="directory"))
        image = host / out.result["image"]["path"].lstrip("/")
        probe = f"modprobe -S {kver} --show-depends modulus_hello 2>&1 | grep -q modprobe_helper && echo RESOLVED"
        osr = {"ID": "flatcar", "VERSION_ID": rel.version}
        rows = {}
        for label, ext in (("no image", {}), ("hello image", {image.name: image})):
            got = [boot(root, os_release=osr, extensions=ext, probe=probe) for _ in range(runs)]
            merged = [g.sysext_merged_s for g in got if g.sysext_merged_s is not None]
            probe_at = [g.probe_started_s for g in got if g.probe_started_s is not None]
            rows[label] = (statistics.median(merged) if merged else float("nan"),
                           statistics.median(probe_at) if probe_at else float("nan"),
                           statistics.median(g.duration for g in got), all("RESOLVED" in g.output for g in got))
        print(f"{'':12} {'sysext active':>14} {'probe (after)':>14} {'whole boot':>11} {'module resolves':>16}")
        for label, (m, p, d, ok) in rows.items():
            active = f"{m:13.2f}s" if m == m else "      skipped"  # no image: the unit's condition skips it
            print(f"{label:12} {active} {p:13.2f}s {d:10.2f}s {str(ok):>16}")
        print("ratio with image / without: probe start {:.2f}x, whole boot {:.2f}x".format(
            rows["hello image"][1] / rows["no image"][1], rows["hello image"][2] / rows["no image"][2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["staged", "boot"], help="run one part")
    args = ap.parse_args()
    kit = Kit.build()
    WORK.mkdir(parents=True, exist_ok=True)
    builds = {"hello": hello_build(kit)}
    if args.only == "boot":
        bench_boot(kit, builds["hello"], args.runs)
        return
    nv = nvidia_build()
    if nv is not None:
        builds["nvidia"] = nv
    else:
        print("(no NVIDIA build in the kit cache: NVIDIA rows left out)")
    bench_staged(kit, builds, args.runs)
    if args.only != "staged":
        bench_boot(kit, builds["hello"], args.runs)


if __name__ == "__main__":
    main()
