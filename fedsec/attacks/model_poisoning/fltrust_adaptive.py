"""The adaptive attack on FLTrust: trusted direction, bounded magnitude, dragged aside.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021, Section VI (adaptive attacks).
"""

from __future__ import annotations

import math

import torch

from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import (
    MAX_RULE_CALLS,
    can_probe,
    check_number,
    check_rule_calls,
    modelled_honest,
    normal_draws,
    probe,
    register,
    repeat_rows,
    validate_view,
)
from fedsec.attacks.model_poisoning.optimized import scan_and_refine

#: Relative size below which a direction counts as zero (then the next candidate is used).
_NEGLIGIBLE = 1e-9


def _orthogonal_part(vector: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return vector - (vector @ unit) * unit


@register
class FLTrustAdaptive(ModelPoisoningAttack):
    """Adaptive attack on FLTrust: updates FLTrust trusts, turned against the honest direction.

    Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via
    Trust Bootstrapping", NDSS 2021, Section VI: the adaptive attacker knows
    the server's root data, hence its update g0, and crafts updates that keep
    a positive trust score ReLU(cos(g_m, g0)) while moving the aggregate as
    far as possible from the honest one. FLTrust rescales every update to
    ||g0||, so magnitude buys nothing; only the direction matters. The
    paper solves a general optimisation (Fang et al.'s framework) by
    gradient ascent; here the direction is searched in the plane that
    matters, in closed form up to one angle. All m clients send

        g_m = ||g0|| (cos(theta) g0_hat - sin(theta) u_hat),

    g0_hat = g0 / ||g0|| and u_hat the unit component, orthogonal to g0, of
    the honest mean mu (the colluders' own mean, or all honest updates' when
    omniscient): the part of the honest progress that FLTrust's trust score
    cannot see. Its trust is cos(theta) > 0 for theta < pi/2 and it pulls
    the aggregate against mu's orthogonal part; theta in [0, pi/2) maximises
    the deviation ||FLTrust([g_m x m; honest], g0) - mu||, found by probing
    the server's rule (:func:`~fedsec.attacks.model_poisoning.optimized.scan_and_refine`,
    at most ``max_rule_calls`` probes) on the round as the adversary models it
    (:func:`~fedsec.attacks.model_poisoning.base.modelled_honest`). If mu is
    parallel to g0, u is the part of sign(g0) orthogonal to g0, else a
    random direction orthogonal to g0 (from the view's generator).

    Knowledge: adaptive (the server's rule, ``view.rule``, and its root
    update, ``view.context["reference"]``), plus the colluders' own updates
    (default) or all honest updates (omniscient). Refused, in one line,
    without the rule or the root update (``attack.adaptive = true`` against
    a rule with a reference, FLTrust).

    Parameters
    ----------
    tau : float
        Tolerance > 0 of the angle search, in radians (default 1e-4).
    max_rule_calls : int
        Most rule evaluations, 1..25 (default 25).
    """

    name = "fltrust-adaptive"
    requires_context = frozenset({"reference"})

    def __init__(self, tau: float = 1e-4, max_rule_calls: int = MAX_RULE_CALLS) -> None:
        self.tau = check_number(self.name, "tau", tau)
        self.max_rule_calls = check_rule_calls(self.name, max_rule_calls)
        self._last_theta: float | None = None

    @property
    def last_theta(self) -> float | None:
        """theta chosen by the last :meth:`craft`, in radians (None before the first)."""
        return self._last_theta

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        rule, context = view.rule, view.context
        reference = (context or {}).get("reference")
        if rule is None or not isinstance(reference, torch.Tensor):
            raise ValueError(
                f"{self.name} needs the server's rule and root update "
                "(attack.adaptive = true against a rule with a reference, e.g. fltrust)"
            )
        m, d = view.num_malicious, view.own.shape[1]
        if reference.shape != (d,):
            raise ValueError(
                f"{self.name}: the root update must have shape [{d}], got {tuple(reference.shape)}"
            )
        if not can_probe(rule, view.num_clients, context):
            raise ValueError(f"{self.name}: rule '{rule.name}' cannot be evaluated on this round")
        g0 = reference.to(device=view.own.device, dtype=torch.float64)
        g0_norm = float(torch.linalg.vector_norm(g0))
        if g0_norm == 0:  # FLTrust trusts nobody: nothing to gain
            self._last_theta = 0.0
            return torch.zeros_like(view.own)
        g0_hat = g0 / g0_norm
        mu = view.reference.mean(dim=0).to(torch.float64)
        u_hat = self._aside(mu, g0_hat, view)
        honest = modelled_honest(view)

        def malicious(theta: float) -> torch.Tensor:
            update = g0_norm * (math.cos(theta) * g0_hat - math.sin(theta) * u_hat)
            return repeat_rows(update.to(view.own.dtype), m)

        def deviation(theta: float) -> float:
            stacked = torch.cat([malicious(theta), honest])
            shift = probe(rule, stacked, context).aggregate.to(torch.float64) - mu
            return float(torch.linalg.vector_norm(shift))

        # Candidates in [0, 2 * pi / 4) = [0, pi/2): trust cos(theta) stays positive.
        theta = scan_and_refine(deviation, math.pi / 4, self.tau, self.max_rule_calls)
        self._last_theta = theta
        return malicious(theta)

    @staticmethod
    def _aside(mu: torch.Tensor, g0_hat: torch.Tensor, view: AdversaryView) -> torch.Tensor:
        """u_hat: unit direction orthogonal to g0 (mu's part, else sign(g0)'s, else random).

        Zero when d = 1 (then the attack sends g0 scaled by cos(theta)).
        """
        scale = max(float(torch.linalg.vector_norm(mu)), 1.0)
        for candidate in (mu, torch.sign(g0_hat)):
            u = _orthogonal_part(candidate, g0_hat)
            norm = float(torch.linalg.vector_norm(u))
            if norm > _NEGLIGIBLE * scale:
                return u / norm
        u = _orthogonal_part(normal_draws(g0_hat.shape, g0_hat, view.generator), g0_hat)
        norm = float(torch.linalg.vector_norm(u))
        return u / norm if norm > 0 else u  # d = 1: no direction aside g0
