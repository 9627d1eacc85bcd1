#!/usr/bin/env bash
# Set up (once) and run the embedded default: 10 IID clients, FedAvg, digits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
exec fedsec run "$@"
