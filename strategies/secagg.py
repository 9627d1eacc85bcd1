"""Server side of secure aggregation on Flower's Message API.

:class:`SecAggWorkflow` runs one training round as the stages of
:class:`fedsec.secagg.server.SecAggServer`, each a ``send_and_receive`` of
``train`` messages carrying the ConfigRecord ``fedsec-secagg`` to the client
mod (:mod:`fedsec.client.secagg_mod`). The sampled nodes get protocol ids
``1..n`` in sampling order; the model and training config travel with the
masked-input stage only. A node that does not answer, answers with an error or
sends a malformed reply drops out of the round at that stage. The strategy
gets the decoded weighted mean and the contributors through
:meth:`FedSecStrategy.aggregate_secure`; if the protocol aborts, the round
fails and the global model stays as it was.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsec.client.secagg_mod import IDENTIFY_STAGE, MASKED_KEY, SECAGG_KEY
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

logger = logging.getLogger("fedsec")

_Reply = TypeVar("_Reply")


def _parse_record(cls: Any) -> Callable[[Message], Any]:
    def parse(msg: Message) -> Any:
        record = msg.content.config_records.get(SECAGG_KEY)
        if record is None:
            raise ProtocolError(f"reply lacks the '{SECAGG_KEY}' record")
        return cls.from_record(dict(record))

    return parse


def _parse_masked(msg: Message) -> MaskedInputReply:
    arrays = msg.content.array_records.get(MASKED_KEY)
    if arrays is None or MASKED_KEY not in arrays:
        raise ProtocolError(f"reply lacks the '{MASKED_KEY}' array")
    return MaskedInputReply(arrays[MASKED_KEY].numpy())


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

    def run_round(
        self,
        grid: Grid,
        strategy: FedSecStrategy,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """One secure training round; ``(None, metrics)`` when it could not complete."""
        train_messages = list(strategy.configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in train_messages]
        content = {m.metadata.dst_node_id: m.content for m in train_messages}
        stage_times: dict[str, float] = {}
        metrics = MetricRecord({"num-sampled": len(nodes)})
        unidentified: dict[int, str] = {}
        try:
            identities: tuple[str, ...] = ()
            if self.settings.signed:
                known = self._identify(grid, nodes, config)
                unidentified = {n: "identify: no identity stated" for n in nodes if n not in known}
                claims = Counter(known.values())
                for node, name in list(known.items()):
                    if claims[name] > 1:  # cannot tell which one holds the key
                        unidentified[node] = f"identify: identity {name!r} claimed by several nodes"
                        del known[node]
                nodes = [n for n in nodes if n in known]
                identities = tuple(known[n] for n in nodes)
            params = self._params(len(nodes), strategy.dim)
            server = SecAggServer(params, server_round=server_round, identities=identities)
            exchange = _Exchange(grid, server, nodes, self.timeout, config, stage_times)
            requests: Mapping[int, Any] = server.advertise_keys()
            keys = exchange(requests, _parse_record(AdvertiseKeysReply))
            shares = exchange(server.share_keys(keys), _parse_record(ShareKeysReply))
            masked = exchange(server.masked_input(shares), _parse_masked, content)
            if params.signed:
                checks = server.consistency_check(masked)
                signed = exchange(checks, _parse_record(ConsistencyCheckReply))
                requests = server.unmask(signed)
            else:
                requests = server.unmask(masked)
            del masked  # the server keeps only the running sum
            unmasked = exchange(requests, _parse_record(UnmaskReply))
            started = time.perf_counter()
            result = server.finish(unmasked)
            stage_times["finish"] = time.perf_counter() - started
        except (SecAggAbortedError, ValueError) as err:
            logger.warning("round %d: secure aggregation failed: %s", server_round, err)
            self.last_error = f"{type(err).__name__}: {err}"
            metrics["secagg_aborted"] = 1
            for stage, seconds in stage_times.items():
                metrics[f"secagg_{stage}_s"] = seconds
            return None, metrics
        self.last_error = ""
        contributors = [nodes[cid - 1] for cid in result.contributors]
        dropped = unidentified | {nodes[cid - 1]: reason for cid, reason in result.dropped.items()}
        new_arrays, round_metrics = strategy.aggregate_secure(
            server_round,
            result.aggregate,
            total_weight=result.total_weight,
            contributors=contributors,
            dropped=dropped,
        )
        metrics.update(round_metrics)
        metrics["secagg_degree"] = params.degree
        metrics["secagg_threshold"] = params.threshold
        metrics["secagg_error_bound"] = result.error_bound
        for stage, seconds in stage_times.items():
            metrics[f"secagg_{stage}_s"] = seconds
        return new_arrays, metrics

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

    def _identify(self, grid: Grid, nodes: list[int], config: ConfigRecord) -> dict[int, str]:
        """Long-term identities of ``nodes``, asking those not seen before (signed mode).

        A node that does not state one sits the round out.
        """
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


class _Exchange:
    """Send one stage's requests to their nodes and parse the replies, by protocol id."""

    def __init__(
        self,
        grid: Grid,
        server: SecAggServer,
        nodes: list[int],
        timeout: float,
        config: ConfigRecord,
        stage_times: dict[str, float],
    ) -> None:
        self.grid, self.server, self.nodes = grid, server, nodes
        self.timeout, self.config, self.stage_times = timeout, config, stage_times
        self.ids: dict[int, int] = {node: cid for cid, node in enumerate(nodes, start=1)}

    def __call__(
        self,
        requests: Mapping[int, Any],
        parse: Callable[[Message], _Reply],
        content: Mapping[int, RecordDict] | None = None,
    ) -> dict[int, _Reply]:
        started = time.perf_counter()
        stage = "?"
        messages = []
        for cid, request in requests.items():
            node = self.nodes[cid - 1]
            stage = request.stage
            base = dict(content[node]) if content is not None else {CONFIG_KEY: self.config}
            body = RecordDict({**base, SECAGG_KEY: ConfigRecord(request.to_record())})
            messages.append(Message(body, message_type=MessageType.TRAIN, dst_node_id=node))
        replies: dict[int, _Reply] = {}
        for msg in send_and_receive(self.grid, messages, timeout=self.timeout):
            sender = self.ids.get(msg.metadata.src_node_id)
            if sender is None or sender not in requests:
                continue
            cid = sender
            if msg.has_error():
                self.server.drop(cid, f"client error: {msg.error.reason}")
                continue
            try:
                replies[cid] = parse(msg)
            except (ProtocolError, ValueError, KeyError, TypeError) as err:
                self.server.drop(cid, f"malformed reply: {err}")
        self.stage_times[stage] = time.perf_counter() - started
        return replies
