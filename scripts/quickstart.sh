#!/usr/bin/env bash
# The main job, end to end on this machine: train the digits model; key and trust policy;
# signed, gated bundles v1, v2 (int8) and v3 (refused on the device); a broker, a bundle
# server, a collector and two device agents; rollouts under live traffic (hot swap, then a
# refused bundle and a halted rollout); the fleet status and an HTML report.
# Pass --broker mqtt://HOST:PORT to use an existing broker instead of a private mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh sdk
exec python examples/quickstart/fleet_demo.py "$@"
