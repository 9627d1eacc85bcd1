"""Checkpoint input hardening (issue 16): bounded reads, and tensors that must fit the model.

A checkpoint is read only if it is a regular file of bounded size, and on
``fedsec run --resume`` its tensors are checked against the configured model
before the engine starts: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsec.checkpoint import (
    CheckpointError,
    check_model_state,
    check_state_fits,
    load_checkpoint,
    read_checkpoint_bytes,
    save_checkpoint,
)
from fedsec.cli import cli
from fedsec.config import parse_config
from fedsec.data import DATASETS
from fedsec.models import make_model
from fedsec.runs import RunDirectory

INITIAL = {"round": 0, "status": "initial", "test_accuracy": 0.1, "test_loss": 2.0}


def _resume(run: RunDirectory) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["run", "--resume", str(run.path)])
    return result.exit_code, result.stderr


def _assert_one_line_exit_2(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _model_state(name: str = "mlp") -> dict[str, torch.Tensor]:
    info = DATASETS.get("digits")
    return make_model(name, info.input_shape, info.num_classes).state_dict()


def _run_with(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> RunDirectory:
    cfg = parse_config({"experiment": {"name": "t", "rounds": 3}})
    run = RunDirectory.create(cfg, tmp_path / "results")
    run.record_round(INITIAL, tensors)
    return run


# ---- bounded reads ----------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(path, "0" * 64)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    os.mkfifo(path)  # opening it for reading would block until a writer came
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(path, "0" * 64)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path, "0" * 64)


def test_size_is_bounded_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    digest = save_checkpoint(path, {"w": torch.zeros(64)})
    size = path.stat().st_size
    assert load_checkpoint(path, digest, max_bytes=size)["w"].shape == (64,)
    with pytest.raises(CheckpointError, match="exceeds the limit"):
        load_checkpoint(path, digest, max_bytes=size - 1)
    assert len(read_checkpoint_bytes(path, expected_bytes=size)) == size
    with pytest.raises(CheckpointError, match="the manifest records"):
        read_checkpoint_bytes(path, expected_bytes=size + 1)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_resume_from_a_checkpoint_linked_to_dev_zero_is_one_line(tmp_path: Path) -> None:
    run = _run_with(tmp_path, _model_state())
    path = run.path / run.checkpoints[-1]["file"]
    path.unlink()
    path.symlink_to("/dev/zero")
    _assert_one_line_exit_2(*_resume(run), "not a regular file")


# ---- tensors that must fit the model -------------------------------------------------


def test_a_real_model_state_fits() -> None:
    cfg = parse_config({})
    check_model_state(cfg, _model_state())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.pop(next(iter(s))), "missing"),
        (lambda s: s.update(extra=torch.zeros(1)), "1 unexpected (first 'extra')"),
        (lambda s: s.update({k: torch.zeros(3, 3) for k in list(s)[:1]}), "has shape [3, 3]"),
        (lambda s: s.update({k: v.double() for k, v in list(s.items())[:1]}), "torch.float64"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_state_that_does_not_fit_names_the_difference(change: object, expected: str) -> None:
    state = dict(_model_state())
    change(state)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="does not fit model 'mlp'") as info:
        check_model_state(parse_config({}), state, "checkpoint of round 4")
    message = str(info.value)
    assert "\n" not in message and expected in message and "round 4" in message


def test_check_state_fits_is_exact() -> None:
    reference = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    check_state_fits({"b": torch.ones(3), "w": torch.ones(2, 3)}, reference, "x")
    with pytest.raises(CheckpointError, match=r"^x: 'w' has shape \[3, 2\], the model \[2, 3\]"):
        check_state_fits({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, reference, "x")


def test_resume_from_a_checkpoint_of_another_model_is_one_line(tmp_path: Path) -> None:
    # The hash matches (the manifest was written with it); the tensors are another model's.
    run = _run_with(tmp_path, _model_state("mlp-wide"))
    _assert_one_line_exit_2(*_resume(run), "checkpoint of round 0 does not fit model 'mlp'")
