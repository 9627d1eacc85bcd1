"""A client's privacy spend survives a restarted process: the durable ledger (issue 16, case 2).

Local DP at noise multiplier 2 on the whole update (q = 1, one step per round)
spends, by the RDP accountant at delta 1e-5, epsilon 2.166, 3.189, 4.011 and
4.729 after 1, 2, 3 and 4 rounds: a budget of 4.37 fits exactly 3 rounds (the
figures of the issue's reproduction).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
from fedsec.client.app import app as client_app
from fedsec.client.privacy import (
    EPSILON_CAP_KEY,
    LEDGER_DIR_KEY,
    LEDGER_KEY,
    PRIVACY_BUDGET_EXHAUSTED,
    PRIVACY_LEDGER_UNUSABLE,
    STATE_DIR_KEY,
    LedgerUnavailableError,
    ledger_file_name,
    open_node_ledger,
    reconcile,
)
from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig, parse_config
from fedsec.models import make_model
from fedsec.privacy.accounting import epsilon_for_history
from fedsec.privacy.ledger import LEDGER_FORMAT, LedgerFile, LedgerFileError, PrivacyLedger

SIGMA, BUDGET, DELTA = 2.0, 4.37, 1e-5
ROUND = (SIGMA, 1.0, 1)  # one local-DP round: (noise multiplier, sample rate, steps)


def _eps(rounds: int) -> float:
    return epsilon_for_history([ROUND] * rounds, delta=DELTA, accountant="rdp")


def _raw(rounds: int = 6, clients: int = 3, **privacy: Any) -> dict[str, dict[str, Any]]:
    return {
        "experiment": {"name": "durable", "rounds": rounds, "seed": 0},
        "data": {"partition": "iid", "num_clients": clients},
        "client": {"local_epochs": 1},
        # Rounds every client refuses are the point here, not a stopped engine.
        "server": {"max_failed_rounds": 10},
        "privacy": {
            "mode": "local",
            "noise_multiplier": SIGMA,
            "update_clip": 1.0,
            "epsilon_budget": BUDGET,
            "delta": DELTA,
            **privacy,
        },
    }


def _context(**node: Any) -> Context:
    """A node's context as a freshly started process has it: empty state."""
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, **node},
        state=RecordDict(),
        run_config={},
    )


def _train_message(cfg: ExperimentConfig, server_round: int, **extra: str) -> Message:
    model = make_model(cfg.model.name, (1, 8, 8), 10, seed=0)
    config = ConfigRecord(
        {WIRE_CONFIG_KEY: json.dumps(cfg.to_dict()), "server-round": server_round, **extra}
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, message_type=MessageType.TRAIN, dst_node_id=7)


def _history(path: Path) -> list[tuple[float, float, int]]:
    return [tuple(entry) for entry in json.loads(path.read_text())["history"]]


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A deployed node's environment: not a simulation, FLWR_HOME in tmp."""
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path


# ---- the ledger file ----------------------------------------------------------------


def test_ledger_file_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    ledger = PrivacyLedger(BUDGET, DELTA, history=[ROUND, (1.1, 0.05, 30)])
    file = LedgerFile(tmp_path / "partition-3.json", partition=3)
    assert file.load() is None  # no file yet
    file.save(ledger)
    assert file.load() == ledger
    assert (file.path.stat().st_mode & 0o777) == 0o600  # the node's business only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition-3.json"]  # no temp left
    data = json.loads(file.path.read_text())
    assert data["format"] == LEDGER_FORMAT and data["partition"] == 3
    assert data["epsilon_spent"] == pytest.approx(ledger.spent())


def _edit(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**data, **changes}


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda raw, data: raw[: len(raw) // 2], "is not valid JSON"),
        (lambda raw, data: b"[1, 2]", "is not a JSON object"),
        # A budget raised by hand without the digest: refused, not spent from.
        (lambda raw, data: _dump(_edit(data, epsilon_budget=99.0)), "does not match its sha256"),
        (lambda raw, data: _dump(_edit(data, history=[])), "does not match its sha256"),
        (lambda raw, data: _signed(_edit(data, partition=4)), "belongs to partition 4, not 3"),
        (lambda raw, data: _signed(_edit(data, version=9)), "version 1 file"),
        (lambda raw, data: _signed(_edit(data, extra=1)), "has unknown fields extra"),
        (lambda raw, data: _signed({k: v for k, v in data.items() if k != "delta"}), "lacks delta"),
        (lambda raw, data: _signed(_edit(data, history=[[2.0, 1.0]])), "history must be a list"),
        (lambda raw, data: _signed(_edit(data, history=[[-2.0, 1.0, 1]])), "noise_multiplier"),
        (lambda raw, data: _signed(_edit(data, epsilon_budget=0)), "epsilon_budget"),
        (lambda raw, data: raw.replace(b"4.37", b"NaN"), "non-finite number NaN"),
        (lambda raw, data: b"[" * 100_000, "is not valid JSON"),
    ],
)
def test_malformed_or_altered_ledger_files_are_refused(
    tmp_path: Path, mangle: Any, fragment: str
) -> None:
    file = LedgerFile(tmp_path / "partition-3.json", partition=3)
    file.save(PrivacyLedger(BUDGET, DELTA, history=[ROUND]))
    raw = file.path.read_bytes()
    file.path.write_bytes(mangle(raw, json.loads(raw)))
    with pytest.raises(LedgerFileError) as info:
        file.load()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def _signed(data: dict[str, Any]) -> bytes:
    """A file whose digest matches, to reach the checks after it."""
    from fedsec.privacy.ledger import _digest

    body = {k: v for k, v in data.items() if k != "sha256"}
    return json.dumps({**body, "sha256": _digest(body)}).encode()


def test_ledger_file_that_is_not_a_regular_file_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "partition-0.json").symlink_to("/dev/zero")
    with pytest.raises(LedgerFileError, match="is a symbolic link, not a regular file"):
        LedgerFile(tmp_path / "partition-0.json", 0).load()
    (tmp_path / "partition-1.json").mkdir()
    with pytest.raises(LedgerFileError, match="is not a regular file"):
        LedgerFile(tmp_path / "partition-1.json", 1).load()
    os.mkfifo(tmp_path / "partition-2.json")  # would block a plain open()
    with pytest.raises(LedgerFileError, match="is not a regular file"):
        LedgerFile(tmp_path / "partition-2.json", 2).load()


def test_a_config_change_never_resets_or_loosens_the_ledger() -> None:
    stored = PrivacyLedger(BUDGET, DELTA, "rdp", history=[ROUND, ROUND])
    looser = parse_config(_raw(epsilon_budget=100.0, delta=1e-3, accountant="prv"))
    kept = reconcile(stored, looser)
    assert kept.history == stored.history
    assert (kept.epsilon_budget, kept.delta, kept.accountant) == (BUDGET, DELTA, "rdp")
    stricter = parse_config(_raw(epsilon_budget=3.0, delta=1e-6))
    tightened = reconcile(stored, stricter)
    assert (tightened.epsilon_budget, tightened.delta) == (3.0, 1e-6)
    assert tightened.history == stored.history


# ---- a restarted SuperNode keeps its spend ------------------------------------------


def test_a_supernode_restarted_mid_run_keeps_its_spend(deployed: Path) -> None:
    """Two fresh contexts (two processes of one node) with the same state-dir: one ledger."""
    state = deployed / "node-state"
    state.mkdir()
    cfg = parse_config(_raw())
    spent = []
    for server_round in range(1, 6):  # a new process (empty context) every round
        reply = client_app(
            _train_message(cfg, server_round), _context(**{STATE_DIR_KEY: str(state)})
        )
        if server_round <= 3:
            assert not reply.has_error(), reply.error.reason
            spent.append(reply.content["metrics"]["dp_epsilon_max"])
        else:  # the budget fits 3 rounds, across restarts too
            assert reply.has_error() and reply.error.code == PRIVACY_BUDGET_EXHAUSTED
            assert "> budget 4.37" in str(reply.error.reason)
    assert spent == pytest.approx([_eps(1), _eps(2), _eps(3)])
    path = state / "privacy" / ledger_file_name(0)
    assert _history(path) == [ROUND] * 3


def test_a_node_caps_the_budget_a_server_sends(deployed: Path) -> None:
    """A server raising privacy.epsilon_budget in its config cannot pass the node's cap."""
    state = deployed / "node-state"
    state.mkdir()
    cfg = parse_config(_raw(epsilon_budget=1000.0))
    node = {STATE_DIR_KEY: str(state), EPSILON_CAP_KEY: BUDGET}
    trained = 0
    for server_round in range(1, 6):
        reply = client_app(_train_message(cfg, server_round), _context(**node))
        if reply.has_error():
            assert reply.error.code == PRIVACY_BUDGET_EXHAUSTED
            assert "> budget 4.37" in str(reply.error.reason)
        else:
            trained += 1
    assert trained == 3  # what BUDGET fits, not the server's 1000
    # A malformed cap refuses to train rather than run uncapped.
    reply = client_app(_train_message(cfg, 6), _context(**{**node, EPSILON_CAP_KEY: "inf"}))
    assert reply.has_error() and reply.error.code == PRIVACY_LEDGER_UNUSABLE
    assert "epsilon-budget must be a finite number > 0" in str(reply.error.reason)


def test_a_server_sent_folder_is_ignored_outside_a_simulation(deployed: Path) -> None:
    """A curious server naming a fresh folder cannot reset a deployed node's budget."""
    cfg = parse_config(_raw())
    fresh = deployed / "server-chosen"
    fresh.mkdir()
    for server_round in (1, 2):
        msg = _train_message(cfg, server_round, **{LEDGER_DIR_KEY: str(fresh)})
        reply = client_app(msg, _context())  # no state-dir: the node's default folder
        assert not reply.has_error(), reply.error.reason
    assert list(fresh.iterdir()) == []
    default = deployed / "flwr-home" / "fedsec" / "privacy" / ledger_file_name(0)
    assert _history(default) == [ROUND, ROUND]


def test_a_missing_state_dir_is_refused_not_started_fresh(deployed: Path) -> None:
    cfg = parse_config(_raw())
    msg = _train_message(cfg, 1)
    reply = client_app(msg, _context(**{STATE_DIR_KEY: str(deployed / "typo")}))
    assert reply.has_error() and reply.error.code == PRIVACY_LEDGER_UNUSABLE
    assert "state-dir" in str(reply.error.reason) and "not an existing folder" in str(
        reply.error.reason
    )
    assert not (deployed / "typo").exists()


def test_a_tampered_ledger_makes_the_node_refuse_to_train(deployed: Path) -> None:
    state = deployed / "state"
    (state / "privacy").mkdir(parents=True)
    path = state / "privacy" / ledger_file_name(0)
    LedgerFile(path, 0).save(PrivacyLedger(BUDGET, DELTA, history=[ROUND, ROUND, ROUND]))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "history": []}))  # "reset" by hand, digest stale
    cfg = parse_config(_raw())
    msg = _train_message(cfg, 1)
    reply = client_app(msg, _context(**{STATE_DIR_KEY: str(state)}))
    assert reply.has_error() and reply.error.code == PRIVACY_LEDGER_UNUSABLE
    assert "sha256" in str(reply.error.reason) and "refusing to train" in str(reply.error.reason)
    assert "\n" not in str(reply.error.reason)


def test_a_ledger_file_that_lost_rounds_recorded_in_memory_is_refused(deployed: Path) -> None:
    state = deployed / "state"
    state.mkdir()
    cfg = parse_config(_raw())
    context = _context(**{STATE_DIR_KEY: str(state)})
    msg = _train_message(cfg, 1)
    assert not client_app(msg, context).has_error()
    (state / "privacy" / ledger_file_name(0)).unlink()  # deleted while the node runs
    reply = client_app(_train_message(cfg, 2), context)
    assert reply.has_error() and reply.error.code == PRIVACY_LEDGER_UNUSABLE
    assert "lacks rounds this node recorded (0 on disk, 1 in memory" in str(reply.error.reason)


def test_concurrent_rounds_of_one_node_both_count(deployed: Path) -> None:
    """Two messages at once for one node: the lock makes both spends land in the file."""
    state = deployed / "state"
    state.mkdir()
    cfg = parse_config(_raw())
    node = {STATE_DIR_KEY: str(state)}
    loaded = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with open_node_ledger(_context(**node), cfg, {}, 0) as session:
                loaded.set()
                session.ledger.record(*ROUND)
                session.commit()
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    with open_node_ledger(_context(**node), cfg, {}, 0) as first:
        thread = threading.Thread(target=second)
        thread.start()
        # Without the lock the second reads the empty ledger now; with it, it waits.
        loaded.wait(timeout=0.5)
        first.ledger.record(*ROUND)
        first.commit()
    thread.join()
    assert not errors
    assert _history(state / "privacy" / ledger_file_name(0)) == [ROUND, ROUND]


def test_simulation_ledger_folder_missing_or_invisible_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    cfg = parse_config(_raw())
    context = _context()
    missing = {LEDGER_DIR_KEY: str(tmp_path / "privacy")}
    with (
        pytest.raises(LedgerUnavailableError, match="missing although the run has started"),
        open_node_ledger(context, cfg, missing, 0),
    ):
        pass
    elsewhere = {LEDGER_DIR_KEY: str(tmp_path / "x" / "privacy")}
    with (
        pytest.raises(LedgerUnavailableError, match="not visible to this client"),
        open_node_ledger(context, cfg, elsewhere, 0),
    ):
        pass
    # No folder named (a ClientApp called directly): the node's memory, as before.
    with open_node_ledger(context, cfg, {}, 0) as session:
        session.ledger.record(*ROUND)
        session.commit()
    assert LEDGER_KEY in context.state.config_records
    assert not any(tmp_path.iterdir())


# ---- kill -9 and resume (in-process engine in a subprocess) -------------------------

_DRIVER = r"""
import os, signal, sys
from pathlib import Path
from fedsec.client.app import app
from fedsec.config import parse_config
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

mode, where, kill_round, kill_node = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if mode == "create":
    import json
    run = RunDirectory.create(parse_config(json.loads(sys.argv[5])), where)
else:
    run = RunDirectory.open(where)
    run.finished = False
current = [(run.last_round or 0) + 1]

def on_round(metrics):
    current[0] = metrics["round"] + 1

def kill(reply):
    if current[0] == kill_round:  # this node has answered (its spend is committed): kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    return reply

grid = InProcessGrid(app, run.config.data.num_clients, tamper={kill_node: kill})
run_experiment(grid.as_grid(), run.config, run, on_round)
print("finished", run.path)
"""


def _drive(tmp_path: Path, *args: object) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]  # type: ignore[no-any-return]


def test_kill_9_and_resume_continue_each_clients_epsilon_and_keep_refusing(
    tmp_path: Path,
) -> None:
    """SIGKILL mid-round, resume; SIGKILL once the budget refuses, resume: spend continues."""
    raw = json.dumps(_raw(rounds=6))
    # Kill -9 in round 2 right after node 2 (partition 1) answered: partitions 0 and 1
    # have spent round 2, the server never recorded it.
    first = _drive(tmp_path, "create", tmp_path / "results", 2, 2, raw)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    run_dir = tmp_path / "results" / "durable"
    ledgers = [run_dir / "privacy" / ledger_file_name(p) for p in range(3)]
    assert [len(_history(p)) for p in ledgers] == [2, 2, 1]
    before = _rounds(run_dir)
    assert [r["round"] for r in before] == [0, 1]
    assert before[1]["dp_epsilon_max"] == pytest.approx(_eps(1))

    # Resume; kill -9 again in round 5, once every client refuses.
    second = _drive(tmp_path, "resume", run_dir, 5, 3)
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    rounds = _rounds(run_dir)
    assert [r["status"] for r in rounds[1:]] == ["ok", "ok", "ok", "failed"]
    # Round 2 re-ran: partitions 0 and 1 spent a third round, partition 2 a second.
    assert rounds[2]["dp_epsilon_max"] == pytest.approx(_eps(3))  # continued, not _eps(1)
    assert rounds[3]["num-accepted"] == 1  # round 3: only partition 2 still fits
    assert rounds[3]["dp_epsilon_max"] == pytest.approx(_eps(3))

    # Resume to the end: the refused rounds stay refused.
    third = _drive(tmp_path, "resume", run_dir, 0, 0)
    assert third.returncode == 0, third.stderr[-2000:]
    rounds = _rounds(run_dir)
    assert [r["status"] for r in rounds[1:]] == ["ok"] * 3 + ["failed"] * 3
    for path in ledgers:
        history = _history(path)
        assert history == [ROUND] * 3  # the budget fits 3 rounds, in total
        spent = epsilon_for_history(history, delta=DELTA, accountant="rdp")
        assert spent == pytest.approx(json.loads(path.read_text())["epsilon_spent"])
        assert spent <= BUDGET < _eps(4)
    decisions = [
        json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()
    ]
    for line in decisions:
        if line["round"] >= 4:
            reasons = list(line["excluded"].values())
            assert len(reasons) == 3 and all("privacy budget exhausted" in r for r in reasons)


# ---- kill -9 and `fedsec run --resume` on Flower's simulation engine ----------------

_TOML = f"""
[experiment]
name = "durable"
rounds = 6
seed = 0
[data]
partition = "iid"
num_clients = 3
[client]
local_epochs = 3
[server]
max_failed_rounds = 10
[privacy]
mode = "local"
noise_multiplier = {SIGMA}
update_clip = 1.0
epsilon_budget = {BUDGET}
delta = {DELTA}
"""


def _read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return _rounds(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet
        return []


@pytest.mark.simulation
def test_fedsec_run_killed_and_resumed_continues_the_clients_spend(tmp_path: Path) -> None:
    """`fedsec run` SIGKILLed after round 1, then `fedsec run --resume`: epsilon continues."""
    import time

    (tmp_path / "durable.toml").write_text(_TOML)
    env = {**os.environ, "COLUMNS": "200"}
    fedsec = [sys.executable, "-m", "fedsec.cli", "run"]
    run_dir = tmp_path / "results" / "durable"
    # Its own session, so the kill reaches the engine processes it started, and only those.
    proc = subprocess.Popen(
        [*fedsec, "durable.toml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while len(_read_rounds(run_dir)) < 2:  # round 0 and round 1 recorded
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "round 1 was not recorded within 600 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _read_rounds(run_dir)
    ledgers = [run_dir / "privacy" / ledger_file_name(p) for p in range(3)]
    spent_before = [len(_history(path)) for path in ledgers]
    assert max(spent_before) < 3, f"killed after the budget was spent: {spent_before}"

    resumed = subprocess.run(
        [*fedsec, "--resume", str(run_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rounds = _rounds(run_dir)
    first_after = rounds[len(before)]
    # Each client continued its ledger: the next round spent its (L + 1)-th round.
    assert first_after["status"] == "ok"
    assert first_after["dp_epsilon_max"] == pytest.approx(_eps(max(spent_before) + 1))
    assert first_after["dp_epsilon_max"] > max(r.get("dp_epsilon_max", 0) for r in before)
    # In all, 3 rounds' worth per client and never more: once spent, every round refused.
    assert sum(r["status"] == "ok" for r in rounds[1:]) <= 3
    assert [r["status"] for r in rounds[4:]] == ["failed"] * 3
    for path in ledgers:
        history = _history(path)
        assert history == [ROUND] * 3
        assert epsilon_for_history(history, delta=DELTA, accountant="rdp") <= BUDGET
