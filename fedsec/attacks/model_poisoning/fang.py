"""Fang et al.'s attacks on Krum and on trimmed mean (also effective on the median).

Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to Byzantine-Robust
Federated Learning", USENIX Security 2020. Both estimate the honest direction
of change as the sign of the reference updates' mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fedsec.aggregation.base import dot_products, pairwise_sq_distances
from fedsec.aggregation.krum import krum_scores
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import (
    MAX_RULE_CALLS,
    can_probe,
    check_number,
    check_rule_calls,
    modelled_honest,
    probe,
    register,
    uniform_draws,
    validate_view,
)

#: Most halvings of lambda in Fang's Krum attack with the closed-form Krum test.
MAX_HALVINGS = 200


@register
class FangKrum(ModelPoisoningAttack):
    """Fang et al.'s attack on Krum, on updates, with partial knowledge.

    Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to Byzantine-Robust
    Federated Learning", USENIX Security 2020. With s = sign(mean of the
    reference updates), the estimated direction of change, the first
    malicious update is -lambda s (the global model minus lambda s) and the
    other m - 1 are within Euclidean distance epsilon of it (uniform offsets
    in [-epsilon/sqrt(d), epsilon/sqrt(d)] per coordinate, from the view's
    generator).

    lambda starts at the paper's upper bound, with the global model at the
    origin of update space and the honest updates x_i standing in for the
    benign models (their Eq. for lambda):

        1 / ((n - 2m - 1) sqrt(d)) * min_i sum_{l in N_i} ||x_l - x_i||
            + 1 / sqrt(d) * max_i ||x_i||,

    N_i the min(n - m - 2, h - 1) honest updates nearest to x_i, and is
    halved until Krum with f = m on the round ``[malicious; honest]`` selects a
    malicious update, or lambda drops below ``threshold``; then lambda =
    ``threshold``. The honest updates are the real ones when omniscient, else
    the colluders' model of the round
    (:func:`~fedsec.attacks.model_poisoning.base.modelled_honest`: n - m
    updates drawn from their own updates' mean and std), so Krum scores n rows
    with its real n - m - 2 neighbours. (Scoring only the colluders' m own
    updates, the crafted copies were each other's nearest neighbours, every
    first lambda passed and Krum on the server never chose them.) Krum's
    selection is computed from distances expanded in lambda (Krum's scoring,
    :func:`~fedsec.aggregation.krum.krum_scores`). With ``view.rule`` set
    (adaptive) the server's rule is probed on the same stack instead (with
    ``view.context``) and "selected" means a positive weight on a malicious
    row (at most ``max_rule_calls`` probes, then lambda = threshold); a rule
    that cannot be probed falls back to Krum.

    Knowledge: the colluders' own updates (default) or all honest updates
    (omniscient); adaptive: the server's rule and its parameters.

    Requires n > 2m + 2 (Krum's requirement with f = m, and a positive bound).

    Parameters
    ----------
    epsilon : float
        Radius >= 0 around the first malicious update (default 0.01).
    threshold : float
        Smallest lambda > 0 tried, and the fallback (default 1e-5).
    max_rule_calls : int
        Most rule evaluations when adaptive, 1..25 (default 25).
    """

    name = "fang-krum"

    def __init__(
        self, epsilon: float = 0.01, threshold: float = 1e-5, max_rule_calls: int = MAX_RULE_CALLS
    ) -> None:
        self.epsilon = check_number(self.name, "epsilon", epsilon, strict=False)
        self.threshold = check_number(self.name, "threshold", threshold)
        self.max_rule_calls = check_rule_calls(self.name, max_rule_calls)
        self._last_lambda: float | None = None

    @property
    def last_lambda(self) -> float | None:
        """lambda chosen by the last :meth:`craft` (None before the first)."""
        return self._last_lambda

    def check(self, num_malicious: int, num_clients: int) -> None:
        super().check(num_malicious, num_clients)
        if num_clients <= 2 * num_malicious + 2:
            raise ValueError(
                f"fang-krum needs n > 2m + 2 (Krum with f = m), got n={num_clients}, "
                f"m={num_malicious}"
            )

    @staticmethod
    def lambda_bound(reference: torch.Tensor, num_clients: int, num_malicious: int) -> float:
        """The paper's upper bound on lambda (see the class docstring)."""
        h, d = reference.shape
        n, m = num_clients, num_malicious
        k = min(n - m - 2, h - 1)
        first = 0.0
        if k >= 1:
            distances = pairwise_sq_distances(reference).sqrt()
            # Column 0 of each sorted row is the update's own zero distance.
            nearest = torch.sort(distances, dim=1).values[:, 1 : k + 1].sum(dim=1)
            first = float(nearest.min()) / ((n - 2 * m - 1) * math.sqrt(d))
        norms = torch.linalg.vector_norm(reference, dim=1, dtype=torch.float64)
        return first + float(norms.max()) / math.sqrt(d)

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        reference = view.reference
        m, d = view.num_malicious, reference.shape[1]
        s = torch.sign(reference.mean(dim=0))
        radius = self.epsilon / math.sqrt(d)
        offsets = (2 * uniform_draws((m, d), reference, view.generator) - 1) * radius
        offsets[0] = 0.0

        def malicious(lam: float) -> torch.Tensor:
            return offsets - lam * s

        honest = modelled_honest(view)  # n - m rows: Krum's real neighbour count
        selected: Callable[[float], bool] | None = None
        limit = MAX_HALVINGS
        rule, context = view.rule, view.context
        if rule is not None and can_probe(rule, m + honest.shape[0], context):

            def selected_by_rule(lam: float) -> bool:
                stacked = torch.cat([malicious(lam), honest])
                return bool((probe(rule, stacked, context).weights[:m] > 0).any())

            selected, limit = selected_by_rule, self.max_rule_calls
        if selected is None:
            selected = self._krum_test(offsets, honest, s, m)

        lam, found = self.lambda_bound(honest, view.num_clients, m), False
        for _ in range(limit):
            if lam < self.threshold:
                break
            if selected(lam):
                found = True
                break
            lam /= 2
        if not found:
            lam = self.threshold
        self._last_lambda = lam
        return malicious(lam)

    @staticmethod
    def _krum_test(
        offsets: torch.Tensor, honest: torch.Tensor, s: torch.Tensor, m: int
    ) -> Callable[[float], bool]:
        """Does Krum (f = m) on [offsets - lambda s; honest] pick a malicious row?

        With Y = [offsets; honest] and a_r = 1 for malicious rows,
        ||(Y_r - a_r lam s) - (Y_q - a_q lam s)||^2 =
        D0_rq - 2 lam (a_r - a_q) <s, Y_r - Y_q> + lam^2 (a_r - a_q)^2 ||s||^2,
        so one Gram pass serves every lambda.
        """
        stacked = torch.cat([offsets, honest])
        base = pairwise_sq_distances(stacked)
        t = dot_products(stacked, s[None, :])[:, 0]
        a = torch.zeros_like(t)
        a[:m] = 1.0
        da = a[:, None] - a[None, :]
        dt = t[:, None] - t[None, :]
        s64 = s.to(torch.float64)
        norm_s = float(s64 @ s64)

        def test(lam: float) -> bool:
            distances = base - 2 * lam * da * dt + lam**2 * norm_s * da * da
            distances.clamp_(min=0).fill_diagonal_(0)
            return int(torch.argmin(krum_scores(distances, m))) < m

        return test


@register
class FangTrimmedMean(ModelPoisoningAttack):
    """Fang et al.'s attack on trimmed mean (also effective against the median).

    Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to Byzantine-Robust
    Federated Learning", USENIX Security 2020, the full-knowledge recipe
    applied to updates with the reference updates as the benign ones. Per
    coordinate j, with s_j = sign(mean_j) the estimated direction of change
    and w_max_j / w_min_j the largest / smallest reference value, each
    malicious client draws its own value uniformly between:

    * s_j = -1 (honest decrease, push up): w_max_j and b w_max_j if
      w_max_j > 0, else w_max_j / b and w_max_j;
    * s_j = +1 (honest increase, push down): w_min_j / b and w_min_j if
      w_min_j > 0, else b w_min_j and w_min_j;
    * s_j = 0 (no direction): 0, as in Shejwalkar & Houmansadr's code.

    Parameters
    ----------
    b : float
        Stretch factor > 1 of the intervals (default 2, as in the paper).
    """

    name = "fang-trimmed-mean"

    def __init__(self, b: float = 2.0) -> None:
        self.b = check_number(self.name, "b", b, low=1.0)

    def bounds(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate interval endpoints (lo, hi) [d] (lo > hi is allowed)."""
        w_max = reference.amax(dim=0)
        w_min = reference.amin(dim=0)
        s = torch.sign(reference.mean(dim=0))
        b = self.b
        up_lo = torch.where(w_max > 0, w_max, w_max / b)
        up_hi = torch.where(w_max > 0, w_max * b, w_max)
        down_lo = torch.where(w_min > 0, w_min / b, w_min * b)
        down_hi = w_min
        zero = torch.zeros_like(w_max)
        lo = torch.where(s > 0, down_lo, torch.where(s < 0, up_lo, zero))
        hi = torch.where(s > 0, down_hi, torch.where(s < 0, up_hi, zero))
        return lo, hi

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        reference = view.reference
        lo, hi = self.bounds(reference)
        u = uniform_draws((view.num_malicious, reference.shape[1]), reference, view.generator)
        return lo + u * (hi - lo)
