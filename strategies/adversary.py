"""The simulation's adversary component (colluding attacks) and referee (ground truth).

Colluding attacks (ALIE, IPM, Min-Max, Min-Sum, Fang, Mimic) need the pooled
updates of all malicious clients, and an omniscient adversary also sees the
honest ones. :class:`AdversaryGrid` plays that adversary between the clients
and the server: it wraps the grid, takes the round's replies, lets the attack
rewrite the malicious clients' models, and hands the result to the server.
It models collusion among the attackers (a side channel outside the protocol),
never the server's own view: the strategy gets exactly what it would get from
malicious clients that crafted their updates together.

Malicious clients identify themselves to it with the ``fedsec.malicious``
reply metric, which it removes before the server sees the replies. As the
referee it also strips every malicious client's ``fedsec.truth.malicious``
tag (any attack) and remembers which nodes were malicious in the last
training exchange, so the experiment can score the rule's exclusions
(detection precision and recall) without the strategy ever seeing the truth.

Under secure aggregation the colluders collude before masking: at the
masked-input stage each one answers the adversary with its plain update
(the client mod passes it on unmasked), the adversary crafts the malicious
updates from the colluders' pooled updates (never the honest ones, which stay
masked) and sends each colluder its masked-input request again with its
crafted update, which the colluder masks and returns. The server sees only
masked vectors, as it would from real colluders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsec.aggregation import Rule
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.threat import MALICIOUS_TAG, TRUTH_TAG, effective_boost, round_generator
from fedsec.client.secagg_mod import ADVERSARY_KEY, NUM_EXAMPLES_ARRAY, SECAGG_KEY

from .arrays import ArraySpec
from .transport import GridWrapper

logger = logging.getLogger("fedsec")


class AdversaryGrid(GridWrapper):
    """A grid wrapper in which colluding malicious clients craft their updates.

    Parameters
    ----------
    grid : Grid
        The real grid (Ray simulation or in-process).
    attack : ModelPoisoningAttack or None
        A colluding attack, or None to only referee (other attacks).
    omniscient : bool
        Whether the adversary also sees the honest clients' updates.
    rule : Rule or None
        The server's aggregation rule, for adaptive attacks.
    boost : float
        Factor on the crafted updates (0: n / server_lr).
    server_lr : float
        The server learning rate (for ``boost = 0``).
    seed : int
        Seeds the attack's randomness per round.
    """

    def __init__(
        self,
        grid: Grid,
        attack: ModelPoisoningAttack | None,
        *,
        omniscient: bool = False,
        rule: Rule | None = None,
        boost: float = 1.0,
        server_lr: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(grid)
        self.attack = attack
        self.omniscient = omniscient
        self.rule = rule
        self.boost = boost
        self.server_lr = server_lr
        self.seed = seed
        self.rounds_attacked = 0
        self.malicious_nodes: set[int] = set()  # ground truth of the last training exchange

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, then let the colluders rewrite their training replies."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return replies
        self._referee(replies)
        if self.attack is not None:
            if any(_is_masked_input(m) for m in messages):
                replies = self._attack_secure(messages, replies, timeout)
            else:
                self._attack(messages[0], replies)
        return replies

    def _referee(self, replies: list[Message]) -> None:
        """Record and strip the ground-truth tags of a training exchange."""
        truth: set[int] = set()
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            if metrics is not None and TRUTH_TAG in metrics:
                del metrics[TRUTH_TAG]
                truth.add(reply.metadata.src_node_id)
        self.malicious_nodes = truth

    def _attack_secure(
        self, messages: list[Message], replies: list[Message], timeout: float | None
    ) -> list[Message]:
        """Craft the colluders' updates before masking; return every masked reply."""
        assert self.attack is not None
        by_node = {m.metadata.dst_node_id: m for m in messages}
        plain, masked = [], []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            if metrics is not None and MALICIOUS_TAG in metrics:
                del metrics[MALICIOUS_TAG]
                plain.append(reply)
            else:
                masked.append(reply)
        if not plain:
            return masked
        plain.sort(key=lambda m: m.metadata.src_node_id)
        request = by_node[plain[0].metadata.src_node_id]
        spec, global_flat = _global(request)
        own, colluders = self._updates(spec, plain, global_flat)
        if own is None:
            return masked
        n = sum(1 for m in messages if _is_masked_input(m))
        crafted = self._craft(request, own, None, n)
        if crafted is None:
            crafted = own  # too few colluders this round: they act honestly
        second = []
        for reply, update in zip(colluders, crafted, strict=True):
            original = by_node[reply.metadata.src_node_id]
            content = RecordDict(dict(original.content.items()))
            metrics = reply.content.metric_records.get("metrics", MetricRecord())
            count = np.array([float(metrics.get("num-examples", 1.0))], dtype=np.float64)  # type: ignore[arg-type]
            content[ADVERSARY_KEY] = ArrayRecord(
                {ADVERSARY_KEY: Array(update.numpy()), NUM_EXAMPLES_ARRAY: Array(count)}
            )
            second.append(
                Message(
                    content,
                    message_type=MessageType.TRAIN,
                    dst_node_id=original.metadata.dst_node_id,
                    group_id=original.metadata.group_id,
                )
            )
        masked.extend(self.grid.send_and_receive(second, timeout=timeout))
        return masked

    def _attack(self, request: Message, replies: list[Message]) -> None:
        assert self.attack is not None
        malicious, honest = [], []
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and MALICIOUS_TAG in metrics:
                del metrics[MALICIOUS_TAG]
                malicious.append(reply)
            else:
                honest.append(reply)
        if not malicious:
            return
        # Stable row order (by node id), so attacks that track a row (Mimic) track a client.
        malicious.sort(key=lambda m: m.metadata.src_node_id)
        honest.sort(key=lambda m: m.metadata.src_node_id)
        spec, global_flat = _global(request)
        own, malicious = self._updates(spec, malicious, global_flat)
        benign, _ = self._updates(spec, honest, global_flat) if self.omniscient else (None, [])
        if own is None:
            return
        crafted = self._craft(request, own, benign, len(malicious) + len(honest))
        if crafted is None:
            return
        for reply, update in zip(malicious, crafted, strict=True):
            reply.content["arrays"] = spec.to_record(global_flat + update)

    def _craft(
        self, request: Message, own: torch.Tensor, benign: torch.Tensor | None, n: int
    ) -> torch.Tensor | None:
        """The colluders' boosted updates [m, d], or None when the attack cannot run."""
        assert self.attack is not None
        server_round = int(request.content.config_records["config"].get("server-round", 0))  # type: ignore[arg-type]
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
        )
        self.rounds_attacked += 1
        boost = effective_boost(self.boost, n, self.server_lr, len(own))
        return self.attack.craft(view) * boost

    @staticmethod
    def _updates(
        spec: ArraySpec, replies: list[Message], global_flat: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[Message]]:
        """Updates [k, d] of the replies whose models are well-formed, and those replies."""
        rows = torch.empty(len(replies), spec.dim)
        kept: list[Message] = []
        for reply in replies:
            arrays = reply.content.array_records.get("arrays")
            if (
                isinstance(arrays, ArrayRecord)
                and spec.check(arrays) is None
                and spec.flatten_into(arrays, rows[len(kept)]) is None
            ):
                kept.append(reply)
        if not kept:
            return None, kept
        return rows[: len(kept)].sub_(global_flat), kept


def _global(request: Message) -> tuple[ArraySpec, torch.Tensor]:
    """The layout and flat values of the global model a training request carries."""
    global_arrays = request.content.array_records["arrays"]
    spec = ArraySpec.from_record(global_arrays)
    global_flat = torch.empty(spec.dim)
    spec.flatten_into(global_arrays, global_flat)
    return spec, global_flat


def _is_masked_input(msg: Message) -> bool:
    record = msg.content.config_records.get(SECAGG_KEY)
    return record is not None and record.get("stage") == "masked-input"
