"""``privacy.mode = "local"``: client-level local DP on the whole update.

Each client clips its update to L2 norm ``privacy.update_clip`` and adds
Gaussian noise before it leaves the device
(:func:`fedsec.privacy.client_level.privatize_update`): one Gaussian
mechanism per round in its ledger, DP even against the server.
"""

from __future__ import annotations

from typing import ClassVar

from fedsec.privacy.modes.base import ClientSideMode, register


@register
class LocalDP(ClientSideMode):
    """The client clips and noises its whole update; training itself is unchanged."""

    name: ClassVar[str] = "local"
    noises_update: ClassVar[bool] = True
