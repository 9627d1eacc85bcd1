"""fedsec's own ClientApp is built from the public mods a Flower user composes.

The config's non-colluding model attack and its boost reach the update through
:func:`fedsec.client.attack_mods.attack_mod` (via
:func:`fedsec.client.app.configured_attack_mod`), not through a private copy of
the attack code; the mod chain of the ``train`` handler is signing, then secure
aggregation (with the colluders' mod), then the attack.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV, malicious_partitions
from fedsec.client import app as fedsec_app
from fedsec.config import parse_config
from fedsec.wire import WIRE_CONFIG_KEY

NUM_CLIENTS = 10
SEED = 3
GLOBAL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
STEP = {"w": np.full((2, 3), 0.25, np.float32), "b": np.array([-0.5, 0.5], np.float32)}


def _message(attack: dict[str, object], server_round: int) -> Message:
    cfg = parse_config(
        {
            "experiment": {"seed": SEED},
            "data": {"dataset": "digits", "num_clients": NUM_CLIENTS},
            "attack": attack,
        }
    )
    config = ConfigRecord(
        {WIRE_CONFIG_KEY: json.dumps(cfg.to_dict()), "server-round": server_round}
    )
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content=content, dst_node_id=1, message_type="train")


def _honest_train(msg: Message, context: Context) -> Message:
    arrays = msg.content.array_records["arrays"]
    trained = {k: Array(arrays[k].numpy() + STEP[k]) for k in arrays}
    content = RecordDict(
        {"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 8})}
    )
    return Message(content=content, reply_to=msg)


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


def _update(reply: Message) -> dict[str, np.ndarray]:
    arrays = reply.content.array_records["arrays"]
    return {k: arrays[k].numpy() - GLOBAL[k] for k in GLOBAL}


@pytest.fixture(autouse=True)
def _simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")


def test_train_handler_runs_the_public_mods_in_order() -> None:
    # Flower keeps a handler's mods inside its wrapper: the decorator is the record.
    import inspect

    source = inspect.getsource(fedsec_app)
    assert "@app.train(mods=[signing_mod, _secagg_or_collude, configured_attack_mod])" in source
    assert "_poison_update" not in inspect.getsource(
        __import__("fedsec.client.handlers").client.handlers
    )


@pytest.mark.parametrize(("boost", "scale"), [(1.0, 2.0), (3.0, 1.0), (3.0, 2.0)])
def test_configured_sign_flip_and_boost_act_on_the_malicious_update(
    boost: float, scale: float
) -> None:
    attack = {"name": "sign-flip", "fraction": 0.2, "boost": boost, "params": {"scale": scale}}
    bad = sorted(malicious_partitions(NUM_CLIENTS, 2, SEED))
    good = sorted(set(range(NUM_CLIENTS)) - set(bad))
    msg = _message(attack, server_round=1)
    poisoned = _update(fedsec_app.configured_attack_mod(msg, _context(bad[0]), _honest_train))
    honest = _update(fedsec_app.configured_attack_mod(msg, _context(good[0]), _honest_train))
    for key in GLOBAL:
        np.testing.assert_allclose(honest[key], STEP[key], rtol=1e-6)
        np.testing.assert_allclose(poisoned[key], -scale * boost * STEP[key], rtol=1e-5)


def test_attack_waits_for_its_start_round_and_acts_only_in_a_simulation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attack = {"name": "sign-flip", "fraction": 0.2, "start_round": 3}
    bad = sorted(malicious_partitions(NUM_CLIENTS, 2, SEED))[0]
    early = _update(
        fedsec_app.configured_attack_mod(_message(attack, 2), _context(bad), _honest_train)
    )
    late = _update(
        fedsec_app.configured_attack_mod(_message(attack, 3), _context(bad), _honest_train)
    )
    np.testing.assert_allclose(early["w"], STEP["w"], rtol=1e-6)
    np.testing.assert_allclose(late["w"], -STEP["w"], rtol=1e-6)
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "0")
    deployed = _update(
        fedsec_app.configured_attack_mod(_message(attack, 3), _context(bad), _honest_train)
    )
    np.testing.assert_allclose(deployed["w"], STEP["w"], rtol=1e-6)


def test_data_poisoning_is_boosted_by_the_scaling_mod_only() -> None:
    attack = {"name": "label-flip", "fraction": 0.2, "boost": 4.0}
    bad = sorted(malicious_partitions(NUM_CLIENTS, 2, SEED))[0]
    update = _update(
        fedsec_app.configured_attack_mod(_message(attack, 1), _context(bad), _honest_train)
    )
    np.testing.assert_allclose(update["b"], 4.0 * STEP["b"], rtol=1e-6)


def test_the_resident_model_starts_every_message_without_gradients() -> None:
    """The client keeps one model per architecture; a message never sees the gradients
    the previous one left (a user loop may zero them only after its step)."""
    import torch

    from fedsec.client.handlers import _resident_model

    model = _resident_model("mlp", (1, 8, 8), 10)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert any(p.grad is not None for p in model.parameters())
    again = _resident_model("mlp", (1, 8, 8), 10)
    assert again is model
    assert all(p.grad is None for p in again.parameters())
