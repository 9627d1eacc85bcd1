"""Benchmark: DP-SGD local training time against non-private training, on CPU.

For each model (digits MLP and CNN) and local data set size (a client-sized
150 examples and the full 1437-example digits training set), with batch size
32 and 3 epochs, three local training runs are timed from a freshly built
model, median of ``--repeats`` runs, interleaved so that load on the machine
hits all of them alike:

* ``plain``: :func:`fedsec.training.train` (non-private);
* ``fedsec``: :func:`fedsec.privacy.dpsgd.dp_train` (noise multiplier 1, C=1);
* ``opacus``: Opacus defaults -- ``PrivacyEngine().make_private`` on a
  ``DataLoader`` with Poisson sampling and ``grad_sample_mode="hooks"``, the
  usual training loop (wrapping included in the time, as each FL round would
  wrap again). ``--opacus-modes hooks functorch ew ghost`` adds columns for
  Opacus's other per-example gradient modes.

With Poisson sampling ``dp_train`` takes ``round(epochs * n / B)`` steps (14
and 135 here) and Opacus ``epochs * len(loader)`` (15 and 135, at rate
``1 / len(loader)``), against ``epochs * ceil(n / B)`` (15 and 135) for plain
training, so the per-step ratio of ``dp_train`` is printed too.

``--breakdown`` adds a second table: one more run of each loop with timers
around its phases (forward, backward, the DP step's per-example terms,
norms and clip factors, clipped sums, noise draw and optimizer step; "rest"
is the loop itself: sampling, indexing, metrics), in microseconds per step,
then for each DP configuration what a 1.3x target allows beyond a plain step,
what DP-SGD adds, and its *noise floor* ``(plain step + noise draw) / plain
step``: the ratio DP-SGD could not go below even if everything else it does
were free. The timers add about a microsecond per phase, so this table
explains the ratio above rather than replacing it.

    python simulations/bench_dpsgd.py
    python simulations/bench_dpsgd.py --repeats 3 --opacus-modes hooks ew ghost
    python simulations/bench_dpsgd.py --breakdown
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedsec.privacy.dp_loop as dp_loop
import fedsec.training as training
from fedsec.data import load_dataset
from fedsec.models import make_model
from fedsec.privacy.dpsgd import dp_train
from fedsec.training import train

LR = 0.05
NOISE = 1.0
CLIP = 1.0


def run_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, bs: int) -> int:
    """Non-private local training; returns the number of steps."""
    return train(model, x, y, epochs=epochs, batch_size=bs, lr=LR, seed=0).steps


def run_fedsec(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, bs: int) -> int:
    """fedsec's DP-SGD; returns the number of steps."""
    res = dp_train(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=bs,
        lr=LR,
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        seed=0,
    )
    return res.steps


def make_opacus_runner(
    mode: str,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], int]:
    """Opacus's ``make_private`` with ``grad_sample_mode=mode``, otherwise defaults."""

    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, bs: int) -> int:
        from opacus import PrivacyEngine

        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(TensorDataset(x, y), batch_size=bs)
        criterion = nn.CrossEntropyLoss()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine()
            out = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=NOISE,
                max_grad_norm=CLIP,
                grad_sample_mode=mode,
            )
        if mode == "ghost":
            module, dp_opt, dp_crit, dp_loader = out
        else:
            module, dp_opt, dp_loader = out
            dp_crit = criterion
        steps = 0
        module.train()
        with warnings.catch_warnings():
            # "Full backward hook is firing when gradients are computed with
            # respect to module outputs since no inputs require gradients"
            warnings.simplefilter("ignore")
            for _ in range(epochs):
                for xb, yb in dp_loader:
                    dp_opt.zero_grad()
                    loss = dp_crit(module(xb), yb)
                    loss.backward()
                    dp_opt.step()
                    steps += 1
        return steps

    return run


#: Phases of the breakdown: (label, owner, attribute) of the function timed.
PHASES: list[tuple[str, Any, str]] = [
    ("backward", torch.autograd, "backward"),  # plain: the backward pass of train()
    ("backward", dp_loop.DPOptimizer, "backward_outputs"),  # DP: to the layer outputs only
    ("per-example terms", dp_loop._LoopRecorder, "take"),
    ("norms + clip", dp_loop, "_clip_factors"),
    ("clipped sums", dp_loop, "_add_clipped_sums"),
    ("noise", dp_loop, "_fill_noise"),
    ("optimizer step", training.ForeachSGD, "step"),
]
BREAKDOWN_COLUMNS = [
    "forward",
    "backward",
    "per-example terms",
    "norms + clip",
    "clipped sums",
    "noise",
    "optimizer step",
    "rest",
]


@contextmanager
def phase_timers(spent: defaultdict[str, float]) -> Iterator[None]:
    """Accumulate the seconds spent in each phase's function into ``spent``."""
    originals = []
    for label, owner, attr in PHASES:
        function = getattr(owner, attr)
        originals.append((owner, attr, function))

        def timed(*args: Any, _f: Any = function, _label: str = label, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - t0

        setattr(owner, attr, timed)
    try:
        yield
    finally:
        for owner, attr, function in originals:
            setattr(owner, attr, function)


def breakdown(
    run: Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], int],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    bs: int,
) -> dict[str, float]:
    """Microseconds per step in each phase of one timed run of ``run``."""
    spent: defaultdict[str, float] = defaultdict(float)
    forward = model.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent["forward"] += time.perf_counter() - t0

    model.forward = timed_forward
    with phase_timers(spent):
        t0 = time.perf_counter()
        steps = run(model, x, y, epochs, bs)
        total = time.perf_counter() - t0
    per_step = {k: 1e6 * v / steps for k, v in spent.items()}
    per_step["rest"] = 1e6 * total / steps - sum(per_step.values())
    per_step["total"] = 1e6 * total / steps
    return per_step


def print_breakdown(rows: list[tuple[str, int, str, dict[str, float]]]) -> None:
    """The breakdown table, then each configuration's noise floor."""
    head = ["model", "n", "loop", *[f"{c} us" for c in BREAKDOWN_COLUMNS], "total us/step"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, n, loop, phases in rows:
        cells = [f"{phases[c]:.0f}" if c in phases else "-" for c in BREAKDOWN_COLUMNS]
        print("| " + " | ".join([name, str(n), loop, *cells, f"{phases['total']:.0f}"]) + " |")
    print()
    plain = {(r[0], r[1]): r[3] for r in rows if r[2] == "plain"}
    for name, n, loop, phases in rows:
        if loop != "fedsec":
            continue
        base = plain[(name, n)]["total"]
        noise = phases.get("noise", 0.0)
        clipping = sum(
            phases.get(c, 0.0) for c in ("per-example terms", "norms + clip", "clipped sums")
        )
        print(
            f"{name} n={n}: a {base:.0f} us plain step; 1.3x allows {0.3 * base:.0f} us more, "
            f"DP-SGD adds {phases['total'] - base:.0f} us: the noise draw alone {noise:.0f} us "
            f"(noise floor {(base + noise) / base:.2f}x), per-example terms, norms and clipped "
            f"sums {clipping:.0f} us"
        )


def main() -> None:
    """Parse arguments, time every configuration, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn-digits"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[150, 1437])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--opacus-modes",
        nargs="+",
        default=["hooks"],
        choices=["hooks", "functorch", "ew", "ghost"],
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the phases of each loop per step"
    )
    args = parser.parse_args()

    data = load_dataset("digits")
    shape = tuple(data.train_x.shape[1:])
    assert len(shape) == 3
    input_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    num_classes = int(data.train_y.max()) + 1
    runners: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], int]] = {
        "plain": run_plain,
        "fedsec": run_fedsec,
    }
    for mode in args.opacus_modes:
        runners[f"opacus-{mode}"] = make_opacus_runner(mode)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.epochs} epochs, median of {args.repeats}"
    )
    head = ["model", "n", "plain ms (steps)", "fedsec DP ms (steps)"]
    head += [f"{k} ms (steps)" for k in runners if k.startswith("opacus")]
    head += ["fedsec/plain", "per step"]
    head += [f"{k}/plain" for k in runners if k.startswith("opacus")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    phase_rows: list[tuple[str, int, str, dict[str, float]]] = []
    for name in args.models:
        for n in args.sizes:
            x, y = data.train_x[:n], data.train_y[:n]
            times: dict[str, list[float]] = {k: [] for k in runners}
            steps: dict[str, int] = {}
            for rep in range(args.repeats + 1):  # the first round warms up
                for key, run in runners.items():
                    model = make_model(name, input_shape, num_classes, seed=0)
                    t0 = time.perf_counter()
                    steps[key] = run(model, x, y, args.epochs, args.batch_size)
                    if rep > 0:
                        times[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = [name, str(n)]
            row += [f"{1e3 * med[k]:.1f} ({steps[k]})" for k in runners]
            ratio = med["fedsec"] / med["plain"]
            per_step = (med["fedsec"] / steps["fedsec"]) / (med["plain"] / steps["plain"])
            row += [f"{ratio:.2f}x", f"{per_step:.2f}x"]
            row += [f"{med[k] / med['plain']:.2f}x" for k in runners if k.startswith("opacus")]
            print("| " + " | ".join(row) + " |", flush=True)
            if args.breakdown:
                for key in ("plain", "fedsec"):
                    model = make_model(name, input_shape, num_classes, seed=0)
                    phases = breakdown(runners[key], model, x, y, args.epochs, args.batch_size)
                    phase_rows.append((name, n, key, phases))
    if phase_rows:
        print_breakdown(phase_rows)


if __name__ == "__main__":
    main()
