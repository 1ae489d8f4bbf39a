"""Build trees in kmod_build's output layout (docs/internals.md) for the kmod_archive tests.

``make_build`` writes ``lib/modules/<kver>/*.ko``, ``lib/*.so*`` (with a symlink), ``bin/*``,
``build.log`` and a ``manifest.json`` whose checksums are right. ``make_legacy_archive`` writes
an archive the way the original bash tool did (``tar -czf`` of ``<driver>/<version>/...``)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Optional

IDENT = {
    "os": "flatcar", "board": "amd64-usr", "os_version": "9001.1.0", "channel": "stable",
    "kernel_release": "6.1.0-47-amd64", "driver": "nvidia", "driver_version": "535.261.03",
    "module_type": "proprietary", "signing_key_fingerprint": None,
}


def _ko(name: str, kver: str, size: int, rng: random.Random) -> bytes:
    head = b"\x7fELF" + b"\x00" * 60 + f"vermagic={kver} SMP preempt mod_unload modversions \x00name={name}\x00".encode()
    body = bytes(rng.getrandbits(8) for _ in range(min(size, 4096)))
    return head + (body * (size // max(len(body), 1) + 1))[: max(0, size - len(head))]


def make_build(root: Path, ident: Optional[dict] = None, big_random: int = 0, big_text: int = 0,
               seed: int = 1) -> Path:
    """Write a build tree under ``root``; returns ``root``. ``big_random``/``big_text`` add bytes
    of incompressible data (a module) and of compressible text (the build log)."""
    ident = dict(IDENT, **(ident or {}))
    rng = random.Random(seed)
    kver = ident["kernel_release"]
    files: dict[str, bytes] = {}
    modes: dict[str, str] = {}
    for name in ("nvidia", "nvidia-uvm", "nvidia-modeset"):
        files[f"lib/modules/{kver}/{name}.ko"] = _ko(name, kver, 20000 + rng.randint(0, 5000), rng)
    files["lib/libnvidia-ml.so.535.261.03"] = b"\x7fELF shared object " * 200
    files["bin/nvidia-smi"] = b"#!/bin/sh\necho nvidia-smi\n"
    modes["bin/nvidia-smi"] = "0755"
    log = b"".join(b"CC [M]  /src/nvidia/file%05d.o\n" % i for i in range(200))
    if big_text:
        line = b"  CC [M]  /src/kernel-open/nvidia/nv-something-long-name.o -O2 -Wall\n"
        log += (line * (big_text // len(line) + 1))[:big_text]
    files["build.log"] = log
    if big_random:
        files[f"lib/modules/{kver}/nvidia-big.ko"] = os.urandom(big_random)
    root.mkdir(parents=True, exist_ok=True)
    manifest_files: dict[str, dict] = {}
    for rel, data in sorted(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        mode = modes.get(rel, "0644")
        os.chmod(path, int(mode, 8))
        manifest_files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}
    link = root / "lib/libnvidia-ml.so.1"
    link.symlink_to("libnvidia-ml.so.535.261.03")
    manifest_files["lib/libnvidia-ml.so.1"] = {"link": "libnvidia-ml.so.535.261.03"}
    manifest = {
        "schema": 1, **{k: ident[k] for k in IDENT},
        "source_sha256": "0" * 64, "inputs_sha256": "1" * 64,
        "toolchain": {"gcc": "12.2.0", "make": "4.3"},
        "files": manifest_files,
        "modules": [{"name": Path(rel).name[:-3], "file": rel, "vermagic": kver, "depends": [], "signer": None,
                     "size": manifest_files[rel]["size"]} for rel in sorted(manifest_files) if rel.endswith(".ko")],
        "build_time": "2026-11-25T22:00:00Z",
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def make_legacy_archive(path: Path, ident: Optional[dict] = None, with_dot: bool = False) -> dict[str, bytes]:
    """An archive in the original tool's layout; returns {relpath: content} of its files."""
    ident = dict(IDENT, **(ident or {}))
    kver = ident["kernel_release"]
    top = f"{'./' if with_dot else ''}{ident['driver']}/{ident['driver_version']}/"
    files = {
        f"lib/modules/{kver}/nvidia.ko": b"\x7fELF" + f"vermagic={kver} SMP mod_unload \x00".encode() + b"k" * 5000,
        f"lib/modules/{kver}/nvidia-uvm.ko": b"\x7fELF" + f"vermagic={kver} SMP mod_unload \x00".encode() + b"u" * 3000,
        "lib/libnvidia-ml.so.535.261.03": b"\x7fELF lib" * 100,
        "bin/nvidia-smi": b"#!/bin/sh\necho legacy\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(top + rel)
            info.size = len(data)
            info.mode = 0o755 if rel.startswith("bin/") else 0o644
            info.mtime = 1500000000
            tar.addfile(info, io.BytesIO(data))
    return files


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def archive_path_for(store_dir: Path, key: str) -> Path:
    return store_dir.joinpath(*key.split("/"))
