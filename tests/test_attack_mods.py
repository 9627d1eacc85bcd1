"""``attack_mod``: per-client model poisoning on any Flower ClientApp in a simulation.

The ClientApp is a plain Flower app with its own tiny model (BatchNorm, so an
int64 ``num_batches_tracked`` buffer travels too) and its own training loop,
driven by Flower's ``FedAvg.start`` or ``FedSecStrategy.start`` over fedsec's
in-process grid. Every node trains on its own synthetic regression data, so
the honest updates are close to each other and the runs are deterministic.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from fedsec.aggregation import make
from fedsec.attacks.data_poisoning import DATA_ATTACKS, LabelFlip
from fedsec.attacks.model_poisoning import ALIE, MODEL_ATTACKS, PerClientAttack, SignFlip
from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
from fedsec.client.attack_mods import attack_mod
from fedsec.strategies import FedSecStrategy
from fedsec.strategies.inprocess import InProcessGrid

NODES = 5
MALICIOUS = frozenset({0, 1})
HONEST = sorted(set(range(NODES)) - MALICIOUS)
COUNTER = "0.num_batches_tracked"
TRUE_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 1))


def _app(mods: Sequence[Mod] = ()) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = _model()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        pid = int(context.node_config["partition-id"])
        gen = torch.Generator().manual_seed(100 + pid)
        x = torch.randn(64, 4, generator=gen)
        y = x @ TRUE_W + 0.1 * torch.randn(64, 1, generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            loss: torch.Tensor = nn.functional.mse_loss(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": 64}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _initial() -> ArrayRecord:
    return ArrayRecord(_model().state_dict())


def _run(
    strategy: Strategy,
    mods: Sequence[Mod] = (),
    *,
    deployed: pytest.MonkeyPatch | None = None,
) -> tuple[ArrayRecord, dict[int, Message]]:
    """One round; the global model it produced and every node's reply by partition id."""
    replies: dict[int, Message] = {}

    def recorder(pid: int) -> Any:
        def keep(reply: Message) -> Message:
            replies[pid] = reply
            return reply

        return keep

    grid = InProcessGrid(
        _app(mods), NODES, tamper={node: recorder(node - 1) for node in range(1, NODES + 1)}
    )
    if deployed is not None:  # InProcessGrid turns the flag on; play a deployed node's process
        deployed.delenv(SIMULATED_ADVERSARY_ENV)
    result = strategy.start(grid=grid.as_grid(), initial_arrays=_initial(), num_rounds=1)
    assert len(replies) == NODES
    return result.arrays, replies


def _floats(record: ArrayRecord) -> np.ndarray:
    # By the initial model's float names: Flower's FedAvg returns the int counter as a float.
    names = [k for k, a in _initial().items() if np.dtype(a.dtype).kind == "f"]
    return np.concatenate([record[k].numpy().ravel() for k in names]).astype(np.float64)


def _updates(replies: dict[int, Message]) -> np.ndarray:
    start = _floats(_initial())
    return np.stack(
        [_floats(replies[p].content.array_records["arrays"]) - start for p in range(NODES)]
    )


@functools.cache
def _plain() -> dict[int, Message]:
    """The honest round without the mod (deterministic; shared, read only)."""
    return _run(_fedavg())[1]


def _fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES)


@pytest.fixture(autouse=True)
def _simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    # InProcessGrid sets the flag in os.environ; setenv first so it is restored after.
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")


def test_sign_flip_moves_fedavg_but_not_fedsec_median() -> None:
    start = _floats(_initial())
    honest = _plain()
    honest_updates = _updates(honest)
    honest_mean = honest_updates.mean(axis=0)
    norm = float(np.linalg.norm(honest_mean))

    mod = attack_mod("sign-flip", malicious=MALICIOUS, params={"scale": 4.0})
    avg_model, attacked = _run(_fedavg(), [mod])
    avg_update = _floats(avg_model) - start
    # FedAvg: (3 h - 2 * 4 h) / 5 = -h; far from the honest mean h (measured 2.0 |h|).
    assert np.linalg.norm(avg_update - honest_mean) > 1.5 * norm

    med_model, med_replies = _run(FedSecStrategy(rule=make("median")), [mod])
    med_update = _floats(med_model) - start
    honest_median = np.median(honest_updates, axis=0)
    # The same malicious replies reached the median as FedAvg.
    np.testing.assert_array_equal(_updates(med_replies), _updates(attacked))
    # With 2 of 5 malicious the coordinate-wise median stays inside the honest
    # clients' range of every coordinate, and no farther from the honest median
    # than the honest clients themselves are (measured 0.58 vs 0.81; FedAvg: 3.43).
    honest_only = honest_updates[HONEST]
    tol = 1e-6
    assert np.all(med_update >= honest_only.min(axis=0) - tol)
    assert np.all(med_update <= honest_only.max(axis=0) + tol)
    distance = float(np.linalg.norm(med_update - honest_median))
    spread = max(float(np.linalg.norm(h - honest_median)) for h in honest_updates)
    assert distance <= spread
    assert 5 * distance < float(np.linalg.norm(avg_update - honest_mean))


def test_honest_replies_are_byte_identical_and_malicious_ones_flipped() -> None:
    plain = _plain()
    mod = attack_mod(SignFlip(scale=2.0), malicious=MALICIOUS)
    _, attacked = _run(_fedavg(), [mod])
    for pid in range(NODES):
        before = plain[pid].content.array_records["arrays"]
        after = attacked[pid].content.array_records["arrays"]
        assert list(before) == list(after)
        assert (
            plain[pid].content.metric_records["metrics"]
            == (attacked[pid].content.metric_records["metrics"])
        )
        # Integer buffers pass through on every node.
        assert before[COUNTER].data == after[COUNTER].data
        same = all(before[k].data == after[k].data for k in before)
        assert same == (pid not in MALICIOUS)
    start = _floats(_initial())
    for pid in MALICIOUS:
        honest_update = _floats(plain[pid].content.array_records["arrays"]) - start
        sent = _floats(attacked[pid].content.array_records["arrays"]) - start
        np.testing.assert_allclose(sent, -2.0 * honest_update, atol=1e-5)


def test_scaling_by_callable_membership() -> None:
    plain = _plain()
    mod = attack_mod(
        "scaling",
        malicious=lambda ctx: int(ctx.node_config["partition-id"]) == 3,
        num_clients=NODES,
    )
    _, attacked = _run(_fedavg(), [mod])
    plain_u, attacked_u = _updates(plain), _updates(attacked)
    np.testing.assert_allclose(attacked_u[3], NODES * plain_u[3], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.delete(attacked_u, 3, 0), np.delete(plain_u, 3, 0))


def test_outside_a_simulation_nothing_is_attacked(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _plain()
    mod = attack_mod("sign-flip", malicious=set(range(NODES)))
    with caplog.at_level(logging.WARNING, logger="fedsec"):
        _, replies = _run(_fedavg(), [mod], deployed=monkeypatch)
    np.testing.assert_array_equal(_updates(replies), _updates(plain))
    warnings = [r for r in caplog.records if "attack_mod" in r.getMessage()]
    assert len(warnings) == 1 and "not in a simulation" in warnings[0].getMessage()


@pytest.mark.parametrize("attack", [*DATA_ATTACKS.names(), LabelFlip(num_classes=10)])
def test_data_poisoning_is_refused_in_one_line(attack: Any) -> None:
    with pytest.raises(ValueError, match="poisons the training data") as err:
        attack_mod(attack, malicious={0})
    message = str(err.value)
    assert "\n" not in message
    assert (attack if isinstance(attack, str) else attack.name) in message


@pytest.mark.parametrize(
    "attack",
    [
        *(
            n
            for n in MODEL_ATTACKS.names()
            if not issubclass(MODEL_ATTACKS.get(n), PerClientAttack)
        ),
        ALIE(),
    ],
)
def test_colluding_attacks_are_refused_pointing_to_collusion(attack: Any) -> None:
    with pytest.raises(ValueError, match=r"fedsec\.simulation\.Collusion") as err:
        attack_mod(attack, malicious={0})
    assert "\n" not in str(err.value) and "colludes" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attack": "no-such-attack", "malicious": {0}}, "unknown model-poisoning attack"),
        ({"attack": "sign-flip", "malicious": {0}, "params": {"bogus": 1}}, "bogus"),
        ({"attack": "sign-flip", "malicious": {-1}}, "partition ids"),
        ({"attack": "scaling", "malicious": {0}}, "num_clients"),
        ({"attack": SignFlip(), "malicious": {0}, "params": {"scale": 2}}, "params="),
    ],
)
def test_bad_configuration_is_refused_in_one_line(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        attack_mod(**kwargs)
    assert "\n" not in str(err.value)
