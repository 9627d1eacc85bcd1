"""One signing implementation: fedsec's ClientApp signs through the public ``Signing`` mod.

fedsec's ``signing_mod`` is :func:`fedsec.client.mods.signing` configured with
fedsec's key source (node config, SecAgg key folder, or a simulation's server
folder), so what a Flower user adopts is exactly what fedsec's own app runs
(issue 18: "fedsec's own ClientApp ... use only the public components"). The
behaviours of both former implementations stay covered by
``tests/test_signatures.py`` and ``tests/test_client_mods.py``; these tests
cover the composition and what the public mod gained for it: a key source of
``(message, context)``, and "no key: reply unsigned" only where the source's
creator allows it.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
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

from fedsec.client.app import app as client_app
from fedsec.client.mods import Signing, signing
from fedsec.client.signing_mod import node_identity, node_key, signing_mod
from fedsec.deploy.signatures import SignatureError, load_registry
from fedsec.secagg.signing import write_key_dir
from fedsec.strategies.signatures import check_reply
from fedsec.wire import SIGNATURE_KEY, SIGNING_REFUSED, WIRE_CONFIG_KEY

ROOT = Path(__file__).resolve().parents[1]


def _context(**node: Any) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, **node},
        state=RecordDict(),
        run_config={},
    )


def _instruction(config: dict[str, Any] | None = None, *, kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})})
    if config is not None:
        content["config"] = ConfigRecord({WIRE_CONFIG_KEY: json.dumps(config)})
    msg = Message(content, message_type=kind, dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grid does when pushing
    return msg


def _answer(msg: Message, context: Context) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, 2.0, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=msg)


def _mods_of(handler: Callable[..., Message]) -> list[object]:
    """The mods Flower wrapped around a registered handler, outermost first.

    Flower's ``make_ffn`` nests one closure per mod, each holding ``_mod`` and
    the next function ``_ffn``.
    """
    mods: list[object] = []
    while handler.__closure__ and "_mod" in handler.__code__.co_freevars:
        cells = dict(zip(handler.__code__.co_freevars, handler.__closure__, strict=True))
        mods.append(cells["_mod"].cell_contents)
        handler = cells["_ffn"].cell_contents
    return mods


# ---- fedsec's ClientApp composes the public mod --------------------------------------


def test_fedsec_clientapp_signs_through_the_public_signing_mod() -> None:
    registered = client_app._registered_funcs
    for name in ("train.default", "evaluate.default"):
        mods = _mods_of(registered[name])
        assert mods and isinstance(mods[0], Signing), (name, mods)
        assert mods[0] is signing_mod  # outermost: it signs what SecAgg's mod produced
        assert not any(isinstance(mod, Signing) for mod in mods[1:])
    assert signing_mod.key is node_key and signing_mod.identity is node_identity
    assert signing_mod.allow_unsigned  # fedsec's source says when a node has no key


def test_a_message_to_fedsec_clientapp_passes_through_signing_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Signing] = []
    call = Signing.__call__

    def spy(self: Signing, msg: Message, context: Context, call_next: Any) -> Message:
        seen.append(self)
        return call(self, msg, context, call_next)

    monkeypatch.setattr(Signing, "__call__", spy)
    # The server requires signatures and this node has no key: refused before training.
    required = {"data": {"num_clients": 3}, "signatures": {"required": True}}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = client_app(_instruction(required, kind=kind), _context())
        assert reply.has_error() and reply.error.code == SIGNING_REFUSED
        assert "'signing-key'" in str(reply.error.reason)
    assert seen == [signing_mod, signing_mod]


def test_no_module_but_reply_signing_signs_a_reply() -> None:
    """A second signing implementation would call these; only the public mod's module does."""
    callers = set()
    sources = sorted((ROOT / "fedsec").rglob("*.py")) + sorted((ROOT / "strategies").glob("*.py"))
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in {"sign_reply", "sign_message"}:
                    callers.add(path.relative_to(ROOT).as_posix())
    assert callers == {"fedsec/client/reply_signing.py"}


# ---- what the public mod gained --------------------------------------------------------


def test_a_key_function_of_the_message_signs_with_the_key_it_picks(tmp_path: Path) -> None:
    write_key_dir(tmp_path, ["client-0", "client-1"])
    registry = load_registry(tmp_path)

    def by_message(msg: Message, context: Context) -> Path:
        who = 1 if msg.metadata.message_type == MessageType.EVALUATE else 0
        return tmp_path / f"client-{who}.pem"

    mod = signing(key=by_message)
    for kind, identity in ((MessageType.TRAIN, "client-0"), (MessageType.EVALUATE, "client-1")):
        reply = mod(_instruction(kind=kind), _context(), _answer)
        assert check_reply(reply, registry) == identity
    with pytest.raises(TypeError, match="needs the message"):
        mod.signer(_context())


def test_none_means_unsigned_only_where_the_source_allows_it(tmp_path: Path) -> None:
    calls: list[Message] = []

    def handler(msg: Message, context: Context) -> Message:
        calls.append(msg)
        return _answer(msg, context)

    def no_key(context: Context) -> None:
        return None

    refused = signing(key=no_key)(_instruction(), _context(), handler)
    assert refused.has_error() and refused.error.code == SIGNING_REFUSED
    assert "key function returned NoneType" in str(refused.error.reason)
    assert calls == []  # refused before the handler ran

    unsigned = signing(key=no_key, allow_unsigned=True)(_instruction(), _context(), handler)
    assert not unsigned.has_error() and SIGNATURE_KEY not in unsigned.content
    assert len(calls) == 1
    # A key that is given but unusable is still refused under allow_unsigned.
    missing = signing(key=lambda ctx: tmp_path / "gone.pem", allow_unsigned=True)
    reply = missing(_instruction(), _context(), handler)
    assert reply.has_error() and "gone.pem not found" in str(reply.error.reason)


def test_a_source_refuses_in_its_own_words_and_bad_sources_fail_at_creation() -> None:
    def refuse(msg: Message, context: Context) -> None:
        raise SignatureError("none, and this server requires one")

    reply = signing(key=refuse, allow_unsigned=True)(_instruction(), _context(), _answer)
    assert reply.has_error() and reply.error.code == SIGNING_REFUSED
    assert str(reply.error.reason) == "signing key: none, and this server requires one"

    with pytest.raises(ValueError, match="allow_unsigned=True needs a key function"):
        signing(key="keys/client-0.pem", allow_unsigned=True)
    with pytest.raises(ValueError, match="allow_unsigned=True needs a key function"):
        signing(key=Ed25519PrivateKey.generate(), identity="x", allow_unsigned=True)
    with pytest.raises(TypeError, match=r"takes \(context\) or \(message, context\)"):
        signing(key=lambda: "keys/client-0.pem")
    with pytest.raises(TypeError, match=r"takes \(context\) or \(message, context\)"):
        signing(key=lambda a, b, c: "keys/client-0.pem")


def test_fedsec_key_source_and_identity(tmp_path: Path) -> None:
    write_key_dir(tmp_path / "n", ["alice"])
    write_key_dir(tmp_path / "s", ["client-0", "bob"])
    named = _context(**{"signing-key": str(tmp_path / "n" / "alice.pem")})
    assert node_key(_instruction(), named) == tmp_path / "n" / "alice.pem"
    assert node_identity(named) is None  # the file's stem
    renamed = _context(**{"signing-key": "k.pem", "signing-identity": "al"})
    assert node_identity(renamed) == "al"
    folder = _context(**{"secagg-key-dir": str(tmp_path / "s"), "secagg-identity": "bob"})
    assert node_key(_instruction(), folder) == tmp_path / "s" / "bob.pem"
    assert node_identity(folder) == "bob"
    assert node_key(_instruction(), _context(**{"secagg-key-dir": str(tmp_path / "s")})) == (
        tmp_path / "s" / "client-0.pem"
    )
    assert node_key(_instruction(), _context()) is None  # no key: unsigned
    required = {"signatures": {"required": True}}
    with pytest.raises(SignatureError, match=r"signatures\.required is set"):
        node_key(_instruction(required), _context())
