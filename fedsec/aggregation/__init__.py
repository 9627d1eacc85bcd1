"""Aggregation rules over a stacked update matrix, and their registry.

Every rule is a configured callable ``rule(updates, weights=None) ->
AggregationResult`` where ``updates`` is a torch tensor of shape [n, d] (one
row per client) and ``weights`` an optional [n] tensor of per-client weights
(e.g. example counts). Rules are free of Flower types so they can be tested
and reused directly. Build them by name::

    from fedsec import aggregation
    rule = aggregation.make("mean")
"""

from fedsec.aggregation.base import (
    AggregationResult,
    Mean,
    Rule,
    check_updates,
    weighted_mean,
)
from fedsec.aggregation.registry import PRE_AGGREGATORS, RULES, make, make_pipeline

# Backwards-compatible name used by the strategy's type hints.
AggregationRule = Rule

__all__ = [
    "PRE_AGGREGATORS",
    "RULES",
    "AggregationResult",
    "AggregationRule",
    "Mean",
    "Rule",
    "check_updates",
    "make",
    "make_pipeline",
    "weighted_mean",
]
