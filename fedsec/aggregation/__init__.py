"""Aggregation rules over a stacked update matrix, and their registry.

Every rule is a plain callable ``rule(updates, weights=None) -> AggregationResult``
where ``updates`` is a torch tensor of shape [n, d] (one row per client) and
``weights`` an optional [n] tensor of per-client weights (e.g. example counts).
Rules are free of Flower types so they can be tested and reused directly.
"""

from fedsec.aggregation.base import (
    AggregationResult,
    AggregationRule,
    check_updates,
    weighted_mean,
)
from fedsec.aggregation.registry import RULES, make

__all__ = [
    "RULES",
    "AggregationResult",
    "AggregationRule",
    "check_updates",
    "make",
    "weighted_mean",
]
