"""Secure aggregation of a model with integer buffers (BatchNorm's ``num_batches_tracked``).

The server's :class:`~fedsec.strategies.arrays.ArraySpec` puts only the float
arrays into the flat update (``dim`` counts floats); the SecAgg client mod must
mask exactly those, in the record's order, and leave the integer buffers out.
Rounds run over the in-process grid with a plain Flower ClientApp (its own
model with BatchNorm and its own training loop) behind ``secagg_mod``, and the
real server workflow and strategy.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsec.aggregation import make as make_rule
from fedsec.client.secagg_mod import secagg_mod
from fedsec.config import WIRE_CONFIG_KEY, parse_config
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.secagg import SecureAggregation
from fedsec.strategies.strategy import FedSecStrategy

CLIENTS = 4
EXAMPLES = 32
#: The server's counter, distinct from anything a client's training produces.
SERVER_BATCHES = 7


def _net() -> nn.Module:
    # BatchNorm between two float layers: its integer buffer sits mid-record, so
    # a mod that kept it would shift every later float array by one value.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _local_train(arrays: ArrayRecord, partition: int) -> ArrayRecord:
    """The user's own loop: ``partition + 1`` SGD steps on the node's own data."""
    model = _net()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.train()
    gen = torch.Generator().manual_seed(100 + partition)
    x = torch.randn(EXAMPLES, 5, generator=gen) + partition
    y = torch.randint(0, 3, (EXAMPLES,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(partition + 1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return ArrayRecord(model.state_dict())


client_app = ClientApp()


@client_app.train(mods=[secagg_mod])
def _train(msg: Message, context: Context) -> Message:
    trained = _local_train(msg.content.array_records["arrays"], _partition(context))
    metrics = MetricRecord({"num-examples": EXAMPLES})
    return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)


def _partition(context: Context) -> int:
    value = context.node_config["partition-id"]
    assert isinstance(value, int)
    return value


def _global() -> ArrayRecord:
    model = _net()
    state = model.state_dict()
    state["1.num_batches_tracked"].fill_(SERVER_BATCHES)
    return ArrayRecord(state)


def _floats(record: ArrayRecord) -> np.ndarray:
    """The record's float arrays, flattened in its order (the server's ArraySpec layout)."""
    return np.concatenate(
        [a.numpy().astype(np.float32).reshape(-1) for a in record.values() if a.dtype[0] == "f"]
    )


def _round(bucket_size: int) -> tuple[ArrayRecord, ArrayRecord, MetricRecord, Any]:
    raw: dict[str, Any] = {
        "experiment": {"name": "int-buffers", "rounds": 1, "seed": 3},
        "data": {"partition": "iid", "num_clients": CLIENTS},
        # weight_cap 0: every client weighs 1, so the secure mean is the plain mean.
        "secagg": {"enabled": True, "clip": 4.0, "weight_cap": 0},
    }
    if bucket_size:
        raw["aggregation"] = {"rule": "mean", "pre": ["bucketing"], "bucket_size": bucket_size}
    cfg = parse_config(raw)
    workflow = SecureAggregation(clip=cfg.secagg.clip, weight_cap=0, bucket_size=bucket_size)
    strategy = FedSecStrategy(rule=make_rule("mean"), min_available_nodes=CLIENTS, secure=workflow)
    grid = InProcessGrid(client_app, CLIENTS).as_grid()
    arrays = _global()
    wire = ConfigRecord({WIRE_CONFIG_KEY: json.dumps(cfg.to_dict())})
    new, metrics = strategy.train_round(pipeline(grid), grid, 1, arrays, wire, timeout=60.0)
    assert new is not None and metrics is not None, workflow.last_error
    return arrays, new, metrics, cfg


@pytest.mark.parametrize("bucket_size", [0, 2])
def test_secure_round_masks_the_float_arrays_and_keeps_the_servers_counter(
    bucket_size: int,
) -> None:
    """The unmasked mean of the float arrays is the plain mean of the clients' float
    updates; ``num_batches_tracked`` keeps the server's value, dtype and 0-d shape."""
    sent, new, metrics, cfg = _round(bucket_size)
    assert metrics["num-accepted"] == CLIENTS and metrics["num-excluded"] == 0
    assert list(new.keys()) == list(sent.keys())
    updates = np.stack([_floats(_local_train(sent, p)) - _floats(sent) for p in range(CLIENTS)])
    assert np.abs(updates).max() < cfg.secagg.clip  # no coordinate is clipped
    expected = updates.mean(axis=0)
    got = _floats(new) - _floats(sent)
    # Fixed-point encoding: each client's value is off by under one grid step
    # 2 clip / (2**bits - 1), so a mean of n (weight 1 each) by under one step:
    # quantisation_bound(n) / n, 7.5e-9 here (30 bits over [-4, 4]). The server's
    # step global + mean and this test's new - global each round to float32 (half
    # an ulp of the model's largest value, at least 1, each; 2 ulps cover both).
    size = bucket_size or CLIENTS
    params = SecureAggregation(clip=cfg.secagg.clip, bucket_size=bucket_size).sum_params(
        size, expected.size
    )
    step = params.encoder.quantisation_bound(size) / size
    ulp = float(np.finfo(np.float32).eps) * max(1.0, float(np.abs(_floats(sent)).max()))
    tolerance = step + 2 * ulp
    assert np.abs(expected).max() > 100 * tolerance  # the clients did move the model
    error = float(np.abs(got - expected).max())
    print(f"largest error {error:.3g}, tolerance {tolerance:.3g}")
    assert error <= tolerance, error
    counter = new["1.num_batches_tracked"].numpy()
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == SERVER_BATCHES
    # Each client counted its own steps (1..CLIENTS): none of that reached the server.
    trained = _local_train(sent, CLIENTS - 1)["1.num_batches_tracked"].numpy()
    assert int(trained) == SERVER_BATCHES + CLIENTS
    for name in sent:
        assert new[name].dtype == sent[name].dtype and new[name].shape == sent[name].shape


def test_client_vector_has_the_servers_layout_for_every_dtype() -> None:
    """float32/float64 arrays in record order, integer and boolean ones left out: the
    same values the server's ArraySpec reads, and a float array returned as an integer
    one is refused."""
    from fedsec.client.secagg_mod import _flat_update, _masked_size
    from fedsec.secagg.messages import ProtocolError
    from fedsec.strategies.arrays import ArraySpec

    rng = np.random.default_rng(0)
    before: dict[str, np.ndarray] = {
        "w": rng.normal(size=(2, 3)).astype(np.float32),
        "count": np.array(4, dtype=np.int64),
        "b": rng.normal(size=3),  # float64
        "mask": np.array([True, False]),
        "scale": np.array(0.5, dtype=np.float32),  # 0-d float
    }
    after = {k: np.asarray(v + 1 if v.dtype.kind in "fi" else ~v) for k, v in before.items()}
    sent, back = _record(before), _record(after)
    spec = ArraySpec.from_record(sent)
    assert _masked_size(sent) == spec.dim == 10
    update = _flat_update(sent, back)
    server = torch.zeros(spec.dim)
    assert spec.flatten_into(back, server) is None
    server_before = torch.zeros(spec.dim)
    assert spec.flatten_into(sent, server_before) is None
    assert update.dtype == torch.float32
    assert torch.allclose(update, server - server_before)
    assert torch.allclose(update, torch.ones(spec.dim))
    after["b"] = after["b"].astype(np.int64)
    with pytest.raises(ProtocolError, match="'b' differs"):
        _flat_update(sent, _record(after))


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})
