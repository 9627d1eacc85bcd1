"""Server side of secure aggregation on Flower's Message API.

:class:`SecAggWorkflow` runs a training round as the stages of
:class:`fedsec.secagg.server.SecAggServer`, sent as ``train`` messages whose
ConfigRecord ``fedsec-secagg`` the client mod (:mod:`fedsec.client.secagg_mod`)
answers. The sampled nodes get protocol ids ``1..n`` in sampling order; the
model and training config travel with the masked-input stage only. A node that
does not answer, answers with an error or sends a malformed reply drops out of
the round at that stage. The strategy gets the decoded weighted mean and the
contributors through :meth:`FedSecStrategy.aggregate_secure`; if the protocol
aborts, the round fails and the global model stays as it was.

Pipelining. Every stage is a network round trip, so when the caller names the
next secure round, that round's key set-up rides on this round's messages
(record ``fedsec-secagg-next``): its advertise-keys with this round's
masked-input, its share-keys with this round's unmask. In steady state a
secure round then costs two round trips (three in signed mode) instead of
four. The next round's keys are fresh and bound to its own session and round;
if its sample turns out different, or its set-up fails, it is simply set up
again from scratch, and a failure there never touches the current round.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsec.client.secagg_mod import IDENTIFY_STAGE, MASKED_KEY, SECAGG_KEY, SECAGG_NEXT_KEY
from fedsec.config import SecAggSection
from fedsec.secagg.messages import (
    AdvertiseKeysReply,
    ConsistencyCheckReply,
    MaskedInputReply,
    ProtocolError,
    ShareKeysReply,
    UnmaskReply,
)
from fedsec.secagg.server import SecAggAbortedError, SecAggParams, SecAggServer

from .strategy import CONFIG_KEY, FedSecStrategy
from .transport import send_and_receive

__all__ = ["SecAggWorkflow"]

#: The client-side DP metric reported under secure aggregation (largest over clients).
EPSILON_KEY = "dp_epsilon_max"

logger = logging.getLogger("fedsec")

Parser = Callable[[Message, str], Any]


def _parse_record(cls: Any) -> Parser:
    def parse(msg: Message, key: str) -> Any:
        record = msg.content.config_records.get(key)
        if record is None:
            raise ProtocolError(f"reply lacks the '{key}' record")
        return cls.from_record(dict(record))

    return parse


def _masked_parser(public: list[float]) -> Parser:
    """Parse masked-input replies, collecting the clients' reported ``dp_epsilon_max``."""

    def parse(msg: Message, key: str) -> MaskedInputReply:
        arrays = msg.content.array_records.get(MASKED_KEY)
        if arrays is None or MASKED_KEY not in arrays:
            raise ProtocolError(f"reply lacks the '{MASKED_KEY}' array")
        reply = MaskedInputReply(arrays[MASKED_KEY].numpy())
        metrics = msg.content.metric_records.get("metrics")
        epsilon = None if metrics is None else metrics.get(EPSILON_KEY)
        if isinstance(epsilon, int | float) and math.isfinite(epsilon):
            public.append(float(epsilon))
        return reply

    return parse


@dataclass
class _Part:
    """One protocol round's requests within an exchange, and the replies they got."""

    server: SecAggServer
    nodes: list[int]  # protocol id - 1 -> node id
    requests: Mapping[int, Any]
    parse: Parser
    key: str = SECAGG_KEY
    content: Mapping[int, RecordDict] | None = None  # what else a node's message carries
    replies: dict[int, Any] = field(default_factory=dict)


@dataclass
class _Round:
    """A secure round in progress: its server and who takes part."""

    server_round: int
    sampled: list[int]
    nodes: list[int]
    server: SecAggServer
    unidentified: dict[int, str]
    requests: Mapping[int, Any] = field(default_factory=dict)  # the next stage to send


class SecAggWorkflow:
    """Secure training rounds for a :class:`FedSecStrategy`.

    Parameters
    ----------
    settings : SecAggSection
        The experiment's ``[secagg]`` section.
    timeout : float
        Seconds each stage waits for replies.
    """

    def __init__(self, settings: SecAggSection, timeout: float) -> None:
        self.settings = settings
        self.timeout = settings.stage_timeout or timeout
        self.identities: dict[int, str] = {}  # node id -> long-term identity (signed mode)
        self.last_error = ""  # why the last round failed, if it did
        self._prepared: _Round | None = None  # next round, keys shared, masked-input due

    def run_round(
        self,
        grid: Grid,
        strategy: FedSecStrategy,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        next_round: int | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """One secure training round; ``(None, metrics)`` when it could not complete.

        ``next_round``: the next round that will run securely, whose key set-up
        then rides on this round's messages.
        """
        train_messages = list(strategy.configure_train(server_round, arrays, config, grid))
        sampled = [m.metadata.dst_node_id for m in train_messages]
        content = {m.metadata.dst_node_id: m.content for m in train_messages}
        times: dict[str, float] = {}
        metrics = MetricRecord({"num-sampled": len(sampled)})
        prepared, self._prepared = self._prepared, None
        epsilons: list[float] = []  # clients' own DP ledgers, the only metric they reveal
        ahead: _Round | None = None
        try:
            if prepared is not None and (prepared.server_round, prepared.sampled) == (
                server_round,
                sampled,
            ):
                current = prepared
            else:
                current = self._open(grid, strategy, server_round, sampled, config)
                keys = self._exchange(
                    grid, config, times, [self._part(current, AdvertiseKeysReply)]
                )
                current.requests = current.server.share_keys(keys[0])
                shares = self._exchange(grid, config, times, [self._part(current, ShareKeysReply)])
                current.requests = current.server.masked_input(shares[0])
            if next_round is not None:
                ahead = self._guard(
                    lambda: self._open(
                        grid,
                        strategy,
                        next_round,
                        strategy.sample_nodes(grid, next_round, strategy.fraction_train),
                        config,
                    )
                )
            parts = [
                _Part(
                    current.server,
                    current.nodes,
                    current.requests,
                    _masked_parser(epsilons),
                    content=content,
                ),
                *self._ahead_part(ahead, AdvertiseKeysReply),
            ]
            masked, *keys_ahead = self._exchange(grid, config, times, parts)
            if current.server.params.signed:
                current.requests = current.server.consistency_check(masked)
                checked = self._exchange(
                    grid, config, times, [self._part(current, ConsistencyCheckReply)]
                )
                current.requests = current.server.unmask(checked[0])
            else:
                current.requests = current.server.unmask(masked)
            del masked  # the server keeps only the running sum
            if ahead is not None:
                ahead = self._advance(ahead, lambda r: r.server.share_keys(keys_ahead[0]))
            parts = [self._part(current, UnmaskReply), *self._ahead_part(ahead, ShareKeysReply)]
            unmasked, *shares_ahead = self._exchange(grid, config, times, parts)
            started = time.perf_counter()
            result = current.server.finish(unmasked)
            times["finish"] = time.perf_counter() - started
            if ahead is not None:
                ahead = self._advance(ahead, lambda r: r.server.masked_input(shares_ahead[0]))
            self._prepared = ahead
        except (SecAggAbortedError, ValueError) as err:
            logger.warning("round %d: secure aggregation failed: %s", server_round, err)
            self.last_error = f"{type(err).__name__}: {err}"
            metrics["secagg_aborted"] = 1
            _add_times(metrics, times)
            return None, metrics
        self.last_error = ""
        nodes = current.nodes
        contributors = [nodes[cid - 1] for cid in result.contributors]
        dropped = current.unidentified | {
            nodes[cid - 1]: reason for cid, reason in result.dropped.items()
        }
        new_arrays, round_metrics = strategy.aggregate_secure(
            server_round,
            result.aggregate,
            total_weight=result.total_weight,
            contributors=contributors,
            dropped=dropped,
        )
        metrics.update(round_metrics)
        metrics["secagg_degree"] = current.server.params.degree
        metrics["secagg_threshold"] = current.server.params.threshold
        metrics["secagg_error_bound"] = result.error_bound
        metrics["secagg_pipelined"] = int(current is prepared)
        if epsilons:
            metrics[EPSILON_KEY] = max(epsilons)
        _add_times(metrics, times)
        return new_arrays, metrics

    # -- rounds ahead -------------------------------------------------------------------

    def _guard(self, step: Callable[[], _Round]) -> _Round | None:
        """Run a set-up step of the next round; its failure only cancels the pipelining."""
        try:
            return step()
        except (SecAggAbortedError, ValueError) as err:
            logger.info("secagg: next round's set-up abandoned (%s); it will start afresh", err)
            return None

    def _advance(self, ahead: _Round, step: Callable[[_Round], Mapping[int, Any]]) -> _Round | None:
        def run() -> _Round:
            ahead.requests = step(ahead)
            return ahead

        return self._guard(run)

    def _ahead_part(self, ahead: _Round | None, reply: type) -> list[_Part]:
        if ahead is None:
            return []
        return [self._part(ahead, reply, key=SECAGG_NEXT_KEY)]

    @staticmethod
    def _part(round_: _Round, reply: type, key: str = SECAGG_KEY) -> _Part:
        return _Part(round_.server, round_.nodes, round_.requests, _parse_record(reply), key)

    # -- set-up -------------------------------------------------------------------------

    def _open(
        self,
        grid: Grid,
        strategy: FedSecStrategy,
        server_round: int,
        sampled: list[int],
        config: ConfigRecord,
    ) -> _Round:
        """A round's server and participants, with its advertise-keys requests due."""
        nodes: list[int] = list(sampled)
        identities: tuple[str, ...] = ()
        unidentified: dict[int, str] = {}
        if self.settings.signed:
            nodes, identities, unidentified = self._participants(grid, sampled, config)
        server = SecAggServer(
            self._params(len(nodes), strategy.dim),
            server_round=server_round,
            identities=identities,
        )
        round_ = _Round(server_round, list(sampled), nodes, server, unidentified)
        round_.requests = server.advertise_keys()
        return round_

    def _params(self, n: int, dim: int) -> SecAggParams:
        s = self.settings
        return SecAggParams.for_round(
            n,
            dim,
            clip=s.clip,
            dropout_rate=s.dropout_rate,
            corrupt_fraction=s.corrupt_fraction,
            degree=s.degree,
            threshold=s.threshold,
            bits=s.bits,
            modulus_bits=s.modulus_bits,
            signed=s.signed,
        )

    def _participants(
        self, grid: Grid, sampled: list[int], config: ConfigRecord
    ) -> tuple[list[int], tuple[str, ...], dict[int, str]]:
        """Signed mode: the nodes with a unique stated identity, and why others sit out."""
        known = self._identify(grid, sampled, config)
        left_out = {n: "identify: no identity stated" for n in sampled if n not in known}
        claims = Counter(known.values())
        for node, name in list(known.items()):
            if claims[name] > 1:  # cannot tell which one holds the key
                left_out[node] = f"identify: identity {name!r} claimed by several nodes"
                del known[node]
        nodes = [n for n in sampled if n in known]
        return nodes, tuple(known[n] for n in nodes), left_out

    def _identify(self, grid: Grid, nodes: list[int], config: ConfigRecord) -> dict[int, str]:
        """Long-term identities of ``nodes``, asking those not seen before (signed mode)."""
        unknown = [node for node in nodes if node not in self.identities]
        if unknown:
            messages = [
                Message(
                    RecordDict(
                        {
                            SECAGG_KEY: ConfigRecord({"stage": IDENTIFY_STAGE}),
                            CONFIG_KEY: config,
                        }
                    ),
                    message_type=MessageType.TRAIN,
                    dst_node_id=node,
                )
                for node in unknown
            ]
            for reply in send_and_receive(grid, messages, timeout=self.timeout):
                record = None if reply.has_error() else reply.content.config_records.get(SECAGG_KEY)
                identity = None if record is None else record.get("identity")
                if isinstance(identity, str) and identity:
                    self.identities[reply.metadata.src_node_id] = identity
        return {node: self.identities[node] for node in nodes if node in self.identities}

    # -- transport ----------------------------------------------------------------------

    def _exchange(
        self, grid: Grid, config: ConfigRecord, times: dict[str, float], parts: list[_Part]
    ) -> list[dict[int, Any]]:
        """One message per node carrying every part's request for it; replies per part.

        A missing reply leaves the node out of that part's replies (the server
        counts it as a dropout); an error or a malformed part is recorded as
        the reason it dropped.
        """
        started = time.perf_counter()
        bodies: dict[int, dict[str, Any]] = {}
        for part in parts:
            for cid, request in part.requests.items():
                node = part.nodes[cid - 1]
                body = bodies.setdefault(node, {CONFIG_KEY: config})
                if part.content is not None:
                    body.update(part.content[node])
                body[part.key] = ConfigRecord(request.to_record())
        messages = [
            Message(RecordDict(body), message_type=MessageType.TRAIN, dst_node_id=node)
            for node, body in bodies.items()
        ]
        by_node = {
            m.metadata.src_node_id: m
            for m in send_and_receive(grid, messages, timeout=self.timeout)
        }
        for part in parts:
            for cid in part.requests:
                msg = by_node.get(part.nodes[cid - 1])
                if msg is None:
                    continue
                if msg.has_error():
                    part.server.drop(cid, f"client error: {msg.error.reason}")
                    continue
                try:
                    part.replies[cid] = part.parse(msg, part.key)
                except (ProtocolError, ValueError, KeyError, TypeError) as err:
                    part.server.drop(cid, f"malformed reply: {err}")
        name = "+".join(_stage_name(p) for p in parts)
        times[name] = times.get(name, 0.0) + time.perf_counter() - started
        return [part.replies for part in parts]


def _stage_name(part: _Part) -> str:
    stage = next(iter(part.requests.values())).stage if part.requests else "?"
    return f"next-{stage}" if part.key == SECAGG_NEXT_KEY else str(stage)


def _add_times(metrics: MetricRecord, times: dict[str, float]) -> None:
    for stage, seconds in times.items():
        metrics[f"secagg_{stage}_s"] = seconds
