#!/usr/bin/env bash
# Create .venv (once) and install fedsec into it. Sourced by quickstart.sh and test.sh.
#
# torch is installed first and pinned to 2.13.0 on machines without a GPU, so
# pip takes the CPU wheel instead of pulling a multi-GB CUDA build; pyproject
# keeps a range, so GPU users (FEDSEC_TORCH=skip) get their own CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip_quiet() {
    # Quiet on success; on failure show pip's output (minus local-index noise).
    local log
    log=$(mktemp)
    if ! python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

stamp=".venv/.fedsec-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setting up .venv (first run takes a minute or two)..."
    if [ "${FEDSEC_TORCH:-cpu}" = "cpu" ] && ! python -c "import torch" 2>/dev/null; then
        pip_quiet "torch==2.13.0"
    fi
    pip_quiet -e ".${EXTRAS:+[$EXTRAS]}"
    python -c "import fedsec, fedsec.strategies, torch, flwr" || {
        echo "error: fedsec did not install; rerun with pip's output: pip install -e ." >&2
        exit 1
    }
    touch "$stamp"
fi
