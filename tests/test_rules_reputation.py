"""The reputation step: colluders' copies share no vote, persistent opponents are dropped.

Synthetic rounds stand for non-IID clients: every honest update is a shared
direction g plus a large client-specific part, so honest updates are far apart
(pairwise cosine about 0.2), as on digits at Dirichlet 0.1.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedsec.aggregation import make, make_pipeline
from fedsec.aggregation.base import Mean
from fedsec.aggregation.reputation import Reputation
from fedsec.attacks.base import AdversaryView
from fedsec.attacks.model_poisoning import MODEL_ATTACKS, probe

D = 4000


def honest_round(n: int, generator: torch.Generator, g: torch.Tensor) -> torch.Tensor:
    """n non-IID honest updates: g plus a client-specific part twice its size."""
    own = torch.randn(n, D, generator=generator)
    own = own / own.norm(dim=1, keepdim=True) * 2 * g.norm()
    return g + own


def shared_direction(seed: int = 0) -> torch.Tensor:
    g = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return g / g.norm()


def test_copies_get_no_weight_and_distinct_updates_keep_theirs() -> None:
    generator = torch.Generator().manual_seed(1)
    g = shared_direction()
    updates = honest_round(10, generator, g)
    updates[7:] = -g  # three colluders send one vector
    result = make_pipeline("mean", pre=["reputation"])(updates)
    assert torch.all(result.weights[7:] == 0)
    assert torch.allclose(result.weights[:7], torch.full((7,), 1 / 7), atol=1e-6)
    # With the copies weighed out, the aggregate is the honest mean.
    assert torch.allclose(result.aggregate, updates[:7].mean(dim=0), atol=1e-5)


def test_shares_follow_the_similarity_band() -> None:
    rule = Reputation(Mean(), similarity=0.95)
    similarity = torch.tensor(
        [[1.0, 0.97, 0.2], [0.97, 1.0, 0.99], [0.2, 0.99, 1.0]], dtype=torch.float64
    )
    # K(0.97) = 0.5, K(0.99) = 1: each client loses its largest K.
    assert torch.allclose(
        rule.shares(similarity), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    )


def run_rounds(rule: Reputation, rounds: int, flipper: bool = True, seed: int = 2) -> list:
    generator = torch.Generator().manual_seed(seed)
    g = shared_direction()
    results = []
    for _ in range(rounds):
        updates = honest_round(10, generator, g)
        if flipper:
            updates[9] = -updates[9] * 1.0 - g  # a client that keeps pushing against g
        results.append(rule(updates, client_ids=list(range(100, 110))))
    return results


def test_a_persistent_opponent_is_dropped_after_warmup_and_honest_clients_stay() -> None:
    rule = Reputation(Mean(), warmup=3, f=2)
    results = run_rounds(rule, 6)
    # Before it has warmup scores nobody is dropped; afterwards only the opponent is.
    for result in results[:3]:
        assert bool(torch.all(result.weights > 0))
    for result in results[3:]:
        assert result.weights[9] == 0
        assert bool(torch.all(result.weights[:9] > 0))


def test_a_huge_update_cannot_make_a_reputation_nan_and_its_sender_undroppable() -> None:
    # Red team: float32 cosines of 1e38s overflow to inf / inf = NaN, and a NaN
    # score would stay in the decayed mean, so the client could never be dropped.
    rule = Reputation(make("norm-bounding", adaptive=True), warmup=3, f=1)
    generator = torch.Generator().manual_seed(8)
    g = shared_direction()
    for round_number in range(6):
        updates = honest_round(10, generator, g)
        updates[9] = -updates[9] - g
        if round_number == 0:  # finite in float32; its norm and dot products are not
            updates[9] = 3e38 * torch.sign(updates[:9].median(dim=0).values)
        result = rule(updates, client_ids=list(range(10)))
    assert bool(torch.isfinite(rule.state_dict()["score"]).all())
    assert result.weights[9] == 0


def test_without_an_opponent_nobody_is_dropped() -> None:
    rule = Reputation(Mean(), warmup=2, f=2)
    for result in run_rounds(rule, 8, flipper=False):
        assert bool(torch.all(result.weights > 0))


def test_drops_stop_at_f_and_at_the_inner_rules_requirement() -> None:
    generator = torch.Generator().manual_seed(3)
    g = shared_direction()
    # Krum with f = 2 needs n > 2f + 2: at most 2 of 9 clients can go.
    for f, inner, most in ((1, Mean(), 1), (None, make("krum", f=2), 2), (None, Mean(), 3)):
        rule = Reputation(inner, warmup=1, f=f)
        for _ in range(3):
            updates = honest_round(9, generator, g)
            updates[:3] = -updates[:3] - g  # three opponents
            rule(updates, client_ids=list(range(9)))
        dropped = rule.state_dict()["dropped"]
        assert int(dropped.sum()) == most
        assert not bool(dropped[3:].any())


def test_without_client_ids_the_rule_keeps_no_state() -> None:
    rule = Reputation(Mean(), warmup=1)
    run_rounds(rule, 3)
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    generator = torch.Generator().manual_seed(4)
    rule(honest_round(10, generator, shared_direction()))  # as an adversary's probe calls it
    after = rule.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_round_trip_continues_identically() -> None:
    first = Reputation(make("dnc", f=2), warmup=2, f=2)
    run_rounds(first, 4)
    second = Reputation(make("dnc", f=2), warmup=2, f=2)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    a = run_rounds(first, 3, seed=9)
    b = run_rounds(second, 3, seed=9)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.aggregate, y.aggregate)
        assert torch.equal(x.weights, y.weights)


def test_a_probe_leaves_the_reputations_as_they_were() -> None:
    rule = Reputation(Mean(), warmup=1)
    run_rounds(rule, 2)
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    probe(rule, honest_round(10, generator, shared_direction()), {"client_ids": list(range(10))})
    assert all(torch.equal(before[k], v) for k, v in rule.state_dict().items())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"similarity": 1.0}, "similarity must be in"),
        ({"decay": 1.5}, "decay must be in"),
        ({"warmup": 0}, "warmup must be an integer >= 1"),
        ({"f": -1}, "f must be an integer >= 0"),
        ({"threshold": math.nan}, "threshold must be a finite number"),
        ({"readmit": "high"}, "readmit must be a finite number"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        Reputation(Mean(), **params)
    assert "\n" not in str(err.value)


def test_the_pipeline_needs_no_client_ids_but_uses_them() -> None:
    rule = make_pipeline("dnc", {"f": 1}, ["reputation"], {"reputation": {"f": 1}})
    assert "client_ids" not in rule.requires
    assert "client_ids" in rule.uses
    # Bucketing hands bucket means, not clients, to what it wraps.
    bucketed = make_pipeline("mean", pre=["bucketing", "reputation"])
    assert "client_ids" not in bucketed.uses


# ---- the adaptive attack on it -------------------------------------------------------


def colluders_view(m: int, n: int, seed: int) -> tuple[AdversaryView, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    g = shared_direction(seed)
    everyone = honest_round(n, generator, g)
    view = AdversaryView(
        own=everyone[:m], benign=None, num_clients=n, rule=None, generator=generator
    )
    return view, everyone[m:]


def test_decorrelated_copies_have_the_target_cosine() -> None:
    view, _ = colluders_view(4, 12, seed=6)
    crafted = MODEL_ATTACKS.get("decorrelated")(attack="alie", similarity=0.8).craft(view)
    unit = crafted / crafted.norm(dim=1, keepdim=True)
    cosines = (unit @ unit.T)[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(cosines, torch.full_like(cosines, 0.8), atol=0.03)  # d = 4000


def test_decorrelation_beats_the_reputation_step_more_than_copies_do() -> None:
    # The step gives copies no weight; the same attack decorrelated moves the aggregate.
    deviations = {}
    for name, attack in (
        ("copies", MODEL_ATTACKS.get("ipm")(epsilon=3.0)),
        (
            "decorrelated",
            MODEL_ATTACKS.get("decorrelated")(
                attack="ipm", similarity=0.8, params={"epsilon": 3.0}
            ),
        ),
    ):
        view, honest = colluders_view(3, 10, seed=7)
        stacked = torch.cat([attack.craft(view), honest])
        aggregate = Reputation(Mean())(stacked).aggregate
        deviations[name] = float((aggregate - honest.mean(dim=0)).norm())
    assert deviations["copies"] < 1e-4
    assert deviations["decorrelated"] > 0.5


def test_decorrelated_refuses_what_it_cannot_wrap() -> None:
    cls = MODEL_ATTACKS.get("decorrelated")
    with pytest.raises(ValueError, match="must be a colluding attack"):
        cls(attack="sign-flip")
    with pytest.raises(ValueError, match="attack must be one of"):
        cls(attack="no-such-attack")
    with pytest.raises(ValueError, match=r"similarity must be in \(0, 1\)"):
        cls(similarity=1.0)


# ---- through the strategy -------------------------------------------------------------


def _tiny_app() -> Any:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content.array_records["arrays"].to_torch_state_dict()
        step = torch.randn(arrays["w"].shape, generator=torch.Generator().manual_seed(pid))
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": arrays["w"] + step}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def test_the_strategy_hands_client_ids_to_a_rule_that_uses_them() -> None:
    from flwr.app import ArrayRecord

    from fedsec.strategies import FedSecStrategy
    from fedsec.strategies.inprocess import InProcessGrid

    seen: list[list[int]] = []

    class Recorder(Mean):
        uses = frozenset({"client_ids"})

        def aggregate(self, updates, weights, **context):  # type: ignore[no-untyped-def]
            seen.append(list(context["client_ids"]))
            return super().aggregate(updates, weights)

    initial = ArrayRecord({"w": torch.zeros(50)})
    grid = InProcessGrid(_tiny_app(), 5)
    strategy = FedSecStrategy(rule=Recorder(), min_available_nodes=5)
    strategy.start(grid=grid.as_grid(), initial_arrays=initial, num_rounds=2)
    assert len(seen) == 2 and sorted(seen[0]) == sorted(seen[1]) and len(set(seen[0])) == 5

    rule = make_pipeline("mean", pre=["reputation"])
    strategy = FedSecStrategy(rule=rule, min_available_nodes=5)
    strategy.start(
        grid=InProcessGrid(_tiny_app(), 5).as_grid(), initial_arrays=initial, num_rounds=2
    )
    state = rule.state_dict()
    assert state["histories.ids"].numel() == 5 and torch.equal(state["seen"], torch.full((5,), 2))
