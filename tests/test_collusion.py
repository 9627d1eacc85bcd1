"""Colluding attacks in any Flower app: ``Collusion``'s client mod and server-side filter.

The ClientApp is a plain Flower app whose "training" adds a known vector to
the model (``0.1 * (partition + 1)`` on every coordinate) and bumps an int64
counter, so every honest update, every crafted one (IPM, Xie et al. 2020:
``-epsilon`` times the colluders' mean update) and the aggregate are known
exactly. Rounds run through fedsec's in-process grid and the server-side
pipeline (``pipeline(grid, [filter])``) with ``FedSecStrategy``: plain rounds
and secure ones (fedsec's ``secagg_mod`` inside the collusion mod).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
from flwr.clientapp.typing import Mod

from fedsec.aggregation import make
from fedsec.attacks.model_poisoning import IPM, SignFlip
from fedsec.attacks.threat import MALICIOUS_TAG, SIMULATED_ADVERSARY_ENV, TRUTH_TAG
from fedsec.client.collusion import ADVERSARY_KEY, COLLUSION_REFUSED, NUM_EXAMPLES_ARRAY
from fedsec.client.secagg_mod import MASKED_KEY, SECAGG_KEY, secagg_mod
from fedsec.simulation import Collusion
from fedsec.strategies import FedSecStrategy
from fedsec.strategies.adversary import AdversaryFilter
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import Exchange, pipeline
from fedsec.strategies.secagg import SecureAggregation

NODES = 5
DIM = 6
MALICIOUS = frozenset({0, 1})  # partitions; nodes 1 and 2
EPSILON = 2.0
W0 = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)


def _honest(partition: int) -> float:
    return 0.1 * (partition + 1)


def _app(mods: Sequence[Mod] = (), trained: list[int] | None = None) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if trained is not None:
            trained.append(pid)
        arrays = msg.content.array_records["arrays"]
        record = ArrayRecord(
            {
                "w": Array(arrays["w"].numpy() + np.float32(_honest(pid))),
                "count": Array(np.asarray(arrays["count"].numpy() + 1)),
            }
        )
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)

    return app


def _initial() -> ArrayRecord:
    return ArrayRecord({"w": Array(W0.copy()), "count": Array(np.array(7, dtype=np.int64))})


def _ipm_update() -> float:
    """IPM with colluder knowledge: -epsilon times the colluders' own mean update."""
    return -EPSILON * float(np.mean([_honest(p) for p in MALICIOUS]))


class _Spy:
    """A filter that records the replies passing through it."""

    def __init__(self) -> None:
        self.replies: list[Message] = []

    def __call__(self, messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        replies = next(messages, timeout)
        self.replies.extend(replies)
        return replies


def _tags(reply: Message) -> set[str]:
    metrics = reply.content.metric_records.get("metrics")
    return {k for k in (metrics or {}) if k.startswith("fedsec.")}


# -- plain rounds ---------------------------------------------------------------------


def test_plain_round_replaces_the_colluders_models_and_hides_the_tags() -> None:
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    adversary = collusion.server_filter()
    below = _Spy()
    grid = InProcessGrid(_app([collusion.client_mod()]), NODES).as_grid()
    strategy = FedSecStrategy(rule=make("mean"), min_available_nodes=NODES)
    messages = list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))
    replies = pipeline(grid, [adversary, below])(messages, 60.0)

    # The referee knows the colluders; what the server gets carries no tag, and the
    # colluders' crafted models.
    assert adversary.malicious_nodes == {1, 2}
    assert not any(_tags(r) for r in replies)
    by_node = {r.metadata.src_node_id: r.content.array_records["arrays"] for r in replies}
    for node, arrays in by_node.items():
        pid = node - 1
        delta = _ipm_update() if pid in MALICIOUS else _honest(pid)
        np.testing.assert_allclose(arrays["w"].numpy(), W0 + delta, atol=1e-6)
        assert arrays["count"].numpy() == 8  # the reply's own buffer, kept
    assert adversary.rounds_attacked == 1

    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    honest = [_honest(p) for p in range(NODES) if p not in MALICIOUS]
    expected = (sum(honest) + len(MALICIOUS) * _ipm_update()) / NODES
    np.testing.assert_allclose(new["w"].numpy(), W0 + expected, atol=1e-6)


def test_tags_travel_only_between_the_mod_and_the_filter() -> None:
    """Below the adversary the colluders' replies are tagged; the honest ones never are."""
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    below = _Spy()
    grid = InProcessGrid(_app([collusion.client_mod()]), NODES).as_grid()
    strategy = FedSecStrategy(rule=make("mean"), min_available_nodes=NODES)
    messages = list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))
    pipeline(grid, [below])(messages, 60.0)  # no adversary: the tags would reach the server
    tagged = {r.metadata.src_node_id for r in below.replies if _tags(r)}
    assert tagged == {1, 2}
    for reply in below.replies:
        if reply.metadata.src_node_id in tagged:
            assert _tags(reply) == {MALICIOUS_TAG, TRUTH_TAG}


def test_strategy_start_runs_the_collusion_filter() -> None:
    """``FedSecStrategy(filters=[collusion.server_filter()]).start`` drives the attack."""
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    adversary = collusion.server_filter()
    grid = InProcessGrid(_app([collusion.client_mod()]), NODES).as_grid()
    strategy = FedSecStrategy(rule=make("mean"), min_available_nodes=NODES, filters=[adversary])
    result = strategy.start(grid, _initial(), num_rounds=2, timeout=60.0)
    assert adversary.rounds_attacked == 2
    honest = [_honest(p) for p in range(NODES) if p not in MALICIOUS]
    step = (sum(honest) + len(MALICIOUS) * _ipm_update()) / NODES
    np.testing.assert_allclose(result.arrays["w"].numpy(), W0 + 2 * step, atol=1e-5)


def test_a_node_without_the_simulation_switch_never_colludes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    adversary = collusion.server_filter()
    below = _Spy()
    grid = InProcessGrid(_app([collusion.client_mod()]), NODES).as_grid()
    monkeypatch.delenv(SIMULATED_ADVERSARY_ENV)  # as on a deployed node
    strategy = FedSecStrategy(rule=make("mean"), min_available_nodes=NODES)
    messages = list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))
    replies = pipeline(grid, [adversary, below])(messages, 60.0)
    assert not any(_tags(r) for r in below.replies)
    assert adversary.rounds_attacked == 0 and adversary.malicious_nodes == set()
    for reply in replies:
        pid = reply.metadata.src_node_id - 1
        w = reply.content.array_records["arrays"]["w"].numpy()
        np.testing.assert_allclose(w, W0 + _honest(pid), atol=1e-6)


# -- secure rounds --------------------------------------------------------------------


def _secure_round(
    collusion: Collusion,
    *,
    spies: tuple[_Spy, _Spy],
    norm_bound: float = 0.0,
    clip: float = 1.0,
) -> tuple[ArrayRecord | None, AdversaryFilter, SecureAggregation, list[int]]:
    """One secure round; ``spies``: (the server's view, below the adversary)."""
    trained: list[int] = []
    adversary = collusion.server_filter()
    secure = SecureAggregation(clip=clip, weight_cap=0, dropout_rate=0.0, norm_bound=norm_bound)
    grid = InProcessGrid(_app([collusion.client_mod(secagg_mod)], trained), NODES).as_grid()
    above, below = spies
    strategy = FedSecStrategy(
        rule=make("mean"),
        min_available_nodes=NODES,
        secure=secure,
        filters=[above, adversary, below],
    )
    new, _ = strategy.train_round(
        pipeline(grid, strategy.filters), grid, 1, _initial(), ConfigRecord({"server-round": 1})
    )
    return new, adversary, secure, trained


def _tolerance() -> float:
    params = SecureAggregation(clip=1.0).sum_params(NODES, DIM)
    return 2 * params.encoder.quantisation_bound(NODES) / NODES + 1e-6


def _masked_inputs(replies: list[Message]) -> list[Message]:
    return [r for r in replies if not r.has_error() and MASKED_KEY in r.content.array_records]


def test_secure_round_masks_the_crafted_updates_and_never_shows_a_plain_one() -> None:
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    above, below = _Spy(), _Spy()
    new, adversary, secure, trained = _secure_round(collusion, spies=(above, below))
    assert new is not None, secure.last_error
    # The colluders handed their plain updates to the adversary (below it) ...
    plain = [r for r in below.replies if not r.has_error() and "arrays" in r.content]
    assert sorted(r.metadata.src_node_id for r in plain) == [1, 2]
    assert adversary.rounds_attacked == 1
    # ... but the server's view holds masked inputs only, one per node, and no tag.
    assert not any("arrays" in r.content for r in above.replies if not r.has_error())
    assert not any(_tags(r) for r in above.replies if not r.has_error())
    assert sorted(r.metadata.src_node_id for r in _masked_inputs(above.replies)) == [1, 2, 3, 4, 5]
    assert sorted(trained) == list(range(NODES))  # each node trained once, none twice
    honest = [_honest(p) for p in range(NODES) if p not in MALICIOUS]
    expected = (sum(honest) + len(MALICIOUS) * _ipm_update()) / NODES
    error = np.abs(new["w"].numpy() - (W0 + expected)).max()
    assert error <= _tolerance(), (error, _tolerance())
    assert new["count"].numpy() == 7  # under SecAgg the server keeps its own buffers


def test_colluders_answer_the_next_rounds_set_up_riding_on_their_crafted_pass() -> None:
    """Two secure rounds by ``start``: round 2's keys ride on round 1's masked-input stage
    (pipelining), which a colluder answers in its second pass, so round 2 is pipelined."""
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    adversary = collusion.server_filter()
    secure = SecureAggregation(clip=1.0, weight_cap=0, dropout_rate=0.0)
    grid = InProcessGrid(_app([collusion.client_mod(secagg_mod)]), NODES).as_grid()
    strategy = FedSecStrategy(
        rule=make("mean"), min_available_nodes=NODES, secure=secure, filters=[adversary]
    )
    result = strategy.start(grid, _initial(), num_rounds=2, timeout=60.0)
    assert adversary.rounds_attacked == 2
    assert result.train_metrics_clientapp[2]["secagg_pipelined"] == 1
    honest = [_honest(p) for p in range(NODES) if p not in MALICIOUS]
    step = (sum(honest) + len(MALICIOUS) * _ipm_update()) / NODES
    error = np.abs(result.arrays["w"].numpy() - (W0 + 2 * step)).max()
    assert error <= 2 * _tolerance(), error


def test_secure_round_without_the_switch_is_an_honest_secure_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collusion = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": EPSILON})
    monkeypatch.delenv(SIMULATED_ADVERSARY_ENV)
    monkeypatch.setattr(
        "fedsec.strategies.inprocess.enable_simulated_adversary", lambda: {}
    )  # the grid must not turn it back on
    above, below = _Spy(), _Spy()
    new, adversary, secure, _ = _secure_round(collusion, spies=(above, below))
    assert new is not None, secure.last_error
    assert not any("arrays" in r.content for r in below.replies if not r.has_error())
    assert adversary.rounds_attacked == 0
    expected = float(np.mean([_honest(p) for p in range(NODES)]))
    assert np.abs(new["w"].numpy() - (W0 + expected)).max() <= _tolerance()


def test_colluders_skip_the_norm_bound_that_honest_clients_apply() -> None:
    """Crafted updates are masked as an attacker would: unclipped, so the server's norm
    check (a bucket's sum within weight x bound) discards the sum; honest rounds pass it.

    IPM with epsilon 40 crafts -6 per coordinate (inside the encoding's clip of 10):
    the sum's norm is |1.2 - 2 x 6| sqrt(6) = 26, over 5 x 1.22 = 6.1.
    """
    bound = float(np.linalg.norm(np.full(DIM, 0.5)))  # every honest update fits
    spies = (_Spy(), _Spy())
    honest = Collusion("ipm", malicious=set(), params={"epsilon": 40.0})
    new, _, secure, _ = _secure_round(honest, spies=spies, norm_bound=bound, clip=10.0)
    assert new is not None, secure.last_error
    attacked = Collusion("ipm", malicious=MALICIOUS, params={"epsilon": 40.0})
    new, adversary, secure, _ = _secure_round(attacked, spies=spies, norm_bound=bound, clip=10.0)
    assert adversary.rounds_attacked == 1
    assert new is None and "norm check" in secure.last_error


# -- the client mod alone ---------------------------------------------------------------


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=partition + 1,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


def test_a_crafted_update_sent_to_an_honest_node_is_refused() -> None:
    InProcessGrid(_app(), 1)  # turns the simulation's adversary mode on, as simulations do
    mod = Collusion("ipm", malicious={0}).client_mod(secagg_mod)
    crafted = ArrayRecord(
        {
            ADVERSARY_KEY: Array(np.zeros(DIM, dtype=np.float32)),
            NUM_EXAMPLES_ARRAY: Array(np.array([10.0])),
        }
    )
    content = RecordDict(
        {
            "arrays": _initial(),
            ADVERSARY_KEY: crafted,
            SECAGG_KEY: ConfigRecord({"stage": "masked-input"}),
        }
    )
    msg = Message(content, message_type=MessageType.TRAIN, dst_node_id=2)
    called: list[Message] = []

    def call_next(m: Message, c: Context) -> Message:
        called.append(m)
        return Message(RecordDict(), reply_to=m)

    reply = mod(msg, _context(1), call_next)
    assert reply.has_error() and reply.error.code == COLLUSION_REFUSED
    assert "not a colluder" in str(reply.error.reason) and not called


def test_non_colluding_attacks_are_refused_pointing_to_attack_mod() -> None:
    for attack in ("sign-flip", SignFlip()):
        with pytest.raises(ValueError, match=r"does not collude.*attack_mod") as err:
            Collusion(attack, malicious={0})
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="poisons training data"):
        Collusion("label-flip", malicious={0})
    with pytest.raises(ValueError, match="knowledge must be one of"):
        Collusion(IPM(), malicious={0}, knowledge="everything")
    with pytest.raises(ValueError, match="partition ids must be integers >= 0"):
        Collusion(IPM(), malicious={-1})


def test_secagg_mod_holds_no_adversary_code() -> None:
    source = (Path(__file__).parents[1] / "fedsec" / "client" / "secagg_mod.py").read_text()
    for word in ("ADVERSARY_KEY", "fedsec-adversary", "MALICIOUS_TAG", "collu", "crafted"):
        assert word not in source, word
    assert "malicious=True" not in source


# -- the honest-only reference ----------------------------------------------------------


def test_abstaining_colluders_send_nothing_and_the_server_averages_the_honest() -> None:
    collusion = Collusion("abstain", malicious=MALICIOUS)
    adversary = collusion.server_filter()
    grid = InProcessGrid(_app([collusion.client_mod()]), NODES).as_grid()
    strategy = FedSecStrategy(rule=make("mean"), min_available_nodes=NODES, filters=[adversary])
    result = strategy.start(grid, _initial(), num_rounds=1, timeout=60.0)
    assert adversary.malicious_nodes == {1, 2}  # the referee still knows them
    assert adversary.rounds_attacked == 0
    honest = [_honest(p) for p in range(NODES) if p not in MALICIOUS]
    np.testing.assert_allclose(
        result.arrays["w"].numpy(), W0 + sum(honest) / len(honest), atol=1e-6
    )


def test_abstaining_colluders_drop_out_of_a_secure_round() -> None:
    # One abstaining colluder of five: a dropout SecAgg+'s thresholds tolerate at n = 5.
    collusion = Collusion("abstain", malicious=frozenset({0}))
    adversary = collusion.server_filter()
    secure = SecureAggregation(clip=1.0, weight_cap=0, dropout_rate=0.2)
    grid = InProcessGrid(_app([collusion.client_mod(secagg_mod)]), NODES).as_grid()
    above = _Spy()
    strategy = FedSecStrategy(
        rule=make("mean"), min_available_nodes=NODES, secure=secure, filters=[above, adversary]
    )
    new, _ = strategy.train_round(
        pipeline(grid, strategy.filters), grid, 1, _initial(), ConfigRecord({"server-round": 1})
    )
    assert new is not None, secure.last_error
    # The server never saw the colluder's input, plain or masked.
    assert sorted(r.metadata.src_node_id for r in _masked_inputs(above.replies)) == [2, 3, 4, 5]
    honest = [_honest(p) for p in range(1, NODES)]
    error = np.abs(new["w"].numpy() - (W0 + sum(honest) / len(honest))).max()
    assert error <= _tolerance(), (error, _tolerance())
