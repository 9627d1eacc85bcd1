"""Edge GPU clients: mixed precision, the memory-aware batch cap, node-config overrides.

The chunked (gradient-accumulation) paths must take the same step as the
whole batch, and bf16 must stay close to fp32, on CPU here. The tests marked
``cuda`` run only where a GPU is present (the device check in
``simulations/bench_edge_client.py`` runs them on one).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from fedsec.client.app import Hardware, batch_cap, node_hardware
from fedsec.client.app import app as client_app
from fedsec.config import ConfigError, ExperimentConfig, parse_config
from fedsec.models import make_model
from fedsec.privacy.dpsgd import dp_step_probe, dp_train
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment
from fedsec.training import (
    autocast_dtype,
    batch_cap_from_probes,
    evaluate,
    measure_batch_cap,
    train,
    train_step_probe,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _data(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


# ---- chunks: the same step with less memory ---------------------------------------


@pytest.mark.parametrize("max_batch", [1, 7, 32])
def test_chunked_training_takes_the_same_steps(max_batch: int) -> None:
    x, y = _data()
    whole, chunked = _cnn(), _cnn()
    kw = {"epochs": 2, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "seed": 4}
    a = train(whole, x, y, **kw)  # type: ignore[arg-type]
    b = train(chunked, x, y, max_batch=max_batch, **kw)  # type: ignore[arg-type]
    # Float summation order differs; 1e-5 is far below one SGD step (~1e-2).
    assert _max_diff(whole, chunked) < 1e-5
    assert a.steps == b.steps and a.accuracy == b.accuracy
    assert a.loss == pytest.approx(b.loss, rel=1e-5)


@pytest.mark.parametrize("max_batch", [1, 5])
def test_chunked_dp_sgd_is_the_same_logical_batch(max_batch: int) -> None:
    x, y = _data(200)
    whole, chunked = _cnn(), _cnn()
    kw = {
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.1,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "seed": 3,
    }
    a = dp_train(whole, x, y, **kw)  # type: ignore[arg-type]
    b = dp_train(chunked, x, y, max_batch=max_batch, **kw)  # type: ignore[arg-type]
    # Same Poisson batches and one noise draw per step: only rounding differs.
    assert _max_diff(whole, chunked) < 1e-5
    assert (a.steps, a.sample_rate) == (b.steps, b.sample_rate)


def test_bad_max_batch_is_refused() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        train(_cnn(), x, y, epochs=1, batch_size=8, max_batch=0)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        dp_train(
            _cnn(), x, y, epochs=1, batch_size=8, lr=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, max_batch=0,
        )  # fmt: skip


# ---- mixed precision ---------------------------------------------------------------


def test_bf16_training_stays_close_to_fp32_and_keeps_fp32_weights() -> None:
    x, y = _data()
    full, half = _cnn(), _cnn()
    kw = {"epochs": 2, "batch_size": 16, "lr": 0.1, "seed": 2}
    a = train(full, x, y, **kw)  # type: ignore[arg-type]
    b = train(half, x, y, precision="bf16", **kw)  # type: ignore[arg-type]
    assert all(p.dtype == torch.float32 for p in half.parameters())
    # bf16 keeps 8 significant bits: relative error ~4e-3 per product.
    assert b.loss == pytest.approx(a.loss, rel=0.02)
    assert _max_diff(full, half) < 0.02
    ev = evaluate(half, x, y, precision="bf16")
    assert ev.loss == pytest.approx(evaluate(half, x, y).loss, rel=0.02)


def test_bf16_dp_sgd_clips_in_fp32() -> None:
    x, y = _data(200)
    full, half = _cnn(), _cnn()
    kw = {
        "epochs": 1,
        "batch_size": 40,
        "lr": 0.5,
        "noise_multiplier": 0.0,
        "max_grad_norm": 0.1,
        "seed": 5,
    }
    dp_train(full, x, y, **kw)  # type: ignore[arg-type]
    dp_train(half, x, y, precision="bf16", **kw)  # type: ignore[arg-type]
    # Each step moves at most lr * C = 0.05 per parameter vector; the bf16 run
    # must track the fp32 one to a small fraction of that.
    assert _max_diff(full, half) < 5e-3
    assert all(p.dtype == torch.float32 for p in half.parameters())


def test_fp16_needs_cuda_and_is_refused_with_dp_sgd() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        train(_cnn(), x, y, epochs=1, batch_size=8, precision="fp16")
    with pytest.raises(ValueError, match="fp16' cannot be used with DP-SGD"):
        dp_train(
            _cnn(), x, y, epochs=1, batch_size=8, lr=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, precision="fp16",
        )  # fmt: skip
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid choices: fp32, bf16"):
        autocast_dtype("fp8", torch.device("cpu"))


def test_config_validates_precision_and_max_batch() -> None:
    with pytest.raises(ConfigError, match=r"client.precision.*valid.*fp32, bf16, fp16"):
        parse_config({"client": {"precision": "half"}})
    with pytest.raises(ConfigError, match=r"client\.max_batch"):
        parse_config({"client": {"max_batch": -1}})
    with pytest.raises(ConfigError, match="fp16 cannot be used with DP-SGD"):
        parse_config({"client": {"precision": "fp16"}, "privacy": {"mode": "dp-sgd"}})


# ---- the memory-aware cap --------------------------------------------------------


def test_cap_from_probes_fits_a_linear_memory_model() -> None:
    # fixed 1000 B + 100 B per example; 80% of 10_000 B leaves room for 70.
    probes = [(4, 1400), (16, 2600)]
    assert batch_cap_from_probes(probes, 10_000, fraction=0.8) == 70
    assert batch_cap_from_probes(probes, 10_000, fraction=1.0) == 90


def test_cap_from_probes_refuses_what_cannot_fit() -> None:
    with pytest.raises(ValueError, match="two batch sizes"):
        batch_cap_from_probes([(4, 1400), (4, 1500)], 10_000)
    with pytest.raises(ValueError, match="not enough device memory for one example"):
        batch_cap_from_probes([(4, 1400), (16, 2600)], 1_100)


def test_no_cap_is_measured_off_cuda() -> None:
    x, y = _data(16)
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    assert measure_batch_cap(train_step_probe(model, x, y), torch.device("cpu")) is None
    # The probes themselves must leave the model as it was.
    train_step_probe(model, x, y)(8)
    dp_step_probe(model, x, y)(8)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())


# ---- node config overrides ---------------------------------------------------------


def _context(**node: object) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, **node},  # type: ignore[dict-item]
        state=RecordDict(),
        run_config={},
    )


def test_node_config_overrides_the_experiment_settings() -> None:
    cfg = parse_config(
        {"experiment": {"device": "cpu"}, "client": {"precision": "fp32", "max_batch": 0}}
    )
    hw = node_hardware(cfg, _context(precision="bf16", **{"max-batch": 8}))
    assert hw == Hardware(device=torch.device("cpu"), precision="bf16", max_batch=8)
    assert node_hardware(cfg, _context()) == Hardware(torch.device("cpu"), "fp32", 0)
    x, y = _data(16)
    assert batch_cap(cfg, hw, _cnn(), x, y) == 8
    assert batch_cap(cfg, node_hardware(cfg, _context()), _cnn(), x, y) is None


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"precision": "fp8"}, "node config precision 'fp8' is unknown"),
        ({"max-batch": -2}, "max-batch must be an integer >= 0"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"precision": "fp16", "device": "cpu"}, "'fp16' needs a CUDA device"),
    ],
)
def test_bad_node_hardware_is_a_one_line_error(node: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        node_hardware(parse_config({}), _context(**node))


@cuda
def test_node_config_can_move_a_gpu_node_to_the_cpu() -> None:
    cfg = parse_config({"experiment": {"device": "auto"}})
    assert node_hardware(cfg, _context()).device.type == "cuda"
    assert node_hardware(cfg, _context(device="cpu")).device.type == "cpu"


def test_a_round_runs_with_bf16_and_a_batch_cap(tmp_path: Path) -> None:
    cfg: ExperimentConfig = parse_config(
        {
            "experiment": {"name": "edge", "rounds": 2, "seed": 1, "device": "cpu"},
            "data": {"num_clients": 2},
            "client": {"local_epochs": 1, "precision": "bf16", "max_batch": 8},
        }
    )
    run = RunDirectory.create(cfg, tmp_path)
    run_experiment(InProcessGrid(client_app, 2), cfg, run)  # type: ignore[arg-type]
    assert [r["status"] for r in run.rounds] == ["initial", "ok", "ok"]
    assert run.rounds[-1]["num-accepted"] == 2
    assert run.rounds[-1]["test_accuracy"] > run.rounds[0]["test_accuracy"] + 0.3


# ---- on a GPU -------------------------------------------------------------------


@cuda
def test_cuda_cap_is_measured_and_respected() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    x, y = _data(64)
    model = _cnn().to(dev)
    xs, ys = x.to(dev), y.to(dev)
    for probe in (train_step_probe, dp_step_probe):
        cap = measure_batch_cap(probe(model, xs[:64], ys[:64]), dev, probe_sizes=(32, 64))
        assert cap is not None and cap > 1_000  # a tiny CNN on a GPU: thousands at least
    # An edge-sized budget: 512 MiB more than the process holds now. The ResNet's
    # DP-SGD step needs ~2.5 MB per example, so a 1024 batch does not fit whole;
    # the cap must split it into chunks that do.
    resnet = make_model("resnet", (3, 32, 32), 10, seed=0).to(dev)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(2048, 3, 32, 32, generator=gen).to(dev)
    ys = torch.randint(0, 10, (2048,), generator=gen).to(dev)
    torch.cuda.empty_cache()
    limit = torch.cuda.memory_reserved(dev) + 512 * 2**20
    torch.cuda.set_per_process_memory_fraction(
        limit / torch.cuda.get_device_properties(dev).total_memory, dev
    )
    try:
        probe = dp_step_probe(resnet, xs[:64], ys[:64])
        cap = measure_batch_cap(probe, dev, probe_sizes=(32, 64))
        assert cap is not None and 32 < cap < 1024
        torch.cuda.reset_peak_memory_stats(dev)
        dp_train(
            resnet, xs, ys, epochs=1, batch_size=1024, lr=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, device=dev, max_batch=cap, max_steps=2,
        )  # fmt: skip
        assert torch.cuda.max_memory_reserved(dev) <= limit
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_in_each_precision(precision: str) -> None:
    x, y = _data()
    model = _cnn()
    result = train(model, x, y, epochs=3, batch_size=16, lr=0.1, device="cuda", precision=precision)
    assert result.loss == result.loss  # not NaN
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())


@cuda
@pytest.mark.parametrize("secure", [False, True])
def test_cuda_dp_sgd_bf16_chunked(secure: bool) -> None:
    x, y = _data(200)
    model = _cnn()
    result = dp_train(
        model, x, y, epochs=1, batch_size=32, lr=0.1, noise_multiplier=1.0,
        max_grad_norm=1.0, device="cuda", precision="bf16", max_batch=8, secure_mode=secure,
    )  # fmt: skip
    assert result.steps == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
