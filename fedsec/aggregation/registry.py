"""Config name -> aggregation rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsec.aggregation.base import AggregationRule, weighted_mean
from fedsec.registry import Registry

RuleFactory = Callable[..., AggregationRule]

RULES: Registry[RuleFactory] = Registry("aggregation rule")
RULES.add("mean", lambda: weighted_mean)


def make(name: str, **params: Any) -> AggregationRule:
    """Build the rule registered as ``name`` with its parameters.

    Examples
    --------
    >>> rule = make("mean")
    """
    factory = RULES.get(name)
    try:
        return factory(**params)
    except TypeError as err:
        raise ValueError(f"aggregation rule '{name}': {err}") from None
