"""The ServerApp's round loop with the real ClientApp over an in-process grid.

Covers checkpoints, resume (bit-identical to an uninterrupted run), refusal of
a tampered checkpoint, a failed round leaving the model unchanged, and
malformed or missing replies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Message

from fedsec.checkpoint import CheckpointError
from fedsec.client.app import app as client_app
from fedsec.config import ExperimentConfig, parse_config
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment


def _config(
    rounds: int, aggregation: dict[str, object] | None = None, **server: float
) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "loop", "rounds": rounds, "seed": 1},
            "data": {"num_clients": 3},
            "client": {"local_epochs": 1},
            "server": {"lr": 1.0, **server},
            "aggregation": aggregation or {},
        }
    )


def _run(cfg: ExperimentConfig, tmp_path: Path, grid: InProcessGrid | None = None) -> RunDirectory:
    run = RunDirectory.create(cfg, tmp_path)
    run_experiment(grid or InProcessGrid(client_app, 3), cfg, run)  # type: ignore[arg-type]
    return run


def _poison(reply: Message) -> Message:
    arrays = reply.content["arrays"]
    name = next(iter(arrays))
    values = arrays[name].numpy().copy()
    values.flat[0] = np.nan
    arrays[name] = Array(values)
    return reply


def test_rounds_are_recorded_and_learn(tmp_path: Path) -> None:
    run = _run(_config(3), tmp_path)
    assert [r["round"] for r in run.rounds] == [0, 1, 2, 3]
    assert all(r["status"] in ("initial", "ok") for r in run.rounds)
    assert run.rounds[-1]["test_accuracy"] > run.rounds[0]["test_accuracy"] + 0.3
    assert run.rounds[1]["num-accepted"] == 3
    for name in (
        "metrics.json",
        "rounds.csv",
        "accuracy.png",
        "manifest.json",
        "config.toml",
    ):
        assert (run.path / name).is_file()
    assert len(list((run.path / "checkpoints").glob("round_*.safetensors"))) == 4
    assert RunDirectory.open(run.path).finished


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    straight = _run(_config(3, momentum=0.5), tmp_path / "a")
    interrupted = _run(_config(2, momentum=0.5), tmp_path / "b")
    resumed = RunDirectory.open(interrupted.path)
    resumed.config = _config(3, momentum=0.5)
    run_experiment(InProcessGrid(client_app, 3), resumed.config, resumed)  # type: ignore[arg-type]
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3]
    _, expected, expected_server = straight.load_last_checkpoint()
    _, actual, actual_server = resumed.load_last_checkpoint()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-6), key
    assert torch.allclose(
        expected_server["momentum_buffer"], actual_server["momentum_buffer"], atol=1e-6
    )


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    run = _run(_config(1), tmp_path)
    last = run.path / run.checkpoints[-1]["file"]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    reopened = RunDirectory.open(run.path)
    reopened.config = _config(2)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        run_experiment(InProcessGrid(client_app, 3), reopened.config, reopened)  # type: ignore[arg-type]


def test_malformed_reply_is_excluded_and_counted(tmp_path: Path) -> None:
    grid = InProcessGrid(client_app, 3, tamper={2: _poison})
    run = _run(_config(2), tmp_path, grid)
    for row in run.rounds[1:]:
        assert row["status"] == "ok"
        assert row["num-excluded"] == 1 and row["num-accepted"] == 2


def test_failed_round_keeps_the_global_model(tmp_path: Path) -> None:
    grid = InProcessGrid(client_app, 3, tamper={n: _poison for n in (1, 2, 3)})
    run = _run(_config(2), tmp_path, grid)
    assert [r["status"] for r in run.rounds] == ["initial", "failed", "failed"]
    first = run.rounds[0]["test_accuracy"]
    assert all(r["test_accuracy"] == first for r in run.rounds)


def test_dropped_client_is_not_an_exclusion(tmp_path: Path) -> None:
    run = _run(_config(1), tmp_path, InProcessGrid(client_app, 3, dead=[3]))
    row = run.rounds[1]
    assert row["num-sampled"] == 3 and row["num-replies"] == 2
    assert row["num-excluded"] == 0 and row["status"] == "ok"


def test_decisions_are_logged_per_round(tmp_path: Path) -> None:
    grid = InProcessGrid(client_app, 3, tamper={2: _poison})
    run = _run(_config(2), tmp_path, grid)
    lines = [json.loads(line) for line in (run.path / "decisions.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["sampled"] == [1, 2, 3]
        assert list(line["excluded"]) == ["2"] and "NaN" in line["excluded"]["2"]
        assert set(line["weights"]) == {"1", "3"}
        assert sum(line["weights"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "aggregation",
    [
        {"rule": "fltrust", "root_size": 50},  # needs the server's reference update
        {"rule": "foolsgold"},  # needs client ids, keeps history
        {"rule": "median", "pre": ["bucketing"], "bucket_size": 1},
    ],
)
def test_rules_needing_context_run_in_the_loop(
    tmp_path: Path, aggregation: dict[str, object]
) -> None:
    run = _run(_config(2, aggregation), tmp_path)
    assert [r["status"] for r in run.rounds] == ["initial", "ok", "ok"]
    assert run.rounds[-1]["test_accuracy"] > run.rounds[0]["test_accuracy"]


def test_resume_restores_stateful_rule(tmp_path: Path) -> None:
    aggregation = {"rule": "centered-clipping", "params": {"tau": 0.5}}
    straight = _run(_config(3, aggregation), tmp_path / "a")
    interrupted = _run(_config(2, aggregation), tmp_path / "b")
    assert "rule.center" in interrupted.load_last_checkpoint()[2]
    resumed = RunDirectory.open(interrupted.path)
    resumed.config = _config(3, aggregation)
    run_experiment(InProcessGrid(client_app, 3).as_grid(), resumed.config, resumed)
    _, expected, _ = straight.load_last_checkpoint()
    _, actual, _ = resumed.load_last_checkpoint()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-6), key
