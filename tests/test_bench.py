"""The benchmark harness: grid files, the results store, the runner and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedsec.bench.grid import GridError, load_grid, parse_grid
from fedsec.bench.store import ResultsStore, StoreError
from fedsec.cli import BenchProgress
from fedsec.client.app import app as client_app
from fedsec.config import parse_config
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "grids" / "quick.toml"
STANDARD = ROOT / "simulations" / "grids" / "standard.toml"


GRID = """
[grid]
name = "t"
fractions = [0.25]
alphas = [0.5]
seeds = [0, 1]
[base]
experiment = { rounds = 2 }
data = { num_clients = 8 }
[[attack]]
name = "none"
[[attack]]
name = "ipm"
params = { epsilon = 10.0 }
[[defense]]
label = "fedavg"
rule = "mean"
[[defense]]
rule = "median"
"""


def _grid(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = tomllib.loads(GRID)
    raw.update(overrides)
    return raw


def test_cells_are_the_cross_product_with_one_clean_baseline() -> None:
    grid = parse_grid(_grid(grid={"name": "t", "fractions": [0.25, 0.375], "seeds": [0, 1]}))
    # clean: 2 defenses x 2 seeds (fraction 0); ipm: 2 defenses x 2 fractions x 2 seeds
    assert len(grid.cells) == 4 + 8
    assert all(c.fraction == 0.0 for c in grid.cells[:4])  # baselines first
    ipm = [c for c in grid.cells if c.attack == "ipm"]
    assert {(c.fraction, c.config.attack.fraction) for c in ipm} == {(0.25, 0.25), (0.375, 0.375)}
    # f = "auto": the expected malicious clients, told to the rule
    assert {c.config.aggregation.f for c in ipm if c.fraction == 0.375} == {3}
    assert all(c.config.data.partition == "dirichlet" and c.config.data.alpha == 0.5 for c in ipm)
    assert len({c.id for c in grid.cells}) == len(grid.cells)
    assert all(c.config.experiment.name == c.id for c in grid.cells)


def test_shipped_grids_are_valid_and_the_standard_one_is_big_enough() -> None:
    assert len(load_grid(QUICK).cells) == 9
    standard = load_grid(STANDARD)
    assert len({c.defense for c in standard.cells}) >= 8
    assert len({c.attack for c in standard.cells}) >= 8
    cfg = standard.cells[0].config
    assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.alpha) == ("digits", 20, 0.5)
    assert {c.fraction for c in standard.cells if c.attack != "none"} == {0.2}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"grid": {"name": "t", "fractions": [1.5]}}, "grid.fractions"),
        ({"grid": {"name": "t", "seeds": []}}, "grid.seeds"),
        ({"grid": {"name": "bad name"}}, "grid.name"),
        ({"defense": [{"rule": "nope"}]}, "cell none x nope"),
        ({"defense": [{"rule": "mean", "colour": 1}]}, "unknown key(s) ['colour']"),
        ({"defense": [{"rule": "mean"}, {"rule": "mean"}]}, "used twice"),
        ({"attack": [{"name": "ipm", "num_malicious": 2}]}, "from grid.fractions"),
        ({"attack": [{"name": "alie", "params": {"z": "x"}}]}, "cell alie x fedavg"),
        ({"colours": {}}, "unknown top-level"),
    ],
)
def test_bad_grids_fail_with_one_line_naming_the_place(change: dict[str, Any], words: str) -> None:
    with pytest.raises(GridError) as err:
        parse_grid(_grid(**change))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_store_refuses_another_grid_and_a_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not parse"):
        ResultsStore.create_or_open(tmp_path / "r", parse_grid(_grid(), source="# grid"))
    grid = parse_grid(_grid(), source=GRID)
    store = ResultsStore.create_or_open(tmp_path / "r", grid)
    assert (store.path / "grid.toml").read_text() == GRID
    assert [c["id"] for c in ResultsStore.create_or_open(tmp_path / "r", grid).cells] == [
        c.id for c in grid.cells
    ]
    other_text = GRID.replace("fractions = [0.25]", "fractions = [0.375]")
    other = parse_grid(tomllib.loads(other_text), source=other_text)
    with pytest.raises(StoreError, match="another grid"):
        ResultsStore.create_or_open(tmp_path / "r", other)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not a results folder"):
        ResultsStore.create_or_open(tmp_path / "foreign", grid)
    with pytest.raises(StoreError, match="not a fedsec bench results folder"):
        ResultsStore.open(tmp_path / "foreign")


def test_detection_precision_and_recall_score_the_rules_exclusions(tmp_path: Path) -> None:
    """Krum keeps one client per round: its exclusions are scored against the truth."""
    cfg = parse_config(
        {
            "experiment": {"name": "det", "rounds": 2, "seed": 0},
            "data": {"num_clients": 6},
            "client": {"local_epochs": 1},
            "aggregation": {"rule": "krum", "f": 1},
            "attack": {"name": "sign-flip", "num_malicious": 1, "params": {"scale": 10.0}},
        }
    )
    run = RunDirectory.create(cfg, tmp_path)
    rounds = run_experiment(InProcessGrid(client_app, 6).as_grid(), cfg, run)[1:]
    for r in rounds:
        # Krum selects 1 of 6: 5 excluded, the flipped one among them.
        assert r["detection_recall"] == 1.0
        assert r["detection_precision"] == pytest.approx(1 / 5)
    decisions = (run.path / "decisions.jsonl").read_text()
    assert "fedsec.truth" not in decisions and "fedsec.truth" not in json.dumps(rounds)


def test_progress_counts_cells_and_estimates_the_time_left() -> None:
    grid = load_grid(QUICK)
    progress = BenchProgress(grid.cells, jobs=2)
    first, second = grid.cells[0].id, grid.cells[1].id
    assert progress.eta() is None
    for event in [
        ("skip", 0, first, 0),
        ("start", 0, second, 3),
        ("round", 0, second, 2),
        ("done", 0, second, 10.0),
    ]:
        progress.update(event)
    assert (progress.done, progress.skipped) == (2, 1)
    assert progress.eta() == pytest.approx(10.0 * 7 / 2)


def _bench(results: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedsec.cli",
            "bench",
            str(QUICK),
            "--results",
            str(results),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _finished(results: Path) -> dict[str, str]:
    """Finished cells and their manifest text."""
    out = {}
    for manifest in (results / "cells").glob("*/manifest.json"):
        text = manifest.read_text()
        if json.loads(text)["finished"]:
            out[manifest.parent.name] = text
    return out


@pytest.mark.simulation
def test_quick_grid_runs_resumes_after_interruption_and_reports(tmp_path: Path) -> None:
    """The quick grid on Flower's simulation engine: interrupted after some cells, rerun
    (finished cells untouched, the rest done), then reported from the store."""
    results = tmp_path / "quick"
    first = _bench(results)
    deadline = time.monotonic() + 240
    while len(_finished(results)) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # no clean shutdown: as a crash would
    first.wait()
    before = _finished(results)
    assert 3 <= len(before) < 9, first.stdout.read() if first.stdout else ""

    second = _bench(results, "--jobs", "2")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    assert f"{len(before)} from an earlier run" in output
    after = _finished(results)
    assert len(after) == 9
    for cell_id, text in before.items():
        assert after[cell_id] == text  # finished cells were not redone

    store = ResultsStore.open(results)
    for result in store.results():
        assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]  # resumed, not repeated

    report = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", "report", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    markdown = (results / "report.md").read_text()
    html = (results / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html
    # Every final accuracy in the store appears in the report, as a percentage.
    for result in store.results():
        assert f"{100 * result.final['test_accuracy']:.1f}" in markdown


def test_a_cell_runs_all_its_rounds_unless_the_grid_says_otherwise() -> None:
    # A diverged defense fails every later round: a result, not a dead engine
    # (issue 16: run_experiment stops after server.max_failed_rounds).
    cells = parse_grid(_grid()).cells
    assert {c.config.server.max_failed_rounds for c in cells} == {2}
    raw = _grid()
    raw["defense"][1]["server"] = {"max_failed_rounds": 1}
    limits = {c.defense: c.config.server.max_failed_rounds for c in parse_grid(raw).cells}
    assert limits == {"fedavg": 2, "median": 1}
