"""Benchmark: bucketed secure aggregation, accuracy under attack and cost per round.

Accuracy. Digits, 20 clients, Dirichlet alpha = 0.5, MLP, 2 local epochs,
``--rounds`` rounds, seed 0; 4 clients (20 %) run IPM (Xie et al. 2020,
epsilon = 100), pooling their own updates before masking (the only collusion
secure aggregation leaves them). Every row runs secure aggregation; the
bucketed rows (bucket size s in {2, 3, 5}) apply coordinate median or
centered clipping (tau = 0.1) across the bucket means, with and without a norm
bound of 2 (honest update norms here are 0.7-1.2). Baselines: the clean
secure mean and the attacked secure mean. Reported: final test accuracy, the
smallest bucket unmasked and the buckets the norm bound discarded.

Cost. ``mlp-wide`` (1,060,170 parameters) on digits, 20 clients, one local
step each, on the in-process grid (the real ClientApp, mod, strategy and
workflow; only the transport is a function call, so the figures are compute,
not network): mean wall time of a training round (after one warm-up round)
for plain (unsecured) FedAvg, plain SecAgg+, bucketed SecAgg with
s in {2, 3, 5} and bucketed SecAgg (s = 3) with distributed DP (Skellam noise at
noise multiplier 1, whose honest buckets must pass the norm check), and the
protocol's own share of it (the stage times minus nothing: every stage exchange
includes the clients' work).

    python simulations/bench_secagg_buckets.py              # both parts, 2 jobs
    python simulations/bench_secagg_buckets.py --part cost --cost-rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

IPM = {"name": "ipm", "num_malicious": 4, "params": {"epsilon": 100.0}}
SIZES = (2, 3, 5)
RULES: dict[str, dict[str, Any]] = {"median": {}, "centered-clipping": {"tau": 0.1}}


def _run(raw: dict[str, Any], clients: int) -> list[dict[str, Any]]:
    from fedsec.client.app import app as client_app
    from fedsec.config import parse_config
    from fedsec.runs import RunDirectory
    from fedsec.strategies.inprocess import InProcessGrid
    from fedsec.strategies.server_app import run_experiment

    logging.getLogger("fedsec").setLevel(logging.ERROR)
    cfg = parse_config(raw)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDirectory.create(cfg, tmp)
        return run_experiment(InProcessGrid(client_app, clients).as_grid(), cfg, run)


def accuracy_cell(name: str, sections: dict[str, Any], rounds: int) -> dict[str, Any]:
    """One attacked (or clean) secure experiment; its final figures."""
    raw: dict[str, Any] = {
        "experiment": {"name": "bench-buckets", "rounds": rounds, "seed": 0},
        "data": {"partition": "dirichlet", "alpha": 0.5, "num_clients": 20},
        "client": {"local_epochs": 2},
        "secagg": {"enabled": True},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    started = time.perf_counter()
    rounds_ = _run(raw, 20)[1:]
    return {
        "name": name,
        "accuracy": float(rounds_[-1]["test_accuracy"]),
        "failed_rounds": sum(r["status"] != "ok" for r in rounds_),
        "min_bucket": min((int(r.get("secagg_min_bucket", 0)) for r in rounds_), default=0),
        "discarded": sum(int(r.get("secagg_buckets_discarded", 0)) for r in rounds_),
        "seconds": time.perf_counter() - started,
    }


def accuracy_cells() -> list[tuple[str, dict[str, Any]]]:
    cells: list[tuple[str, dict[str, Any]]] = [
        ("secure mean, no attack", {}),
        ("secure mean", {"attack": IPM}),
    ]
    for s in SIZES:
        for rule, params in RULES.items():
            for bound in (0.0, 2.0):
                label = f"s={s} {rule}" + (" + norm bound 2" if bound else "")
                cells.append(
                    (
                        label,
                        {
                            "attack": IPM,
                            "aggregation": {
                                "rule": rule,
                                "params": params,
                                "pre": ["bucketing"],
                                "bucket_size": s,
                            },
                            "secagg": {"norm_bound": bound},
                        },
                    )
                )
    return cells


def cost_cell(name: str, sections: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Mean training-round time (one warm-up round excluded) of a 20-client mlp-wide run."""
    raw: dict[str, Any] = {
        "experiment": {"name": "bench-buckets-cost", "rounds": rounds + 1, "seed": 0},
        "data": {"partition": "iid", "num_clients": 20},
        "client": {"local_steps": 1, "batch_size": 32},
        "model": {"name": "mlp-wide"},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    measured = _run(raw, 20)[2:]
    protocol = [
        sum(float(v) for k, v in r.items() if k.startswith("secagg_") and k.endswith("_s"))
        for r in measured
    ]
    return {
        "name": name,
        "round_s": statistics.mean(float(r["round_time_s"]) for r in measured),
        "secagg_stages_s": statistics.mean(protocol),
        "buckets": measured[-1].get("secagg_buckets", 0),
        "failed_rounds": sum(r["status"] != "ok" for r in measured),
    }


def cost_cells() -> list[tuple[str, dict[str, Any]]]:
    cells: list[tuple[str, dict[str, Any]]] = [
        ("plain FedAvg (no SecAgg)", {}),
        ("SecAgg+ mean", {"secagg": {"enabled": True}}),
    ]
    for s in SIZES:
        cells.append(
            (
                f"bucketed s={s}, median",
                {
                    "secagg": {"enabled": True},
                    "aggregation": {"rule": "median", "pre": ["bucketing"], "bucket_size": s},
                },
            )
        )
    # Distributed DP: every client adds Skellam noise (Poisson means ~1e15 here).
    cells.append(
        (
            "bucketed s=3, median, distributed DP sigma 1",
            {
                "secagg": {"enabled": True, "weight_cap": 0},
                "aggregation": {"rule": "median", "pre": ["bucketing"], "bucket_size": 3},
                "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "update_clip": 1.0},
            },
        )
    )
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "accuracy", "cost"), default="all")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per accuracy run")
    parser.add_argument("--cost-rounds", type=int, default=3, help="measured rounds per cost run")
    parser.add_argument("--jobs", type=int, default=2, help="accuracy runs in parallel")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.part in ("all", "accuracy"):
        cells = accuracy_cells()
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(accuracy_cell, name, sec, args.rounds) for name, sec in cells]
            rows = [f.result() for f in futures]
        clean = rows[0]["accuracy"]
        print(
            f"\nAccuracy: digits, 20 clients, Dirichlet 0.5, 20% IPM (eps 100), "
            f"{args.rounds} rounds, seed 0"
        )
        print("| defense | final accuracy | drop vs clean | smallest bucket | discarded buckets |")
        print("| --- | --- | --- | --- | --- |")
        for row in rows:
            print(
                f"| {row['name']} | {row['accuracy']:.3f} | {clean - row['accuracy']:+.3f} | "
                f"{row['min_bucket']} | {row['discarded']} |"
            )
        out["accuracy"] = rows
    if args.part in ("all", "cost"):
        rows = [cost_cell(name, sec, args.cost_rounds) for name, sec in cost_cells()]
        base = rows[1]["round_s"]
        print("\nCost: mlp-wide (d = 1,060,170), 20 clients, one local step, in-process grid")
        print("| setting | round (s) | vs SecAgg+ | secagg stages (s) | buckets | failed rounds |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in rows:
            print(
                f"| {row['name']} | {row['round_s']:.2f} | {row['round_s'] / base:.2f}x | "
                f"{row['secagg_stages_s']:.2f} | {row['buckets']} | {row['failed_rounds']} |"
            )
        out["cost"] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
