"""Bring your own model, data, partitioner and training loop (issue 18, item 4).

The user's code lives outside fedsec, in ``tests/byo_user`` (a CNN with
BatchNorm, a synthetic data set, a partitioner, a training loop), and is named
by dotted path in configs and grids; ``fedsec bench`` runs it in-process and
on Ray. Registration (:mod:`fedsec.registry`) works in-process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsec.bench.grid import load_grid
from fedsec.bench.store import ResultsStore
from fedsec.config import ConfigError, parse_config
from fedsec.data import DATASETS, load_dataset, partition_indices
from fedsec.models import MODELS, make_model
from fedsec.registry import (
    TRAIN_FNS,
    register_dataset,
    register_model,
    register_partitioner,
    register_train_fn,
)
from fedsec.strategies.bench import run_grid

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

USER = {
    "model": {"name": "byo_user.model:build"},
    "data": {
        "dataset": "byo_user.data:stripes",
        "partition": "byo_user.data:blocks",
        "num_clients": 4,
    },
    "client": {"train_fn": "byo_user.train:train", "local_epochs": 1, "batch_size": 16},
    "experiment": {"rounds": 2},
}


def _user_config(data_dir: Path, **changes: dict[str, Any]) -> dict[str, Any]:
    raw = {section: dict(values) for section, values in USER.items()}
    raw["data"]["data_dir"] = str(data_dir)
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _grid_text(data_dir: Path, train_fn: str = "byo_user.train:train", base: str = "") -> str:
    return f"""
[grid]
name = "byo"
fractions = [0.25]
alphas = [0.5]
seeds = [0]

[base]
experiment = {{ rounds = 2 }}
model = {{ name = "byo_user.model:build" }}
data = {{ dataset = "byo_user.data:stripes", partition = "byo_user.data:blocks", num_clients = 4, data_dir = "{data_dir}" }}
client = {{ train_fn = "{train_fn}", local_epochs = 1, batch_size = 16 }}
{base}

[[attack]]
name = "none"

[[attack]]
name = "ipm"
params = {{ epsilon = 10.0 }}

[[defense]]
rule = "median"
"""


def _store(
    tmp_path: Path, train_fn: str = "byo_user.train:train", base: str = ""
) -> tuple[ResultsStore, Path]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    grid_file = tmp_path / "byo.toml"
    grid_file.write_text(_grid_text(data_dir, train_fn, base))
    return ResultsStore.create_or_open(tmp_path / "results", load_grid(grid_file)), data_dir


def _calls(data_dir: Path) -> list[str]:
    log = data_dir / "train_calls.log"
    return log.read_text().splitlines() if log.exists() else []


# ---- configs -----------------------------------------------------------------


def test_dotted_names_build_the_users_model_data_and_partitions(tmp_path: Path) -> None:
    cfg = parse_config(_user_config(tmp_path))
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=0)
    assert data.info.input_shape == (1, 8, 8) and data.info.num_classes == 4
    assert (data.info.num_train, data.info.num_test) == (400, 100)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert DATASETS.get(cfg.data.dataset) == data.info  # other modules look it up by name
    model = make_model(cfg.model.name, data.info.input_shape, 4, seed=3)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    same = make_model(cfg.model.name, data.info.input_shape, 4, seed=3)
    for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # fedsec seeds the user's factory
    parts = partition_indices(data.train_y.numpy(), 4, cfg.data.partition, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(400))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"model": {"name": "byo_user.nothere:build"}},
            "model.name: model 'byo_user.nothere:build': cannot import module "
            "'byo_user.nothere' (ModuleNotFoundError",
        ),
        (
            {"model": {"name": "byo_user.model:missing"}},
            "model.name: model 'byo_user.model:missing': module 'byo_user.model' has no "
            "attribute 'missing'",
        ),
        (
            {"model": {"name": "byo_user.model:NOT_CALLABLE"}},
            "model.name: model 'byo_user.model:NOT_CALLABLE' names an object of type 'int', "
            "not a callable",
        ),
        (
            {"model": {"name": "byo_user.model:build:x"}},
            "model.name: model 'byo_user.model:build:x' is not a dotted name",
        ),
        (
            {"data": {"dataset": "byo_user.data:missing"}},
            "data.dataset: dataset 'byo_user.data:missing': module 'byo_user.data' has no",
        ),
        (
            {"data": {"dataset": "byo_user.data:not_a_factory"}},
            "data.dataset: loading 'byo_user.data:not_a_factory' failed (TypeError",
        ),
        (
            {"data": {"partition": "byo_user.data:PATTERNS"}},
            "data.partition: partitioner 'byo_user.data:PATTERNS' names an object of type 'int'",
        ),
        (
            {"client": {"train_fn": "byo_user.train:missing"}},
            "client.train_fn: training function 'byo_user.train:missing': module",
        ),
        (
            {"client": {"train_fn": "mine"}},
            "client.train_fn: unknown training function 'mine'; valid choices: none registered; "
            "or a dotted 'package.module:factory'",
        ),
        (
            {"privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0}},
            "client.train_fn: privacy.mode 'dp-sgd' trains with fedsec's private loop",
        ),
    ],
)
def test_bad_user_names_are_one_line_errors_naming_the_key(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_user_config(tmp_path, **change))
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_plain_names_mention_the_dotted_form_and_where_registrations_reach() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"name": "vgg"}})
    message = str(info.value)
    assert message.startswith("model.name: unknown model 'vgg'; valid choices: mlp")
    assert "'package.module:factory'" in message and "register_" in message


def _fedsec(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsec.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
        cwd=cwd,
    )


def test_bad_dotted_names_in_the_cli_exit_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[model]\nname = "byo_user.model:missing"\n')
    grid = tmp_path / "grid.toml"
    grid.write_text(_grid_text(tmp_path, "byo_user.nothere:train"))
    for result, expected in (
        (_fedsec("validate", config, cwd=tmp_path), "model.name: model 'byo_user.model:missing'"),
        (
            _fedsec("bench", grid, "--engine", "inprocess", cwd=tmp_path),
            "client.train_fn: training function 'byo_user.nothere:train': cannot import",
        ),
    ):
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "results").exists()  # bad input writes nothing


def test_malformed_user_data_and_partitions_are_refused_in_one_line(tmp_path: Path) -> None:
    from fedsec.data.datasets import DATASET_FACTORIES
    from fedsec.data.partition import PARTITIONERS

    def bad_labels(data_dir: Path, seed: int) -> Any:
        x = np.zeros((10, 1, 4, 4), dtype=np.float32)
        return x, np.full(10, -1), x, np.zeros(10, dtype=np.int64)

    def overlap(labels: Any, num_partitions: int, **_: Any) -> list[Any]:
        return [np.arange(5)] * num_partitions

    register_dataset("byo-test-bad-labels")(bad_labels)
    register_partitioner("byo-test-overlap")(overlap)
    try:
        with pytest.raises(ConfigError, match=r"^data.dataset: loading .* labels must lie in"):
            parse_config({"data": {"dataset": "byo-test-bad-labels", "num_clients": 2}})
        with pytest.raises(ValueError, match="partitions overlap"):
            partition_indices(np.zeros(20, dtype=np.int64), 2, "byo-test-overlap", seed=0)
    finally:
        DATASET_FACTORIES._entries.pop("byo-test-bad-labels")
        PARTITIONERS._entries.pop("byo-test-overlap")


# ---- registration, in-process -------------------------------------------------


@pytest.fixture
def registered() -> Iterator[str]:
    """The user's code registered under plain names (removed afterwards)."""
    from byo_user import data, model, train

    from fedsec.data.datasets import DATASET_FACTORIES
    from fedsec.data.partition import PARTITIONERS

    register_model("byo-test-net", description="the user's CNN")(model.build)
    register_dataset("byo-test-stripes")(data.stripes)
    register_partitioner("byo-test-blocks")(data.blocks)
    register_train_fn("byo-test-train")(train.train)
    yield "byo-test"
    for registry, name in (
        (MODELS, "byo-test-net"),
        (DATASET_FACTORIES, "byo-test-stripes"),
        (PARTITIONERS, "byo-test-blocks"),
        (TRAIN_FNS, "byo-test-train"),
    ):
        registry._entries.pop(name, None)


def test_registered_names_work_as_built_in_ones(registered: str, tmp_path: Path) -> None:
    cfg = parse_config(
        _user_config(
            tmp_path,
            model={"name": "byo-test-net"},
            data={"dataset": "byo-test-stripes", "partition": "byo-test-blocks"},
            client={"train_fn": "byo-test-train"},
        )
    )
    assert "byo-test-net" in MODELS.names()
    with pytest.raises(ValueError, match="already registered"):
        register_model("byo-test-net")(lambda shape, classes: torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="no ':'"):
        register_model("pkg.mod:f")
    info = DATASETS.get(cfg.data.dataset)
    assert info.num_classes == 4
    with pytest.raises(
        ConfigError, match=r"data.dataset: unknown dataset 'nope'.*byo-test-stripes"
    ):
        parse_config({"data": {"dataset": "nope"}})


def test_registered_run_trains_with_the_users_loop_in_process(
    registered: str, tmp_path: Path
) -> None:
    from fedsec.client.app import app as client_app
    from fedsec.runs import RunDirectory
    from fedsec.strategies.inprocess import InProcessGrid
    from fedsec.strategies.server_app import run_experiment

    cfg = parse_config(
        _user_config(
            tmp_path,
            model={"name": "byo-test-net"},
            data={"dataset": "byo-test-stripes", "partition": "byo-test-blocks"},
            client={"train_fn": "byo-test-train"},
            experiment={"rounds": 2, "results_dir": str(tmp_path / "runs")},
        )
    )
    run = RunDirectory.create(cfg, tmp_path / "runs")
    try:
        rows = run_experiment(InProcessGrid(client_app, 4).as_grid(), cfg, run)
    finally:
        run.close()
    assert [r["status"] for r in rows[1:]] == ["ok", "ok"]
    assert len(_calls(tmp_path)) == 2 * 4  # the user's loop, every client, every round


# ---- fedsec bench on the user's code -----------------------------------------


def test_bench_runs_the_users_model_data_and_loop_in_process(tmp_path: Path) -> None:
    store, data_dir = _store(tmp_path)
    events: list[Any] = []
    failed = run_grid(store, engine="inprocess", on_event=events.append)
    assert failed == {}, failed
    results = store.results()
    assert len(results) == 2 and all(r.finished and not r.every_round_failed for r in results)
    for result in results:
        assert [r["status"] for r in result.rounds[1:]] == ["ok", "ok"]
        assert result.final["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    # 2 cells x 2 rounds x 4 clients: the user's loop trained every reply
    assert len(_calls(data_dir)) == 16
    # a rerun skips the finished cells
    again: list[Any] = []
    assert run_grid(store, engine="inprocess", on_event=again.append) == {}
    assert [e[0] for e in again] == ["skip", "skip"]


def test_cells_whose_every_round_failed_are_failed_cells_in_the_report_and_exit_code(
    tmp_path: Path,
) -> None:
    # max_failed_rounds above the rounds: the cells run to the end, every round failed
    # (each client's training raises), and the run is marked finished. Such a cell
    # measured nothing: it is a failed cell, not a result, now and on a rerun.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    grid_file = tmp_path / "byo.toml"
    base = "server = { max_failed_rounds = 5 }"
    grid_file.write_text(_grid_text(data_dir, "byo_user.train:broken", base))
    results = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", "bench", str(grid_file), "--engine", "inprocess",
         "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "0 of 2 cells finished" in result.stdout
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed_lines) == 2
    for line in failed_lines:
        assert "every one of its 2 rounds failed" in line
        assert "RuntimeError: the user's loop is broken" in line  # the clients' own error
    store = ResultsStore.open(results)
    assert all(r.finished and r.every_round_failed for r in store.results())
    events: list[Any] = []
    again = run_grid(store, engine="inprocess", on_event=events.append)  # a rerun
    assert set(again) == {c["id"] for c in store.cells}
    assert [e[0] for e in events] == ["error", "error"]


def test_bench_with_a_name_registered_only_in_the_parent_says_why_per_cell(
    registered: str, tmp_path: Path
) -> None:
    # The parent registered the name, so the grid loads here; the bench's worker
    # processes do not import the registering module and cannot resolve it.
    text = _grid_text(tmp_path).replace("byo_user.model:build", "byo-test-net")
    grid_file = tmp_path / "byo.toml"
    grid_file.write_text(text)
    store = ResultsStore.create_or_open(tmp_path / "results", load_grid(grid_file))
    failed = run_grid(store, engine="inprocess")
    assert set(failed) == {c["id"] for c in store.cells}
    assert all("unknown model 'byo-test-net'" in reason for reason in failed.values())
    assert all("register_" in reason for reason in failed.values())


@pytest.mark.simulation
def test_bench_runs_the_users_model_data_and_loop_on_ray(tmp_path: Path) -> None:
    store, data_dir = _store(tmp_path)
    started = time.perf_counter()
    failed = run_grid(store, engine="ray")
    print(f"byo grid on Ray: {time.perf_counter() - started:.1f} s")
    assert failed == {}, failed
    for result in store.results():
        assert result.finished and [r["status"] for r in result.rounds[1:]] == ["ok", "ok"]
    assert len(_calls(data_dir)) == 16  # trained by the user's loop in the Ray actors


@pytest.mark.slow
@pytest.mark.simulation
def test_ray_cells_whose_clients_all_fail_are_failed_cells(tmp_path: Path) -> None:
    store, _ = _store(
        tmp_path, train_fn="byo_user.train:broken", base="server = { max_failed_rounds = 5 }"
    )
    failed = run_grid(store, engine="ray")
    assert set(failed) == {c["id"] for c in store.cells}
    assert all("every one of its 2 rounds failed" in reason for reason in failed.values())
