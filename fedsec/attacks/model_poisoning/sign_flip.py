"""Sign flipping: each malicious client sends its own update negated.

A standard baseline of the Byzantine-robustness literature (Allen-Zhu et al.,
"Byzantine-Resilient Non-Convex Stochastic Gradient Descent", ICLR 2021;
Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021).
"""

from __future__ import annotations

import torch

from fedsec.attacks.model_poisoning.base import PerClientAttack, check_number, register


@register
class SignFlip(PerClientAttack):
    """Sign flipping: each malicious client sends ``-scale`` times its own update.

    A standard baseline of the Byzantine-robustness literature (e.g. Allen-Zhu
    et al., "Byzantine-Resilient Non-Convex Stochastic Gradient Descent",
    ICLR 2021; Karimireddy, He, Jaggi, "Learning from History for Byzantine
    Robust Optimization", ICML 2021). It needs no knowledge of other clients.

    Parameters
    ----------
    scale : float
        Factor > 0 applied to the negated update (default 1).
    """

    name = "sign-flip"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = check_number(self.name, "scale", scale)

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        return updates * -self.scale
