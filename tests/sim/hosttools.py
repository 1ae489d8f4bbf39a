"""The commands of a stock Flatcar host, and nothing more, for the modules the tests run against a
simulated host root.

The modules run on this machine (its kernel, its Python), pointed at a host root by ``host_root``.
This machine has tools no Flatcar host has (mksquashfs, mkfs.erofs on stable, gcc, make, python3),
so the tests give the modules a PATH of their own: a directory of symbolic links to this machine's
binaries of the tools a stock Flatcar host image has, read from flatcar/scripts
``coreos-base/coreos/coreos-0.0.1.ebuild`` (RDEPEND) at the ``flatcar-4593`` stable branch, and the
packages those pull in. Each Gentoo package is mapped to the Debian packages that ship the same
commands; a command is linked when its Debian package is installed here (``dpkg -L``).

Variants:

- ``stable``: Flatcar stable 4593 (and LTS): no squashfs-tools, no erofs-utils, no compiler, no Python.
- ``main``: Flatcar ``main`` since April 2026, which added ``sys-fs/erofs-utils`` (``mkfs.erofs``).

The directory is ``<cache>/hosttools-<hash>/<variant>`` with ``usr/sbin`` and ``usr/bin`` inside, the
way the commands lie on the host; ``host_path(variant)`` is the PATH for it. Building it takes a
few hundredths of a second (dpkg's file lists); it is cached by the hash of the package lists and of
what they resolved to.

The modules' own ``which()`` searches the usual sbin/bin directories only when PATH names no sbin
directory, so this PATH is the whole of what they can find.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

# Gentoo package of coreos-base/coreos RDEPEND (flatcar-4593) -> Debian packages with the same commands.
# Packages of the ebuild with no Debian counterpart here (Flatcar's own agents, cloud agents, SELinux
# policy, firmware, the kernel) bring no command a module uses and are left out; see FLATCAR_ONLY.
FLATCAR_PACKAGES: dict[str, tuple[str, ...]] = {
    "app-admin/sudo": ("sudo",),
    "app-alternatives/awk": ("gawk", "mawk"),
    "app-arch/gzip": ("gzip",),
    "app-arch/bzip2": ("bzip2",),
    "app-arch/lbzip2": ("lbzip2",),
    "app-arch/lz4": ("lz4",),
    "app-arch/pigz": ("pigz",),
    "app-arch/xz-utils": ("xz-utils",),
    "app-arch/zstd": ("zstd",),
    "app-arch/tar": ("tar",),
    "app-arch/unzip": ("unzip",),
    "app-arch/zip": ("zip",),
    "app-arch/ncompress": ("ncompress",),
    "app-crypt/gnupg": ("gpg", "gpgv", "gpg-agent", "gpgconf", "gpgsm", "dirmngr", "gnupg-utils", "gpg-wks-client"),
    "app-editors/vim": ("vim", "vim-tiny"),
    "app-misc/ca-certificates": ("ca-certificates",),
    "app-misc/jq": ("jq",),
    "app-shells/bash": ("bash",),
    "dev-debug/strace": ("strace",),
    "dev-libs/openssl": ("openssl",),
    "dev-vcs/git": ("git",),
    "net-analyzer/openbsd-netcat": ("netcat-openbsd",),
    "net-analyzer/tcpdump": ("tcpdump",),
    "net-analyzer/traceroute": ("traceroute",),
    "net-dns/bind": ("bind9-dnsutils", "bind9-host"),
    "net-firewall/conntrack-tools": ("conntrack",),
    "net-firewall/ebtables": ("ebtables",),
    "net-firewall/ipset": ("ipset",),
    "net-firewall/iptables": ("iptables",),
    "net-firewall/nftables": ("nftables",),
    "net-fs/nfs-utils": ("nfs-common",),
    "net-fs/cifs-utils": ("cifs-utils",),
    "net-misc/bridge-utils": ("bridge-utils",),
    "net-misc/curl": ("curl",),
    "net-misc/iputils": ("iputils-ping",),
    "net-misc/rsync": ("rsync",),
    "net-misc/socat": ("socat",),
    "net-misc/wget": ("wget",),
    "net-misc/whois": ("whois",),
    "net-vpn/wireguard-tools": ("wireguard-tools",),
    "sys-apps/acl": ("acl",),
    "sys-apps/attr": ("attr",),
    "sys-apps/coreutils": ("coreutils",),
    "sys-apps/dbus": ("dbus", "dbus-bin", "dbus-daemon"),
    "sys-apps/diffutils": ("diffutils",),
    "sys-apps/ethtool": ("ethtool",),
    "sys-apps/findutils": ("findutils",),
    "sys-apps/gptfdisk": ("gdisk",),
    "sys-apps/grep": ("grep",),
    "sys-apps/iproute2": ("iproute2",),
    "sys-apps/kexec-tools": ("kexec-tools",),
    "sys-apps/keyutils": ("keyutils",),
    "sys-apps/less": ("less",),
    "sys-apps/net-tools": ("net-tools", "hostname"),
    "sys-apps/pciutils": ("pciutils",),
    "sys-apps/sed": ("sed",),
    "sys-apps/shadow": ("passwd", "login"),
    "sys-apps/systemd": ("systemd", "systemd-container", "udev", "systemd-timesyncd"),
    "sys-apps/usbutils": ("usbutils",),
    "sys-apps/util-linux": ("util-linux", "util-linux-extra", "mount", "fdisk", "bsdutils", "bsdextrautils",
                            "uuid-runtime"),
    "sys-apps/which": ("debianutils",),
    "sys-block/parted": ("parted",),
    "sys-devel/gettext": ("gettext-base",),
    "sys-fs/btrfs-progs": ("btrfs-progs",),
    "sys-fs/cryptsetup": ("cryptsetup-bin",),
    "sys-fs/dosfstools": ("dosfstools",),
    "sys-fs/e2fsprogs": ("e2fsprogs",),
    "sys-fs/lvm2": ("lvm2",),
    "sys-fs/mdadm": ("mdadm",),
    "sys-fs/xfsprogs": ("xfsprogs",),
    "sys-libs/glibc": ("libc-bin",),
    "sys-process/lsof": ("lsof",),
    "sys-process/procps": ("procps",),
}
# Not in the ebuild's own list but pulled in by it: kmod (systemd[kmod], coreos-kernel), OpenSSH
# (coreos-init, misc-files: sshd in every image), ncurses (bash, procps).
PULLED_IN: dict[str, tuple[str, ...]] = {
    "sys-apps/kmod": ("kmod",),
    "net-misc/openssh": ("openssh-client",),
    "sys-libs/ncurses": ("ncurses-bin",),
}
# Flatcar's main branch since April 2026 (coreos-0.0.1.ebuild: sys-fs/erofs-utils, for containerd).
MAIN_ADDS: dict[str, tuple[str, ...]] = {"sys-fs/erofs-utils": ("erofs-utils",)}
# In the ebuild, no Debian counterpart linked: Flatcar's own (update_engine, locksmith, toolbox,
# mayday, ignition, afterburn, coreos-cloudinit, update-ssh-keys, ue-rs, seismograph, the etcd and
# flannel wrappers, sdnotify-proxy, nvidia-drivers-service), cloud and VM agents (xenstore,
# qemu-guest-agent, google-oslogin, azure-vm-utils), TPM and directory tools (clevis, go-tspi,
# tpmpolicy, adcli, realmd, sssd), SELinux tools and policy, and the rest listed here.
FLATCAR_ONLY = ("coreos-base/update_engine", "app-admin/locksmith", "app-admin/toolbox", "sys-apps/ignition",
                "coreos-base/afterburn", "x11-drivers/nvidia-drivers-service")
# Commands no stock Flatcar host has; ``build`` refuses a directory that would hold one.
NEVER = ("python", "python3", "gcc", "cc", "c++", "g++", "make", "mksquashfs", "unsquashfs", "perl", "ld", "as")
NEVER_ON_STABLE = ("mkfs.erofs", "fsck.erofs", "dump.erofs")
# Names a Flatcar host has that Debian ships only under another one (or through its alternatives).
ALIASES = {"sh": "bash", "awk": ("gawk", "mawk"), "which": "which.debianutils", "vim": ("vim.basic", "vim.tiny"),
           "vi": ("vim.basic", "vim.tiny")}
VARIANTS = ("stable", "main")
DEFAULT_VARIANT = "stable"
BIN_DIRS = ("/bin/", "/sbin/", "/usr/bin/", "/usr/sbin/")


def cache_root() -> Path:
    return Path(os.environ.get("MODULUS_SIM_CACHE", "/var/cache/modulus-sim"))


def debian_packages(variant: str = DEFAULT_VARIANT) -> dict[str, tuple[str, ...]]:
    """Flatcar package -> Debian packages for ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"host tools variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    packages = dict(FLATCAR_PACKAGES)
    packages.update(PULLED_IN)
    if variant == "main":
        packages.update(MAIN_ADDS)
    return packages


DPKG_INFO = Path("/var/lib/dpkg/info")


def _installed_files(packages: list[str]) -> dict[str, list[str]]:
    """Debian package -> its files (only the packages installed here), from dpkg's file lists."""
    query = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Status}\n", *packages], capture_output=True,
                           text=True, check=False).stdout
    installed = sorted(line.split("\t")[0] for line in query.splitlines()
                       if line.endswith("install ok installed"))
    files: dict[str, list[str]] = {}
    for name in installed:
        for candidate in (DPKG_INFO / f"{name}.list", DPKG_INFO / f"{name}:amd64.list"):
            if candidate.is_file():
                files[name] = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
                break
    return files


def resolve(variant: str = DEFAULT_VARIANT) -> dict[str, str]:
    """``usr/bin/<name>`` or ``usr/sbin/<name>`` -> this machine's executable, for ``variant``."""
    wanted = sorted({deb for debs in debian_packages(variant).values() for deb in debs})
    links: dict[str, str] = {}
    for _pkg, paths in sorted(_installed_files(wanted).items()):
        for path in paths:
            if not any(path.startswith(d) for d in BIN_DIRS) or path.count("/") > 3:
                continue
            name = os.path.basename(path)
            if not name or not os.path.isfile(path) or not os.access(path, os.X_OK):
                continue
            sub = "usr/sbin" if "/sbin/" in path else "usr/bin"
            links.setdefault(f"{sub}/{name}", path)
    names = {os.path.basename(k): k for k in links}
    for alias, sources in ALIASES.items():
        for source in (sources,) if isinstance(sources, str) else sources:
            if source in names and alias not in names:
                links[f"usr/bin/{alias}"] = links[names[source]]
                break
    forbidden = set(NEVER) | (set(NEVER_ON_STABLE) if variant == "stable" else set())
    bad = sorted(k for k in links if os.path.basename(k) in forbidden or os.path.basename(k).startswith("python"))
    if bad:
        raise RuntimeError(f"the {variant} host tools would hold commands no stock Flatcar host has: {bad}")
    return links


@functools.cache
def tools_dir(variant: str = DEFAULT_VARIANT) -> Path:
    """The directory of ``variant`` (built once, atomically; cached under the kit cache)."""
    links = resolve(variant)
    digest = hashlib.sha256(json.dumps({"variant": variant, "links": links}, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root() / f"hosttools-{digest}" / variant
    if (final / "tools.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=final.parent))
    for rel, target in sorted(links.items()):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tmp / rel)
    (tmp / "tools.json").write_text(json.dumps({"variant": variant, "links": links}, indent=1, sort_keys=True))
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:  # another process was first: its directory is the same
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return final


def host_path(variant: str = DEFAULT_VARIANT) -> str:
    """The PATH of a stock Flatcar host of ``variant``: its ``usr/sbin`` then ``usr/bin``."""
    root = tools_dir(variant)
    return f"{root / 'usr/sbin'}:{root / 'usr/bin'}"


def commands(variant: str = DEFAULT_VARIANT) -> list[str]:
    """The command names of ``variant``, sorted."""
    return sorted({os.path.basename(rel) for rel in resolve(variant)})


def host_env(env: dict[str, str], variant: str | None = DEFAULT_VARIANT) -> dict[str, str]:
    """``env`` with PATH set to the host tools of ``variant`` (``None`` leaves PATH as it is: only for
    what runs on the operator's machine, never for a module acting on a simulated host)."""
    out = dict(env)
    if variant is not None:
        out["PATH"] = host_path(variant)
    return out
