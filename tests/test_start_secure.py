"""``FedSecStrategy.start()`` drives every server-side defense of a plain Flower app.

The app is written as a Flower user writes one (its own tiny model, data and
loop, ``@app.train`` returning ``arrays`` + ``metrics``); fedsec's parts are
adopted where they are created: ``ClientApp(mods=[secagg_mod])`` or
``mods=[signing(...)]`` on the client, ``FedSecStrategy(rule=...,
secure=SecureAggregation(...), filters=[...])`` on the server. The in-process
grid is the transport; a tamper on it is a spy on the wire, seeing every reply
exactly as the node sent it, before any server-side filter.

Issue 18, item 2: secure aggregation used to be refused by ``start()`` (and
before that silently ran plain rounds, reading every trained model in the
clear); these tests pin that ``start()`` now runs real secure rounds, plain
and bucketed, and that the signature filter applies to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from fedsec.aggregation import make as make_rule
from fedsec.client.mods import signing
from fedsec.client.secagg_mod import MASKED_KEY, secagg_mod
from fedsec.client.signing_mod import SIGNATURE_KEY
from fedsec.deploy.signatures import load_registry
from fedsec.secagg.signing import write_key_dir
from fedsec.strategies import FedSecStrategy, SecureAggregation, SignatureFilter
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import Exchange

EXAMPLES = 16  # every node holds as many examples: a weighted mean is the plain mean
CLIP = 4.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _local_train(arrays: ArrayRecord, partition: int) -> ArrayRecord:
    """The user's own loop: a few SGD steps on the node's own synthetic data."""
    model = _net()
    model.load_state_dict(arrays.to_torch_state_dict())
    gen = torch.Generator().manual_seed(10 + partition)
    x = torch.randn(EXAMPLES, 4, generator=gen) + partition % 3
    y = torch.randint(0, 2, (EXAMPLES,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return ArrayRecord(model.state_dict())


def _make_app(mods: list[Mod]) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        partition = context.node_config["partition-id"]
        assert isinstance(partition, int)
        trained = _local_train(msg.content.array_records["arrays"], partition)
        metrics = MetricRecord({"num-examples": EXAMPLES})
        return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": EXAMPLES, "eval_loss": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float64).reshape(-1) for a in record.values()])


class WireSpy:
    """Sees every reply on the wire as its node sent it (an InProcessGrid tamper)."""

    def __init__(self) -> None:
        self.replies: list[Message] = []

    def __call__(self, reply: Message) -> Message:
        self.replies.append(reply)
        return reply

    def models(self) -> list[Message]:
        """Replies that carry a model in the clear."""
        return [r for r in self.replies if not r.has_error() and "arrays" in r.content]

    def masked(self) -> list[Message]:
        return [r for r in self.replies if not r.has_error() and MASKED_KEY in r.content]


def _spied_grid(app: ClientApp, nodes: int) -> tuple[InProcessGrid, WireSpy]:
    spy = WireSpy()
    return InProcessGrid(app, nodes, tamper={n: spy for n in range(1, nodes + 1)}), spy


def _plain_mean_update(sent: ArrayRecord, nodes: int) -> np.ndarray:
    updates = [_flat(_local_train(sent, p)) - _flat(sent) for p in range(nodes)]
    return np.asarray(np.mean(updates, axis=0))


# -- secure aggregation through start() ---------------------------------------------------


def test_start_with_secure_runs_masked_rounds_and_no_model_reaches_the_server() -> None:
    nodes = 4
    grid, spy = _spied_grid(_make_app([secagg_mod]), nodes)
    secure = SecureAggregation(clip=CLIP, weight_cap=0, timeout=60.0)
    strategy = FedSecStrategy(rule=make_rule("mean"), secure=secure, min_available_nodes=nodes)
    initial = ArrayRecord(_net().state_dict())
    after: dict[int, ArrayRecord] = {}

    def keep(server_round: int, arrays: ArrayRecord) -> None:
        after[server_round] = arrays

    result = strategy.start(
        grid=grid.as_grid(), initial_arrays=initial, num_rounds=2, evaluate_fn=keep
    )

    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for metrics in result.train_metrics_clientapp.values():
        assert metrics["num-accepted"] == nodes and "secagg_aborted" not in metrics
    # Round 2's key set-up rode on round 1's messages (start() passes the next round).
    assert result.train_metrics_clientapp[2]["secagg_pipelined"] == 1
    # On the wire: masked vectors, one per node and round, and never a model in the clear.
    assert len(spy.masked()) == 2 * nodes
    assert spy.models() == []
    # The server got the clients' mean all the same (up to fixed-point error: a grid
    # step 2 clip / 2**bits, far below 1e-5 at the bits the ring allows here).
    expected = _plain_mean_update(initial, nodes)
    assert np.abs(expected).max() > 1e-3  # the clients did move the model
    error = np.abs(_flat(after[1]) - _flat(initial) - expected).max()
    assert error < 1e-5, error


def test_the_spy_sees_models_when_rounds_are_plain() -> None:
    """The control of the test above: without ``secure`` the same spy sees every model."""
    nodes = 4
    grid, spy = _spied_grid(_make_app([]), nodes)
    strategy = FedSecStrategy(rule=make_rule("mean"))
    strategy.start(
        grid=grid.as_grid(), initial_arrays=ArrayRecord(_net().state_dict()), num_rounds=1
    )
    assert len(spy.models()) == nodes and spy.masked() == []


def test_start_runs_bucketed_secure_rounds_under_a_robust_rule() -> None:
    nodes, size = 6, 2
    grid, spy = _spied_grid(_make_app([secagg_mod]), nodes)
    secure = SecureAggregation(bucket_size=size, clip=CLIP, weight_cap=0, timeout=60.0, seed=1)
    strategy = FedSecStrategy(rule=make_rule("median"), secure=secure, min_available_nodes=nodes)
    seen: list[tuple[int, ...]] = []
    buckets = strategy.aggregate_buckets

    def spy_buckets(
        server_round: int,
        bucket_means: torch.Tensor,
        bucket_weights: torch.Tensor,
        *,
        contributors: list[int],
        dropped: dict[int, str],
    ) -> tuple[ArrayRecord, MetricRecord]:
        seen.append(tuple(bucket_means.shape))
        return buckets(
            server_round, bucket_means, bucket_weights, contributors=contributors, dropped=dropped
        )

    strategy.aggregate_buckets = spy_buckets  # type: ignore[method-assign]
    initial = ArrayRecord(_net().state_dict())
    result = strategy.start(grid=grid.as_grid(), initial_arrays=initial, num_rounds=2)

    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for metrics in result.train_metrics_clientapp.values():
        assert metrics["secagg_buckets"] == nodes // size and metrics["num-accepted"] == nodes
    # The rule saw three bucket means per round, never a client's update.
    dim = sum(a.numpy().size for a in initial.values())
    assert seen == [(nodes // size, dim)] * 2
    assert spy.models() == [] and len(spy.masked()) == 2 * nodes
    assert not np.array_equal(_flat(result.arrays), _flat(initial))


# -- signature verification through start() ----------------------------------------------


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    write_key_dir(folder, [f"client-{i}" for i in range(5)])
    return folder


def _signed_app(key_dir: Path, *mods: Mod) -> ClientApp:
    return _make_app(
        [signing(key=lambda ctx: key_dir / f"client-{ctx.node_config['partition-id']}.pem"), *mods]
    )


def _forge(reply: Message) -> Message:
    """A relay nudging the reply after the node signed it."""
    if not reply.has_error():
        reply.content["metrics"] = MetricRecord({"num-examples": EXAMPLES, "forged": 1.0})
    return reply


def _unsign(reply: Message) -> Message:
    if not reply.has_error():
        del reply.content[SIGNATURE_KEY]
    return reply


def test_signature_filter_in_start_excludes_forged_and_unsigned_replies(
    key_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = InProcessGrid(_signed_app(key_dir), 4, tamper={3: _forge, 4: _unsign})
    verify = SignatureFilter(load_registry(key_dir))
    strategy = FedSecStrategy(rule=make_rule("mean"), filters=[verify], fraction_evaluate=1.0)
    with caplog.at_level(logging.WARNING, logger="fedsec"):
        result = strategy.start(
            grid=grid.as_grid(), initial_arrays=ArrayRecord(_net().state_dict()), num_rounds=1
        )
    metrics = result.train_metrics_clientapp[1]
    assert metrics["num-accepted"] == 2 and metrics["num-excluded"] == 0  # never reached it
    assert strategy.last_report is not None and strategy.last_report.accepted == [1, 2]
    # Training and evaluation both went through the filter.
    rejected = sorted((r.node_id, r.reason) for r in verify.take_rejected())
    forged, unsigned = "signature of 'client-2' does not verify", "unsigned (no 'fedsec-signature'"
    assert [node for node, _ in rejected] == [3, 3, 4, 4]
    assert all(why == forged for node, why in rejected if node == 3)
    assert all(why.startswith(unsigned) for node, why in rejected if node == 4)
    assert result.evaluate_metrics_clientapp[1]["eval_loss"] == 0.5
    for kind in ("train", "evaluate"):
        for node in (3, 4):
            assert f"excluded {kind} reply of node {node}" in caplog.text


def test_signature_filter_applies_to_every_secure_stage(key_dir: Path) -> None:
    """A node whose replies fail verification drops out at the first stage; the rest finish."""
    nodes = 5
    grid = InProcessGrid(_signed_app(key_dir, secagg_mod), nodes, tamper={5: _unsign})
    verify = SignatureFilter(load_registry(key_dir))
    stages: list[str] = []

    def record_stages(messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        stages.extend(
            str(m.content.config_records["fedsec-secagg"]["stage"])
            for m in messages[:1]
            if "fedsec-secagg" in m.content
        )
        return next(messages, timeout)

    strategy = FedSecStrategy(
        rule=make_rule("mean"),
        secure=SecureAggregation(clip=CLIP, weight_cap=0, timeout=60.0),
        filters=[record_stages, verify],
        min_available_nodes=nodes,
    )
    result = strategy.start(
        grid=grid.as_grid(), initial_arrays=ArrayRecord(_net().state_dict()), num_rounds=1
    )
    metrics = result.train_metrics_clientapp[1]
    assert metrics["num-accepted"] == nodes - 1 and "secagg_aborted" not in metrics
    assert stages == ["advertise-keys", "share-keys", "masked-input", "unmask"]
    rejected = verify.take_rejected()
    assert {r.node_id for r in rejected} == {5} and len(rejected) == 1  # gone after stage 1
    assert strategy.last_report is not None and 5 in strategy.last_report.excluded


# -- failures ----------------------------------------------------------------------------------


def test_a_failed_round_in_start_leaves_the_model_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail_round_2(messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        if messages and messages[0].metadata.group_id == "2":
            raise ConnectionError("link down")
        return next(messages, timeout)

    grid = InProcessGrid(_make_app([]), 3)
    strategy = FedSecStrategy(rule=make_rule("mean"), filters=[fail_round_2])
    after: dict[int, np.ndarray] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        after[server_round] = _flat(arrays)
        return MetricRecord()

    with caplog.at_level(logging.WARNING, logger="fedsec"):
        result = strategy.start(
            grid=grid.as_grid(),
            initial_arrays=ArrayRecord(_net().state_dict()),
            num_rounds=3,
            evaluate_fn=evaluate,
        )
    assert sorted(result.train_metrics_clientapp) == [1, 3]
    assert np.array_equal(after[2], after[1]) and not np.array_equal(after[3], after[2])
    assert "round 2 failed (ConnectionError: link down); global model unchanged" in caplog.text
