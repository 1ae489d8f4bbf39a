"""Benchmark kmod_archive push/pull of a 200 MB build against `aws s3 cp` to the same S3 endpoint.

Targets (issue 4): push and pull each at most 1.2 times the time of `aws s3 cp` of the same build
(as one plain tar file: no compression, no checksums, no verification) to/from the same
moto_server; a no-op pull makes exactly one request (counted by a botocore hook and checked in
moto's request log).

    .venv/bin/python benchmarks/bench_kmod_archive.py [--size-mb 200] [--runs 3]

awscli is installed into its own throwaway venv under build/awscli-venv (its botocore pin would
fight ours). Exit status 1 when a target is missed."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "build" / "collections"), str(ROOT / "tests")]

from ansible_collections.modulus.kmods.plugins.module_utils import archive as ar  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils import archive_ops as ops  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils.identity import identity_from_manifest  # noqa: E402
from ansible_collections.modulus.kmods.plugins.module_utils.stores import open_store  # noqa: E402
from sim.kmod_archive_fixtures import IDENT, make_build  # noqa: E402
from sim.s3 import TEST_KEY_ID, TEST_SECRET, MotoServer, client  # noqa: E402

AWS_VENV = ROOT / "build" / "awscli-venv"
LIMIT = 1.2


def aws_cli() -> str:
    aws = AWS_VENV / "bin" / "aws"
    if not aws.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AWS_VENV)], check=True)
        subprocess.run([str(AWS_VENV / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return str(aws)


def aws_env(endpoint: str) -> dict:
    env = dict(os.environ)
    env.update({"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    return env


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=ar.DEFAULT_LEVEL)
    args = parser.parse_args()
    aws = aws_cli()
    work = Path(tempfile.mkdtemp(prefix="bench-kmod-archive-", dir=os.environ.get("TMPDIR") or "/var/tmp"))
    try:
        total = args.size_mb << 20
        src = make_build(work / "src", big_random=total * 3 // 4, big_text=total // 4)
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        npaths = len(list(src.rglob("*")))
        plain = work / "plain.tar"
        with tarfile.open(plain, "w") as tar:
            tar.add(src, arcname="build")
        with MotoServer() as server:
            endpoint = server.endpoint
            opts = {"endpoint_url": endpoint, "access_key": TEST_KEY_ID, "secret_key": TEST_SECRET,
                    "region": "us-east-1", "addressing_style": "path"}
            env = aws_env(endpoint)
            ident = identity_from_manifest(IDENT)
            rows = {"push": [], "aws_up": [], "raw_up": [], "pull": [], "aws_down": [], "raw_down": []}
            raw = client(endpoint)
            manifest = src / "manifest.json"
            data = manifest.read_text()
            akey = "fleet/" + ar.archive_key(ident)
            down = work / "down.tar"

            def aws_up(b: str) -> None:
                subprocess.run([aws, "s3", "cp", "--quiet", str(plain), f"s3://{b}/plain.tar"], env=env, check=True)

            def aws_down(b: str) -> None:
                subprocess.run([aws, "s3", "cp", "--quiet", f"s3://{b}/plain.tar", str(down)], env=env, check=True)

            def push(b: str) -> None:
                ops.push(str(src), open_store(f"s3://{b}/fleet", opts), {}, level=args.level)

            def pull(b: str, d: Path) -> None:
                ops.pull(str(d), open_store(f"s3://{b}/fleet", opts), ident, "stable")

            for run in range(args.runs):
                bucket = f"bench-{run}"
                raw.create_bucket(Bucket=bucket)
                order = ["aws_up", "push", "raw_up"] if run % 2 == 0 else ["push", "raw_up", "aws_up"]
                for what in order:
                    if what == "aws_up":
                        rows["aws_up"].append(timed(lambda b=bucket: aws_up(b)))
                    elif what == "push":
                        manifest.write_text(data)  # forget any recorded archive: every run pushes for real
                        rows["push"].append(timed(lambda b=bucket: push(b)))
                    else:
                        rows["raw_up"].append(timed(lambda b=bucket: raw.upload_file(str(plain), b, "raw.tar")))
                dest = work / f"dest-{run}"
                order = ["aws_down", "pull", "raw_down"] if run % 2 == 0 else ["pull", "raw_down", "aws_down"]
                for what in order:
                    if what == "aws_down":
                        rows["aws_down"].append(timed(lambda b=bucket: aws_down(b)))
                    elif what == "pull":
                        rows["pull"].append(timed(lambda b=bucket, d=dest: pull(b, d)))
                    else:
                        rows["raw_down"].append(timed(lambda b=bucket: raw.download_file(b, "raw.tar", str(down))))
                    if down.exists():
                        down.unlink()
                # keep moto's memory small: only the last run's archive stays (for the no-op pull)
                for key in ("plain.tar", "raw.tar") + ((akey,) if run < args.runs - 1 else ()):
                    raw.delete_object(Bucket=bucket, Key=key)
                if run < args.runs - 1:
                    shutil.rmtree(dest)
            last = f"bench-{args.runs - 1}"
            last_dest = work / f"dest-{args.runs - 1}"
            archive_size = raw.head_object(Bucket=last, Key=akey)["ContentLength"]
            # a no-op pull: decided with one HEAD
            store = open_store(f"s3://{last}/fleet", opts)
            lines_before = len(server.request_lines())
            res = ops.pull(str(last_dest), store, ident, "stable")
            time.sleep(0.2)
            logged = server.request_lines()[lines_before:]
            noop_local = ops.pull(str(last_dest), open_store(f"s3://{last}/fleet", opts), ident, "stable",
                                  remote_check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    push_ratio, pull_ratio = med["push"] / med["aws_up"], med["pull"] / med["aws_down"]
    print(f"build: {size / 2**20:.0f} MiB ({npaths} paths); archive "
          f"{archive_size / 2**20:.0f} MiB (gzip level {args.level}, incompressible chunks stored); "
          f"median of {args.runs} runs, moto_server on 127.0.0.1, {os.cpu_count()} CPUs")
    print(f"{'':24}{'kmod_archive':>14}{'aws s3 cp':>12}{'ratio':>8}   (target <= {LIMIT})"
          f"{'boto3 raw':>12}{'ratio':>8}  (in-process transfer of the plain tar, no CLI start-up)")
    print(f"{'push (pack+upload)':24}{med['push']:13.2f}s{med['aws_up']:11.2f}s{push_ratio:8.2f}"
          f"{'':21}{med['raw_up']:11.2f}s{med['push'] / med['raw_up']:8.2f}")
    print(f"{'pull (get+verify+place)':24}{med['pull']:13.2f}s{med['aws_down']:11.2f}s{pull_ratio:8.2f}"
          f"{'':21}{med['raw_down']:11.2f}s{med['pull'] / med['raw_down']:8.2f}")
    print("runs:", {k: [round(x, 2) for x in v] for k, v in rows.items()})
    print(f"no-op pull: changed={res['changed']} requests={res['store_requests']} (botocore hook); "
          f"moto log: {len(logged)} request(s) {[line.split(chr(34))[1] for line in logged]}; "
          f"with remote_check=false: {noop_local['store_requests']} requests")
    ok = push_ratio <= LIMIT and pull_ratio <= LIMIT and res["store_requests"] == 1 and len(logged) == 1 \
        and not res["changed"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
