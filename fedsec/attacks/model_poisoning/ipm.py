"""Inner product manipulation: send -epsilon times the mean honest update.

Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
Product Manipulation", UAI 2020.
"""

from __future__ import annotations

import torch

from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import check_number, register, repeat_rows, validate_view


@register
class IPM(ModelPoisoningAttack):
    """Inner product manipulation: send -epsilon times the mean honest update.

    Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by
    Inner Product Manipulation", UAI 2020. A small epsilon (0.1) keeps the
    malicious update close to the honest ones so that robust rules keep it
    while the inner product of the aggregate with the true direction turns
    negative; a large one (e.g. 100) overwhelms the mean. The mean is taken
    over ``view.reference``.

    Parameters
    ----------
    epsilon : float
        Factor > 0 (default 0.1).
    """

    name = "ipm"

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = check_number(self.name, "epsilon", epsilon)

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        return repeat_rows(view.reference.mean(dim=0) * -self.epsilon, view.num_malicious)
