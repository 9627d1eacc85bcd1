"""Checkpoints: safetensors round trip, SHA-256 verification, no pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedsec.config import default_config
from fedsec.runs import RunDirectory, RunDirectoryError


def test_round_trip(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32)}
    digest = save_checkpoint(tmp_path / "c.safetensors", tensors)
    loaded = load_checkpoint(tmp_path / "c.safetensors", digest)
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)


def test_hash_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    digest = save_checkpoint(path, {"w": torch.zeros(4)})
    save_checkpoint(path, {"w": torch.ones(4)})  # replaced behind the manifest's back
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(path, digest)


def test_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "none.safetensors", "0" * 64)
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not safetensors at all")
    import hashlib

    with pytest.raises(CheckpointError, match="not valid safetensors"):
        load_checkpoint(path, hashlib.sha256(path.read_bytes()).hexdigest())


def test_run_directory_records_and_reopens(tmp_path: Path) -> None:
    cfg = default_config().replace("experiment", name="unit", rounds=3)
    run = RunDirectory.create(cfg, tmp_path)
    model = {"layer.weight": torch.randn(2, 2)}
    run.record_round(
        {"round": 0, "status": "initial", "test_accuracy": 0.1, "test_loss": 2.3}, model
    )
    model2 = {"layer.weight": torch.randn(2, 2)}
    run.record_round(
        {"round": 1, "status": "ok", "test_accuracy": 0.5, "test_loss": 1.0},
        model2,
        {"momentum_buffer": torch.ones(4)},
    )
    reopened = RunDirectory.open(run.path)
    assert reopened.config == cfg
    last, state, server = reopened.load_last_checkpoint()
    assert last == 1
    assert torch.equal(state["layer.weight"], model2["layer.weight"])
    assert torch.equal(server["momentum_buffer"], torch.ones(4))
    assert (run.path / "rounds.csv").read_text().splitlines()[0].startswith("round,status")
    run.finish()
    assert (run.path / "accuracy.png").stat().st_size > 1000


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    cfg = default_config().replace("experiment", name="same")
    first = RunDirectory.create(cfg, tmp_path)
    second = RunDirectory.create(cfg, tmp_path)
    assert first.path != second.path
    assert second.path.name == "same-2"


def test_open_rejects_non_runs(tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match="not a fedsec run directory"):
        RunDirectory.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(RunDirectoryError, match="unreadable manifest"):
        RunDirectory.open(tmp_path)
