"""Server side of signed client replies: a grid wrapper that checks every reply.

:class:`VerifyingGrid` wraps the grid the round loop and the SecAgg workflow
talk through. After each exchange it checks every reply that is not an error
(errors stay as they are: the strategy and the workflow treat them as a
failure or a dropout) and hands on only those that pass, without their
``fedsec-signature`` record:

* the ``fedsec-signature`` ConfigRecord is there, with a string identity
  and bytes signature;
* the reply answers a message of this exchange sent to the node it comes
  from (its ``reply_to_message_id`` and source node);
* the identity is registered (``<identity>.pub`` in the key dir);
* the signature verifies over the reply's run id, ``reply_to_message_id``,
  message type and group id and the digest of its content
  (:func:`fedsec.client.signing_mod.content_digest`);
* no other reply of the exchange claims the same identity (if several do,
  all of them are excluded: the server cannot tell which one is legitimate,
  and one key must not count twice).

Every exclusion is logged at WARNING in one line naming the node and the
reason, and counted; :meth:`VerifyingGrid.take_rejected` hands the round
loop the exclusions since it last asked (the round metric
``signatures_rejected``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

from flwr.app import Message
from flwr.serverapp import Grid

from fedsec.client.signing_mod import SIGNATURE_KEY, content_digest
from fedsec.config import ConfigError, ExperimentConfig
from fedsec.deploy.signatures import SignatureError, load_registry, verify_reply

from .transport import send_and_receive

__all__ = ["Rejection", "VerifyingGrid", "check_reply", "with_signatures"]

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


class VerifyingGrid:
    """A grid wrapper that passes on only replies signed by a registered identity.

    Parameters
    ----------
    grid : Grid
        The grid to wrap (a Flower grid, the in-process grid, another wrapper).
    registry : dict[str, bytes]
        Registered identities and their raw Ed25519 public keys
        (:func:`fedsec.deploy.signatures.load_registry`).
    """

    def __init__(self, grid: Grid, registry: dict[str, bytes]) -> None:
        self.grid = grid
        self.registry = dict(registry)
        self.identities: dict[int, str] = {}  # node id -> identity of its last accepted reply
        self._rejected: list[Rejection] = []

    def as_grid(self) -> Grid:
        """This wrapper typed as Flower's Grid (it forwards what the strategy uses)."""
        return self  # type: ignore[return-value]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's nodes."""
        return self.grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send through the wrapped grid; return the error replies and the verified ones."""
        messages = list(messages)
        replies = send_and_receive(self.grid, messages, timeout=_timeout(timeout))
        # A real grid sets each message's id when pushing it, so read them after sending.
        sent = {(m.metadata.message_id, m.metadata.dst_node_id) for m in messages}
        kept: list[Message] = []
        checked: list[tuple[Message, str]] = []
        for reply in replies:
            if reply.has_error():
                kept.append(reply)
                continue
            node = reply.metadata.src_node_id
            if (reply.metadata.reply_to_message_id, node) not in sent:
                self._reject(reply, "", "answers no message sent to this node in this exchange")
                continue
            try:
                checked.append((reply, check_reply(reply, self.registry)))
            except SignatureError as err:
                self._reject(reply, _claimed(reply), str(err))
        claims = Counter(identity for _, identity in checked)
        for reply, identity in checked:
            if claims[identity] > 1:
                self._reject(reply, identity, f"identity {identity!r} signed several replies")
                continue
            del reply.content[SIGNATURE_KEY]
            self.identities[reply.metadata.src_node_id] = identity
            kept.append(reply)
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


def _claimed(reply: Message) -> str:
    record = reply.content.config_records.get(SIGNATURE_KEY)
    identity = None if record is None else record.get("identity")
    return identity if isinstance(identity, str) else ""


def _timeout(timeout: float | None) -> float:
    # transport.send_and_receive needs a number; Flower's grids use None for "no limit".
    return float("inf") if timeout is None else timeout


def with_signatures(grid: Grid, cfg: ExperimentConfig) -> VerifyingGrid | None:
    """A :class:`VerifyingGrid` around ``grid`` when ``signatures.required``, else None.

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
    return VerifyingGrid(grid, registry)
