"""Benchmark: fedsec's aggregation rules against Flower's built-in functions.

For each scenario (n clients x d parameters, float32, CPU) and each rule, a
fresh subprocess builds the same random update matrix, times the rule (median
of ``--repeats`` runs) and reports its peak memory over the stacked updates;
where Flower has the same rule (mean, median, trimmed mean, Krum, Multi-Krum,
Bulyan), Flower's function is timed on the same input and the ratio printed.

    python simulations/bench_aggregation.py                 # n=50,d=1M and n=100,d=10M
    python simulations/bench_aggregation.py --scenario 50x1000000 --rules median krum

Flower's Bulyan at n=100, d=10M recomputes all pairwise distances in Python
loops theta = n - 2f times; it is estimated from one Krum call instead of run
(use --flower-bulyan-large to run it anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

#: name -> (rule, rule params, pre-aggregation, Flower function or None)
CASES: dict[str, tuple[str, dict[str, Any], list[str], str | None]] = {
    "mean": ("mean", {}, [], "aggregate"),
    "median": ("median", {}, [], "median"),
    "trimmed-mean": ("trimmed-mean", {"beta": 0.2}, [], "trimmed"),
    "krum": ("krum", {"f": 10}, [], "krum"),
    "multi-krum": ("multi-krum", {"f": 10}, [], "multikrum"),
    "bulyan": ("bulyan", {"f": 10}, [], "bulyan"),
    "geometric-median": ("geometric-median", {}, [], None),
    "centered-clipping": ("centered-clipping", {}, [], None),
    "norm-bounding": ("norm-bounding", {}, [], None),
    "fltrust": ("fltrust", {}, [], None),
    "foolsgold": ("foolsgold", {}, [], None),
    "dnc": ("dnc", {"f": 10}, [], None),
    "flame": ("flame", {}, [], None),
    "bucketing+median": ("median", {}, ["bucketing"], None),
    "nnm+median": ("median", {}, ["nnm"], None),
}

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from fedsec.aggregation import make_pipeline

spec = json.loads(sys.argv[1])
n, d, repeats = spec["n"], spec["d"], spec["repeats"]
torch.manual_seed(0)
x = torch.randn(n, d)
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pre_params = {"bucketing": {"s": 2}, "nnm": {"f": 10}}
rule = make_pipeline(spec["rule"], spec["params"], spec["pre"], pre_params)
context = {}
if "reference" in rule.requires:
    context["reference"] = torch.randn(d)
if "client_ids" in rule.requires:
    context["client_ids"] = list(range(n))
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    out = rule(x, **context)
    times.append(time.perf_counter() - t0)
    del out
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {"fedsec_s": statistics.median(times), "peak_over_stacked": peak_kb / (n * d * 4 / 1024)}
result["extra_over_stacked"] = (peak_kb - base_kb) / (n * d * 4 / 1024)

flower = spec["flower"]
if flower and spec["run_flower"]:
    import numpy as np
    from flwr.server.strategy import aggregate as fa
    results = [([row.numpy()], 1) for row in x]
    f = spec["params"].get("f", 0)
    calls = {
        "aggregate": lambda: fa.aggregate(results),
        "median": lambda: fa.aggregate_median(results),
        "trimmed": lambda: fa.aggregate_trimmed_avg(results, spec["params"]["beta"]),
        "krum": lambda: fa.aggregate_krum(results, f, 0),
        "multikrum": lambda: fa.aggregate_krum(results, f, n - f),
        "bulyan": lambda: fa.aggregate_bulyan(list(results), f, fa.aggregate_krum, to_keep=0),
    }
    if flower == "bulyan" and spec.get("estimate_bulyan"):
        t0 = time.perf_counter()
        fa.aggregate_krum(results, f, 0)
        result["flower_s"] = (time.perf_counter() - t0) * (n - 2 * f)
        result["flower_estimated"] = True
    else:
        flower_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            calls[flower]()
            flower_times.append(time.perf_counter() - t0)
        result["flower_s"] = statistics.median(flower_times)
print(json.dumps(result))
"""


def run_case(name: str, n: int, d: int, repeats: int, args: argparse.Namespace) -> dict[str, Any]:
    rule, params, pre, flower = CASES[name]
    large = n * d >= 500_000_000
    spec = {
        "n": n,
        "d": d,
        "repeats": repeats,
        "rule": rule,
        "params": params,
        "pre": pre,
        "flower": flower,
        "run_flower": not args.no_flower,
        "estimate_bulyan": large and not args.flower_bulyan_large,
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last}
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", nargs="*", default=["50x1000000", "100x10000000"], help="NxD, e.g. 50x1000000"
    )
    parser.add_argument("--rules", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-flower", action="store_true", help="time fedsec's rules only")
    parser.add_argument("--flower-bulyan-large", action="store_true")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    for scenario in args.scenario:
        n, d = (int(v) for v in scenario.lower().split("x"))
        repeats = 3 if n * d <= 100_000_000 else 1
        print(
            f"\nn={n}, d={d:,} float32 ({n * d * 4 / 2**30:.2f} GiB stacked), median of {repeats}"
        )
        print(
            f"{'rule':<20}{'fedsec s':>10}{'Flower s':>11}{'speed-up':>10}"
            f"{'peak/stacked':>14}{'rule extra':>12}"
        )
        for name in args.rules:
            t0 = time.perf_counter()
            row = run_case(name, n, d, repeats, args)
            row.update({"rule": name, "n": n, "d": d})
            rows.append(row)
            if "error" in row:
                print(f"{name:<20}  error: {row['error']}")
                continue
            flower = row.get("flower_s")
            flower_txt = (
                "-"
                if flower is None
                else f"{flower:.3f}" + ("*" if row.get("flower_estimated") else "")
            )
            ratio = "-" if flower is None else f"{flower / row['fedsec_s']:.1f}x"
            print(
                f"{name:<20}{row['fedsec_s']:>10.3f}{flower_txt:>11}{ratio:>10}"
                f"{row['peak_over_stacked']:>13.2f}x{row['extra_over_stacked']:>11.2f}x"
                f"   ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    print("\n* estimated: one Flower Krum call x theta (Flower's Bulyan repeats Krum theta times)")
    print("peak/stacked: the process's peak RSS (interpreter, torch, input and rule) over the")
    print("size of the stacked updates; rule extra: what the rule added on top of its input.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
