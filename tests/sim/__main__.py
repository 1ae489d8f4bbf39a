"""``python -m sim build`` builds (or loads from the cache) the simulation kit and prints its paths;
``python -m sim serve`` also runs the release server until interrupted."""

from __future__ import annotations

import argparse
import json
import sys
import time

from sim.kit import Kit, KitError, prune


def _describe(kit: Kit) -> dict[str, object]:
    return {
        "root": str(kit.root),
        "recipe_hash": kit.recipe_hash,
        "key": {"public_armored": str(kit.key.public_armored), "fingerprint": kit.key.fingerprint},
        "other_key": {"public_armored": str(kit.other_key.public_armored), "fingerprint": kit.other_key.fingerprint},
        "releases": {
            name: {
                "version": r.version, "kernel": r.kernel, "board": r.board, "channel": r.channel,
                "image_bz2": str(r.image_bz2), "image_sig": str(r.image_sig), "image_raw": str(r.image_raw),
                "version_txt": str(r.version_txt),
            }
            for name, r in kit.releases.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim", description="The modulus Flatcar simulation kit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (("build", "build or load the kit and print its paths (JSON)"),
                       ("serve", "build or load the kit and serve its releases until Ctrl-C"),
                       ("prune", "build or load the kit, then remove the kits of other recipes from the cache")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cache-dir", default=None, help="default: $MODULUS_SIM_CACHE or /var/cache/modulus-sim")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        kit = Kit.build(cache_dir=args.cache_dir)
    except KitError as exc:
        print(f"sim: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "prune":
        removed = prune(args.cache_dir, keep=[kit.recipe_hash])
        print(f"sim: removed {len(removed)} old kit(s)", file=sys.stderr)
    print(json.dumps(_describe(kit), indent=2))
    print(f"sim: kit ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    if args.cmd == "serve":
        with kit.serve() as server:
            print(f"sim: serving on {server.base_url} (url_template {server.url_template})", file=sys.stderr)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
