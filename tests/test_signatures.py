"""Signed client replies: payload and hashing, the client mod, the verifying grid, full rounds.

End-to-end rounds run the real ClientApp (with its signing and secagg mods)
and the real round loop over the in-process grid; a reply "tamper" plays a
relay (or a SuperLink) that alters a reply after the client signed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
from fedsec.client.app import app as client_app
from fedsec.client.signing_mod import (
    SIGNATURE_KEY,
    SIGNING_REFUSED,
    content_digest,
    resolve_signer,
    sign_message,
    signing_mod,
)
from fedsec.config import WIRE_CONFIG_KEY, ConfigError, ExperimentConfig, parse_config
from fedsec.deploy.signatures import (
    ContentHasher,
    SignatureError,
    Value,
    check_public_key,
    hash_values,
    load_registry,
    load_signing_key,
    reply_payload,
    sign_reply,
    verify_reply,
)
from fedsec.runs import RunDirectory
from fedsec.secagg.signing import public_bytes, write_key_dir
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.server_app import run_experiment
from fedsec.strategies.signatures import SignatureFilter, check_reply

FIELDS: dict[str, Any] = {
    "run_id": 7,
    "message_id": "a" * 64,
    "message_type": "train",
    "group_id": "3",
    "identity": "client-0",
    "content_digest": bytes(32),
}


# -- payload and hashing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("run_id", 8),
        ("message_id", "b" * 64),
        ("message_type", "evaluate"),
        ("group_id", "4"),
        ("identity", "client-1"),
        ("content_digest", bytes(31) + b"\x01"),
    ],
)
def test_every_bound_field_changes_the_payload(field: str, other: Any) -> None:
    assert reply_payload(**FIELDS) != reply_payload(**{**FIELDS, field: other})


def test_payload_fields_are_framed() -> None:
    """Moving bytes from one field to the next gives another payload."""
    a = reply_payload(**{**FIELDS, "message_type": "train", "group_id": "x"})
    b = reply_payload(**{**FIELDS, "message_type": "trai", "group_id": "nx"})
    assert a != b
    with pytest.raises(SignatureError, match="64-bit"):
        reply_payload(**{**FIELDS, "run_id": -1})


def test_type_tags_and_lengths_keep_contents_apart() -> None:
    scalars: list[Value] = [1, 1.0, True, "1", b"1", [1], (1.0,), 0.0, -0.0, 0, False, "", b"", []]
    assert len({hash_values(v) for v in scalars}) == len(scalars)
    # A tuple and a list of the same values are the same content (Flower's records hold lists).
    assert hash_values((1, "a")) == hash_values([1, "a"])
    assert hash_values(["ab", "c"]) != hash_values(["a", "bc"])
    assert hash_values("ab", "c") != hash_values("a", "bc")
    assert hash_values([], []) != hash_values([[]])
    assert hash_values(2**70) != hash_values(2**70 + 1) != hash_values(-(2**70))
    assert ContentHasher().update_all([1, "x"]).digest() == hash_values(1, "x")
    with pytest.raises(TypeError, match="NoneType"):
        hash_values(None)  # type: ignore[arg-type]


def test_sign_and_verify_roundtrip() -> None:
    key = Ed25519PrivateKey.generate()
    signature = sign_reply(key, **FIELDS)
    verify_reply(public_bytes(key), signature, **FIELDS)
    with pytest.raises(SignatureError, match="'client-0' does not verify"):
        verify_reply(public_bytes(key), signature, **{**FIELDS, "group_id": "4"})
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_reply(public_bytes(other), signature, **FIELDS)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_reply(b"short", signature, **FIELDS)


def test_content_digest_covers_every_record_but_the_signature() -> None:
    def content(**changes: Any) -> RecordDict:
        values = np.arange(6, dtype=np.float32)
        base: dict[str, Any] = {
            "arrays": ArrayRecord({"w": Array(values), "b": Array(values[:2].copy())}),
            "metrics": MetricRecord({"num-examples": 10, "loss": 0.5}),
            "config": ConfigRecord({"flag": True, "name": "x", "blob": b"\x00", "ids": [1, 2]}),
        }
        base.update(changes)
        return RecordDict(base)

    reference = content_digest(content())
    w = np.arange(6, dtype=np.float32)
    variants = [
        content(arrays=ArrayRecord({"w": Array(w), "b": Array(w[:2].astype(np.float64))})),
        content(arrays=ArrayRecord({"w": Array(w.reshape(2, 3)), "b": Array(w[:2].copy())})),
        content(arrays=ArrayRecord({"v": Array(w), "b": Array(w[:2].copy())})),
        content(metrics=MetricRecord({"num-examples": 10.0, "loss": 0.5})),
        content(metrics=ConfigRecord({"num-examples": 10, "loss": 0.5})),
        content(config=ConfigRecord({"flag": 1, "name": "x", "blob": b"\x00", "ids": [1, 2]})),
        content(config=ConfigRecord({"flag": True, "name": "x", "blob": b"\x00", "ids": [1]})),
        content(extra=MetricRecord({})),
    ]
    assert len({reference, *(content_digest(v) for v in variants)}) == len(variants) + 1
    flipped = content()
    arrays = flipped.array_records["arrays"]
    data = bytearray(arrays["w"].data)
    data[-1] ^= 1
    arrays["w"] = Array(arrays["w"].dtype, arrays["w"].shape, arrays["w"].stype, bytes(data))
    assert content_digest(flipped) != reference
    signed = content()
    signed[SIGNATURE_KEY] = ConfigRecord({"identity": "x", "signature": b"y"})
    assert content_digest(signed) == reference


# -- keys ------------------------------------------------------------------------------


def test_key_files_fail_with_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match=r"signing key .*missing\.pem not found"):
        load_signing_key(tmp_path / "missing.pem")
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ec.pem").write_bytes(ec_key)
    with pytest.raises(SignatureError, match=r"ec\.pem is not an Ed25519 private key"):
        load_signing_key(tmp_path / "ec.pem")
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        load_signing_key(tmp_path / "junk.pem")

    with pytest.raises(SignatureError, match="does not exist"):
        load_registry(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SignatureError, match=r"holds no <identity>\.pub"):
        load_registry(tmp_path / "empty")
    write_key_dir(tmp_path / "keys", ["client-0", "client-1"])
    registry = load_registry(tmp_path / "keys")
    assert sorted(registry) == ["client-0", "client-1"]
    key = load_signing_key(tmp_path / "keys" / "client-1.pem")
    assert registry["client-1"] == public_bytes(key)
    (tmp_path / "keys" / "bad.pub").write_bytes(b"\x00" * 31)
    with pytest.raises(SignatureError, match=r"bad\.pub is not a raw 32-byte"):
        load_registry(tmp_path / "keys")


# -- the client mod --------------------------------------------------------------------


def _context(**node: Any) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, **node},
        state=RecordDict(),
        run_config={},
    )


def _cfg(**signatures: Any) -> ExperimentConfig:
    return parse_config({"data": {"num_clients": 3}, "signatures": signatures})


def _instruction(
    cfg: ExperimentConfig | None = None, node: int = 1, message_id: str | None = None
) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})})
    if cfg is not None:
        import json

        content["config"] = ConfigRecord({WIRE_CONFIG_KEY: json.dumps(cfg.to_dict())})
    msg = Message(content, message_type=MessageType.TRAIN, dst_node_id=node)
    # What Flower's grid does when pushing: the message id is the message's object id.
    msg.metadata.__dict__["_message_id"] = message_id or msg.object_id
    return msg


def _answer(msg: Message, loss: float = 0.5) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, 2.0, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 10, "loss": loss}),
        }
    )
    return Message(content, reply_to=msg)


def test_key_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")  # a simulation: the fallback applies
    write_key_dir(tmp_path / "a", ["alice", "client-0"])
    write_key_dir(tmp_path / "b", ["bob", "client-0"])
    write_key_dir(tmp_path / "c", ["client-0"])
    server = _cfg(key_dir=str(tmp_path / "c"))
    named = resolve_signer(_context(**{"signing-key": str(tmp_path / "a" / "alice.pem")}), server)
    assert named is not None and named[0] == "alice"
    renamed = resolve_signer(
        _context(**{"signing-key": str(tmp_path / "a" / "alice.pem"), "signing-identity": "al"}),
        server,
    )
    assert renamed is not None and renamed[0] == "al"
    secagg = resolve_signer(
        _context(**{"secagg-key-dir": str(tmp_path / "b"), "secagg-identity": "bob"}), server
    )
    assert secagg is not None and secagg[0] == "bob"
    by_partition = resolve_signer(_context(**{"secagg-key-dir": str(tmp_path / "b")}), server)
    assert by_partition is not None
    assert public_bytes(by_partition[1]) == load_registry(tmp_path / "b")["client-0"]
    fallback = resolve_signer(_context(), server)
    assert fallback is not None
    assert public_bytes(fallback[1]) == load_registry(tmp_path / "c")["client-0"]
    # Outside a simulation a node never borrows a key from the server's folder
    # (which holds every node's key: any node could sign as any other).
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "0")
    assert resolve_signer(_context(), server) is None
    monkeypatch.setenv(SIMULATED_ADVERSARY_ENV, "1")
    assert resolve_signer(_context(), _cfg()) is None
    assert resolve_signer(_context(), None) is None
    with pytest.raises(SignatureError, match="not found"):
        resolve_signer(_context(**{"signing-key": str(tmp_path / "none.pem")}), server)


def test_mod_signs_replies_and_refuses_without_a_key(tmp_path: Path) -> None:
    write_key_dir(tmp_path, ["client-0"])
    calls: list[Message] = []

    def handler(msg: Message, context: Context) -> Message:
        calls.append(msg)
        return _answer(msg)

    msg = _instruction(_cfg())
    signed = signing_mod(msg, _context(**{"signing-key": str(tmp_path / "client-0.pem")}), handler)
    assert check_reply(signed, load_registry(tmp_path)) == "client-0"
    assert signed.content.config_records[SIGNATURE_KEY]["identity"] == "client-0"

    unsigned = signing_mod(msg, _context(), handler)  # no key, not required
    assert not unsigned.has_error() and SIGNATURE_KEY not in unsigned.content

    calls.clear()
    required = _instruction(_cfg(required=True, key_dir=str(tmp_path / "elsewhere")))
    refused = signing_mod(required, _context(), handler)
    assert refused.has_error() and refused.error.code == SIGNING_REFUSED
    reason = str(refused.error.reason)
    assert "'signing-key'" in reason and "\n" not in reason
    assert not calls  # refused before training

    bad = signing_mod(msg, _context(**{"signing-key": str(tmp_path / "nope.pem")}), handler)
    assert bad.has_error() and "nope.pem not found" in str(bad.error.reason)

    def failing(msg: Message, context: Context) -> Message:
        return Message(Error(code=99, reason="budget"), reply_to=msg)

    error = signing_mod(msg, _context(**{"signing-key": str(tmp_path / "client-0.pem")}), failing)
    assert error.has_error() and error.error.code == 99


# -- the signature filter ----------------------------------------------------------------


class _ScriptedGrid:
    """Answers each message with ``answer(msg)`` (None: no reply)."""

    def __init__(self, answer: Callable[[Message], Message | None]) -> None:
        self.answer = answer

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [r for m in messages if (r := self.answer(m)) is not None]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Ed25519PrivateKey]:
    names = ["client-0", "client-1", "client-2"]
    write_key_dir(tmp_path, names)
    return {name: load_signing_key(tmp_path / f"{name}.pem") for name in names}


def _registry(keys: dict[str, Ed25519PrivateKey]) -> dict[str, bytes]:
    return {name: public_bytes(key) for name, key in keys.items()}


def _signed(msg: Message, keys: dict[str, Ed25519PrivateKey], name: str = "") -> Message:
    reply = _answer(msg)
    identity = name or f"client-{msg.metadata.dst_node_id - 1}"
    sign_message(reply, msg, identity, keys[identity])
    return reply


def _exchange(
    keys: dict[str, Ed25519PrivateKey], answer: Callable[[Message], Message | None]
) -> tuple[list[Message], SignatureFilter]:
    verify = SignatureFilter(_registry(keys))
    messages = [_instruction(node=n) for n in (1, 2, 3)]
    return pipeline(_ScriptedGrid(answer), [verify])(messages, 1.0), verify  # type: ignore[arg-type]


def test_valid_replies_pass_without_their_signature(keys: dict[str, Ed25519PrivateKey]) -> None:
    replies, grid = _exchange(keys, lambda m: _signed(m, keys))
    assert [r.metadata.src_node_id for r in replies] == [1, 2, 3]
    assert all(SIGNATURE_KEY not in r.content for r in replies)
    assert grid.take_rejected() == []


def _reasons(grid: SignatureFilter) -> dict[int, str]:
    return {r.node_id: r.reason for r in grid.take_rejected()}


def test_tampered_content_is_rejected(
    keys: dict[str, Ed25519PrivateKey], caplog: pytest.LogCaptureFixture
) -> None:
    def tampered(msg: Message) -> Message:
        reply = _signed(msg, keys)
        if msg.metadata.dst_node_id == 2:
            reply.content.metric_records["metrics"]["num-examples"] = 10_000
        return reply

    with caplog.at_level(logging.WARNING, logger="fedsec"):
        replies, grid = _exchange(keys, tampered)
    assert [r.metadata.src_node_id for r in replies] == [1, 3]
    assert _reasons(grid) == {2: "signature of 'client-1' does not verify"}
    lines = [r.getMessage() for r in caplog.records if "signatures" in r.getMessage()]
    assert lines == [
        "signatures: excluded train reply of node 2: signature of 'client-1' does not verify"
    ]


def test_wrong_key_and_another_identity_are_rejected(keys: dict[str, Ed25519PrivateKey]) -> None:
    stranger = Ed25519PrivateKey.generate()

    def forged(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node == 1:  # claims its own identity, signs with another key
            reply = _answer(msg)
            sign_message(reply, msg, "client-0", stranger)
            return reply
        if node == 2:  # signs with its own key, claims to be client-2
            reply = _answer(msg)
            sign_message(reply, msg, "client-1", keys["client-1"])
            record = reply.content.config_records[SIGNATURE_KEY]
            record["identity"] = "client-2"
            return reply
        return _signed(msg, keys)

    replies, grid = _exchange(keys, forged)
    assert [r.metadata.src_node_id for r in replies] == [3]
    reasons = _reasons(grid)
    assert reasons[1] == "signature of 'client-0' does not verify"
    assert reasons[2] == "signature of 'client-2' does not verify"


def test_unsigned_unregistered_malformed_and_duplicate_identities_are_rejected(
    keys: dict[str, Ed25519PrivateKey],
) -> None:
    outsider = Ed25519PrivateKey.generate()

    def answer(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        reply = _answer(msg)
        if node == 1:
            return reply  # unsigned
        if node == 2:
            sign_message(reply, msg, "mallory", outsider)
            return reply
        reply.content[SIGNATURE_KEY] = ConfigRecord({"identity": "client-2", "signature": "x"})
        return reply

    replies, grid = _exchange(keys, answer)
    assert replies == []
    assert _reasons(grid) == {
        1: f"unsigned (no '{SIGNATURE_KEY}' record)",
        2: "identity 'mallory' is not registered",
        3: f"malformed '{SIGNATURE_KEY}' record",
    }
    # Two nodes holding the same key: neither counts (one key must not count twice).
    replies, grid = _exchange(
        keys, lambda m: _signed(m, keys, "client-0" if m.metadata.dst_node_id < 3 else "")
    )
    assert [r.metadata.src_node_id for r in replies] == [3]
    assert _reasons(grid) == {
        1: "identity 'client-0' signed several replies",
        2: "identity 'client-0' signed several replies",
    }


def test_replayed_replies_are_rejected(keys: dict[str, Ed25519PrivateKey]) -> None:
    old = {n: _instruction(node=n, message_id=f"{n:064x}") for n in (1, 2, 3)}
    earlier = {n: _signed(m, keys) for n, m in old.items()}

    def replay(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node == 1:  # an earlier exchange's reply, as it was
            return earlier[1]
        if node == 2:  # an earlier signature and content, under this exchange's message id
            reply = _answer(msg)
            reply.content[SIGNATURE_KEY] = earlier[2].content[SIGNATURE_KEY]
            return reply
        return _signed(msg, keys)

    replies, grid = _exchange(keys, replay)
    assert [r.metadata.src_node_id for r in replies] == [3]
    assert _reasons(grid) == {
        1: "answers no message of this exchange",
        2: "signature of 'client-1' does not verify",
    }


def test_error_replies_pass_unchanged(keys: dict[str, Ed25519PrivateKey]) -> None:
    replies, grid = _exchange(keys, lambda m: Message(Error(code=5, reason="x"), reply_to=m))
    assert len(replies) == 3 and all(r.has_error() for r in replies)
    assert grid.take_rejected() == []


class _ExtraGrid(_ScriptedGrid):
    """Adds the replies ``extra(messages)`` returns to each exchange's answers."""

    def __init__(
        self,
        answer: Callable[[Message], Message | None],
        extra: Callable[[list[Message]], list[Message]],
    ) -> None:
        super().__init__(answer)
        self.extra = extra

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        return [*super().send_and_receive(messages, timeout=timeout), *self.extra(messages)]


def _extra_exchange(
    keys: dict[str, Ed25519PrivateKey], extra: Callable[[list[Message]], list[Message]]
) -> tuple[list[Message], SignatureFilter]:
    verify = SignatureFilter(_registry(keys))
    grid = _ExtraGrid(lambda m: _signed(m, keys), extra)
    messages = [_instruction(node=n) for n in (1, 2, 3)]
    return pipeline(grid, [verify])(messages, 1.0), verify  # type: ignore[arg-type]


def test_a_second_reply_to_one_message_excludes_both(keys: dict[str, Ed25519PrivateKey]) -> None:
    # Another registered key answering node 1's message (as if relayed from node 1).
    def second(messages: list[Message]) -> list[Message]:
        reply = _answer(messages[0], loss=0.9)
        sign_message(reply, messages[0], "client-2", keys["client-2"])
        return [reply]

    replies, grid = _extra_exchange(keys, second)
    assert [r.metadata.src_node_id for r in replies] == [2, 3]
    rejected = grid.take_rejected()
    assert [(r.node_id, r.reason) for r in rejected] == [
        (1, "one of several replies to the same message"),
        (1, "one of several replies to the same message"),
    ]


def test_error_replies_must_answer_this_exchange(keys: dict[str, Ed25519PrivateKey]) -> None:
    stray = Message(Error(code=5, reason="forged"), reply_to=_instruction(node=7))

    def extra(messages: list[Message]) -> list[Message]:
        # A stray error, and an error for a message that also has a verified reply.
        return [stray, Message(Error(code=5, reason="late"), reply_to=messages[0])]

    replies, grid = _extra_exchange(keys, extra)
    assert [(r.metadata.src_node_id, r.has_error()) for r in replies] == [
        (1, False),
        (2, False),
        (3, False),
    ]
    assert _reasons(grid) == {7: "answers no message of this exchange"}


def test_metadata_must_match_the_message_answered(keys: dict[str, Ed25519PrivateKey]) -> None:
    def regroup(msg: Message) -> Message:
        reply = _signed(msg, keys)
        if msg.metadata.dst_node_id == 2:  # signed, then relabelled into another round
            reply.metadata.group_id = "99"
        return reply

    replies, grid = _exchange(keys, regroup)
    assert [r.metadata.src_node_id for r in replies] == [1, 3]
    assert _reasons(grid) == {2: "its group_id differs from the message it answers"}


def test_messages_without_ids_bind_nothing(keys: dict[str, Ed25519PrivateKey]) -> None:
    verify = SignatureFilter(_registry(keys))
    grid = _ScriptedGrid(lambda m: _signed(m, keys))
    messages = [_instruction(node=n, message_id="") for n in (1, 2)]
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = ""
    assert pipeline(grid, [verify])(messages, 1.0) == []  # type: ignore[arg-type]
    assert {r.reason for r in verify.take_rejected()} == {"the grid sent messages without ids"}


def _small_order_and_invalid_keys() -> dict[str, bytes]:
    p = 2**255 - 19
    order8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
    return {
        "identity": (1).to_bytes(32, "little"),  # "R = identity, s = 0" verifies for it
        "zeros": bytes(32),  # y = 0: order 4
        "order-2": (p - 1).to_bytes(32, "little"),
        "order-8": order8.to_bytes(32, "little"),
        "non-canonical": (p + 1).to_bytes(32, "little"),
        "off-curve": b"\xff" * 31 + b"\x7f",
    }


@pytest.mark.parametrize("name", list(_small_order_and_invalid_keys()))
def test_registry_refuses_keys_signatures_can_be_forged_for(tmp_path: Path, name: str) -> None:
    write_key_dir(tmp_path, ["client-0"])
    (tmp_path / "client-1.pub").write_bytes(_small_order_and_invalid_keys()[name])
    with pytest.raises(SignatureError, match=r"client-1\.pub is not a usable Ed25519 public key"):
        load_registry(tmp_path)


def test_the_identity_key_would_accept_a_keyless_forgery() -> None:
    # Why the registry checks the order: no private key is needed for this one.
    identity = (1).to_bytes(32, "little")
    forged = identity + bytes(32)  # R = identity, s = 0
    fields = {
        "run_id": 1,
        "message_id": "m",
        "message_type": "train",
        "group_id": "1",
        "identity": "client-0",
        "content_digest": bytes(32),
    }
    verify_reply(identity, forged, **fields)  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="small or mixed order"):
        check_public_key(identity)


def test_registry_refuses_one_key_under_two_identities(tmp_path: Path) -> None:
    write_key_dir(tmp_path, ["client-0"])
    (tmp_path / "client-0-alias.pub").write_bytes((tmp_path / "client-0.pub").read_bytes())
    with pytest.raises(
        SignatureError, match=r"client-0\.pub holds the same key as client-0-alias\.pub; one key"
    ):
        load_registry(tmp_path)


# -- full rounds -----------------------------------------------------------------------


def _config(key_dir: Path, clients: int = 3, rounds: int = 1, **sections: Any) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "signed", "rounds": rounds, "seed": 2},
            "data": {"num_clients": clients},
            "client": {"local_epochs": 1, "evaluate_fraction": 1.0},
            "signatures": {"required": True, "key_dir": str(key_dir)},
            **sections,
        }
    )


def _run(
    cfg: ExperimentConfig,
    tmp_path: Path,
    tamper: dict[int, Callable[[Message], Message | None]] | None = None,
) -> RunDirectory:
    run = RunDirectory.create(cfg, tmp_path)
    grid = InProcessGrid(client_app, cfg.data.num_clients, tamper=tamper)
    run_experiment(grid.as_grid(), cfg, run)
    return run


def _flip_one_byte(reply: Message) -> Message:
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    arrays = reply.content.array_records["arrays"]
    name = next(iter(arrays))
    array = arrays[name]
    data = bytearray(array.data)
    data[-1] ^= 0x01
    arrays[name] = Array(array.dtype, array.shape, array.stype, bytes(data))
    return reply


def test_required_signatures_accept_every_honest_reply(tmp_path: Path) -> None:
    write_key_dir(tmp_path / "keys", [f"client-{i}" for i in range(3)])
    signed: list[bool] = []

    def watch(reply: Message) -> Message:
        signed.append(SIGNATURE_KEY in reply.content)  # the server strips it once checked
        return reply

    run = _run(_config(tmp_path / "keys"), tmp_path / "run", tamper={1: watch})
    round1 = run.rounds[1]
    assert round1["status"] == "ok" and round1["num-accepted"] == 3
    assert round1["signatures_rejected"] == 0
    assert "federated_eval_accuracy" in round1  # evaluate replies passed the check too
    assert signed == [True, True]  # train, evaluate


def test_a_tampered_reply_is_excluded_and_counted(tmp_path: Path) -> None:
    write_key_dir(tmp_path / "keys", [f"client-{i}" for i in range(3)])
    run = _run(_config(tmp_path / "keys"), tmp_path / "run", tamper={2: _flip_one_byte})
    round1 = run.rounds[1]
    assert round1["status"] == "ok" and round1["signatures_rejected"] == 1
    assert (round1["num-replies"], round1["num-accepted"]) == (2, 2)


def test_secure_aggregation_stage_replies_are_signed_too(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_key_dir(keys, [f"client-{i}" for i in range(4)])
    secagg = {"enabled": True, "clip": 4.0, "signed": True, "key_dir": str(keys)}
    cfg = _config(keys, clients=4, rounds=2, secagg={**secagg, "dropout_rate": 0.0})
    stages: list[bool] = []

    def watch(reply: Message) -> Message:
        stages.append(SIGNATURE_KEY in reply.content)
        return reply

    run = _run(cfg, tmp_path / "run", tamper={3: watch})
    assert [r["status"] for r in run.rounds[1:]] == ["ok", "ok"]
    assert [r["signatures_rejected"] for r in run.rounds[1:]] == [0, 0]
    assert [r["num-accepted"] for r in run.rounds[1:]] == [4, 4]
    assert len(stages) > 4 and all(stages)  # identify, keys, shares, masked input, check, unmask


def test_a_node_without_a_key_answers_with_an_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_key_dir(keys, [f"client-{i}" for i in range(3)])
    (keys / "client-2.pem").unlink()
    errors: list[str] = []

    def watch(reply: Message) -> Message:
        if reply.has_error():
            errors.append(f"{reply.error.code}: {reply.error.reason}")
        return reply

    run = _run(_config(keys), tmp_path / "run", tamper={3: watch})
    round1 = run.rounds[1]
    assert round1["status"] == "ok" and round1["num-accepted"] == 2
    assert round1["num-excluded"] == 1 and round1["signatures_rejected"] == 0
    assert errors and all(e.startswith(f"{SIGNING_REFUSED}: ") for e in errors)
    assert "'signing-key'" in errors[0]


def test_a_missing_key_dir_fails_before_round_one(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "nowhere")
    run = RunDirectory.create(cfg, tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"^signatures\.key_dir: key dir .*nowhere does not exist$"
    ):
        run_experiment(InProcessGrid(client_app, 3).as_grid(), cfg, run)
    assert run.rounds == []


@pytest.mark.parametrize("secure", [False, True])
def test_colluders_sign_their_crafted_updates(tmp_path: Path, secure: bool) -> None:
    """The check sits under the simulation's adversary component, which must see verified
    replies; under SecAgg the colluders mask and sign its crafted updates themselves."""
    keys = tmp_path / "keys"
    write_key_dir(keys, [f"client-{i}" for i in range(4)])
    sections: dict[str, Any] = {
        "attack": {"name": "ipm", "num_malicious": 2, "params": {"epsilon": 2.0}},
    }
    if secure:
        sections["secagg"] = {"enabled": True, "clip": 4.0, "dropout_rate": 0.0}
    run = _run(_config(keys, clients=4, **sections), tmp_path / "run")
    round1 = run.rounds[1]
    assert round1["status"] == "ok" and round1["num-accepted"] == 4
    assert round1["signatures_rejected"] == 0


def test_a_reply_replayed_into_the_next_round_is_excluded(tmp_path: Path) -> None:
    write_key_dir(tmp_path / "keys", [f"client-{i}" for i in range(3)])
    first: list[Message] = []

    def replay(reply: Message) -> Message:
        if reply.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        if not first:
            first.append(reply)  # node 1's signed round-1 update, kept by a relay
            return reply
        return first[0] if reply.metadata.group_id == "2" else reply

    cfg = _config(tmp_path / "keys", rounds=2)
    run = _run(cfg, tmp_path / "run", tamper={1: replay})
    assert [r["signatures_rejected"] for r in run.rounds[1:]] == [0, 1]
    assert run.rounds[2]["status"] == "ok" and run.rounds[2]["num-accepted"] == 2


def test_the_adversary_component_runs_only_in_simulations(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsec.strategies.adversary import AdversaryFilter
    from fedsec.strategies.server_app import _with_adversary

    cfg = parse_config({"attack": {"name": "ipm", "num_malicious": 1}})
    InProcessGrid(client_app, 3)  # turns the mode on, as simulations do
    assert isinstance(_with_adversary(cfg), AdversaryFilter)
    monkeypatch.delenv("FEDSEC_SIMULATED_ADVERSARY")  # a deployment's ServerApp
    assert _with_adversary(cfg) is None
