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

A server shares its cores in practice (a simulation's clients, a second job):
``--load N`` measures every case twice in the same run, once as the machine is
and once while N other processes spin on the CPU, and prints both side by
side. fedsec sizes its threads to the cores left free (``fedsec.cores``);
``FEDSEC_THREADS=2`` in the environment pins a fixed pool of two instead.

    python simulations/bench_aggregation.py --scenario 50x1000000 \
        --rules median trimmed-mean --load 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event
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
try:
    from fedsec.cores import threads
    used = threads(cap=torch.get_num_threads())
except ImportError:  # a fedsec from before issue 20: its pool took torch's thread count
    used = torch.get_num_threads()


def fedsec_once():
    t0 = time.perf_counter()
    out = rule(x, **context)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


times = [fedsec_once()]
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before Flower allocates
result = {"peak_over_stacked": peak_kb / (n * d * 4 / 1024), "threads": used}
result["extra_over_stacked"] = (peak_kb - base_kb) / (n * d * 4 / 1024)

flower, call = spec["flower"], None
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
        call = calls[flower]
# fedsec and Flower take turns, so that a load that comes and goes hits both alike.
flower_times = []
for repeat in range(repeats):
    if repeat > 0:
        times.append(fedsec_once())
    if call is not None:
        t0 = time.perf_counter()
        call()
        flower_times.append(time.perf_counter() - t0)
result["fedsec_s"] = statistics.median(times)
if flower_times:
    result["flower_s"] = statistics.median(flower_times)
    # Each turn's ratio cancels a load that changes between turns; their median is robust.
    result["speedup"] = statistics.median(f / t for f, t in zip(flower_times, times))
print(json.dumps(result))
"""


def _spin(ready: Event) -> None:
    """A competing CPU-bound process: a busy loop until terminated."""
    ready.set()
    while True:
        pass


@contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """Keep ``processes`` busy-looping processes running for the duration of the block."""
    context = multiprocessing.get_context("spawn")
    spinners = []
    try:
        for _ in range(processes):
            ready = context.Event()
            spinner = context.Process(target=_spin, args=(ready,), daemon=True)
            spinner.start()
            spinners.append(spinner)
            ready.wait(30)
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
        for spinner in spinners:
            spinner.join()


def runnable_now() -> str:
    """The machine's runnable tasks and 1-minute load (``/proc/loadavg``), for the record."""
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            fields = handle.read().split()
        return f"runnable now {fields[3].split('/')[0]}, 1-min load {fields[0]}"
    except OSError:
        return f"1-min load {os.getloadavg()[0]:.2f}"


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
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per case, fedsec and Flower taking turns (default 3, 1 from 1e8 values)",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="also measure each case while N busy-looping processes compete for the CPU",
    )
    args = parser.parse_args()
    if args.load < 0:
        parser.error(f"--load must be >= 0, got {args.load}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    scenarios = []
    for scenario in args.scenario:
        try:
            n, d = (int(v) for v in scenario.lower().split("x"))
        except ValueError:
            parser.error(f"--scenario must look like 50x1000000, got {scenario!r}")
        scenarios.append((n, d))

    phases = [("as is", 0)] + ([(f"{args.load} busy process(es)", args.load)] if args.load else [])
    print(
        f"{os.cpu_count()} CPUs; {runnable_now()}; "
        f"FEDSEC_THREADS={os.environ.get('FEDSEC_THREADS', '(unset)')}"
    )
    rows = []
    for n, d in scenarios:
        repeats = args.repeats or (3 if n * d <= 100_000_000 else 1)
        print(
            f"\nn={n}, d={d:,} float32 ({n * d * 4 / 2**30:.2f} GiB stacked), median of {repeats}"
        )
        if args.load:
            print(f"{'':<20}" + "".join(f"{label:^35}" for label, _ in phases))
        header = f"{'rule':<20}"
        header += f"{'fedsec s':>10}{'Flower s':>10}{'speed-up':>10}{'thr':>5}" * len(phases)
        print(header + f"{'peak/stacked':>14}{'rule extra':>12}")
        for name in args.rules:
            t0 = time.perf_counter()
            line = f"{name:<20}"
            measured: list[dict[str, Any]] = []
            for _, load in phases:
                if load:
                    with competing_load(load):
                        row = run_case(name, n, d, repeats, args)
                else:
                    row = run_case(name, n, d, repeats, args)
                row.update({"rule": name, "n": n, "d": d, "load": load})
                rows.append(row)
                if "error" in row:
                    line += f"  error: {row['error']}"
                    break
                measured.append(row)
                flower = row.get("flower_s")
                flower_txt = (
                    "-"
                    if flower is None
                    else f"{flower:.3f}" + ("*" if row.get("flower_estimated") else "")
                )
                speedup = row.get("speedup", None if flower is None else flower / row["fedsec_s"])
                ratio = "-" if speedup is None else f"{speedup:.1f}x"
                line += f"{row['fedsec_s']:>10.3f}{flower_txt:>10}{ratio:>10}{row['threads']:>5}"
            if len(measured) == len(phases):
                first = measured[0]
                line += f"{first['peak_over_stacked']:>13.2f}x{first['extra_over_stacked']:>11.2f}x"
            print(line + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n* estimated: one Flower Krum call x theta (Flower's Bulyan repeats Krum theta times)")
    print("speed-up: the median over the turns of Flower's time over fedsec's (they alternate).")
    print("thr: the threads fedsec sized itself to at the start of the case (fedsec.cores).")
    print("peak/stacked: the process's peak RSS (interpreter, torch, input and rule) over the")
    print("size of the stacked updates; rule extra: what the rule added on top of its input")
    print("(both from the first column's run).")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
