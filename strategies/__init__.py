"""Flower server strategies and the ServerApp, composed from fedsec's parts.

Installed as ``fedsec.strategies`` (the folder sits at the repository's top
level, mapped in pyproject.toml), so a wheel adds no generic top-level module.
"""

from .arrays import ArraySpec
from .strategy import FedSecStrategy, RoundReport

__all__ = ["ArraySpec", "FedSecStrategy", "RoundReport"]
