"""Benchmark: an edge GPU client's local round, per precision, with and without DP-SGD.

What a SuperNode on a GPU does each round, measured on whatever device this
runs on (``--device auto``: CUDA if present):

1. **Local training.** One local round (``--epochs`` over ``--examples``
   CIFAR-10-shaped examples, batch ``--batch``) of the ``--model`` ResNet, in
   fp32, bf16 and fp16 autocast (fp16 on CUDA only), plain and with DP-SGD
   (noise multiplier 1, C = 1; fp16 is refused with DP-SGD). Reported: wall
   time of the round after a warm-up, examples per second, peak GPU memory.
2. **Memory-aware cap.** DP-SGD with a large logical batch (``--dp-batch``)
   inside an emulated edge-GPU memory budget (``--budget-gib``, enforced with
   ``torch.cuda.set_per_process_memory_fraction``): the cap measured by
   :func:`fedsec.training.measure_batch_cap`, the peak memory of a step with
   it, and whether the same step without a cap fits.
3. **The real ClientApp.** ``--rounds`` rounds of a 2-client in-process
   experiment (digits, ``cnn-digits``, DP-SGD, bf16 on CUDA), through the
   ServerApp's round loop and the ClientApp's train handler, as a SuperNode
   runs them; final accuracy and round time.

Data is synthetic (random images, random labels) for parts 1 and 2: the
timing does not depend on the pixel values, and nothing downloads.

    python simulations/bench_edge_client.py                  # CPU here: fp32 and bf16
    python simulations/bench_edge_client.py --json out.json  # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsec.models import make_model
from fedsec.privacy.dpsgd import dp_step_probe, dp_train
from fedsec.training import PRECISIONS, measure_batch_cap, resolve_device, train

SHAPE = (3, 32, 32)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    """Peak memory reserved from the device (what a memory budget limits), GiB."""
    return torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else None


def _timed(dev: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    _peak_reset(dev)
    _sync(dev)
    start = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - start, out


def local_rounds(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    """Part 1: one local round per (precision, DP) on synthetic data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, *SHAPE, generator=gen)
    y = torch.randint(0, 10, (args.examples,), generator=gen)
    rows = []
    for precision in PRECISIONS:
        if precision == "fp16" and dev.type != "cuda":
            continue
        for dp in (False, True):
            if dp and precision == "fp16":
                continue
            model = make_model(args.model, SHAPE, 10, seed=0)

            def run(
                xs: torch.Tensor,
                ys: torch.Tensor,
                m: Any = model,
                dp: bool = dp,
                precision: str = precision,
            ) -> Any:
                if dp:
                    return dp_train(
                        m, xs, ys, epochs=args.epochs, batch_size=args.batch, lr=0.05,
                        noise_multiplier=1.0, max_grad_norm=1.0, device=dev,
                        precision=precision,
                    ).train  # fmt: skip
                return train(
                    m, xs, ys, epochs=args.epochs, batch_size=args.batch, lr=0.05,
                    device=dev, precision=precision,
                )  # fmt: skip

            run(x[: 4 * args.batch], y[: 4 * args.batch])  # warm-up: kernels, autotuning
            seconds, result = _timed(dev, lambda: run(x, y))
            rows.append(
                {
                    "part": "local-round",
                    "model": args.model,
                    "precision": precision,
                    "dp": dp,
                    "examples": args.examples * args.epochs,
                    "seconds": round(seconds, 3),
                    "examples_per_s": round(args.examples * args.epochs / seconds),
                    "peak_gib": _peak_gib(dev),
                    "loss": round(result.loss, 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_cap(args: argparse.Namespace, dev: torch.device) -> dict[str, Any] | None:
    """Part 2: DP-SGD's logical batch inside an emulated edge-GPU memory budget."""
    if dev.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(dev).total_memory
    share = min(1.0, args.budget_gib * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(share, dev)
    gen = torch.Generator().manual_seed(1)
    n = 2 * args.dp_batch
    x = torch.randn(n, *SHAPE, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    out: dict[str, Any] = {"part": "memory-cap", "budget_gib": args.budget_gib}
    try:
        model = make_model(args.model, SHAPE, 10, seed=0).to(dev)
        probe = dp_step_probe(model, x[:128].to(dev), y[:128].to(dev), precision="bf16")
        cap = measure_batch_cap(
            probe, dev, probe_sizes=(64, 128), reserve=x.nelement() * 4 + y.nelement() * 8
        )
        out["cap"] = cap
        print(f"measured cap: {cap} examples per pass", flush=True)

        def step(max_batch: int | None) -> None:
            dp_train(
                model, x, y, epochs=1, batch_size=args.dp_batch, lr=0.05, noise_multiplier=1.0,
                max_grad_norm=1.0, device=dev, precision="bf16", max_batch=max_batch, max_steps=2,
            )  # fmt: skip

        try:
            seconds, _ = _timed(dev, lambda: step(cap))
            out["capped"] = f"fit: {_peak_gib(dev):.2f} GiB peak, {seconds:.3f} s"
        except torch.OutOfMemoryError as err:
            out["capped"] = "out of memory: " + str(err).split(". See")[0][-300:]
        try:
            seconds, _ = _timed(dev, lambda: step(None))
            out["uncapped"] = f"fit: {_peak_gib(dev):.2f} GiB peak, {seconds:.3f} s"
        except torch.OutOfMemoryError:
            out["uncapped"] = "out of memory"
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    print(json.dumps(out), flush=True)
    return out


def client_app_run(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """Part 3: the real ServerApp loop and ClientApp on this device."""
    from fedsec.client.app import app as client_app
    from fedsec.config import parse_config
    from fedsec.runs import RunDirectory
    from fedsec.strategies.inprocess import InProcessGrid
    from fedsec.strategies.server_app import run_experiment

    precision = "bf16" if dev.type == "cuda" else "fp32"
    cfg = parse_config(
        {
            "experiment": {"name": "edge", "rounds": args.rounds, "device": str(dev)},
            "data": {"num_clients": 2},
            "model": {"name": "cnn-digits"},
            "client": {"local_epochs": 2, "batch_size": 64, "lr": 0.5, "precision": precision},
            "privacy": {"mode": "dp-sgd", "noise_multiplier": 0.5, "max_grad_norm": 1.0},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDirectory.create(cfg, Path(tmp))
        seconds, _ = _timed(dev, lambda: run_experiment(InProcessGrid(client_app, 2), cfg, run))  # type: ignore[arg-type]
        rounds = run.rounds
    out = {
        "part": "client-app",
        "device": str(dev),
        "precision": precision,
        "rounds": args.rounds,
        "status": [r["status"] for r in rounds[1:]],
        "test_accuracy": [round(float(r["test_accuracy"]), 4) for r in rounds],
        "dp_epsilon_max": rounds[-1].get("dp_epsilon_max"),
        "mean_round_s": round(sum(float(r["round_time_s"]) for r in rounds[1:]) / args.rounds, 3),
        "total_s": round(seconds, 2),
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dp-batch", type=int, default=4096)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["local", "cap", "app"])
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()
    dev = resolve_device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {dev} ({name}), torch {torch.__version__}", flush=True)
    results: dict[str, Any] = {"device": name, "torch": torch.__version__}
    if "local" not in args.skip:
        results["local_rounds"] = local_rounds(args, dev)
    if "cap" not in args.skip:
        results["memory_cap"] = memory_cap(args, dev)
    if "app" not in args.skip:
        results["client_app"] = client_app_run(args, dev)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
