"""fedsec: federated learning that stays correct under hostile clients and a curious server.

The public API is what this module exports (:data:`__all__`), plus the rule
library :mod:`fedsec.aggregation` (``make("krum", f=1)``) and the registration
API :mod:`fedsec.registry`. Everything else is fedsec's own machinery and may
change between versions. Each defense is a Flower component, configured where
it is created:

========================  =====================================================
server (a strategy)       :class:`FedSecStrategy`, :class:`SecureAggregation`,
                          :class:`SignatureFilter`, :func:`load_registry`,
                          :func:`pipeline`, :class:`Filter`, :data:`Exchange`
client (Flower mods)      :func:`secagg_mod`, :func:`signing`, :func:`local_dp`
DP-SGD on your own loop   :func:`make_private`
simulations only          :class:`Collusion`, :func:`attack_mod`,
                          :func:`enable_simulated_adversary`
========================  =====================================================

Names load on first use (PEP 562): a SuperNode starts a fresh process for
every message, and ``import fedsec`` must not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsec.attacks.threat import enable_simulated_adversary
    from fedsec.client.attack_mods import attack_mod
    from fedsec.client.mods import local_dp, signing
    from fedsec.client.secagg_mod import secagg_mod
    from fedsec.deploy.signatures import load_registry
    from fedsec.privacy.dp_loop import make_private
    from fedsec.simulation import Collusion
    from fedsec.strategies.pipeline import Exchange, Filter, pipeline
    from fedsec.strategies.secagg import SecureAggregation
    from fedsec.strategies.signatures import SignatureFilter
    from fedsec.strategies.strategy import FedSecStrategy

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "FedSecStrategy": "fedsec.strategies.strategy",
    "SecureAggregation": "fedsec.strategies.secagg",
    "SignatureFilter": "fedsec.strategies.signatures",
    "load_registry": "fedsec.deploy.signatures",
    "pipeline": "fedsec.strategies.pipeline",
    "Filter": "fedsec.strategies.pipeline",
    "Exchange": "fedsec.strategies.pipeline",
    "secagg_mod": "fedsec.client.secagg_mod",
    "signing": "fedsec.client.mods",
    "local_dp": "fedsec.client.mods",
    "make_private": "fedsec.privacy.dp_loop",
    "Collusion": "fedsec.simulation",
    "attack_mod": "fedsec.client.attack_mods",
    "enable_simulated_adversary": "fedsec.attacks.threat",
}

__all__ = [
    "Collusion",
    "Exchange",
    "FedSecStrategy",
    "Filter",
    "SecureAggregation",
    "SignatureFilter",
    "attack_mod",
    "enable_simulated_adversary",
    "load_registry",
    "local_dp",
    "make_private",
    "pipeline",
    "secagg_mod",
    "signing",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
