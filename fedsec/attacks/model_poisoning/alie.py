"""A Little Is Enough: per coordinate mu -/+ z sigma over the reference updates.

Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For
Distributed Learning", NeurIPS 2019.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import (
    check_choice,
    check_flag,
    check_number,
    register,
    repeat_rows,
    unbiased_std,
    validate_view,
)

ALIEDirection = Literal["minus", "plus"]


@register
class ALIE(ModelPoisoningAttack):
    """A Little Is Enough: per coordinate mu - z * sigma over the reference updates.

    Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For
    Distributed Learning", NeurIPS 2019. mu and sigma are the per-coordinate
    mean and the *unbiased* (n - 1) standard deviation (``torch.std``'s
    default, as in the authors' and Shejwalkar & Houmansadr's code) of
    ``view.reference``. z defaults to the paper's

        s = floor(n / 2 + 1) - m,    z = Phi^{-1}((n - m - s) / (n - m)),

    the largest shift that still leaves enough honest updates on the far side
    to keep the malicious ones inside the majority.

    Sign convention: implementations differ (mu + z sigma in the NDSS 2021
    code, mu - z sigma elsewhere). The default ``direction="minus"`` sends
    mu - z sigma, moving every coordinate against increasing values;
    ``direction="plus"`` sends mu + z sigma.

    Knowledge: with colluder knowledge (the paper's default) sigma is
    estimated from the m malicious clients' own updates, so m >= 2 is needed
    (the std of one update is 0); :meth:`check` raises for m = 1 unless
    ``omniscient=True`` (set by the integration when the view carries the
    honest updates, then h = n - m >= 2 is needed).

    Parameters
    ----------
    z : float or None
        Fixed z > 0 (some libraries use 1.5); None (default) uses the formula.
    direction : {"minus", "plus"}
        mu - z sigma (default) or mu + z sigma.
    omniscient : bool
        Whether the adversary sees the honest updates (default False).
    """

    name = "alie"

    def __init__(
        self,
        z: float | None = None,
        direction: ALIEDirection = "minus",
        omniscient: bool = False,
    ) -> None:
        self.z = None if z is None else check_number(self.name, "z", z)
        self.direction = check_choice(self.name, "direction", direction, ("minus", "plus"))
        self.omniscient = check_flag(self.name, "omniscient", omniscient)

    @staticmethod
    def z_max(num_clients: int, num_malicious: int) -> float:
        """The paper's z for n clients of which m are malicious.

        Raises
        ------
        ValueError
            If (n - m - s) / (n - m) is not in (0, 1), where z is undefined.
        """
        n, m = num_clients, num_malicious
        s = math.floor(n / 2 + 1) - m
        ratio = (n - m - s) / (n - m) if n > m else float("nan")
        if not 0.0 < ratio < 1.0:
            raise ValueError(
                f"alie: z is undefined for n={n}, m={m}: (n - m - s)/(n - m) = {ratio:.4g} "
                f"with s = floor(n/2 + 1) - m = {s} must lie in (0, 1)"
            )
        return float(torch.special.ndtri(torch.tensor(ratio, dtype=torch.float64)))

    def check(self, num_malicious: int, num_clients: int) -> None:
        super().check(num_malicious, num_clients)
        if self.z is None:
            self.z_max(num_clients, num_malicious)
        if not self.omniscient and num_malicious < 2:
            raise ValueError(
                f"alie with colluder knowledge needs m >= 2 malicious clients to estimate sigma "
                f"(the std of one update is 0), got m={num_malicious}; "
                f'use more or attack.knowledge = "omniscient"'
            )
        if self.omniscient and num_clients - num_malicious < 2:
            raise ValueError(
                f"alie needs h >= 2 honest updates to estimate sigma, got "
                f"n={num_clients}, m={num_malicious}"
            )

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        reference = view.reference
        if reference.shape[0] < 2:
            raise ValueError(
                f"alie needs >= 2 reference updates to estimate sigma, got {reference.shape[0]}"
            )
        z = self.z if self.z is not None else self.z_max(view.num_clients, view.num_malicious)
        sign = -1.0 if self.direction == "minus" else 1.0
        malicious = reference.mean(dim=0) + (sign * z) * unbiased_std(reference)
        return repeat_rows(malicious, view.num_malicious)
