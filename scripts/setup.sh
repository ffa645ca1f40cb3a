#!/usr/bin/env bash
# Shared set-up for the two README commands: system packages and the virtual environment.
# Idempotent; safe to run again. Usage: source scripts/setup.sh EXTRAS
set -euo pipefail

extras=${1:-dev}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
if [ "$extras" = dev ]; then
  # The tests' real peers: a PostgreSQL for the fleet collector, a headless browser for
  # the HTML fleet report, a Prometheus (and its promtool) for the metrics and alert rules.
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]} (apt)"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts the packaged broker (port 1883) and Prometheus (9090) as services;
# edgeship's tests and demo start their own on free ports and do not need them.

python=python3.11
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  "$python" -m venv "$venv"
fi
echo "==> installing edgeship[$extras] into $venv"
log=$(mktemp)
if ! { "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip &&
       "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extras]"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "pip install failed (log above)" >&2
  exit 1
fi
rm -f "$log"
export PATH="$venv/bin:$PATH"
