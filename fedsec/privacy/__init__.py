"""Differential privacy: accounting, a per-client privacy ledger, client-level DP.

* :mod:`fedsec.privacy.accounting` — epsilon of the subsampled Gaussian
  mechanism with Opacus's RDP (default) or PRV accountant, the noise-multiplier
  solver, and their client-level forms for DP-FedAvg (McMahan et al., ICLR 2018).
* :mod:`fedsec.privacy.ledger` — :class:`PrivacyLedger`, a budget and history
  that fits a Flower ``ConfigRecord`` in the client's ``context.state``.
* :mod:`fedsec.privacy.client_level` — local DP (:func:`privatize_update`) and
  the central DP-FedAvg aggregation rule (:class:`CentralDPFedAvg`).
"""

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
from fedsec.privacy.ledger import PrivacyLedger

__all__ = [
    "CentralDPFedAvg",
    "PrivacyLedger",
    "client_level_epsilon",
    "clip_update",
    "epsilon_for_history",
    "epsilon_spent",
    "privatize_update",
    "secure_standard_normal",
    "solve_client_level_noise_multiplier",
    "solve_noise_multiplier",
]
