"""Benchmark: secure (SecAgg+) against plain training rounds in one Flower simulation.

One Flower simulation (Ray backend, ``flwr.simulation.run_simulation``) with
``--clients`` SuperNodes runs the real fedsec ClientApp (with its secagg mod)
and a ServerApp that alternates plain and secure training rounds on the same
strategy, model and grid, so that Ray's start-up and the machine's load fall
on both alike. The model is ``mlp-wide`` (1,060,170 parameters, d ~ 1M) on
digits; every client trains one local step (batch 32), so round time is
dominated by what the protocol adds: moving the 4 MB model and update,
the extra stages, key agreement, encoding and masks, unmasking.

Schedule: one warm-up round of each kind (first calls in fresh Ray workers:
imports, data loading; reported but excluded), then ``--rounds`` measured
rounds of each kind, interleaved plain, secure, plain, secure, ... Every
secure round also sets up the next secure round's keys (pipelining, see
:mod:`fedsec.strategies.secagg`), as it would in a run of secure rounds, so
a measured secure round is the steady-state cost. The figure is mean secure
round time / mean plain round time. Per-stage times of the secure rounds
(server wall clock per exchange) are printed too.

    python simulations/bench_secagg_e2e.py                 # n=50, 2 + 2 rounds
    python simulations/bench_secagg_e2e.py --clients 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedsec.client.app import app as client_app
from fedsec.config import ExperimentConfig, parse_config
from fedsec.data import load_dataset
from fedsec.models import make_model
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.server_app import build_strategy, make_secagg_workflow
from fedsec.strategies.transport import send_and_receive
from fedsec.wire import WIRE_CONFIG_KEY


def bench_config(clients: int, seed: int, degree: int = 0, threshold: int = 0) -> ExperimentConfig:
    """The benchmark's experiment: digits, IID, mlp-wide, one local step, SecAgg+ on."""
    return parse_config(
        {
            "experiment": {"name": "bench-secagg-e2e", "rounds": 1, "seed": seed},
            "data": {"partition": "iid", "num_clients": clients},
            "client": {"local_steps": 1, "batch_size": 32},
            "model": {"name": "mlp-wide"},
            "server": {"round_timeout": 600.0},
            "secagg": {"enabled": True, "degree": degree, "threshold": threshold},
        }
    )


def make_bench_app(cfg: ExperimentConfig, rounds: int, results: list[dict[str, Any]]) -> ServerApp:
    """A ServerApp that alternates plain and secure rounds and records their times."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)
        model = make_model(
            cfg.model.name, data.info.input_shape, data.info.num_classes, seed=cfg.experiment.seed
        )
        arrays = ArrayRecord(model.state_dict())
        strategy = build_strategy(cfg)
        workflow = make_secagg_workflow(cfg)
        exchange = pipeline(grid)
        wire = json.dumps(cfg.to_dict())
        schedule = ["plain", "secure"] + ["plain", "secure"] * rounds
        for server_round, kind in enumerate(schedule, start=1):
            config = ConfigRecord({WIRE_CONFIG_KEY: wire})
            started = time.perf_counter()
            if kind == "plain":
                replies = send_and_receive(
                    grid,
                    strategy.configure_train(server_round, arrays, config, grid),
                    timeout=cfg.server.round_timeout,
                )
                new_arrays, metrics = strategy.aggregate_train(server_round, replies)
            else:
                # Steady state: every secure round also sets up the next one (the
                # last one's is never used, but its cost is part of a round).
                ahead = server_round + 2
                new_arrays, metrics = workflow.run_round(
                    exchange, grid, strategy, server_round, arrays, config, next_round=ahead
                )
            elapsed = time.perf_counter() - started
            if new_arrays is None:
                raise RuntimeError(f"{kind} round {server_round} failed: {workflow.last_error}")
            arrays = new_arrays
            results.append(
                {
                    "round": server_round,
                    "kind": kind,
                    "warmup": server_round <= 2,
                    "seconds": elapsed,
                    "metrics": {k: v for k, v in (metrics or {}).items()},
                }
            )
            print(f"round {server_round} ({kind}): {elapsed:.2f} s", flush=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds of each kind")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--degree", type=int, default=0, help="graph degree k (0 = derived)")
    parser.add_argument("--threshold", type=int, default=0, help="threshold t (0 = derived)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = bench_config(args.clients, args.seed, args.degree, args.threshold)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    run_simulation(
        server_app=make_bench_app(cfg, args.rounds, results),
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    total = time.perf_counter() - started
    measured = [r for r in results if not r["warmup"]]
    if len(measured) != 2 * args.rounds:
        raise SystemExit(f"simulation ended early: {len(results)} rounds recorded")
    plain = [r["seconds"] for r in measured if r["kind"] == "plain"]
    secure = [r["seconds"] for r in measured if r["kind"] == "secure"]
    ratio = statistics.mean(secure) / statistics.mean(plain)
    d = sum(p.numel() for p in make_model("mlp-wide", (1, 8, 8), 10).parameters())

    k = next((r["metrics"].get("secagg_degree") for r in measured if r["kind"] == "secure"), "?")
    t = next((r["metrics"].get("secagg_threshold") for r in measured if r["kind"] == "secure"), "?")
    print(
        f"\nn={args.clients}, d={d:,}, k={k}, t={t}, one local step per client; "
        f"simulation {total:.1f} s"
    )
    print("| round | kind | seconds |")
    print("| --- | --- | --- |")
    for r in results:
        tag = " (warm-up)" if r["warmup"] else ""
        print(f"| {r['round']} | {r['kind']}{tag} | {r['seconds']:.2f} |")
    print(
        f"\nplain rounds {statistics.mean(plain):.2f} s, secure rounds "
        f"{statistics.mean(secure):.2f} s (mean of {args.rounds}): ratio {ratio:.2f}x"
    )
    stages: dict[str, list[float]] = {}
    for r in measured:
        for key, value in r["metrics"].items():
            if key.startswith("secagg_") and key.endswith("_s"):
                stages.setdefault(key[len("secagg_") : -2], []).append(float(value))
    if stages:
        print(
            "secure round stages (mean s): "
            + ", ".join(f"{name} {statistics.mean(values):.2f}" for name, values in stages.items())
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "clients": args.clients,
                    "dim": d,
                    "ratio": ratio,
                    "plain_s": plain,
                    "secure_s": secure,
                    "rounds": results,
                },
                indent=2,
                default=float,
            )
        )


if __name__ == "__main__":
    main()
