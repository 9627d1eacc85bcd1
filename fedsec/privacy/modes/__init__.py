"""Privacy modes: each value of ``privacy.mode`` is a registered :class:`PrivacyMode`.

Built in (one module each, citing its paper): :mod:`.none`, :mod:`.dp_sgd`
(Abadi et al., CCS 2016), :mod:`.local` (client-level local DP),
:mod:`.central` (DP-FedAvg, McMahan et al., ICLR 2018) and :mod:`.distributed`
(Skellam noise inside secure aggregation, Agarwal et al., NeurIPS 2021). The
shared base and registry live in :mod:`.base`.

Adding a privacy mode is one new module in this package plus its test: a
subclass of :class:`PrivacyMode` decorated with :func:`register` joins
:data:`PRIVACY_MODES` when its module is imported, and importing this package
imports every module in it (:func:`discover`); ``privacy.mode`` then accepts
its name. Call sites ask the mode, never compare its name::

    mode = mode_of(cfg)
    if mode.keeps_ledger: ...
"""

from __future__ import annotations

from fedsec.privacy.modes.base import (
    PRIVACY_MODES,
    ClientSideMode,
    Place,
    PrivacyMode,
    ledger_mode_names,
    mode_of,
    register,
    require_one_noise_source,
)
from fedsec.registry import import_package_modules

# Import order is registration order, the order of PRIVACY_MODES.names() (and of the
# config's list of valid modes). discover() below appends any other module.
# isort: off
from fedsec.privacy.modes.none import NoPrivacy
from fedsec.privacy.modes.dp_sgd import DPSGD
from fedsec.privacy.modes.local import LocalDP
from fedsec.privacy.modes.central import CentralDP
from fedsec.privacy.modes.distributed import DistributedDP
# isort: on


def discover() -> list[str]:
    """Import every module of this package, so each mode in it registers itself.

    Modules already imported are skipped (Python caches them), so calling
    this again only picks up modules added to the package's path since.

    Returns
    -------
    list of str
        The package's module names (``base`` included), in ``pkgutil`` order.
    """
    return import_package_modules(__name__, __path__)


discover()

__all__ = [
    "DPSGD",
    "PRIVACY_MODES",
    "CentralDP",
    "ClientSideMode",
    "DistributedDP",
    "LocalDP",
    "NoPrivacy",
    "Place",
    "PrivacyMode",
    "discover",
    "ledger_mode_names",
    "mode_of",
    "register",
    "require_one_noise_source",
]
