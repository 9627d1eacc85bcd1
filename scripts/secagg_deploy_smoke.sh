#!/usr/bin/env bash
# Smoke test: secure aggregation (SecAgg+) across separate processes on Flower's
# deployment engine -- one SuperLink, four SuperNodes, and `flwr run` of this
# repository's app against them, with simulations/secagg_deploy.toml.
#
#   bash scripts/secagg_deploy_smoke.sh            # exit 0 = passed, 1 = failed
#
# Environment (all optional):
#   SUPERLINK_PORT   port of the SuperLink's API (default 9093)
#   NODE_PORT_BASE   SuperNode i serves its runtime API on NODE_PORT_BASE+i (default 9101)
#   SMOKE_TIMEOUT    seconds `flwr run` may take (default 300)
#   KEEP_TMP=1       keep the temporary folder (logs, results) after a pass
#
# Notes on the Flower build installed in .venv (flwr 1.42.0, read from its source):
# - The SuperLink serves the Control API (flwr CLI), the Fleet API (SuperNodes) and
#   the runtime API (ServerApp) as protobuf over HTTP on one port (--host/--port,
#   default 8000); the gRPC servers on 9092/9093 are legacy and off unless internal
#   env toggles are set. We put that single port on 9093.
# - SuperNodes have no --clientappio-api-address any more; each one's runtime API
#   for its ClientApp processes is --port (default 9094 for all, hence one each).
# - `flwr run . NAME` takes a SuperLink *connection* NAME from $FLWR_HOME/config.toml
#   ([superlink.NAME] address/insecure); pyproject's [tool.flwr.federations] is
#   legacy (flwr migrates it into config.toml and comments it out of pyproject).
# - FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION is read by the SuperLink when it
#   starts (not by `flwr run`), so it is exported before the SuperLink starts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BIN="$ROOT/.venv/bin"
CONFIG="$ROOT/simulations/secagg_deploy.toml"
RUN_NAME="secagg-deploy"
NUM_NODES=4
SUPERLINK_PORT="${SUPERLINK_PORT:-9093}"
NODE_PORT_BASE="${NODE_PORT_BASE:-9101}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-300}"
CONNECTION="fedsec-smoke"

for exe in flwr flower-superlink flower-supernode flower-superexec python; do
    if [[ ! -x "$VENV_BIN/$exe" ]]; then
        echo "error: $VENV_BIN/$exe not found (set up .venv first: bash scripts/setup.sh)" >&2
        exit 1
    fi
done
[[ -f "$CONFIG" ]] || { echo "error: $CONFIG not found" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fedsec-secagg-smoke.XXXXXX")"
LOGS="$TMP/logs"
RESULTS="$TMP/results"
mkdir -p "$LOGS" "$RESULTS"

# Everything Flower writes (connection config, installed FABs, SuperExec state) stays here.
export FLWR_HOME="$TMP/flwr-home"
mkdir -p "$FLWR_HOME"
# The SuperLink, its SuperExec and the app processes find flower-superexec,
# flwr-serverapp and flwr-clientapp by name on PATH.
export PATH="$VENV_BIN:$PATH"
# Run the app in this environment; otherwise the SuperLink `uv sync`s the app's
# dependencies into a fresh one (a multi-GB CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PYTHONUNBUFFERED=1

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$SUPERLINK_PORT"
insecure = true
EOF

PIDS=()

# All processes below $1 (children first listed after their parents).
descendants() {
    local parent=$1 child
    for child in $(ps -o pid= --ppid "$parent" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

cleanup() {
    local rc=$? victims=() pid
    trap - EXIT INT TERM
    set +e
    # Snapshot the whole tree first: once a SuperLink or SuperNode exits, its
    # (detached) flower-superexec and app processes are re-parented to init.
    for pid in "${PIDS[@]}"; do
        victims+=("$pid")
        while read -r child; do victims+=("$child"); done < <(descendants "$pid")
    done
    if ((${#victims[@]})); then
        kill -TERM "${victims[@]}" 2>/dev/null
        for _ in $(seq 1 50); do
            local alive=0
            for pid in "${victims[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.1
        done
        kill -KILL "${victims[@]}" 2>/dev/null
    fi
    if [[ $rc -eq 0 && "${KEEP_TMP:-0}" != 1 ]]; then
        rm -rf "$TMP"
    else
        echo "logs and results kept in $TMP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_open() {  # port_open PORT: something accepts connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

show_logs() {
    local f
    for f in "$LOGS"/*.log; do
        [[ -f "$f" ]] || continue
        echo "----- tail of ${f#"$TMP"/} -----" >&2
        tail -n 25 "$f" >&2
    done
}

fail() {
    echo "FAIL: $*" >&2
    show_logs
    exit 1
}

for port in "$SUPERLINK_PORT" $(seq "$NODE_PORT_BASE" $((NODE_PORT_BASE + NUM_NODES - 1))); do
    port_open "$port" && fail "port $port is already in use (a Flower process left running?)"
done

cd "$ROOT"

flower-superlink --insecure --host 127.0.0.1 --port "$SUPERLINK_PORT" \
    --disable-runtime-dependency-installation >"$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do
    port_open "$SUPERLINK_PORT" && break
    kill -0 "${PIDS[0]}" 2>/dev/null || fail "flower-superlink exited at start"
    sleep 0.25
done
port_open "$SUPERLINK_PORT" || fail "flower-superlink is not listening on port $SUPERLINK_PORT after 30 s"

for i in $(seq 0 $((NUM_NODES - 1))); do
    flower-supernode --insecure --superlink "127.0.0.1:$SUPERLINK_PORT" \
        --host 127.0.0.1 --port $((NODE_PORT_BASE + i)) \
        --node-config "partition-id=$i num-partitions=$NUM_NODES" \
        >"$LOGS/supernode-$i.log" 2>&1 &
    PIDS+=($!)
done

echo "SuperLink on 127.0.0.1:$SUPERLINK_PORT, $NUM_NODES SuperNodes; running $CONFIG" >&2
# The server waits (server.round_timeout) until all 4 SuperNodes have registered.
# Note: a --run-config value that ends in ".toml" is read as a TOML file by flwr,
# so the values stay quoted.
# In the background + `wait`, so that INT/TERM reach the trap at once (bash defers
# traps until a foreground child exits).
timeout "$SMOKE_TIMEOUT" flwr run . "$CONNECTION" --stream \
    --run-config "config-file='$CONFIG' results-dir='$RESULTS'" >"$LOGS/flwr-run.log" 2>&1 &
PIDS+=($!)
set +e
wait "${PIDS[-1]}"
run_rc=$?
set -e
if [[ $run_rc -eq 124 ]]; then
    fail "flwr run did not finish within $SMOKE_TIMEOUT s"
elif [[ $run_rc -ne 0 ]]; then
    fail "flwr run exited with code $run_rc"
fi

# `flwr run --stream` exits 0 even when the ServerApp fails (the run then ends
# finished:failed), so the run's status on the SuperLink is what counts.
run_id="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$LOGS/flwr-run.log" | head -n 1)"
[[ -n "$run_id" ]] || fail "flwr run printed no run id"
status="$(flwr ls "$CONNECTION" --run-id "$run_id" --format json 2>"$LOGS/flwr-ls.err" | python -c '
import json, sys
try:
    print(json.load(sys.stdin)["runs"][0]["status"])
except (ValueError, KeyError, IndexError):
    print("unknown (flwr ls gave no status)")
')"
[[ "$status" == "finished:completed" ]] || fail "run $run_id ended $status, not finished:completed"

METRICS="$RESULTS/$RUN_NAME/metrics.json"
[[ -f "$METRICS" ]] || fail "no $METRICS (the ServerApp did not finish the run)"

set +e
summary="$(python - "$METRICS" <<'EOF'
import json
import sys

data = json.load(open(sys.argv[1]))
rounds = [r for r in data["rounds"] if r.get("round", 0) >= 1]
expected = data["config"]["experiment"]["rounds"]
clients = data["config"]["data"]["num_clients"]
problems = []
if not data.get("finished"):
    problems.append("run not marked finished")
if len(rounds) != expected:
    problems.append(f"{len(rounds)} rounds recorded, expected {expected}")
for r in rounds:
    n = r["round"]
    if r.get("status") != "ok":
        problems.append(f"round {n}: status {r.get('status')!r} ({r.get('error', 'no error given')})")
    if r.get("num-accepted") != clients:
        problems.append(f"round {n}: num-accepted {r.get('num-accepted')!r}, expected {clients}")
    if "secagg_degree" not in r:
        problems.append(f"round {n}: no secagg_degree (not a secure round)")
if problems:
    print("; ".join(problems))
    sys.exit(1)
final = data["final"]
times = ", ".join(f"r{r['round']} {r['round_time_s']:.1f}s" for r in rounds)
degree = rounds[-1]["secagg_degree"]
threshold = rounds[-1].get("secagg_threshold")
print(
    f"PASS: secagg over {clients} SuperNodes, {len(rounds)} rounds all ok "
    f"(k={degree}, t={threshold}); final test accuracy {100 * final['test_accuracy']:.2f}%; "
    f"round time {times}"
)
EOF
)"
check_rc=$?
set -e
[[ $check_rc -eq 0 ]] || fail "metrics check: $summary"
echo "$summary"
