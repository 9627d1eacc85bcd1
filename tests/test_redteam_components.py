"""Red-team regressions for the new components: dotted names, collusion, the SecAgg mod.

Each test replays an attack found against the components of issue 18 (bring
your own code by dotted name, the simulation's collusion component, the
client SecAgg mod without its pass-through) and checks it now fails. Threat
model (architecture notes; Bonawitz et al. 2017 and Bell et al. 2020 for
SecAgg): the server is honest-but-curious and must never learn one client's
update under secure aggregation; anyone may hold the public CA certificate
and reach a node; some clients are malicious; a deployed node (no
``FEDSEC_SIMULATED_ADVERSARY``) never runs a simulation-only path, and one
client's malformed reply never stops a round.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
from fedsec.client.app import USER_MODULES_KEY, app, config_from_message
from fedsec.client.secagg_mod import SECAGG_REFUSED, SECAGG_REQUIRED_KEY, secagg_mod
from fedsec.config import WIRE_CONFIG_KEY, default_config, parse_config
from fedsec.models import MODELS
from fedsec.registry import DottedNameError, restrict_user_code

TESTS = Path(__file__).resolve().parent

#: The user's own code (tests/byo_user), as a deployment's operator would install it.
USER = {
    "model": {"name": "byo_user.model:build"},
    "data": {
        "dataset": "byo_user.data:stripes",
        "partition": "byo_user.data:blocks",
        "num_clients": 4,
    },
    "client": {"train_fn": "byo_user.train:train", "local_epochs": 1, "batch_size": 16},
}


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process without the simulation switch (a SuperNode's ``flwr-clientapp``)."""
    monkeypatch.delenv(SIMULATED_ADVERSARY_ENV, raising=False)
    # Messages built outside a Flower runtime need a task identity.
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        if getattr(TaskIdentity, attr) is None:
            monkeypatch.setattr(TaskIdentity, attr, value)
    yield


def _node(**config: Any) -> Context:
    node_config = {"partition-id": 0, **config}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _raw(**sections: dict[str, Any]) -> dict[str, Any]:
    raw = default_config().to_dict()
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def _train_message(raw: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict(
        {"config": ConfigRecord({WIRE_CONFIG_KEY: json.dumps(raw), "server-round": 1})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, message_type=MessageType.TRAIN, dst_node_id=1)


# -- 1. dotted names in a config a server sends ------------------------------------------


def _side_effect_module(folder: Path, name: str) -> Path:
    """A module that acts when imported (writes a marker file)."""
    marker = folder / f"{name}.imported"
    (folder / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def factory(*args, **kwargs):\n    return None\n"
    )
    return marker


def test_a_server_cannot_make_a_deployed_node_delete_a_folder(
    deployed: None, tmp_path: Path
) -> None:
    """``data.dataset = "shutil:rmtree"``: the node called ``rmtree(data_dir, seed)``."""
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    raw = _raw(data={"dataset": "shutil:rmtree", "data_dir": str(victim)}, experiment={"seed": 1})
    with pytest.raises(ValueError, match="refused: module 'shutil' is not allowed") as err:
        app(_train_message(raw), _node())
    assert "\n" not in str(err.value)
    assert (victim / "keep.txt").exists()


@pytest.mark.parametrize(
    ("section", "key", "name"),
    [
        ("model", "name", "subprocess:getoutput"),
        ("data", "partition", "os:system"),
        ("client", "train_fn", "builtins:exec"),
        ("model", "name", "fedsec_rt_side_effect:factory"),
    ],
)
def test_a_deployed_node_refuses_dotted_names_before_importing_them(
    deployed: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: str,
    key: str,
    name: str,
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = _side_effect_module(tmp_path, "fedsec_rt_side_effect")
    raw = _raw(**{section: {key: name}})
    with pytest.raises(ValueError, match="refused") as err:
        config_from_message(_train_message(raw), _node())
    assert f"{section}.{key}" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists() and "fedsec_rt_side_effect" not in sys.modules


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("byo_user.train:os.system", "reaches into another module"),  # byo_user.train imports os
        ("byo_user.data:Path", "defined in 'pathlib'"),  # imported there, not defined there
        ("byo_user.data:_patterns", "private attributes"),
        ("byo_user.model:SmallNet.__init__", "private attributes"),
        ("byo_userx.model:build", "module 'byo_userx.model' is not allowed"),
    ],
)
def test_an_allowed_package_is_no_door_to_what_it_imports(
    deployed: None, name: str, why: str
) -> None:
    raw = _raw(model={"name": name})
    with pytest.raises(ValueError, match="refused") as err:
        config_from_message(_train_message(raw), _node(**{USER_MODULES_KEY: "byo_user"}))
    assert why in str(err.value), str(err.value)


def test_the_operators_own_package_resolves_on_a_deployed_node(
    deployed: None, tmp_path: Path
) -> None:
    raw = _raw(**USER)
    raw["data"]["data_dir"] = str(tmp_path)
    with pytest.raises(ValueError, match="'user-modules': none"):  # nothing allowed by default
        config_from_message(_train_message(raw), _node())
    cfg = config_from_message(_train_message(raw), _node(**{USER_MODULES_KEY: " byo_user , x.y"}))
    assert cfg.model.name == "byo_user.model:build"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("os", "standard-library"), ("shutil.x", "standard-library"), ("a..b", "not a module name")],
)
def test_a_node_config_allowing_the_standard_library_is_refused(
    deployed: None, value: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        config_from_message(_train_message(_raw()), _node(**{USER_MODULES_KEY: value}))
    assert "user-modules" in str(err.value) and "\n" not in str(err.value)


def test_a_name_imported_earlier_is_judged_again_under_a_policy() -> None:
    """The registries cache dotted imports; the cache must not bypass the policy."""
    assert MODELS.get("byo_user.model:build").build is not None  # unrestricted: imported
    with restrict_user_code(["lab"]), pytest.raises(DottedNameError, match="not allowed"):
        MODELS.get("byo_user.model:build")
    with restrict_user_code(["byo_user"]):
        assert MODELS.get("byo_user.model:build").build is not None


def test_a_simulation_still_takes_dotted_names_from_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    raw = _raw(**USER)
    raw["data"]["data_dir"] = str(tmp_path)
    assert config_from_message(_train_message(raw), _node()).client.train_fn


# -- 2. the configured attack on a deployed node -------------------------------------------


def _update_norm(raw: dict[str, Any], partition: int) -> float:
    from fedsec.data import DATASETS
    from fedsec.models import make_model

    cfg = parse_config(raw)
    info = DATASETS.get(cfg.data.dataset)
    model = make_model(cfg.model.name, info.input_shape, info.num_classes, seed=0)
    sent = ArrayRecord(model.state_dict())
    reply = app(_train_message(raw, sent), _node(**{"partition-id": partition}))
    back = reply.content.array_records["arrays"]
    return float(
        np.linalg.norm(np.concatenate([(back[k].numpy() - sent[k].numpy()).ravel() for k in sent]))
    )


def test_a_server_cannot_make_a_deployed_node_boost_its_update(deployed: None) -> None:
    """``attack = scaling, boost = 1000``: the node scaled its own update 3,000-fold.

    Under secure aggregation that update would dominate the sum, which the
    server then reads (divided by the boost) as this one client's update.
    """
    from fedsec.attacks.threat import malicious_partitions

    base = {"data": {"num_clients": 3}, "client": {"local_steps": 2}}
    victim = min(malicious_partitions(3, 2, 0))
    honest = _update_norm(_raw(**base), victim)
    attacked = _raw(**base, attack={"name": "scaling", "num_malicious": 2, "boost": 1000.0})
    assert _update_norm(attacked, victim) == pytest.approx(honest, rel=1e-6)


# -- 3. the adversary filter and a malicious client's tags --------------------------------

NODES = 5
COLLUDERS = frozenset({0, 1})  # partitions; nodes 1 and 2


def _plain_app(mods: list[Any]) -> ClientApp:
    client = ClientApp(mods=mods)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        w = msg.content.array_records["arrays"]["w"].numpy() + np.float32(0.1 * (pid + 1))
        record = ArrayRecord({"w": Array(w)})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)

    return client


def _with_metric(key: str, value: Any) -> Callable[[Message], Message]:
    def tamper(reply: Message) -> Message:
        if not reply.has_error() and "metrics" in reply.content.metric_records:
            reply.content.metric_records["metrics"][key] = value
        return reply

    return tamper


@pytest.mark.parametrize("count", [[1.0, 2.0], [3]])
def test_a_colluders_malformed_example_count_does_not_stop_a_secure_round(count: Any) -> None:
    """A tagged masked-input reply whose ``num-examples`` is a list crashed the round."""
    from fedsec.aggregation import make
    from fedsec.simulation import Collusion
    from fedsec.strategies import FedSecStrategy
    from fedsec.strategies.inprocess import InProcessGrid
    from fedsec.strategies.pipeline import pipeline
    from fedsec.strategies.secagg import SecureAggregation

    collusion = Collusion("ipm", malicious=COLLUDERS, params={"epsilon": 2.0})
    secure = SecureAggregation(clip=1.0, weight_cap=0, dropout_rate=0.0)
    grid = InProcessGrid(
        _plain_app([collusion.client_mod(secagg_mod)]),
        NODES,
        tamper={1: _with_metric("num-examples", count)},
    ).as_grid()
    strategy = FedSecStrategy(
        rule=make("mean"),
        min_available_nodes=NODES,
        secure=secure,
        filters=[collusion.server_filter()],
    )
    initial = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    new, _ = strategy.train_round(
        pipeline(grid, strategy.filters), grid, 1, initial, ConfigRecord({"server-round": 1})
    )
    assert new is not None, secure.last_error


# -- 4. the SecAgg mod and plain training requests ------------------------------------------


def _secagg_app(trained: list[int]) -> ClientApp:
    client = ClientApp(mods=[secagg_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        trained.append(1)
        record = msg.content.array_records["arrays"]
        return Message(RecordDict({"arrays": record}), reply_to=msg)

    return client


def _plain_request(message_type: str = MessageType.TRAIN) -> Message:
    arrays = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    return Message(RecordDict({"arrays": arrays}), message_type=message_type, dst_node_id=1)


def test_a_node_that_requires_secagg_never_answers_a_plain_training_request(
    deployed: None,
) -> None:
    """A server asked a SecAgg node for a plain round and got its trained model."""
    trained: list[int] = []
    client = _secagg_app(trained)
    reply = client(_plain_request(), _node(**{SECAGG_REQUIRED_KEY: True}))
    assert reply.has_error() and reply.error.code == SECAGG_REFUSED
    assert SECAGG_REQUIRED_KEY in str(reply.error.reason) and not trained
    # Without the node config a plain round is a plain round (Flower's secaggplus_mod too).
    assert not client(_plain_request(), _node()).has_error() and trained == [1]


def test_a_named_train_action_is_no_way_around_secagg_required(deployed: None) -> None:
    trained: list[int] = []
    client = ClientApp(mods=[secagg_mod])

    @client.train("probe")
    def probe(msg: Message, context: Context) -> Message:
        trained.append(1)
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)

    reply = client(_plain_request("train.probe"), _node(**{SECAGG_REQUIRED_KEY: True}))
    assert reply.has_error() and reply.error.code == SECAGG_REFUSED and not trained


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_a_malformed_secagg_required_refuses_rather_than_reopening_plain_rounds(
    deployed: None, value: Any
) -> None:
    trained: list[int] = []
    reply = _secagg_app(trained)(_plain_request(), _node(**{SECAGG_REQUIRED_KEY: value}))
    assert reply.has_error() and "must be true or false" in str(reply.error.reason)
    assert not trained


def test_validation_never_reads_the_servers_data_folder(
    deployed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation called the operator's data-set factory with ``data.data_dir`` as sent.

    Besides reading where the operator never pointed it, the limits checked
    the wrong data (``batch_size`` against the server's folder) and the errors
    (``NotADirectoryError``, ``FileNotFoundError``) went back to the server: a
    probe of the node's file system.
    """
    from fedsec.data import datasets

    calls: list[str] = []
    original = datasets.load_dataset

    def load_dataset(name: str, data_dir: Any = "data", *, seed: int = 0) -> Any:
        calls.append(str(data_dir))
        return original(name, data_dir, seed=seed)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    mine = tmp_path / "node-data"
    mine.mkdir()
    raw = _raw(**USER)
    raw["data"]["data_dir"] = str(tmp_path / "server-chosen")
    node = _node(**{USER_MODULES_KEY: "byo_user", "data-dir": str(mine)})
    cfg = config_from_message(_train_message(raw), node)
    assert cfg.data.data_dir == str(mine)
    assert calls and set(calls) == {str(mine)}
    # Without data-dir the node's default folder, still never the server's.
    raw["data"]["data_dir"] = str(tmp_path / "other")
    cfg = config_from_message(_train_message(raw), _node(**{USER_MODULES_KEY: "byo_user"}))
    assert cfg.data.data_dir == "data" and str(tmp_path / "other") not in calls
