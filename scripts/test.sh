#!/usr/bin/env bash
# Set up (once) and run the checks: ruff, ruff format, mypy, the default test
# suite, then the deployment integration tests (separate processes, a few
# minutes). Arguments go to the default pytest run and skip the deployment one,
# e.g. scripts/test.sh -m slow runs only the tests marked `slow`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh dev
echo "== ruff check";  ruff check fedsec strategies simulations tests
echo "== ruff format"; ruff format --check fedsec strategies simulations tests
echo "== mypy";        mypy
echo "== pytest";      pytest "$@"
if [[ $# -eq 0 ]]; then
    echo "== pytest -m deployment"; pytest -m deployment
fi
