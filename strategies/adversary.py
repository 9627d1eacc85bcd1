"""The simulation's adversary (colluding attacks) and referee (ground truth), as a filter.

Colluding attacks (ALIE, IPM, Min-Max, Min-Sum, Fang, Mimic) need the pooled
updates of all malicious clients, and an omniscient adversary also sees the
honest ones. :class:`AdversaryFilter` plays that adversary between the clients
and the server, as one filter of the server-side pipeline
(:mod:`fedsec.strategies.pipeline`): it takes a training exchange's replies,
lets the attack rewrite the malicious clients' models, and hands the result
on. It models collusion among the attackers (a side channel outside the
protocol), never the server's own view: the strategy gets exactly what it
would get from malicious clients that crafted their updates together.

Malicious clients identify themselves to it with the ``fedsec.malicious``
reply metric (:func:`fedsec.client.collusion.collusion_mod` sets it), which it
removes before the server sees the replies. As the referee it also strips
every malicious client's ``fedsec.truth.malicious`` tag (any attack) and
remembers which nodes were malicious in the last training exchange, so the
experiment can score the rule's exclusions (detection precision and recall)
without the strategy ever seeing the truth.

Under secure aggregation the colluders collude before masking: at the
masked-input stage (recognised from the messages' own SecAgg record) each
one answers with its plain update, the adversary crafts the malicious updates
from the colluders' pooled updates (never the honest ones, which stay masked)
and sends each colluder its masked-input request again with its crafted
update, which the colluder masks and returns. That second pass goes through
the rest of the pipeline (``next``), so what sits below this filter (e.g.
signature verification) checks those replies too. The server sees only
masked vectors, as it would from real colluders.

Place it outermost in simulations: ``pipeline(grid, [adversary, verify])``
makes the adversary see verified replies, as colluders' own would be.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedsec.aggregation import Rule
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.threat import effective_boost, round_generator
from fedsec.wire import (
    ADVERSARY_KEY,
    ARRAYS_KEY,
    MALICIOUS_TAG,
    MASKED_INPUT_STAGE,
    METRICS_KEY,
    NUM_EXAMPLES_ARRAY,
    NUM_EXAMPLES_KEY,
    SECAGG_KEY,
    SECAGG_NEXT_KEY,
    SERVER_ROUND_KEY,
    TRUTH_TAG,
)

from .arrays import ArraySpec
from .pipeline import Exchange

__all__ = ["AdversaryFilter"]

logger = logging.getLogger("fedsec")


class AdversaryFilter:
    """The simulation's colluding adversary and referee, as a server-side filter.

    Parameters
    ----------
    attack : ModelPoisoningAttack or None
        A colluding attack, or None to only referee (other attacks).
    omniscient : bool
        Whether the adversary also sees the honest clients' updates (plain
        rounds; under secure aggregation they stay masked).
    rule : Rule or None
        The server's aggregation rule, for adaptive attacks (give it a copy:
        the attack may probe it).
    reference_fn : callable, optional
        The server's root update for the round's global arrays, for an
        adaptive attack on a rule that requires a ``reference`` (FLTrust):
        the FLTrust paper's adaptive attacker knows the root data (Cao et
        al., NDSS 2021). Give it its own instance (the strategy's counts its
        calls to seed the root training). Called once per attacked round,
        only when ``rule`` requires it.
    boost : float
        Factor on the crafted updates (0: n / server_lr, model replacement,
        Bagdasaryan et al. 2020).
    server_lr : float
        The server learning rate (for ``boost = 0``).
    seed : int
        Seeds the attack's randomness per round.

    Attributes
    ----------
    malicious_nodes : set of int
        The nodes that were malicious in the last training exchange (ground
        truth, for detection precision and recall).
    rounds_attacked : int
        Rounds in which the attack crafted updates.
    """

    def __init__(
        self,
        attack: ModelPoisoningAttack | None,
        *,
        omniscient: bool = False,
        rule: Rule | None = None,
        reference_fn: Callable[[ArrayRecord], torch.Tensor] | None = None,
        boost: float = 1.0,
        server_lr: float = 1.0,
        seed: int = 0,
    ) -> None:
        if attack is not None and not isinstance(attack, ModelPoisoningAttack):
            raise TypeError(
                f"attack must be a ModelPoisoningAttack or None, got {type(attack).__name__}"
            )
        if attack is not None and attack.requires_context:
            # Refused before round 1, not when the first round's craft fails.
            known = (rule.requires if rule is not None else frozenset()) & (
                {"reference"} if reference_fn is not None else set()
            )
            missing = sorted(attack.requires_context - known)
            if missing:
                raise ValueError(
                    f"attack '{attack.name}' needs the server's rule and its "
                    f"{', '.join(missing)} (an adaptive attack on a rule that uses it, "
                    "e.g. fltrust, with its reference_fn)"
                )
        self.attack = attack
        self.omniscient = omniscient
        self.rule = rule
        self.reference_fn = reference_fn
        self.boost = boost
        self.server_lr = server_lr
        self.seed = seed
        self.rounds_attacked = 0
        self.malicious_nodes: set[int] = set()  # ground truth of the last training exchange

    def __call__(self, messages: list[Message], next: Exchange, timeout: float) -> list[Message]:
        """Exchange ``messages``, then let the colluders rewrite their training replies."""
        replies = list(next(messages, timeout))
        training = [m for m in messages if _trains(m)]
        if not training:  # evaluation, or a SecAgg stage that carries no update
            return replies
        self._referee(replies)
        if self.attack is not None and self.attack.withholds:
            return _split(replies)[1]  # the colluders send nothing (the honest-only reference)
        if _is_masked_input(training[0]):
            return self._attack_secure(messages, replies, next, timeout)
        self._attack(training[0], replies)
        return replies

    def _referee(self, replies: list[Message]) -> None:
        """Record and strip the ground-truth tags of a training exchange."""
        truth: set[int] = set()
        for reply in replies:
            metrics = _metrics(reply)
            if metrics is not None and TRUTH_TAG in metrics:
                del metrics[TRUTH_TAG]
                truth.add(reply.metadata.src_node_id)
        self.malicious_nodes = truth

    def _attack_secure(
        self, messages: list[Message], replies: list[Message], next: Exchange, timeout: float
    ) -> list[Message]:
        """Craft the colluders' updates before masking; return every masked reply."""
        by_node = {m.metadata.dst_node_id: m for m in messages}
        plain, masked = _split(replies)
        # A colluder claiming no usable example count drops out, as with a malformed model.
        plain = [r for r in plain if _claimed_examples(r) is not None]
        if not plain:
            return masked
        request = by_node[plain[0].metadata.src_node_id]
        spec, global_flat = _global(request)
        own, colluders, _ = self._updates(spec, plain, global_flat)
        if own is None:
            return masked  # no well-formed plain update: the colluders drop out
        n = sum(1 for m in messages if _is_masked_input(m))
        crafted = self._craft(request, own, None, n) if self.attack is not None else None
        if crafted is None:
            crafted = own  # no attack, or too few colluders this round: they act honestly
        second = []
        for reply, update in zip(colluders, crafted, strict=True):
            original = by_node[reply.metadata.src_node_id]
            content = RecordDict(dict(original.content.items()))
            count = np.array([_claimed_examples(reply)], dtype=np.float64)
            content[ADVERSARY_KEY] = ArrayRecord(
                {
                    ADVERSARY_KEY: Array(update.numpy().astype(np.float32)),
                    NUM_EXAMPLES_ARRAY: Array(count),
                }
            )
            second.append(
                Message(
                    content,
                    message_type=MessageType.TRAIN,
                    dst_node_id=original.metadata.dst_node_id,
                    group_id=original.metadata.group_id,
                )
            )
        # Through the rest of the pipeline: what checks replies below checks these too.
        masked.extend(_split(list(next(second, timeout)))[1])
        return masked

    def _attack(self, request: Message, replies: list[Message]) -> None:
        malicious, honest = _split([r for r in replies if not r.has_error()])
        if not malicious or self.attack is None:
            return
        honest.sort(key=lambda m: m.metadata.src_node_id)
        spec, global_flat = _global(request)
        own, malicious, others = self._updates(spec, malicious, global_flat)
        benign = self._updates(spec, honest, global_flat)[0] if self.omniscient else None
        if own is None:
            return
        crafted = self._craft(request, own, benign, len(malicious) + len(honest))
        if crafted is None:
            return
        for reply, update, own_others in zip(malicious, crafted, others, strict=True):
            # The reply's own non-float arrays (buffers) stay as the client sent them.
            reply.content[ARRAYS_KEY] = spec.to_record(global_flat + update, own_others)

    def _craft(
        self, request: Message, own: torch.Tensor, benign: torch.Tensor | None, n: int
    ) -> torch.Tensor | None:
        """The colluders' boosted updates [m, d], or None when the attack cannot run."""
        assert self.attack is not None
        server_round = _server_round(request)
        try:
            self.attack.check(len(own), n)
        except ValueError as err:
            # Dropouts can leave too few colluders this round; they then act honestly.
            logger.warning("round %d: attack skipped: %s", server_round, err)
            return None
        view = AdversaryView(
            own=own,
            benign=benign,
            num_clients=n,
            rule=self.rule,
            generator=round_generator(self.seed, server_round, salt=3),
            context=self._context(request),
        )
        self.rounds_attacked += 1
        boost = effective_boost(self.boost, n, self.server_lr, len(own))
        return self.attack.craft(view) * boost

    def _context(self, request: Message) -> dict[str, Any] | None:
        """The rule's context the adaptive adversary knows this round (FLTrust's reference)."""
        if self.rule is None or "reference" not in self.rule.requires or self.reference_fn is None:
            return None
        return {"reference": self.reference_fn(request.content.array_records[ARRAYS_KEY])}

    @staticmethod
    def _updates(
        spec: ArraySpec, replies: list[Message], global_flat: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[Message], list[dict[str, np.ndarray]]]:
        """Updates [k, d] of the well-formed replies, those replies and their other arrays."""
        rows = torch.empty(len(replies), spec.dim)
        kept: list[Message] = []
        others: list[dict[str, np.ndarray]] = []
        for reply in replies:
            arrays = reply.content.array_records.get(ARRAYS_KEY)
            extra: dict[str, np.ndarray] = {}
            if (
                isinstance(arrays, ArrayRecord)
                and spec.check(arrays) is None
                and spec.flatten_into(arrays, rows[len(kept)], extra) is None
            ):
                kept.append(reply)
                others.append(extra)
        if not kept:
            return None, kept, others
        return rows[: len(kept)].sub_(global_flat), kept, others


def _metrics(reply: Message) -> MetricRecord | None:
    """A reply's ``metrics`` record (None for an error reply or none sent)."""
    if reply.has_error():
        return None
    return reply.content.metric_records.get(METRICS_KEY)


def _claimed_examples(reply: Message) -> float | None:
    """A colluder's ``num-examples`` metric (1 if absent); None if it is not a number.

    A reply's metrics are the sender's to choose (a list, say): one malformed
    reply must not stop the round. The colluder itself refuses a count it
    cannot weigh (non-finite, not positive) when asked to mask.
    """
    value = (_metrics(reply) or MetricRecord()).get(NUM_EXAMPLES_KEY, 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _split(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """(colluders' replies, the others), the colluders' tag removed, each by node id.

    A stable row order (by node id), so attacks that track a row (Mimic) track a client.
    """
    tagged, rest = [], []
    for reply in replies:
        metrics = _metrics(reply)
        if metrics is not None and MALICIOUS_TAG in metrics:
            del metrics[MALICIOUS_TAG]
            tagged.append(reply)
        else:
            rest.append(reply)
    tagged.sort(key=lambda m: m.metadata.src_node_id)
    return tagged, rest


def _global(request: Message) -> tuple[ArraySpec, torch.Tensor]:
    """The layout and flat values of the global model a training request carries."""
    global_arrays = request.content.array_records[ARRAYS_KEY]
    spec = ArraySpec.from_record(global_arrays)
    global_flat = torch.empty(spec.dim)
    spec.flatten_into(global_arrays, global_flat)
    return spec, global_flat


def _server_round(request: Message) -> int:
    """The round of a train request: its ``server-round`` config, else the group id."""
    for record in request.content.config_records.values():
        value = record.get(SERVER_ROUND_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    group = request.metadata.group_id
    return int(group) if group.isdigit() else 0


def _trains(msg: Message) -> bool:
    """Whether ``msg`` asks for a model update: a plain train request or masked input."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return False
    records = msg.content.config_records
    if SECAGG_KEY in records:
        return _is_masked_input(msg)
    return SECAGG_NEXT_KEY not in records and ARRAYS_KEY in msg.content.array_records


def _is_masked_input(msg: Message) -> bool:
    record = msg.content.config_records.get(SECAGG_KEY)
    return record is not None and record.get("stage") == MASKED_INPUT_STAGE
