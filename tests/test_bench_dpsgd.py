"""The DP-SGD benchmark (simulations/bench_dpsgd.py) and its per-phase breakdown, at toy size."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch
from script_loader import load_simulation_script

import fedsec.training as training
from fedsec.privacy import poisson


def _bench() -> ModuleType:
    return load_simulation_script("bench_dpsgd")


def test_phase_timers_see_every_dp_phase_and_restore_the_functions() -> None:
    bench = _bench()
    from fedsec.data import load_dataset
    from fedsec.models import make_model

    data = load_dataset("digits")
    x, y = data.train_x[:64], data.train_y[:64]
    originals = [getattr(owner, attr) for _, owner, attr in bench.PHASES]

    def model() -> torch.nn.Module:
        return make_model("mlp", data.info.input_shape, data.info.num_classes, seed=0)

    private = bench.breakdown(bench.run_fedsec, model(), x, y, 1, 16)
    plain = bench.breakdown(bench.run_plain, model(), x, y, 1, 16)
    # Restored: later runs are not timed, and the library is as it was.
    assert [getattr(owner, attr) for _, owner, attr in bench.PHASES] == originals
    assert training.ForeachSGD.step is originals[6]
    assert sys.modules["fedsec.privacy.dp_loop"]._fill_noise is poisson._fill_noise
    for phase in ("forward", "backward", "per-example terms", "norms + clip", "clipped sums"):
        assert private[phase] > 0.0, phase
    assert private["noise"] > 0.0 and private["optimizer step"] > 0.0
    # The plain loop has no DP phase; its backward is train()'s.
    assert not {"per-example terms", "norms + clip", "clipped sums", "noise"} & plain.keys()
    assert plain["backward"] > 0.0
    for phases in (private, plain):
        parts = sum(v for k, v in phases.items() if k != "total")
        assert parts == pytest.approx(phases["total"])


def test_benchmark_prints_ratios_breakdown_and_noise_floor(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    argv = ["bench", "--models", "mlp", "--sizes", "64", "--epochs", "1", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--batch-size", "16", "--breakdown"])
    bench.main()
    text = capsys.readouterr().out
    assert "| mlp | 64 |" in text and "opacus-hooks/plain" in text
    assert "| mlp | 64 | plain |" in text and "| mlp | 64 | fedsec |" in text
    assert "mlp n=64: a " in text and "noise floor 1." in text
