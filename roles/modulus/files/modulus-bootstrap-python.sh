#!/bin/sh
# modulus-bootstrap-python: Python and a virtual environment with ansible-core for a host that has
# none (Flatcar Container Linux ships no Python). POSIX sh: runs under ansible.builtin.script (no
# Python needed on the host) and as the first step (ExecStartPre) of modulus@.service.
#
# Settings come from the environment, or from KEY=VALUE arguments (which win):
#   MODULUS_PYTHON_MODE      auto | sysext | portable | none                      (default auto)
#   MODULUS_PYTHON_URL       portable Python tarball (python-build-standalone "install_only" layout:
#                            python/bin/python3); http(s)://, file:// or an absolute path
#   MODULUS_PYTHON_MIRROR    base URL tried first: <mirror>/<file name of the URL> for the tarball,
#                            <mirror>/<board>/<version>/flatcar-python.raw for the system extension
#   MODULUS_PYTHON_SHA256    SHA-256 of the tarball (required for portable)
#   MODULUS_PYTHON_PREFIX    where Python and the virtual environment go      (default /opt/modulus/python)
#   MODULUS_PIP_INDEX_URL    package index (empty: PyPI; with MODULUS_PIP_FIND_LINKS set: no index)
#   MODULUS_PIP_FIND_LINKS   directory or URL of wheels (a wheel mirror)
#   MODULUS_PIP_PACKAGES     space-separated requirements              (default "ansible-core==2.19.14 boto3")
#   MODULUS_PYTHON_SYSEXT_KEY  armored OpenPGP key verifying flatcar-python.raw (default: the key in
#                            /usr/bin/flatcar-install, as Flatcar's initrd does)
#
# Result: $PREFIX/venv/bin/python (and ansible-pull), and the marker $PREFIX/.modulus-bootstrap that
# says what was done. A second run with the same settings changes nothing. The last line printed is
# MODULUS_BOOTSTRAP_CHANGED=0|1 and MODULUS_PYTHON=<interpreter of the virtual environment>.
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
SYSEXT_KEY=${MODULUS_PYTHON_SYSEXT_KEY:-}
VENV=$PREFIX/venv
MARKER=$PREFIX/.modulus-bootstrap
ROOT=${MODULUS_BOOTSTRAP_ROOT:-}   # tests only: where /usr/share/flatcar and /etc/flatcar are read and written
TMPD=

log() { echo "modulus-bootstrap: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
cleanup() { if [ -n "$TMPD" ]; then rm -rf "$TMPD"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

case $MODE in
  auto|sysext|portable|none) ;;
  *) die "MODULUS_PYTHON_MODE must be auto, sysext, portable or none, got '$MODE'" ;;
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

# ---- Flatcar's python system extension -------------------------------------------------------
os_value() {  # os_value KEY: from the host's os-release
  for f in "$ROOT/etc/os-release" "$ROOT/usr/lib/os-release"; do
    if [ -r "$f" ]; then
      sed -n "s/^$1=//p" "$f" | tr -d '"' | head -n 1
      return 0
    fi
  done
}

is_flatcar() { [ "$(os_value ID)" = flatcar ]; }

# The channel host of a release, as Flatcar's initrd picks it: the second number of the version.
channel_of() {
  case $(echo "$1" | cut -d. -f2) in
    0) echo alpha ;; 1) echo beta ;; 2) echo stable ;; 3) echo lts ;; *) echo "" ;;
  esac
}

sysext_key() {  # writes the armored key to $1
  if [ -n "$SYSEXT_KEY" ]; then
    cp "$SYSEXT_KEY" "$1"
  elif [ -r "$ROOT/usr/bin/flatcar-install" ]; then
    # the same key Flatcar's initrd verifies its extensions with
    awk '/^GPG_KEY="/{on=1; sub(/^GPG_KEY="/, "")} on{ if ($0 ~ /"$/) { sub(/"$/, ""); print; exit } print }' \
      "$ROOT/usr/bin/flatcar-install" > "$1"
  else
    return 1
  fi
  [ -s "$1" ]
}

verify_sig() {  # verify_sig FILE SIG KEY: detached signature, private keyring, no agent
  command -v gpg >/dev/null 2>&1 || { log "gpg is needed to verify $1"; return 1; }
  home="$TMPD/gnupg"
  rm -rf "$home"; mkdir -m 700 "$home"
  GNUPGHOME=$home gpg --batch --quiet --import "$3" >/dev/null 2>&1 || return 1
  GNUPGHOME=$home gpg --batch --quiet --export > "$home/keyring.gpg" || return 1
  if command -v gpgv >/dev/null 2>&1; then
    gpgv --keyring "$home/keyring.gpg" "$2" "$1" >/dev/null 2>&1
  else
    GNUPGHOME=$home gpg --batch --quiet --trust-model always --verify "$2" "$1" >/dev/null 2>&1
  fi
}

# Enable and fetch flatcar-python for the running release; prints the interpreter. Non-zero when the
# release offers no such extension (or it cannot be fetched and verified): the caller falls back.
python_from_sysext() {
  version=$(os_value VERSION_ID)
  board=$(os_value FLATCAR_BOARD)
  [ -n "$board" ] || board=amd64-usr
  [ -n "$version" ] || { log "no VERSION_ID in os-release"; return 1; }
  name=flatcar-python
  image=$ROOT/etc/flatcar/sysext/$name-$version.raw
  if [ ! -e "$image" ]; then
    key="$TMPD/flatcar.asc"
    sysext_key "$key" || { log "no Flatcar signing key (MODULUS_PYTHON_SYSEXT_KEY or /usr/bin/flatcar-install)"; return 1; }
    urls=
    if [ -n "$MIRROR" ]; then urls="${MIRROR%/}/$board/$version/$name.raw"; fi
    channel=$(channel_of "$version")
    if [ -n "$channel" ]; then urls="$urls https://$channel.release.flatcar-linux.net/$board/$version/$name.raw"; fi
    urls="$urls https://bincache.flatcar-linux.net/images/${board%-usr}/$version/$name.raw"
    got=
    for u in $urls; do
      log "fetching $u"
      if fetch "$u" "$TMPD/$name.raw" && fetch "$u.sig" "$TMPD/$name.raw.sig"; then
        if verify_sig "$TMPD/$name.raw" "$TMPD/$name.raw.sig" "$key"; then got=1; break; fi
        log "the signature of $u does not verify: not used"
      fi
      rm -f "$TMPD/$name.raw" "$TMPD/$name.raw.sig"
    done
    [ -n "$got" ] || { log "release $version offers no verifiable $name.raw"; return 1; }
    mkdir -p "$ROOT/etc/flatcar/sysext"
    mv "$TMPD/$name.raw" "$image"
  fi
  # Enable it the Flatcar way: update_engine then fetches it with every update, and the initrd sets it up.
  conf=$ROOT/etc/flatcar/enabled-sysext.conf
  if ! grep -qx 'python' "$conf" 2>/dev/null; then
    mkdir -p "$(dirname "$conf")"
    echo python >> "$conf"
  fi
  mkdir -p "$ROOT/etc/extensions"
  ln -sfn "/etc/flatcar/sysext/$name-$version.raw" "$ROOT/etc/extensions/$name.raw"
  if [ -z "$ROOT" ]; then
    systemd-sysext refresh >&2 || return 1
  fi
  if [ -x "$ROOT/usr/bin/python3" ]; then echo /usr/bin/python3; return 0; fi
  log "flatcar-python is merged but $ROOT/usr/bin/python3 is missing"
  return 1
}

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
  "$top/bin/python3" -c 'import sys; assert sys.version_info >= (3, 9)' \
    || die "the Python in $file does not run on this host (or is older than 3.9)"
  echo "$SHA256" > "$top/.sha256"
  mkdir -p "$PREFIX/dist"
  rm -rf "$dest"
  mv "$top" "$dest"   # the same file system: a rename; a killed run leaves only $TMPD
  echo "$dest/bin/python3"
}

system_python() {
  for p in /usr/bin/python3 /usr/local/bin/python3; do
    if [ -x "$p" ] && "$p" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 9)' >/dev/null 2>&1; then
      echo "$p"; return 0
    fi
  done
  return 1
}

how=
case $MODE in
  sysext)
    is_flatcar || die "mode sysext needs a Flatcar host (os-release ID=flatcar)"
    base=$(python_from_sysext) || die "the flatcar-python system extension could not be set up"
    how=sysext ;;
  portable)
    base=$(python_portable); how=portable ;;
  auto)
    if is_flatcar && base=$(python_from_sysext); then
      how=sysext
    elif ! is_flatcar && base=$(system_python); then
      how=system
    else
      base=$(python_portable); how=portable
    fi ;;
esac
log "Python from $how: $base ($("$base" -c 'import platform; print(platform.python_version())'))"

# ---- the virtual environment ----------------------------------------------------------------
# make_venv DIR: a virtual environment of $base with $PACKAGES. Its scripts name their interpreter
# by path, so it is made where it will live; the previous one waits in $TMPD until this one works.
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

old=$TMPD/venv-old
if [ -e "$VENV" ] || [ -L "$VENV" ]; then mv "$VENV" "$old"; fi
if ! make_venv "$VENV" || ! venv_ok; then
  rm -rf "$VENV"
  if [ -e "$old" ]; then mv "$old" "$VENV"; fi
  die "the virtual environment $VENV could not be made (the previous one, if any, is back)"
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
