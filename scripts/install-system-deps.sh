#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the simulation kit need, on a fresh
# Debian 12 (bookworm) machine. Idempotent: a second run installs nothing.
# Enables the contrib and non-free components (NVIDIA's kernel module sources live there).
set -euo pipefail

PKGS=(
  debootstrap gdisk e2fsprogs bzip2 lbzip2 xz-utils gnupg curl ca-certificates git make rsync gcc libc6-dev
  systemd-container util-linux mount kmod cpio busybox-static qemu-system-x86 openssl
  squashfs-tools erofs-utils patchelf shellcheck btrfs-progs pciutils
  python3-venv
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: run as root (or through sudo)" >&2
  exit 1
fi

changed=0
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ]; then
  if grep -qE '^Components:.*\bmain\b' "$src" && ! grep -qE '^Components:.*\bnon-free\b' "$src"; then
    sed -i -E 's/^Components:.*$/Components: main contrib non-free non-free-firmware/' "$src"
    changed=1
  fi
elif [ -f /etc/apt/sources.list ]; then
  if ! grep -qE '^deb .* non-free' /etc/apt/sources.list; then
    sed -i -E 's/^(deb .* main)$/\1 contrib non-free non-free-firmware/' /etc/apt/sources.list
    changed=1
  fi
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
stamp=/var/lib/apt/periodic/modulus-update-stamp
if [ "$changed" = 1 ] || [ ! -f "$stamp" ] || [ "${#missing[@]}" -gt 0 ]; then
  echo "install-system-deps: apt-get update"
  apt-get update -q >/dev/null
  mkdir -p "$(dirname "$stamp")"; touch "$stamp"
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-system-deps: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-system-deps: ok"
