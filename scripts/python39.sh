#!/usr/bin/env bash
# A real CPython 3.9 (Debian bullseye's, the Python of Raspberry Pi OS and Debian 11) in a
# private prefix, and a virtual environment with the agent's dependencies, to run the
# agent's tests on the oldest Python it supports. Nothing is installed system-wide: the
# .debs come through a private apt configuration and are unpacked, never dpkg-installed.
#
# Usage: bash scripts/python39.sh    prints the path of a python3.9 launcher on stdout
# (the venv's python with the private libraries on LD_LIBRARY_PATH). Cached under
# ${EDGESHIP_CACHE:-~/.cache/edgeship}/python3.9; a changed dependency list rebuilds the
# venv, not the interpreter. Any failure (no network, no keyring) exits non-zero.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${EDGESHIP_CACHE:-$HOME/.cache/edgeship}/python3.9
prefix=$cache/prefix
venv=$cache/venv
arch=$(dpkg --print-architecture)
mkdir -p "$cache"
# One set-up at a time: two test runs on one machine share the cache.
exec 9>"$cache/.lock"
flock 9

# python3-distutils is pinned: bullseye's python3.9-venv needs the 3.9 build of it.
debs=(python3.9-minimal libpython3.9-minimal libpython3.9-stdlib python3.9-venv
      libssl1.1 libffi7 libmpdec3 python3-distutils=3.9.2-1)

fetch_interpreter() {
  local apt=$cache/apt keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ ! -r "$keyring" ]; then
    echo "python39.sh: $keyring is missing; install debian-archive-keyring" >&2
    exit 1
  fi
  rm -rf "$apt" "$prefix"
  mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$prefix"
  echo "deb [signed-by=$keyring] http://deb.debian.org/debian bullseye main" >"$apt/sources.list"
  # Only this sources list, this state and this cache: the system's apt is never touched.
  local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
              -o "Dir::State=$apt/state" -o "Dir::Cache=$apt/cache" -o "APT::Architecture=$arch"
              -o "Dir::Etc::TrustedParts=/nonexistent" -o "Debug::NoLocking=1")
  # Root in CI: apt's _apt sandbox user cannot write into a private directory under $HOME.
  [ "$(id -u)" -ne 0 ] || opts+=(-o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" -qq update >&2
  (cd "$apt/debs" && apt-get "${opts[@]}" -qq download "${debs[@]}" >&2)
  local deb
  for deb in "$apt/debs"/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
  rm -rf "$apt"
}

# libssl1.1, libffi7 and libmpdec3 live in the prefix only: the interpreter finds them here.
libs() {
  local dir found=()
  for dir in "$prefix"/usr/lib/*-linux-gnu* "$prefix"/lib/*-linux-gnu*; do
    [ -d "$dir" ] && found+=("$dir")
  done
  local IFS=:
  echo "${found[*]}"
}
export LD_LIBRARY_PATH="$(libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! "$prefix/usr/bin/python3.9" -c 'import ssl, ctypes, decimal, venv' >/dev/null 2>&1; then
  echo "==> fetching CPython 3.9 from Debian bullseye into $prefix" >&2
  fetch_interpreter
  export LD_LIBRARY_PATH="$(libs)"
  "$prefix/usr/bin/python3.9" -c 'import ssl, ctypes, decimal, venv' >&2
fi

# What the agent's tests need on the device side: the agent's core dependencies and its
# onnx extra as pyproject.toml declares them (so their markers are evaluated by 3.9's pip),
# and nothing of the SDK.
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
# drift bands and the /metrics text) and mypy: pip takes the last releases for 3.9.
requirements+=$'\npytest>=8\npytest-timeout>=2.3\nhypothesis>=6.100\npsutil>=5.9\ndnspython>=2.4'
requirements+=$'\nscipy>=1.11\nprometheus-client>=0.17\nmypy>=1.10'
stamp=$(printf '%s\n' "$requirements" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.edgeship-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "==> creating the Python 3.9 venv $venv" >&2
  rm -rf "$venv"
  "$prefix/usr/bin/python3.9" -m venv --without-pip "$venv"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download -q --disable-pip-version-check --no-deps --python-version 3.9 \
    --only-binary=:all: -d "$wheels" pip >&2
  pip_wheel=$(echo "$wheels"/pip-*.whl)
  "$venv/bin/python" "$pip_wheel/pip" install -q --disable-pip-version-check \
    --no-warn-script-location "$pip_wheel" >&2
  mapfile -t reqs <<<"$requirements"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "${reqs[@]}" >&2
  echo "$stamp" >"$venv/.edgeship-stamp"
fi
launcher=$cache/python3.9
cat >"$launcher.tmp" <<LAUNCHER
#!/bin/sh
export LD_LIBRARY_PATH="$(libs)\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$venv/bin/python" "\$@"
LAUNCHER
chmod +x "$launcher.tmp"
mv "$launcher.tmp" "$launcher"
echo "$launcher"
