#!/usr/bin/env bash
# The main job, end to end on this machine: train the digits model; keys and trust root v1;
# signed, gated bundles v1, v2 (int8) and v3 (refused on the device); a broker, a bundle
# server, a collector and two device agents; rollouts under live traffic (hot swap, then a
# refused bundle and a halted rollout); the release key rotated over the air (root v2: a
# bundle the revoked key signed is refused, v5 signed with the new key installs); the
# fleet status and an HTML report.
# Pass --broker mqtt://HOST:PORT to use an existing broker instead of a private mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh sdk
exec python examples/quickstart/fleet_demo.py "$@"
