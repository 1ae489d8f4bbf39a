"""Boot Debian's real kernel under QEMU and try to load kernel modules into it.

The proof that a module fits a kernel is that the kernel accepts it. This fixture:

1. fetches Debian's ``linux-image-<kver>`` with ``apt-get download``, unpacks it with
   ``dpkg -x`` and runs ``depmod -b`` on it (cached under ``$MODULUS_SIM_CACHE/kernels/<kver>``);
2. builds a busybox-static initramfs holding the modules under test, the kernel's own modules
   they depend on (resolved through the package's ``modules.dep``, loaded in dependency order), and
   an ``/init`` that ``insmod``\\s each one, prints one ``MODRESULT`` line per module and the
   content of ``/proc/modules`` to the serial console, then powers off;
3. runs ``qemu-system-x86_64 -m 1024 -nographic -no-reboot -kernel vmlinuz -initrd initrd.gz
   -append 'console=ttyS0 panic=-1'`` with a timeout (TCG; about 7 s per boot here);
4. returns the parsed result per module: return code and the message ``insmod`` printed
   (``No such device``, ``Invalid module format``, ``Unknown symbol in module`` ...).

Usage::

    from sim.qemu import boot_and_load
    res = boot_and_load("6.1.0-50-amd64", [Path("hello.ko")])
    res.results["modulus_hello"].ok, res.loaded
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sim.kit import cache_root

BUSYBOX = "/bin/busybox"
START = "MODULUS-QEMU-START"
END = "MODULUS-QEMU-END"


@dataclass
class LoadResult:
    name: str
    file: str
    rc: int
    message: str
    is_dependency: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class BootResult:
    kernel_release: str
    results: dict[str, LoadResult]
    loaded: list[str]  # /proc/modules after the loads
    console: str
    duration: float
    booted: bool
    dependencies: list[str] = field(default_factory=list)


def kernel_dir(kver: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Debian's linux-image-<kver> unpacked (cached): boot/vmlinuz-<kver>, lib/modules/<kver>."""
    root = cache_root(cache_dir) / "kernels" / kver
    vmlinuz = root / "boot" / f"vmlinuz-{kver}"
    if vmlinuz.is_file() and (root / "lib" / "modules" / kver / "modules.dep").is_file() and (root / ".done").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"kernel-{kver}-", dir=root.parent) as td:
        work = Path(td)
        os.chmod(work, 0o777)  # apt's sandbox user writes the download here
        p = subprocess.run(["apt-get", "download", "-q", f"linux-image-{kver}"], cwd=work,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        debs = sorted(work.glob("linux-image-*.deb"))
        if p.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download linux-image-{kver} failed: {p.stdout[-1500:]}")
        unpack = work / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpack)], check=True)
        if not (unpack / "boot" / f"vmlinuz-{kver}").is_file():
            raise RuntimeError(f"{debs[0].name} has no boot/vmlinuz-{kver}")
        # the package does not ship modules.dep (its postinst runs depmod): generate it
        depmod = shutil.which("depmod") or "/sbin/depmod"
        subprocess.run([depmod, "-b", str(unpack), kver], check=True)
        (unpack / ".done").write_text(debs[0].name + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.rename(unpack, root)
    return root


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """module name -> (relative path, [dependency names]) from a modules.dep file."""
    out: dict[str, tuple[str, list[str]]] = {}

    def name_of(path: str) -> str:
        base = os.path.basename(path)
        base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
        return base.replace("-", "_")

    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        out[name_of(path.strip())] = (path.strip(), [name_of(d) for d in deps.split()])
    return out


def dependency_order(wanted: list[str], depmap: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Kernel modules needed by ``wanted`` (transitively), dependencies first."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise RuntimeError("module dependency cycle: " + " -> ".join(stack + (name,)))
        if name not in depmap:
            raise RuntimeError(f"dependency {name} is not a module of this kernel (built in?)")
        for d in depmap[name][1]:
            visit(d, stack + (name,))
        seen.add(name)
        order.append(name)

    for w in wanted:
        visit(w.replace("-", "_"), ())
    return order


def _module_depends(ko: Path) -> list[str]:
    from ansible_collections.modulus.kmods.plugins.module_utils.elfmod import read_module
    return [d.replace("-", "_") for d in read_module(str(ko)).depends]


def _mod_name(ko: Path) -> str:
    from ansible_collections.modulus.kmods.plugins.module_utils.elfmod import read_module
    return read_module(str(ko)).name.replace("-", "_")


def build_initramfs(out: Path, modules: list[Path], kroot: Path, kver: str) -> tuple[list[str], list[str]]:
    """Write the initramfs; returns (dependency module names in load order, test module names)."""
    if not os.path.isfile(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is missing (Debian package busybox-static)")
    moddir = kroot / "lib" / "modules" / kver
    depmap = parse_modules_dep((moddir / "modules.dep").read_text())
    names = [_mod_name(m) for m in modules]
    external: list[str] = []
    for m in modules:
        for d in _module_depends(m):
            if d not in names and d not in external:
                external.append(d)
    deps = dependency_order(external, depmap)
    with tempfile.TemporaryDirectory(prefix="initramfs-") as td:
        root = Path(td)
        for d in ("bin", "dev", "proc", "sys", "m", "d"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for applet in ("sh", "insmod", "cat", "echo", "mount", "reboot", "poweroff", "dmesg", "sleep"):
            os.symlink("busybox", root / "bin" / applet)
        os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        lines = ["#!/bin/sh", "mount -t proc proc /proc", "mount -t sysfs sys /sys",
                 "mount -t devtmpfs dev /dev 2>/dev/null", "echo 7 > /proc/sys/kernel/printk", f"echo {START}"]
        for i, dep in enumerate(deps):
            rel = depmap[dep][0]
            src = moddir / rel
            dest = root / "d" / f"{i:03d}-{os.path.basename(rel)}"
            if rel.endswith((".xz", ".zst")):
                tool = ["xz", "-dc"] if rel.endswith(".xz") else ["zstd", "-qdc"]
                dest = dest.with_suffix("")
                with open(dest, "wb") as fh:
                    subprocess.run([*tool, str(src)], stdout=fh, check=True)
            else:
                shutil.copyfile(src, dest)
            lines.append(_load_line(dep, "/d/" + dest.name, "dep"))
        for i, m in enumerate(modules):
            dest = root / "m" / f"{i:03d}-{m.name}"
            shutil.copyfile(m, dest)
            lines.append(_load_line(names[i], "/m/" + dest.name, "test"))
        lines += ['echo "MODULES-BEGIN"', "cat /proc/modules", 'echo "MODULES-END"', f"echo {END}",
                  "reboot -f", "sleep 30"]
        init = root / "init"
        init.write_text("\n".join(lines) + "\n")
        os.chmod(init, 0o755)
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, check=True, stdout=subprocess.PIPE).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=files,
                              check=True, stdout=subprocess.PIPE).stdout
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(cpio)
    return deps, names


def _load_line(name: str, path: str, kind: str) -> str:
    return (f'out=$(insmod {path} 2>&1); rc=$?; echo "MODRESULT {kind} {name} {os.path.basename(path)} rc=$rc $out"'
            .replace("\n", " "))


_RESULT_RE = re.compile(r"MODRESULT (dep|test) (\S+) (\S+) rc=(\d+) ?(.*)$")


def parse_console(console: str) -> tuple[dict[str, LoadResult], list[str], bool]:
    results: dict[str, LoadResult] = {}
    loaded: list[str] = []
    in_mods = False
    booted = START in console
    for raw in console.splitlines():
        line = raw.strip("\r")
        m = _RESULT_RE.search(line)
        if m:
            kind, name, fn, rc, msg = m.groups()
            results[name] = LoadResult(name=name, file=fn, rc=int(rc), message=msg.strip(), is_dependency=kind == "dep")
            continue
        if line.strip() == "MODULES-BEGIN":
            in_mods = True
            continue
        if line.strip() == "MODULES-END":
            in_mods = False
            continue
        if in_mods and line.strip() and not line.lstrip().startswith("["):
            loaded.append(line.split()[0])
    return results, loaded, booted


def boot_and_load(kver: str, modules: list[Path], timeout: float = 180.0,
                  cache_dir: str | os.PathLike[str] | None = None, memory_mb: int = 1024) -> BootResult:
    """Boot Debian's kernel ``kver`` under QEMU and insmod ``modules`` (in the given order, after
    the kernel modules they depend on)."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise RuntimeError("qemu-system-x86_64 is missing (Debian package qemu-system-x86)")
    kroot = kernel_dir(kver, cache_dir)
    with tempfile.TemporaryDirectory(prefix="qemu-") as td:
        initrd = Path(td) / "initrd.gz"
        deps, _names = build_initramfs(initrd, [Path(m) for m in modules], kroot, kver)
        cmd = [qemu, "-m", str(memory_mb), "-nographic", "-no-reboot", "-kernel", str(kroot / "boot" / f"vmlinuz-{kver}"),
               "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 loglevel=4"]
        if os.environ.get("MODULUS_QEMU_KVM") == "1" and os.access("/dev/kvm", os.W_OK):
            cmd[1:1] = ["-enable-kvm"]  # opt-in: nested KVM is unreliable on CI VMs, TCG always works
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            console = out.decode("utf-8", "replace")
            raise RuntimeError(f"QEMU did not finish within {timeout:.0f} s; console tail:\n{console[-3000:]}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    console = out.decode("utf-8", "replace")
    results, loaded, booted = parse_console(console)
    return BootResult(kernel_release=kver, results=results, loaded=loaded, console=console,
                      duration=time.monotonic() - started, booted=booted and END in console, dependencies=deps)


# --------------------------------------------------------------------------- running a script in the guest
# (added for kmod_install: the boot loader script and a sysext image's content, tried in the real kernel)

SCRIPT_BEGIN = "MODULUS-SCRIPT-BEGIN"
SCRIPT_END = "MODULUS-SCRIPT-END"
_SCRIPT_RC_RE = re.compile(r"MODULUS-SCRIPT-RC=(\d+)")


@dataclass
class ScriptResult:
    kernel_release: str
    output: str  # what the script printed (stdout and stderr), between the markers
    rc: int | None  # the script's exit status (None when it never finished)
    loaded: list[str]  # /proc/modules after the script
    console: str
    duration: float
    booted: bool
    kernel_modules: list[str] = field(default_factory=list)  # the kernel's own modules loaded before the script


def _copy_into(root: Path, guest_path: str, src: Path) -> None:
    dest = root / guest_path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dest, follow_symlinks=False)


def build_script_initramfs(out: Path, script: str, files: dict[str, Path], kroot: Path, kver: str,
                           kernel_modules: list[str]) -> list[str]:
    """An initramfs whose /init installs every busybox applet in /bin, mounts /proc, /sys, /dev and a
    tmpfs on /run, insmods ``kernel_modules`` (the kernel's own, with their dependencies, in order),
    then runs ``script`` with busybox sh and prints its output between markers. ``files`` maps guest
    paths to host files or directories (copied with their symlinks). Returns the kernel modules loaded."""
    if not os.path.isfile(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is missing (Debian package busybox-static)")
    moddir = kroot / "lib" / "modules" / kver
    depmap = parse_modules_dep((moddir / "modules.dep").read_text())
    deps = dependency_order(kernel_modules, depmap) if kernel_modules else []
    with tempfile.TemporaryDirectory(prefix="initramfs-") as td:
        root = Path(td)
        for d in ("bin", "dev", "proc", "sys", "run", "tmp", "d", "mnt"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        os.symlink("busybox", root / "bin" / "sh")
        os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        for guest, src in files.items():
            _copy_into(root, guest, Path(src))
        lines = ["#!/bin/sh", "/bin/busybox --install -s /bin", "export PATH=/bin",
                 "mount -t proc proc /proc", "mount -t sysfs sys /sys", "mount -t devtmpfs dev /dev 2>/dev/null",
                 "mount -t tmpfs run /run", "echo 4 > /proc/sys/kernel/printk", f"echo {START}"]
        for i, dep in enumerate(deps):
            rel = depmap[dep][0]
            dest = root / "d" / f"{i:03d}-{os.path.basename(rel)}"
            if rel.endswith((".xz", ".zst")):
                tool = ["xz", "-dc"] if rel.endswith(".xz") else ["zstd", "-qdc"]
                dest = dest.with_suffix("")
                with open(dest, "wb") as fh:
                    subprocess.run([*tool, str(moddir / rel)], stdout=fh, check=True)
            else:
                shutil.copyfile(moddir / rel, dest)
            lines.append(_load_line(dep, "/d/" + dest.name, "dep"))
        (root / "script").write_text(script)
        lines += [f"echo {SCRIPT_BEGIN}", "sh /script 2>&1; echo MODULUS-SCRIPT-RC=$?", f"echo {SCRIPT_END}",
                  'echo "MODULES-BEGIN"', "cat /proc/modules", 'echo "MODULES-END"', f"echo {END}",
                  "reboot -f", "sleep 30"]
        init = root / "init"
        init.write_text("\n".join(lines) + "\n")
        os.chmod(init, 0o755)
        files_list = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, check=True,
                                    stdout=subprocess.PIPE).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=files_list,
                              check=True, stdout=subprocess.PIPE).stdout
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(cpio)
    return deps


def boot_and_run(kver: str, script: str, files: dict[str, Path] | None = None, kernel_modules: list[str] | None = None,
                 timeout: float = 240.0, cache_dir: str | os.PathLike[str] | None = None,
                 memory_mb: int = 1024) -> ScriptResult:
    """Boot Debian's kernel ``kver`` under QEMU with ``files`` in the initramfs, load the kernel's own
    ``kernel_modules`` (e.g. ``loop``, ``squashfs``, ``overlay``), run ``script`` with busybox sh as
    root and return what it printed, its exit status and ``/proc/modules`` afterwards."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise RuntimeError("qemu-system-x86_64 is missing (Debian package qemu-system-x86)")
    kroot = kernel_dir(kver, cache_dir)
    with tempfile.TemporaryDirectory(prefix="qemu-") as td:
        initrd = Path(td) / "initrd.gz"
        deps = build_script_initramfs(initrd, script, dict(files or {}), kroot, kver, list(kernel_modules or []))
        cmd = [qemu, "-m", str(memory_mb), "-nographic", "-no-reboot", "-kernel", str(kroot / "boot" / f"vmlinuz-{kver}"),
               "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 loglevel=4"]
        if os.environ.get("MODULUS_QEMU_KVM") == "1" and os.access("/dev/kvm", os.W_OK):
            cmd[1:1] = ["-enable-kvm"]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"QEMU did not finish within {timeout:.0f} s; console tail:\n"
                               f"{out.decode('utf-8', 'replace')[-3000:]}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    console = out.decode("utf-8", "replace").replace("\r", "")
    _results, loaded, booted = parse_console(console)
    body = console.split(SCRIPT_BEGIN + "\n", 1)[1].split(SCRIPT_END, 1)[0] if SCRIPT_BEGIN + "\n" in console else ""
    match = _SCRIPT_RC_RE.search(body)
    output = _SCRIPT_RC_RE.sub("", body).strip()
    return ScriptResult(kernel_release=kver, output=output, rc=int(match.group(1)) if match else None, loaded=loaded,
                        console=console, duration=time.monotonic() - started, booted=booted and END in console,
                        kernel_modules=deps)
