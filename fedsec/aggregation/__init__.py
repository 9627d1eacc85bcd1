"""Aggregation rules over a stacked update matrix, and their registry.

Every rule is a configured callable ``rule(updates, weights=None) ->
AggregationResult`` where ``updates`` is a torch tensor of shape [n, d] (one
row per client) and ``weights`` an optional [n] tensor of per-client weights
(e.g. example counts). Rules are free of Flower types so they can be tested
and reused directly. Build them by name::

    from fedsec import aggregation
    rule = aggregation.make("krum", f=2)
    mixed = aggregation.make_pipeline("median", pre=["nnm"], pre_params={"nnm": {"f": 2}})

Rules: mean, median, trimmed-mean, krum, multi-krum, bulyan, geometric-median,
centered-clipping, norm-bounding, fltrust, foolsgold, dnc, flame; pre-aggregation
wrappers: bucketing, nnm.
"""

from fedsec.aggregation.base import (
    AggregationResult,
    Mean,
    Rule,
    check_updates,
    weighted_mean,
)
from fedsec.aggregation.coordinate import CoordinateMedian, TrimmedMean
from fedsec.aggregation.dnc import DivideAndConquer
from fedsec.aggregation.flame import Flame
from fedsec.aggregation.geometric import CenteredClipping, GeometricMedian, NormBounding
from fedsec.aggregation.krum import Bulyan, Krum, MultiKrum
from fedsec.aggregation.registry import PRE_AGGREGATORS, RULES, make, make_pipeline
from fedsec.aggregation.trust import FLTrust, FoolsGold
from fedsec.aggregation.wrappers import Bucketing, NearestNeighborMixing

__all__ = [
    "PRE_AGGREGATORS",
    "RULES",
    "AggregationResult",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "CoordinateMedian",
    "DivideAndConquer",
    "FLTrust",
    "Flame",
    "FoolsGold",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MultiKrum",
    "NearestNeighborMixing",
    "NormBounding",
    "Rule",
    "TrimmedMean",
    "check_updates",
    "make",
    "make_pipeline",
    "weighted_mean",
]
