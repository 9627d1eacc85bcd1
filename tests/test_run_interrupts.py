"""Interrupts, crashes and concurrent runs: Ctrl-C, one writer per run folder, a dead
engine, checkpoint retention, where runs may be written, and the bench runner's
judgement of slow workers.

The ``fedsec run`` subprocesses use the in-process engine on digits with three
clients, so each takes seconds; nothing asserts wall-clock times beyond
generous bounds on a process ending.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from fedsec.client.app import app as client_app
from fedsec.config import ExperimentConfig, parse_config
from fedsec.runs import (
    EngineStoppedError,
    RunClosedError,
    RunDirectory,
    RunDirectoryError,
    RunInUseError,
)
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

FEDSEC = [sys.executable, "-m", "fedsec.cli"]
TINY = "[experiment]\nname = '{name}'\nrounds = {rounds}\n[data]\nnum_clients = 3\n"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # as in a CI log
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _fedsec(*args: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDSEC, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _config(rounds: int, **server: Any) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "r", "rounds": rounds, "seed": 1},
            "data": {"num_clients": 3},
            "client": {"local_epochs": 1},
            "server": server,
        }
    )


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and modification time."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _assert_consistent(run_dir: Path) -> list[int]:
    """The manifest, checkpoints, metrics, CSV and decisions agree; return the rounds."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rounds = [r["round"] for r in manifest["rounds"]]
    assert rounds == list(range(len(rounds)))
    assert [c["round"] for c in manifest["checkpoints"]] == rounds
    for entry in manifest["checkpoints"]:
        data = (run_dir / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == rounds
    assert len((run_dir / "rounds.csv").read_text().splitlines()) == len(rounds) + 1
    decisions = (run_dir / "decisions.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in decisions] == rounds[1:]
    return rounds


def _wait_for_round(run_dir: Path, process: subprocess.Popen[str], at_least: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            manifest = json.loads((run_dir / "manifest.json").read_text())
            if len(manifest["rounds"]) > at_least:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    out, err = process.communicate(timeout=60) if process.poll() is not None else ("", "")
    raise AssertionError(f"no round {at_least} recorded: {out[-2000:]} {err[-2000:]}")


# --- Ctrl-C ---------------------------------------------------------------------------


def test_ctrl_c_stops_the_run_with_one_line_and_a_consistent_folder(tmp_path: Path) -> None:
    (tmp_path / "long.toml").write_text(TINY.format(name="long", rounds=400))
    process = subprocess.Popen(
        [*FEDSEC, "run", "long.toml", "--engine", "inprocess"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    run_dir = tmp_path / "results" / "long"
    try:
        _wait_for_round(run_dir, process, at_least=2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)  # generous: "within seconds"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err[-3000:]
    assert f"fedsec run --resume {run_dir.resolve()}" in lines[0]
    # Output is a pipe, as in a log: the engine's start and each round get a plain line.
    assert "starting the in-process engine" in out
    assert "round 1/400: test acc " in out
    recorded = _assert_consistent(run_dir)
    assert 2 < len(recorded) < 401
    assert not json.loads((run_dir / "manifest.json").read_text())["finished"]

    last = recorded[-1]
    resumed = _fedsec(
        "run", "--resume", run_dir, "--rounds", str(last + 1), "--engine", "inprocess", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _assert_consistent(run_dir) == list(range(last + 2))
    # The final table is not squeezed into 80 columns: one line per row.
    table = [line for line in resumed.stdout.splitlines() if "elapsed" in line]
    assert table and "test acc" in table[0] and "clients" in table[0]


def _blocking_tamper(entered: threading.Event, release: threading.Event) -> Any:
    calls = 0

    def tamper(reply: Message) -> Message:
        nonlocal calls
        calls += 1
        if calls == 2:  # node 1's training reply of round 2
            entered.set()
            release.wait(timeout=60)
        return reply

    return tamper


def test_a_leftover_round_thread_records_nothing_after_close(tmp_path: Path) -> None:
    """After an interrupt the round loop may still be waiting on replies; once they
    come, it must not record that round (or any later one) into the closed run."""
    cfg = _config(5).replace("client", evaluate_fraction=0.0)
    run = RunDirectory.create(cfg, tmp_path)
    entered, release = threading.Event(), threading.Event()
    grid = InProcessGrid(client_app, 3, tamper={1: _blocking_tamper(entered, release)})
    raised: list[BaseException] = []

    def rounds() -> None:
        try:
            run_experiment(grid.as_grid(), cfg, run)
        except BaseException as err:
            raised.append(err)

    thread = threading.Thread(target=rounds)
    thread.start()
    assert entered.wait(timeout=120), "round 2 never started"
    before = _snapshot(run.path)
    run.close()
    release.set()
    thread.join(timeout=120)
    assert not thread.is_alive() and not raised, raised
    assert _snapshot(run.path) == before  # round 2 was not recorded, nothing else written
    assert [r["round"] for r in RunDirectory.open(run.path).rounds] == [0, 1]
    with pytest.raises(RunClosedError):
        run.record_round({"round": 2}, {"w": torch.zeros(1)})


# --- one writer per run folder ---------------------------------------------------------


HOLDER = (
    "import sys, time\n"
    "from fedsec.runs import RunDirectory\n"
    "run = RunDirectory.open(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_writer_is_refused_and_kill_9_releases_the_folder(tmp_path: Path) -> None:
    cfg = _config(1)
    run = RunDirectory.create(cfg, tmp_path / "results")
    run_experiment(InProcessGrid(client_app, 3).as_grid(), cfg, run)
    run.close()
    folder = run.path

    # Another process writes the folder (here: holds it open, as a running fedsec would).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = _snapshot(folder)
        refused = _fedsec("run", "--resume", folder, "--rounds", "2", "--engine", "inprocess",
                          cwd=tmp_path)  # fmt: skip
        _one_error_line(refused, 2, str(folder), "in use by another fedsec process")
        assert f"pid {holder.pid}" in refused.stderr
        assert _snapshot(folder) == before  # refused before anything changed
        with pytest.raises(RunInUseError):
            RunDirectory.open(folder)
    finally:
        holder.kill()  # kill -9: no cleanup runs, the OS drops the lock
        holder.wait()

    resumed = _fedsec("run", "--resume", folder, "--rounds", "2", "--engine", "inprocess",
                      cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _assert_consistent(folder) == [0, 1, 2]


def test_the_same_process_may_reopen_its_own_run(tmp_path: Path) -> None:
    run = RunDirectory.create(_config(1), tmp_path)
    run.record_round({"round": 0, "status": "initial"}, {"w": torch.zeros(1)})
    reopened = RunDirectory.open(run.path)  # shares this process's lock
    assert reopened.last_round == 0
    reopened.close()
    run.record_round({"round": 1, "status": "ok"}, {"w": torch.ones(1)})  # still held
    run.close()


# --- a dead engine ---------------------------------------------------------------------


def test_run_stops_after_max_failed_rounds_and_resumes(tmp_path: Path) -> None:
    cfg = _config(6, max_failed_rounds=2)
    run = RunDirectory.create(cfg, tmp_path)
    dead = InProcessGrid(client_app, 3, dead=[1, 2, 3])  # the engine died: no reply at all
    with pytest.raises(EngineStoppedError) as err:
        run_experiment(dead.as_grid(), cfg, run)
    message = str(err.value)
    assert "\n" not in message
    assert "2 consecutive rounds (rounds 1-2" in message and "0 of 3 sampled" in message
    assert [r["status"] for r in run.rounds] == ["initial", "failed", "failed"]
    assert not run.finished
    run.close()

    resumed = RunDirectory.open(run.path)
    resumed.config = _config(3, max_failed_rounds=2)
    run_experiment(InProcessGrid(client_app, 3).as_grid(), resumed.config, resumed)
    assert resumed.finished and [r["round"] for r in resumed.rounds] == [0, 1, 2, 3]


def test_a_failed_round_between_good_ones_does_not_stop_the_run(tmp_path: Path) -> None:
    cfg = _config(3, max_failed_rounds=2).replace("data", num_clients=1)
    cfg = cfg.replace("client", evaluate_fraction=0.0)
    run = RunDirectory.create(cfg, tmp_path)
    calls = 0

    def drop_round_2(reply: Message) -> Message | None:  # node 1 answers first in each round
        nonlocal calls
        calls += 1
        return None if calls == 2 else reply

    grid = InProcessGrid(client_app, 1, tamper={1: drop_round_2})
    run_experiment(grid.as_grid(), cfg, run)
    assert [r["status"] for r in run.rounds] == ["initial", "ok", "failed", "ok"]
    assert run.finished


DEAD_ENGINE = (
    "import sys\n"
    "import fedsec.cli as cli\n"
    "from fedsec.client.app import app\n"
    "from fedsec.strategies.inprocess import InProcessGrid\n"
    "cli.inprocess_grid = lambda cfg: InProcessGrid(\n"
    "    app, cfg.data.num_clients, dead=range(1, cfg.data.num_clients + 1)).as_grid()\n"
    "sys.argv[0] = 'fedsec'\n"
    "cli.main()\n"
)


def test_cli_names_the_dead_engine_in_one_line_with_exit_3(tmp_path: Path) -> None:
    (tmp_path / "dead.toml").write_text(
        TINY.format(name="dead", rounds=50)
        + "[server]\nround_timeout = 1.0\nmax_failed_rounds = 3\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", DEAD_ENGINE, "run", "dead.toml", "--engine", "inprocess"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: run stopped: no usable reply in 3 consecutive rounds")
    assert "fedsec run --resume" in lines[-1]
    assert len(lines) <= 1 + 3  # at most one warning per failed round, no tracebacks
    manifest = json.loads((tmp_path / "results" / "dead" / "manifest.json").read_text())
    assert [r["round"] for r in manifest["rounds"]] == [0, 1, 2, 3]
    assert not manifest["finished"]


# --- checkpoint retention --------------------------------------------------------------


def test_keep_checkpoints_keeps_round_0_and_the_newest(tmp_path: Path) -> None:
    cfg = _config(10).replace("experiment", keep_checkpoints=2)
    run = RunDirectory.create(cfg, tmp_path)
    for server_round in range(6):
        run.record_round({"round": server_round}, {"w": torch.full((2,), float(server_round))})
    assert [c["round"] for c in run.checkpoints] == [0, 4, 5]
    files = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert files == [f"round_{r:04d}.safetensors" for r in (0, 4, 5)]
    run.close()
    reopened = RunDirectory.open(run.path)
    assert [r["round"] for r in reopened.rounds] == list(range(6))  # metrics of every round stay
    last, state, _ = reopened.load_last_checkpoint()
    assert last == 5 and torch.equal(state["w"], torch.full((2,), 5.0))


def test_keep_checkpoints_resumes_and_cleans_up_after_a_crash(tmp_path: Path) -> None:
    cfg = _config(2).replace("experiment", keep_checkpoints=1)
    run = RunDirectory.create(cfg, tmp_path)
    run_experiment(InProcessGrid(client_app, 3).as_grid(), cfg, run)
    assert [c["round"] for c in run.checkpoints] == [0, 2]
    run.close()
    # A crash after a checkpoint was written but before its manifest: a stray file.
    stray = run.path / "checkpoints" / "round_0003.safetensors"
    stray.write_bytes(b"partial")
    resumed = RunDirectory.open(run.path)
    resumed.config = cfg.replace("experiment", rounds=4)
    run_experiment(InProcessGrid(client_app, 3).as_grid(), resumed.config, resumed)
    assert [c["round"] for c in resumed.checkpoints] == [0, 4]
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == [
        "round_0000.safetensors",
        "round_0004.safetensors",
    ]
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3, 4]


# --- where runs are written, and malformed run folders ---------------------------------


def test_results_dir_policy(tmp_path: Path) -> None:
    cfg = _config(1)
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cases = {
        "file": "exists and is not a folder",
        "a\x00b": "NUL",
        "x" * 5000: "too long",
        "../escape": "'..' is not allowed",
        "results/../../escape": "'..' is not allowed",
        "link": "is a symlink",
    }
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        for results_dir, words in cases.items():
            with pytest.raises(RunDirectoryError) as err:
                RunDirectory.create(cfg, results_dir)
            assert words in str(err.value) and "\n" not in str(err.value), results_dir[:20]
        assert not (tmp_path.parent / "escape").exists()
        assert list((tmp_path / "real").iterdir()) == []  # nothing written through the link
        # Allowed: relative and absolute folders the user names.
        relative = RunDirectory.create(cfg, "nested/out")
        absolute = RunDirectory.create(cfg, tmp_path / "real")
        assert relative.path == (tmp_path / "nested" / "out" / "r").resolve()
        assert absolute.path == (tmp_path / "real" / "r").resolve()
        relative.close()
        absolute.close()
    finally:
        os.chdir(cwd)
    # A run folder reached through a symlink is not resumed.
    (tmp_path / "runlink").symlink_to(absolute.path)
    with pytest.raises(RunDirectoryError, match="is a symlink"):
        RunDirectory.open(tmp_path / "runlink")


@pytest.mark.parametrize(
    ("results_dir", "words"),
    [
        ("file", "exists and is not a folder"),
        ("x" * 5000, "too long"),
        ("../escape", "'..' is not allowed"),
    ],
)
def test_cli_refuses_bad_results_dir_in_one_line(
    tmp_path: Path, results_dir: str, words: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "c.toml").write_text(TINY.format(name="c", rounds=1))
    result = _fedsec("run", "c.toml", "--results-dir", results_dir, "--engine", "inprocess",
                     cwd=tmp_path)  # fmt: skip
    _one_error_line(result, 2, words)
    assert not (tmp_path.parent / "escape").exists()


def test_cli_refuses_nul_in_config_results_dir(tmp_path: Path) -> None:
    text = TINY.format(name="c", rounds=1).replace(
        "rounds = 1\n", 'rounds = 1\nresults_dir = "a\\u0000b"\n'
    )
    (tmp_path / "c.toml").write_text(text)
    _one_error_line(_fedsec("run", "c.toml", "--engine", "inprocess", cwd=tmp_path), 2, "NUL")
    (tmp_path / "up.toml").write_text(text.replace("a\\u0000b", "../up"))
    _one_error_line(_fedsec("validate", "up.toml", cwd=tmp_path), 2, "'..' is not allowed")


def _recorded_run(tmp_path: Path) -> RunDirectory:
    run = RunDirectory.create(_config(3), tmp_path)
    run.record_round({"round": 0, "status": "initial"}, {"w": torch.zeros(1)})
    run.record_round({"round": 1, "status": "ok"}, {"w": torch.ones(1)})
    run.close()
    return run


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m["checkpoints"][1].update(file="../../etc/passwd"), "checkpoints[1].file"),
        (lambda m: m["checkpoints"][1].update(file="/dev/zero"), "checkpoints[1].file"),
        (lambda m: m["checkpoints"][0].pop("sha256"), "checkpoints[0].sha256"),
        (lambda m: m["checkpoints"].__setitem__(0, "x"), "checkpoints[0] is not an object"),
        (lambda m: m["checkpoints"][1].update(round="1"), "checkpoints[1].round"),
        (lambda m: m["rounds"].__setitem__(1, 7), "rounds[1] has no round number"),
        (lambda m: m.update(rounds={"a": 1}), "must be lists"),
        (lambda m: m["checkpoints"].pop(), "round 1 has no checkpoint"),
        (lambda m: m.update(finished="yes"), "finished"),
        (lambda m: m.update(config=[]), "has no config"),
    ],
)
def test_malformed_manifest_entries_are_one_line_errors(
    tmp_path: Path, edit: Any, words: str
) -> None:
    run = _recorded_run(tmp_path)
    manifest_path = run.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RunDirectoryError) as err:
        RunDirectory.open(run.path)
    assert "malformed manifest" in str(err.value) or "no config" in str(err.value)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_a_malformed_manifest_in_one_line(tmp_path: Path) -> None:
    run = _recorded_run(tmp_path)
    manifest_path = run.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["checkpoints"][1]["file"] = "../../x.safetensors"
    manifest_path.write_text(json.dumps(manifest))
    result = _fedsec("run", "--resume", run.path, "--engine", "inprocess", cwd=tmp_path)
    _one_error_line(result, 2, "malformed manifest", "checkpoints[1].file")


# --- the bench runner and command ------------------------------------------------------


def _fake_job(tmp_path: Path) -> Any:
    from fedsec.strategies.bench import _Job

    return _Job(str(tmp_path), "inprocess", 3, 1)


def test_a_worker_slow_to_exit_after_its_cells_is_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench_fake_workers

    from fedsec.strategies import bench

    monkeypatch.setattr(bench, "EXIT_GRACE_S", 0.5)  # the worker never exits by itself
    events: list[tuple[str, int, str, Any]] = []
    failed = bench._run_workers(
        _fake_job(tmp_path), ["a", "b"], 1, events.append, target=bench_fake_workers.slow_to_exit
    )
    assert failed == {}
    assert sorted(e[2] for e in events if e[0] == "done") == ["a", "b"]


def test_a_worker_dying_mid_cell_fails_that_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench_fake_workers

    from fedsec.strategies import bench

    monkeypatch.setattr(bench, "EXIT_GRACE_S", 0.5)
    failed = bench._run_workers(
        _fake_job(tmp_path), ["a", "b"], 1, lambda _: None, target=bench_fake_workers.dies_mid_cell
    )
    assert set(failed) == {"a", "b"}
    assert "exit 3" in failed["a"]


@pytest.mark.parametrize("option", [("--jobs", "0"), ("--engine", "warp")])
def test_bench_with_a_bad_option_writes_nothing(tmp_path: Path, option: tuple[str, str]) -> None:
    grid = Path(__file__).resolve().parents[1] / "simulations" / "grids" / "quick.toml"
    result = _fedsec("bench", grid, "--results", tmp_path / "out", *option, cwd=tmp_path)
    _one_error_line(result, 2, option[0])
    assert not (tmp_path / "out").exists()


# --- output that is not a terminal -----------------------------------------------------


def test_tables_and_markdown_are_not_wrapped_when_output_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedsec.cli import _print_table, _round_table, console

    assert not console.is_terminal  # pytest captures the output
    rows = [
        {
            "round": r,
            "status": "ok",
            "test_accuracy": 0.5,
            "test_loss": 1.0,
            "train_loss": 1.0,
            "num-accepted": 10,
            "num-sampled": 10,
            "attack_success_rate": 0.1,
            "robust_accuracy": 0.2,
            "dp_epsilon_max": 1.0,
            "dp_epsilon": 2.0,
            "elapsed_s": 1.0,
        }
        for r in range(3)
    ]
    capsys.readouterr()
    _print_table(_round_table(rows, 3))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row
    markdown = "| " + " | ".join(f"column {i}" for i in range(20)) + " |"
    with console.capture() as captured:
        console.print(markdown, highlight=False, markup=False)  # as `fedsec report` prints
    assert captured.get().strip() == markdown


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid:  # field 5 of stat: the process group
                members.append(int(entry.name))
    return members


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_ray_run_and_leaves_no_ray_process(tmp_path: Path) -> None:
    """The original report: Ctrl-C on Flower's simulation engine (Ray). Sent to the
    process group, as a terminal does; Ray's processes must go with the driver."""
    (tmp_path / "long.toml").write_text(TINY.format(name="long", rounds=400))
    process = subprocess.Popen(
        [*FEDSEC, "run", "long.toml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    run_dir = tmp_path / "results" / "long"
    try:
        _wait_for_round(run_dir, process, at_least=1)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, out[-2000:] + err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "fedsec run --resume" in lines[0], err[-3000:]
        assert "starting Flower's simulation engine (Ray)" in out
        _assert_consistent(run_dir)
        deadline = time.monotonic() + 60
        while _group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _group_members(process.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
