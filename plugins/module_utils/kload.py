# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The load plan of a build: which kernel modules to load, in which order, with which parameters,
which device nodes to create and how to verify, as data (``LoadPlan``), as configuration files
(``modprobe.d``, ``modules-load.d``) and as a POSIX shell script that busybox runs too.

One plan serves every place a build is loaded: ``kmod_install state=loaded`` executes it on the
running kernel (``execute``), the boot-time loader ``/opt/modulus/bin/modulus-load-<driver>`` is
``render_script`` of it, and the QEMU test runs that same script in the guest.

- Prerequisites (kernel modules of the release, loaded with the kernel's ``modprobe``): per driver,
  for NVIDIA ``ipmi_msghandler ipmi_devintf i2c_core`` and ``drm drm_kms_helper`` before ``nvidia-drm``
  (``Unknown symbol i2c_add_adapter`` is what users hit without ``i2c_core``).
- The build's modules in dependency order from the manifest's ``modules[].depends``; a dependency
  that is not part of the build (``drm``, ``video``) is loaded with ``modprobe`` first.
- The build's modules are loaded by path with ``insmod``: no module index is needed, so the same
  plan works from the ``/opt/drivers`` tree and from a merged sysext.
- NVIDIA: ``nouveau`` blacklisted, device nodes from ``nvidia-modprobe`` when the build ships it, else
  ``mknod`` with the majors of ``/proc/devices`` (``nvidiactl`` c 195 255, ``nvidiaN`` c 195 N per GPU of
  PCI vendor ``10de``, ``nvidia-uvm``/``nvidia-uvm-tools`` from the ``nvidia-uvm`` major).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ansible_collections.modulus.kmods.plugins.module_utils.common import LogFn, no_log, which
from ansible_collections.modulus.kmods.plugins.module_utils.identity import NVIDIA

NVIDIA_VENDOR = "0x10de"
NVIDIA_MAJOR = 195
NVIDIA_CTL_MINOR = 255
NVIDIA_MODESET_MINOR = 254
NVIDIA_PREREQUISITES = ("ipmi_msghandler", "ipmi_devintf", "i2c_core")
NVIDIA_DRM_PREREQUISITES = ("drm", "drm_kms_helper")
NOUVEAU_BLACKLIST = "blacklist nouveau\noptions nouveau modeset=0\n"
_PARAM_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_MODNAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


class LoadError(ValueError):
    """A load plan cannot be made (unknown module, dependency cycle, bad parameter); the message says which."""


def norm(name: str) -> str:
    """The kernel's name of a module: ``nvidia-drm`` and ``nvidia_drm`` are the same module."""
    return name.strip().replace("-", "_")


def check_module_name(option: str, name: Any) -> str:
    value = norm(str(name)) if isinstance(name, str) else ""
    if not _MODNAME_RE.fullmatch(value):
        raise LoadError(f"{option}: {name!r} is not a kernel module name")
    return value


@dataclass
class Step:
    """One command of a plan: ``modprobe NAME`` (a module of the kernel) or ``insmod FILE PARAMS``
    (a module of the build, ``file`` relative to the build's module directory)."""
    action: str  # modprobe | insmod
    module: str
    file: Optional[str] = None
    params: list[str] = field(default_factory=list)
    why: str = ""

    def argv(self, module_dir: str, modprobe: str = "modprobe", insmod: str = "insmod") -> list[str]:
        if self.action == "modprobe":
            return [modprobe, self.module]
        return [insmod, os.path.join(module_dir, self.file or "")] + self.params

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "module": self.module, "file": self.file, "params": list(self.params),
                "why": self.why}


@dataclass
class DeviceNode:
    path: str
    major: int
    minor: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "major": self.major, "minor": self.minor}


@dataclass
class LoadPlan:
    driver: str
    kernel_release: str
    steps: list[Step]
    modules: list[str]  # the build's modules to load, dependencies first
    prerequisites: list[str]
    external: list[str]  # dependencies outside the build, loaded with modprobe
    parameters: dict[str, list[str]]
    device_nodes: bool
    nvidia_modprobe: Optional[str]  # path relative to the build (bin/nvidia-modprobe) when shipped
    persistenced: Optional[str]  # path relative to the build (bin/nvidia-persistenced) when asked and shipped
    verify_command: list[str]
    blacklist: list[str]

    @property
    def is_nvidia(self) -> bool:
        return self.driver.lower() == NVIDIA

    def as_dict(self) -> dict[str, Any]:
        return {"driver": self.driver, "kernel_release": self.kernel_release, "modules": list(self.modules),
                "prerequisites": list(self.prerequisites), "external": list(self.external),
                "steps": [s.as_dict() for s in self.steps], "parameters": dict(self.parameters),
                "device_nodes": self.device_nodes, "nvidia_modprobe": self.nvidia_modprobe,
                "persistenced": self.persistenced, "verify_command": list(self.verify_command),
                "blacklist": list(self.blacklist)}


# --------------------------------------------------------------------------- ordering


def build_modules(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The build's modules by kernel name: ``{"file": relative to lib/modules/<kver>, "depends": [...]}``."""
    kver = manifest.get("kernel_release") or ""
    prefix = f"lib/modules/{kver}/"
    out: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("modules") or []:
        name = norm(str(entry.get("name") or ""))
        rel = str(entry.get("file") or "")
        if not name or not rel.startswith(prefix):
            raise LoadError(f"manifest module entry {entry!r} has no name or is not under {prefix}")
        out[name] = {"file": rel[len(prefix):], "depends": [norm(d) for d in entry.get("depends") or [] if d],
                     "srcversion": entry.get("srcversion")}
    return out


def dependency_order(depends: dict[str, list[str]], wanted: list[str]) -> tuple[list[str], list[str]]:
    """(modules of ``depends`` needed by ``wanted``, dependencies first; dependencies that are not
    keys of ``depends``, in first-needed order). A cycle raises ``LoadError``."""
    order: list[str] = []
    external: list[str] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in stack:
            raise LoadError("module dependency cycle: " + " -> ".join(stack + (name,)))
        if name not in depends:
            if name not in external:
                external.append(name)
            return
        for dep in depends[name]:
            visit(dep, stack + (name,))
        done.add(name)
        order.append(name)

    for want in wanted:
        if want not in depends:
            raise LoadError("modules: {!r} is not a module of this build (it has {})".format(
                want, ", ".join(sorted(depends)) or "none"))
        visit(want, ())
    return order, external


def default_prerequisites(driver: str, modules: list[str]) -> list[str]:
    """Kernel modules to load before the build's: NVIDIA's ipmi/i2c, and drm for nvidia-drm."""
    if driver.lower() != NVIDIA:
        return []
    out = list(NVIDIA_PREREQUISITES)
    if "nvidia_drm" in modules:
        out += list(NVIDIA_DRM_PREREQUISITES)
    return out


# --------------------------------------------------------------------------- parameters


def _param_value(module: str, key: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if any(c in text for c in "\n\r\x00") or (" " in text and not (text.startswith('"') and text.endswith('"'))):
        if any(c in text for c in '\n\r\x00"'):
            raise LoadError(f"module_parameters.{module}.{key}: {value!r} holds a newline, NUL or quote")
        text = f'"{text}"'
    return text


def parse_parameters(module: str, value: Union[None, str, dict[str, Any]]) -> list[str]:
    """``key=value`` words of one module's parameters (a dict, or a string as on a modprobe line)."""
    if value in (None, "", {}):
        return []
    if isinstance(value, dict):
        words = []
        for key, val in value.items():
            if not _PARAM_KEY_RE.fullmatch(str(key)):
                raise LoadError(f"module_parameters.{module}: {key!r} is not a parameter name")
            words.append(f"{key}={_param_value(module, str(key), val)}")
        return words
    if not isinstance(value, str):
        raise LoadError(f"module_parameters.{module}: expected a dict or a string, not {type(value).__name__}")
    if any(c in value for c in "\n\r\x00"):
        raise LoadError(f"module_parameters.{module}: {value!r} holds a newline or NUL")
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise LoadError(f"module_parameters.{module}: {value!r}: {exc}") from None
    out = []
    for word in words:
        key, sep, val = word.partition("=")
        if not _PARAM_KEY_RE.fullmatch(key):
            raise LoadError(f"module_parameters.{module}: {word!r} is not key=value")
        out.append(f"{key}={_param_value(module, key, val)}" if sep else key)
    return out


def parameters_by_module(value: Optional[dict[str, Any]], known: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for module, params in (value or {}).items():
        name = check_module_name("module_parameters", module)
        if name not in known:
            raise LoadError("module_parameters: {!r} is not a module this plan loads ({})".format(
                module, ", ".join(known) or "none"))
        words = parse_parameters(name, params)
        if words:
            out[name] = words
    return out


# --------------------------------------------------------------------------- the plan


def load_plan(manifest: dict[str, Any], *, modules: Optional[list[str]] = None,
              prerequisites: Optional[list[str]] = None, parameters: Optional[dict[str, Any]] = None,
              device_nodes: Optional[bool] = None, persistenced: bool = False,
              verify_command: Optional[Union[str, list[str]]] = None,
              files: Optional[dict[str, Any]] = None) -> LoadPlan:
    """The plan for a build's manifest. ``modules``: which to load (default all, dependencies are
    added); ``prerequisites``: None for the driver's default, [] for none; ``verify_command``: None
    for the default (``nvidia-smi`` when the build ships it), "" or [] for none."""
    driver = str(manifest.get("driver") or "")
    kver = str(manifest.get("kernel_release") or "")
    files = files if files is not None else (manifest.get("files") or {})
    mods = build_modules(manifest)
    depends = {name: [d for d in m["depends"] if d != name] for name, m in mods.items()}
    wanted = [check_module_name("modules", m) for m in modules] if modules else sorted(mods)
    order, external = dependency_order(depends, wanted)
    prereq = (default_prerequisites(driver, order) if prerequisites is None
              else [check_module_name("prerequisites", p) for p in prerequisites])
    params = parameters_by_module(parameters, order)
    steps: list[Step] = []
    seen: set[str] = set()
    for name in prereq:
        if name not in seen:
            seen.add(name)
            steps.append(Step("modprobe", name, why="prerequisite"))
    for name in external:
        if name not in seen and name not in mods:
            seen.add(name)
            steps.append(Step("modprobe", name, why="dependency of the build"))
    for name in order:
        steps.append(Step("insmod", name, file=mods[name]["file"], params=params.get(name, []), why="build"))
    nvidia = driver.lower() == NVIDIA
    verify: list[str]
    if verify_command is None:
        verify = ["nvidia-smi"] if nvidia and "bin/nvidia-smi" in files else []
    elif isinstance(verify_command, str):
        verify = shlex.split(verify_command)
    else:
        verify = [str(a) for a in verify_command]
    return LoadPlan(
        driver=driver, kernel_release=kver, steps=steps, modules=order, prerequisites=prereq,
        external=[e for e in external if e not in prereq], parameters=params,
        device_nodes=nvidia if device_nodes is None else bool(device_nodes),
        nvidia_modprobe="bin/nvidia-modprobe" if nvidia and "bin/nvidia-modprobe" in files else None,
        persistenced="bin/nvidia-persistenced" if persistenced and "bin/nvidia-persistenced" in files else None,
        verify_command=verify, blacklist=["nouveau"] if nvidia else [])


# --------------------------------------------------------------------------- configuration files


def modprobe_conf(plan: LoadPlan) -> str:
    """``/etc/modprobe.d/modulus-<driver>.conf``: blacklist and module options."""
    lines = [f"# modulus.kmods kmod_install: {plan.driver} (managed file, rewritten on every install)"]
    if "nouveau" in plan.blacklist:
        lines += NOUVEAU_BLACKLIST.splitlines()
    for name in plan.modules:
        if plan.parameters.get(name):
            lines.append(f"options {name} " + " ".join(plan.parameters[name]))
    return "\n".join(lines) + "\n"


def modules_load_conf(plan: LoadPlan) -> str:
    """A ``modules-load.d`` file: the build's modules in load order (prerequisites first)."""
    lines = [f"# modulus.kmods kmod_install: {plan.driver}"] + plan.prerequisites + [
        e for e in plan.external if e not in plan.prerequisites] + plan.modules
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the host's devices


def nvidia_gpus(host_root: str = "/") -> list[str]:
    """PCI addresses of NVIDIA display/3D controllers (vendor 0x10de, class 0x03xxxx)."""
    found = []
    for vendor_path in sorted(glob.glob(os.path.join(host_root, "sys/bus/pci/devices/*/vendor"))):
        device = os.path.dirname(vendor_path)
        try:
            with open(vendor_path, encoding="ascii", errors="replace") as handle:
                vendor = handle.read().strip().lower()
            with open(os.path.join(device, "class"), encoding="ascii", errors="replace") as handle:
                klass = handle.read().strip().lower()
        except OSError:
            continue
        if vendor == NVIDIA_VENDOR and klass.startswith("0x03"):
            found.append(os.path.basename(device))
    return found


def parse_proc_devices(text: str) -> dict[str, int]:
    """Character device majors by name from ``/proc/devices``."""
    majors: dict[str, int] = {}
    in_char = False
    for line in text.splitlines():
        if line.strip().lower().startswith("character devices"):
            in_char = True
            continue
        if line.strip().lower().startswith("block devices"):
            in_char = False
            continue
        parts = line.split()
        if in_char and len(parts) == 2 and parts[0].isdigit():
            majors.setdefault(parts[1], int(parts[0]))
    return majors


def device_node_plan(plan: LoadPlan, majors: dict[str, int], gpu_count: int) -> list[DeviceNode]:
    """The NVIDIA device nodes for ``gpu_count`` GPUs from the majors of ``/proc/devices``."""
    if not plan.is_nvidia or not plan.device_nodes or gpu_count <= 0:
        return []
    major = majors.get("nvidia-frontend", majors.get("nvidia", NVIDIA_MAJOR))
    nodes = [DeviceNode(f"/dev/nvidia{i}", major, i) for i in range(gpu_count)]
    nodes.append(DeviceNode("/dev/nvidiactl", major, NVIDIA_CTL_MINOR))
    if "nvidia_modeset" in plan.modules:
        nodes.append(DeviceNode("/dev/nvidia-modeset", major, NVIDIA_MODESET_MINOR))
    if "nvidia_uvm" in plan.modules and "nvidia-uvm" in majors:
        nodes.append(DeviceNode("/dev/nvidia-uvm", majors["nvidia-uvm"], 0))
        nodes.append(DeviceNode("/dev/nvidia-uvm-tools", majors["nvidia-uvm"], 1))
    return nodes


def loaded_modules(host_root: str = "/") -> dict[str, int]:
    """Loaded modules and their use counts, from ``/proc/modules``."""
    out: dict[str, int] = {}
    try:
        with open(os.path.join(host_root, "proc/modules"), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 3:
                    out[parts[0]] = int(parts[2]) if parts[2].isdigit() else 0
    except OSError:
        pass
    return out


def loaded_srcversion(name: str, host_root: str = "/") -> Optional[str]:
    try:
        with open(os.path.join(host_root, "sys/module", name, "srcversion"), encoding="ascii") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


# --------------------------------------------------------------------------- the shell script


def render_script(plan: LoadPlan, module_dirs: list[str], *, tree_link: Optional[str] = None,
                  tree_by_kernel: Optional[str] = None, firmware_dir: Optional[str] = None) -> str:
    """A POSIX shell script (bash, dash and busybox sh) that loads ``plan`` on the running kernel.

    The build's modules are looked for in the first existing of ``module_dirs`` (``$K`` is
    ``uname -r``). With ``tree_link`` and ``tree_by_kernel`` (the tree method), the script first
    points the ``/opt/drivers/<driver>`` symlink at ``<tree_by_kernel>/$K`` when that exists and runs
    ``ldconfig``. Exit status: 0 when loaded, or when there is nothing to load (no build for this
    kernel, no NVIDIA GPU), 1 when a module failed to load."""
    q = shlex.quote
    out = [
        "#!/bin/sh",
        f"# modulus.kmods: load {plan.driver} ({', '.join(plan.modules)}) for the running kernel.",
        "# Written by kmod_install; runs at boot from modulus-load-<driver>.service, or by hand.",
        "K=$(uname -r)",
        "say() { echo \"modulus-load: $*\"; }",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH",
    ]
    if tree_link and tree_by_kernel:
        out += [
            f'if [ -d {q(tree_by_kernel)}/"$K" ]; then',
            f'  T=$(readlink {q(tree_by_kernel)}/"$K")',
            f'  if [ "$(readlink {q(tree_link)} 2>/dev/null)" != "$T" ]; then',
            f'    ln -sfn "$T" {q(tree_link)}.new && mv -Tf {q(tree_link)}.new {q(tree_link)} 2>/dev/null'
            f' || {{ rm -f {q(tree_link)}; mv {q(tree_link)}.new {q(tree_link)}; }}',
            "    command -v ldconfig >/dev/null 2>&1 && ldconfig",
            "  fi",
            "fi",
        ]
    out.append("D=")
    for directory in module_dirs:
        out.append(f'[ -z "$D" ] && [ -d "{directory}" ] && D="{directory}"')
    out += ['if [ -z "$D" ]; then say "no ' + plan.driver + ' build for kernel $K here; nothing to load"; exit 0; fi']
    if plan.is_nvidia:
        out += [
            "gpus=0",
            "for v in /sys/bus/pci/devices/*/vendor; do",
            '  [ -e "$v" ] || continue',
            '  c=$(cat "${v%/vendor}/class" 2>/dev/null)',
            f'  [ "$(cat "$v")" = "{NVIDIA_VENDOR}" ] && case "$c" in 0x03*) gpus=$((gpus + 1));; esac',
            "done",
            'if [ "$gpus" -eq 0 ]; then say "no NVIDIA GPU (PCI vendor 10de) on this host: not loading"; exit 0; fi',
        ]
    if firmware_dir:
        out += [f'[ -d {q(firmware_dir)} ] && [ -w /sys/module/firmware_class/parameters/path ] &&'
                f' echo {q(firmware_dir)} > /sys/module/firmware_class/parameters/path']
    out.append("rc=0")
    for step in plan.steps:
        if step.action == "modprobe":
            out.append(f'modprobe {q(step.module)} || say "warning: modprobe {step.module} failed ({step.why})"')
        else:
            params = " ".join(q(p) for p in step.params)
            out += [
                f"if [ -d /sys/module/{step.module} ]; then say \"{step.module} already loaded\"",
                f'elif insmod "$D/{step.file}" {params}; then say "loaded {step.module}"'.rstrip(),
                f'else say "FAILED to load {step.module}"; rc=1; fi',
            ]
    if plan.is_nvidia and plan.device_nodes:
        out += [
            'if [ "$rc" -eq 0 ]; then',
            '  if [ -n "$NVIDIA_MODPROBE" ] && [ -x "$NVIDIA_MODPROBE" ]; then',
            '    i=0; while [ "$i" -lt "$gpus" ]; do "$NVIDIA_MODPROBE" -c="$i"; i=$((i + 1)); done',
            '    "$NVIDIA_MODPROBE" -u -c=0 || true',
            "  else",
            f'    major=$(sed -n "s/^ *\\([0-9]*\\) nvidia-frontend$/\\1/p" /proc/devices); [ -n "$major" ] || major={NVIDIA_MAJOR}',
            '    i=0; while [ "$i" -lt "$gpus" ]; do [ -e /dev/nvidia$i ] || mknod -m 666 /dev/nvidia$i c "$major" "$i"; i=$((i + 1)); done',
            f'    [ -e /dev/nvidiactl ] || mknod -m 666 /dev/nvidiactl c "$major" {NVIDIA_CTL_MINOR}',
            '    uvm=$(sed -n "s/^ *\\([0-9]*\\) nvidia-uvm$/\\1/p" /proc/devices)',
            '    if [ -n "$uvm" ]; then',
            '      [ -e /dev/nvidia-uvm ] || mknod -m 666 /dev/nvidia-uvm c "$uvm" 0',
            '      [ -e /dev/nvidia-uvm-tools ] || mknod -m 666 /dev/nvidia-uvm-tools c "$uvm" 1',
            "    fi",
            "  fi",
            "fi",
        ]
    out += ['[ "$rc" -eq 0 ] && say "done"', 'exit "$rc"']
    if plan.is_nvidia and plan.device_nodes:
        # nvidia-modprobe sits beside the modules' tree (bin/) when the build ships it
        out.insert(out.index("rc=0"), 'NVIDIA_MODPROBE=""; for b in "$D/../../../bin/nvidia-modprobe" '
                   '/usr/bin/nvidia-modprobe; do [ -x "$b" ] && { NVIDIA_MODPROBE=$b; break; }; done')
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- executing on the host


Runner = Callable[[list[str]], tuple[int, str]]


def run_command(argv: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run a command, return (rc, combined output)."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        return 127, str(exc)
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not finish within {timeout:.0f} s"
    return proc.returncode, proc.stdout.decode("utf-8", "replace").strip()


@dataclass
class Executed:
    commands: list[dict[str, Any]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    failed: Optional[str] = None
    device_nodes: list[dict[str, Any]] = field(default_factory=list)
    verify: Optional[dict[str, Any]] = None


def execute(plan: LoadPlan, module_dir: str, *, build_dir: Optional[str] = None, run: Runner = run_command,
            gpu_count: int = 0, log: LogFn = no_log) -> Executed:
    """Load ``plan`` into the running kernel of this machine (host_root ``/``); stop at the first
    module of the build that fails. Prerequisites that fail are recorded, not fatal (they may be built in)."""
    done = Executed()
    present = loaded_modules("/")
    modprobe = which("modprobe") or "modprobe"
    insmod = which("insmod") or "insmod"
    for step in plan.steps:
        if step.module in present:
            done.already.append(step.module)
            continue
        argv = step.argv(module_dir, modprobe, insmod)
        rc, out = run(argv)
        log(f"{' '.join(argv)}: rc={rc} {out}")
        done.commands.append({"argv": argv, "rc": rc, "output": out[-2000:]})
        if rc != 0 and step.action == "insmod":
            done.failed = f"insmod {step.module} failed (rc={rc}): {out[-500:]}"
            return done
        if rc == 0:
            done.loaded.append(step.module)
    if plan.is_nvidia and plan.device_nodes and gpu_count:
        tool = os.path.join(build_dir, plan.nvidia_modprobe) if build_dir and plan.nvidia_modprobe else None
        if tool and os.access(tool, os.X_OK):
            for argv in [[tool, f"-c={i}"] for i in range(gpu_count)] + [[tool, "-u", "-c=0"]]:
                rc, out = run(argv)
                done.commands.append({"argv": argv, "rc": rc, "output": out[-2000:]})
        else:
            try:
                with open("/proc/devices", encoding="ascii", errors="replace") as handle:
                    majors = parse_proc_devices(handle.read())
            except OSError:
                majors = {}
            for node in device_node_plan(plan, majors, gpu_count):
                if not os.path.exists(node.path):
                    os.mknod(node.path, 0o666 | 0o020000, os.makedev(node.major, node.minor))
                    os.chmod(node.path, 0o666)
                done.device_nodes.append(node.as_dict())
    if plan.persistenced and build_dir:
        rc, out = run([os.path.join(build_dir, plan.persistenced)])
        done.commands.append({"argv": [plan.persistenced], "rc": rc, "output": out[-2000:]})
    if plan.verify_command:
        argv = list(plan.verify_command)
        if build_dir and "/" not in argv[0] and os.access(os.path.join(build_dir, "bin", argv[0]), os.X_OK):
            argv[0] = os.path.join(build_dir, "bin", argv[0])
        rc, out = run(argv)
        done.verify = {"argv": argv, "rc": rc, "output": out[-3000:]}
        if rc != 0:
            done.failed = f"verify command {' '.join(argv)} failed (rc={rc}): {out[-500:]}"
    return done
