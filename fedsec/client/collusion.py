"""The client side of colluding attacks in a simulation, as a Flower mod for any ClientApp.

Colluding attacks (ALIE, IPM, Min-Max, Min-Sum, Fang, Mimic; Baruch et al.
2019, Xie et al. 2020, Shejwalkar & Houmansadr 2021, Fang et al. 2020) pool the
malicious clients' updates before the server sees them. In a simulation that
pooling is played by the server-side
:class:`~fedsec.strategies.adversary.AdversaryFilter`; :func:`collusion_mod`
is its counterpart on the malicious clients:

* plain rounds: it tags the malicious client's training reply (the metric
  :data:`~fedsec.attacks.threat.MALICIOUS_TAG`, and the referee's
  :data:`~fedsec.attacks.threat.TRUTH_TAG`); the filter crafts the colluders'
  models in place and strips both tags before the strategy sees the replies;
* secure aggregation (fedsec's :func:`~fedsec.client.secagg_mod.secagg_mod`
  as ``inner``): at the masked-input stage a colluder first answers with its
  plain, tagged update, bypassing ``inner`` and leaving its protocol state as
  it was; the filter crafts the colluders' updates from their pooled updates
  (never the honest ones, which stay masked) and sends each colluder its
  masked-input request again with its crafted update in the ArrayRecord
  :data:`ADVERSARY_KEY`, which the colluder masks in place of training. The
  server sees only masked vectors, as it would from real colluders.

A crafted update is masked as a malicious client would mask it: without the
round's norm bound and without distributed-DP noise (those are the client's
own steps, which an attacker skips; the server's norm check exists for it).
Everything else (the shares, the weight, a pipelined set-up of the next
round) goes through ``inner`` exactly as for an honest client.

The mod acts only in a process where the simulation turned the adversary mode
on (:func:`fedsec.attacks.threat.enable_simulated_adversary`, which fedsec's
in-process grid, ``fedsec run`` and the bench set; a Flower user calls it
before ``run_simulation``). Elsewhere (a deployed node) it is ``inner`` and
nothing else, whatever its configuration or the server's messages say, so a
server can never obtain a plain update. A node without this mod has no
collusion path at all: ``secagg_mod`` alone always masks.

Importing this module is light (no torch): fedsec's ClientApp installs the mod,
and a SuperNode imports the app for every message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import TypeAlias

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsec.wire import (  # the wire names this module's __all__ re-exports
    ADVERSARY_KEY,
    COLLUSION_REFUSED,
    MALICIOUS_TAG,
    MASKED_INPUT_STAGE,
    METRICS_KEY,
    NUM_EXAMPLES_ARRAY,
    PARTITION_ID_KEY,
    SECAGG_KEY,
    SECAGG_NEXT_KEY,
    TRUTH_TAG,
)

__all__ = [
    "ADVERSARY_KEY",
    "COLLUSION_REFUSED",
    "MASKED_INPUT_STAGE",
    "NUM_EXAMPLES_ARRAY",
    "Malicious",
    "collusion_mod",
]

logger = logging.getLogger("fedsec")

Malicious: TypeAlias = Collection[int] | Callable[[Message, Context], bool]
"""Partition ids of the colluders, or ``(msg, context) -> bool`` for the round ``msg`` opens."""


def collusion_mod(
    inner: Mod | None = None,
    *,
    malicious: Malicious,
) -> Mod:
    """A Flower mod that makes the ``malicious`` nodes of a simulation collude.

    Parameters
    ----------
    inner : Mod, optional
        fedsec's :func:`~fedsec.client.secagg_mod.secagg_mod` in secure rounds
        (the collusion mod replaces it in ``mods``, wrapping it); None without
        secure aggregation.
    malicious : set of int or callable
        Partition ids (node config ``partition-id``) of the colluders, or a
        predicate ``(msg, context) -> bool`` (whether this node colludes in the
        round ``msg`` belongs to, e.g. only from some round on).

    Returns
    -------
    Mod
        Use it in ``ClientApp(mods=[...])``, after a signing mod (which must sign
        the reply as it leaves the node).

    Raises
    ------
    TypeError, ValueError
        In one line, for a malformed ``malicious`` or ``inner``.
    """
    is_malicious = _membership(malicious)
    if inner is not None and not callable(inner):
        raise TypeError(f"inner must be a Flower mod, got {type(inner).__name__}")
    warned = False

    def through_inner(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return call_next(msg, context) if inner is None else inner(msg, context, call_next)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        nonlocal warned
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return through_inner(msg, context, call_next)
        stage = _secagg_stage(msg)
        crafted = msg.content.array_records.get(ADVERSARY_KEY)
        if stage is not None and stage != MASKED_INPUT_STAGE and crafted is None:
            return through_inner(msg, context, call_next)  # keys, shares, unmask
        # Only training exchanges get here: torch and the threat model may load now.
        from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV, simulated_adversary

        if not simulated_adversary():
            if not warned:  # a deployed node never colludes, whatever its app says
                warned = True
                logger.warning(
                    "collusion_mod: not in a simulation (%s unset), this node never colludes",
                    SIMULATED_ADVERSARY_ENV,
                )
            return through_inner(msg, context, call_next)
        if crafted is not None:
            if not is_malicious(msg, context):
                reason = "a crafted update was sent to a node that is not a colluder"
                return Message(Error(code=COLLUSION_REFUSED, reason=reason), reply_to=msg)
            return _mask_crafted(msg, context, call_next, inner, crafted)
        if not is_malicious(msg, context):
            return through_inner(msg, context, call_next)
        if stage == MASKED_INPUT_STAGE:
            # The plain update goes to the colluders (the simulation's adversary), not
            # through inner: this node's protocol state stays as it was for the resend.
            return _tag(call_next(msg, context))
        return _tag(through_inner(msg, context, call_next))

    return mod


def _secagg_stage(msg: Message) -> str | None:
    """The SecAgg stage a training message carries for this round; None if it is plain.

    A message carrying only the next round's set-up (pipelining) is a protocol
    message too (stage ``""``).
    """
    records = msg.content.config_records
    record = records.get(SECAGG_KEY)
    if record is None:
        return "" if SECAGG_NEXT_KEY in records else None
    stage = record.get("stage")
    return stage if isinstance(stage, str) else ""


def _tag(reply: Message) -> Message:
    """Mark a colluder's training reply for the adversary filter and the referee."""
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records.get(METRICS_KEY)
    if metrics is None:
        metrics = MetricRecord()
        reply.content[METRICS_KEY] = metrics
    metrics[MALICIOUS_TAG] = 1
    metrics[TRUTH_TAG] = 1
    return reply


def _mask_crafted(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    inner: Mod | None,
    crafted: ArrayRecord,
) -> Message:
    """Mask the colluders' crafted update in place of training; answer what else ``msg`` asks.

    The masking uses this node's own SecAgg state (as ``inner`` saved it at the
    earlier stages) and skips the norm bound and the noise, as an attacker
    would; a pipelined set-up of the next round riding along is answered by
    ``inner``, unchanged.
    """
    import torch

    from fedsec.client import secagg_mod as secagg
    from fedsec.secagg.messages import MaskedInputRequest, ProtocolError, request_from_record

    if _secagg_stage(msg) != MASKED_INPUT_STAGE:
        reason = "a crafted update can only be masked at the masked-input stage"
        return Message(Error(code=COLLUSION_REFUSED, reason=reason), reply_to=msg)
    try:
        request = request_from_record(dict(msg.content.config_records[SECAGG_KEY]))
        assert isinstance(request, MaskedInputRequest)
        update, num_examples = _crafted_update(crafted)
        client = secagg._load_client(context, msg, request)
        client.receive_shares(request)
        weight = secagg._weight(num_examples, request.weight_cap)
        masked = client.mask(torch.from_numpy(update), weight, malicious=True)
    except (ProtocolError, OSError, ValueError) as err:
        reason = f"{MASKED_INPUT_STAGE}: {err}"
        return Message(Error(code=COLLUSION_REFUSED, reason=reason), reply_to=msg)
    secagg._save_client(context, client)
    content = RecordDict(
        {secagg.MASKED_KEY: ArrayRecord({secagg.MASKED_KEY: Array(masked.masked)})}
    )
    if SECAGG_NEXT_KEY in msg.content.config_records and inner is not None:
        # The next round's set-up rides along (pipelining): inner answers it as for
        # an honest client, from the request without this round's stage.
        original = msg.content
        msg.content = RecordDict(
            {k: v for k, v in original.items() if k not in (SECAGG_KEY, ADVERSARY_KEY)}
        )
        try:
            answer = inner(msg, context, call_next)
        finally:
            msg.content = original
        if not answer.has_error() and SECAGG_NEXT_KEY in answer.content.config_records:
            content[SECAGG_NEXT_KEY] = answer.content.config_records[SECAGG_NEXT_KEY]
    return Message(content, reply_to=msg)


def _crafted_update(crafted: ArrayRecord) -> tuple[np.ndarray, float]:
    """The crafted flat update (float32) and the example count it claims."""
    from fedsec.secagg.messages import ProtocolError

    if ADVERSARY_KEY not in crafted:
        raise ProtocolError(f"crafted update lacks the '{ADVERSARY_KEY}' array")
    update = crafted[ADVERSARY_KEY].numpy()
    if update.ndim != 1 or update.dtype.kind != "f":
        raise ProtocolError("crafted update must be a flat float vector")
    count = crafted[NUM_EXAMPLES_ARRAY].numpy() if NUM_EXAMPLES_ARRAY in crafted else None
    if count is None or count.shape != (1,):
        raise ProtocolError(f"crafted update lacks the '{NUM_EXAMPLES_ARRAY}' array")
    return np.ascontiguousarray(update, dtype=np.float32), float(count[0])


def _membership(malicious: Malicious) -> Callable[[Message, Context], bool]:
    """Turn ``malicious`` into a predicate on the round's message and the node's context."""
    if callable(malicious):
        return malicious
    if isinstance(malicious, str | bytes) or not isinstance(malicious, Collection):
        raise TypeError(
            "malicious must be a set of partition ids or a callable(Message, Context) -> bool, "
            f"got {type(malicious).__name__}"
        )
    ids = frozenset(malicious)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"malicious partition ids must be integers >= 0, got {bad[0]!r}")

    def is_malicious(msg: Message, context: Context) -> bool:
        pid = context.node_config.get(PARTITION_ID_KEY)
        if pid is None:
            raise ValueError(
                f"malicious= a set of partition ids needs the node config '{PARTITION_ID_KEY}' "
                "(set by Flower's simulation); pass a callable(Message, Context) -> bool instead"
            )
        return int(pid) in ids

    return is_malicious
