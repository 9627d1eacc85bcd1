"""Breaks an outside attack found in the issue-16 defenses, kept as regressions.

Each test names the attack; each failed on the defenses as first landed.

* The split SuperLink (:mod:`fedsec.deploy.lan_superlink`) refused ``--host
  0.0.0.0`` by spelling only: ``0``, ``0.0``, ``0x0``, ``*``, ``000.000.000.000``
  and ``::ffff:0.0.0.0`` all bind every interface and put the Control API on the
  LAN. With ``FLWR_INTERNAL_GRPC_CONTROL_API=1`` Flower also starts its gRPC
  Control API on ``--control-api-address`` (default ``0.0.0.0:9093``).
* The node's privacy ledger (:mod:`fedsec.client.privacy`): a server could turn
  a capped node's DP off (``privacy.mode = "none"``), stretch its epsilon cap
  with a large delta (0.5: 27 rounds instead of 3 under a cap of 4.37), and
  knew the DP noise, which was seeded from the config it sends (seed, round,
  partition), so it could subtract it.
* Local work: ``client.local_epochs`` (and ``local_steps``) and ``evasion.steps``
  of adversarial training had no bound, so a server could keep a node training
  for days with one message (2**31 epochs, 2**31 PGD steps per batch); a cap
  in steps was inflated by a batch of the whole partition and ``max_batch 1``;
  solving for the noise of a ``target_epsilon`` looped forever (RDP, 1e17
  steps) or took gigabytes (PRV) before any check ran.
* Exact statistics of DP-protected data: a deployed node under client-side DP
  answered evaluate requests (even after its budget was exhausted) and sent
  its training loss and accuracy, outside the ledger; ten evaluate replies for
  models that always predict class k gave the node's exact label histogram.
* The node's data folder (:func:`fedsec.client.app.node_data_dir`): a
  deployed node loaded its data sets from the config's ``data.data_dir``, a path
  the server chooses, so a server could make it train on (and so expose) data
  in any folder the node can read.

The LAN listener is also probed through uvicorn against Flower's real app
(path tricks that held; a change in uvicorn or Starlette must keep them held).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
from fedsec.client import handlers
from fedsec.client.app import app as client_app
from fedsec.client.privacy import (
    DELTA_CAP_KEY,
    EPSILON_CAP_KEY,
    PRIVACY_BUDGET_EXHAUSTED,
    PRIVACY_LEDGER_UNUSABLE,
    STATE_DIR_KEY,
)
from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig, parse_config
from fedsec.data import SplitData
from fedsec.data import load_dataset as real_load_dataset
from fedsec.deploy import lan_superlink
from fedsec.models import make_model
from fedsec.wire import (
    DATA_DIR_KEY,
    LOCAL_WORK_REFUSED,
    MAX_LOCAL_EXAMPLES_KEY,
    PRIVATE_EVALUATION_REFUSED,
)

# ---- split SuperLink ----------------------------------------------------------------


class _WouldBindError(Exception):
    """Raised instead of binding: the launcher went past its address checks."""


@pytest.fixture
def no_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never bind or start a SuperLink here, whatever the launcher decides."""

    def refuse(host: str, port: int, what: str) -> socket.socket:
        raise _WouldBindError(f"{what} on {host}:{port}")

    monkeypatch.setattr(lan_superlink, "_bind", refuse)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands Flower its own argv


@pytest.mark.parametrize(
    "host", ["0", "0.0", "0x0", "*", "000.000.000.000", "::ffff:0.0.0.0", "[::ffff:0.0.0.0]"]
)
def test_wildcard_admin_address_in_any_spelling_is_refused(
    host: str, no_bind: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        lan_superlink.main(["--fleet-host", "127.0.0.1", "--insecure", "--host", host])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --host") and "every interface" in err


def test_loopback_admin_address_still_passes_the_check(no_bind: None) -> None:
    with pytest.raises(_WouldBindError, match="Control/Runtime"):
        lan_superlink.main(["--fleet-host", "127.0.0.1", "--insecure", "--host", "localhost"])


def test_flowers_legacy_grpc_control_api_is_refused(
    no_bind: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    with pytest.raises(SystemExit) as exc:
        lan_superlink.main(["--fleet-host", "127.0.0.1", "--insecure", "--host", "127.0.0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "FLWR_INTERNAL_GRPC_CONTROL_API" in err and "0.0.0.0:9093" in err


@pytest.fixture(scope="module")
def lan_listener() -> Iterator[tuple[int, list[str]]]:
    """Flower's real SuperLink app behind the LAN filter, served by uvicorn (h11) on loopback.

    Yields the port and the list of paths that reached Flower's app.
    """
    import uvicorn
    from flwr.superlink.main import create_app

    app = create_app()
    reached: list[str] = []

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        reached.append(str(scope.get("path")))
        await app(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(
            lan_superlink.FleetOnly(spy, lan_superlink.fleet_paths()),
            lifespan="off",
            log_level="critical",
            http="h11",
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    yield sock.getsockname()[1], reached
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def _request(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize(
    "target",
    [
        "/v1/control/register-node",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet%2F..%2Fcontrol%2Fstart-run",
        "/v1/control%2Fstart-run",
        "//v1/control/start-run",
        "/v1/fleet/pull-messages/../../control/start-run",
        "/v1/fleet/pull-messages;/../../control/start-run",
        "/V1/CONTROL/start-run",
        "/v1/control/start-run?next=/v1/fleet/pull-messages",
        "http://x/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/%761/runtime/push-messages",
    ],
)
def test_lan_listener_keeps_control_and_runtime_out_through_uvicorn(
    target: str, lan_listener: tuple[int, list[str]]
) -> None:
    port, reached = lan_listener
    reached.clear()
    out = _request(port, target)
    assert out.startswith(b"HTTP/1.1 404") and b"only the Fleet API" in out
    assert reached == []


def test_lan_listener_still_serves_the_fleet_api(lan_listener: tuple[int, list[str]]) -> None:
    port, reached = lan_listener
    reached.clear()
    out = _request(port, "/v1/fleet/pull-messages")
    assert reached == ["/v1/fleet/pull-messages"]
    assert b"only the Fleet API" not in out


# ---- privacy ledger against a curious server -------------------------------------------

BUDGET = 4.37  # fits 3 local-DP rounds at noise multiplier 2, delta 1e-5 (RDP)


def _cfg(**privacy: Any) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "redteam", "rounds": 40, "seed": 0},
            "data": {"partition": "iid", "num_clients": 3},
            "client": {"local_epochs": 1},
            "privacy": {
                "mode": "local",
                "noise_multiplier": 2.0,
                "update_clip": 1.0,
                "epsilon_budget": BUDGET,
                "delta": 1e-5,
                **privacy,
            },
        }
    )


def _message(cfg: ExperimentConfig, server_round: int) -> Message:
    model = make_model(cfg.model.name, (1, 8, 8), 10, seed=0)
    config = ConfigRecord(
        {WIRE_CONFIG_KEY: json.dumps(cfg.to_dict()), "server-round": server_round}
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, message_type=MessageType.TRAIN, dst_node_id=7)


def _context(**node: Any) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, **node},
        state=RecordDict(),
        run_config={},
    )


def _update(reply: Message) -> np.ndarray:
    assert not reply.has_error(), reply.error.reason
    return np.concatenate([a.numpy().ravel() for a in reply.content["arrays"].values()])


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path


def _state(root: Path, name: str) -> str:
    folder = root / name
    folder.mkdir()
    return str(folder)


def test_a_server_cannot_turn_a_capped_nodes_dp_off(deployed: Path) -> None:
    cfg = _cfg(mode="none")
    for cap in ({EPSILON_CAP_KEY: BUDGET}, {DELTA_CAP_KEY: 1e-6}):
        node = {STATE_DIR_KEY: str(deployed), **cap}
        reply = client_app(_message(cfg, 1), _context(**node))
        assert reply.has_error() and reply.error.code == PRIVACY_LEDGER_UNUSABLE
        assert "not privacy mode 'none'" in str(reply.error.reason)
    # A node that caps nothing trains as the server asks (its operator's choice).
    assert not client_app(_message(cfg, 1), _context()).has_error()


def test_a_server_sent_delta_cannot_stretch_a_nodes_epsilon_cap(deployed: Path) -> None:
    """delta 0.5 made every epsilon small: 27 rounds ran under a cap that fits 3."""
    cfg = _cfg(delta=0.5, epsilon_budget=1000.0)
    node = {STATE_DIR_KEY: _state(deployed, "st"), EPSILON_CAP_KEY: BUDGET}
    codes = []
    for server_round in range(1, 6):
        reply = client_app(_message(cfg, server_round), _context(**node))
        codes.append(reply.error.code if reply.has_error() else 0)
    assert codes == [0, 0, 0, PRIVACY_BUDGET_EXHAUSTED, PRIVACY_BUDGET_EXHAUSTED]
    # The node's own delta cap is used when it names one, and a bad one refuses.
    node[DELTA_CAP_KEY] = "2"
    reply = client_app(_message(cfg, 6), _context(**node))
    assert reply.has_error() and reply.error.code == PRIVACY_LEDGER_UNUSABLE
    assert "delta-budget must be a number in (0, 1)" in str(reply.error.reason)


@pytest.mark.parametrize("mode", ["local", "dp-sgd"])
def test_a_server_cannot_reproduce_a_deployed_nodes_dp_noise(deployed: Path, mode: str) -> None:
    """Same message, same data, two nodes: the noise must differ (the server knows the seed)."""
    cfg = _cfg(mode=mode)
    first = _update(
        client_app(_message(cfg, 1), _context(**{STATE_DIR_KEY: _state(deployed, "a")}))
    )
    again = _update(
        client_app(_message(cfg, 1), _context(**{STATE_DIR_KEY: _state(deployed, "b")}))
    )
    assert not np.array_equal(first, again)


def test_simulated_dp_noise_stays_reproducible(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    cfg = _cfg()
    first = _update(client_app(_message(cfg, 1), _context()))
    again = _update(client_app(_message(cfg, 1), _context()))
    assert np.array_equal(first, again)


# ---- the data folder is the node's ------------------------------------------------------


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``data_dir`` of every data set load a client makes (digits ignores it)."""
    seen: list[str] = []

    def recording(name: str, data_dir: Any = "data", *, seed: int = 0) -> SplitData:
        seen.append(str(data_dir))
        return real_load_dataset(name, data_dir, seed=seed)

    monkeypatch.setattr(handlers, "load_dataset", recording)
    return seen


def _data_cfg(data_dir: str) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "redteam", "rounds": 2, "seed": 0},
            "data": {"partition": "iid", "num_clients": 3, "data_dir": data_dir},
            "client": {"local_epochs": 1},
        }
    )


def test_a_server_cannot_choose_a_deployed_nodes_data_folder(
    deployed: Path, loads: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _data_cfg("/home/operator/private-records")
    assert not client_app(_message(cfg, 1), _context()).has_error()
    assert loads == ["data"]  # the node's default, not the server's folder
    assert "not the server's data.data_dir '/home/operator/private-records'" in caplog.text
    # The node's own folder wins, whatever the server sends.
    mine = _state(deployed, "mnist")
    assert not client_app(_message(cfg, 1), _context(**{DATA_DIR_KEY: mine})).has_error()
    assert loads[-1] == mine


def test_a_nodes_data_folder_must_exist(deployed: Path, loads: list[str]) -> None:
    missing = str(deployed / "typo")
    with pytest.raises(ValueError, match=r"^node config data-dir '.*typo' is not an existing"):
        client_app(_message(_data_cfg("data"), 1), _context(**{DATA_DIR_KEY: missing}))
    assert loads == []


def test_a_simulation_loads_from_the_configs_data_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loads: list[str]
) -> None:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    folder = _state(tmp_path, "data")
    assert not client_app(_message(_data_cfg(folder), 1), _context()).has_error()
    assert loads == [folder]


# ---- local work is bounded by the node ---------------------------------------------------


def _work_cfg(**sections: dict[str, Any]) -> ExperimentConfig:
    raw: dict[str, Any] = {
        "experiment": {"name": "redteam", "rounds": 2, "seed": 0},
        "data": {"partition": "iid", "num_clients": 3},
        "client": {"local_epochs": 1, "batch_size": 32},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw)


@pytest.mark.parametrize(
    ("sections", "asked"),
    [
        ({"client": {"local_epochs": 2**31 - 1}}, "client.local_epochs 2147483647, batch size 32"),
        (
            {"client": {"local_steps": 2**31 - 1, "local_epochs": 2**31 - 1}},
            "client.local_steps 2147483647",
        ),
        (
            {"evasion": {"adversarial_training": True, "steps": 2**31 - 1}},
            "2147483647 PGD steps per batch",
        ),
        # One step a round but a batch of the whole partition: 10^4 epochs of 479 examples.
        ({"client": {"local_epochs": 10**4, "batch_size": 479}}, "batch size 479"),
        (
            {"client": {"local_steps": 1, "local_epochs": 10**7}, "privacy": {"mode": "dp-sgd"}},
            None,  # DP-SGD's one step is within any cap
        ),
    ],
)
def test_a_server_cannot_ask_unbounded_local_work(
    deployed: Path, sections: dict[str, Any], asked: str | None
) -> None:
    if "privacy" in sections:
        sections["privacy"]["noise_multiplier"] = 1.0
    node = {STATE_DIR_KEY: str(deployed)}
    reply = client_app(_message(_work_cfg(**sections), 1), _context(**node))
    if asked is None:
        assert not reply.has_error(), reply.error.reason
        return
    assert reply.has_error() and reply.error.code == LOCAL_WORK_REFUSED
    assert asked in reply.error.reason
    assert "max-local-examples, 1000000 examples" in reply.error.reason
    assert "479" not in reply.error.reason or "batch size 479" in asked  # not the data size


def test_a_node_sets_its_own_work_cap(deployed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _work_cfg(client={"local_epochs": 3})  # 3 epochs x 15 batches x 32 = 1440
    reply = client_app(_message(cfg, 1), _context(**{MAX_LOCAL_EXAMPLES_KEY: 1439}))
    assert reply.has_error() and reply.error.code == LOCAL_WORK_REFUSED
    assert not client_app(_message(cfg, 1), _context(**{MAX_LOCAL_EXAMPLES_KEY: 1440})).has_error()
    for bad in (0, "1000", 1e5, True):
        with pytest.raises(ValueError, match="max-local-examples must be an integer >= 1"):
            client_app(_message(cfg, 1), _context(**{MAX_LOCAL_EXAMPLES_KEY: bad}))
    # A simulation's user sets both sides: no cap there.
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    assert not client_app(_message(cfg, 1), _context(**{MAX_LOCAL_EXAMPLES_KEY: 1})).has_error()


def test_a_server_cannot_choose_a_deployed_nodes_batch_cap_or_device(deployed: Path) -> None:
    """client.max_batch = 1 made every step one pass per example."""
    cfg = _work_cfg(client={"max_batch": 1}, experiment={"device": "cpu"})
    assert handlers.node_hardware(cfg, _context()).max_batch == 0
    assert handlers.node_hardware(cfg, _context(**{"max-batch": 4})).max_batch == 4


@pytest.mark.parametrize(
    ("mode", "accountant"), [("dp-sgd", "rdp"), ("dp-sgd", "prv"), ("local", "prv")]
)
def test_validating_a_servers_privacy_target_is_bounded(
    deployed: Path, mode: str, accountant: str
) -> None:
    """Solving for the noise over steps x rounds looped forever (RDP at 1e17 steps) or took
    gigabytes (PRV at 1.4e9 steps) before any of the node's checks ran."""
    epochs = 10**8 if accountant == "rdp" else 1
    raw = {
        "experiment": {"name": "redteam", "rounds": 10**6, "seed": 0},
        "data": {"partition": "iid", "num_clients": 1},
        "client": {"local_epochs": epochs, "batch_size": 1},
        "privacy": {"mode": mode, "target_epsilon": 1.0, "accountant": accountant},
    }
    message = _evaluate_message(_work_cfg())
    message.content["config"][WIRE_CONFIG_KEY] = json.dumps(raw)
    node = _context(**{STATE_DIR_KEY: str(deployed)})
    if accountant == "rdp":
        with pytest.raises(ValueError, match="are more than any run takes"):
            client_app(message, node)
    else:  # a deployed node accounts with RDP (below), which answers at any size
        reply = client_app(message, node)
        assert reply.has_error() and reply.error.code == PRIVATE_EVALUATION_REFUSED


# ---- DP-protected data leaves only as the privatised update ---------------------------


def _evaluate_message(cfg: ExperimentConfig) -> Message:
    message = _message(cfg, 1)
    return Message(message.content, message_type=MessageType.EVALUATE, dst_node_id=7)


@pytest.mark.parametrize(
    ("evaluated_under", "capped"),
    [("local", False), ("dp-sgd", False), ("none", True)],
)
def test_a_dp_protected_node_releases_no_exact_statistics(
    deployed: Path, loads: list[str], evaluated_under: str, capped: bool
) -> None:
    node: dict[str, Any] = {STATE_DIR_KEY: _state(deployed, "st")}
    if capped:  # a capped node's data is protected whatever mode the server names
        node[EPSILON_CAP_KEY] = BUDGET
    cfg = _cfg(mode=evaluated_under)
    # Evaluation is refused before any data is loaded.
    reply = client_app(_evaluate_message(cfg), _context(**node))
    assert reply.has_error() and reply.error.code == PRIVATE_EVALUATION_REFUSED
    assert "protected by differential privacy" in reply.error.reason and loads == []
    if evaluated_under in ("local", "dp-sgd"):
        # A train reply carries the update, its size and the spend: no loss, no accuracy.
        reply = client_app(_message(cfg, 1), _context(**node))
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content["metrics"]
        assert "train_loss" not in metrics and "train_accuracy" not in metrics
        assert metrics["num-examples"] > 0 and "dp_epsilon_max" in metrics


def test_distributed_dp_protects_from_the_server_and_central_dp_does_not(deployed: Path) -> None:
    import dataclasses

    cfg = _cfg(mode="none")
    for mode, protected in (("distributed", True), ("central", False), ("none", False)):
        with_mode = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, mode=mode))
        assert handlers.dp_against_server(with_mode, _context()) is protected, mode


def test_a_node_without_dp_and_a_simulation_keep_their_metrics(
    deployed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _cfg(mode="none")
    reply = client_app(_evaluate_message(plain), _context())
    assert not reply.has_error() and "eval_accuracy" in reply.content["metrics"]
    assert "train_loss" in client_app(_message(plain, 1), _context()).content["metrics"]
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    private = _cfg()
    reply = client_app(_evaluate_message(private), _context())
    assert not reply.has_error() and "eval_loss" in reply.content["metrics"]
    assert "train_accuracy" in client_app(_message(private, 1), _context()).content["metrics"]


def test_a_dp_protected_node_refuses_a_split_whose_sizes_follow_its_labels(
    deployed: Path,
) -> None:
    """30 refusals of Dirichlet rounds (alpha 1e-3, known seeds) gave the node's exact label
    histogram by least squares: each reason named the partition's size."""
    cfg = _cfg(mode="dp-sgd")
    raw = cfg.to_dict()
    raw["data"].update(partition="dirichlet", alpha=0.5, num_clients=2)
    message = _message(cfg, 1)
    message.content["config"][WIRE_CONFIG_KEY] = json.dumps(raw)
    node = {STATE_DIR_KEY: _state(deployed, "st"), EPSILON_CAP_KEY: BUDGET}
    with pytest.raises(ValueError, match="Dirichlet split's sizes depend on its labels"):
        client_app(message, _context(**node))


# ---- distributed DP: the noise is the config's, not the round's --------------------------


def test_a_server_cannot_turn_distributed_dp_noise_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Skellam noise a client added was the round's noise_variance, which the server sends:
    a SecureAggregation built with noise multiplier 0 unmasked the exact mean of updates
    from nodes whose config said distributed DP."""
    from flwr.app import ArrayRecord as Arrays

    from fedsec.aggregation import make as make_rule
    from fedsec.strategies.inprocess import InProcessGrid
    from fedsec.strategies.pipeline import pipeline
    from fedsec.strategies.secagg import SecureAggregation
    from fedsec.strategies.strategy import FedSecStrategy

    raw = {
        "experiment": {"name": "redteam", "rounds": 1, "seed": 0},
        "data": {"partition": "iid", "num_clients": 3},
        "client": {"local_epochs": 1},
        "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "update_clip": 1.0},
        "secagg": {"enabled": True, "weight_cap": 0, "dropout_rate": 0.0, "corrupt_fraction": 0.0},
    }
    cfg = parse_config(raw)
    sent = Arrays(make_model("mlp", (1, 8, 8), 10, seed=0).state_dict())

    def secure_round(noise: float) -> tuple[Any, str]:
        secure = SecureAggregation(
            clip=cfg.secagg.clip,
            weight_cap=0,
            timeout=120.0,
            noise_multiplier=noise,
            norm_bound=1.0,
            dropout_rate=0.0,
            corrupt_fraction=0.0,
        )
        strategy = FedSecStrategy(rule=make_rule("mean"), min_available_nodes=3, secure=secure)
        grid = InProcessGrid(client_app, 3).as_grid()
        config = ConfigRecord({"server-round": 1, WIRE_CONFIG_KEY: json.dumps(cfg.to_dict())})
        new, _ = strategy.train_round(pipeline(grid), grid, 1, sent, config)
        return new, str(secure.last_error)

    noisy, _ = secure_round(1.0)  # what the config says: the round runs
    assert noisy is not None
    silent, error = secure_round(0.0)
    assert silent is None, "nodes sent updates without the config's noise"
    assert "only 0 clients sent masked inputs" in error  # every node refused the round


def test_a_deployed_node_accounts_with_rdp_not_the_servers_prv(
    deployed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PRV's memory grows as the noise falls, which a server-sent target chooses: validating
    target_epsilon 500 over 958 steps ended in MemoryError, on any message, before the
    node's own checks."""
    from fedsec.client.app import config_from_message

    raw = {
        "experiment": {"name": "redteam", "rounds": 1, "seed": 0},
        "data": {"partition": "iid", "num_clients": 3},
        "client": {"local_epochs": 10, "batch_size": 5},
        "privacy": {"mode": "dp-sgd", "accountant": "prv", "target_epsilon": 500.0},
    }
    message = _evaluate_message(_work_cfg())
    message.content["config"][WIRE_CONFIG_KEY] = json.dumps(raw)
    node = _context(**{STATE_DIR_KEY: str(deployed)})
    assert config_from_message(message, node).privacy.accountant == "rdp"
    assert "accounts with 'rdp', not the server's 'prv'" in caplog.text
    reply = client_app(message, node)
    assert reply.has_error() and reply.error.code == PRIVATE_EVALUATION_REFUSED


def test_a_server_cannot_choose_a_deployed_nodes_precision(deployed: Path) -> None:
    """bf16 autocast on a CPU without it slows each step down."""
    cfg = _work_cfg(client={"precision": "bf16"})
    assert handlers.node_hardware(cfg, _context()).precision == "fp32"
    assert handlers.node_hardware(cfg, _context(precision="bf16")).precision == "bf16"
