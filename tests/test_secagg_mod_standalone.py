"""``secagg_mod`` in a plain Flower ClientApp: no fedsec config on the wire.

A Flower user's app has its own model and training loop and knows nothing of
fedsec's JSON experiment config. Its train handler, behind
``ClientApp(mods=[secagg_mod])``, must take part in a secure round driven by
:class:`~fedsec.strategies.secagg.SecureAggregation` and
``FedSecStrategy(secure=SecureAggregation(...))`` from the protocol's own messages alone: the
weight cap travels in the masked-input request, validated by the mod.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from fedsec.aggregation import make as make_rule
from fedsec.client.secagg_mod import SECAGG_KEY, SECAGG_REFUSED, secagg_mod
from fedsec.config import WIRE_CONFIG_KEY
from fedsec.secagg.messages import MAX_WEIGHT_CAP, MaskedInputRequest
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.secagg import SecureAggregation
from fedsec.strategies.strategy import FedSecStrategy

#: Each node's example count: with a cap of 32 the weights are 1/4, 1/2, 1, 1.
EXAMPLES = (8, 16, 40, 64)
CLIENTS = len(EXAMPLES)
CAP = 32
CLIP = 4.0

#: Every config record key the user's train handler was shown (none may be fedsec's).
seen: list[set[str]] = []


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _local_train(arrays: ArrayRecord, partition: int) -> ArrayRecord:
    """The user's own loop: a few SGD steps on the node's own data."""
    model = _net()
    model.load_state_dict(arrays.to_torch_state_dict())
    gen = torch.Generator().manual_seed(10 + partition)
    n = EXAMPLES[partition]
    x = torch.randn(n, 4, generator=gen) + 2 * partition
    y = torch.randint(0, 2, (n,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return ArrayRecord(model.state_dict())


app = ClientApp(mods=[secagg_mod])


@app.train()
def _train(msg: Message, context: Context) -> Message:
    seen.append({k for record in msg.content.config_records.values() for k in record})
    partition = context.node_config["partition-id"]
    assert isinstance(partition, int)
    trained = _local_train(msg.content.array_records["arrays"], partition)
    metrics = MetricRecord({"num-examples": EXAMPLES[partition]})
    return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float32).reshape(-1) for a in record.values()])


def _round(weight_cap: int) -> tuple[ArrayRecord, ArrayRecord, SecureAggregation]:
    """One secure round of the plain app; the config sent holds the round number only."""
    seen.clear()
    workflow = SecureAggregation(clip=CLIP, weight_cap=weight_cap, timeout=60.0)
    strategy = FedSecStrategy(rule=make_rule("mean"), min_available_nodes=CLIENTS, secure=workflow)
    grid = InProcessGrid(app, CLIENTS).as_grid()
    sent = ArrayRecord(_net().state_dict())
    config = ConfigRecord({"server-round": 1})
    new, _ = strategy.train_round(pipeline(grid), grid, 1, sent, config)
    assert new is not None, workflow.last_error
    assert len(seen) == CLIENTS  # every node trained once, at masked input
    assert not any(WIRE_CONFIG_KEY in keys for keys in seen), seen
    return sent, new, workflow


def _tolerance(sent: ArrayRecord, dim: int, total_weight: float) -> float:
    """Fixed-point error of a weighted mean of ``CLIENTS`` encodings, plus float32 rounding.

    The sums of the weighted updates and of the weights are each off by under
    ``quantisation_bound(n)`` (the weight's scaled by ``clip``); with every
    coordinate of the mean under ``clip`` both errors together stay under
    twice that bound over the total weight. The server's global + mean and
    this test's new - global each round to float32 (2 ulps cover both).
    """
    params = SecureAggregation(clip=CLIP).sum_params(CLIENTS, dim)
    ulp = float(np.finfo(np.float32).eps) * max(1.0, float(np.abs(_flat(sent)).max()))
    return 2 * params.encoder.quantisation_bound(CLIENTS) / total_weight + 2 * ulp


def _updates(sent: ArrayRecord) -> np.ndarray:
    return np.stack([_flat(_local_train(sent, p)) - _flat(sent) for p in range(CLIENTS)])


def test_plain_flower_app_runs_a_secure_round_with_equal_weights() -> None:
    """weight_cap 0: the unmasked mean is the plain mean of the clients' updates."""
    sent, new, _ = _round(0)
    updates = _updates(sent)
    assert np.abs(updates).max() < CLIP  # no coordinate is clipped
    expected = updates.mean(axis=0)
    tolerance = _tolerance(sent, expected.size, float(CLIENTS))
    assert np.abs(expected).max() > 100 * tolerance  # the clients did move the model
    error = float(np.abs(_flat(new) - _flat(sent) - expected).max())
    assert error <= tolerance, (error, tolerance)


def test_weight_cap_in_the_request_weighs_by_capped_example_counts() -> None:
    """weight_cap 32: client weights are min(n, 32) / 32 (1/4, 1/2, 1, 1), not equal."""
    sent, new, _ = _round(CAP)
    updates = _updates(sent)
    weights = np.array([min(n, CAP) / CAP for n in EXAMPLES])
    expected = (weights[:, None] * updates).sum(axis=0) / weights.sum()
    tolerance = _tolerance(sent, expected.size, float(weights.sum()))
    # The equal-weight mean is far off: the weights did reach the clients.
    assert np.abs(updates.mean(axis=0) - expected).max() > 100 * tolerance
    error = float(np.abs(_flat(new) - _flat(sent) - expected).max())
    assert error <= tolerance, (error, tolerance)


@pytest.mark.parametrize("bad", [-1, MAX_WEIGHT_CAP + 1, "32", 2.5, True])
def test_malformed_weight_cap_is_refused_in_one_line(bad: Any) -> None:
    """A masked-input request whose weight_cap is not an integer in [0, 2**53] is refused."""
    InProcessGrid(app, 1)  # sets the task identity messages need
    record = MaskedInputRequest(session=bytes(16), round=1, weight_cap=CAP).to_record()
    record["weight_cap"] = bad
    msg = Message(
        RecordDict({SECAGG_KEY: ConfigRecord(record)}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    seen.clear()
    reply = app(msg, context)
    assert reply.has_error() and reply.error.code == SECAGG_REFUSED
    reason = str(reply.error.reason)
    assert "weight_cap" in reason and "\n" not in reason, reason
    assert reason.startswith("masked-input: "), reason
    assert not seen  # refused before the user's training ran
