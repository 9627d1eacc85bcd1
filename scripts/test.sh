#!/usr/bin/env bash
# Set up (once) and run the checks: ruff, ruff format, mypy, the docs build
# (mkdocs --strict: a broken link fails), the default test suite, then the
# worked Flower app against FedAvg on Ray (a minute or two), the
# deployment integration tests (separate processes, a few minutes) and the
# container image test (docker/build.sh and a deployment in podman: root only,
# skipped otherwise; minutes). Arguments go to the default pytest run and skip
# the deployment and image ones, e.g. scripts/test.sh -m slow runs only the
# tests marked `slow`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh dev
echo "== ruff check";  ruff check fedsec strategies simulations tests scripts
echo "== ruff format"; ruff format --check fedsec strategies simulations tests scripts
echo "== mypy";        mypy
echo "== docs";        mkdocs build --strict --quiet   # broken links fail; site in build/docs
echo "== pytest";      pytest "$@"
if [[ $# -eq 0 ]]; then
    echo "== pytest -m example"; pytest -m example
    echo "== pytest -m deployment"; pytest -m deployment
    echo "== pytest -m images"; pytest -m images
fi
