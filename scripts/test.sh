#!/usr/bin/env bash
# Set up (once) and run the checks: ruff, ruff format, mypy, then the default
# test suite (tests marked `slow` run with: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh dev
echo "== ruff check";  ruff check fedsec strategies simulations tests
echo "== ruff format"; ruff format --check fedsec strategies simulations tests
echo "== mypy";        mypy
echo "== pytest";      pytest "$@"
