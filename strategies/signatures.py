"""Server side of signed client replies: a filter of the server-side pipeline.

:class:`SignatureFilter` is a step of the pipeline every server-side exchange
goes through (:mod:`fedsec.strategies.pipeline`): plain rounds, every SecAgg
stage and federated evaluation alike. After each exchange it hands on only
the replies that pass, without their ``fedsec-signature`` record:

* every message of the exchange has an id (else nothing is accepted: a
  reply could not be bound to its instruction);
* the reply answers a message of this exchange (``reply_to_message_id``),
  comes from the node that message went to, is the only reply to it, and
  has that message's run id, message type and group id (the round);
* the ``fedsec-signature`` ConfigRecord is there, with a string identity
  and bytes signature, the identity is registered (``<identity>.pub`` in the
  key dir), and the signature verifies over the reply's run id,
  ``reply_to_message_id``, message type and group id and the digest of its
  content (:func:`fedsec.client.signing_mod.content_digest`);
* no other reply of the exchange claims the same identity (if several do,
  all of them are excluded: the server cannot tell which one is legitimate,
  and one key must not count twice).

Error replies carry no content and pass unsigned (the strategy and the
workflow count them as the node's failure or dropout), but only if they
answer a message of the exchange that has no verified reply.

Every exclusion is logged at WARNING in one line naming the node and the
reason, and counted; :meth:`SignatureFilter.take_rejected` hands the round
loop the exclusions since it last asked (the round metric
``signatures_rejected``).

Used from a Flower app as::

    verify = SignatureFilter(load_registry("keys/"))
    strategy = FedSecStrategy(rule=make("median"), filters=[verify])
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from flwr.app import Message

from fedsec.attacks.threat import simulated_adversary
from fedsec.client.signing_mod import content_digest
from fedsec.config import ConfigError, ExperimentConfig
from fedsec.deploy.signatures import SignatureError, load_registry, verify_reply
from fedsec.wire import SIGNATURE_KEY

from .pipeline import Exchange

__all__ = ["Rejection", "SignatureFilter", "check_reply", "with_signatures"]

logger = logging.getLogger("fedsec")


class Rejection(NamedTuple):
    """A reply excluded for its signature."""

    node_id: int
    identity: str  # as claimed, "" if none
    reason: str


def check_reply(reply: Message, registry: dict[str, bytes]) -> str:
    """The registered identity whose valid signature ``reply`` carries.

    Raises
    ------
    SignatureError
        Naming what is wrong: no signature record, a malformed one, an
        unregistered identity, or a signature that does not verify.
    """
    record = reply.content.config_records.get(SIGNATURE_KEY)
    if record is None:
        raise SignatureError(f"unsigned (no '{SIGNATURE_KEY}' record)")
    identity, signature = record.get("identity"), record.get("signature")
    if not isinstance(identity, str) or not isinstance(signature, bytes):
        raise SignatureError(f"malformed '{SIGNATURE_KEY}' record")
    public = registry.get(identity)
    if public is None:
        raise SignatureError(f"identity {identity!r} is not registered")
    meta = reply.metadata
    verify_reply(
        public,
        signature,
        run_id=meta.run_id,
        message_id=meta.reply_to_message_id,
        message_type=meta.message_type,
        group_id=meta.group_id,
        identity=identity,
        content_digest=content_digest(reply.content),
    )
    return identity


class SignatureFilter:
    """A pipeline filter that passes on only replies signed by a registered identity.

    Parameters
    ----------
    registry : dict[str, bytes]
        Registered identities and their raw Ed25519 public keys
        (:func:`fedsec.deploy.signatures.load_registry`).
    """

    def __init__(self, registry: Mapping[str, bytes]) -> None:
        self.registry = dict(registry)
        self._rejected: list[Rejection] = []

    def __repr__(self) -> str:
        return f"SignatureFilter({len(self.registry)} identities)"

    def __call__(self, messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        """Exchange ``messages`` through ``next``; pass on error replies and verified ones."""
        replies = next(messages, timeout)
        # A real grid sets each message's id when pushing it, so read them after sending.
        sent = {m.metadata.message_id: m for m in messages}
        if "" in sent:
            # Without ids nothing binds a reply to its instruction: replays would pass.
            for reply in replies:
                self._reject(reply, _claimed(reply), "the grid sent messages without ids")
            return []
        answers = Counter(r.metadata.reply_to_message_id for r in replies if not r.has_error())
        errors: list[Message] = []
        checked: list[tuple[Message, str]] = []
        for reply in replies:
            request = sent.get(reply.metadata.reply_to_message_id)
            if request is None:
                self._reject(reply, _claimed(reply), "answers no message of this exchange")
            elif reply.has_error():
                # Flower's own errors may come from the ServerApp's node id: match on the id only.
                errors.append(reply)
            else:
                problem = _mismatch(reply, request, answers)
                if problem is not None:
                    self._reject(reply, _claimed(reply), problem)
                    continue
                try:
                    checked.append((reply, check_reply(reply, self.registry)))
                except SignatureError as err:
                    self._reject(reply, _claimed(reply), str(err))
        claims = Counter(identity for _, identity in checked)
        kept: list[Message] = []
        for reply, identity in checked:
            if claims[identity] > 1:
                self._reject(reply, identity, f"identity {identity!r} signed several replies")
                continue
            del reply.content[SIGNATURE_KEY]
            kept.append(reply)
        answered = {r.metadata.reply_to_message_id for r in kept}
        # An error for a message that has a verified answer would count the node twice.
        kept[:0] = [e for e in errors if e.metadata.reply_to_message_id not in answered]
        return kept

    def take_rejected(self) -> list[Rejection]:
        """The exclusions since the last call (the round loop calls it once a round)."""
        taken, self._rejected = self._rejected, []
        return taken

    def _reject(self, reply: Message, identity: str, reason: str) -> None:
        meta = reply.metadata
        self._rejected.append(Rejection(meta.src_node_id, identity, reason))
        logger.warning(
            "signatures: excluded %s reply of node %d: %s",
            meta.message_type,
            meta.src_node_id,
            reason,
        )


def _mismatch(reply: Message, request: Message, answers: Counter[str]) -> str | None:
    """Why ``reply`` is not a well-formed single answer to ``request``, or None."""
    got, sent = reply.metadata, request.metadata
    if got.src_node_id != sent.dst_node_id:
        return f"answers a message sent to node {sent.dst_node_id}"
    if answers[got.reply_to_message_id] > 1:
        return "one of several replies to the same message"
    for field in ("run_id", "message_type", "group_id"):
        if getattr(got, field) != getattr(sent, field):
            return f"its {field} differs from the message it answers"
    return None


def _claimed(reply: Message) -> str:
    if reply.has_error():  # an error reply has no content to read
        return ""
    record = reply.content.config_records.get(SIGNATURE_KEY)
    identity = None if record is None else record.get("identity")
    return identity if isinstance(identity, str) else ""


def with_signatures(cfg: ExperimentConfig) -> SignatureFilter | None:
    """The :class:`SignatureFilter` of ``cfg`` when ``signatures.required``, else None.

    Raises
    ------
    ConfigError
        If the key dir is missing, empty or holds a malformed public key.
    """
    if not cfg.signatures.required:
        return None
    try:
        registry = load_registry(cfg.signatures.key_dir)
    except SignatureError as err:
        raise ConfigError("signatures.key_dir", str(err)) from None
    logger.info("signatures: %d registered identities", len(registry))
    private = sorted(p.name for p in Path(cfg.signatures.key_dir).expanduser().glob("*.pem"))
    if private and not simulated_adversary():
        # A simulation shares the folder with its clients; a server needs only the .pub files.
        logger.warning(
            "signatures: %s also holds private keys (%s); remove them from the server",
            cfg.signatures.key_dir,
            ", ".join(private[:3]) + (", ..." if len(private) > 3 else ""),
        )
    return SignatureFilter(registry)
