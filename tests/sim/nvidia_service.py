"""Flatcar's ``nvidia.service`` in a simulated host root, as ``x11-drivers/nvidia-drivers-service`` installs it.

Every Flatcar image has it (flatcar/scripts, ``coreos-base/coreos`` depends on the package). Its ebuild:

    systemd_dounit nvidia.service                        -> /usr/lib/systemd/system/nvidia.service
    systemd_enable_service multi-user.target nvidia.service
        -> /usr/lib/systemd/system/multi-user.target.wants/nvidia.service -> ../nvidia.service
    exeinto /usr/lib/nvidia/bin; doexe install-nvidia setup-nvidia
    sed s/@PV@/${PV}/ nvidia-metadata -> /usr/share/flatcar/nvidia-metadata

The unit and ``setup-nvidia`` are Flatcar's own bytes (``tests/sim/flatcar/nvidia-drivers-service``).
``setup-nvidia`` gets a prelude of bash functions, inserted after its ``set -euo pipefail``, that stand in
for what cannot or must not happen here; the script's own logic (metadata override, the GPU check, the
skip rules, the copy into ``/opt/nvidia``, ``nvidia.conf``, the two load paths) runs unchanged:

- ``curl``: no network. ``curl -I`` answers 200 (the channel host); a download writes a stand-in file
  (for NVIDIA's ``.run``: a script that, run with ``-x``, makes the extracted directory with stand-ins of
  the libraries and tools). Every URL is recorded.
- ``sudo systemd-nspawn ... install-nvidia <name>``: recorded; makes what install-nvidia leaves
  (``install-mod/*.ko`` and ``modules.*``) as stand-in files, not modules.
- ``insmod``, ``modprobe``, ``mknod``, ``ldconfig``, ``systemd-sysusers``, ``systemctl daemon-reload``: recorded,
  never run. Nothing is ever loaded into this machine's kernel.
- ``uname -r``: the simulated running kernel (``/proc/sys/kernel/osrelease``; a booted container's
  ``uname(2)`` is the machine's kernel).
- ``/proc/devices``: its one read (the ``nvidia-uvm`` major) reads ``/run/modulus-sim/proc-devices``, to
  which the ``insmod``/``modprobe`` stand-ins add ``nvidia-uvm`` when they "load" it.

Everything is recorded, one line each, in ``/var/log/modulus-sim/nvidia-service.log`` of the root
(``LOG``): ``setup-nvidia start``, ``download <url> -> <file>``, ``build systemd-nspawn ...``,
``insmod <path>``, ``modprobe <args>``, ``setup-nvidia exit <rc>``.

``lspci`` (pciutils is in Flatcar's image) is a kit stand-in at ``/usr/sbin/lspci``: it prints the
devices listed in ``/etc/modulus-sim/pci-devices`` (``lspci -nn`` lines; none: no GPU), honours
``-d vendor:device:class`` and prints the lines without the numeric codes unless ``-nn`` or ``-n``.
``simulate_gpu(root)`` lists an NVIDIA 3D controller there and in the root's ``sys/bus/pci/devices``
(which kmod_install reads on a simulated root).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "flatcar" / "nvidia-drivers-service"
# x11-drivers/nvidia-drivers-service-535.274.02.ebuild (amd64) on flatcar-4593
DRIVER_VERSION = "535.274.02"
LOG = "var/log/modulus-sim/nvidia-service.log"
PCI_DEVICES = "etc/modulus-sim/pci-devices"
GPU_LINE = "01:00.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 SXM4 40GB] [10de:20b0] (rev a1)"
UNIT = "usr/lib/systemd/system/nvidia.service"
WANTS = "usr/lib/systemd/system/multi-user.target.wants/nvidia.service"
SETUP = "usr/lib/nvidia/bin/setup-nvidia"
LSPCI = "usr/sbin/lspci"

_PROC_DEVICES_LINE = "D=`grep nvidia-uvm /proc/devices | awk '{print $1}'`"

PRELUDE = r"""
# ---- modulus simulation kit: stand-ins (tests/sim/nvidia_service.py); Flatcar's script follows unchanged ----
SIM_LOG=/var/log/modulus-sim/nvidia-service.log
SIM_PROC_DEVICES=/run/modulus-sim/proc-devices
mkdir -p /var/log/modulus-sim /run/modulus-sim
touch "$SIM_PROC_DEVICES"
sim() { echo "$*" >> "$SIM_LOG"; }
sim "setup-nvidia start"
trap 'sim "setup-nvidia exit $?"' EXIT
uname() { if [ "${1:-}" = -r ]; then cat /proc/sys/kernel/osrelease; else command uname "$@"; fi; }
sim_loaded() { case " $* " in *" nvidia-uvm "*|*" nvidia-uvm.ko "*) echo "511 nvidia-uvm" >> "$SIM_PROC_DEVICES";; esac; }
insmod() { sim "insmod $PWD/$*"; sim_loaded "$@"; }
modprobe() { sim "modprobe $*"; sim_loaded "$@"; }
mknod() { sim "mknod $*"; }
ldconfig() { sim "ldconfig $*"; }
systemd-sysusers() { sim "systemd-sysusers $*"; }
systemctl() { if [ "${1:-}" = daemon-reload ]; then sim "systemctl $*"; else command systemctl "$@"; fi; }
lbzcat() { cat "$@"; }
sim_run_file() {
  cat <<'RUN'
#!/bin/sh
# modulus simulation kit: stand-in for NVIDIA's .run installer; "-x" makes the extracted directory
d=$(basename "$0" .run); v=${d##*-}
mkdir -p "$d"
for t in nvidia-debugdump nvidia-cuda-mps-control nvidia-xconfig nvidia-modprobe nvidia-smi nvidia-cuda-mps-server \
         nvidia-persistenced nvidia-settings; do
  printf '#!/bin/sh\necho "%s $*" >> /var/log/modulus-sim/nvidia-service.log\n' "$t" > "$d/$t"
  chmod 755 "$d/$t"
done
for l in libnvidia-ml libcuda libnvidia-ptxjitcompiler; do echo "stand-in for $l.so.$v" > "$d/$l.so.$v"; done
RUN
}
curl() {
  local out="" url="" head=0
  while [ $# -gt 0 ]; do
    case "$1" in
      -o) out="$2"; shift 2 ;;
      -I) head=1; shift ;;
      -w|--retry|--retry-delay|--retry-max-time|--connect-timeout) shift 2 ;;
      -*) shift ;;
      *) url="$1"; shift ;;
    esac
  done
  if [ "$head" = 1 ]; then sim "head $url"; printf 200; return 0; fi
  sim "download $url -> $out"
  case "$url" in
    *.run) sim_run_file > "$out" ;;
    *) echo "modulus simulation kit: stand-in for $url (not an image)" > "$out" ;;
  esac
}
sudo() {
  sim "build $*"
  if [ "${1:-}" = systemd-nspawn ]; then
    local name="${*: -1}" dir
    dir="${FLATCAR_ROOT_WORKDIR}/${NVIDIA_WORKDIR}/${name}"
    mkdir -p "$dir/install-mod" "$dir/kernel"
    for m in nvidia nvidia-modeset nvidia-uvm nvidia-drm nvidia-peermem; do
      echo "modulus simulation kit: stand-in for $m.ko (not a module)" > "$dir/install-mod/$m.ko"
    done
    for f in modules.dep modules.dep.bin modules.alias modules.symbols; do : > "$dir/install-mod/$f"; done
  fi
}
# ---- end of the stand-ins ----
"""

LSPCI_SCRIPT = r"""#!/bin/sh
# modulus simulation kit: stand-in for lspci (tests/sim/nvidia_service.py). Prints the devices listed in
# /etc/modulus-sim/pci-devices ("lspci -nn" lines), filtered by -d [vendor]:[device][:class].
devices=${MODULUS_SIM_PCI_DEVICES:-/etc/modulus-sim/pci-devices}  # the variable: for the kit's own tests
filter="" numeric=0
while [ $# -gt 0 ]; do
  case "$1" in
    -d) filter="$2"; shift 2 ;;
    -d*) filter="${1#-d}"; shift ;;
    -n|-nn) numeric=1; shift ;;
    -k|-v|-vv|-mm|-m|-D) shift ;;
    *) echo "lspci (simulation kit): unsupported argument $1" >&2; exit 1 ;;
  esac
done
[ -f "$devices" ] || exit 0
fv=$(echo "$filter" | cut -s -d: -f1); fd=$(echo "$filter" | cut -s -d: -f2); fc=$(echo "$filter" | cut -s -d: -f3)
while IFS= read -r line; do
  [ -n "$line" ] || continue
  class=$(echo "$line" | sed -n 's/^[^ ]* [^[]*\[\([0-9a-f]\{4\}\)\]:.*/\1/p')
  ids=$(echo "$line" | grep -o '\[[0-9a-f]\{4\}:[0-9a-f]\{4\}\]' | tail -n 1 | tr -d '[]')
  vendor=${ids%%:*} device=${ids#*:}
  if [ -n "$filter" ]; then
    [ -z "$fv" ] || [ "$fv" = "*" ] || [ "$fv" = "$vendor" ] || continue
    [ -z "$fd" ] || [ "$fd" = "*" ] || [ "$fd" = "$device" ] || continue
    [ -z "$fc" ] || [ "$fc" = "$class" ] || continue
  fi
  if [ "$numeric" = 1 ]; then echo "$line"; else
    echo "$line" | sed 's/ \[[0-9a-f]\{4\}\]:/:/; s/ \[[0-9a-f]\{4\}:[0-9a-f]\{4\}\]//'
  fi
done < "$devices"
"""


def setup_nvidia_text() -> str:
    """Flatcar's setup-nvidia with the kit's prelude after ``set -euo pipefail`` and its one read of
    /proc/devices pointed at the simulated one."""
    text = (SOURCE / "setup-nvidia").read_text()
    head = "#!/bin/bash\nset -euo pipefail\n"
    if not text.startswith(head) or text.count(_PROC_DEVICES_LINE) != 1:
        raise RuntimeError("Flatcar's setup-nvidia changed: update tests/sim/nvidia_service.py to the new source")
    body = text[len(head):].replace(_PROC_DEVICES_LINE, _PROC_DEVICES_LINE.replace("/proc/devices", '"$SIM_PROC_DEVICES"'))
    return head + PRELUDE + body


def _link(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def install(root: Path, driver_version: str = DRIVER_VERSION) -> None:
    """Put nvidia.service, its wants link in /usr, setup-nvidia, install-nvidia, the metadata and the
    lspci stand-in into ``root``, as the ebuild (and pciutils) do."""
    root = Path(root)
    unit = root / UNIT
    unit.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCE / "nvidia.service", unit)
    os.chmod(unit, 0o644)
    _link("../nvidia.service", root / WANTS)
    bindir = root / SETUP
    bindir.parent.mkdir(parents=True, exist_ok=True)
    bindir.write_text(setup_nvidia_text())
    os.chmod(bindir, 0o755)
    shutil.copyfile(SOURCE / "install-nvidia", bindir.parent / "install-nvidia")
    os.chmod(bindir.parent / "install-nvidia", 0o755)
    meta = root / "usr/share/flatcar/nvidia-metadata"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text((SOURCE / "nvidia-metadata.in").read_text().replace("@PV@", driver_version))
    lspci = root / LSPCI
    lspci.parent.mkdir(parents=True, exist_ok=True)
    lspci.write_text(LSPCI_SCRIPT)
    os.chmod(lspci, 0o755)


def simulate_gpu(root: Path, line: str = GPU_LINE) -> None:
    """An NVIDIA GPU on the simulated host: for the lspci stand-in, and as sysfs below the root."""
    root = Path(root)
    devices = root / PCI_DEVICES
    devices.parent.mkdir(parents=True, exist_ok=True)
    with open(devices, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    addr = "0000:" + line.split()[0]
    sysdev = root / "sys/bus/pci/devices" / addr
    sysdev.mkdir(parents=True, exist_ok=True)
    ids = line.rsplit("[", 1)[1].split("]")[0]
    klass = line.split("[", 1)[1].split("]")[0]
    (sysdev / "vendor").write_text(f"0x{ids.split(':')[0]}\n")
    (sysdev / "device").write_text(f"0x{ids.split(':')[1]}\n")
    (sysdev / "class").write_text(f"0x{klass}00\n")


def log_lines(root: Path) -> list[str]:
    path = Path(root) / LOG
    return path.read_text().splitlines() if path.exists() else []
