"""The `fedsec` command: one-line errors with exit code 2, and a real simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsec.config import parse_config
from fedsec.runs import RunDirectory

FEDSEC = [sys.executable, "-m", "fedsec.cli"]


def _fedsec(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [*FEDSEC, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _assert_bad_input(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ("[data\nnum_clients = 3\n", ("invalid TOML",)),
        ("[data]\nnum_clients = -4\n", ("data.num_clients", "-4")),
        ("[data]\npartition = 'dirichlet'\nalpha = 0\n", ("data.alpha", "> 0")),
        ("[data]\nnum_clients = 100000\n", ("data.num_clients", "training samples")),
        (  # valid fields, but no Dirichlet 0.1 draw gives 100 clients of digits one sample each
            "[data]\nnum_clients = 100\npartition = 'dirichlet'\nalpha = 0.1\n",
            ("data.partition", "dirichlet partitioning failed", "raise alpha"),
        ),
        (
            "[aggregation]\nrule = 'fedavgg'\n",
            ("aggregation.rule", "valid choices: mean"),
        ),
        (
            "[attack]\nname = 'alie'\nnum_malicious = 1\n",
            ("attack: alie", "m >= 2 malicious clients"),
        ),
    ],
)
def test_bad_config_is_one_line_exit_2(
    tmp_path: Path, toml: str, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    _assert_bad_input(_fedsec("run", path, cwd=tmp_path), *fragments)
    assert not (tmp_path / "results").exists()  # nothing started, nothing written


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mnist.toml"
    path.write_text("[data]\ndataset = 'mnist'\ndata_dir = 'nowhere'\n[model]\nname = 'cnn28'\n")
    _assert_bad_input(_fedsec("run", path, cwd=tmp_path), "mnist", "train-images-idx3-ubyte")


def test_resume_refuses_tampered_checkpoint(tmp_path: Path) -> None:
    import torch

    cfg = parse_config({"experiment": {"name": "t", "rounds": 2}})
    run = RunDirectory.create(cfg, tmp_path / "results")
    run.record_round(
        {"round": 0, "status": "initial", "test_accuracy": 0.1, "test_loss": 2.0},
        {"w": torch.zeros(2)},
    )
    run.close()  # this process stops writing it: the `fedsec run` below may
    (run.path / run.checkpoints[-1]["file"]).write_bytes(b"tampered")
    _assert_bad_input(_fedsec("run", "--resume", run.path, cwd=tmp_path), "SHA-256 mismatch")


def test_validate(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = _fedsec("validate", root / "simulations" / "quickstart.toml", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok:")


@pytest.mark.simulation
def test_simulation_end_to_end_and_resume(tmp_path: Path) -> None:
    """A real Flower simulation on Ray: 3 clients, 2 rounds, then resumed to 3."""
    path = tmp_path / "tiny.toml"
    path.write_text(
        "[experiment]\nname = 'tiny'\nrounds = 2\n[data]\nnum_clients = 3\n[client]\nlocal_epochs = 1\n"
    )
    result = _fedsec("run", path, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Final test accuracy" in result.stdout
    run_dir = tmp_path / "results" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert metrics["finished"] and metrics["rounds"][-1]["num-accepted"] == 3
    assert metrics["rounds"][-1]["test_accuracy"] > metrics["rounds"][0]["test_accuracy"]
    assert (run_dir / "accuracy.png").stat().st_size > 1000
    assert len((run_dir / "rounds.csv").read_text().splitlines()) == 4

    result = _fedsec("run", "--resume", run_dir, "--rounds", "3", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
