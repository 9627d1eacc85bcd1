"""FedSecStrategy adopted by a Flower user: their own ClientApp, model and loop, ``start()``.

The end-to-end test is a ClientApp written as in Flower's quickstart-pytorch
(its own small CNN with BatchNorm, its own training loop, ``@app.train``
returning ``arrays`` + ``metrics`` with ``num-examples``), driven by
``FedSecStrategy(rule=make("krum", f=1)).start(...)`` over fedsec's in-process
grid. The unit tests pin each fix: the rule's name comes from the rule object,
``secure=SecureAggregation(...)`` refuses what it cannot deliver, integer buffers (BatchNorm's
``num_batches_tracked``) and 0-d arrays survive rounds under a robust policy,
and the record keys are configurable as in Flower's ``FedAvg``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from fedsec import aggregation
from fedsec.aggregation.base import AggregationResult, Mean, Rule
from fedsec.aggregation.registry import make_pipeline
from fedsec.data import load_dataset
from fedsec.strategies import ArraySpec, FedSecStrategy, SecureAggregation
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.strategy import rule_label

COUNTER = "bn.num_batches_tracked"


class FakeGrid:
    """Node ids for sampling; records whatever would be sent (nothing, if refused)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        self.sent.extend(messages)
        return []


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = Array(value)
    return record


# A model's record as torch gives it: float weights, a 0-d float, a 0-d int64 counter.
GLOBAL: dict[str, np.ndarray] = {
    "w": np.zeros((2, 3), dtype=np.float32),
    "scale": np.array(1.0, dtype=np.float32),
    COUNTER: np.array(3, dtype=np.int64),
}


def _reply(
    request: Message,
    arrays: dict[str, np.ndarray],
    examples: int = 10,
    *,
    arrays_key: str = "arrays",
    weight_key: str = "num-examples",
) -> Message:
    content = RecordDict(
        {
            arrays_key: _record(arrays),
            "metrics": MetricRecord({weight_key: examples, "train_loss": 0.5}),
        }
    )
    return Message(content=content, reply_to=request)


def _trained(shift: float, counter: int) -> dict[str, np.ndarray]:
    return {
        "w": GLOBAL["w"] + shift,
        "scale": np.array(1.0 + shift, dtype=np.float32),
        COUNTER: np.array(counter, dtype=np.int64),
    }


def _requests(strategy: FedSecStrategy, nodes: int) -> list[Message]:
    grid = FakeGrid(range(1, nodes + 1))
    return list(strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), grid))  # type: ignore[arg-type]


# -- 1. the rule's name comes from the rule ---------------------------------------


def test_rule_name_comes_from_the_rule_object(caplog: pytest.LogCaptureFixture) -> None:
    krum = FedSecStrategy(rule=aggregation.make("krum", f=1))
    assert krum.rule_name == "krum"
    with caplog.at_level(logging.INFO, logger="fedsec"):
        krum.summary()
    assert "rule=krum" in caplog.text and "rule=mean" not in caplog.text
    wrapped = make_pipeline("krum", {"f": 1}, ["nnm"], {"nnm": {"f": 1}})
    assert FedSecStrategy(rule=wrapped).rule_name == "nnm(krum)"
    # A configured name that names the rule (or a rule it wraps) is still accepted ...
    assert FedSecStrategy(rule=wrapped, rule_name="krum").rule_name == "nnm(krum)"
    # ... one that contradicts it is not.
    with pytest.raises(ValueError, match="does not name the rule krum") as err:
        FedSecStrategy(rule=aggregation.make("krum", f=1), rule_name="mean")
    assert "\n" not in str(err.value)


def test_a_rule_must_be_a_rule_object() -> None:
    with pytest.raises(TypeError, match="aggregation Rule"):
        FedSecStrategy(rule=lambda updates, weights: updates.mean(0))  # type: ignore[arg-type]


# -- 2. secure with a non-mean rule is refused, from the object -------------------


class _NamedMean(Rule):
    """Calls itself 'mean' but takes the coordinate-wise maximum."""

    name = "mean"

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        return AggregationResult(aggregate=updates.max(0).values, weights=weights)


@pytest.mark.parametrize(
    "rule",
    [aggregation.make("krum", f=1), aggregation.make("median"), _NamedMean()],
    ids=["krum", "median", "named-mean"],
)
def test_secure_refuses_a_rule_it_would_never_apply(rule: Rule) -> None:
    with pytest.raises(ValueError, match="bucketed") as err:
        FedSecStrategy(rule=rule, secure=SecureAggregation())
    message = str(err.value)
    assert "\n" not in message and rule_label(rule) in message and "SecureAggregation" in message
    # The bucketed mode applies it across the bucket means, and takes it.
    assert FedSecStrategy(rule=rule, secure=SecureAggregation(bucket_size=2)).bucketed


def test_secure_accepts_the_mean() -> None:
    strategy = FedSecStrategy(rule=Mean(), secure=SecureAggregation())
    assert strategy.secure is not None and not strategy.bucketed


def test_secure_refuses_record_keys_its_client_mod_does_not_read() -> None:
    with pytest.raises(ValueError, match="record keys"):
        FedSecStrategy(rule=Mean(), secure=SecureAggregation(), arrayrecord_key="params")


def test_the_old_boolean_flags_are_refused_naming_the_object() -> None:
    for kwargs in ({"secure": True}, {"bucketed": True}):
        with pytest.raises(TypeError, match="SecureAggregation") as err:
            FedSecStrategy(rule=Mean(), **kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


# -- 3. secure never runs plain rounds ----------------------------------------------


def test_secure_start_never_sends_the_model_before_masking() -> None:
    """No node answers the key set-up: the round fails, and no model ever went out."""
    grid = FakeGrid(range(1, 5))
    strategy = FedSecStrategy(rule=Mean(), secure=SecureAggregation(timeout=1.0))
    plain = _record({"w": GLOBAL["w"]})
    result = strategy.start(grid=grid, initial_arrays=plain, num_rounds=1)  # type: ignore[arg-type]
    assert grid.sent and all("fedsec-secagg" in m.content for m in grid.sent)
    assert not any(m.content.array_records for m in grid.sent)  # keys first, the model later
    assert result.train_metrics_clientapp[1]["secagg_aborted"] == 1
    assert len(result.arrays) == 0  # no round completed: no new model


# -- 4. integer buffers and 0-d arrays --------------------------------------------


def test_spec_keeps_integer_buffers_out_of_the_update_and_0d_shapes_exact() -> None:
    spec = ArraySpec.from_record(_record(GLOBAL))
    assert spec.dim == 7  # 6 + the 0-d float; the int64 counter is not an update
    flat = torch.arange(7, dtype=torch.float32)
    record = spec.to_record(flat)
    assert list(record) == list(GLOBAL)
    assert tuple(record["scale"].shape) == () and record["scale"].numpy() == 6.0
    counter = record[COUNTER].numpy()
    assert counter.shape == () and counter.dtype == np.int64 and counter == 3
    # A model's record built from its own output passes the reply checks.
    others: dict[str, np.ndarray] = {}
    out = torch.empty(7)
    assert spec.check(record) is None and spec.flatten_into(record, out, others) is None
    assert torch.equal(out, flat) and others[COUNTER].shape == () and others[COUNTER] == 3


def test_spec_refuses_dtypes_without_a_policy() -> None:
    with pytest.raises(ValueError, match="complex64"):
        ArraySpec.from_record(_record({"z": np.zeros(2, dtype=np.complex64)}))


def test_integer_counter_is_a_median_that_one_liar_cannot_set() -> None:
    strategy = FedSecStrategy(rule=aggregation.make("median"))
    requests = _requests(strategy, 3)
    replies = [
        _reply(requests[0], _trained(1.0, 12)),
        _reply(requests[1], _trained(2.0, 13)),
        _reply(requests[2], _trained(3.0, 2**62)),  # a liar's counter
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["num-accepted"] == 3
    counter = arrays[COUNTER].numpy()
    assert counter.shape == () and counter.dtype == np.int64 and int(counter) == 13
    assert tuple(arrays["scale"].shape) == () and float(arrays["scale"].numpy()) == 3.0
    # A liar who sends it backwards cannot undo the count either: never below the server's.
    requests = _requests(strategy, 2)
    replies = [
        _reply(requests[0], _trained(1.0, 12)),
        _reply(requests[1], _trained(1.0, -(2**62))),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and int(arrays[COUNTER].numpy()) == 3


def _counter_as(value: np.ndarray) -> dict[str, np.ndarray]:
    return {**_trained(1.0, 0), COUNTER: value}


def test_reply_with_a_wrong_integer_buffer_is_excluded(caplog: pytest.LogCaptureFixture) -> None:
    strategy = FedSecStrategy(rule=Mean())
    requests = _requests(strategy, 5)
    one = Array(np.array([7], dtype=np.int64))
    lying = _record(_trained(1.0, 7))  # metadata says 0-d, the payload holds shape (1,)
    lying[COUNTER] = Array(dtype="int64", shape=(), stype=one.stype, data=one.data)
    replies = [
        _reply(requests[0], _trained(1.0, 7)),
        _reply(requests[1], _counter_as(np.array(7, dtype=np.int32))),
        _reply(requests[2], _counter_as(np.array([7], dtype=np.int64))),
        _reply(requests[3], _counter_as(np.array(7.0, dtype=np.float64))),
        Message(
            RecordDict({"arrays": lying, "metrics": MetricRecord({"num-examples": 10})}),
            reply_to=requests[4],
        ),
    ]
    with caplog.at_level(logging.WARNING, logger="fedsec"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert strategy.last_report is not None and strategy.last_report.accepted == [1]
    excluded = strategy.last_report.excluded
    assert "dtype" in excluded[2] and "shape" in excluded[3] and "dtype" in excluded[4]
    assert "payload has shape (1,)" in excluded[5]
    assert "excluded node 5" in caplog.text
    assert int(arrays[COUNTER].numpy()) == 7


# -- 5. record keys as in Flower's FedAvg ------------------------------------------


def test_record_keys_are_configurable_and_default_to_flowers() -> None:
    default = FedSecStrategy(rule=Mean())
    assert (default.arrayrecord_key, default.configrecord_key, default.weighted_by_key) == (
        "arrays",
        "config",
        "num-examples",
    )
    strategy = FedSecStrategy(
        rule=Mean(), arrayrecord_key="params", configrecord_key="cfg", weighted_by_key="n"
    )
    requests = _requests(strategy, 3)
    assert set(requests[0].content) == {"params", "cfg"}
    replies = [
        _reply(requests[0], _trained(1.0, 5), 1, arrays_key="params", weight_key="n"),
        _reply(requests[1], _trained(4.0, 5), 3, arrays_key="params", weight_key="n"),
        _reply(requests[2], _trained(9.0, 5), 3),  # Flower's default keys: not this strategy's
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert strategy.last_report is not None and strategy.last_report.accepted == [1, 2]
    assert "ArrayRecord 'params'" in strategy.last_report.excluded[3]
    assert np.allclose(arrays["w"].numpy(), 3.25)  # (1 * 1 + 3 * 4) / 4
    assert "n" not in metrics and "client_n" not in metrics  # the weight is not a metric
    evaluation = [
        Message(RecordDict({"metrics": MetricRecord({"n": 2, "eval_accuracy": 0.5})}), reply_to=r)
        for r in requests[:2]
    ]
    assert strategy.aggregate_evaluate(1, evaluation) == MetricRecord({"eval_accuracy": 0.5})


# -- end to end: a Flower user's app ------------------------------------------------

NUM_NODES = 5
BATCH = 32
SEED = 7


class Net(nn.Module):
    """The user's own CNN for 8x8 digits, with BatchNorm and a 0-d learnable scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1)) * self.scale


def _partition(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", seed=SEED)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(SEED))
    part = order[partition_id::NUM_NODES]
    return data.train_x[part], data.train_y[part]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """The user's own loop: one epoch of SGD with momentum, mini-batches of 32."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    total = 0.0
    for batch in torch.randperm(len(y), generator=generator).split(BATCH):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(y)


user_app = ClientApp()


@user_app.train()
def train(msg: Message, context: Context) -> Message:
    """As in Flower's quickstart-pytorch."""
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    x, y = _partition(partition_id)
    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    loss = _train(model, x, y, seed=SEED * 1000 + server_round * 10 + partition_id)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _accuracy(arrays: ArrayRecord) -> float:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    data = load_dataset("digits", seed=SEED)
    with torch.no_grad():
        return float((model(data.test_x).argmax(1) == data.test_y).float().mean())


def _counter_liar(reply: Message) -> Message:
    """A client that trains honestly but claims 2**62 BatchNorm batches."""
    arrays = reply.content.array_records["arrays"]
    arrays[COUNTER] = Array(np.array(2**62, dtype=np.int64))
    return reply


def test_flower_quickstart_app_trains_under_krum_with_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(SEED)
    initial = ArrayRecord(Net().state_dict())
    assert initial[COUNTER].dtype == "int64" and tuple(initial[COUNTER].shape) == ()
    grid = InProcessGrid(user_app, NUM_NODES, tamper={NUM_NODES: _counter_liar})
    strategy = FedSecStrategy(rule=aggregation.make("krum", f=1), seed=SEED)
    with caplog.at_level(logging.INFO, logger="fedsec"):
        result = strategy.start(grid=grid.as_grid(), initial_arrays=initial, num_rounds=3)

    assert "rule=krum" in caplog.text and "rule=mean" not in caplog.text
    # Every reply in every round passed the layout checks (none lost to a shape or dtype).
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    for metrics in result.train_metrics_clientapp.values():
        assert metrics["num-accepted"] == NUM_NODES and metrics["num-excluded"] == 0
    final = result.arrays
    assert tuple(final["scale"].shape) == () and final["scale"].dtype == "float32"
    counter = final[COUNTER].numpy()
    assert counter.shape == () and counter.dtype == np.int64
    # Each honest client runs ceil(~288 / 32) = 9 batches a round: the counter is the
    # median client's count, 3 * 9, whatever the liar claims.
    assert int(counter) == 3 * 9
    # Chance is 10%; a user's CNN under Krum is far above it after 3 rounds.
    accuracy = _accuracy(final)
    assert accuracy > 0.6, f"accuracy {accuracy:.3f} after 3 rounds"
