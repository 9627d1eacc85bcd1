"""Benchmark: where a grid cell's time goes, Flower's simulation engine against in-process.

One cell of the standard grid's shape (digits, 20 clients, Dirichlet 0.5, 2
local epochs, FedAvg, no attack) runs ``--rounds`` rounds through
``fedsec.strategies.bench.run_grid`` with one job, once on Flower's
simulation engine (Ray) and once on the in-process grid (the same ClientApp,
strategy and round loop; transport by function call, clients one after
another). Reported per engine: the worker's start-up until the cell's first
round is recorded (interpreter, imports, and for Ray the engine and its
actors), the first round (first calls: data loading, warm caches), the mean
of the later rounds, and, for Ray, the engine's cost per client call
(the later rounds' difference, spread over the client calls, of which as
many run side by side as there are cores).

    python simulations/bench_engine_overhead.py --rounds 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from fedsec.bench.grid import parse_grid
from fedsec.bench.store import ResultsStore
from fedsec.strategies.bench import run_grid

GRID = """
[grid]
name = "overhead"
[base]
experiment = {{ rounds = {rounds} }}
data = {{ num_clients = {clients}, partition = "dirichlet" }}
client = {{ local_epochs = 2 }}
[[attack]]
name = "none"
[[defense]]
label = "fedavg"
rule = "mean"
"""


def measure(engine: str, rounds: int, clients: int) -> dict[str, Any]:
    text = GRID.format(rounds=rounds, clients=clients)
    grid = parse_grid(tomllib.loads(text), source=text)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore.create_or_open(Path(tmp) / "r", grid)
        started = time.perf_counter()

        def on_event(event: tuple[str, int, str, Any]) -> None:
            if event[0] == "round":
                stamps.append(time.perf_counter())

        failed = run_grid(store, jobs=1, engine=engine, on_event=on_event)
        total = time.perf_counter() - started
        if failed:
            raise SystemExit(f"{engine}: {failed}")
        rows = store.results()[0].rounds
    times = [float(r["round_time_s"]) for r in rows[1:]]
    return {
        "engine": engine,
        "total_s": total,
        "startup_s": stamps[0] - started,  # until round 0 (the initial evaluation) is recorded
        "first_round_s": times[0],
        "later_round_s": statistics.mean(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    rows = [measure(engine, args.rounds, args.clients) for engine in ("inprocess", "ray")]
    actors = os.cpu_count() or 1
    print(f"\n{args.clients} clients, digits MLP, 2 local epochs, {args.rounds} rounds, one job")
    print("| engine | cell total (s) | start-up (s) | first round (s) | later rounds (s) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['engine']} | {row['total_s']:.1f} | {row['startup_s']:.1f} | "
            f"{row['first_round_s']:.2f} | {row['later_round_s']:.2f} |"
        )
    local, ray = rows
    per_call = (ray["later_round_s"] - local["later_round_s"]) * actors / args.clients
    print(
        f"\nRay runs {actors} client calls side by side; its extra time per round spread over "
        f"the calls ({args.clients} clients / {actors} at a time): {1000 * per_call:.0f} ms per "
        "client call"
    )


if __name__ == "__main__":
    main()
