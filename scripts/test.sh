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
# The agent runs on 3.9-3.13 (the SDK on 3.11+): its newest Pythons here; 3.9 and 3.10
# on real CPythons 3.9 and 3.10 in tests/compat/test_pythons.py.
for version in 3.12 3.13; do
  echo "==> mypy (strict): the agent for Python $version"
  mypy --python-version "$version" agent
done
echo "==> pytest"
pytest "$@"
