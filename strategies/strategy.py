"""The fedsec server strategy on Flower's Message API.

Each round it samples clients deterministically (seeded by the experiment seed
and the round), turns every valid reply into an update (returned model minus
global model) in one preallocated [n, d] tensor, applies the configured
aggregation rule from :mod:`fedsec.aggregation`, then the server step (server
learning rate, optional server momentum). Malformed replies are excluded with
their reason logged and counted; they never crash a round.

A reply is untrusted input. Before it can weigh on the model: at most one reply
per node and round is considered (the first to arrive), its arrays must match
the global model's layout byte for byte (:mod:`fedsec.strategies.arrays`), and
its example count must be a finite number in ``[1, max_examples]``, so a
single client can neither take the whole weight of a mean (``2**62``) nor
overflow the rule's float32 weights (``1e39``). Client metrics enter the
round's record only under bounded names that cannot collide with the
server's own (see :func:`client_metric_name`).

As a Flower strategy. A Flower app adopts it as it would ``FedAvg``:
``FedSecStrategy(rule=make("krum", f=1)).start(grid=grid, initial_arrays=...)``
with its own ClientApp, which answers a ``train`` message with an ArrayRecord
under ``arrayrecord_key`` and a MetricRecord ``metrics`` holding
``weighted_by_key`` (the record keys are Flower's defaults, and configurable
as in ``FedAvg``). The logs name the rule as the rule object does
(:func:`rule_label`). Integer buffers such as BatchNorm's
``num_batches_tracked`` never enter the rule: see
:mod:`fedsec.strategies.arrays` for their policy (a clamped lower median).

Server-side defenses compose as one pipeline. Every exchange of
:meth:`FedSecStrategy.start` (training, each stage of secure aggregation,
evaluation) goes through ``pipeline(grid, filters)``
(:mod:`fedsec.strategies.pipeline`): signature verification
(:class:`~fedsec.strategies.signatures.SignatureFilter`), the simulation's
adversary, or the user's own filters. With ``secure=SecureAggregation(...)``
(:class:`~fedsec.strategies.secagg.SecureAggregation`) the training step is a
secure round: the server only ever unmasks the weighted mean, or, bucketed,
the bucket means the rule then combines. One method, :meth:`train_round`, is
the training step of both ``start()`` and fedsec's own experiment loop.
"""

from __future__ import annotations

import io
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from fedsec.aggregation import Rule
from fedsec.aggregation.base import Mean
from fedsec.checks import short_repr
from fedsec.params import prefixed, unprefixed
from fedsec.wire import ARRAYS_KEY as ARRAYS_KEY
from fedsec.wire import CONFIG_KEY as CONFIG_KEY
from fedsec.wire import METRICS_KEY as METRICS_KEY
from fedsec.wire import NUM_EXAMPLES_KEY as NUM_EXAMPLES_KEY
from fedsec.wire import PARTITION_ID_KEY as PARTITION_KEY
from fedsec.wire import SERVER_ROUND_KEY

from .arrays import ArraySpec
from .pipeline import Exchange, Filter, pipeline

if TYPE_CHECKING:
    from .secagg import SecureAggregation

logger = logging.getLogger("fedsec")

# ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY (Flower's record keys, the defaults
# of FedSecStrategy's keys) and PARTITION_KEY (a client's claim of which data partition it
# trains on: recorded, never trusted) are defined in fedsec.wire.

#: Ceiling of ``max_examples``: no data set here has 2**31 training examples, and
#: n * 2**31 stays far inside float32's range (3.4e38) for any n.
MAX_EXAMPLES_CEILING = 2**31
#: Most metrics one reply may carry (fedsec's ClientApp sends at most 5).
MAX_CLIENT_METRICS = 32
#: Client metric names: short, of a charset safe in CSV headers, JSON and logs.
CLIENT_METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Client-derived aggregates enter the round's record as ``client_<name>`` ...
CLIENT_METRIC_PREFIX = "client_"
#: ... except these, which fedsec's own ClientApp reports and the report and CLI
#: read; the server never writes them itself.
KNOWN_CLIENT_METRICS = frozenset(
    {"train_loss", "train_accuracy", "dp_epsilon_max", "eval_loss", "eval_accuracy"}
)
#: Metrics the server writes from its own counts (none is a client metric name).
SERVER_METRICS = frozenset(
    {
        "num-sampled",
        "num-replies",
        "num-accepted",
        "num-excluded",
        "num-duplicates",
        "num-rule-excluded",
        "num-downweighted",
        "num-metrics-dropped",
        "secagg_total_weight",
        "num-rule-excluded-buckets",
    }
)


_REMOVED = object()  # default of an argument that was removed (see FedSecStrategy)


@dataclass
class RoundReport:
    """What the strategy decided in one training round."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    #: Extra replies per node beyond the first, which were ignored.
    duplicates: dict[int, int] = field(default_factory=dict)
    #: Partition each replying node says it trains on (its claim, unverified).
    partitions: dict[int, int] = field(default_factory=dict)


class FedSecStrategy(Strategy):
    """Sampling, reply validation, a pluggable aggregation rule and a server step.

    Parameters
    ----------
    rule : Rule, optional
        An aggregation rule over stacked updates [n, d] (see
        :mod:`fedsec.aggregation`, e.g. ``make("krum", f=1)``). Logs and
        :attr:`rule_name` name it from the object (:func:`rule_label`).
        Default: the weighted mean (FedAvg), e.g. for secure aggregation or
        filters alone.
    rule_name : str, optional
        Kept for callers that pass the configured name: it must be the name of
        the rule or of a rule it wraps, else ``ValueError``. Never used for logs.
    fraction_train : float
        Fraction of connected nodes sampled per training round (at least one).
    fraction_evaluate : float
        Fraction sampled for federated evaluation; 0 disables it.
    min_available_nodes : int
        Nodes that must be connected before sampling.
    seed : int
        Makes client sampling reproducible (and identical when resuming).
    server_lr : float
        Step size applied to the aggregated update (1.0 is plain FedAvg).
    server_momentum : float
        Heavy-ball momentum on the aggregated update (FedAvgM, Hsu et al. 2019).
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` before failing.
    reference_fn : callable, optional
        Computes the server's own update from the global model (for rules such
        as FLTrust that require a ``reference``); called once per round.
    secure : SecureAggregation, optional
        Training rounds run under secure aggregation
        (:class:`~fedsec.strategies.secagg.SecureAggregation`, every node
        behind :func:`~fedsec.client.secagg_mod.secagg_mod`): the strategy only
        ever gets the weighted mean, so the rule must be
        :class:`~fedsec.aggregation.base.Mean`, unless the object is bucketed
        (``bucket_size >= 2``): then ``rule`` combines the bucket means (and
        must not need ``client_ids``). None: plain rounds.
    filters : sequence of Filter, default ()
        Steps of the server-side pipeline, outermost first
        (:func:`~fedsec.strategies.pipeline.pipeline`), through which
        :meth:`start` sends every message: e.g.
        ``[SignatureFilter(registry)]``.
    max_examples : int, default MAX_EXAMPLES_CEILING
        Largest example count a reply may claim; larger, non-finite or
        non-positive counts exclude the reply. :func:`build_strategy
        <fedsec.strategies.server_app.build_strategy>` sets it to the data
        set's training split size.
    arrayrecord_key : str, default "arrays"
        Key of the model's ArrayRecord in requests, and the only ArrayRecord a
        training reply may carry (as in Flower's ``FedAvg``).
    configrecord_key : str, default "config"
        Key of the ConfigRecord in requests.
    weighted_by_key : str, default "num-examples"
        Key, in a reply's MetricRecord ``metrics``, of its example count (the
        weight of its update and metrics).
    """

    def __init__(
        self,
        *,
        rule: Rule | None = None,
        rule_name: str | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_available_nodes: int = 1,
        seed: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        node_wait_timeout: float = 600.0,
        reference_fn: Callable[[ArrayRecord], torch.Tensor] | None = None,
        secure: SecureAggregation | None = None,
        filters: Sequence[Filter] = (),
        bucketed: object = _REMOVED,
        max_examples: int = MAX_EXAMPLES_CEILING,
        arrayrecord_key: str = ARRAYS_KEY,
        configrecord_key: str = CONFIG_KEY,
        weighted_by_key: str = NUM_EXAMPLES_KEY,
    ) -> None:
        from .secagg import SecureAggregation  # here: secagg imports this module

        if bucketed is not _REMOVED:
            raise TypeError(
                "FedSecStrategy(bucketed=...) was removed: pass "
                "secure=SecureAggregation(bucket_size=s) (s >= 2) for bucketed secure aggregation"
            )
        if secure is not None and not isinstance(secure, SecureAggregation):
            raise TypeError(
                "secure must be a fedsec.strategies.SecureAggregation (e.g. "
                f"SecureAggregation(bucket_size=4)) or None, got {short_repr(secure)}"
            )
        filters = list(filters)
        for step in filters:
            if not callable(step):
                raise TypeError(
                    "filters must be callables (messages, next, timeout) -> replies, "
                    f"got {short_repr(step)}"
                )
        if isinstance(max_examples, bool) or not 1 <= max_examples <= MAX_EXAMPLES_CEILING:
            raise ValueError(f"max_examples must be in [1, 2**31], got {max_examples!r}")
        if rule is None:  # FedAvg's weighted mean, so filters or SecAgg alone need no rule
            rule = Mean()
        if not isinstance(rule, Rule):
            raise TypeError(
                f"rule must be an aggregation Rule (e.g. fedsec.aggregation.make('krum', f=1)), "
                f"got {short_repr(rule)}"
            )
        label = rule_label(rule)
        if rule_name is not None and rule_name not in _rule_names(rule):
            raise ValueError(
                f"rule_name {rule_name!r} does not name the rule {label} ({short_repr(rule)}); "
                "the name is taken from the rule, drop rule_name"
            )
        for what, key in (
            ("arrayrecord_key", arrayrecord_key),
            ("configrecord_key", configrecord_key),
            ("weighted_by_key", weighted_by_key),
        ):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{what} must be a non-empty string, got {short_repr(key)}")
        if weighted_by_key == PARTITION_KEY:
            raise ValueError(f"weighted_by_key cannot be {PARTITION_KEY!r} (a partition claim)")
        self.max_examples = int(max_examples)
        self.rule = rule
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.weighted_by_key = weighted_by_key
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.node_wait_timeout = node_wait_timeout
        self.reference_fn = reference_fn
        # From the objects, not a name: a rule that is not exactly the mean would
        # never see an update under secure aggregation, and silently never apply.
        if secure is not None and not secure.bucketed and type(rule) is not Mean:
            raise ValueError(
                f"rule {label} ({short_repr(rule, 120)}) needs individual client updates, which "
                "secure aggregation hides (the server gets only their weighted mean); use "
                "rule=make('mean') with an unbucketed SecureAggregation, or bucketed secure "
                f"aggregation (SecureAggregation(bucket_size=s >= 2) applies {label} across "
                "the bucket means)"
            )
        if secure is not None and secure.bucketed and "client_ids" in rule.requires:
            raise ValueError(
                f"rule {label} tracks clients by id; under bucketed secure aggregation it "
                "sees buckets, which change every round"
            )
        if secure is not None and (arrayrecord_key, configrecord_key) != secure.record_keys:
            raise ValueError(
                f"{secure!r} needs the record keys {secure.record_keys[0]!r} and "
                f"{secure.record_keys[1]!r}, which fedsec's SecAgg client mod reads; got "
                f"{arrayrecord_key!r} and {configrecord_key!r}"
            )
        self.secure = secure
        self.filters: list[Filter] = filters
        if "reference" in rule.requires and reference_fn is None:
            raise ValueError(f"rule '{rule_name}' needs a server reference update (reference_fn)")
        self._global_arrays: ArrayRecord | None = None
        self.momentum_buffer: torch.Tensor | None = None
        self.last_report: RoundReport | None = None
        self._spec: ArraySpec | None = None
        self._global_flat: torch.Tensor | None = None

    @property
    def bucketed(self) -> bool:
        """Whether training rounds run bucketed secure aggregation."""
        return self.secure is not None and self.secure.bucketed

    @property
    def rule_name(self) -> str:
        """The rule's name, from the rule object (:func:`rule_label`)."""
        return rule_label(self.rule)

    def summary(self) -> None:
        """Log the strategy's settings."""
        logger.info(
            "FedSecStrategy: rule=%s, secure=%s, filters=[%s], fraction_train=%.2f, "
            "server_lr=%g, server_momentum=%g, keys: arrays=%r config=%r weight=%r",
            self.rule_name,
            self.secure if self.secure is not None else "no",
            ", ".join(_filter_name(f) for f in self.filters),
            self.fraction_train,
            self.server_lr,
            self.server_momentum,
            self.arrayrecord_key,
            self.configrecord_key,
            self.weighted_by_key,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (:meth:`flwr.serverapp.strategy.Strategy.start`) through filters.

        Same parameters, logs and :class:`~flwr.serverapp.strategy.Result` as
        Flower's, but every exchange goes through ``pipeline(grid,
        self.filters)`` and the training step is :meth:`train_round` (a secure
        round when ``secure`` is set). A round that fails (no usable reply, an
        aborted secure round, a rule that raises) is logged and leaves the
        global model as it was.
        """
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")

        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        exchange = pipeline(grid, self.filters)

        t_start = time.time()
        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res

        arrays = initial_arrays
        for current_round in range(1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            try:
                agg_arrays, agg_train_metrics = self.train_round(
                    exchange,
                    grid,
                    current_round,
                    arrays,
                    train_config,
                    timeout=timeout,
                    next_round=current_round + 1 if current_round < num_rounds else None,
                )
            except Exception as err:  # a failed round leaves the global model as it was
                logger.warning(
                    "round %d failed (%s: %s); global model unchanged",
                    current_round,
                    type(err).__name__,
                    str(err).splitlines()[0][:300] if str(err) else "",
                )
                agg_arrays, agg_train_metrics = None, None
            if agg_arrays is not None:
                result.arrays = agg_arrays
                arrays = agg_arrays
            if agg_train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics

            agg_evaluate_metrics = self.evaluate_round(
                exchange, grid, current_round, arrays, evaluate_config, timeout=timeout
            )
            if agg_evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics

            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res

        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    def train_round(
        self,
        exchange: Exchange,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float = 3600,
        next_round: int | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One training round through ``exchange``: the new global arrays (None: unchanged).

        The training step of :meth:`start` and of fedsec's experiment loop
        (:func:`~fedsec.strategies.server_app.run_experiment`). With ``secure``
        it is :meth:`SecureAggregation.run_round
        <fedsec.strategies.secagg.SecureAggregation.run_round>` (its failure
        reason in ``secure.last_error``); otherwise the model goes out, the
        replies come back through ``exchange`` and :meth:`aggregate_train`
        validates and aggregates them (a malformed reply is excluded and logged).

        Parameters
        ----------
        exchange : Exchange
            The server-side pipeline (:func:`~fedsec.strategies.pipeline.pipeline`).
        grid : Grid
            Asked only for the connected nodes (sampling).
        timeout : float
            Seconds to wait for replies (per stage under secure aggregation,
            unless the SecureAggregation object sets its own).
        next_round : int, optional
            Under secure aggregation, the next round, whose key set-up then
            rides on this round's messages.
        """
        if self.secure is not None:
            return self.secure.run_round(
                exchange,
                grid,
                self,
                server_round,
                arrays,
                config,
                timeout=timeout,
                next_round=next_round,
            )
        messages = list(self.configure_train(server_round, arrays, config, grid))
        return self.aggregate_train(server_round, exchange(messages, timeout))

    def evaluate_round(
        self,
        exchange: Exchange,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float = 3600,
    ) -> MetricRecord | None:
        """Federated evaluation through ``exchange`` (None when off or no reply is usable)."""
        messages = list(self.configure_evaluate(server_round, arrays, config, grid))
        if not messages:
            return None
        return self.aggregate_evaluate(server_round, exchange(messages, timeout))

    # -- state kept across rounds (checkpointed by the server app) ------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint so a resumed run continues identically."""
        state = prefixed(self.rule.state_dict(), "rule.")
        if self.momentum_buffer is not None:
            state["momentum_buffer"] = self.momentum_buffer.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.momentum_buffer = state.get("momentum_buffer")
        self.rule.load_state_dict(unprefixed(state, "rule."))

    # -- sampling -------------------------------------------------------------

    def sample_nodes(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        """Wait for enough nodes, then sample ``fraction`` of them reproducibly."""
        deadline = time.monotonic() + self.node_wait_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(node_ids)} of {self.min_available_nodes} nodes connected "
                    f"after {self.node_wait_timeout:.0f} s"
                )
            time.sleep(0.5)
        count = max(1, round(fraction * len(node_ids)))
        rng = random.Random(f"{self.seed}:{server_round}")
        return sorted(rng.sample(node_ids, count))

    # -- training ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and config to a seeded sample of nodes."""
        spec = ArraySpec.from_record(arrays)
        global_flat = torch.empty(spec.dim, dtype=torch.float32)
        reason = spec.flatten_into(arrays, global_flat)
        if reason is not None:
            raise ValueError(f"global model is invalid: {reason}")
        self._spec, self._global_flat, self._global_arrays = spec, global_flat, arrays

        node_ids = self.sample_nodes(grid, server_round, self.fraction_train)
        self.last_report = RoundReport(server_round=server_round, sampled=node_ids)
        config[SERVER_ROUND_KEY] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        logger.info("round %d: sampled %d nodes", server_round, len(node_ids))
        return [
            Message(
                content=content,
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node in node_ids
        ]

    def _check_reply(
        self, msg: Message, row: torch.Tensor, others: dict[str, np.ndarray]
    ) -> tuple[str | None, float]:
        """Copy a reply's model into ``row`` (non-float arrays into ``others``).

        Returns why it is rejected (or None) and its weight.
        """
        assert self._spec is not None and self.last_report is not None
        if msg.has_error():
            return f"client error: {short_repr(msg.error.reason, 200)}", 0.0
        if msg.metadata.src_node_id not in self.last_report.sampled:
            return "reply from a node that was not sampled this round", 0.0
        content = msg.content
        if list(content.array_records) != [self.arrayrecord_key]:
            return (
                f"expected one ArrayRecord '{self.arrayrecord_key}', "
                f"got {short_repr(list(content.array_records))}"
            ), 0.0
        if METRICS_KEY not in content.metric_records:
            return f"missing MetricRecord '{METRICS_KEY}'", 0.0
        count = content.metric_records[METRICS_KEY].get(self.weighted_by_key)
        reason = self._check_count(count)
        if reason is not None:
            return reason, 0.0
        arrays = content.array_records[self.arrayrecord_key]
        reason = self._spec.check(arrays) or self._spec.flatten_into(arrays, row, others)
        return reason, _as_float(count)

    def _check_count(self, count: object) -> str | None:
        """Why an example count is refused: not a finite number in ``[1, max_examples]``."""
        number = _scalar(count)
        if number is None or not 1 <= number <= self.max_examples:
            return (
                f"'{self.weighted_by_key}' must be a finite number in [1, {self.max_examples}] "
                f"(server.max_examples), got {short_repr(count)}"
            )
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, stack updates into [n, d], aggregate, take a server step.

        Returns ``(None, metrics)`` when no reply is usable; the caller then keeps
        the global model as it was.

        Non-float arrays (integer buffers) take the policy of
        :meth:`ArraySpec.merge_integers` over the accepted replies.

        Raises
        ------
        FloatingPointError
            If the accepted example counts sum to a non-finite float32 weight
            (not reachable with counts capped by ``max_examples``; checked so
            that no rule ever sees such weights).
        """
        if self._spec is None or self._global_flat is None or self.last_report is None:
            raise RuntimeError("aggregate_train called before configure_train")
        report = self.last_report
        replies = first_per_node(server_round, list(replies), report.duplicates)
        # One row per sampled node at most: a flood of replies cannot grow the matrix.
        rows = len({m.metadata.src_node_id for m in replies} & set(report.sampled))
        updates = torch.empty(rows, self._spec.dim, dtype=torch.float32)
        weights: list[float] = []
        accepted: list[Message] = []
        accepted_others: list[dict[str, np.ndarray]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            self._record_partition(msg)
            row = updates[len(accepted)] if len(accepted) < rows else updates[:0]
            others: dict[str, np.ndarray] = {}
            try:
                reason, weight = self._check_reply(msg, row, others)
            except Exception as err:  # one bad reply never fails the round
                reason, weight = f"reply cannot be read ({type(err).__name__})", 0.0
            if reason is not None:
                report.excluded[node] = reason
                logger.warning("round %d: excluded node %d: %s", server_round, node, reason)
                continue
            report.accepted.append(node)
            accepted.append(msg)
            accepted_others.append(others)
            weights.append(weight)
        # Sampled nodes that sent nothing (timeout, crash) are dropouts, not exclusions.
        metrics = MetricRecord(
            {
                "num-sampled": len(report.sampled),
                "num-replies": len(replies) + sum(report.duplicates.values()),
                "num-accepted": len(accepted),
                "num-excluded": len(report.excluded),
                "num-duplicates": sum(report.duplicates.values()),
            }
        )
        if not accepted:
            logger.warning("round %d: no usable reply; global model unchanged", server_round)
            return None, metrics

        stacked = updates[: len(accepted)]
        stacked.sub_(self._global_flat)  # in place: updates = returned model - global
        context: dict[str, object] = {}
        if "client_ids" in self.rule.requires | self.rule.uses:
            context["client_ids"] = list(report.accepted)
        if "reference" in self.rule.requires:
            assert self.reference_fn is not None and self._global_arrays is not None
            context["reference"] = self.reference_fn(self._global_arrays)
        result = self.rule(stacked, checked_weights(weights), **context)
        new_flat = self._server_step(result.aggregate)

        for node, weight in zip(report.accepted, result.weights.tolist(), strict=True):
            report.weights[node] = weight
        # Down-weighted: kept, but at less than half of an equal share.
        equal_share = 1.0 / len(accepted)
        metrics["num-rule-excluded"] = sum(1 for w in report.weights.values() if w == 0)
        metrics["num-downweighted"] = sum(
            1 for w in report.weights.values() if 0 < w < 0.5 * equal_share
        )
        client_metrics, dropped = weighted_client_metrics(
            accepted, weights, server_round, weight_key=self.weighted_by_key
        )
        metrics["num-metrics-dropped"] = dropped
        for key, value in client_metrics.items():
            metrics[key] = value
        return self._spec.to_record(new_flat, self._spec.merge_integers(accepted_others)), metrics

    def _record_partition(self, msg: Message) -> None:
        """Record the partition a reply says it comes from (for decisions.jsonl)."""
        assert self.last_report is not None
        if msg.has_error():
            return
        metrics = msg.content.metric_records.get(METRICS_KEY)
        claim = None if metrics is None else metrics.get(PARTITION_KEY)
        if isinstance(claim, int) and not isinstance(claim, bool) and 0 <= claim < 2**31:
            self.last_report.partitions[msg.metadata.src_node_id] = claim

    @property
    def dim(self) -> int:
        """Number of model parameters in the current round (after configure_train)."""
        if self._spec is None:
            raise RuntimeError("dim is known once configure_train has run")
        return self._spec.dim

    def aggregate_secure(
        self,
        server_round: int,
        mean_update: torch.Tensor,
        *,
        total_weight: float,
        contributors: list[int],
        dropped: dict[int, str],
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Server step on a securely aggregated weighted mean of the contributors' updates.

        Parameters
        ----------
        mean_update : torch.Tensor
            float32 ``[d]``: ``sum_i w_i u_i / sum_i w_i`` over ``contributors``.
        total_weight : float
            ``sum_i w_i``.
        contributors : list of int
            Node ids whose updates are in the mean.
        dropped : dict of int to str
            Sampled nodes that left the protocol, with the stage and reason.

        Non-float arrays (integer buffers) keep the server's values: no
        client's own value is ever seen under secure aggregation.
        """
        if self._spec is None or self._global_flat is None or self.last_report is None:
            raise RuntimeError("aggregate_secure called before configure_train")
        if tuple(mean_update.shape) != (self._spec.dim,):
            raise ValueError(
                f"secure aggregate has shape {tuple(mean_update.shape)}, "
                f"the model has {self._spec.dim} parameters"
            )
        report = self.last_report
        report.accepted = list(contributors)
        report.excluded = dict(dropped)
        report.weights = {}  # individual weights stay hidden under secure aggregation
        new_flat = self._server_step(mean_update.to(torch.float32))
        metrics = MetricRecord(
            {
                "num-sampled": len(report.sampled),
                "num-accepted": len(contributors),
                "num-excluded": len(dropped),
                "secagg_total_weight": total_weight,
            }
        )
        return self._spec.to_record(new_flat), metrics

    def aggregate_buckets(
        self,
        server_round: int,
        bucket_means: torch.Tensor,
        bucket_weights: torch.Tensor,
        *,
        contributors: list[int],
        dropped: dict[int, str],
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The rule across securely aggregated bucket means, then the server step.

        Parameters
        ----------
        bucket_means : torch.Tensor
            float32 ``[b, d]``: each bucket's weighted mean update.
        bucket_weights : torch.Tensor
            float32 ``[b]``: each bucket's summed weight.
        contributors : list of int
            Node ids whose updates are in the kept buckets.
        dropped : dict of int to str
            Sampled nodes whose updates are not, with the reason.

        Raises
        ------
        ValueError
            If the rule refuses ``b`` buckets (e.g. Krum with too few), or the
            shapes do not fit the model; the global model is then unchanged.
        """
        if self._spec is None or self._global_flat is None or self.last_report is None:
            raise RuntimeError("aggregate_buckets called before configure_train")
        b = bucket_means.shape[0]
        if bucket_means.ndim != 2 or bucket_means.shape[1] != self._spec.dim:
            raise ValueError(
                f"bucket means have shape {tuple(bucket_means.shape)}, expected "
                f"[b, {self._spec.dim}]"
            )
        self.rule.check(b)
        context: dict[str, object] = {}
        if "reference" in self.rule.requires:
            assert self.reference_fn is not None and self._global_arrays is not None
            context["reference"] = self.reference_fn(self._global_arrays)
        result = self.rule(bucket_means.to(torch.float32), bucket_weights, **context)
        new_flat = self._server_step(result.aggregate)
        report = self.last_report
        report.accepted = list(contributors)
        report.excluded = dict(dropped)
        report.weights = {}  # individual weights stay hidden under secure aggregation
        metrics = MetricRecord(
            {
                "num-sampled": len(report.sampled),
                "num-accepted": len(contributors),
                "num-excluded": len(dropped),
                "secagg_total_weight": float(bucket_weights.sum()),
                "num-rule-excluded-buckets": int((result.weights == 0).sum()),
            }
        )
        return self._spec.to_record(new_flat), metrics

    def _server_step(self, step: torch.Tensor) -> torch.Tensor:
        """Global model after a step along ``step`` (server momentum committed on success)."""
        assert self._global_flat is not None
        if self.server_momentum > 0:
            previous = self.momentum_buffer if self.momentum_buffer is not None else 0.0
            step = self.server_momentum * previous + step
        new_flat = self._global_flat + self.server_lr * step
        if not torch.isfinite(new_flat).all():
            raise FloatingPointError("aggregation produced non-finite parameters")
        if self.server_momentum > 0:
            self.momentum_buffer = step  # committed only once the round succeeded
        return new_flat

    # -- federated evaluation -----------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a sample of clients to evaluate the global model on local data."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self.sample_nodes(grid, server_round, self.fraction_evaluate)
        config[SERVER_ROUND_KEY] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            Message(
                content=content,
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node in node_ids
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics.

        The same checks as in training: one reply per node, counts in
        ``[1, max_examples]``, bounded metric names (:func:`client_metric_name`).
        """
        valid: list[Message] = []
        weights: list[float] = []
        for msg in first_per_node(server_round, list(replies), {}):
            metrics = None if msg.has_error() else msg.content.metric_records.get(METRICS_KEY)
            count = None if metrics is None else metrics.get(self.weighted_by_key)
            reason = "no metrics" if metrics is None else self._check_count(count)
            if reason is None:
                valid.append(msg)
                weights.append(_as_float(count))
            else:
                logger.warning(
                    "round %d: ignored evaluation reply from node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    reason,
                )
        if not valid:
            return None
        checked_weights(weights)
        return weighted_client_metrics(
            valid, weights, server_round, weight_key=self.weighted_by_key
        )[0]


def _filter_name(step: object) -> str:
    """A filter's name for the logs: its class, or its function's name."""
    name = getattr(step, "__name__", None)
    return name if isinstance(name, str) else type(step).__name__


def rule_label(rule: Rule) -> str:
    """A rule's name from the object, wrapped rules included: ``"nnm(krum)"``.

    A subclass that keeps the base class's placeholder name is named by its class.
    """
    name = rule.name if rule.name != Rule.name else type(rule).__name__
    inner = getattr(rule, "inner", None)
    return f"{name}({rule_label(inner)})" if isinstance(inner, Rule) else name


def _rule_names(rule: Rule) -> list[str]:
    """Names of ``rule`` and of the rules it wraps, outermost first."""
    names = [rule.name]
    inner = getattr(rule, "inner", None)
    return names + _rule_names(inner) if isinstance(inner, Rule) else names


def first_per_node(
    server_round: int, replies: list[Message], duplicates: dict[int, int]
) -> list[Message]:
    """The first reply of each node, in node order; later copies are counted in ``duplicates``.

    Whatever the grid delivers, one node gets one vote per round (five copies
    of one update must not move the model five times as far). Node order,
    not arrival order: rules that draw (bucketing) then do not depend on
    which client happened to answer first.
    """
    first: dict[int, Message] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if node in first:
            duplicates[node] = duplicates.get(node, 0) + 1
        else:
            first[node] = msg
    for node, extra in duplicates.items():
        logger.warning(
            "round %d: node %d sent %d more replies; only its first is considered",
            server_round,
            node,
            extra,
        )
    return [first[node] for node in sorted(first)]


def _scalar(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (not a bool or list), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # an int beyond float's range raises OverflowError
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _as_float(value: object) -> float:
    number = _scalar(value)
    if number is None:
        raise TypeError(f"expected a finite number, got {short_repr(value)}")
    return number


def checked_weights(weights: list[float]) -> torch.Tensor:
    """The rule's float32 weights, once their sum is known finite and positive.

    Summed in float64 and again in float32 (the rules' precision): three
    counts of 3e38 are each finite in float32 but sum to inf, which made
    weighted means return a zero update marked ok.

    Raises
    ------
    FloatingPointError
        If a weight or the sum is not finite, or the sum is not positive.
    """
    wide = torch.tensor(weights, dtype=torch.float64)
    narrow = wide.to(torch.float32)
    total = float(wide.sum())
    if not (math.isfinite(total) and total > 0 and torch.isfinite(narrow).all()):
        raise FloatingPointError(f"example counts sum to {total!r}; not a usable weight")
    if not math.isfinite(float(narrow.sum())):
        raise FloatingPointError(f"example counts sum to {total!r}, beyond float32")
    return narrow


def client_metric_name(name: object, weight_key: str = NUM_EXAMPLES_KEY) -> str | None:
    """The round-record key of a client metric, or None if the name is refused.

    Names must be 1-64 characters of ``[A-Za-z0-9_.-]``. fedsec's own client
    metrics (:data:`KNOWN_CLIENT_METRICS`) keep their names; any other gets
    :data:`CLIENT_METRIC_PREFIX`, so a client's ``num-accepted`` becomes
    ``client_num-accepted`` and can never overwrite the server's count, nor
    any other key of the round's record (no server key starts with the prefix).
    ``weight_key`` (``num-examples``) and ``partition-id`` are read by the
    server, not averaged.
    """
    if not isinstance(name, str) or len(name) > 64 or not CLIENT_METRIC_NAME.fullmatch(name):
        return None
    if name in (weight_key, PARTITION_KEY):
        return None
    return name if name in KNOWN_CLIENT_METRICS else CLIENT_METRIC_PREFIX + name


def weighted_client_metrics(
    replies: list[Message],
    weights: list[float],
    server_round: int = 0,
    *,
    weight_key: str = NUM_EXAMPLES_KEY,
) -> tuple[MetricRecord, int]:
    """Weighted mean of the scalar metrics every reply reports, and how many were dropped.

    Only names :func:`client_metric_name` accepts and finite scalar values
    count; a reply with more than :data:`MAX_CLIENT_METRICS` metrics
    contributes none. Keys missing from some reply or with a non-scalar value
    in one are skipped rather than trusted, so a malformed metric cannot
    break a round. Keys ending in ``_max`` (e.g. ``dp_epsilon_max``) take the
    maximum instead.
    """
    total = sum(weights)
    per_reply: list[dict[str, float]] = []
    dropped = 0
    for msg in replies:
        record = msg.content.metric_records[METRICS_KEY]
        node = msg.metadata.src_node_id
        if len(record) > MAX_CLIENT_METRICS:
            logger.warning(
                "round %d: node %d sent %d metrics (at most %d); all dropped",
                server_round,
                node,
                len(record),
                MAX_CLIENT_METRICS,
            )
            dropped += len(record)
            per_reply.append({})
            continue
        kept: dict[str, float] = {}
        for name, value in record.items():
            key = client_metric_name(name, weight_key)
            number = _scalar(value)
            if key is None or number is None:
                if name not in (weight_key, PARTITION_KEY):
                    dropped += 1
                    logger.warning(
                        "round %d: dropped metric %s of node %d: %s",
                        server_round,
                        short_repr(name),
                        node,
                        "name not 1-64 characters of [A-Za-z0-9_.-]"
                        if key is None
                        else "value not a finite scalar",
                    )
                continue
            kept[key] = number
        per_reply.append(kept)
    out = MetricRecord()
    if not per_reply:
        return out, dropped
    shares = [w / total for w in weights]  # each <= 1: no overflow from the weights
    for key in sorted(set.intersection(*(set(r) for r in per_reply))):
        values = [r[key] for r in per_reply]
        if key.endswith("_max"):
            value = max(values)
        else:
            try:
                value = math.fsum(s * v for s, v in zip(shares, values, strict=True))
            except OverflowError:  # finite values near 1e308 whose sum is not
                value = math.inf
        if math.isfinite(value):
            out[key] = value
        else:
            dropped += 1
            logger.warning("round %d: dropped metric %s: its mean overflows", server_round, key)
    return out, dropped


def weighted_metrics(replies: list[Message], weights: list[float]) -> MetricRecord:
    """Weighted mean of the replies' scalar metrics (see :func:`weighted_client_metrics`)."""
    return weighted_client_metrics(replies, weights)[0]
