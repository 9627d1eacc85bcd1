"""Model-poisoning attacks: the updates malicious clients send instead of honest ones.

An update is "model after local training minus global model", so the honest
direction of change is the mean update. Each attack is a configured object;
``attack.craft(view)`` turns an :class:`~fedsec.attacks.base.AdversaryView`
into the [m, d] malicious updates. Unless stated otherwise all m malicious
clients send the same crafted update, as in the papers.

Non-colluding attacks (:class:`SignFlip`, :class:`GaussianNoise`,
:class:`Scaling`) act on each malicious client's own update alone and also
offer ``perturb(update, generator)`` for use on a single client. The others
estimate honest behaviour from ``view.reference``: all honest updates when the
adversary is omniscient, else the colluders' own honest updates.

Adaptive attacks (:class:`MinMax`, :class:`MinSum`, :class:`FangKrum` when
``view.rule`` is set) evaluate the server's rule on the stack
``[malicious x m; reference]``. Each evaluation starts from the rule's current
state (``state_dict``), which is restored afterwards, so probing never
changes the server's rule. A rule that cannot be evaluated on that stack
(it needs context the view lacks, such as FLTrust's ``reference`` or
FoolsGold's ``client_ids``, or it rejects the stack's size) is not probed:
the attack falls back to its rule-agnostic version.

Build attacks by config name through :data:`MODEL_ATTACKS`::

    attack = MODEL_ATTACKS.get("min-max")(direction="std")
    malicious = attack.craft(view)  # [m, d]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from fedsec.aggregation.base import (
    AggregationResult,
    Rule,
    column_blocks,
    dot_products,
    pairwise_sq_distances,
)
from fedsec.aggregation.krum import krum_scores
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.registry import Registry

ALIEDirection = Literal["minus", "plus"]
Perturbation = Literal["unit", "std", "sign"]

#: Most steps of the rule-agnostic gamma search (each costs O(h)).
MAX_SEARCH_STEPS = 64
#: Default and largest number of evaluations of the server's rule in one adaptive craft.
MAX_RULE_CALLS = 25
#: Grid levels gamma_init / 2^k scanned first by the AGR-tailored search.
SCAN_LEVELS = 10
#: Most halvings of lambda in Fang's Krum attack with the closed-form Krum test.
MAX_HALVINGS = 200


# ---- parameter and input checks ---------------------------------------------


def _number(
    attack: str, param: str, value: object, *, low: float = 0.0, strict: bool = True
) -> float:
    """``value`` as a float if it is a finite number > low (>= low unless ``strict``)."""
    bound = ">" if strict else ">="
    error = ValueError(f"{attack}: {param} must be a finite number {bound} {low:g}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error
    if value < low or (strict and value == low):
        raise error
    return float(value)


def _choice(attack: str, param: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{attack}: {param} must be one of {valid}, got {value!r}")
    return str(value)


def _calls(attack: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RULE_CALLS:
        raise ValueError(
            f"{attack}: max_rule_calls must be an integer in [1, {MAX_RULE_CALLS}], got {value!r}"
        )
    return value


def _flag(attack: str, param: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{attack}: {param} must be True or False, got {value!r}")
    return value


def _validate(attack: ModelPoisoningAttack, view: AdversaryView) -> None:
    """Check the view's shapes, then the attack's requirement on (m, n)."""
    own = view.own
    if own.ndim != 2 or own.shape[0] == 0 or not own.is_floating_point():
        raise ValueError(
            f"{attack.name}: own updates must be a floating [m, d] tensor with m >= 1, "
            f"got shape {tuple(own.shape)} and dtype {own.dtype}"
        )
    benign = view.benign
    if benign is not None and (
        benign.ndim != 2 or benign.shape[0] == 0 or benign.shape[1] != own.shape[1]
    ):
        raise ValueError(
            f"{attack.name}: benign updates must have shape [h, {own.shape[1]}] with h >= 1, "
            f"got {tuple(benign.shape)}"
        )
    attack.check(view.num_malicious, view.num_clients)


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal samples drawn on the generator's device, returned like ``like``."""
    noise = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


def _rand(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) samples drawn on the generator's device, returned like ``like``."""
    noise = torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


def _std(reference: torch.Tensor) -> torch.Tensor:
    """Unbiased per-coordinate std (as ``torch.std``); 0 for a single update."""
    return reference.std(dim=0, correction=1 if reference.shape[0] > 1 else 0)


def _repeat(update: torch.Tensor, m: int) -> torch.Tensor:
    """[m, d]: ``update`` sent by all m malicious clients (a fresh tensor)."""
    return update.expand(m, -1).clone()


# ---- probing the server's rule ------------------------------------------------


def can_probe(rule: Rule, rows: int) -> bool:
    """Whether ``rule`` can be evaluated on an adversary's stack of ``rows`` updates.

    False when the rule needs context the adversary view lacks (``rule.requires``)
    or rejects ``rows`` clients (``rule.check``).
    """
    if rule.requires:
        return False
    try:
        rule.check(rows)
    except ValueError:
        return False
    return True


def probe(rule: Rule, stacked: torch.Tensor) -> AggregationResult:
    """Evaluate ``rule`` on ``stacked`` and restore the rule's state afterwards.

    The server's next call therefore sees the rule exactly as it was (same
    momentum, history and random-stream counters).
    """
    saved = {key: value.clone() for key, value in rule.state_dict().items()}
    try:
        return rule(stacked)
    finally:
        rule.load_state_dict(saved)


# ---- non-colluding attacks ----------------------------------------------------


class PerClientAttack(ModelPoisoningAttack):
    """An attack that transforms each malicious client's own update on its own.

    ``craft`` applies the transform to all rows of ``view.own`` at once;
    :meth:`perturb` applies it to one client's update, for use on the client.
    """

    collusion = False

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        """Return the malicious versions of ``updates`` [k, d] (a new tensor)."""
        raise NotImplementedError

    def perturb(
        self, update: torch.Tensor, generator: torch.Generator, num_clients: int | None = None
    ) -> torch.Tensor:
        """Malicious version [d] of one client's honest ``update`` [d].

        ``num_clients`` (n of the round) is only needed by :class:`Scaling`
        with its default gamma.
        """
        if update.ndim != 1 or not update.is_floating_point():
            raise ValueError(
                f"{self.name}: update must be a floating [d] tensor, got shape "
                f"{tuple(update.shape)} and dtype {update.dtype}"
            )
        return self.transform(update[None], generator, num_clients)[0]

    def craft(self, view: AdversaryView) -> torch.Tensor:
        _validate(self, view)
        return self.transform(view.own, view.generator, view.num_clients)


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
        self.scale = _number(self.name, "scale", scale)

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        return updates * -self.scale


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
        self.sigma = _number(self.name, "sigma", sigma, strict=False)
        self.additive = _flag(self.name, "additive", additive)

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        noise = _randn(tuple(updates.shape), updates, generator) * self.sigma
        return updates + noise if self.additive else noise


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
        self.gamma = None if gamma is None else _number(self.name, "gamma", gamma)
        self.server_lr = _number(self.name, "server_lr", server_lr)

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


# ---- colluding attacks with a fixed formula ------------------------------------


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
        self.z = None if z is None else _number(self.name, "z", z)
        self.direction = _choice(self.name, "direction", direction, ("minus", "plus"))
        self.omniscient = _flag(self.name, "omniscient", omniscient)

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
        _validate(self, view)
        reference = view.reference
        if reference.shape[0] < 2:
            raise ValueError(
                f"alie needs >= 2 reference updates to estimate sigma, got {reference.shape[0]}"
            )
        z = self.z if self.z is not None else self.z_max(view.num_clients, view.num_malicious)
        sign = -1.0 if self.direction == "minus" else 1.0
        malicious = reference.mean(dim=0) + (sign * z) * _std(reference)
        return _repeat(malicious, view.num_malicious)


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
        self.epsilon = _number(self.name, "epsilon", epsilon)

    def craft(self, view: AdversaryView) -> torch.Tensor:
        _validate(self, view)
        return _repeat(view.reference.mean(dim=0) * -self.epsilon, view.num_malicious)


# ---- optimised attacks of Shejwalkar & Houmansadr -------------------------------


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
        self.direction = _choice(self.name, "direction", direction, ("unit", "std", "sign"))
        self.gamma_init = _number(self.name, "gamma_init", gamma_init)
        self.tau = _number(self.name, "tau", tau)
        self.max_rule_calls = _calls(self.name, max_rule_calls)
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
            return -_std(reference)
        return -torch.sign(mu)

    def satisfied(
        self, a: torch.Tensor, b: torch.Tensor, c: float, distances: torch.Tensor
    ) -> Callable[[float], bool]:
        """The rule-agnostic criterion: is the candidate at gamma within the bound?"""
        raise NotImplementedError

    def craft(self, view: AdversaryView) -> torch.Tensor:
        _validate(self, view)
        reference = view.reference
        mu = reference.mean(dim=0)
        p = self.perturbation(reference, mu)
        gamma = None
        if view.rule is not None:
            gamma = self._adaptive_gamma(view.rule, view.num_malicious, reference, mu, p)
        if gamma is None:
            a, b, c = _distance_terms(reference, mu, p)
            accept = self.satisfied(a, b, c, pairwise_sq_distances(reference))
            gamma = halving_search(accept, self.gamma_init, self.tau, MAX_SEARCH_STEPS)
        self._last_gamma = gamma
        # Combine in float64 so the sent update is the one the bound was checked for.
        malicious = mu.to(torch.float64) + gamma * p.to(torch.float64)
        return _repeat(malicious.to(reference.dtype), view.num_malicious)

    def _adaptive_gamma(
        self, rule: Rule, m: int, reference: torch.Tensor, mu: torch.Tensor, p: torch.Tensor
    ) -> float | None:
        """AGR-tailored gamma: maximise ||rule([mal x m; reference]) - mu|| (Section 4.1).

        The deviation is maximised by :func:`scan_and_refine` with at most
        ``max_rule_calls`` rule evaluations. None if the rule cannot be
        probed on the stack.
        """
        if not can_probe(rule, m + reference.shape[0]):
            return None
        mu64, p64 = mu.to(torch.float64), p.to(torch.float64)

        def deviation(gamma: float) -> float:
            malicious = (mu64 + gamma * p64).to(reference.dtype)
            stacked = torch.cat([malicious.expand(m, -1), reference])
            shift = probe(rule, stacked).aggregate.to(torch.float64) - mu64
            return float(torch.linalg.vector_norm(shift))

        return scan_and_refine(deviation, self.gamma_init, self.tau, self.max_rule_calls)


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
    maximises the deviation ||rule([mal x m; reference]) - mu|| instead,
    found by :func:`scan_and_refine` with at most ``max_rule_calls`` probes of
    the rule (the distance bound then does not apply).

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


# ---- attacks of Fang et al. ----------------------------------------------------


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
    origin of update space and the reference updates x_i standing in for the
    benign models (their Eq. for lambda):

        1 / ((n - 2m - 1) sqrt(d)) * min_i sum_{l in N_i} ||x_l - x_i||
            + 1 / sqrt(d) * max_i ||x_i||,

    N_i the min(n - m - 2, h - 1) reference updates nearest to x_i, and is
    halved until Krum with f = m on the stack ``[malicious; reference]``
    selects a malicious update, or lambda drops below ``threshold``; then
    lambda = ``threshold``. Krum's selection is computed from distances
    expanded in lambda (Krum's scoring, :func:`~fedsec.aggregation.krum.krum_scores`,
    without the n > 2f + 2 check, which the colluders' smaller stack fails).
    With ``view.rule`` set (adaptive) the server's rule is probed instead and
    "selected" means a positive weight on a malicious row (at most
    ``max_rule_calls`` probes, then lambda = threshold); a rule that cannot
    be probed falls back to Krum.

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
        self.epsilon = _number(self.name, "epsilon", epsilon, strict=False)
        self.threshold = _number(self.name, "threshold", threshold)
        self.max_rule_calls = _calls(self.name, max_rule_calls)
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
        _validate(self, view)
        reference = view.reference
        m, d = view.num_malicious, reference.shape[1]
        s = torch.sign(reference.mean(dim=0))
        radius = self.epsilon / math.sqrt(d)
        offsets = (2 * _rand((m, d), reference, view.generator) - 1) * radius
        offsets[0] = 0.0

        def malicious(lam: float) -> torch.Tensor:
            return offsets - lam * s

        selected: Callable[[float], bool] | None = None
        limit = MAX_HALVINGS
        if view.rule is not None and can_probe(view.rule, m + reference.shape[0]):
            rule = view.rule

            def selected_by_rule(lam: float) -> bool:
                stacked = torch.cat([malicious(lam), reference])
                return bool((probe(rule, stacked).weights[:m] > 0).any())

            selected, limit = selected_by_rule, self.max_rule_calls
        if selected is None:
            selected = self._krum_test(offsets, reference, s, m)

        lam, found = self.lambda_bound(reference, view.num_clients, m), False
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
        offsets: torch.Tensor, reference: torch.Tensor, s: torch.Tensor, m: int
    ) -> Callable[[float], bool]:
        """Does Krum (f = m) on [offsets - lambda s; reference] pick a malicious row?

        With Y = [offsets; reference] and a_r = 1 for malicious rows,
        ||(Y_r - a_r lam s) - (Y_q - a_q lam s)||^2 =
        D0_rq - 2 lam (a_r - a_q) <s, Y_r - Y_q> + lam^2 (a_r - a_q)^2 ||s||^2,
        so one Gram pass serves every lambda.
        """
        stacked = torch.cat([offsets, reference])
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
        self.b = _number(self.name, "b", b, low=1.0)

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
        _validate(self, view)
        reference = view.reference
        lo, hi = self.bounds(reference)
        u = _rand((view.num_malicious, reference.shape[1]), reference, view.generator)
        return lo + u * (hi - lo)


# ---- Mimic ----------------------------------------------------------------------


class Mimic(ModelPoisoningAttack):
    """Mimic: all malicious clients copy one honest client's update.

    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", ICLR 2022. On heterogeneous data, over-weighting
    one honest client biases the aggregate while every malicious update looks
    honest. The paper picks the client that maximises the variance along the
    top principal direction of the honest updates, estimated over warm-up
    rounds. Here, the simple version: at the first call,

        i* = argmax_i |<x_i - mu, v>|,

    v the top principal direction of the centred honest updates, found from
    the [h, h] centred Gram matrix -1/2 J D J (D the squared distances): its
    top eigenvector u gives projections proportional to u_i. i* is kept for
    later rounds (chosen again only if it exceeds the number of honest
    updates), and is part of :meth:`state_dict`. It indexes the rows of
    ``view.benign``, so the caller should keep their order stable.

    Needs omniscient knowledge (the honest updates).

    Parameters
    ----------
    omniscient : bool
        Whether the adversary sees the honest updates; must be True.
    """

    name = "mimic"

    def __init__(self, omniscient: bool = False) -> None:
        self.omniscient = _flag(self.name, "omniscient", omniscient)
        self._target: int | None = None

    @property
    def target(self) -> int | None:
        """Row of ``view.benign`` being copied (None before the first call)."""
        return self._target

    def check(self, num_malicious: int, num_clients: int) -> None:
        super().check(num_malicious, num_clients)
        if not self.omniscient:
            raise ValueError('mimic needs omniscient knowledge (attack.knowledge = "omniscient")')

    @staticmethod
    def choose(benign: torch.Tensor) -> int:
        """i* = argmax_i |<x_i - mu, v>| with v the top principal direction."""
        h = benign.shape[0]
        if h == 1:
            return 0
        distances = pairwise_sq_distances(benign)
        centring = torch.eye(h, dtype=torch.float64, device=benign.device) - 1.0 / h
        gram = -0.5 * centring @ distances @ centring
        _, vectors = torch.linalg.eigh((gram + gram.T) / 2)
        return int(torch.argmax(vectors[:, -1].abs()))

    def craft(self, view: AdversaryView) -> torch.Tensor:
        _validate(self, view)
        benign = view.benign
        if benign is None:
            raise ValueError("mimic needs the honest updates (an omniscient view), got none")
        if self._target is None or self._target >= benign.shape[0]:
            self._target = self.choose(benign)
        return _repeat(benign[self._target], view.num_malicious)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The mimicked row (-1 before the first call), for checkpoints."""
        return {"target": torch.tensor(-1 if self._target is None else self._target)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        target = int(state["target"])
        self._target = None if target < 0 else target


MODEL_ATTACKS: Registry[type[ModelPoisoningAttack]] = Registry("model-poisoning attack")
for _attack in (
    SignFlip,
    GaussianNoise,
    Scaling,
    ALIE,
    IPM,
    MinMax,
    MinSum,
    FangKrum,
    FangTrimmedMean,
    Mimic,
):
    MODEL_ATTACKS.add(_attack.name, _attack)

__all__ = [
    "ALIE",
    "IPM",
    "MODEL_ATTACKS",
    "FangKrum",
    "FangTrimmedMean",
    "GaussianNoise",
    "Mimic",
    "MinMax",
    "MinSum",
    "PerClientAttack",
    "Scaling",
    "SignFlip",
    "can_probe",
    "halving_search",
    "probe",
    "scan_and_refine",
]
