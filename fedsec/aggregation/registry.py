"""Config names -> aggregation rules and pre-aggregation wrappers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from fedsec.aggregation.base import Mean, Rule
from fedsec.aggregation.coordinate import CoordinateMedian, TrimmedMean
from fedsec.aggregation.dnc import DivideAndConquer
from fedsec.aggregation.flame import Flame
from fedsec.aggregation.geometric import CenteredClipping, GeometricMedian, NormBounding
from fedsec.aggregation.krum import Bulyan, Krum, MultiKrum
from fedsec.aggregation.reputation import Reputation
from fedsec.aggregation.trust import FLTrust, FoolsGold
from fedsec.aggregation.wrappers import Bucketing, NearestNeighborMixing
from fedsec.registry import Registry

RULES: Registry[type[Rule]] = Registry("aggregation rule")
for _rule in (
    Mean,
    CoordinateMedian,
    TrimmedMean,
    Krum,
    MultiKrum,
    Bulyan,
    GeometricMedian,
    CenteredClipping,
    NormBounding,
    FLTrust,
    FoolsGold,
    DivideAndConquer,
    Flame,
):
    RULES.add(_rule.name, _rule)

#: Wrappers applied before a rule: ``wrapper(inner_rule, **params) -> Rule``.
PRE_AGGREGATORS: Registry[Callable[..., Rule]] = Registry("pre-aggregation")
PRE_AGGREGATORS.add(Bucketing.name, Bucketing)
PRE_AGGREGATORS.add(NearestNeighborMixing.name, NearestNeighborMixing)
PRE_AGGREGATORS.add(Reputation.name, Reputation)


def parameters_of(factory: Callable[..., Any], skip: int = 0) -> list[str]:
    """Keyword parameters a rule or wrapper accepts (for error messages)."""
    names = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return names[skip:]


def _build(kind: str, name: str, factory: Callable[..., Rule], *args: Any, **params: Any) -> Rule:
    accepted = parameters_of(factory, skip=len(args))
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) or "none"
        raise ValueError(f"{kind} '{name}' has no parameter {unknown[0]!r}; valid: {valid}")
    try:
        return factory(*args, **params)
    except TypeError as err:
        raise ValueError(f"{kind} '{name}': {err}") from None


def make(name: str, **params: Any) -> Rule:
    """Build the rule registered as ``name`` with its parameters.

    Examples
    --------
    >>> rule = make("mean")
    """
    return _build("aggregation rule", name, RULES.get(name), **params)


def make_pipeline(
    rule: str,
    params: dict[str, Any] | None = None,
    pre: Sequence[str] = (),
    pre_params: dict[str, dict[str, Any]] | None = None,
) -> Rule:
    """A rule wrapped by pre-aggregation steps, the first listed applied first.

    ``make_pipeline("krum", {"f": 2}, ["nnm"], {"nnm": {"f": 2}})`` mixes the
    updates with NNM, then applies Krum to the mixed updates.
    """
    built = make(rule, **(params or {}))
    for step in reversed(list(pre)):
        wrapper = PRE_AGGREGATORS.get(step)
        built = _build("pre-aggregation", step, wrapper, built, **(pre_params or {}).get(step, {}))
    return built
