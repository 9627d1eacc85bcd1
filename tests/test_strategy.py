"""FedSecStrategy: reply validation, stacking, the rule, and the server step."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from fedsec import aggregation
from fedsec.strategies import ArraySpec, FedSecStrategy


class FakeGrid:
    """Just enough of a Grid for configure_train: a fixed set of node ids."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return self.node_ids


GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = Array(value)
    return record


def _reply(
    request: Message, arrays: dict[str, np.ndarray] | None, examples: object = 10
) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train_loss": 1.0})})  # type: ignore[dict-item]
    if arrays is not None:
        content["arrays"] = _record(arrays)
    return Message(content=content, reply_to=request)


def _shifted(value: float) -> dict[str, np.ndarray]:
    return {k: v + value for k, v in GLOBAL.items()}


def _strategy(**kwargs: object) -> FedSecStrategy:
    return FedSecStrategy(rule=aggregation.make("mean"), **kwargs)  # type: ignore[arg-type]


def _configure(strategy: FedSecStrategy, nodes: int = 4) -> list[Message]:
    return list(
        strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), FakeGrid(range(1, nodes + 1)))
    )  # type: ignore[arg-type]


def _flat(record: ArrayRecord) -> torch.Tensor:
    spec = ArraySpec.from_record(record)
    out = torch.empty(spec.dim)
    assert spec.flatten_into(record, out) is None
    return out


def test_weighted_mean_of_updates() -> None:
    strategy = _strategy()
    requests = _configure(strategy, nodes=2)
    replies = [
        _reply(requests[0], _shifted(1.0), 1),
        _reply(requests[1], _shifted(3.0), 3),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert torch.allclose(_flat(arrays), torch.full((8,), 2.5))
    assert metrics["num-accepted"] == 2 and metrics["num-excluded"] == 0
    assert strategy.last_report is not None
    assert strategy.last_report.weights == pytest.approx({1: 0.25, 2: 0.75})


def _bad_replies(requests: list[Message]) -> dict[str, Message]:
    nan = _shifted(1.0)
    nan["b"][0] = np.nan
    wrong_shape = {"w": np.zeros((3, 2), dtype=np.float32), "b": GLOBAL["b"]}
    wrong_dtype = {"w": GLOBAL["w"].astype(np.float64), "b": GLOBAL["b"]}
    # Metadata says (2,), the payload holds 5 values.
    five = Array(np.zeros(5, dtype=np.float32))
    lying = _record(_shifted(1.0))
    lying["b"] = Array(dtype="float32", shape=(2,), stype=five.stype, data=five.data)
    liar = _reply(requests[0], None)
    liar.content["arrays"] = lying
    return {
        "NaN": _reply(requests[0], nan),
        "shape": _reply(requests[1], wrong_shape),
        "dtype": _reply(requests[2], wrong_dtype),
        "missing ArrayRecord": _reply(requests[0], None),  # node 4 sends the good one
        "payload": liar,
        "num-examples": _reply(requests[0], _shifted(1.0), examples=-5),
        "extra array": _reply(
            requests[1], {**_shifted(1.0), "extra": np.zeros(1, dtype=np.float32)}
        ),
        "client error": Message(Error(code=3, reason="out of memory"), reply_to=requests[2]),
    }


BAD_KINDS = [
    "NaN",
    "shape",
    "dtype",
    "missing ArrayRecord",
    "payload",
    "num-examples",
    "extra array",
    "client error",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_malformed_reply_is_excluded_not_fatal(kind: str) -> None:
    strategy = _strategy()
    requests = _configure(strategy, nodes=4)
    bad = _bad_replies(requests)[kind]
    good = _reply(requests[3], _shifted(2.0))
    arrays, metrics = strategy.aggregate_train(1, [bad, good])
    assert arrays is not None and metrics is not None
    assert torch.allclose(_flat(arrays), torch.full((8,), 2.0))  # only the good update
    assert metrics["num-excluded"] == 1 and metrics["num-accepted"] == 1
    assert strategy.last_report is not None
    assert list(strategy.last_report.excluded) == [bad.metadata.src_node_id]


def test_reply_from_unsampled_node_is_excluded() -> None:
    strategy = _strategy(fraction_train=0.5, seed=3)
    requests = _configure(strategy, nodes=4)
    sampled = {m.metadata.dst_node_id for m in requests}
    outsider = next(n for n in range(1, 5) if n not in sampled)
    stranger = Message(content=RecordDict(), message_type="train", dst_node_id=outsider)
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(stranger, _shifted(9.0)), _reply(requests[0], _shifted(1.0))]
    )
    assert arrays is not None and metrics is not None
    assert metrics["num-excluded"] == 1
    assert torch.allclose(_flat(arrays), torch.ones(8))


def test_no_usable_reply_keeps_model() -> None:
    strategy = _strategy()
    requests = _configure(strategy, nodes=2)
    arrays, metrics = strategy.aggregate_train(1, [_reply(requests[0], None)])
    assert arrays is None
    assert metrics is not None and metrics["num-excluded"] == 1


def test_server_lr_and_momentum() -> None:
    strategy = _strategy(server_lr=0.5, server_momentum=0.9)
    requests = _configure(strategy, nodes=1)
    arrays, _ = strategy.aggregate_train(1, [_reply(requests[0], _shifted(2.0))])
    assert arrays is not None
    assert torch.allclose(_flat(arrays), torch.full((8,), 1.0))  # 0 + 0.5 * 2
    requests = _configure(strategy, nodes=1)  # global is still GLOBAL (zeros) here
    arrays, _ = strategy.aggregate_train(2, [_reply(requests[0], _shifted(2.0))])
    assert arrays is not None
    # momentum: m = 0.9 * 2 + 2 = 3.8; step 0.5 * 3.8
    assert torch.allclose(_flat(arrays), torch.full((8,), 1.9))
    restored = _strategy(server_lr=0.5, server_momentum=0.9)
    restored.load_state_dict(strategy.state_dict())
    assert restored.momentum_buffer is not None
    assert torch.allclose(restored.momentum_buffer, torch.full((8,), 3.8))


def test_sampling_is_seeded_and_sized() -> None:
    grid = FakeGrid(range(100, 120))
    a = _strategy(fraction_train=0.25, seed=7)
    b = _strategy(fraction_train=0.25, seed=7)
    first = a.sample_nodes(grid, 3, 0.25)  # type: ignore[arg-type]
    assert first == b.sample_nodes(grid, 3, 0.25)  # type: ignore[arg-type]
    assert len(first) == 5 and len(set(first)) == 5
    assert first != a.sample_nodes(grid, 4, 0.25)  # type: ignore[arg-type]


def test_waiting_for_nodes_times_out() -> None:
    strategy = _strategy(min_available_nodes=5, node_wait_timeout=0.1)
    with pytest.raises(TimeoutError, match="only 2 of 5 nodes"):
        strategy.sample_nodes(FakeGrid([1, 2]), 1, 1.0)  # type: ignore[arg-type]
