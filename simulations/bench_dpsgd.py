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

    python simulations/bench_dpsgd.py
    python simulations/bench_dpsgd.py --repeats 3 --opacus-modes hooks ew ghost
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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


if __name__ == "__main__":
    main()
