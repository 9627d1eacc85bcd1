"""Differential privacy: accounting, a per-client privacy ledger, client-level DP.

* :mod:`fedsec.privacy.accounting` — epsilon of the subsampled Gaussian
  mechanism with Opacus's RDP (default) or PRV accountant, the noise-multiplier
  solver, and their client-level forms for DP-FedAvg (McMahan et al., ICLR 2018).
* :mod:`fedsec.privacy.ledger` — :class:`PrivacyLedger`, a budget and history
  that fits a Flower ``ConfigRecord`` in the client's ``context.state``.
* :mod:`fedsec.privacy.client_level` — local DP (:func:`privatize_update`) and
  the central DP-FedAvg aggregation rule (:class:`CentralDPFedAvg`).
* :mod:`fedsec.privacy.dp_loop` — DP-SGD on the user's own training loop:
  :func:`make_private` (Opacus's shape) returns the model, a
  :class:`DPOptimizer` and a Poisson-sampling data loader. (The module is not
  called ``make_private``: importing it would then shadow the function here.)

The names below load on first use (PEP 562): importing a submodule such as
:mod:`fedsec.privacy.distributed` must not pull in torch through
:mod:`~fedsec.privacy.client_level`, since a SuperNode starts a fresh process
per message and most messages need neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsec.privacy.accounting import (
        client_level_epsilon,
        epsilon_for_history,
        epsilon_spent,
        solve_client_level_noise_multiplier,
        solve_noise_multiplier,
    )
    from fedsec.privacy.client_level import (
        CentralDPFedAvg,
        clip_update,
        privatize_update,
        secure_standard_normal,
    )
    from fedsec.privacy.dp_loop import DPOptimizer, DPSGDAccountant, make_private
    from fedsec.privacy.ledger import PrivacyLedger

#: Public name -> the submodule defining it.
_LAZY = {
    "client_level_epsilon": "accounting",
    "epsilon_for_history": "accounting",
    "epsilon_spent": "accounting",
    "solve_client_level_noise_multiplier": "accounting",
    "solve_noise_multiplier": "accounting",
    "CentralDPFedAvg": "client_level",
    "clip_update": "client_level",
    "privatize_update": "client_level",
    "secure_standard_normal": "client_level",
    "PrivacyLedger": "ledger",
    "DPOptimizer": "dp_loop",
    "DPSGDAccountant": "dp_loop",
    "make_private": "dp_loop",
}

__all__ = [
    "CentralDPFedAvg",
    "DPOptimizer",
    "DPSGDAccountant",
    "PrivacyLedger",
    "client_level_epsilon",
    "clip_update",
    "epsilon_for_history",
    "epsilon_spent",
    "make_private",
    "privatize_update",
    "secure_standard_normal",
    "solve_client_level_noise_multiplier",
    "solve_noise_multiplier",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
