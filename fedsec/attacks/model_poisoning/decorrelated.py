"""Decorrelated collusion: a colluding attack whose copies do not look like copies.

The adaptive attack on defences that give near-identical updates one vote
(FoolsGold, Fung et al., RAID 2020; fedsec's ``reputation`` step): Fung et al.
name "intelligent perturbation" of each sybil's update as the way around
their similarity test (Section 7).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import (
    MODEL_ATTACKS,
    check_number,
    register,
    validate_view,
)


@register
class Decorrelated(ModelPoisoningAttack):
    """Any colluding attack, with each colluder's copy turned away from the others'.

    The evasion of similarity-based sybil defences that Fung et al., RAID
    2020 (Section 7) call "intelligent perturbation", made concrete.
    The colluders run ``attack`` (Min-Max, ALIE, IPM, ...), which gives them
    updates that are copies of one crafted vector v, then colluder i adds
    ``r * ||v|| * u_i``, u_i a unit random direction of its own that stays
    the same in every round, with ``r = sqrt(1 / similarity - 1)``. In high
    dimension the u_i are nearly orthogonal to each other and to v, so two
    colluders' updates have cosine ``similarity`` and so do their sums over
    rounds (their histories), while the mean of the colluders' updates
    stays near v: the crafted update still acts on an averaging rule, and a
    similarity test tuned to exact copies no longer sees them.

    Knowledge: the defence's similarity test (adaptive), plus whatever
    ``attack`` needs; the inner attack probes the server's rule with the
    copies, before the directions are added.

    Parameters
    ----------
    attack : str
        The colluding model-poisoning attack to run (default ``"min-max"``).
    similarity : float
        Target cosine between two colluders' updates, in (0, 1) (default 0.9).
    seed : int
        Seed of the colluders' directions (default 0); colluder i is the i-th
        row of the adversary's view in every round.
    params : dict or None
        Parameters of ``attack`` (its defaults where None).
    omniscient : bool
        Passed to ``attack`` (set from ``attack.knowledge``).
    """

    name = "decorrelated"

    def __init__(
        self,
        attack: str = "min-max",
        similarity: float = 0.9,
        seed: int = 0,
        params: dict[str, Any] | None = None,
        omniscient: bool = False,
    ) -> None:
        if not isinstance(attack, str) or attack not in MODEL_ATTACKS:
            valid = ", ".join(MODEL_ATTACKS.names())
            raise ValueError(f"decorrelated: attack must be one of {valid}, got {attack!r}")
        cls: Any = MODEL_ATTACKS.get(attack)
        if not cls.collusion or cls is Decorrelated:
            raise ValueError(
                f"decorrelated: attack must be a colluding attack that sends copies, got {attack!r}"
            )
        self.attack = attack
        self.similarity = check_number(self.name, "similarity", similarity)
        if self.similarity >= 1:
            raise ValueError(f"decorrelated: similarity must be in (0, 1), got {similarity!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"decorrelated: seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"decorrelated: params must be a table, got {params!r}")
        self.params = dict(params or {})
        from fedsec.attacks.threat import build_attack  # threat imports this package

        try:
            self._inner: ModelPoisoningAttack = build_attack(attack, self.params, omniscient)
        except ValueError as err:
            raise ValueError(f"decorrelated: {err}") from None
        self.requires_context = self._inner.requires_context  # type: ignore[misc]
        self.min_malicious = self._inner.min_malicious  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"Decorrelated(attack={self.attack!r}, similarity={self.similarity!r}, "
            f"seed={self.seed!r}, params={self.params!r})"
        )

    def check(self, num_malicious: int, num_clients: int) -> None:
        self._inner.check(num_malicious, num_clients)

    def directions(self, m: int, d: int) -> torch.Tensor:
        """The colluders' own unit directions [m, d] (the same in every round)."""
        rows = []
        for i in range(m):
            state = np.random.SeedSequence([self.seed, i]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state))
            row = torch.randn(d, generator=generator, dtype=torch.float64)
            rows.append(row / torch.linalg.vector_norm(row))
        return torch.stack(rows)

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        crafted = self._inner.craft(view)
        m, d = crafted.shape
        spread = math.sqrt(1 / self.similarity - 1)
        norms = torch.linalg.vector_norm(crafted.to(torch.float64), dim=1, keepdim=True)
        turned: torch.Tensor = crafted.to(torch.float64) + spread * norms * self.directions(m, d)
        return turned.to(crafted.dtype)
