"""``privacy.mode = "none"``: no differential privacy (the default)."""

from __future__ import annotations

from typing import ClassVar

from fedsec.privacy.modes.base import Place, PrivacyMode, register


@register
class NoPrivacy(PrivacyMode):
    """No noise, no ledger, no privacy metrics; the other ``privacy.*`` keys are ignored."""

    name: ClassVar[str] = "none"
    runs_on: ClassVar[Place] = "nowhere"
