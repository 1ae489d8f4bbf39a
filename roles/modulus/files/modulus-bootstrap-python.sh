#!/bin/sh
# modulus-bootstrap-python: Python and a virtual environment with ansible-core for a host that has
# none (Flatcar Container Linux ships no Python). POSIX sh: runs under ansible.builtin.script (no
# Python needed on the host) and as the first step (ExecStartPre) of modulus@.service.
#
# Settings come from the environment, or from KEY=VALUE arguments (which win):
#   MODULUS_PYTHON_MODE      auto | portable | none                                (default auto)
#                            portable: the pinned portable Python below the prefix, the only Python
#                            used on Flatcar; auto: the same on Flatcar, elsewhere a system python3
#                            (3.9 or newer) when a virtual environment of it works, else the portable one
#   MODULUS_PYTHON_URL       portable Python tarball (python-build-standalone "install_only" layout:
#                            python/bin/python3); http(s)://, file:// or an absolute path
#   MODULUS_PYTHON_MIRROR    base URL tried first: <mirror>/<file name of the URL>
#   MODULUS_PYTHON_SHA256    SHA-256 of the tarball (required: nothing unverified is installed)
#   MODULUS_PYTHON_PREFIX    where Python and the virtual environment go      (default /opt/modulus/python)
#   MODULUS_PIP_INDEX_URL    package index (empty: PyPI; with MODULUS_PIP_FIND_LINKS set: no index)
#   MODULUS_PIP_FIND_LINKS   directory or URL of wheels (a wheel mirror)
#   MODULUS_PIP_PACKAGES     space-separated requirements              (default "ansible-core==2.19.14 boto3")
#   MODULUS_BOOTSTRAP_CHECK  1: check mode, say what would be done and write nothing
#
# Result: $PREFIX/venv/bin/python (and ansible-pull), and the marker $PREFIX/.modulus-bootstrap that
# says what was done. A second run with the same settings changes nothing. The last lines printed
# are MODULUS_BOOTSTRAP_CHANGED=0|1 and MODULUS_PYTHON=<interpreter of the virtual environment>
# (in check mode MODULUS_PYTHON only when that interpreter is already in place).
set -eu

for arg in "$@"; do
  case $arg in
    MODULUS_*=*) export "${arg?}" ;;
    *) echo "modulus-bootstrap: unknown argument: $arg (expected MODULUS_NAME=value)" >&2; exit 2 ;;
  esac
done

MODE=${MODULUS_PYTHON_MODE:-auto}
URL=${MODULUS_PYTHON_URL:-}
MIRROR=${MODULUS_PYTHON_MIRROR:-}
SHA256=${MODULUS_PYTHON_SHA256:-}
PREFIX=${MODULUS_PYTHON_PREFIX:-/opt/modulus/python}
INDEX_URL=${MODULUS_PIP_INDEX_URL:-}
FIND_LINKS=${MODULUS_PIP_FIND_LINKS:-}
PACKAGES=${MODULUS_PIP_PACKAGES:-ansible-core==2.19.14 boto3}
CHECK=${MODULUS_BOOTSTRAP_CHECK:-}
VENV=$PREFIX/venv
MARKER=$PREFIX/.modulus-bootstrap
ROOT=${MODULUS_BOOTSTRAP_ROOT:-}   # tests only: the root whose os-release and system python3 are looked at
TMPD=

log() { echo "modulus-bootstrap: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
cleanup() { if [ -n "$TMPD" ]; then rm -rf "$TMPD"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

case $MODE in
  auto|portable|none) ;;
  sysext) die "MODULUS_PYTHON_MODE=sysext is no longer offered: Flatcar's flatcar-python extension is an update payload verified by update_engine, and enabling it makes every later OS update depend on fetching it. Use auto or portable (the pinned, checksum-verified portable Python); see docs/pull.md" ;;
  *) die "MODULUS_PYTHON_MODE must be auto, portable or none, got '$MODE'" ;;
esac
case $PREFIX in
  /*) ;;
  *) die "MODULUS_PYTHON_PREFIX must be an absolute path, got '$PREFIX'" ;;
esac
if [ "$MODE" = none ]; then
  log "mode none: Python is left alone"
  echo "MODULUS_BOOTSTRAP_CHANGED=0"
  exit 0
fi

# What this run is asked to do: the marker records it, and a second run compares.
want=$(printf 'mode=%s\nurl=%s\nsha256=%s\nindex=%s\nfind_links=%s\npackages=%s\n' \
  "$MODE" "$URL" "$SHA256" "$INDEX_URL" "$FIND_LINKS" "$PACKAGES")
want_sum=$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)

venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import ansible, sys; sys.exit(0)' >/dev/null 2>&1 \
    && [ -x "$VENV/bin/ansible-pull" ]
}

if [ -f "$MARKER" ] && grep -qx "request=$want_sum" "$MARKER" && venv_ok; then
  base=$(sed -n 's/^python=//p' "$MARKER")
  if [ -n "$base" ] && [ -x "$base" ]; then
    log "up to date ($MARKER)"
    echo "MODULUS_BOOTSTRAP_CHANGED=0"
    echo "MODULUS_PYTHON=$VENV/bin/python"
    exit 0
  fi
fi

# fetch URL DEST: http(s) with curl or wget, file:// and absolute paths by copying. Non-zero on failure.
fetch() {
  case $1 in
    file://*) cp "${1#file://}" "$2" ;;
    /*) cp "$1" "$2" ;;
    http://*|https://*)
      if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 --retry-delay 2 --connect-timeout 20 -o "$2" "$1"
      elif command -v wget >/dev/null 2>&1; then
        wget -q -T 20 -t 3 -O "$2" "$1"
      else
        log "neither curl nor wget to download $1"; return 1
      fi ;;
    *) log "unsupported URL: $1"; return 1 ;;
  esac
}

# ---- the host -------------------------------------------------------------------------------
os_value() {  # os_value KEY: from the host's os-release
  for f in "$ROOT/etc/os-release" "$ROOT/usr/lib/os-release"; do
    if [ -r "$f" ]; then
      sed -n "s/^$1=//p" "$f" | tr -d '"' | head -n 1
      return 0
    fi
  done
}

is_flatcar() { [ "$(os_value ID)" = flatcar ]; }

# ---- portable Python ------------------------------------------------------------------------
python_portable() {
  [ -n "$URL" ] || die "MODULUS_PYTHON_URL is empty: nothing to install the portable Python from"
  [ -n "$SHA256" ] || die "MODULUS_PYTHON_SHA256 is empty: the portable Python is only installed checksum-verified (set modulus_python_sha256)"
  file=${URL##*/}
  dest=$PREFIX/dist/$SHA256
  if [ -x "$dest/bin/python3" ] && [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$SHA256" ]; then
    echo "$dest/bin/python3"; return 0
  fi
  urls="$URL"
  if [ -n "$MIRROR" ]; then urls="${MIRROR%/}/$file $URL"; fi
  got=
  for u in $urls; do
    log "fetching $u"
    if fetch "$u" "$TMPD/$file"; then
      sum=$(sha256sum "$TMPD/$file" | cut -d' ' -f1)
      if [ "$sum" = "$SHA256" ]; then got=1; break; fi
      log "$u has SHA-256 $sum, expected $SHA256: refused"
    fi
    rm -f "$TMPD/$file"
  done
  [ -n "$got" ] || die "could not fetch a portable Python with SHA-256 $SHA256 from: $urls"
  mkdir "$TMPD/unpack"
  case $file in
    *.tar.zst|*.tzst) zstd -dc "$TMPD/$file" | tar -xf - -C "$TMPD/unpack" ;;
    *.tar.xz|*.txz) xz -dc "$TMPD/$file" | tar -xf - -C "$TMPD/unpack" ;;
    *) gzip -dc "$TMPD/$file" | tar -xf - -C "$TMPD/unpack" ;;
  esac
  top=$TMPD/unpack/python
  [ -x "$top/bin/python3" ] || die "$file has no python/bin/python3 (expected the install_only layout)"
  "$top/bin/python3" -c 'import sys; assert sys.version_info >= (3, 9)' >&2 \
    || die "the Python in $file does not run on this host (or is older than 3.9)"
  echo "$SHA256" > "$top/.sha256"
  mkdir -p "$PREFIX/dist"
  rm -rf "$dest"
  mv "$top" "$dest"   # the same file system: a rename; a killed run leaves only $TMPD
  echo "$dest/bin/python3"
}

system_python() {
  for p in "$ROOT/usr/bin/python3" "$ROOT/usr/local/bin/python3"; do
    if [ -x "$p" ] && "$p" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 9)' >/dev/null 2>&1; then
      echo "$p"; return 0
    fi
  done
  return 1
}

# ---- the virtual environment ----------------------------------------------------------------
# make_venv DIR: a virtual environment of $base with $PACKAGES. Its scripts name their interpreter
# by path, so it is made where it will live.
make_venv() {
  if ! "$base" -m venv "$1" >&2 2>&1; then
    # no ensurepip (some distributions split it out): pip from a pip wheel of the wheel mirror
    rm -rf "$1"
    wheel=
    if [ -n "$FIND_LINKS" ] && [ -d "$FIND_LINKS" ]; then
      for w in "$FIND_LINKS"/pip-*.whl; do [ -f "$w" ] && wheel=$w; done
    fi
    [ -n "$wheel" ] || { log "$base has no ensurepip and MODULUS_PIP_FIND_LINKS holds no pip wheel"; return 1; }
    "$base" -m venv --without-pip "$1" >&2 || return 1
    "$1/bin/python" "$wheel/pip" install -q --no-index "$wheel" >&2 || return 1
  fi
  set -- "$1" install -q --disable-pip-version-check --no-cache-dir
  if [ -n "$FIND_LINKS" ]; then
    set -- "$@" --find-links "$FIND_LINKS"
    if [ -z "$INDEX_URL" ]; then set -- "$@" --no-index; fi
  fi
  if [ -n "$INDEX_URL" ]; then set -- "$@" --index-url "$INDEX_URL"; fi
  dir=$1; shift
  # shellcheck disable=SC2086 # PACKAGES is a space-separated list of requirements
  PIP_ROOT_USER_ACTION=ignore "$dir/bin/python" -m pip "$@" $PACKAGES >&2 || { log "pip could not install: $PACKAGES"; return 1; }
}

# try_venv: the virtual environment of $base at $VENV, the previous one back when it fails (it waits in $TMPD).
old=$TMPD/venv-old
try_venv() {
  if [ -e "$VENV" ] || [ -L "$VENV" ]; then
    if [ -e "$old" ]; then rm -rf "$VENV"; else mv "$VENV" "$old"; fi
  fi
  if make_venv "$VENV" && venv_ok; then return 0; fi
  rm -rf "$VENV"
  if [ -e "$old" ]; then mv "$old" "$VENV"; fi
  return 1
}

describe() { "$base" -c 'import platform; print(platform.python_version())'; }

# Check mode: say what a run would do, write nothing.
if [ -n "$CHECK" ]; then
  if [ "$MODE" = portable ] || is_flatcar; then
    plan="the portable Python $URL (SHA-256 $SHA256) into $PREFIX/dist/$SHA256"
    if [ -z "$SHA256" ]; then die "MODULUS_PYTHON_SHA256 is empty: the portable Python is only installed checksum-verified (set modulus_python_sha256)"; fi
  else
    plan="a system python3 of the host if a virtual environment of it works, else the portable Python $URL (SHA-256 $SHA256)"
  fi
  src="PyPI"
  if [ -n "$FIND_LINKS" ]; then src="$FIND_LINKS"; fi
  if [ -n "$INDEX_URL" ]; then src="$INDEX_URL${FIND_LINKS:+ and $FIND_LINKS}"; fi
  log "check mode: would install $plan, then make the virtual environment $VENV with $PACKAGES from $src"
  echo "MODULUS_BOOTSTRAP_WOULD=install $plan; virtual environment $VENV with $PACKAGES from $src"
  echo "MODULUS_BOOTSTRAP_CHANGED=1"
  if venv_ok; then echo "MODULUS_PYTHON=$VENV/bin/python"; fi
  exit 0
fi

umask 022
mkdir -p "$PREFIX"
# One bootstrap at a time (the unit's ExecStartPre and a push run may meet); what a killed run left
# ($PREFIX/.bootstrap.*) is swept under the lock.
if command -v flock >/dev/null 2>&1; then
  exec 8>"$PREFIX/.bootstrap.lock"
  flock 8
fi
for d in "$PREFIX"/.bootstrap.*; do
  if [ -d "$d" ]; then rm -rf "$d"; fi
done
TMPD=$(mktemp -d "$PREFIX/.bootstrap.XXXXXX")

how=
if [ "$MODE" = auto ] && ! is_flatcar && base=$(system_python); then
  log "Python from the system: $base ($(describe))"
  if try_venv; then
    how=system
  else
    log "a virtual environment of $base could not be made: falling back to the portable Python"
  fi
fi
if [ -z "$how" ]; then
  base=$(python_portable)
  log "Python from the portable tarball: $base ($(describe))"
  try_venv || die "the virtual environment $VENV could not be made with $base (the previous one, if any, is back)"
  how=portable
fi

# A host bootstrapped by an older modulus with Flatcar's flatcar-python extension: that extension was
# enabled in /etc/flatcar/enabled-sysext.conf, which makes every later OS update fetch it (and fail
# without it). The virtual environment no longer needs it: take back what that bootstrap added.
if [ -f "$MARKER" ] && grep -qx 'how=sysext' "$MARKER"; then
  conf=$ROOT/etc/flatcar/enabled-sysext.conf
  if [ -f "$conf" ] && grep -qx 'python' "$conf"; then
    grep -vx 'python' "$conf" > "$conf.modulus-new" || true
    mv "$conf.modulus-new" "$conf"
    log "removed 'python' from $conf (added by an earlier bootstrap of modulus)"
  fi
  link=$ROOT/etc/extensions/flatcar-python.raw
  case $(readlink "$link" 2>/dev/null || true) in
    /etc/flatcar/sysext/flatcar-python-*.raw)
      rm -f "$link" "$ROOT"/etc/flatcar/sysext/flatcar-python-*.raw
      log "removed $link (added by an earlier bootstrap of modulus)"
      if [ -z "$ROOT" ] && command -v systemd-sysext >/dev/null 2>&1; then systemd-sysext refresh >&2 || true; fi ;;
  esac
fi

# Prune portable Pythons that are no longer used.
if [ -d "$PREFIX/dist" ]; then
  for d in "$PREFIX/dist"/*; do
    case $base in "$d"/*) continue ;; esac
    [ -d "$d" ] && rm -rf "$d"
  done
fi

{
  echo "# written by modulus-bootstrap-python; delete it to force a new bootstrap"
  echo "request=$want_sum"
  echo "how=$how"
  echo "python=$base"
  echo "python_version=$("$base" -c 'import platform; print(platform.python_version())')"
  echo "venv=$VENV"
  echo "ansible_core=$("$VENV/bin/python" -c 'import ansible.release as r; print(r.__version__)')"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf '%s' "$want" | sed 's/^/request./'
} > "$TMPD/marker"
mv "$TMPD/marker" "$MARKER"
log "ready: $VENV/bin/ansible-pull"
echo "MODULUS_BOOTSTRAP_CHANGED=1"
echo "MODULUS_PYTHON=$VENV/bin/python"
