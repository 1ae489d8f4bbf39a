"""Build trees in kmod_build's output layout (docs/internals.md) for the kmod_archive tests.

``make_build`` writes ``lib/modules/<kver>/*.ko`` (real ELF relocatable files with a ``.modinfo``
section, so a pull's module check reads them), ``lib/*.so*`` (with a symlink), ``bin/*``,
``build.log`` and a ``manifest.json`` whose checksums are right. ``make_legacy_archive`` writes
an archive the way the original bash tool did (``tar -czf`` of ``<driver>/<version>/...``).
``make_ko`` writes one module; ``rewrite_manifest`` makes a tree self-consistent again after a
test changed it (a forged build); ``make_ssh_key`` an OpenSSH key pair for signed builds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Optional

IDENT = {
    "os": "flatcar", "board": "amd64-usr", "os_version": "9001.1.0", "channel": "stable",
    "kernel_release": "6.1.0-47-amd64", "driver": "nvidia", "driver_version": "535.261.03",
    "module_type": "proprietary", "signing_key_fingerprint": None,
}


def make_ko(name: str, kver: str, payload: bytes = b"", vermagic: Optional[str] = None) -> bytes:
    """A relocatable ELF64 (x86-64, little endian) kernel module: ``.text`` holding ``payload`` and
    ``.modinfo`` with ``name``, ``license`` and ``vermagic`` (``<kver> SMP preempt mod_unload modversions``)."""
    vermagic = vermagic if vermagic is not None else f"{kver} SMP preempt mod_unload modversions "
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in
                       (("license", "GPL"), ("depends", ""), ("name", name.replace("-", "_")), ("vermagic", vermagic)))
    sections = [(".text", 1, payload or b"\xc3" * 16), (".modinfo", 1, modinfo)]
    shstr = b"\0" + b"".join(n.encode() + b"\0" for n, _t, _d in sections) + b".shstrtab\0"
    blobs = [d for _n, _t, d in sections] + [shstr]
    body, offsets, pos = b"", [], 64
    for blob in blobs:
        pad = (-pos) % 8
        body += b"\0" * pad + blob
        offsets.append(pos + pad)
        pos += pad + len(blob)
    pad = (-pos) % 8
    body += b"\0" * pad
    shoff = pos + pad
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(blobs) + 1, len(blobs))
    shdrs = b"\0" * 64
    name_off = 1
    for i, blob in enumerate(blobs):
        label = sections[i][0] if i < len(sections) else ".shstrtab"
        kind = 3 if label == ".shstrtab" else 1
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, kind, 2, 0, offsets[i], len(blob), 0, 0, 8, 0)
        name_off += len(label) + 1
    return header + body + shdrs


def _ko(name: str, kver: str, size: int, rng: random.Random) -> bytes:
    body = bytes(rng.getrandbits(8) for _ in range(min(size, 4096)))
    return make_ko(name, kver, (body * (size // max(len(body), 1) + 1))[:size])


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
        files[f"lib/modules/{kver}/nvidia-big.ko"] = make_ko("nvidia-big", kver, os.urandom(big_random))
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


def make_legacy_archive(path: Path, ident: Optional[dict] = None, with_dot: bool = False,
                        extra: Optional[dict[str, bytes]] = None, raw_members: Optional[dict[str, bytes]] = None,
                        ) -> dict[str, bytes]:
    """An archive in the original tool's layout; returns {relpath: content} of its files. ``extra``
    adds files below the build root (replacing any of the same name); ``raw_members`` adds members
    by their exact tar name (absolute paths, ``..``) outside the build root."""
    ident = dict(IDENT, **(ident or {}))
    kver = ident["kernel_release"]
    top = f"{'./' if with_dot else ''}{ident['driver']}/{ident['driver_version']}/"
    files = {
        f"lib/modules/{kver}/nvidia.ko": make_ko("nvidia", kver, b"k" * 5000, f"{kver} SMP mod_unload "),
        f"lib/modules/{kver}/nvidia-uvm.ko": make_ko("nvidia-uvm", kver, b"u" * 3000, f"{kver} SMP mod_unload "),
        "lib/libnvidia-ml.so.535.261.03": b"\x7fELF lib" * 100,
        "bin/nvidia-smi": b"#!/bin/sh\necho legacy\n",
    }
    files.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(top + rel)
            info.size = len(data)
            info.mode = 0o755 if rel.startswith("bin/") else 0o644
            info.mtime = 1500000000
            tar.addfile(info, io.BytesIO(data))
        for name, data in sorted((raw_members or {}).items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return files


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def archive_path_for(store_dir: Path, key: str) -> Path:
    return store_dir.joinpath(*key.split("/"))


def rewrite_manifest(root: Path, drop_archive: bool = True) -> dict:
    """Make the manifest of ``root`` describe its files again (sha256, size, mode; links), as a
    forger who changed files would; returns the manifest."""
    manifest = manifest_of(root)
    if drop_archive:
        manifest.pop("archive", None)
    files: dict[str, dict] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "manifest.json" or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink():
            files[rel] = {"link": os.readlink(path)}
            continue
        data = path.read_bytes()
        files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": "%04o" % (path.stat().st_mode & 0o777)}
    manifest["files"] = files
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def make_ssh_key(directory: Path, name: str = "fleet") -> tuple[Path, str]:
    """An ed25519 OpenSSH key pair without passphrase; returns (private key path, public key line)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"modulus test {name}", "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL)
    return key, (directory / f"{name}.pub").read_text().strip()


def ssh_fingerprint(pub_line: str) -> str:
    """``SHA256:...`` of an OpenSSH public key line (what ``ssh-keygen -l`` prints)."""
    import base64

    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
