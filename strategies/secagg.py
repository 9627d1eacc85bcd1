"""Server side of secure aggregation on Flower's Message API.

:class:`SecureAggregation` runs a training round as the stages of
:class:`fedsec.secagg.server.SecAggServer`, sent as ``train`` messages whose
ConfigRecord ``fedsec-secagg`` the client mod (:mod:`fedsec.client.secagg_mod`)
answers. The sampled nodes get protocol ids ``1..n`` in sampling order; the
model and training config travel with the masked-input stage only. A node that
does not answer, answers with an error or sends a malformed reply drops out of
the round at that stage. The strategy gets the decoded weighted mean and the
contributors through :meth:`FedSecStrategy.aggregate_secure`; if the protocol
aborts, the round fails and the global model stays as it was.

Every stage goes through an :data:`~fedsec.strategies.pipeline.Exchange`, the
server-side pipeline of filters (:mod:`fedsec.strategies.pipeline`), so
signature verification and the simulation's adversary see every stage's
messages, exactly as in plain rounds. The object is configured where it is
created (no application config): ``FedSecStrategy(rule=make("mean"),
secure=SecureAggregation(clip=1.0))`` and :meth:`FedSecStrategy.start` runs
secure rounds.

Pipelining. Every stage is a network round trip, so when the caller names the
next secure round, that round's key set-up rides on this round's messages
(record ``fedsec-secagg-next``): its advertise-keys with this round's
masked-input, its share-keys with this round's unmask. In steady state a
secure round then costs two round trips (three in signed mode) instead of
four. The next round's keys are fresh and bound to its own session and round;
if its sample turns out different, or its set-up fails, it is simply set up
again from scratch, and a failure there never touches the current round.

Bucketed mode (``bucket_size = s``; Karimireddy, He, Jaggi, "Byzantine-Robust
Learning on Heterogeneous Datasets via Bucketing", ICLR 2022; Velicheti,
Xia, Koyejo, "Secure Byzantine-Robust Federated Learning", 2021). The sampled
clients are split at random into buckets of ``s`` to ``2s - 1``; every bucket
runs its own secure sum (its own server, session and graph) within the same
messages, so bucketing costs no extra round trip. The server learns only the
bucket sums, and the strategy applies its robust rule across the bucket means
(:meth:`FedSecStrategy.aggregate_buckets`). A bucket that loses members below
``s`` aborts on its own and is discarded: neither the server nor its honest
members unmask a smaller sum. A round fails only when no bucket is left or
the rule refuses the buckets that are.

Norm bounding and distributed DP: with ``norm_bound`` honest clients scale
their update to that L2 norm before masking and the server discards (and
logs) a bucket whose sum is longer than its weight times the bound; with
``noise_multiplier`` they add Skellam noise (:mod:`fedsec.privacy.distributed`)
so that every unmasked sum is differentially private against the server.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsec.checks import short_repr
from fedsec.npy import payload_view
from fedsec.privacy.distributed import SkellamPlan, plan_skellam, unmask_floor
from fedsec.secagg.messages import (
    MAX_IDENTITY_CHARS,
    MAX_WEIGHT_CAP,
    AdvertiseKeysReply,
    ConsistencyCheckReply,
    MaskedInputReply,
    ProtocolError,
    ShareKeysReply,
    UnmaskReply,
)
from fedsec.secagg.server import SecAggAbortedError, SecAggParams, SecAggResult, SecAggServer
from fedsec.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    IDENTIFY_STAGE,
    MASKED_KEY,
    METRICS_KEY,
    SECAGG_KEY,
    SECAGG_NEXT_KEY,
    SERVER_ROUND_KEY,
)
from fedsec.wire import DP_EPSILON_MAX_KEY as EPSILON_KEY

from .pipeline import Exchange
from .strategy import FedSecStrategy, first_per_node

__all__ = ["SecureAggregation"]

# EPSILON_KEY: the client-side DP metric reported under secure aggregation (fedsec.wire);
# the round keeps the largest over clients.

logger = logging.getLogger("fedsec")

Parser = Callable[[Message, str], Any]


def _parse_record(cls: Any) -> Parser:
    def parse(msg: Message, key: str) -> Any:
        record = msg.content.config_records.get(key)
        if record is None:
            raise ProtocolError(f"reply lacks the '{key}' record")
        return cls.from_record(dict(record))

    return parse


def _masked_parser(public: list[float], params: SecAggParams) -> Parser:
    """Parse masked-input replies, collecting the clients' reported ``dp_epsilon_max``.

    The masked vector must be exactly ``dim + 1`` values of the ring's dtype;
    header, dtype, shape and byte length are checked before a byte of data is
    read (:func:`fedsec.npy.payload_view`), so a header claiming
    a TiB costs nothing, and the accepted vector is a view of the payload's
    bytes (no copy: the server adds it into the running sum and lets it go).
    """
    length, dtype = params.dim + 1, np.dtype(params.encoder.dtype)

    def parse(msg: Message, key: str) -> MaskedInputReply:
        arrays = msg.content.array_records.get(MASKED_KEY)
        if arrays is None or list(arrays.keys()) != [MASKED_KEY]:
            names = None if arrays is None else list(arrays.keys())
            raise ProtocolError(
                f"reply must hold one '{MASKED_KEY}' array, got {short_repr(names)}"
            )
        masked = payload_view(arrays[MASKED_KEY], MASKED_KEY, (length,), dtype)
        if isinstance(masked, str):
            raise ProtocolError(masked)
        reply = MaskedInputReply(cast(npt.NDArray[np.unsignedinteger[Any]], masked))
        metrics = msg.content.metric_records.get(METRICS_KEY)
        epsilon = None if metrics is None else metrics.get(EPSILON_KEY)
        # Only ever raises the reported maximum (a client's own ledger), never hides one.
        if isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0:
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
class _Bucket:
    """One secure sum within a round: its server, members and the next stage to send."""

    server: SecAggServer
    nodes: list[int]  # protocol id - 1 -> node id
    requests: Mapping[int, Any] = field(default_factory=dict)
    failure: str = ""  # why it was discarded, if it was


@dataclass
class _Round:
    """A secure round in progress: who takes part and its buckets (one when unbucketed)."""

    server_round: int
    sampled: list[int]
    buckets: list[_Bucket]
    unidentified: dict[int, str]

    def live(self) -> list[_Bucket]:
        """Buckets not (yet) discarded."""
        return [b for b in self.buckets if not b.failure]


@dataclass(frozen=True)
class _Sum:
    """A bucket's unmasked result."""

    bucket: _Bucket
    result: SecAggResult


class SecureAggregation:
    """Secure training rounds (SecAgg+, plain or bucketed) for a :class:`FedSecStrategy`.

    SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
    Overhead", CCS 2020) over the sampled clients; bucketed mode runs one
    secure sum per random bucket (Karimireddy, He, Jaggi, ICLR 2022) so that a
    robust rule can combine the bucket means. Configured where it is created;
    every node runs :func:`fedsec.client.secagg_mod.secagg_mod`, which takes
    its parameters from the protocol's own messages.

    Parameters
    ----------
    bucket_size : int, default 0
        ``s >= 2``: bucketed mode. Each round splits the sampled clients at
        random into ``floor(n / s)`` buckets of ``s`` to ``2s - 1`` clients, runs
        one secure sum per bucket and hands the bucket means to the strategy's
        rule. A bucket left with fewer than ``s`` clients is discarded, never
        unmasked. 0: one secure sum over all sampled clients (the strategy's
        rule must then be the plain mean).
    clip : float, default 1.0
        Every update coordinate is clipped to ``[-clip, clip]`` before
        fixed-point encoding.
    bits : int, default 0
        Fixed-point bits per coordinate; 0 takes the finest grid that cannot wrap.
    modulus_bits : int, default 32
        The ring: 32 or 64 bits.
    weight_cap : int, default 10_000
        Clients weigh their update by ``min(num_examples, cap) / cap``; 0: equal weights.
    degree, threshold : int, default 0
        Override the graph degree ``k`` and Shamir threshold ``t`` (0: derived
        from the sampled clients, ``dropout_rate`` and ``corrupt_fraction``).
    dropout_rate, corrupt_fraction : float, default 0.1, 0.05
        Tolerated fractions of dropouts and of corrupt clients.
    timeout : float, optional
        Seconds each stage waits for replies; None: the round timeout the
        caller passes to :meth:`run_round`.
    signed : bool, default False
        Signed mode (malicious server): clients sign their keys with Ed25519
        and the protocol adds the consistency check.
    trusted_keys : dict[str, bytes] or path, optional
        Signed mode: identity -> raw Ed25519 public key, or a folder of
        ``<identity>.pub`` files (read once, at first use). With them the
        server refuses a client's bad signature itself instead of relaying
        it to every neighbour; without, checking is left to the clients.
    norm_bound : float, default 0
        ``> 0``: clients scale their update to this L2 norm before masking and
        the server discards a bucket whose sum is longer than its total
        weight times the bound (plus quantisation and noise slack).
    noise_multiplier : float, default 0
        ``> 0``: distributed DP (needs ``norm_bound``). Clients add Skellam
        noise so that the sum of the fewest clients ever unmasked carries
        noise of std ``noise_multiplier`` times the update's sensitivity.
    delta : float, default 1e-5
        Delta of the distributed-DP epsilon reported each round.
    seed : int, default 0
        Seeds the bucket assignment (with the round), for reproducible runs.

    Raises
    ------
    ValueError
        One line naming the first parameter out of range.
    """

    #: Record keys of the model and config in requests: fedsec's SecAgg client mod reads these.
    record_keys = (ARRAYS_KEY, CONFIG_KEY)

    def __init__(
        self,
        *,
        bucket_size: int = 0,
        clip: float = 1.0,
        bits: int = 0,
        modulus_bits: int = 32,
        weight_cap: int = 10_000,
        degree: int = 0,
        threshold: int = 0,
        dropout_rate: float = 0.1,
        corrupt_fraction: float = 0.05,
        timeout: float | None = None,
        signed: bool = False,
        trusted_keys: Mapping[str, bytes] | str | PathLike[str] | None = None,
        norm_bound: float = 0.0,
        noise_multiplier: float = 0.0,
        delta: float = 1e-5,
        seed: int = 0,
    ) -> None:
        _check_int("bucket_size", bucket_size, lambda v: v == 0 or v >= 2, "0 (off) or >= 2")
        _check_num("clip", clip, lambda v: v > 0, "> 0")
        _check_int("bits", bits, lambda v: 0 <= v <= 53, "in [0, 53] (0 = finest that fits)")
        _check_int("modulus_bits", modulus_bits, lambda v: v in (32, 64), "32 or 64")
        _check_int("weight_cap", weight_cap, lambda v: 0 <= v <= MAX_WEIGHT_CAP, "in [0, 2**53]")
        _check_int("degree", degree, lambda v: v >= 0, ">= 0 (0 = derived)")
        _check_int("threshold", threshold, lambda v: v >= 0, ">= 0 (0 = derived)")
        _check_num("dropout_rate", dropout_rate, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_num("corrupt_fraction", corrupt_fraction, lambda v: 0 <= v < 1, "in [0, 1)")
        if timeout is not None:
            _check_num("timeout", timeout, lambda v: v > 0, "> 0 seconds (or None)")
        _check_num("norm_bound", norm_bound, lambda v: v >= 0, ">= 0 (0 = off)")
        _check_num("noise_multiplier", noise_multiplier, lambda v: v >= 0, ">= 0 (0 = off)")
        _check_num("delta", delta, lambda v: 0 < v < 1, "in (0, 1)")
        _check_int("seed", seed, lambda v: True, "an int")
        if noise_multiplier > 0 and not norm_bound > 0:
            raise ValueError("distributed DP needs a norm_bound (the update's sensitivity)")
        if noise_multiplier > 0 and weight_cap:
            raise ValueError(
                "distributed DP needs equal weights (weight_cap=0): a weight rides in the "
                f"masked vector and would scale the noise's sensitivity (got {weight_cap})"
            )
        self.bucket_size = bucket_size
        self.clip = float(clip)
        self.bits = bits
        self.modulus_bits = modulus_bits
        self.weight_cap = weight_cap
        self.degree = degree
        self.threshold = threshold
        self.dropout_rate = float(dropout_rate)
        self.corrupt_fraction = float(corrupt_fraction)
        self.stage_timeout = timeout
        self.signed = bool(signed)
        self.norm_bound = float(norm_bound)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.seed = seed
        self.timeout = timeout if timeout is not None else 3600.0  # of the round in progress
        self.identities: dict[int, str] = {}  # node id -> long-term identity (signed mode)
        self.last_error = ""  # why the last round failed, if it did
        self.duplicates: dict[int, int] = {}  # node -> extra replies ignored this round
        self._prepared: _Round | None = None  # next round, keys shared, masked-input due
        self._dp_worst: SkellamPlan | None = None
        self._plans: dict[tuple[int, int, int], SkellamPlan] = {}
        self._trusted: dict[str, bytes] | None = None  # identity -> Ed25519 key (signed mode)
        self._key_dir: Path | None = None
        if isinstance(trusted_keys, Mapping):
            self._trusted = {str(k): bytes(v) for k, v in trusted_keys.items()}
        elif trusted_keys is not None:
            self._key_dir = Path(trusted_keys).expanduser()

    @property
    def bucketed(self) -> bool:
        """Whether rounds run one secure sum per bucket (``bucket_size >= 2``)."""
        return self.bucket_size >= 2

    def __repr__(self) -> str:
        mode = f"bucket_size={self.bucket_size}" if self.bucketed else "unbucketed"
        extra = ", signed" if self.signed else ""
        if self.noise_multiplier > 0:
            extra += f", noise_multiplier={self.noise_multiplier:g}"
        return f"SecureAggregation({mode}, clip={self.clip:g}{extra})"

    def run_round(
        self,
        exchange: Exchange,
        grid: Grid,
        strategy: FedSecStrategy,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float = 3600.0,
        next_round: int | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """One secure training round; ``(None, metrics)`` when it could not complete.

        Parameters
        ----------
        exchange : Exchange
            Sends each stage's messages (the server-side pipeline of filters).
        grid : Grid
            Asked only for the connected nodes (sampling).
        strategy : FedSecStrategy
            Samples the clients and aggregates the unmasked mean (or bucket means).
        timeout : float
            Seconds each stage waits, unless the object was created with its own.
        next_round : int, optional
            The next round that will run securely, whose key set-up then rides
            on this round's messages.
        """
        self.timeout = self.stage_timeout if self.stage_timeout is not None else timeout
        train_messages = list(strategy.configure_train(server_round, arrays, config, grid))
        sampled = [m.metadata.dst_node_id for m in train_messages]
        content = {m.metadata.dst_node_id: m.content for m in train_messages}
        times: dict[str, float] = {}
        metrics = MetricRecord({"num-sampled": len(sampled)})
        self.duplicates = {}
        if strategy.last_report is not None:  # decisions.jsonl lists them, as in plain rounds
            strategy.last_report.duplicates = self.duplicates
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
                current = self._open(exchange, strategy, server_round, sampled, config)
                self._step(current, config, exchange, times, AdvertiseKeysReply, _share_keys)
                self._step(current, config, exchange, times, ShareKeysReply, self._masked_input)
            if next_round is not None:
                ahead = self._guard(
                    lambda: self._open(
                        exchange,
                        strategy,
                        next_round,
                        strategy.sample_nodes(grid, next_round, strategy.fraction_train),
                        config,
                    )
                )
            masked, keys_ahead = self._exchange_with(
                exchange,
                config,
                times,
                current,
                lambda b: _Part(
                    b.server,
                    b.nodes,
                    b.requests,
                    _masked_parser(epsilons, b.server.params),
                    content=content,
                ),
                ahead,
                AdvertiseKeysReply,
            )
            if current.buckets[0].server.params.signed:
                self._apply(current, masked, lambda b, r: b.server.consistency_check(r))
                self._step(current, config, exchange, times, ConsistencyCheckReply, _unmask)
            else:
                self._apply(current, masked, lambda b, r: b.server.unmask(r))
            del masked  # the server keeps only the running sums
            if ahead is not None:
                ahead = self._advance(ahead, keys_ahead, _share_keys)
            unmasked, shares_ahead = self._exchange_with(
                exchange,
                config,
                times,
                current,
                lambda b: self._part(b, UnmaskReply),
                ahead,
                ShareKeysReply,
            )
            started = time.perf_counter()
            sums = self._finish(current, unmasked)
            times["finish"] = time.perf_counter() - started
            if ahead is not None:
                ahead = self._advance(ahead, shares_ahead, self._masked_input)
            self._prepared = ahead
        except (SecAggAbortedError, ValueError) as err:
            logger.warning("round %d: secure aggregation failed: %s", server_round, err)
            self.last_error = f"{type(err).__name__}: {err}"
            metrics["secagg_aborted"] = 1
            self._dp_metrics(metrics, server_round)
            _add_times(metrics, times, self.duplicates)
            return None, metrics
        nodes_dropped = dict(current.unidentified)
        for bucket in current.buckets:
            for cid, reason in bucket.server.dropped.items():
                nodes_dropped[bucket.nodes[cid - 1]] = reason
            if bucket.failure:
                for node in bucket.nodes:
                    nodes_dropped.setdefault(node, f"bucket discarded: {bucket.failure}")
        # Weight first: the norm check scales by the summed weight it would trust.
        refused = {
            id(s): why
            for s in sums
            if (why := self._weight_check(server_round, s) or self._norm_check(server_round, s))
        }
        kept = [s for s in sums if id(s) not in refused]
        metrics["secagg_buckets"] = len(current.buckets)
        metrics["secagg_buckets_unmasked"] = len(sums)
        metrics["secagg_buckets_discarded"] = len(current.buckets) - len(kept)
        metrics["secagg_min_bucket"] = min(len(s.result.contributors) for s in sums)
        if not kept:
            reasons = "; ".join(sorted(set(refused.values())))
            self.last_error = f"SecAggAbortedError: every bucket sum was discarded ({reasons})"
            logger.warning("round %d: %s", server_round, self.last_error)
            metrics["secagg_aborted"] = 1
            self._dp_metrics(metrics, server_round)  # the discarded sums were released
            _add_times(metrics, times, self.duplicates)
            return None, metrics
        for s in sums:
            if id(s) in refused:
                for cid in s.result.contributors:
                    nodes_dropped[s.bucket.nodes[cid - 1]] = f"bucket sum {refused[id(s)]}"
        contributors = [s.bucket.nodes[cid - 1] for s in kept for cid in s.result.contributors]
        for node in contributors:  # e.g. gone at unmask, but its input is in the sum
            nodes_dropped.pop(node, None)
        try:
            if self.bucket_size:
                new_arrays, round_metrics = strategy.aggregate_buckets(
                    server_round,
                    torch.stack([s.result.aggregate for s in kept]),
                    torch.tensor([s.result.total_weight for s in kept], dtype=torch.float32),
                    contributors=contributors,
                    dropped=nodes_dropped,
                )
            else:
                result = kept[0].result
                new_arrays, round_metrics = strategy.aggregate_secure(
                    server_round,
                    result.aggregate,
                    total_weight=result.total_weight,
                    contributors=contributors,
                    dropped=nodes_dropped,
                )
        except ValueError as err:  # e.g. too few buckets left for the rule
            logger.warning("round %d: aggregation failed: %s", server_round, err)
            self.last_error = f"{type(err).__name__}: {err}"
            metrics["secagg_aborted"] = 1
            self._dp_metrics(metrics, server_round)  # the refused sums were released
            _add_times(metrics, times, self.duplicates)
            return None, metrics
        self.last_error = ""
        metrics.update(round_metrics)
        params = current.buckets[0].server.params
        metrics["secagg_degree"] = params.degree
        metrics["secagg_threshold"] = params.threshold
        metrics["secagg_error_bound"] = max(s.result.error_bound for s in kept)
        metrics["secagg_pipelined"] = int(current is prepared)
        self._dp_metrics(metrics, server_round)
        if epsilons:
            metrics[EPSILON_KEY] = max(epsilons)
        _add_times(metrics, times, self.duplicates)
        return new_arrays, metrics

    def _dp_metrics(self, metrics: MetricRecord, server_round: int) -> None:
        """Distributed DP: the client-level epsilon after ``server_round`` rounds.

        Reported by every round, failed ones included: a sum unmasked and then
        discarded (norm check, rule) was seen by the server all the same, and in
        a round that aborted earlier a client may have sent its unmask shares.
        Every round up to this one counts as a release with the client in it
        (also rounds before a resume), at the worst plan in use.
        """
        if self.noise_multiplier > 0 and self._dp_worst is not None:
            metrics["dp_distributed_epsilon"] = self._dp_worst.epsilon(server_round, self.delta)
            metrics["dp_delta"] = self.delta

    # -- buckets ------------------------------------------------------------------------

    def _apply(
        self,
        round_: _Round,
        replies: Mapping[int, dict[int, Any]],
        step: Callable[[_Bucket, dict[int, Any]], Mapping[int, Any]],
    ) -> None:
        """Advance every live bucket with its replies; a bucket that aborts is discarded.

        Raises :class:`SecAggAbortedError` when no bucket is left.
        """
        for index, bucket in enumerate(round_.buckets):
            if bucket.failure:
                continue
            try:
                bucket.requests = step(bucket, replies.get(index, {}))
            except SecAggAbortedError as err:
                bucket.failure = str(err)
                logger.warning("round %d: bucket %d discarded: %s", round_.server_round, index, err)
        if not round_.live():
            reasons = "; ".join(sorted({b.failure for b in round_.buckets}))
            if len(round_.buckets) > 1:
                reasons = f"every bucket failed: {reasons}"
            raise SecAggAbortedError(reasons)

    def _step(
        self,
        round_: _Round,
        config: ConfigRecord,
        exchange: Exchange,
        times: dict[str, float],
        reply: type,
        step: Callable[[_Bucket, dict[int, Any]], Mapping[int, Any]],
    ) -> None:
        """Send every live bucket's pending requests, then advance it with the replies."""
        live = round_.live()
        replies = self._exchange(exchange, config, times, [self._part(b, reply) for b in live])
        by_index = {round_.buckets.index(b): r for b, r in zip(live, replies, strict=True)}
        self._apply(round_, by_index, step)

    def _masked_input(self, bucket: _Bucket, replies: dict[int, Any]) -> Mapping[int, Any]:
        """The masked-input requests, each carrying how its client weighs its update.

        ``weight_cap`` rides in the protocol's own request, so a client mod needs
        no application config; the protocol server's requests are otherwise as built.
        """
        cap = self.weight_cap
        return {
            cid: replace(request, weight_cap=cap)
            for cid, request in bucket.server.masked_input(replies).items()
        }

    def _finish(self, round_: _Round, unmasked: dict[int, dict[int, Any]]) -> list[_Sum]:
        sums: list[_Sum] = []

        def finish(bucket: _Bucket, replies: dict[int, Any]) -> Mapping[int, Any]:
            sums.append(_Sum(bucket, bucket.server.finish(replies)))
            return {}

        self._apply(round_, unmasked, finish)
        return sums

    def _weight_check(self, server_round: int, s: _Sum) -> str | None:
        """Why a sum's total weight is impossible for its honest contributors, or None.

        Each client's weight rides masked in its vector (``w clip``, one more
        coordinate), so the server sees only the sum and cannot bound a single
        client's weight; what it can refuse is a total no set of honest
        contributors gives. An honest weight is ``min(n, cap) / cap`` with at
        least one example, in ``[1 / cap, 1]``, and exactly 1 with
        ``weight_cap = 0``: the total of ``c`` contributors lies in
        ``[c / cap, c]`` (exactly ``c``), up to the weight coordinate's
        quantisation error. Anything else (a negative or out-of-range weight
        code, or a wrapped sum) discards the sum, as the norm check does.
        """
        result, params = s.result, s.bucket.server.params
        count = len(result.contributors)
        cap = self.weight_cap
        slack = params.encoder.quantisation_bound(count) / params.clip + 1e-9 * count
        low = count - slack if cap == 0 else count / cap - slack
        total = result.total_weight
        if math.isfinite(total) and low <= total <= count + slack:
            return None
        reason = (
            f"failed the weight check: total weight {total:.6g} of {count} clients outside "
            f"[{max(low, 0.0):.6g}, {count + slack:.6g}] (weight_cap = {cap})"
        )
        logger.warning("round %d: bucket of %d discarded: %s", server_round, count, reason)
        return reason

    def _norm_check(self, server_round: int, s: _Sum) -> str | None:
        """Norm bounding: a bucket's sum cannot be longer than its weight times the bound."""
        return None if self._plausible(server_round, s) else "failed the norm check"

    def _plausible(self, server_round: int, s: _Sum) -> bool:
        """Norm bounding: a bucket's sum cannot be longer than its weight times the bound."""
        if not self.norm_bound > 0:
            return True
        result, params = s.result, s.bucket.server.params
        count = len(result.contributors)
        total = result.aggregate.to(torch.float64) * result.total_weight
        norm = float(torch.linalg.vector_norm(total))
        dim = params.dim
        encoder = params.encoder
        slack = encoder.quantisation_bound(count) * math.sqrt(dim)
        if params.noise_variance > 0:
            # ||N|| <= sigma (sqrt(d) + 8) but with probability below 2**-40 (chi tail).
            sigma = math.sqrt(count * params.noise_variance) * 2.0 * params.clip / encoder.levels
            slack += sigma * (math.sqrt(dim) + 8.0)
        # float32 arithmetic in clipping and in the decoded mean: a relative 1e-5.
        slack += 1e-5 * result.total_weight * self.norm_bound
        bound = result.total_weight * self.norm_bound + slack
        if norm <= bound:
            return True
        logger.warning(
            "round %d: bucket of %d discarded: sum norm %.4g exceeds %.4g (weight %.3g x bound "
            "%.3g + slack %.3g)",
            server_round,
            count,
            norm,
            bound,
            result.total_weight,
            self.norm_bound,
            slack,
        )
        return False

    def _split(self, server_round: int, nodes: list[int]) -> list[list[int]]:
        """Random buckets of ``s`` to ``2s - 1`` nodes (all nodes in one when unbucketed)."""
        s = self.bucket_size
        if not s:
            return [list(nodes)]
        if len(nodes) < s:
            raise SecAggAbortedError(
                f"only {len(nodes)} clients take part; a bucket needs at least {s}"
            )
        order = list(nodes)
        random.Random(f"{self.seed}/{server_round}/buckets").shuffle(order)
        count = len(order) // s
        sizes = [len(order) // count + (i < len(order) % count) for i in range(count)]
        buckets, start = [], 0
        for size in sizes:
            buckets.append(order[start : start + size])
            start += size
        return buckets

    # -- rounds ahead -------------------------------------------------------------------

    def _guard(self, step: Callable[[], _Round]) -> _Round | None:
        """Run a set-up step of the next round; its failure only cancels the pipelining."""
        try:
            return step()
        except (SecAggAbortedError, ValueError) as err:
            logger.info("secagg: next round's set-up abandoned (%s); it will start afresh", err)
            return None

    def _advance(
        self,
        ahead: _Round,
        replies: dict[int, dict[int, Any]],
        step: Callable[[_Bucket, dict[int, Any]], Mapping[int, Any]],
    ) -> _Round | None:
        def run() -> _Round:
            self._apply(ahead, replies, step)
            if any(b.failure for b in ahead.buckets):
                raise SecAggAbortedError("a bucket of the next round failed its set-up")
            return ahead

        return self._guard(run)

    def _exchange_with(
        self,
        exchange: Exchange,
        config: ConfigRecord,
        times: dict[str, float],
        current: _Round,
        make_part: Callable[[_Bucket], _Part],
        ahead: _Round | None,
        ahead_reply: type,
    ) -> tuple[dict[int, dict[int, Any]], dict[int, dict[int, Any]]]:
        """One exchange: the current round's live buckets and the next round's set-up.

        Returns the replies by bucket index, for the current and the next round.
        """
        live = [i for i, b in enumerate(current.buckets) if not b.failure]
        parts = [make_part(current.buckets[i]) for i in live]
        if ahead is not None:
            parts += [self._part(b, ahead_reply, key=SECAGG_NEXT_KEY) for b in ahead.buckets]
        replies = self._exchange(exchange, config, times, parts)
        mine = dict(zip(live, replies[: len(live)], strict=True))
        return mine, dict(enumerate(replies[len(live) :]))

    @staticmethod
    def _part(bucket: _Bucket, reply: type, key: str = SECAGG_KEY) -> _Part:
        return _Part(bucket.server, bucket.nodes, bucket.requests, _parse_record(reply), key)

    # -- set-up -------------------------------------------------------------------------

    def _open(
        self,
        exchange: Exchange,
        strategy: FedSecStrategy,
        server_round: int,
        sampled: list[int],
        config: ConfigRecord,
    ) -> _Round:
        """A round's buckets and participants, with their advertise-keys requests due."""
        nodes: list[int] = list(sampled)
        identities: dict[int, str] = {}
        unidentified: dict[int, str] = {}
        if self.signed:
            nodes, identities, unidentified = self._participants(exchange, sampled, config)
        buckets = []
        for members in self._split(server_round, nodes):
            server = SecAggServer(
                self._params(len(members), strategy.dim),
                server_round=server_round,
                identities=tuple(identities[n] for n in members) if identities else (),
                trusted_keys=self._trusted_keys(),
            )
            buckets.append(_Bucket(server, members, server.advertise_keys()))
        return _Round(server_round, list(sampled), buckets, unidentified)

    def _trusted_keys(self) -> dict[str, bytes]:
        """Signed mode: the clients' public keys the server was given, if any.

        Public keys only; with them the server refuses a client's bad
        signature itself instead of relaying it to every neighbour (each would
        refuse the round). A folder is read once; none leaves checking to the clients.
        """
        if not self.signed:
            return {}
        if self._trusted is None:
            self._trusted = {}
            if self._key_dir is not None:
                try:
                    for path in sorted(self._key_dir.glob("*.pub")):
                        self._trusted[path.stem] = path.read_bytes()
                except OSError as err:
                    logger.info("secagg: no trusted keys read from %s (%s)", self._key_dir, err)
        return self._trusted

    def sum_params(self, n: int, dim: int, **encoding: Any) -> SecAggParams:
        """The protocol parameters of one secure sum of ``n`` clients' ``dim``-vectors.

        A bucket (``bucket_size`` > 0) uses the complete graph and is never
        unmasked below ``bucket_size``; otherwise ``k`` and ``t`` come from
        ``degree`` / ``threshold`` or are derived. ``encoding`` overrides
        ``bits`` and ``min_survivors`` and adds ``noise_variance`` and ``headroom``.
        """
        base: dict[str, Any] = {
            "clip": self.clip,
            "bits": self.bits,
            "modulus_bits": self.modulus_bits,
            "norm_bound": self.norm_bound,
            "corrupt_fraction": self.corrupt_fraction,
            "signed": self.signed,
        }
        base.update(encoding)
        if self.bucket_size:
            base["min_survivors"] = base.get("min_survivors") or self.bucket_size
            return SecAggParams.for_bucket(n, dim, **base)
        return SecAggParams.for_round(
            n,
            dim,
            dropout_rate=self.dropout_rate,
            degree=self.degree,
            threshold=self.threshold,
            **base,
        )

    def _params(self, n: int, dim: int) -> SecAggParams:
        """One sum's parameters: ``n`` members, bucketed or not, with or without noise."""
        min_survivors = self.bucket_size
        noise_variance, headroom, bits = 0.0, 0, self.bits
        if self.noise_multiplier > 0:
            if not min_survivors:  # the fewest clients a plain round may unmask
                min_survivors = unmask_floor(n, self.dropout_rate)
            plan = self._plan(n, min_survivors, dim)
            noise_variance, headroom, bits = plan.client_variance, plan.headroom, plan.bits
        return self.sum_params(
            n,
            dim,
            min_survivors=min_survivors,
            bits=bits,
            noise_variance=noise_variance,
            headroom=headroom,
        )

    def _plan(self, n: int, min_clients: int, dim: int) -> SkellamPlan:
        """The Skellam noise for a sum of ``n``, at least ``min_clients`` of them unmasked."""
        known = self._plans.get((n, min_clients, dim))
        if known is not None:  # the same few bucket sizes come back every round
            return known
        plan = plan_skellam(
            noise_multiplier=self.noise_multiplier,
            norm_bound=self.norm_bound,
            clip=self.clip,
            dim=dim,
            num_clients=n,
            min_clients=min_clients,
            modulus_bits=self.modulus_bits,
            bits=self.bits,
        )
        # Report the epsilon of the coarsest grid in use: the rounding slack then
        # weighs most in the sensitivity, which makes it the worst case.
        if self._dp_worst is None or plan.epsilon(1, self.delta) > self._dp_worst.epsilon(
            1, self.delta
        ):
            self._dp_worst = plan
        self._plans[(n, min_clients, dim)] = plan
        return plan

    def _participants(
        self, exchange: Exchange, sampled: list[int], config: ConfigRecord
    ) -> tuple[list[int], dict[int, str], dict[int, str]]:
        """Signed mode: the nodes with a unique stated identity, and why others sit out."""
        refused: dict[int, str] = {}
        known = self._identify(exchange, sampled, config, refused)
        left_out = {
            n: "identify: " + refused.get(n, "no identity stated")
            for n in sampled
            if n not in known
        }
        claims = Counter(known.values())
        for node, name in list(known.items()):
            if claims[name] > 1:  # cannot tell which one holds the key
                left_out[node] = f"identify: identity {name!r} claimed by several nodes"
                del known[node]
        nodes = [n for n in sampled if n in known]
        return nodes, {n: known[n] for n in nodes}, left_out

    def _identify(
        self,
        exchange: Exchange,
        nodes: list[int],
        config: ConfigRecord,
        refused: dict[int, str] | None = None,
    ) -> dict[int, str]:
        """Long-term identities of ``nodes``, asking those not seen before (signed mode).

        A stated identity goes to every client of the round, which refuses
        names longer than :data:`~fedsec.secagg.messages.MAX_IDENTITY_CHARS`;
        such a name (or an error, or no name) leaves only its node out, with
        the reason in ``refused``. One answer per node counts (the first).
        """
        refused = {} if refused is None else refused
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
                    group_id=_group(config),
                )
                for node in unknown
            ]
            replies = exchange(messages, self.timeout)
            for node, reply in self._first_replies(config, replies, set(unknown)).items():
                if reply.has_error():
                    refused[node] = f"client error: {short_repr(reply.error.reason, 200)}"
                    continue
                record = reply.content.config_records.get(SECAGG_KEY)
                identity = None if record is None else record.get("identity")
                if not isinstance(identity, str) or not 1 <= len(identity) <= MAX_IDENTITY_CHARS:
                    refused[node] = (
                        f"identity must be 1 to {MAX_IDENTITY_CHARS} characters, "
                        f"got {short_repr(identity)}"
                    )
                    continue
                self.identities[node] = identity
        return {node: self.identities[node] for node in nodes if node in self.identities}

    # -- transport ----------------------------------------------------------------------

    def _first_replies(
        self, config: ConfigRecord, replies: list[Message], asked: set[int]
    ) -> dict[int, Message]:
        """The first reply of each node that was asked; later copies are counted and ignored.

        One node, one answer per exchange, whatever the grid delivers (as in
        plain rounds, :func:`~fedsec.strategies.strategy.first_per_node`);
        replies from nodes this exchange did not address are ignored.
        """
        duplicates: dict[int, int] = {}
        first = first_per_node(_server_round(config), replies, duplicates)
        for node, extra in duplicates.items():
            self.duplicates[node] = self.duplicates.get(node, 0) + extra
        return {m.metadata.src_node_id: m for m in first if m.metadata.src_node_id in asked}

    def _exchange(
        self, exchange: Exchange, config: ConfigRecord, times: dict[str, float], parts: list[_Part]
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
            Message(
                RecordDict(body),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=_group(config),
            )
            for node, body in bodies.items()
        ]
        by_node = self._first_replies(config, exchange(messages, self.timeout), set(bodies))
        for part in parts:
            for cid in part.requests:
                msg = by_node.get(part.nodes[cid - 1])
                if msg is None:
                    continue
                if msg.has_error():
                    part.server.drop(cid, f"client error: {short_repr(msg.error.reason, 200)}")
                    continue
                try:
                    part.replies[cid] = part.parse(msg, part.key)
                except Exception as err:  # whatever a reply holds, only its sender drops out
                    kind = "" if isinstance(err, ProtocolError) else f"{type(err).__name__}: "
                    part.server.drop(cid, f"malformed reply: {kind}{short_repr(err, 200)}")
        name = "+".join(dict.fromkeys(_stage_name(p) for p in parts))
        times[name] = times.get(name, 0.0) + time.perf_counter() - started
        return [part.replies for part in parts]


def _server_round(config: ConfigRecord) -> int:
    value = config.get(SERVER_ROUND_KEY, 0)
    return value if isinstance(value, int) else 0


def _group(config: ConfigRecord) -> str:
    """The messages' group id: the server round the exchange belongs to."""
    return str(config.get(SERVER_ROUND_KEY, ""))


def _share_keys(bucket: _Bucket, replies: dict[int, Any]) -> Mapping[int, Any]:
    return bucket.server.share_keys(replies)


def _unmask(bucket: _Bucket, replies: dict[int, Any]) -> Mapping[int, Any]:
    return bucket.server.unmask(replies)


def _stage_name(part: _Part) -> str:
    stage = next(iter(part.requests.values())).stage if part.requests else "?"
    return f"next-{stage}" if part.key == SECAGG_NEXT_KEY else str(stage)


def _add_times(
    metrics: MetricRecord, times: dict[str, float], duplicates: Mapping[int, int]
) -> None:
    for stage, seconds in times.items():
        metrics[f"secagg_{stage}_s"] = seconds
    metrics["num-duplicates"] = sum(duplicates.values())


def _check_num(name: str, value: object, ok: Callable[[float], bool], expected: str) -> None:
    """One-line ``ValueError`` unless ``value`` is a finite number satisfying ``ok``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"SecureAggregation: {name} must be {expected}, got {short_repr(value)}")


def _check_int(name: str, value: object, ok: Callable[[int], bool], expected: str) -> None:
    """One-line ``ValueError`` unless ``value`` is an int (not a bool) satisfying ``ok``."""
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"SecureAggregation: {name} must be {expected}, got {short_repr(value)}")
