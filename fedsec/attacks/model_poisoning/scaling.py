"""Model replacement: malicious clients scale their own update by gamma.

Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated
Learning", AISTATS 2020.
"""

from __future__ import annotations

import torch

from fedsec.attacks.model_poisoning.base import PerClientAttack, check_number, register


@register
class Scaling(PerClientAttack):
    """Model replacement: each malicious client sends gamma times its own update.

    Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated
    Learning", AISTATS 2020. With FedAvg, G' = G + (eta / n) * sum_i x_i; an
    attacker sending gamma * (X - G) with gamma = n / eta replaces the global
    model by its (backdoored) model X once the honest updates roughly cancel.
    The backdoor itself comes from training on poisoned data (a data-poisoning
    attack on the same client); this attack only scales the result.

    Parameters
    ----------
    gamma : float or None
        Scale factor > 0; None (default) means n / server_lr with n the number
        of updates aggregated in the round (``view.num_clients``).
    server_lr : float
        The server learning rate eta > 0 assumed by the default gamma (default 1).
    """

    name = "scaling"

    def __init__(self, gamma: float | None = None, server_lr: float = 1.0) -> None:
        self.gamma = None if gamma is None else check_number(self.name, "gamma", gamma)
        self.server_lr = check_number(self.name, "server_lr", server_lr)

    def factor(self, num_clients: int | None) -> float:
        """The scale factor used in a round of ``num_clients`` updates."""
        if self.gamma is not None:
            return self.gamma
        if num_clients is None or num_clients < 1:
            raise ValueError(
                f"{self.name}: gamma=None needs the round's number of clients n >= 1 "
                f"(gamma = n / server_lr), got {num_clients!r}"
            )
        return num_clients / self.server_lr

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        return updates * self.factor(num_clients)
