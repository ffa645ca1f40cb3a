#!/usr/bin/env bash
# The test command: installs what it needs, then lints, type-checks and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev

echo "==> ruff"
ruff check .
ruff format --check .
echo "==> mypy (strict)"
mypy
echo "==> pytest"
pytest "$@"
