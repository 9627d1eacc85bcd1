"""Differential privacy in the round loop (in-process grid, real apps and strategy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedsec.client.app import app as client_app
from fedsec.config import ConfigError, parse_config
from fedsec.runs import RoundMetrics, RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

#: Record-level DP-SGD on 2 IID clients (about 720 digits each), 5 rounds of 2
#: local epochs with Poisson batches of 64 (q ~ 0.09), lr 0.5, clip 1.0.
DP_SGD: dict[str, dict[str, Any]] = {
    "experiment": {"name": "dp", "rounds": 5, "seed": 0},
    "data": {"partition": "iid", "num_clients": 2},
    "client": {"local_epochs": 2, "lr": 0.5, "momentum": 0.0, "batch_size": 64},
    "privacy": {"mode": "dp-sgd", "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
}


def _run(tmp_path: Path, raw: dict[str, dict[str, Any]]) -> tuple[RunDirectory, list[RoundMetrics]]:
    cfg = parse_config(raw)
    run = RunDirectory.create(cfg, tmp_path)
    grid = InProcessGrid(client_app, cfg.data.num_clients)
    return run, run_experiment(grid.as_grid(), cfg, run)


def _with(**changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw = {k: dict(v) for k, v in DP_SGD.items()}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_dp_sgd_at_epsilon_3_reaches_80_percent(tmp_path: Path) -> None:
    _, rounds = _run(tmp_path, DP_SGD)
    assert rounds[-1]["test_accuracy"] >= 0.80  # measured: 0.908
    spent = [r["dp_epsilon_max"] for r in rounds[1:]]
    assert spent == sorted(spent)  # the ledger only grows
    assert 2.5 <= spent[-1] <= 3.0  # "about 3", never above the target
    assert rounds[-1]["dp_delta"] == 1e-5 and rounds[-1]["dp_accountant"] == "rdp"


def test_budget_exhaustion_refuses_and_the_server_continues(tmp_path: Path) -> None:
    # Noise solved for epsilon 3 over 5 rounds, but a budget of 1.5: clients refuse
    # once the next round would exceed it; the rounds go on without them.
    # server.max_failed_rounds above the rounds: refused rounds must not stop the run.
    raw = _with(privacy={"epsilon_budget": 1.5}, server={"max_failed_rounds": 10})
    run, rounds = _run(tmp_path, raw)
    statuses = [r["status"] for r in rounds[1:]]
    assert "ok" in statuses and statuses[-1] == "failed"
    assert len(rounds) == 6  # every round ran
    decisions = [json.loads(x) for x in (run.path / "decisions.jsonl").read_text().splitlines()]
    reasons = [reason for d in decisions for reason in d["excluded"].values()]
    assert reasons and all(
        r.startswith("client error: 'privacy budget exhausted: next round would spend epsilon ")
        and "> budget 1.50 (delta 1e-05, rdp)" in r
        for r in reasons
    )
    # The model is left as it was when every client refuses.
    last_ok = max(i for i, r in enumerate(rounds) if r["status"] == "ok")
    assert rounds[-1]["test_accuracy"] == rounds[last_ok]["test_accuracy"]


@pytest.mark.parametrize(
    ("privacy", "extra", "message"),
    [
        ({"mode": "local", "noise_multiplier": 0.5}, {}, None),
        ({"mode": "central", "noise_multiplier": 0.5}, {}, None),
        (
            {"mode": "central", "noise_multiplier": 0.5},
            {"aggregation": {"rule": "median"}},
            "privacy.mode: central DP-FedAvg bounds the sensitivity of the mean only",
        ),
        (
            {"mode": "dp-sgd"},
            {},
            "privacy.noise_multiplier: privacy mode 'dp-sgd' needs exactly one",
        ),
        (
            {"mode": "local", "target_epsilon": 1e-4},
            {},
            "privacy.target_epsilon: ",
        ),
    ],
)
def test_privacy_config(
    privacy: dict[str, Any], extra: dict[str, Any], message: str | None
) -> None:
    raw: dict[str, Any] = {"privacy": privacy, **extra}
    if message is None:
        parse_config(raw)
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(raw)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_local_and_central_dp_run_and_report(tmp_path: Path) -> None:
    base = {
        "experiment": {"name": "dp", "rounds": 2, "seed": 0},
        "data": {"num_clients": 4},
        "client": {"local_epochs": 1},
    }
    _, local = _run(
        tmp_path / "local",
        base | {"privacy": {"mode": "local", "noise_multiplier": 0.01, "update_clip": 10.0}},
    )
    assert all(r["status"] == "ok" for r in local[1:])
    assert local[-1]["dp_epsilon_max"] > 0
    _, central = _run(
        tmp_path / "central",
        base | {"privacy": {"mode": "central", "noise_multiplier": 0.01, "update_clip": 10.0}},
    )
    assert all(r["status"] == "ok" for r in central[1:])
    assert 0 < central[1]["dp_epsilon"] < central[2]["dp_epsilon"]
    # Tiny noise, loose clip: both still learn.
    assert local[-1]["test_accuracy"] > local[0]["test_accuracy"] + 0.2
    assert central[-1]["test_accuracy"] > central[0]["test_accuracy"] + 0.2
