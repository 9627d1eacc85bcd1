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
from fedsec.runs import RunDirectory, RunDirectoryError, RunInUseError
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


def test_bench_refuses_a_grid_whose_split_cannot_be_made_before_writing_anything(
    tmp_path: Path,
) -> None:
    """No Dirichlet 0.1 draw gives 100 digits clients a sample each: one line, exit 2."""
    grid = tmp_path / "bad.toml"
    grid.write_text(
        GRID.replace("data = { num_clients = 8 }", "data = { num_clients = 100 }").replace(
            "alphas = [0.5]", "alphas = [0.1]"
        )
    )
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", "bench", str(grid), "--results", str(results),
         "--engine", "inprocess"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cell "), done.stderr
    assert "data.partition: dirichlet partitioning failed" in lines[0]
    assert not results.exists()  # bad input writes nothing


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


def test_a_cell_killed_before_its_first_manifest_reruns_in_its_own_folder(
    tmp_path: Path,
) -> None:
    """Killed between making a cell's folder and writing its manifest, a grid resumed
    the cell in "<id>-2", which the store never reads: the cell stayed unfinished
    (seen as a flaky quick-grid test under load). It now reruns in its own folder."""
    grid = parse_grid(_grid(), source=GRID)
    store = ResultsStore.create_or_open(tmp_path / "r", grid)
    cell = grid.cells[0]
    folder = store.cell_path(cell.id)
    (folder / "checkpoints").mkdir(parents=True)  # what create() makes before the manifest
    (folder / ".lock").write_text("4242\n")  # a dead process's lock file: no flock held
    run = store.run_directory(cell)
    try:
        assert run.path == folder.resolve()
        run.finish(plot=False)
    finally:
        run.close()
    assert sorted(p.name for p in (store.path / "cells").iterdir()) == [cell.id]
    assert store.result(cell.id).finished
    # A folder that recorded a run is resumed, never discarded.
    with pytest.raises(RunDirectoryError, match="resume it with open"):
        RunDirectory.discard_unrecorded(folder)


def test_a_live_process_keeps_its_unrecorded_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
         "time.sleep(600)", str(folder / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError):
            RunDirectory.discard_unrecorded(folder)
        assert (folder / "checkpoints").is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_a_cell_keeps_its_newest_checkpoint_only_and_its_id() -> None:
    # 198 cells of a history-keeping rule once kept 15 GB of checkpoints (every round
    # of every cell) and filled the disk: a cell keeps round 0 and its newest.
    cells = parse_grid(_grid()).cells
    assert {c.config.experiment.keep_checkpoints for c in cells} == {1}
    raw = _grid()
    raw["base"]["experiment"]["keep_checkpoints"] = 0
    kept_all = parse_grid(raw).cells
    assert {c.config.experiment.keep_checkpoints for c in kept_all} == {0}
    # Results do not depend on it, so neither does the cell id.
    assert [c.id for c in kept_all] == [c.id for c in cells]


# ---- regimes (issue 19) --------------------------------------------------------------------

REGIMES = [
    {
        "label": "fedsgd",
        "alphas": [0.1],
        "fractions": [0.125, 0.25],
        "client": {"local_steps": 1},
        "server": {"momentum": 0.9, "lr": 0.5},
    },
    {"label": "cross-device", "data": {"num_clients": 40}, "client": {"fraction": 0.25}},
]


def test_regimes_deep_merge_over_base_and_name_their_cells() -> None:
    raw = _grid(regime=REGIMES)
    raw["base"]["client"] = {"local_epochs": 1, "batch_size": 16}
    raw["base"]["server"] = {"round_timeout": 60.0}
    grid = parse_grid(raw)
    fedsgd = [c for c in grid.cells if c.regime == "fedsgd"]
    cross = [c for c in grid.cells if c.regime == "cross-device"]
    # fedsgd: clean 2 defenses x 2 seeds + ipm 2 x 2 fractions x 2 seeds; cross-device:
    # the grid's one fraction and alpha: 4 clean + 4 attacked.
    assert (len(fedsgd), len(cross), len(grid.cells)) == (12, 8, 20)
    for cell in fedsgd:
        client, server = cell.config.client, cell.config.server
        # The regime's keys replace base's; base's other keys in the same table stay.
        assert (client.local_steps, client.local_epochs, client.batch_size) == (1, 1, 16)
        assert (server.momentum, server.lr, server.round_timeout) == (0.9, 0.5, 60.0)
        assert cell.alpha == cell.config.data.alpha == 0.1
        assert "__fedsgd__" in cell.id and cell.describe()["regime"] == "fedsgd"
    assert {c.fraction for c in fedsgd if c.attack == "ipm"} == {0.125, 0.25}
    for cell in cross:
        assert (cell.config.data.num_clients, cell.config.client.fraction) == (40, 0.25)
        assert cell.config.client.local_steps == 0 and cell.alpha == 0.5
        assert "__cross-device__" in cell.id and cell.describe()["num_clients"] == 40
    # f = "auto" counts the malicious clients among the 10 sampled of 40 (10 malicious).
    assert {c.config.aggregation.f for c in cross if c.attack == "ipm"} == {2}
    # The clean baseline runs once per defense x regime x alpha x seed.
    clean = [(c.defense, c.regime, c.alpha, c.seed) for c in grid.cells if c.attack == "none"]
    assert len(clean) == len(set(clean)) == 2 * 2 * 2
    assert all(c.fraction == 0.0 for c in grid.cells[:8])  # baselines first
    assert len({c.id for c in grid.cells}) == len(grid.cells)


def test_grids_without_regimes_keep_their_cell_ids() -> None:
    # Results folders match their grid by cell ids: adding regimes must not rename
    # the cells of existing grids (ids computed before regimes existed).
    cells = load_grid(STANDARD).cells
    ids = [c.id for c in cells]
    assert len(ids) == 143
    assert ids[0] == "none__fedavg__m0_a0.5_s0__6a6b4b2e"
    assert ids[5] == "none__bulyan__m0_a0.5_s0__196a3d6c"
    assert ids[77] == "ipm__dnc__m0.2_a0.5_s0__03100dba"
    assert ids[-1] == "backdoor__dnc__m0.2_a0.5_s0__0e900eea"
    assert {c.regime for c in cells} == {""}


def test_attack_entries_set_knowledge_and_adaptive() -> None:
    raw = _grid()
    raw["attack"].append(
        {
            "label": "min-max-tailored",
            "name": "min-max",
            "adaptive": True,
            "knowledge": "omniscient",
        }
    )
    raw["attack"].append({"name": "min-max"})
    attacked = {
        c.attack: c.config.attack for c in parse_grid(raw).cells if c.attack.startswith("min")
    }
    assert (attacked["min-max-tailored"].adaptive, attacked["min-max-tailored"].knowledge) == (
        True,
        "omniscient",
    )
    assert (attacked["min-max"].adaptive, attacked["min-max"].knowledge) == (False, "colluders")


@pytest.mark.parametrize(
    ("regimes", "words"),
    [
        ([{"client": {"local_steps": 1}}], "regime[0].label"),
        ([{"label": "a b"}], "regime[0].label"),
        ([{"label": "x"}, {"label": "x"}], "regime x: label is used twice"),
        ([{"label": "x", "colour": 1}], "regime x: unknown key(s) ['colour']"),
        ([{"label": "x", "attack": {"name": "ipm"}}], "the attack comes from [[attack]]"),
        ([{"label": "x", "client": 1}], "regime x: client must be a table"),
        ([{"label": "x", "client": {"local_stepz": 1}}], "regime x: client.local_stepz"),
        ([{"label": "x", "client": {"local_steps": -1}}], "regime x: client.local_steps"),
        ([{"label": "x", "data": {"alpha": 0.1}}], "regime x: data.alpha is set per cell"),
        ([{"label": "x", "experiment": {"seed": 3}}], "regime x: experiment.seed"),
        ([{"label": "x", "fractions": [1.2]}], "regime x: fractions"),
        ([{"label": "x", "alphas": []}], "regime x: alphas"),
        ([{"label": "x", "data": {"num_clients": 2}}], "in regime x"),
        ([], "regime: must be one or more"),
    ],
)
def test_bad_regimes_fail_with_one_line_naming_the_regime_and_key(
    regimes: list[Any], words: str
) -> None:
    with pytest.raises(GridError) as err:
        parse_grid(_grid(regime=regimes))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_exclude_drops_the_matching_cells_and_refuses_one_that_matches_none() -> None:
    raw = _grid(
        grid={"name": "t", "fractions": [0.25, 0.375], "seeds": [0]},
        exclude=[{"defense": "median", "fraction": [0.375]}],
    )
    cells = {(c.attack, c.defense, c.fraction) for c in parse_grid(raw).cells}
    assert ("ipm", "median", 0.375) not in cells
    # The clean baseline (fraction 0) and the other fraction stay.
    assert {("none", "median", 0.0), ("ipm", "median", 0.25), ("ipm", "fedavg", 0.375)} <= cells
    assert len(cells) == 2 + 4 - 1
    raw["exclude"] = [{"defense": "medain"}]
    with pytest.raises(GridError, match=r"exclude\[0\]: .* matches no cell"):
        parse_grid(raw)
    raw["exclude"] = [{"colour": "red"}]
    with pytest.raises(GridError, match=r"exclude\[0\]: unknown key"):
        parse_grid(raw)
    raw["exclude"] = [{"fraction": "x"}]
    with pytest.raises(GridError, match=r"exclude\[0\]\.fraction: must be a number"):
        parse_grid(raw)


def test_the_hard_grid_crosses_every_defense_with_the_regimes() -> None:
    grid = load_grid(ROOT / "simulations" / "grids" / "hard.toml")
    regimes = {c.regime: c.config for c in grid.cells}
    assert set(regimes) == {"fedsgd", "cross-device"}
    fedsgd, cross = regimes["fedsgd"], regimes["cross-device"]
    assert 1 <= fedsgd.client.local_steps <= 2 and fedsgd.server.momentum > 0
    assert fedsgd.data.alpha == 0.1
    assert cross.data.num_clients == 100 and 10 <= round(100 * cross.client.fraction) <= 20
    fractions = {c.fraction for c in grid.cells if c.regime == "fedsgd" and c.attack != "none"}
    assert fractions == {0.1, 0.2, 0.3}
    defenses = {c.defense for c in grid.cells}
    assert {"fedavg", "dnc", "fltrust", "nnm+trimmed-mean", "bucketing+cc"} <= defenses
    tailored = {c.config.attack.name for c in grid.cells if c.config.attack.adaptive}
    assert tailored == {"min-max", "min-sum", "fltrust-adaptive"}
    assert {c.defense for c in grid.cells if c.attack == "fltrust-adaptive"} == {"fltrust"}
