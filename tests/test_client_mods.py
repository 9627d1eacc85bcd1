"""fedsec's client mods in a plain Flower ClientApp (own model, own data, own loop).

The app below is written as Flower's quickstart-pytorch writes one: a small
model (with BatchNorm, so an integer buffer travels too), synthetic data of
its own, an ``@app.train`` that loads the received arrays, trains and returns
``arrays`` + ``metrics``. The mods are adopted in the ``ClientApp(mods=[...])``
line only. Messages reach it through fedsec's in-process grid, behind the
server-side :class:`~fedsec.strategies.signatures.SignatureFilter` where
signatures are checked, and once through ``FedSecStrategy.start`` (Flower's
round loop) with that filter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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
from torch import nn

from fedsec.aggregation import make as make_rule
from fedsec.client.mods import LOCAL_DP_REFUSED, local_dp, signing
from fedsec.client.privacy import PRIVACY_BUDGET_EXHAUSTED, PRIVACY_LEDGER_UNUSABLE
from fedsec.client.signing_mod import SIGNATURE_KEY, SIGNING_REFUSED
from fedsec.deploy.signatures import load_registry, load_signing_key
from fedsec.privacy.accounting import epsilon_for_history
from fedsec.privacy.ledger import LedgerFile
from fedsec.secagg.signing import write_key_dir
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.signatures import SignatureFilter, check_reply
from fedsec.strategies.strategy import FedSecStrategy

# ---- the user's app, as in Flower's quickstart -----------------------------------------


class Net(nn.Module):
    """The user's own model: about 10,000 parameters and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.bn = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.bn(self.fc1(x))))
        return out


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's own data: a fixed synthetic partition."""
    g = torch.Generator().manual_seed(100 + partition_id)
    x = torch.randn(64, 64, generator=g)
    y: torch.Tensor = (x[:, :10].argmax(dim=1) + partition_id) % 10
    return x, y


TRAINED: list[int] = []  # partitions whose train() ran, to see refused rounds skip it


def make_app(mods: list[Mod]) -> ClientApp:
    """The user's ClientApp; ``mods`` is the one line where fedsec is adopted."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        TRAINED.append(pid)
        model = Net()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        x, y = load_data(pid)
        torch.manual_seed(pid)  # the test wants the same training with and without the mod
        lr = msg.content.config_records["config"]["lr"]
        assert isinstance(lr, float)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(5):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(x)})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = Net().eval()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        x, y = load_data(int(context.node_config["partition-id"]))
        accuracy = float((model(x).argmax(dim=1) == y).float().mean())
        content = RecordDict({"metrics": MetricRecord({"eval_acc": accuracy, "num-examples": 64})})
        return Message(content=content, reply_to=msg)

    return app


# ---- helpers -------------------------------------------------------------------------


def global_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(Net().state_dict())


def train_messages(
    nodes: list[int], lr: float = 0.5, round_: int = 1, kind: str = MessageType.TRAIN
) -> list[Message]:
    arrays = global_arrays()
    return [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": lr})}),
            dst_node_id=node,
            message_type=kind,
            group_id=str(round_),
        )
        for node in nodes
    ]


def arrays(reply: Message) -> ArrayRecord:
    return reply.content.array_records["arrays"]


def flat(record: ArrayRecord, keys: list[str]) -> np.ndarray:
    return np.concatenate([record[k].numpy().astype(np.float64).ravel() for k in keys])


def reason(reply: Message) -> str:
    assert reply.has_error()
    return str(reply.error.reason)


def history(path: Path, partition: int) -> list[tuple[float, float, int]]:
    ledger = LedgerFile(path, partition).load()
    assert ledger is not None
    return ledger.history


def float_keys(record: ArrayRecord) -> list[str]:
    return [k for k in record if np.issubdtype(record[k].numpy().dtype, np.floating)]


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    write_key_dir(folder, ["client-0", "client-1", "client-2"])
    return folder


# ---- signing -------------------------------------------------------------------------


def test_signed_replies_verify_on_the_server_and_a_tampered_one_does_not(key_dir: Path) -> None:
    # Adoption: one line, a key per node as a function of the Flower Context.
    app = make_app(
        [signing(key=lambda ctx: key_dir / f"client-{ctx.node_config['partition-id']}.pem")]
    )
    registry = load_registry(key_dir)

    def tamper(reply: Message) -> Message:
        record = arrays(reply)
        bias = record["fc2.bias"].numpy().copy()
        bias[0] += 1e-3  # a relay nudging one weight after the node signed
        record["fc2.bias"] = Array(bias)
        return reply

    inner = InProcessGrid(app, 3, tamper={3: tamper})
    replies = inner.send_and_receive(train_messages([1, 2, 3]))
    identities = {r.metadata.src_node_id: r.content[SIGNATURE_KEY]["identity"] for r in replies}
    assert identities == {1: "client-0", 2: "client-1", 3: "client-2"}  # the key file's stem
    assert check_reply(replies[0], registry) == "client-0"

    grid = SignatureFilter(registry)
    exchange = pipeline(InProcessGrid(app, 3, tamper={3: tamper}).as_grid(), [grid])
    kept = exchange(train_messages([1, 2, 3], round_=2), 60.0)
    assert sorted(r.metadata.src_node_id for r in kept) == [1, 2]
    assert [(r.node_id, r.reason) for r in grid.take_rejected()] == [
        (3, "signature of 'client-2' does not verify")
    ]
    # Evaluate replies are signed too (every reply the node sends).
    kept = exchange(train_messages([1, 2], kind=MessageType.EVALUATE), 60.0)
    assert len(kept) == 2 and grid.take_rejected() == []


def test_a_key_object_signs_under_the_given_identity_and_a_wrong_one_fails(key_dir: Path) -> None:
    key = load_signing_key(key_dir / "client-1.pem")
    registry = load_registry(key_dir)
    for identity, accepted in (("client-1", True), ("client-0", False)):
        app = make_app([signing(key=key, identity=identity)])
        verify = SignatureFilter(registry)
        kept = pipeline(InProcessGrid(app, 1).as_grid(), [verify])(train_messages([1]), 60.0)
        assert bool(kept) is accepted
    with pytest.raises(ValueError, match="identity= is required"):
        signing(key=key)
    with pytest.raises(TypeError, match="key must be a PEM path"):
        signing(key=42)  # type: ignore[arg-type]


def test_a_node_whose_key_is_unusable_answers_with_an_error_not_unsigned(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a key\n")
    cases: list[tuple[Any, str]] = [
        (tmp_path / "missing.pem", "not found"),
        (tmp_path / "bad.pem", "not an unencrypted PEM"),
        (lambda ctx: ctx.node_config["signing-key"], "key function raised KeyError"),
        (lambda ctx: Ed25519PrivateKey.generate(), "pass identity="),
    ]
    for key, why in cases:
        TRAINED.clear()
        app = make_app([signing(key=key)])
        (reply,) = InProcessGrid(app, 1).send_and_receive(train_messages([1]))
        assert reply.has_error() and reply.error.code == SIGNING_REFUSED
        assert why in reason(reply) and "\n" not in reason(reply)
        assert TRAINED == []  # refused before training: no work for a reply that cannot go


# ---- local DP ------------------------------------------------------------------------


def _dp(state_dir: Any, **overrides: Any) -> Mod:
    terms: dict[str, Any] = {
        "clip": 0.05,
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "epsilon_budget": 100.0,
        "state_dir": state_dir,
    }
    return local_dp(**(terms | overrides))


def test_local_dp_clips_the_update_and_adds_gaussian_noise(tmp_path: Path) -> None:
    clip, sigma = 0.05, 1.0
    received = global_arrays()
    (plain,) = InProcessGrid(make_app([]), 1).send_and_receive(train_messages([1]))
    (private,) = InProcessGrid(make_app([_dp(tmp_path, clip=clip)]), 1).send_and_receive(
        train_messages([1])
    )
    keys = float_keys(received)
    assert "num_batches_tracked" not in {k.split(".")[-1] for k in keys}
    update = flat(arrays(plain), keys) - flat(received, keys)
    norm = float(np.linalg.norm(update))
    assert norm > 20 * clip  # the user's training moved far beyond the bound: clipping matters
    clipped = update * (clip / norm)
    noise = flat(arrays(private), keys) - flat(received, keys) - clipped
    d = noise.size
    assert d > 9000
    std = sigma * clip
    # Mean of d iid N(0, std^2): |mean| < 5 std / sqrt(d) fails with probability ~6e-7.
    assert abs(noise.mean()) < 5 * std / math.sqrt(d)
    # Sample std: its relative error has std ~ 1/sqrt(2d) ~ 0.7%; 5% is over 7 of those.
    assert abs(noise.std() / std - 1) < 0.05
    # Kurtosis of a normal is 3 (std error ~ sqrt(24/d) ~ 0.05): not uniform (1.8), not Laplace (6).
    assert abs(float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2) - 3) < 0.3
    # Clipped: along the update's direction the residual is one N(0, std^2) draw, not norm - clip.
    assert abs(float(noise @ update) / norm) < 6 * std
    # The integer buffer goes back as received; metrics are the handler's.
    nbt = "bn.num_batches_tracked"
    assert arrays(private)[nbt].numpy().shape == ()
    assert int(arrays(private)[nbt].numpy()) == int(received[nbt].numpy()) == 0
    assert int(arrays(plain)[nbt].numpy()) == 5
    assert private.content["metrics"]["num-examples"] == 64
    # Two runs of the same round draw different noise (OS randomness, no seed to replay).
    (again,) = InProcessGrid(make_app([_dp(tmp_path, clip=clip)]), 1).send_and_receive(
        train_messages([1])
    )
    assert not np.array_equal(flat(arrays(again), keys), flat(arrays(private), keys))


def _epsilons(sigma: float, delta: float, rounds: int) -> list[float]:
    return [
        epsilon_for_history([(sigma, 1.0, 1)] * k, delta=delta, accountant="rdp")
        for k in range(1, rounds + 1)
    ]


def test_the_budget_refuses_after_exactly_k_rounds_across_a_restart(tmp_path: Path) -> None:
    sigma, delta, k = 2.0, 1e-5, 3
    eps = _epsilons(sigma, delta, k + 1)
    budget = (eps[k - 1] + eps[k]) / 2  # rounds 1..k fit, round k+1 does not
    state = tmp_path / "node"
    state.mkdir()

    def node() -> InProcessGrid:  # a fresh process: new mod object, empty Context state
        return InProcessGrid(
            make_app([_dp(state, noise_multiplier=sigma, delta=delta, epsilon_budget=budget)]), 1
        )

    path = state / "privacy" / "partition-0.json"
    first = node()
    for round_ in (1, 2):
        (reply,) = first.send_and_receive(train_messages([1], round_=round_))
        assert not reply.has_error()
        assert len(history(path, 0)) == round_  # on disk when the reply is out
    restarted = node()
    TRAINED.clear()
    (reply,) = restarted.send_and_receive(train_messages([1], round_=3))
    assert not reply.has_error()
    stored = LedgerFile(path, 0).load()
    assert stored is not None and stored.history == [(sigma, 1.0, 1)] * k
    assert stored.spent() == pytest.approx(eps[k - 1])
    (refused,) = restarted.send_and_receive(train_messages([1], round_=4))
    assert refused.has_error() and not refused.has_content()
    assert refused.error.code == PRIVACY_BUDGET_EXHAUSTED
    assert f"epsilon {eps[k]:.2f} > budget {budget:.2f}" in reason(refused)
    assert TRAINED == [0]  # round 4 never reached the user's train()
    assert len(history(path, 0)) == k  # a refused round spends nothing
    # A mod created with a larger budget does not loosen the file's terms.
    (still,) = InProcessGrid(
        make_app([_dp(state, noise_multiplier=sigma, epsilon_budget=1e3)]), 1
    ).send_and_receive(train_messages([1], round_=5))
    assert still.has_error() and still.error.code == PRIVACY_BUDGET_EXHAUSTED


def test_ledgers_are_keyed_by_partition_and_by_the_state_dir_function(tmp_path: Path) -> None:
    def per_run(ctx: Context) -> Path:
        folder = tmp_path / f"run-{ctx.run_id}"
        folder.mkdir(exist_ok=True)
        return folder

    grid = InProcessGrid(make_app([_dp(per_run)]), 2)
    grid.send_and_receive(train_messages([1, 2]))
    grid.contexts[1].run_id = 2  # a second run on node 1
    grid.send_and_receive(train_messages([1]))
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json"))
    assert files == [
        "run-1/privacy/partition-0.json",
        "run-1/privacy/partition-1.json",
        "run-2/privacy/partition-0.json",
    ]
    for name in files:
        partition = int(name[-6])
        assert len(history(tmp_path / name, partition)) == 1


def test_an_unusable_ledger_refuses_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    TRAINED.clear()
    (reply,) = InProcessGrid(make_app([_dp(tmp_path / "absent")]), 1).send_and_receive(
        train_messages([1])
    )
    assert reply.error.code == PRIVACY_LEDGER_UNUSABLE and "not an existing folder" in reason(reply)
    InProcessGrid(make_app([_dp(tmp_path)]), 1).send_and_receive(train_messages([1]))
    path = tmp_path / "privacy" / "partition-0.json"
    data = json.loads(path.read_text())
    data["history"] = []  # a hand edit resetting the spend
    path.write_text(json.dumps(data))
    (reply,) = InProcessGrid(make_app([_dp(tmp_path)]), 1).send_and_receive(train_messages([1]))
    assert reply.error.code == PRIVACY_LEDGER_UNUSABLE and "sha256" in reason(reply)
    assert TRAINED == [0]  # only the one good round trained
    # A ledger that cannot be written: the trained update is not sent.
    path.unlink()

    def full_disk(self: LedgerFile, ledger: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LedgerFile, "save", full_disk)
    (reply,) = InProcessGrid(make_app([_dp(tmp_path)]), 1).send_and_receive(train_messages([1]))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == PRIVACY_LEDGER_UNUSABLE and "No space left" in reason(reply)


def test_replies_that_cannot_be_privatized_are_refused(tmp_path: Path) -> None:
    def renaming(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        reply = call_next(msg, context)
        reply.content["arrays"] = ArrayRecord({"w": arrays(reply)["fc2.bias"]})
        return reply

    (reply,) = InProcessGrid(make_app([_dp(tmp_path), renaming]), 1).send_and_receive(
        train_messages([1])
    )
    assert reply.error.code == LOCAL_DP_REFUSED and "keys differ" in reason(reply)
    (reply,) = InProcessGrid(make_app([_dp(tmp_path)]), 1).send_and_receive(
        train_messages([1], lr=float("inf"))
    )
    assert reply.error.code == LOCAL_DP_REFUSED and "not finite" in reason(reply)
    assert not (
        tmp_path / "privacy" / "partition-0.json"
    ).exists()  # nothing released, nothing spent
    for bad, match in (
        ({"clip": 0.0}, "clip"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"epsilon_budget": math.inf}, "epsilon_budget"),
    ):
        with pytest.raises(ValueError, match=match):
            _dp(tmp_path, **bad)


# ---- both, under Flower's own strategy -----------------------------------------------


def test_flower_round_loop_trains_a_plain_app_with_signed_private_replies(
    tmp_path: Path, key_dir: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # What the user writes: the two mods, signing first (it signs what local_dp sends).
    app = make_app(
        [
            signing(key=lambda ctx: key_dir / f"client-{ctx.node_config['partition-id']}.pem"),
            local_dp(
                clip=1.0, noise_multiplier=0.5, delta=1e-5, epsilon_budget=200.0, state_dir=state
            ),
        ]
    )
    grid = SignatureFilter(load_registry(key_dir))
    strategy = FedSecStrategy(rule=make_rule("mean"), fraction_evaluate=1.0, filters=[grid])
    result = strategy.start(
        grid=InProcessGrid(app, 3).as_grid(),
        initial_arrays=global_arrays(),
        train_config=ConfigRecord({"lr": 0.5}),
        num_rounds=2,
    )
    assert grid.take_rejected() == []
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    for pid in range(3):
        assert len(history(state / "privacy" / f"partition-{pid}.json", pid)) == 2
