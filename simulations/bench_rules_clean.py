"""Benchmark: what each aggregation rule costs in accuracy with no attacker.

Robust rules trade accuracy for robustness on heterogeneous data even when
nobody attacks (bucketing paper, Karimireddy et al. 2022). This runs the same
digits experiment (20 clients, Dirichlet alpha=0.5, 30 rounds by default) once
per rule and prints final test accuracy next to FedAvg's, naming rules that
lose more than 5 points together with their bucketing / NNM variants.

It uses fedsec's ServerApp loop, strategy and ClientApp unchanged, over the
in-process grid (see ``fedsec.strategies.inprocess``) instead of Ray, so the
sweep takes minutes rather than an hour on two cores.

    python simulations/bench_rules_clean.py
    python simulations/bench_rules_clean.py --rounds 10 --rules mean median
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsec.client.app import app as client_app
from fedsec.config import parse_config
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

#: label -> [aggregation] section. f = 2 assumes 10% attackers among 20 clients.
VARIANTS: dict[str, dict[str, Any]] = {
    "mean": {"rule": "mean"},
    "median": {"rule": "median"},
    "trimmed-mean": {"rule": "trimmed-mean", "params": {"beta": 0.1}},
    "krum": {"rule": "krum", "f": 2},
    "multi-krum": {"rule": "multi-krum", "f": 2},
    "bulyan": {"rule": "bulyan", "f": 2},
    "geometric-median": {"rule": "geometric-median"},
    "centered-clipping": {"rule": "centered-clipping"},
    "norm-bounding": {"rule": "norm-bounding", "params": {"adaptive": True}},
    "fltrust": {"rule": "fltrust"},
    "foolsgold": {"rule": "foolsgold"},
    "dnc": {"rule": "dnc", "f": 2},
    "flame": {"rule": "flame"},
    "bucketing(2)+median": {"rule": "median", "pre": ["bucketing"], "bucket_size": 2},
    "bucketing(2)+krum": {"rule": "krum", "f": 2, "pre": ["bucketing"], "bucket_size": 2},
    "bucketing(2)+geometric-median": {
        "rule": "geometric-median",
        "pre": ["bucketing"],
        "bucket_size": 2,
    },
    "nnm+median": {"rule": "median", "f": 2, "pre": ["nnm"]},
    "nnm+krum": {"rule": "krum", "f": 2, "pre": ["nnm"]},
    "nnm+trimmed-mean": {"rule": "trimmed-mean", "f": 2, "pre": ["nnm"], "params": {"beta": 0.1}},
}


def run_variant(
    label: str, aggregation: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    cfg = parse_config(
        {
            "experiment": {"name": "clean", "rounds": args.rounds, "seed": args.seed},
            "data": {
                "dataset": "digits",
                "partition": "dirichlet",
                "alpha": args.alpha,
                "num_clients": args.clients,
            },
            "model": {"name": args.model},
            "aggregation": aggregation,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDirectory.create(cfg, tmp)
        start = time.perf_counter()
        rounds = run_experiment(InProcessGrid(client_app, args.clients).as_grid(), cfg, run)
        seconds = time.perf_counter() - start
    last = rounds[-5:]
    return {
        "variant": label,
        "final_accuracy": rounds[-1]["test_accuracy"],
        "last5_accuracy": sum(r["test_accuracy"] for r in last) / len(last),
        "failed_rounds": sum(1 for r in rounds if r["status"] == "failed"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    labels = args.rules if "mean" in args.rules else ["mean", *args.rules]

    print(
        f"digits, {args.clients} clients, Dirichlet alpha={args.alpha}, {args.rounds} rounds, "
        f"model {args.model}, seed {args.seed}, no attacker"
    )
    print(f"{'rule':<32}{'final acc':>10}{'last-5 acc':>12}{'vs mean':>9}{'time':>8}")
    rows = []
    baseline = None
    for label in labels:
        row = run_variant(label, VARIANTS[label], args)
        rows.append(row)
        if label == "mean":
            baseline = row["final_accuracy"]
        assert baseline is not None
        drop = 100 * (baseline - row["final_accuracy"])
        flag = "  <- loses > 5 points" if drop > 5 else ""
        failed = f"  ({row['failed_rounds']} failed rounds)" if row["failed_rounds"] else ""
        print(
            f"{label:<32}{100 * row['final_accuracy']:>9.2f}%{100 * row['last5_accuracy']:>11.2f}%"
            f"{-drop:>+8.1f}{row['seconds']:>7.0f}s{flag}{failed}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
