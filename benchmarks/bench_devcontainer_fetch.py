#!/usr/bin/env python3
"""Benchmark: coreos_devcontainer's single-pass fetch against the original modulus shell pipeline.

Both fetch the simulation kit's *pending* developer container from its release server on 127.0.0.1.

- ours: ``fetch.fetch_image`` (what the module runs): signature check (gpg, isolated keyring),
  decompression (lbzip2 when installed, else Python's bz2) and a sparse write while the bytes
  arrive; the clock stops when the verified image has been fsynced and renamed into place.
- reference: ``curl URL | tee >(bzip2 -d > FILE) | gpg --verify SIG -`` as the bash tool ran it.
  The pipeline returns when gpg is done while bzip2 may still be writing in the background: the
  clock stops only when bzip2 has finished writing the image (both times are printed).

Runs alternate (ours, reference, ours, ...), three each by default; prints both medians, their
ratio (target: ours <= 0.5 x reference) and the disk each image uses (du) against its apparent size.

    PYTHONPATH=build/collections:tests .venv/bin/python benchmarks/bench_devcontainer_fetch.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO / "build" / "collections", REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from ansible_collections.modulus.kmods.plugins.module_utils import fetch as fm  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils.openpgp import Keyring  # noqa: E402
from sim.kit import Kit  # noqa: E402

NAME = "flatcar_developer_container.bin.bz2"
REFERENCE = r'''
set -o pipefail
curl -fsS "$URL" | tee >(bzip2 -d > "$OUT"; echo $? > "$DONE") | gpg --batch --no-tty --verify "$SIG" - 2>/dev/null
'''


def disk_used(path: Path) -> int:
    return path.stat().st_blocks * 512


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run_ours(kit: Kit, server, work: Path, decompressor: str) -> tuple[float, Path, str]:
    rel = kit.releases["pending"]
    dest = work / "ours" / "flatcar_developer_container.bin"
    fields = {"channel": rel.channel, "board": rel.board, "version": rel.version, "arch": rel.arch, "group": rel.channel}
    cands = fm.candidate_bases(server.url_template, [], None, fields)
    t0 = time.monotonic()
    with Keyring(kit.key.public_armored.read_bytes(), [kit.key.fingerprint]) as ring:
        result = fm.fetch_image(cands, NAME, str(dest), ring, min_free_space=0, decompressor=decompressor)
    return time.monotonic() - t0, dest, result.decompressor


def run_reference(kit: Kit, server, work: Path, gnupghome: Path) -> tuple[float, float, Path]:
    rel = kit.releases["pending"]
    out_dir = work / "reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "flatcar_developer_container.bin"
    done = out_dir / "bzip2.done"
    sig = out_dir / "image.sig"
    shutil.copy(rel.image_sig, sig)
    env = dict(os.environ, URL=server.release_url(rel.version), OUT=str(out), DONE=str(done), SIG=str(sig),
               GNUPGHOME=str(gnupghome))
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", REFERENCE], env=env, check=False)
    t_gpg = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"reference pipeline failed (rc={proc.returncode})")
    while not done.exists() or not done.read_text().strip():  # bzip2 still writing in the background
        time.sleep(0.005)
    t_done = time.monotonic() - t0
    if done.read_text().strip() != "0":
        raise SystemExit("reference bzip2 -d failed")
    return t_gpg, t_done, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/var/tmp", help="where the images are written (a disk, not tmpfs)")
    parser.add_argument("--decompressor", default="auto", choices=["auto", "lbzip2", "python"])
    args = parser.parse_args()
    for tool in ("curl", "bzip2", "gpg", "bash"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required for the reference pipeline")

    kit = Kit.build()
    rel = kit.releases["pending"]
    work = Path(tempfile.mkdtemp(prefix="modulus-bench-devc-", dir=args.workdir))
    gnupghome = work / "gnupg"
    gnupghome.mkdir(mode=0o700)
    subprocess.run(["gpg", "--batch", "--import", str(kit.key.public_armored)], env=dict(os.environ, GNUPGHOME=str(gnupghome)),
                   check=True, capture_output=True)
    ours_t: list[float] = []
    ref_gpg: list[float] = []
    ref_done: list[float] = []
    ours_disk = ref_disk = apparent = 0
    name = "?"
    print(f"image: {rel.image_bz2.name} {rel.version} ({mib(rel.image_bz2.stat().st_size)} compressed, "
          f"{mib(rel.image_raw.stat().st_size)} apparent), {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    try:
        with kit.serve() as server:
            for i in range(args.runs):
                for which in ("ours", "reference"):
                    subprocess.run(["sync"], check=False)
                    if which == "ours":
                        secs, dest, name = run_ours(kit, server, work, args.decompressor)
                        ours_t.append(secs)
                        ours_disk, apparent = disk_used(dest), dest.stat().st_size
                        print(f"run {i + 1} ours ({name}): {secs:.2f} s, disk {mib(ours_disk)}", flush=True)
                        shutil.rmtree(dest.parent)
                    else:
                        t_gpg, t_done, out = run_reference(kit, server, work, gnupghome)
                        ref_gpg.append(t_gpg)
                        ref_done.append(t_done)
                        ref_disk = disk_used(out)
                        print(f"run {i + 1} reference: gpg returned after {t_gpg:.2f} s, image complete after "
                              f"{t_done:.2f} s, disk {mib(ref_disk)}", flush=True)
                        shutil.rmtree(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours_med = statistics.median(ours_t)
    ref_med = statistics.median(ref_done)
    ratio = ours_med / ref_med
    print()
    print(f"median ours ({name}):          {ours_med:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in ours_t)})")
    print(f"median reference (complete): {ref_med:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in ref_done)})")
    print(f"median reference (gpg only): {statistics.median(ref_gpg):7.2f} s   (when the old tool went on, image unfinished)")
    print(f"ratio ours / reference:      {ratio:7.2f}     (target <= 0.50: {'met' if ratio <= 0.5 else 'NOT met'})")
    print(f"disk used: ours {mib(ours_disk)}, reference {mib(ref_disk)}, apparent size {mib(apparent)}; "
          f"reference/ours = {ref_disk / max(ours_disk, 1):.1f}x; original sparse image {mib(disk_used(rel.image_raw))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
