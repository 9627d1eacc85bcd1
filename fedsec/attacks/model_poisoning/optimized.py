"""Min-Max and Min-Sum: mu + gamma p, gamma pushed as far as the honest spread allows.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model
Poisoning Attacks and Defenses for Federated Learning", NDSS 2021: the
AGR-agnostic attacks (Algorithm 1) with the authors' gamma search
(:func:`halving_search`), and their AGR-tailored versions (Section 4.1), which
probe the server's rule (:func:`scan_and_refine`). The two attacks share the
search and differ only in the distance bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from fedsec.aggregation.base import column_blocks, pairwise_sq_distances
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import (
    MAX_RULE_CALLS,
    can_probe,
    check_choice,
    check_number,
    check_rule_calls,
    modelled_honest,
    probe,
    register,
    repeat_rows,
    unbiased_std,
    validate_view,
)

Perturbation = Literal["unit", "std", "sign"]

#: Most steps of the rule-agnostic gamma search (each costs O(h)).
MAX_SEARCH_STEPS = 64
#: Grid levels gamma_init / 2^k scanned first by the AGR-tailored search.
SCAN_LEVELS = 10


def halving_search(
    accept: Callable[[float], bool], gamma_init: float, tau: float, max_steps: int
) -> float:
    """The gamma search of Shejwalkar & Houmansadr's code (NDSS 2021).

    Start at ``gamma_init`` with step ``gamma_init``; on success remember
    gamma and move up by half the step, on failure move down by half the
    step; halve the step; stop once the candidate is within ``tau`` of the
    last success (or after ``max_steps`` evaluations). Returns the last
    accepted gamma, 0 if none was. Candidates stay in (0, 2 * gamma_init).
    """
    gamma, step, best = gamma_init, gamma_init, 0.0
    for _ in range(max_steps):
        if abs(best - gamma) <= tau:
            break
        if accept(gamma):
            best = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return best


def scan_and_refine(
    objective: Callable[[float], float],
    gamma_init: float,
    tau: float,
    max_calls: int,
    levels: int = SCAN_LEVELS,
) -> float:
    """Maximise ``objective(gamma)`` over [0, 2 * gamma_init) in at most ``max_calls`` calls.

    Used for the AGR-tailored attacks, where the criterion (the rule's
    deviation) is not monotone in gamma: against Krum-like rules it grows
    while the malicious update is selected and drops once it is rejected.
    The authors' code halves from gamma_init and accepts a step when the
    deviation beats the previous one (for Krum-like rules: when a malicious
    update is selected). With the deviation alone, that search locks onto a
    large gamma whose update Krum rejects, because an honest pick already
    deviates more than gamma = 0, and never looks below it. Instead:

    1. evaluate gamma = 0 and the grid gamma_init / 2^k, k = levels - 1 .. 0,
       keeping the smallest gamma with the largest value;
    2. pattern search around the best gamma g: try g + step, then g - step,
       move on the first strict improvement, halve the step (from g / 2)
       until it is <= ``tau`` or the calls are spent.

    Values are cached, so no gamma is evaluated twice. Returns the best gamma.
    """
    values: dict[float, float] = {}

    def value(gamma: float) -> float | None:
        if gamma not in values:
            if len(values) >= max_calls:
                return None
            values[gamma] = objective(gamma)
        return values[gamma]

    best = 0.0
    best_value = value(0.0)
    if best_value is None:
        return best
    # Small to large: on a plateau the smallest (least conspicuous) gamma wins.
    for k in reversed(range(levels)):
        gamma = gamma_init / 2**k
        current = value(gamma)
        if current is None:
            return best
        if current > best_value:
            best, best_value = gamma, current
    step = best / 2
    while step > tau:
        for candidate in (best + step, best - step):
            if not 0 <= candidate < 2 * gamma_init:
                continue
            current = value(candidate)
            if current is None:
                return best
            if current > best_value:
                best, best_value = candidate, current
                break
        step /= 2
    return best


def _distance_terms(
    reference: torch.Tensor, mu: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Terms of ||mu + g p - x_i||^2 = a_i + 2 g b_i + g^2 c, in float64.

    a_i = ||mu - x_i||^2, b_i = <p, mu - x_i>, c = ||p||^2; one pass over
    column blocks of the reference, so each candidate gamma then costs O(h).
    """
    h, d = reference.shape
    a = torch.zeros(h, dtype=torch.float64, device=reference.device)
    b = torch.zeros_like(a)
    for cols in column_blocks(h, d):
        diff = mu[cols].to(torch.float64) - reference[:, cols].to(torch.float64)
        a += (diff * diff).sum(dim=1)
        b += diff @ p[cols].to(torch.float64)
        del diff
    p64 = p.to(torch.float64)
    return a, b, float(p64 @ p64)


class _OptimizedAttack(ModelPoisoningAttack):
    """Shared machinery of Min-Max and Min-Sum: mu + gamma p with gamma searched."""

    def __init__(
        self,
        direction: Perturbation = "std",
        gamma_init: float = 10.0,
        tau: float = 1e-5,
        max_rule_calls: int = MAX_RULE_CALLS,
    ) -> None:
        self.direction = check_choice(self.name, "direction", direction, ("unit", "std", "sign"))
        self.gamma_init = check_number(self.name, "gamma_init", gamma_init)
        self.tau = check_number(self.name, "tau", tau)
        self.max_rule_calls = check_rule_calls(self.name, max_rule_calls)
        self._last_gamma: float | None = None

    @property
    def last_gamma(self) -> float | None:
        """gamma chosen by the last :meth:`craft` (None before the first)."""
        return self._last_gamma

    def perturbation(self, reference: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """p [d]: -mu/||mu|| ("unit"), -std ("std") or -sign(mu) ("sign")."""
        if self.direction == "unit":
            norm = torch.linalg.vector_norm(mu)
            return -mu / norm if norm > 0 else torch.zeros_like(mu)
        if self.direction == "std":
            return -unbiased_std(reference)
        return -torch.sign(mu)

    def satisfied(
        self, a: torch.Tensor, b: torch.Tensor, c: float, distances: torch.Tensor
    ) -> Callable[[float], bool]:
        """The rule-agnostic criterion: is the candidate at gamma within the bound?"""
        raise NotImplementedError

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        reference = view.reference
        mu = reference.mean(dim=0)
        p = self.perturbation(reference, mu)
        gamma = None
        if view.rule is not None:
            gamma = self._adaptive_gamma(view, mu, p)
        if gamma is None:
            a, b, c = _distance_terms(reference, mu, p)
            accept = self.satisfied(a, b, c, pairwise_sq_distances(reference))
            gamma = halving_search(accept, self.gamma_init, self.tau, MAX_SEARCH_STEPS)
        self._last_gamma = gamma
        # Combine in float64 so the sent update is the one the bound was checked for.
        malicious = mu.to(torch.float64) + gamma * p.to(torch.float64)
        return repeat_rows(malicious.to(reference.dtype), view.num_malicious)

    def _adaptive_gamma(
        self, view: AdversaryView, mu: torch.Tensor, p: torch.Tensor
    ) -> float | None:
        """AGR-tailored gamma: maximise ||rule([mal x m; honest]) - mu|| (Section 4.1).

        ``honest`` is the round's n - m honest updates as the adversary models
        them (:func:`~fedsec.attacks.model_poisoning.base.modelled_honest`);
        the rule gets ``view.context`` (FLTrust's reference). The deviation is
        maximised by :func:`scan_and_refine` with at most ``max_rule_calls``
        rule evaluations. None if the rule cannot be probed on the stack.
        """
        rule, context, m = view.rule, view.context, view.num_malicious
        assert rule is not None
        honest_rows = view.num_clients - m
        if not can_probe(rule, m + honest_rows, context):
            return None
        honest = modelled_honest(view)
        mu64, p64 = mu.to(torch.float64), p.to(torch.float64)

        def deviation(gamma: float) -> float:
            malicious = (mu64 + gamma * p64).to(honest.dtype)
            stacked = torch.cat([malicious.expand(m, -1), honest])
            shift = probe(rule, stacked, context).aggregate.to(torch.float64) - mu64
            return float(torch.linalg.vector_norm(shift))

        return scan_and_refine(deviation, self.gamma_init, self.tau, self.max_rule_calls)


@register
class MinMax(_OptimizedAttack):
    """Min-Max: mu + gamma p as far as possible, within the honest updates' spread.

    Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS 2021
    (AGR-agnostic version, Algorithm 1). With mu the mean of the reference
    updates x_i and p the perturbation direction, gamma is the largest value
    found by :func:`halving_search` such that

        max_i ||mu + gamma p - x_i||^2 <= max_{i,j} ||x_i - x_j||^2.

    Distances to the candidate are expanded into dot products computed once,
    so each candidate costs O(h). gamma is searched in (0, 2 * gamma_init).

    With ``view.rule`` set the attack is AGR-tailored (Section 4.1): gamma
    maximises the deviation ||rule([mal x m; honest]) - mu|| instead, found
    by :func:`scan_and_refine` with at most ``max_rule_calls`` probes of the
    rule (the distance bound then does not apply). ``honest`` is the real
    round when omniscient, else the colluders' model of it (their own updates
    modelled by draws from their mean and std); the rule gets ``view.context``, so
    FLTrust is targeted when the adversary knows the root update.

    Knowledge: the colluders' own updates (default) or all honest updates
    (omniscient); adaptive: the server's rule, its parameters and context.

    Parameters
    ----------
    direction : {"unit", "std", "sign"}
        p = -mu / ||mu||, -std (unbiased, default) or -sign(mu).
    gamma_init : float
        First candidate and first step of the search (default 10; the paper
        uses 10 or 50).
    tau : float
        Tolerance > 0 of the search (default 1e-5, as in the authors' code).
    max_rule_calls : int
        Most rule evaluations of the AGR-tailored search, 1..25 (default 25;
        each is a full aggregation, so fewer is faster for large models).
    """

    name = "min-max"

    def satisfied(
        self, a: torch.Tensor, b: torch.Tensor, c: float, distances: torch.Tensor
    ) -> Callable[[float], bool]:
        bound = float(distances.max())
        return lambda gamma: float((a + 2 * gamma * b + gamma**2 * c).max()) <= bound


@register
class MinSum(_OptimizedAttack):
    """Min-Sum: mu + gamma p as far as possible, within the honest sums of distances.

    Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS 2021
    (AGR-agnostic version, Algorithm 1). As :class:`MinMax` with the bound

        sum_i ||mu + gamma p - x_i||^2 <= max_i sum_j ||x_i - x_j||^2.

    With ``view.rule`` set it is AGR-tailored exactly as :class:`MinMax`.

    Parameters
    ----------
    direction : {"unit", "std", "sign"}
        p = -mu / ||mu||, -std (unbiased, default) or -sign(mu).
    gamma_init : float
        First candidate and first step of the search (default 10).
    tau : float
        Tolerance > 0 of the search (default 1e-5).
    max_rule_calls : int
        Most rule evaluations of the AGR-tailored search, 1..25 (default 25).
    """

    name = "min-sum"

    def satisfied(
        self, a: torch.Tensor, b: torch.Tensor, c: float, distances: torch.Tensor
    ) -> Callable[[float], bool]:
        bound = float(distances.sum(dim=1).max())
        total_a, total_b, h = float(a.sum()), float(b.sum()), a.shape[0]
        return lambda gamma: total_a + 2 * gamma * total_b + h * gamma**2 * c <= bound
