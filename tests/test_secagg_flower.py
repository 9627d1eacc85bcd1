"""Secure aggregation through the real apps: client mod, server workflow, strategy.

Rounds run over the in-process grid (real ClientApp with its secagg mod, real
ServerApp loop and strategy); a reply "tamper" that returns None plays a node
that vanishes at a given protocol stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsec.aggregation import make as make_rule
from fedsec.checkpoint import load_checkpoint
from fedsec.client.app import app as client_app
from fedsec.client.secagg_mod import MASKED_KEY, SECAGG_KEY, SECAGG_NEXT_KEY, SECAGG_REFUSED
from fedsec.config import WIRE_CONFIG_KEY, ConfigError, ExperimentConfig, parse_config
from fedsec.models import make_model
from fedsec.runs import RunDirectory
from fedsec.secagg.signing import write_key_dir
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.secagg import SecureAggregation
from fedsec.strategies.server_app import build_strategy, run_experiment
from fedsec.strategies.strategy import FedSecStrategy

CLIENTS = 6


def _config(clients: int = CLIENTS, rounds: int = 1, **secagg: Any) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "secure", "rounds": rounds, "seed": 3},
            "data": {"partition": "iid", "num_clients": clients},
            "client": {"local_epochs": 1},
            "secagg": {"enabled": True, "clip": 4.0, **secagg},
        }
    )


def _plain(cfg: ExperimentConfig) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw["secagg"]["enabled"] = False
    return parse_config(raw)


def _run(
    cfg: ExperimentConfig,
    tmp_path: Path,
    tamper: dict[int, Callable[[Message], Message | None]] | None = None,
    dead: tuple[int, ...] = (),
) -> RunDirectory:
    run = RunDirectory.create(cfg, tmp_path)
    grid = InProcessGrid(client_app, cfg.data.num_clients, tamper=tamper, dead=dead)
    run_experiment(grid.as_grid(), cfg, run)
    return run


def _model(run: RunDirectory, round_: int) -> torch.Tensor:
    entry = next(e for e in run.checkpoints if e["round"] == round_)
    state = load_checkpoint(run.path / entry["file"], entry["sha256"])
    return torch.cat([v.reshape(-1).float() for k, v in sorted(state.items()) if "." in k])


def _stage(reply: Message) -> str:
    """Which protocol stage a client's reply answers."""
    if reply.has_error():
        return "error"
    if MASKED_KEY in reply.content.array_records:
        return "masked-input"
    record = reply.content.config_records.get(SECAGG_KEY)
    if record is None:
        return "plain"
    for key, stage in (
        ("c_public", "advertise-keys"),
        ("ciphertexts", "share-keys"),
        ("seed_ids", "unmask"),
        ("signature", "consistency-check"),
    ):
        if key in record:
            return stage
    return "other"


def _vanish_at(stage: str) -> Callable[[Message], Message | None]:
    return lambda reply: None if _stage(reply) == stage else reply


def test_secure_round_gives_the_plain_federated_average(tmp_path: Path) -> None:
    """Same sampling, same local training: the secure mean equals FedAvg's (to quantisation)."""
    cfg = _config(rounds=2)
    secure = _run(cfg, tmp_path / "secure")
    plain = _run(_plain(cfg), tmp_path / "plain")
    assert [r["status"] for r in secure.rounds[1:]] == ["ok", "ok"]
    assert secure.rounds[1]["num-accepted"] == CLIENTS
    assert secure.rounds[1]["secagg_degree"] >= secure.rounds[1]["secagg_threshold"] >= 1
    # Round 2's keys were set up during round 1 (pipelining).
    assert [r["secagg_pipelined"] for r in secure.rounds[1:]] == [0, 1]
    moved = (_model(plain, 2) - _model(plain, 0)).abs().max()
    diff = (_model(secure, 2) - _model(plain, 2)).abs().max()
    # 27-bit grid over [-4, 4] for 6 clients: the error is ~1e-7, far below the moves.
    assert moved > 0.05 and diff < 1e-5, (float(moved), float(diff))
    assert secure.rounds[-1]["test_accuracy"] == pytest.approx(
        plain.rounds[-1]["test_accuracy"], abs=0.01
    )


@pytest.mark.parametrize("stage", ["advertise-keys", "share-keys", "masked-input"])
def test_dropout_before_the_sum_is_recovered(tmp_path: Path, stage: str) -> None:
    """Node 2 vanishes at ``stage``: the round averages the other five, as plain FedAvg would."""
    cfg = _config()
    secure = _run(cfg, tmp_path / "secure", tamper={2: _vanish_at(stage)})
    plain = _run(_plain(cfg), tmp_path / "plain", dead=(2,))
    assert secure.rounds[1]["status"] == "ok"
    assert secure.rounds[1]["num-accepted"] == CLIENTS - 1
    decisions = (secure.path / "decisions.jsonl").read_text()
    assert "no reply" in decisions and stage in decisions
    assert (_model(secure, 1) - _model(plain, 1)).abs().max() < 1e-5


def test_dropout_at_unmask_keeps_the_input(tmp_path: Path) -> None:
    """A node that sent its masked input and then vanished is still in the sum."""
    cfg = _config()
    secure = _run(cfg, tmp_path / "secure", tamper={4: _vanish_at("unmask")})
    plain = _run(_plain(cfg), tmp_path / "plain")
    assert secure.rounds[1]["num-accepted"] == CLIENTS
    assert (_model(secure, 1) - _model(plain, 1)).abs().max() < 1e-5


def test_pipelined_rounds_with_partial_sampling_and_a_node_lost_between_rounds(
    tmp_path: Path,
) -> None:
    """Next-round set-up rides on this round's messages; a node that vanishes while
    answering both (this round's unmask, the next one's share-keys) is recovered in
    this round and left out of the next."""
    cfg = parse_config(
        {
            "experiment": {"name": "pipe", "rounds": 3, "seed": 5},
            "data": {"partition": "iid", "num_clients": 8},
            "client": {"local_epochs": 1, "fraction": 0.75},
            "secagg": {"enabled": True, "clip": 4.0},
        }
    )
    plain = _run(_plain(cfg), tmp_path / "plain")
    grid = InProcessGrid(client_app, cfg.data.num_clients)
    secure = RunDirectory.create(cfg, tmp_path / "secure")
    run_experiment(grid.as_grid(), cfg, secure)
    assert [r["secagg_pipelined"] for r in secure.rounds[1:]] == [0, 1, 1]
    # Finished rounds leave no protocol state (keys, shares) behind on the clients.
    for context in grid.contexts.values():
        assert not [k for k in context.state.config_records if k.startswith(SECAGG_KEY)]
    # Quantisation error (~1e-7) is amplified by training on slightly different models.
    assert (_model(secure, 1) - _model(plain, 1)).abs().max() < 1e-5
    assert (_model(secure, 3) - _model(plain, 3)).abs().max() < 1e-3

    decisions = [json.loads(line) for line in (secure.path / "decisions.jsonl").open()]
    # A node sampled in rounds 1 and 2 vanishes on its first unmask stage for good.
    node = sorted(set(decisions[0]["sampled"]) & set(decisions[1]["sampled"]))[0]
    lost = {"gone": False}

    def vanish_after_first_unmask(reply: Message) -> Message | None:
        if lost["gone"]:
            return None
        if _stage(reply) == "unmask":
            lost["gone"] = True
            return None
        return reply

    broken = _run(cfg, tmp_path / "broken", tamper={node: vanish_after_first_unmask})
    assert [r["status"] for r in broken.rounds[1:]] == ["ok", "ok", "ok"]
    assert broken.rounds[1]["num-accepted"] == 6  # its masked input was already in
    assert broken.rounds[2]["num-accepted"] == 5


def test_too_many_dropouts_abort_and_keep_the_model(tmp_path: Path) -> None:
    """Beyond the threshold the round fails cleanly and the global model stays put."""
    cfg = _config(clients=4, degree=3, threshold=3)
    run = _run(cfg, tmp_path, tamper={1: _vanish_at("masked-input"), 2: _vanish_at("unmask")})
    first = run.rounds[1]
    assert first["status"] == "failed"
    assert "t=3" in first["error"] and "aborted" in first["error"]
    assert torch.equal(_model(run, 1), _model(run, 0))


def test_server_receives_only_masked_vectors(tmp_path: Path) -> None:
    """No reply in a secure round carries a model or per-client training metrics."""
    seen: list[Message] = []

    def record(reply: Message) -> Message:
        seen.append(reply)
        return reply

    cfg = _config()
    _run(cfg, tmp_path, tamper={node: record for node in range(1, CLIENTS + 1)})
    stages = [_stage(m) for m in seen]
    assert stages.count("masked-input") == CLIENTS and "plain" not in stages
    for msg in seen:
        assert "arrays" not in msg.content.array_records
        for metrics in msg.content.metric_records.values():
            assert set(metrics) <= {"dp_epsilon_max"}
        if MASKED_KEY in msg.content.array_records:
            assert msg.content.array_records[MASKED_KEY][MASKED_KEY].numpy().dtype == np.uint32


def test_signed_mode_round(tmp_path: Path) -> None:
    """Malicious-server mode: identities, Ed25519-signed keys, consistency check."""
    keys = tmp_path / "keys"
    write_key_dir(keys, [f"client-{i}" for i in range(4)])
    # 4 clients against a malicious server need every neighbour: t = k = 3.
    cfg = _config(clients=4, signed=True, key_dir=str(keys), dropout_rate=0.0)
    run = _run(cfg, tmp_path / "run")
    assert (run.rounds[1]["secagg_degree"], run.rounds[1]["secagg_threshold"]) == (3, 3)
    assert run.rounds[1]["status"] == "ok" and run.rounds[1]["num-accepted"] == 4
    plain = _run(_plain(cfg), tmp_path / "plain")
    assert (_model(run, 1) - _model(plain, 1)).abs().max() < 1e-5


def test_signed_mode_client_without_key_drops_out(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_key_dir(keys, [f"client-{i}" for i in range(5)])
    (keys / "client-3.pem").unlink()
    cfg = _config(clients=5, signed=True, key_dir=str(keys), degree=4, threshold=3)
    run = _run(cfg, tmp_path / "run")
    assert run.rounds[1]["status"] == "ok" and run.rounds[1]["num-accepted"] == 4


def test_client_mod_refuses_a_bad_request_and_keeps_its_state() -> None:
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config={},
    )
    InProcessGrid(client_app, 1)  # sets the task identity messages need
    msg = Message(
        RecordDict({SECAGG_KEY: ConfigRecord({"stage": "bogus"})}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    reply = client_app(msg, context)
    assert reply.has_error() and reply.error.code == SECAGG_REFUSED
    assert "advertise-keys" in reply.error.reason  # lists the valid stages
    assert SECAGG_KEY not in context.state.config_records


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"aggregation": {"rule": "krum", "f": 1}}, "aggregation.rule", "bucketed"),
        ({"aggregation": {"pre": ["nnm"], "f": 1}}, "aggregation.rule", "individual"),
        (
            {"attack": {"name": "alie", "num_malicious": 2, "knowledge": "omniscient"}},
            "attack.knowledge",
            "colluders",
        ),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1.0}},
            "privacy.mode",
            "local",
        ),
        ({"data": {"num_clients": 2}}, "client.fraction", "at least 3"),
        (
            {"aggregation": {"rule": "median", "pre": ["bucketing"], "bucket_size": 1}},
            "aggregation.bucket_size",
            "at least 2",
        ),
        (
            {"aggregation": {"rule": "median", "pre": ["bucketing"], "bucket_size": 6}},
            "aggregation.bucket_size",
            "fewer than 2 buckets",
        ),
        ({"secagg": {"norm_bound": -1.0}}, "secagg.norm_bound", ">= 0"),
        (
            {"privacy": {"mode": "distributed", "noise_multiplier": 1.0}},
            "secagg.weight_cap",
            "equal weights",
        ),
        ({"secagg": {"bits": 31}}, "secagg", "overflows"),
        ({"secagg": {"signed": True}}, "secagg.key_dir", "key dir"),
        ({"secagg": {"modulus_bits": 16}}, "secagg.modulus_bits", "32 or 64"),
    ],
)
def test_config_refuses_what_secure_aggregation_cannot_do(
    changes: dict[str, dict[str, Any]], field: str, words: str
) -> None:
    raw: dict[str, dict[str, Any]] = {
        "data": {"num_clients": 10},
        "secagg": {"enabled": True},
    }
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(f"{field}:") and words in str(err.value)
    assert "\n" not in str(err.value)


def test_strategy_refuses_a_rule_that_needs_individual_updates() -> None:
    with pytest.raises(ValueError, match="bucketed"):
        FedSecStrategy(rule=make_rule("median"), rule_name="median", secure=SecureAggregation())


@pytest.mark.simulation
def test_signed_secure_aggregation_on_ray(tmp_path: Path) -> None:
    """`fedsec run` on Flower's Ray engine: 4 clients, 2 signed SecAgg+ rounds."""
    keys = tmp_path / "keys"
    write_key_dir(keys, [f"client-{i}" for i in range(4)])
    config = tmp_path / "secure.toml"
    config.write_text(
        "[experiment]\nname = 'secure'\nrounds = 2\n[data]\nnum_clients = 4\n"
        f"[secagg]\nenabled = true\nsigned = true\nkey_dir = '{keys}'\ndropout_rate = 0.0\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", "run", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rounds = json.loads((tmp_path / "results" / "secure" / "metrics.json").read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["initial", "ok", "ok"]
    assert all(r["num-accepted"] == 4 for r in rounds[1:])
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.2


def test_pipelining_across_a_plain_round(tmp_path: Path) -> None:
    """Secure rounds 1 and 3 around a plain round 2: round 3's keys, set up during
    round 1, survive in the clients' state and round 3 runs pipelined."""
    cfg = _config(rounds=3)
    grid = InProcessGrid(client_app, cfg.data.num_clients).as_grid()
    strategy = build_strategy(cfg)
    workflow = strategy.secure
    assert isinstance(workflow, SecureAggregation)
    exchange = pipeline(grid)
    model = make_model("mlp", (1, 8, 8), 10, seed=0)
    arrays = ArrayRecord(model.state_dict())
    wire = ConfigRecord({WIRE_CONFIG_KEY: json.dumps(cfg.to_dict())})
    new, metrics = strategy.train_round(exchange, grid, 1, arrays, wire, next_round=3)
    assert new is not None and metrics is not None and metrics["secagg_pipelined"] == 0
    replies = grid.send_and_receive(strategy.configure_train(2, new, wire, grid))
    plain, _ = strategy.aggregate_train(2, replies)
    assert plain is not None
    new, metrics = workflow.run_round(exchange, grid, strategy, 3, plain, wire)
    assert new is not None, workflow.last_error
    assert metrics["secagg_pipelined"] == 1 and metrics["num-accepted"] == CLIENTS


def test_local_dp_under_secure_aggregation_reports_the_clients_epsilon(tmp_path: Path) -> None:
    """Client-level local DP composes with SecAgg+: noise before masking, epsilon reported."""
    raw = _config(rounds=2).to_dict()
    raw["privacy"].update(mode="local", noise_multiplier=0.5, update_clip=1.0)
    run = _run(parse_config(raw), tmp_path)
    assert [r["status"] for r in run.rounds[1:]] == ["ok", "ok"]
    epsilons = [r["dp_epsilon_max"] for r in run.rounds[1:]]
    assert 0 < epsilons[0] < epsilons[1]  # the ledger grows round after round


def _node(node_config: dict[str, Any]) -> Context:
    InProcessGrid(client_app, 1)  # sets the task identity messages need
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _advertise_request(signed: bool = False) -> ConfigRecord:
    from fedsec.secagg.server import SecAggParams, SecAggServer

    params = SecAggParams.for_round(6, 10, clip=1.0)
    return ConfigRecord(SecAggServer(params, server_round=1).advertise_keys()[1].to_record())


def test_a_failing_next_round_part_keeps_the_current_answer() -> None:
    """Pipelining: the next round's set-up failing must not discard this round's reply."""
    context = _node({"partition-id": 0})
    msg = Message(
        RecordDict(
            {
                SECAGG_KEY: _advertise_request(),
                SECAGG_NEXT_KEY: ConfigRecord({"stage": "bogus"}),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    reply = client_app(msg, context)
    assert not reply.has_error()
    assert "c_public" in reply.content.config_records[SECAGG_KEY]
    assert SECAGG_NEXT_KEY not in reply.content.config_records


def test_a_provisioned_node_refuses_a_server_downgrade(tmp_path: Path) -> None:
    """A node with its own secagg key dir only answers signed rounds."""
    write_key_dir(tmp_path, ["client-0"])
    context = _node({"partition-id": 0, "secagg-key-dir": str(tmp_path)})
    msg = Message(
        RecordDict({SECAGG_KEY: _advertise_request()}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    reply = client_app(msg, context)
    assert reply.has_error() and "only takes part in signed rounds" in reply.error.reason


def test_a_deployed_node_never_borrows_the_server_named_secagg_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signed SecAgg: the server's ``secagg.key_dir`` is a fallback in simulations only.

    That folder may hold every client's private key; a deployed node that read
    its key from it could sign as any other node (the signing mod refuses the
    same, commit 9c7ba67).
    """
    from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
    from fedsec.client.secagg_mod import load_identity
    from fedsec.secagg.messages import ProtocolError

    write_key_dir(tmp_path, ["client-0", "client-1"])
    cfg = _config(signed=True, key_dir=str(tmp_path))
    msg = Message(
        RecordDict({"config": ConfigRecord({WIRE_CONFIG_KEY: json.dumps(cfg.to_dict())})}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    context = _node({"partition-id": 0})
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "0")
    with pytest.raises(ProtocolError, match="secagg-key-dir"):
        load_identity(context, msg)
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    identity, _, trusted = load_identity(context, msg)
    assert identity == "client-0" and set(trusted) == {"client-0", "client-1"}
    # A node's own folder is used whatever the mode.
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "0")
    own = tmp_path / "own"
    write_key_dir(own, ["client-0"])
    identity, _, trusted = load_identity(
        _node({"partition-id": 0, "secagg-key-dir": str(own)}), msg
    )
    assert identity == "client-0" and set(trusted) == {"client-0"}
