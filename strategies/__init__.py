"""Flower server strategies and the ServerApp, composed from fedsec's parts.

Installed as ``fedsec.strategies`` (the folder sits at the repository's top
level, mapped in pyproject.toml), so a wheel adds no generic top-level module.

What a Flower app adopts on the server side: :class:`FedSecStrategy` (robust
rules, driven by ``strategy.start()``), :class:`SecureAggregation` (plain or
bucketed secure rounds), :class:`SignatureFilter` (signed replies) and the
pipeline of filters every exchange goes through
(:mod:`fedsec.strategies.pipeline`; the module's name is not shadowed here).
"""

from .arrays import ArraySpec
from .pipeline import Exchange, Filter
from .secagg import SecureAggregation
from .signatures import SignatureFilter
from .strategy import FedSecStrategy, RoundReport

__all__ = [
    "ArraySpec",
    "Exchange",
    "FedSecStrategy",
    "Filter",
    "RoundReport",
    "SecureAggregation",
    "SignatureFilter",
]
