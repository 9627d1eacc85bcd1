"""Gaussian attack: malicious clients send (or add) isotropic Gaussian noise.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017.
"""

from __future__ import annotations

import torch

from fedsec.attacks.model_poisoning.base import (
    PerClientAttack,
    check_flag,
    check_number,
    normal_draws,
    register,
)


@register
class GaussianNoise(PerClientAttack):
    """Gaussian attack: each malicious client sends N(0, sigma^2) noise per coordinate.

    The "Gaussian Byzantine workers" of Blanchard, El Mhamdi, Guerraoui,
    Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017: the update is replaced by an isotropic Gaussian
    vector (they use sigma = 200). With ``additive=True`` the noise is added
    to the client's own update instead (a noisy, harder to spot variant).
    Each malicious client draws its own noise from the view's generator.

    Parameters
    ----------
    sigma : float
        Standard deviation >= 0 per coordinate (default 1).
    additive : bool
        Add the noise to the own update instead of replacing it (default False).
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0, additive: bool = False) -> None:
        self.sigma = check_number(self.name, "sigma", sigma, strict=False)
        self.additive = check_flag(self.name, "additive", additive)

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        noise = normal_draws(tuple(updates.shape), updates, generator) * self.sigma
        return updates + noise if self.additive else noise
