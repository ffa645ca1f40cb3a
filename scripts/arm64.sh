#!/usr/bin/env bash
# The agent on aarch64, under emulation, on an x86_64 machine: Debian 12's arm64 CPython
# 3.11 in a private sysroot, run by qemu's user-mode emulator, and a venv with the agent's
# dependencies as pip resolves them on aarch64 (the manylinux wheels a 64-bit Raspberry Pi
# or Jetson gets from PyPI). Nothing is installed system-wide: the .debs come through a
# private apt configuration and are unpacked, never dpkg-installed, and no binfmt_misc
# handler is registered (it is a machine-wide setting, and often not mounted at all).
#
# Usage: bash scripts/arm64.sh    prints the path of the venv's python on stdout: an x86_64
# sh launcher that runs the aarch64 interpreter under qemu-aarch64-static. Cached under
# ${EDGESHIP_CACHE:-~/.cache/edgeship}/arm64; a changed .deb list refetches the sysroot, a
# changed dependency list rebuilds the venv. Any failure (no network, no keyring) exits
# non-zero.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${EDGESHIP_CACHE:-$HOME/.cache/edgeship}/arm64
sysroot=$cache/sysroot
qemu_dir=$cache/qemu
qemu=$qemu_dir/usr/bin/qemu-aarch64-static
venv=$cache/venv
python=$sysroot/usr/bin/python3.11
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$cache"
# One set-up at a time: two test runs on one machine share the cache.
exec 9>"$cache/.lock"
flock 9

# Debian 12's own (bookworm, with its updates and security fixes): the OS of Raspberry Pi
# OS bookworm 64-bit, and the Python (3.11) the machine running this script has too, so
# the host's SDK and the emulated agent agree on everything but the architecture.
suites=("http://deb.debian.org/debian bookworm main"
        "http://deb.debian.org/debian bookworm-updates main"
        "http://deb.debian.org/debian-security bookworm-security main")
# apt-get download takes no dependencies: this is what the interpreter, its standard
# library's extension modules and the wheels' native code (onnxruntime's and LiteRT's C++,
# cryptography's Rust) load at run time. No shell: a sysroot /bin/sh would shadow the
# host's for every command the emulated Python starts (qemu looks there first), and the
# kernel cannot run it without binfmt_misc. Not libdb5.3, libnsl2, libtirpc3: only the
# dbm and nis modules load them, and bookworm's 3.11 has libmpdec built in.
debs=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11-venv
      libc6 libssl3 libffi8 zlib1g libexpat1 libbz2-1.0 liblzma5 libsqlite3-0
      libstdc++6 libgcc-s1 libuuid1 libncursesw6 libtinfo6 libreadline8 libcrypt1)
qemu_debs=(qemu-user-static)

# apt_download DIR ARCH PACKAGE...: the packages' .debs for ARCH into DIR/debs, the
# archive's indexes checked against Debian's keyring.
apt_download() {
  local apt=$1 arch=$2 suite
  shift 2
  mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  : >"$apt/sources.list"
  for suite in "${suites[@]}"; do
    echo "deb [arch=$arch signed-by=$keyring] $suite" >>"$apt/sources.list"
  done
  # An empty dpkg status: the host's installed (amd64) versions must not become the
  # candidates, nor its architecture the one apt resolves for.
  : >"$apt/state/status"
  # Only this sources list, this state and this cache: the system's apt is never touched.
  local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
              -o "Dir::State=$apt/state" -o "Dir::State::status=$apt/state/status"
              -o "Dir::Cache=$apt/cache" -o "APT::Architecture=$arch"
              -o "APT::Architectures=$arch" -o "Dir::Etc::TrustedParts=/nonexistent"
              -o "Debug::NoLocking=1" -o "Acquire::Languages=none")
  # Root in CI: apt's _apt sandbox user cannot write into a private directory under $HOME.
  [ "$(id -u)" -ne 0 ] || opts+=(-o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" -qq update >&2
  (cd "$apt/debs" && apt-get "${opts[@]}" -qq download "$@" >&2)
}

if [ ! -r "$keyring" ]; then
  echo "arm64.sh: $keyring is missing; install debian-archive-keyring" >&2
  exit 1
fi

# The emulator: the host's architecture, a static binary, so it runs from any directory.
qemu_stamp=$(printf '%s\n' "${suites[@]}" "${qemu_debs[@]}" qemu-aarch64-static | sha256sum | cut -c1-16)
if [ "$(cat "$qemu_dir/.edgeship-stamp" 2>/dev/null)" != "$qemu_stamp" ] || ! "$qemu" --version >/dev/null 2>&1; then
  echo "==> fetching qemu-user-static from Debian bookworm into $qemu_dir" >&2
  rm -rf "$cache/apt-qemu" "$qemu_dir"
  mkdir -p "$qemu_dir"
  apt_download "$cache/apt-qemu" "$(dpkg --print-architecture)" "${qemu_debs[@]}"
  dpkg-deb -x "$(echo "$cache"/apt-qemu/debs/qemu-user-static_*.deb)" "$cache/apt-qemu/root"
  # The one emulator of the package's thirty (370 MB) this needs.
  mkdir -p "$(dirname "$qemu")"
  mv "$cache/apt-qemu/root/usr/bin/qemu-aarch64-static" "$qemu"
  rm -rf "$cache/apt-qemu"
  "$qemu" --version >&2
  echo "$qemu_stamp" >"$qemu_dir/.edgeship-stamp"
fi

# -L: the guest's absolute paths are looked up in the sysroot first, then on the host, so
# the aarch64 loader, libraries and standard library come from the sysroot while /work,
# /tmp and the venv are the host's. -0: the guest's argv[0] is the launcher's path, not
# the interpreter's, from which CPython takes sys.executable and finds the venv's
# pyvenv.cfg; a child started as sys.executable (the agent's health-gate worker, the
# tests' agents) goes through the launcher again, so it too runs under qemu.
# -cpu: a Raspberry Pi 4's core, ARMv8.0-A (as qemu models it, with the AES and SHA
# instructions the Pi's SoC leaves out). qemu's default ("max") has every extension it
# implements (SVE2, i8mm, bf16, ...), on which a wheel built for newer cores would pass
# here and die of SIGILL on the oldest 64-bit boards.
emulate=("$qemu" -cpu cortex-a72 -L "$sysroot")
sysroot_stamp=$(printf '%s\n' "${suites[@]}" "${debs[@]}" | sha256sum | cut -c1-16)
if [ "$(cat "$sysroot/.edgeship-stamp" 2>/dev/null)" != "$sysroot_stamp" ] ||
   ! "${emulate[@]}" "$python" -c 'import ssl, ctypes, decimal, venv' >/dev/null 2>&1; then
  echo "==> fetching CPython 3.11 (arm64) from Debian bookworm into $sysroot" >&2
  rm -rf "$cache/apt" "$sysroot"
  mkdir -p "$sysroot"
  apt_download "$cache/apt" arm64 "${debs[@]}"
  for deb in "$cache"/apt/debs/*.deb; do dpkg-deb -x "$deb" "$sysroot"; done
  rm -rf "$cache/apt"
  # What the agent and its tests load: a library missing from the sysroot fails here.
  "${emulate[@]}" "$python" -c \
    'import ssl, ctypes, decimal, venv, zlib, lzma, bz2, pyexpat, sqlite3, hashlib, uuid' >&2
  echo "$sysroot_stamp" >"$sysroot/.edgeship-stamp"
fi
# qemu 7.2 passes the host's /proc/cpuinfo through to an aarch64 guest, and an x86 one
# has none of the fields the cpuinfo library (inside onnxruntime) parses on ARM: it then
# dereferences NULL, and `import onnxruntime` dies with SIGSEGV. The sysroot's copy, which
# -L puts in its place, describes the emulated Cortex-A72 (its features as qemu models
# them: the AT_HWCAP the guest sees) with this machine's processor count, which must
# match /sys/devices/system/cpu/present (the host's, not emulated). Rewritten on every
# run: the processors the machine has today.
mkdir -p "$sysroot/proc"
for ((cpu = 0; cpu < $(nproc --all); cpu++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd aes pmull sha1 sha2 crc32 cpuid\n' "$cpu"
  printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
  printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
done >"$sysroot/proc/cpuinfo.tmp"
mv "$sysroot/proc/cpuinfo.tmp" "$sysroot/proc/cpuinfo"

# What the agent's tests need on the device side: the agent's core dependencies and its
# onnx and litert extras as pyproject.toml declares them (so their markers are evaluated
# by the aarch64 interpreter's pip), and nothing of the SDK.
requirements=$(python3 - "$root/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
for req in [*project["dependencies"], *extras["onnx"], *extras["litert"]]:
    print(req)
PY
)
# The test tools (the dev extra's bounds; prometheus-client is the oracle of the /metrics
# text, and paho loads dnspython when present). Not scipy, mypy: the first is an optional
# oracle, the second says nothing about the architecture, and each costs minutes of
# emulated installation.
requirements+=$'\npytest>=8\npytest-timeout>=2.3\nhypothesis>=6.100\npsutil>=5.9\ndnspython>=2.4'
requirements+=$'\nprometheus-client>=0.17'
launcher_text=$(cat <<LAUNCHER
#!/bin/sh
# The aarch64 CPython under qemu user-mode emulation (scripts/arm64.sh).
exec "$qemu" -cpu cortex-a72 -L "$sysroot" -0 "\$0" "$python" "\$@"
LAUNCHER
)
stamp=$(printf '%s\n' "$requirements" "$launcher_text" "$sysroot_stamp" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.edgeship-stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
  echo "==> creating the aarch64 venv $venv" >&2
  rm -rf "$venv"
  "${emulate[@]}" "$python" -m venv --without-pip "$venv"
  # The venv's pythons are links to the aarch64 binary, which this kernel cannot execute:
  # one launcher takes their place, the others stay links to it.
  rm -f "$venv"/bin/python "$venv"/bin/python3 "$venv"/bin/python3.11
  printf '%s\n' "$launcher_text" >"$venv/bin/python"
  chmod +x "$venv/bin/python"
  ln -s python "$venv/bin/python3"
  ln -s python "$venv/bin/python3.11"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download -q --disable-pip-version-check --no-deps --python-version 3.11 \
    --only-binary=:all: -d "$wheels" pip >&2
  pip_wheel=$(echo "$wheels"/pip-*.whl)
  "$venv/bin/python" "$pip_wheel/pip" install -q --disable-pip-version-check \
    --no-warn-script-location "$pip_wheel" >&2
  mapfile -t reqs <<<"$requirements"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "${reqs[@]}" >&2
  echo "$stamp" >"$venv/.edgeship-stamp"
fi
echo "$venv/bin/python"
