"""The server-side pipeline: filters over an exchange of messages, outermost first.

Each filter sees the messages going out and the replies coming back
(:mod:`fedsec.strategies.pipeline`); ``FedSecStrategy`` sends every exchange
of ``start()`` through its filters.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsec.aggregation import make as make_rule
from fedsec.strategies import FedSecStrategy
from fedsec.strategies.pipeline import Exchange, grid_exchange, pipeline
from fedsec.strategies.transport import send_and_receive


class EchoGrid:
    """Answers every message with a copy of its content; counts what it sent."""

    def __init__(self, nodes: Iterable[int] = (1, 2, 3)) -> None:
        self.nodes = list(nodes)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            out.append(Message(RecordDict(dict(msg.content.items())), reply_to=msg))
        return out


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [
        Message(
            RecordDict({"config": ConfigRecord({"x": node})}),
            message_type=MessageType.TRAIN,
            dst_node_id=node,
            group_id="1",
        )
        for node in nodes
    ]


class Tracer:
    """A filter that logs when it sees the messages and the replies."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def __call__(self, messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        self.log.append(f"{self.name}>")
        replies = next(messages, timeout)
        self.log.append(f"<{self.name}")
        return replies


def test_filters_run_outermost_first_and_see_replies_in_reverse() -> None:
    log: list[str] = []
    exchange = pipeline(EchoGrid(), [Tracer("a", log), Tracer("b", log)])  # type: ignore[arg-type]
    replies = exchange(_messages([1, 2]), 5.0)
    assert log == ["a>", "b>", "<b", "<a"]
    assert [r.metadata.src_node_id for r in replies] == [1, 2]


def test_no_filter_is_the_grid_exchange() -> None:
    grid = EchoGrid()
    for exchange in (pipeline(grid), grid_exchange(grid)):  # type: ignore[arg-type]
        replies = exchange(_messages([3]), 5.0)
        assert [r.metadata.src_node_id for r in replies] == [3]
    assert len(grid.sent) == 2


def test_an_outer_filter_sees_what_an_inner_filter_kept_and_its_extra_messages() -> None:
    """An inner filter drops node 2's reply; an outer one sends a follow-up through the rest."""
    grid = EchoGrid()
    inner_saw: list[int] = []

    def drop_node_2(messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        inner_saw.extend(m.metadata.dst_node_id for m in messages)
        return [r for r in next(messages, timeout) if r.metadata.src_node_id != 2]

    def ask_again(messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        replies = next(messages, timeout)
        missing = {m.metadata.dst_node_id for m in messages} - {
            r.metadata.src_node_id for r in replies
        }
        return replies + next(_messages(sorted(missing)), timeout)

    exchange = pipeline(grid, [ask_again, drop_node_2])  # type: ignore[arg-type]
    replies = exchange(_messages([1, 2, 3]), 5.0)
    # The follow-up to node 2 went through the inner filter too (and was dropped again).
    assert inner_saw == [1, 2, 3, 2]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 3]
    assert len(grid.sent) == 4


def test_the_timeout_reaches_the_grid() -> None:
    seen: list[float | None] = []

    class TimedGrid(EchoGrid):
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> list[Message]:
            seen.append(timeout)
            return super().send_and_receive(messages, timeout=timeout)

    pipeline(TimedGrid(), [Tracer("a", [])])(_messages([1]), 7.5)  # type: ignore[arg-type]
    assert seen == [7.5]
    assert send_and_receive(TimedGrid(), _messages([1]), timeout=2.0)  # type: ignore[arg-type]
    assert seen == [7.5, 2.0]


# -- the strategy sends every exchange through its filters -----------------------------


class TrainingGrid(EchoGrid):
    """Nodes that reply to training with the global model plus one, to evaluation with a loss."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            metrics = MetricRecord({"num-examples": 10, "eval_loss": 1.0})
            if msg.metadata.message_type == MessageType.TRAIN:
                w = msg.content.array_records["arrays"]["w"].numpy() + 1.0
                content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": metrics})
            else:
                content = RecordDict({"metrics": metrics})
            out.append(Message(content, reply_to=msg))
        return out


def test_start_sends_training_and_evaluation_through_the_filters() -> None:
    log: list[str] = []

    def kinds(messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        log.append(f"{messages[0].metadata.message_type}:{len(messages)}")
        return next(messages, timeout)

    strategy = FedSecStrategy(rule=make_rule("mean"), fraction_evaluate=1.0, filters=[kinds])
    initial = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    result = strategy.start(grid=TrainingGrid(), initial_arrays=initial, num_rounds=2)  # type: ignore[arg-type]
    assert log == ["train:3", "evaluate:3", "train:3", "evaluate:3"]
    assert np.array_equal(result.arrays["w"].numpy(), np.full(3, 2.0, dtype=np.float32))
    assert result.evaluate_metrics_clientapp[2]["eval_loss"] == 1.0


def test_a_filter_that_drops_replies_shapes_the_round() -> None:
    def keep_node_1(messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        return [r for r in next(messages, timeout) if r.metadata.src_node_id == 1]

    strategy = FedSecStrategy(rule=make_rule("mean"), filters=[keep_node_1])
    initial = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    result = strategy.start(grid=TrainingGrid(), initial_arrays=initial, num_rounds=1)  # type: ignore[arg-type]
    assert result.train_metrics_clientapp[1]["num-accepted"] == 1
    assert strategy.last_report is not None and strategy.last_report.accepted == [1]


def test_filters_must_be_callables() -> None:
    with pytest.raises(TypeError, match="filters must be callables"):
        FedSecStrategy(rule=make_rule("mean"), filters=["verify"])  # type: ignore[list-item]
