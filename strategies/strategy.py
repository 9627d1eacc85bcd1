"""The fedsec server strategy on Flower's Message API.

Each round it samples clients deterministically (seeded by the experiment seed
and the round), turns every valid reply into an update (returned model minus
global model) in one preallocated [n, d] tensor, applies the configured
aggregation rule from :mod:`fedsec.aggregation`, then the server step (server
learning rate, optional server momentum). Malformed replies are excluded with
their reason logged and counted; they never crash a round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
from flwr.serverapp.strategy import Strategy

from fedsec.aggregation import Rule
from fedsec.params import prefixed, unprefixed

from .arrays import ArraySpec

logger = logging.getLogger("fedsec")

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"


@dataclass
class RoundReport:
    """What the strategy decided in one training round."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)


class FedSecStrategy(Strategy):
    """Sampling, reply validation, a pluggable aggregation rule and a server step.

    Parameters
    ----------
    rule : Rule
        Callable over stacked updates [n, d] (see :mod:`fedsec.aggregation`).
    rule_name : str
        The rule's config name, for logs.
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
    secure : bool, default False
        Rounds run under secure aggregation (:mod:`fedsec.strategies.secagg`):
        the strategy only ever gets the weighted mean, so the rule must be the
        plain ``mean``.
    bucketed : bool, default False
        With ``secure``: rounds run bucketed secure aggregation and ``rule``
        combines the bucket means (it must not need ``client_ids``).
    """

    def __init__(
        self,
        *,
        rule: Rule,
        rule_name: str = "mean",
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_available_nodes: int = 1,
        seed: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        node_wait_timeout: float = 600.0,
        reference_fn: Callable[[ArrayRecord], torch.Tensor] | None = None,
        secure: bool = False,
        bucketed: bool = False,
    ) -> None:
        self.rule = rule
        self.rule_name = rule_name
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.node_wait_timeout = node_wait_timeout
        self.reference_fn = reference_fn
        if secure and not bucketed and rule_name != "mean":
            raise ValueError(
                f"rule '{rule_name}' needs individual client updates, which secure aggregation "
                "hides; only 'mean' works on the secure sum (robust rules need the bucketed mode)"
            )
        if bucketed and "client_ids" in rule.requires:
            raise ValueError(
                f"rule '{rule_name}' tracks clients by id; under bucketed secure aggregation it "
                "sees buckets, which change every round"
            )
        self.secure = secure
        self.bucketed = bucketed
        if "reference" in rule.requires and reference_fn is None:
            raise ValueError(f"rule '{rule_name}' needs a server reference update (reference_fn)")
        self._global_arrays: ArrayRecord | None = None
        self.momentum_buffer: torch.Tensor | None = None
        self.last_report: RoundReport | None = None
        self._spec: ArraySpec | None = None
        self._global_flat: torch.Tensor | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        logger.info(
            "FedSecStrategy: rule=%s, fraction_train=%.2f, server_lr=%g, server_momentum=%g",
            self.rule_name,
            self.fraction_train,
            self.server_lr,
            self.server_momentum,
        )

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
        config["server-round"] = server_round
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
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

    def _check_reply(self, msg: Message, row: torch.Tensor) -> str | None:
        """Copy a reply's model into ``row``; return why it is rejected, if it is."""
        assert self._spec is not None and self.last_report is not None
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if msg.metadata.src_node_id not in self.last_report.sampled:
            return "reply from a node that was not sampled this round"
        content = msg.content
        if list(content.array_records) != [ARRAYS_KEY]:
            return f"expected one ArrayRecord '{ARRAYS_KEY}', got {list(content.array_records)}"
        if METRICS_KEY not in content.metric_records:
            return f"missing MetricRecord '{METRICS_KEY}'"
        num_examples = content.metric_records[METRICS_KEY].get(NUM_EXAMPLES_KEY)
        if not _is_positive_number(num_examples):
            return f"'{NUM_EXAMPLES_KEY}' must be a positive number, got {num_examples!r}"
        arrays = content.array_records[ARRAYS_KEY]
        return self._spec.check(arrays) or self._spec.flatten_into(arrays, row)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, stack updates into [n, d], aggregate, take a server step.

        Returns ``(None, metrics)`` when no reply is usable; the caller then keeps
        the global model as it was.
        """
        if self._spec is None or self._global_flat is None or self.last_report is None:
            raise RuntimeError("aggregate_train called before configure_train")
        # Node order, not arrival order: rules that draw (bucketing) then do not depend
        # on which client happened to answer first.
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        report = self.last_report
        updates = torch.empty(len(replies), self._spec.dim, dtype=torch.float32)
        weights: list[float] = []
        accepted: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            reason = self._check_reply(msg, updates[len(accepted)])
            if reason is not None:
                report.excluded[node] = reason
                logger.warning("round %d: excluded node %d: %s", server_round, node, reason)
                continue
            report.accepted.append(node)
            accepted.append(msg)
            weights.append(_as_float(msg.content.metric_records[METRICS_KEY][NUM_EXAMPLES_KEY]))
        # Sampled nodes that sent nothing (timeout, crash) are dropouts, not exclusions.
        metrics = MetricRecord(
            {
                "num-sampled": len(report.sampled),
                "num-replies": len(replies),
                "num-accepted": len(accepted),
                "num-excluded": len(report.excluded),
            }
        )
        if not accepted:
            logger.warning("round %d: no usable reply; global model unchanged", server_round)
            return None, metrics

        stacked = updates[: len(accepted)]
        stacked.sub_(self._global_flat)  # in place: updates = returned model - global
        context: dict[str, object] = {}
        if "client_ids" in self.rule.requires:
            context["client_ids"] = list(report.accepted)
        if "reference" in self.rule.requires:
            assert self.reference_fn is not None and self._global_arrays is not None
            context["reference"] = self.reference_fn(self._global_arrays)
        result = self.rule(stacked, torch.tensor(weights, dtype=torch.float32), **context)
        new_flat = self._server_step(result.aggregate)

        for node, weight in zip(report.accepted, result.weights.tolist(), strict=True):
            report.weights[node] = weight
        # Down-weighted: kept, but at less than half of an equal share.
        equal_share = 1.0 / len(accepted)
        metrics["num-rule-excluded"] = sum(1 for w in report.weights.values() if w == 0)
        metrics["num-downweighted"] = sum(
            1 for w in report.weights.values() if 0 < w < 0.5 * equal_share
        )
        for key, value in weighted_metrics(accepted, weights).items():
            metrics[key] = value
        return self._spec.to_record(new_flat), metrics

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
        config["server-round"] = server_round
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
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
        """Example-weighted mean of the clients' evaluation metrics."""
        valid: list[Message] = []
        weights: list[float] = []
        for msg in replies:
            metrics = None if msg.has_error() else msg.content.metric_records.get(METRICS_KEY)
            count = None if metrics is None else metrics.get(NUM_EXAMPLES_KEY)
            if _is_positive_number(count):
                valid.append(msg)
                weights.append(_as_float(count))
            else:
                logger.warning(
                    "round %d: ignored evaluation reply from node %d",
                    server_round,
                    msg.metadata.src_node_id,
                )
        return weighted_metrics(valid, weights) if valid else None


def _scalar(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (not a bool or list), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _is_positive_number(value: object) -> bool:
    number = _scalar(value)
    return number is not None and number > 0


def _as_float(value: object) -> float:
    number = _scalar(value)
    if number is None:
        raise TypeError(f"expected a finite number, got {value!r}")
    return number


def weighted_metrics(replies: list[Message], weights: list[float]) -> MetricRecord:
    """Weighted mean of the scalar metrics every reply reports (finite values only).

    Keys missing from some reply, non-scalar or non-finite values are skipped
    rather than trusted, so a malformed metric cannot break a round. Keys
    ending in ``_max`` (e.g. ``dp_epsilon_max``) take the maximum instead.
    """
    records = [msg.content.metric_records[METRICS_KEY] for msg in replies]
    total = sum(weights)
    out = MetricRecord()
    keys = set.intersection(*(set(r.keys()) for r in records)) - {NUM_EXAMPLES_KEY}
    for key in sorted(keys):
        values = [_scalar(r[key]) for r in records]
        if key.endswith("_max") and all(v is not None for v in values):
            out[key] = max(v for v in values if v is not None)
        elif all(v is not None for v in values):
            out[key] = (
                sum(w * v for w, v in zip(weights, values, strict=True) if v is not None) / total
            )
    return out
