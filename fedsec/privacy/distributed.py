"""Distributed differential privacy for secure aggregation: the Skellam mechanism.

Secure aggregation (:mod:`fedsec.secagg`) shows the server only the sum of the
clients' integer-encoded updates, so the server itself can be kept from learning
any one client's update *without a trusted party adding the noise*: every client
adds a share of integer noise to its own encoded vector, and the shares of the
clients that survive into a sum add up to enough noise for client-level
``(epsilon, delta)``-DP against the server.  The noise is Skellam noise
(Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021): ``Sk(mu, mu) = Poisson(mu) - Poisson(mu)``,
integer valued, variance ``2 mu``, and *closed under summation*, so the sum of
``m`` shares of variance ``v`` is exactly Skellam with variance ``m v``, the
mechanism the accounting below analyses.

Pipeline (one client, one round)
--------------------------------
1. Clip the float update to L2 norm ``norm_bound`` (``B``).
2. Encode it (:class:`fedsec.secagg.encoding.FixedPointEncoder`): clip each
   coordinate to ``[-clip, clip]``, scale by ``gamma = levels / (2 clip)`` with
   ``levels = 2**bits - 1``, shift by ``levels / 2`` and round stochastically.
3. Add Skellam noise of variance :attr:`SkellamPlan.client_variance`, clipped to
   ``[-headroom, headroom]``, and shift by ``+headroom`` (:func:`sample_skellam`;
   exact in distribution at every scale, also at the Poisson means of 1e14-1e15
   real plans need, where numpy's sampler is not).
4. Mask and send; the server learns the sum over the survivors and removes the
   public offsets ``count * (levels / 2 + headroom)``.

:func:`plan_skellam` picks ``bits``, the noise and the headroom so that sums of
``num_clients`` codes never wrap modulo ``2**modulus_bits`` and a sum over at
least ``min_clients`` clients is ``noise_multiplier``-noisy;
:meth:`SkellamPlan.epsilon` accounts for it and
:func:`skellam_noise_multiplier_for` calibrates the noise to a budget.

Trust model
-----------
``min_clients`` must count only clients trusted to add their noise: a client
colluding with the server can leave its share out (or reveal it), and the
guarantee then rests on the remaining shares.  The privacy unit is a client's
whole update; the server picks the participants (no amplification by
sampling is claimed) and knows how many took part, so the neighbouring relation
is "one client's update replaced by the zero update" (the meaningful form of
add/remove when the count is public, as in the DDG and Skellam analyses).  The
sensitivity covers the stochastic rounding via a coupling: with the same coins,
``floor(a + U) - floor(b + U)`` differs from ``a - b`` by less than 1 in every
coordinate, and Rényi divergence is jointly quasi-convex, so the rounded vectors
differ by at most ``gamma B + sqrt(dim)`` in L2 (Kairouz, Liu, Steinke, "The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML 2021, make the same argument).
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedsec.checks import check_int, check_number
from fedsec.privacy.accounting import MAX_NOISE_MULTIPLIER, RDP_ORDERS, check_delta

__all__ = [
    "SkellamPlan",
    "plan_skellam",
    "sample_skellam",
    "secure_generator",
    "skellam_epsilon",
    "skellam_noise_multiplier_for",
    "skellam_rdp",
    "unmask_floor",
]

#: Largest quantisation depth and bound on a code: the encoder computes codes in
#: float64, whose 53-bit significand holds every integer up to ``2**53`` exactly.
_FLOAT_EXACT_BITS = 53
_MODULUS_BITS = (32, 64)
#: Precision of :func:`skellam_noise_multiplier_for` in epsilon.
_EPSILON_TOLERANCE = 0.01
#: Samples per chunk of :func:`sample_skellam`; each chunk has its own stream, so
#: the output for a seeded generator does not depend on the number of threads.
_SAMPLE_CHUNK = 1 << 16
#: Thread pool of :func:`sample_skellam` and the process that created it (a pool
#: inherited through ``fork`` has no threads, so a child process makes its own).
_POOL: tuple[int, ThreadPoolExecutor] | None = None
#: Poisson means from which :func:`_poisson_offsets` replaces numpy's sampler.
#: numpy's PTRS evaluates ``-mean + k log(mean) - log k!`` directly; its rounding
#: error grows like ``mean log(mean) 2^-53``: below 1e-8 in the log-acceptance
#: test up to here, but O(1) near 1e14-1e15 (variance off by up to 25 %).
_LARGE_MEAN = float(1 << 20)
#: Highest power of ``t`` kept in the series of :func:`_log1p_excess`.
_SERIES_TERMS = 17


class _NoFitError(ValueError):
    """A plan whose codes cannot fit the modulus (or float64's exact integers)."""


# ---- validation ----------------------------------------------------------------------


def _number(name: str, value: float, *, minimum: float, strict: bool) -> float:
    """``value`` as a finite float ``> minimum`` (``>=`` unless strict), else ``ValueError``."""
    return check_number(name, value, minimum=minimum, strict=strict)


def _integer(name: str, value: int, *, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, else ``ValueError``."""
    return check_int(name, value, minimum=minimum)


def _sensitivities(l2_sensitivity: float, l1_sensitivity: float) -> tuple[float, float]:
    l2 = _number("l2_sensitivity", l2_sensitivity, minimum=0.0, strict=False)
    l1 = _number("l1_sensitivity", l1_sensitivity, minimum=0.0, strict=False)
    if l1 < l2:  # ||x||_1 >= ||x||_2 for every vector, so the bounds must agree
        raise ValueError(
            f"l1_sensitivity must be >= l2_sensitivity, got l1_sensitivity={l1_sensitivity!r}, "
            f"l2_sensitivity={l2_sensitivity!r}"
        )
    return l2, l1


# ---- accounting ----------------------------------------------------------------------


def skellam_rdp(
    order: float, *, variance: float, l2_sensitivity: float, l1_sensitivity: float
) -> float:
    """RDP epsilon of the multi-dimensional Skellam mechanism at one order.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
    Federated Learning", NeurIPS 2021, Theorem 3.5 (multi-dimensional Skellam,
    integer orders ``alpha > 1``): adding independent symmetric Skellam noise of
    per-coordinate variance ``v`` to an integer-valued query with L2 and L1
    sensitivities ``D2`` and ``D1`` is ``(alpha, eps(alpha))``-RDP with::

        eps(alpha) = alpha D2^2 / (2 v)
                     + min(((2 alpha - 1) D2^2 + 6 D1) / (4 v^2), 3 D1 / (2 v))

    (with Poisson parameter ``mu = v / 2``, i.e. ``Sk(mu, mu)``, the terms read
    ``alpha D2^2 / (4 mu)`` and ``min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2),
    3 D1 / (4 mu))``).  The first term is the Gaussian mechanism's RDP at the same
    variance; the ``min`` is the price of the discrete noise and vanishes as
    ``v`` grows.  The constants are those of the authors' accounting code,
    ``_skellam_rdp`` in google-research/federated ``distributed_dp/
    accounting_utils.py`` (which works in float units, ``l2 = D2 / s``,
    ``l1 = D1 / s``, ``mu = v / s^2`` for scale ``s``; substituting gives the
    formula above), and the test suite checks the bound against the exact Rényi
    divergence of shifted one-dimensional Skellam distributions.

    Parameters
    ----------
    order : float
        RDP order ``alpha > 1``.  The theorem is stated for integer orders; a
        non-integer order is evaluated at ``ceil(alpha)``, which is a valid
        bound because Rényi divergence is non-decreasing in the order (van
        Erven, Harremoës, "Rényi Divergence and Kullback-Leibler Divergence",
        IEEE Trans. Inf. Theory 2014, Theorem 3).
    variance : float
        Per-coordinate variance ``v >= 0`` of the *total* noise on the released
        sum, in the query's (integer) units.
    l2_sensitivity, l1_sensitivity : float
        Bounds ``D2 <= D1`` (both ``>= 0``) on the L2 and L1 norms of the change
        of the integer query between neighbouring inputs.

    Returns
    -------
    float
        ``eps(ceil(order))``; 0.0 if both sensitivities are 0, ``inf`` if
        ``variance`` is 0 (and a sensitivity is not).

    Raises
    ------
    ValueError
        For an order ``<= 1`` or non-finite, a negative or non-finite variance or
        sensitivity, or ``l1_sensitivity < l2_sensitivity``.
    """
    alpha = _number("order", order, minimum=1.0, strict=True)
    var = _number("variance", variance, minimum=0.0, strict=False)
    d2, d1 = _sensitivities(l2_sensitivity, l1_sensitivity)
    if d1 == 0.0:
        return 0.0
    if var == 0.0:
        return math.inf
    a = float(math.ceil(alpha))
    gaussian = a * d2 * d2 / (2.0 * var)
    discrete = min(
        ((2.0 * a - 1.0) * d2 * d2 + 6.0 * d1) / (4.0 * var * var), 3.0 * d1 / (2.0 * var)
    )
    return gaussian + discrete


def skellam_epsilon(
    *,
    variance: float,
    l2_sensitivity: float,
    l1_sensitivity: float,
    rounds: int,
    delta: float,
) -> float:
    """Epsilon at ``delta`` of ``rounds`` compositions of the Skellam mechanism.

    Each round releases one sum carrying Skellam noise of per-coordinate
    variance ``variance`` (Agarwal, Kairouz, Liu, NeurIPS 2021; RDP from
    :func:`skellam_rdp`).  RDP composes additively over rounds (Mironov, "Rényi
    Differential Privacy", CSF 2017); no amplification by sampling is claimed,
    since the server chooses the participants.  The conversion to ``(epsilon,
    delta)`` is Opacus's (Balle et al., "Hypothesis Testing Interpretations and
    Rényi Differential Privacy", AISTATS 2020, Theorem 21), minimised over
    :data:`fedsec.privacy.accounting.RDP_ORDERS` (non-integer orders use the
    bound at ``ceil(order)``, see :func:`skellam_rdp`).

    Parameters
    ----------
    variance : float
        Per-coordinate variance of the noise on each released sum (``>= 0``).
    l2_sensitivity, l1_sensitivity : float
        As in :func:`skellam_rdp`.
    rounds : int
        Number of releases (``>= 0``).
    delta : float
        Target delta, in (0, 1).

    Returns
    -------
    float
        Epsilon (``>= 0``); 0.0 for ``rounds = 0`` or zero sensitivity, ``inf``
        for ``variance = 0``.

    Raises
    ------
    ValueError
        For an invalid parameter.
    """
    var = _number("variance", variance, minimum=0.0, strict=False)
    d2, d1 = _sensitivities(l2_sensitivity, l1_sensitivity)
    steps = _integer("rounds", rounds, minimum=0)
    delta = check_delta(delta)
    if steps == 0 or d1 == 0.0:
        return 0.0
    if var == 0.0:
        return math.inf
    rdp = [
        steps * skellam_rdp(order, variance=var, l2_sensitivity=d2, l1_sensitivity=d1)
        for order in RDP_ORDERS
    ]
    # Here, not at the top: Opacus takes ~1.3 s to import, and the SecAgg client
    # (one fresh process per message on a SuperNode) needs only the sampler.
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():
        # An optimum at the grid's edge still gives a valid (if loose) bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return max(float(eps), 0.0)


# ---- planning ------------------------------------------------------------------------


def unmask_floor(n: int, dropout_rate: float) -> int:
    """Fewest clients an unbucketed secure sum of ``n`` may unmask under distributed DP.

    ``n`` less the tolerated dropouts (``floor(dropout_rate * n)``), at least
    2: each client's Skellam noise is sized for a sum of that many.
    """
    return max(2, n - math.floor(dropout_rate * n))


@dataclass(frozen=True)
class SkellamPlan:
    """Encoding and noise parameters of a distributed-DP secure-aggregation round.

    Built by :func:`plan_skellam`; all noise quantities are in code units (one
    quantisation step ``1 / scale`` of the float domain).

    Attributes
    ----------
    bits : int
        Quantisation depth of the encoder, ``levels = 2**bits - 1``.
    headroom : int
        ``H``: each client's noise is clipped to ``[-H, H]`` and its code shifted
        by ``+H``, so a code lies in ``[0, levels + 2H]``.
    client_variance : float
        Variance of each client's Skellam noise per coordinate.
    sum_variance : float
        Variance of the noise on a sum of ``min_clients`` clients,
        ``min_clients * client_variance``: the noise the accounting relies on.
    l2_sensitivity, l1_sensitivity : float
        ``D2 = scale * norm_bound + sqrt(dim)`` and ``D1 = sqrt(dim) * D2``.
    scale : float
        ``gamma = levels / (2 clip)``, codes per float unit.
    noise_multiplier : float
        Std of the noise on the smallest sum over ``D2``.

    References
    ----------
    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
    Federated Learning", NeurIPS 2021.
    """

    bits: int
    headroom: int
    client_variance: float
    sum_variance: float
    l2_sensitivity: float
    l1_sensitivity: float
    scale: float
    noise_multiplier: float

    def epsilon(self, rounds: int, delta: float) -> float:
        """Client-level epsilon at ``delta`` after ``rounds`` rounds (:func:`skellam_epsilon`).

        Parameters
        ----------
        rounds : int
            Rounds in which the client's update entered a released sum (``>= 0``).
        delta : float
            Target delta, in (0, 1).

        Returns
        -------
        float
            The epsilon of ``rounds`` releases with noise variance
            :attr:`sum_variance` and this plan's sensitivities.
        """
        return skellam_epsilon(
            variance=self.sum_variance,
            l2_sensitivity=self.l2_sensitivity,
            l1_sensitivity=self.l1_sensitivity,
            rounds=rounds,
            delta=delta,
        )

    @property
    def sum_std_float(self) -> float:
        """Std of the noise on a ``min_clients`` sum in float units, ``sqrt(sum_variance) / scale``.

        Equals ``noise_multiplier * (norm_bound + sqrt(dim) / scale)``: the
        Gaussian-mechanism noise ``noise_multiplier * norm_bound`` plus the share
        that covers the rounding.
        """
        return math.sqrt(self.sum_variance) / self.scale

    @property
    def clip_probability(self) -> float:
        """Chernoff bound on the chance that one client's noise on one coordinate is clipped.

        ``P(|X| > H) <= 2 exp(-(H asinh(H / v) - sqrt(H^2 + v^2) + v))`` for
        ``X ~ Sk`` of variance ``v`` (its cumulant generating function is
        ``v (cosh t - 1)``); about ``2 exp(-tail^2 / 2)`` when ``v >> tail^2``.
        """
        return _skellam_tail_bound(self.client_variance, self.headroom)


def _skellam_tail_bound(variance: float, headroom: int) -> float:
    if variance == 0.0:
        return 0.0
    h, v = float(headroom) + 1.0, variance  # |X| > H means |X| >= H + 1
    exponent = h * math.asinh(h / v) - (math.hypot(h, v) - v)
    return min(1.0, 2.0 * math.exp(-exponent))


@dataclass(frozen=True)
class _Candidate:
    plan: SkellamPlan
    max_code: int  # levels + 2 * headroom


def _candidate(
    bits: int,
    *,
    noise_multiplier: float,
    norm_bound: float,
    clip: float,
    dim: int,
    min_clients: int,
    tail: float,
) -> _Candidate | None:
    """The plan at ``bits``, or ``None`` if its codes would exceed float64's exact range."""
    levels = (1 << bits) - 1
    scale = levels / (2.0 * clip)
    root_dim = math.sqrt(dim)
    l2 = scale * norm_bound + root_dim
    l1 = root_dim * l2
    client_std = noise_multiplier * l2 / math.sqrt(min_clients)
    reach = tail * client_std
    if not math.isfinite(reach) or reach > 2.0**_FLOAT_EXACT_BITS:
        return None
    headroom = math.ceil(reach)
    max_code = levels + 2 * headroom
    if max_code > 1 << _FLOAT_EXACT_BITS:
        return None
    client_variance = client_std * client_std
    plan = SkellamPlan(
        bits=bits,
        headroom=headroom,
        client_variance=client_variance,
        sum_variance=min_clients * client_variance,
        l2_sensitivity=l2,
        l1_sensitivity=l1,
        scale=scale,
        noise_multiplier=noise_multiplier,
    )
    return _Candidate(plan, max_code)


def plan_skellam(
    *,
    noise_multiplier: float,
    norm_bound: float,
    clip: float,
    dim: int,
    num_clients: int,
    min_clients: int,
    modulus_bits: int = 32,
    bits: int = 0,
    tail: float = 12.0,
) -> SkellamPlan:
    """Choose the quantisation, noise and headroom of a distributed Skellam round.

    Follows the distributed Skellam mechanism of Agarwal, Kairouz, Liu, "The
    Skellam Mechanism for Differentially Private Federated Learning", NeurIPS
    2021 (Section 4), with this package's offset encoding.  In code units
    (``gamma = scale = levels / (2 clip)``, ``levels = 2**bits - 1``):

    * sensitivities of a sum when one client's update (L2 norm ``<= norm_bound``)
      is replaced by zero: ``D2 = gamma * norm_bound + sqrt(dim)`` (stochastic
      rounding moves every coordinate by less than 1) and ``D1 = sqrt(dim) * D2``
      (Cauchy-Schwarz; the integer bound ``D1 <= D2^2`` is never smaller since
      ``D2 >= sqrt(dim)``);
    * a sum over ``min_clients`` clients carries noise of std
      ``noise_multiplier * D2``, so each client adds Skellam noise of variance
      ``(noise_multiplier * D2)^2 / min_clients``;
    * ``headroom = ceil(tail * sqrt(client_variance))``: noise beyond ``tail``
      standard deviations is clipped.  For the near-Gaussian Skellam the
      per-coordinate clipping probability is about ``2 exp(-tail^2 / 2)``
      (``~1e-31`` at the default 12; :attr:`SkellamPlan.clip_probability` gives
      a rigorous Chernoff bound).  In principle this probability, summed over
      coordinates and clients, is added to delta; it is negligible here;
    * sums of ``num_clients`` codes must not wrap:
      ``num_clients * (levels + 2 headroom) < 2**modulus_bits``, and every code
      must stay within float64's exact integers: ``levels + 2 headroom <= 2**53``.

    Parameters
    ----------
    noise_multiplier : float
        Std of the noise on a ``min_clients`` sum over ``D2`` (``> 0``); the
        ``sigma`` of :func:`skellam_noise_multiplier_for`.
    norm_bound : float
        L2 bound ``B > 0`` to which honest clients clip their float update.
    clip : float
        Per-coordinate clipping bound of the encoder (``> 0``).
    dim : int
        Number of encoded coordinates (``>= 1``), every one of them.
    num_clients : int
        Most codes in one modular sum (``>= min_clients``).
    min_clients : int
        Fewest (trusted) clients whose noise enters a released sum (``>= 1``).
    modulus_bits : int, default 32
        Ring ``2**modulus_bits``: 32 or 64.
    bits : int, default 0
        Quantisation depth in ``[1, 53]``; 0 picks the largest that fits (``gamma``,
        ``D2``, the variance and the headroom grow with ``bits`` and are
        recomputed for each candidate).
    tail : float, default 12.0
        Headroom in client noise standard deviations (``> 0``).

    Returns
    -------
    SkellamPlan
        The parameters; :meth:`SkellamPlan.epsilon` accounts for them.

    Raises
    ------
    ValueError
        For an invalid parameter, a given ``bits`` that overflows, or no
        ``bits >= 1`` that fits (the message suggests ``modulus_bits=64``, fewer
        clients per sum or less noise).
    """
    sigma = _number("noise_multiplier", noise_multiplier, minimum=0.0, strict=True)
    bound = _number("norm_bound", norm_bound, minimum=0.0, strict=True)
    clip_value = _number("clip", clip, minimum=0.0, strict=True)
    dim = _integer("dim", dim, minimum=1)
    min_clients = _integer("min_clients", min_clients, minimum=1)
    num_clients = _integer("num_clients", num_clients, minimum=1)
    if min_clients > num_clients:
        raise ValueError(
            f"min_clients must be <= num_clients, got min_clients={min_clients}, "
            f"num_clients={num_clients}"
        )
    if isinstance(modulus_bits, bool) or modulus_bits not in _MODULUS_BITS:
        raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits!r}")
    requested = _integer("bits", bits, minimum=0)
    if requested > _FLOAT_EXACT_BITS:
        raise ValueError(f"bits must be 0 (automatic) or in [1, 53], got {bits!r}")
    tail = _number("tail", tail, minimum=0.0, strict=True)
    limit = 1 << modulus_bits

    def build(depth: int) -> _Candidate | None:
        return _candidate(
            depth,
            noise_multiplier=sigma,
            norm_bound=bound,
            clip=clip_value,
            dim=dim,
            min_clients=min_clients,
            tail=tail,
        )

    def fits(candidate: _Candidate | None) -> bool:
        return candidate is not None and num_clients * candidate.max_code < limit

    if requested:
        chosen = build(requested)
        if chosen is None or not fits(chosen):
            worst = "beyond 2^53" if chosen is None else str(num_clients * chosen.max_code)
            headroom = "> 2^52" if chosen is None else str(chosen.plan.headroom)
            raise _NoFitError(
                f"bits={requested} overflows: num_clients={num_clients} x (levels "
                f"{(1 << requested) - 1} + 2 x headroom {headroom}) = {worst} >= "
                f"2^{modulus_bits}; use fewer bits, modulus_bits=64, fewer clients per sum "
                f"or a smaller noise_multiplier"
            )
        return chosen.plan
    # The largest code grows with bits, so the first fit from the top is the largest.
    for depth in range(_FLOAT_EXACT_BITS, 0, -1):
        candidate = build(depth)
        if candidate is not None and fits(candidate):
            return candidate.plan
    smallest = build(1)
    headroom = "> 2^52" if smallest is None else str(smallest.plan.headroom)
    raise _NoFitError(
        f"no bit depth fits: num_clients={num_clients} x (levels 1 + 2 x headroom {headroom}) "
        f">= 2^{modulus_bits} even at bits=1 (noise_multiplier={sigma:g}, "
        f"min_clients={min_clients}); use modulus_bits=64, fewer clients per sum or a "
        f"smaller noise_multiplier"
    )


def skellam_noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    norm_bound: float,
    clip: float,
    dim: int,
    num_clients: int,
    min_clients: int,
    modulus_bits: int = 32,
    bits: int = 0,
) -> float:
    """Smallest noise multiplier (to a tolerance) whose plan stays within a budget.

    Bisection on ``noise_multiplier`` such that ``plan_skellam(...).epsilon(rounds,
    delta)`` (Agarwal, Kairouz, Liu, NeurIPS 2021, accounted as in
    :func:`skellam_epsilon`) lies in ``[target_epsilon - 0.01, target_epsilon]``,
    like Opacus's ``get_noise_multiplier``: double until the target is met, then
    bisect.  With ``bits = 0`` the chosen depth may drop as the noise grows, so
    epsilon is only nearly monotone in the noise; the returned value is always
    checked to meet the target.

    Parameters
    ----------
    target_epsilon : float
        Epsilon budget (``> 0``).
    delta : float
        Delta, in (0, 1).
    rounds : int
        Number of rounds (``>= 1``).
    norm_bound, clip, dim, num_clients, min_clients, modulus_bits, bits
        As in :func:`plan_skellam`.

    Returns
    -------
    float
        A noise multiplier whose plan has epsilon ``<= target_epsilon``.

    Raises
    ------
    ValueError
        For invalid parameters, or if the target needs a noise multiplier above
        ``1e6`` or more noise than the modulus can hold.
    """
    target = _number("target_epsilon", target_epsilon, minimum=0.0, strict=True)
    delta = check_delta(delta)
    rounds = _integer("rounds", rounds, minimum=1)

    def epsilon(sigma: float) -> float:
        plan = plan_skellam(
            noise_multiplier=sigma,
            norm_bound=norm_bound,
            clip=clip,
            dim=dim,
            num_clients=num_clients,
            min_clients=min_clients,
            modulus_bits=modulus_bits,
            bits=bits,
        )
        return plan.epsilon(rounds, delta)

    low, high = 0.0, 1.0
    try:
        eps_high = epsilon(high)
        while eps_high > target:
            low, high = high, 2.0 * high
            if high > MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon {target:g} at delta {delta:g} over {rounds} rounds is "
                    f"unreachable: it needs a noise_multiplier above {MAX_NOISE_MULTIPLIER:g}"
                )
            eps_high = epsilon(high)
    except _NoFitError as err:
        raise ValueError(
            f"target_epsilon {target:g} at delta {delta:g} over {rounds} rounds is "
            f"unreachable: noise_multiplier {high:g} does not fit ({err})"
        ) from None
    for _ in range(200):
        if target - eps_high <= _EPSILON_TOLERANCE:
            break
        middle = 0.5 * (low + high)
        eps_middle = epsilon(middle)
        if eps_middle > target:
            low = middle
        else:
            high, eps_high = middle, eps_middle
    return high


# ---- sampling ------------------------------------------------------------------------


def secure_generator() -> np.random.Generator:
    """A PCG64 generator seeded with 256 bits from ``os.urandom``.

    The Skellam noise is not a key or a mask: its secrecy matters only in that a
    server who could predict it could subtract it.  A seed drawn from the
    operating system's CSPRNG (getrandom(2) on Linux) for every generator keeps
    the server from replaying or guessing the noise, the idea of Opacus's
    ``secure_mode`` (which seeds from a cryptographic generator rather than a
    fixed or time-based seed).  PCG64 itself is not a cryptographic generator,
    but the server never sees its raw output, only noise added to an update and
    summed with other clients' noise.

    Returns
    -------
    numpy.random.Generator
        A fresh generator; two calls give independent, unpredictable streams.
    """
    entropy = int.from_bytes(os.urandom(32), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _pool() -> ThreadPoolExecutor:
    """The sampling pool, with as many threads as cores are free now (at most 8).

    A client shares its cores (other clients, training): threads beyond the free
    cores only queue behind them (:mod:`fedsec.cores`). The estimate is cached
    for a second; when it changes, a new pool replaces the old one, whose queued
    chunks still run. Each chunk has its own stream, so the samples do not
    depend on the pool's size.
    """
    global _POOL
    from fedsec.cores import threads  # stdlib only: cheap for a ClientApp process

    pid = os.getpid()
    workers = threads(cap=8)
    if _POOL is None or _POOL[0] != pid or _POOL[1]._max_workers != workers:
        if _POOL is not None and _POOL[0] == pid:
            _POOL[1].shutdown(wait=False)
        _POOL = (pid, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skellam"))
    return _POOL[1]


def _log1p_excess(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``(1 + t) log1p(t) - t`` for ``|t| <= 1/2``, without cancellation near 0.

    For ``|t| < 1/8`` the series ``sum_{j >= 2} (-1)^j t^j / (j (j - 1))``
    (Horner, truncated after ``t^17``: the remainder is below ``2 t^16 / 306 <
    1e-16`` relative to the leading ``t^2 / 2``); beyond, the direct formula,
    whose value there is at least ``7e-3`` and loses at most a digit.
    """
    out = (1.0 + t) * np.log1p(t) - t
    near = np.abs(t) < 0.125
    if near.any():
        u = t[near]
        acc = np.zeros_like(u)
        for j in range(_SERIES_TERMS, 1, -1):
            acc = acc * u + (1.0 if j % 2 == 0 else -1.0) / (j * (j - 1))
        out[near] = acc * u * u
    return out


def _poisson_log_pmf(
    offset: npt.NDArray[np.float64], mean: float, base: float
) -> npt.NDArray[np.float64]:
    """``log P(Poisson(mean) = base + offset)`` to ~1e-13 absolute, for ``mean >= 2^20``.

    With ``k = mean (1 + t)`` and Stirling's series for ``log k!`` (remainder
    below ``1 / (1260 k^5)``, nothing at ``k >= 2^19``)::

        log p(k) = -mean f(t) - log(2 pi k) / 2 - 1 / (12 k) + 1 / (360 k^3)

    with ``f(t) = (1 + t) log1p(t) - t`` (:func:`_log1p_excess`).  Every term is
    computed from ``k - mean = offset - (mean - base)``, a difference of small
    numbers, so nothing cancels: the textbook ``-mean + k log(mean) - log k!``
    subtracts numbers near ``3.5e16`` whose rounding (ulp 4-8) swamps the O(1)
    log-likelihoods PTRS compares, numpy's error at means near ``1e15``.
    Offsets with ``|t| > 1/2`` get ``-inf``: their probability is below
    ``exp(-0.1 mean) < exp(-1e5)``, zero in float64 anyway.
    """
    t = (offset - (mean - base)) / mean
    k = base + offset
    out = np.full(offset.shape, -np.inf)
    inside = np.abs(t) <= 0.5
    t, k = t[inside], k[inside]
    out[inside] = (
        -mean * _log1p_excess(t)
        - 0.5 * np.log(2.0 * math.pi * k)
        - 1.0 / (12.0 * k)
        + 1.0 / (360.0 * k**3)
    )
    return out


def _poisson_offsets(
    generator: np.random.Generator, mean: float, size: int
) -> npt.NDArray[np.int64]:
    """``Poisson(mean) - floor(mean)``, exactly, for ``mean >= 2^20`` (up to ``2^53``).

    Hörmann's PTRS (transformed rejection with squeeze; W. Hörmann, "The
    transformed rejection method for generating Poisson random variables",
    Insurance: Mathematics and Economics 12, 1993), valid for every mean
    ``>= 10``, the algorithm numpy itself uses, with its constants.  What
    differs is the arithmetic: the candidate is formed as an offset from
    ``floor(mean)`` (numpy adds ``mean``, rounding the candidate to a multiple
    of ulp(mean) = 0.125 near 1e15) and the acceptance test uses
    :func:`_poisson_log_pmf` instead of a log-density with cancellation, so
    the output follows the Poisson law up to float64 rounding of O(1)
    quantities, at every mean.  Vectorised: all candidates at once, then the
    rejected ones again (about 8 % per pass).
    """
    root = math.sqrt(mean)
    b = 0.931 + 2.53 * root
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    base = math.floor(mean)
    shift = (mean - base) + 0.43
    out = np.empty(size, dtype=np.int64)
    todo: npt.NDArray[np.intp] | None = None  # None: every slot (the first pass)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        while todo is None or todo.size:
            n = size if todo is None else todo.size
            uv = generator.random(2 * n)
            u, v = uv[:n], uv[n:]
            u -= 0.5
            us = 0.5 - np.abs(u)
            # candidate = floor((2 a / us + b) u + frac(mean) + 0.43), in place
            candidate = np.divide(2.0 * a, us)
            candidate += b
            candidate *= u
            candidate += shift
            np.floor(candidate, out=candidate)
            accept = us >= 0.07
            accept &= v <= v_r
            # The squeeze failed: PTRS's full test, skipping its early rejections
            # (a candidate below 0, or us < 0.013 with v > us; and us = 0).
            test = ~accept
            test &= us > 0.0
            test &= (us >= 0.013) | (v <= us)
            test &= candidate >= -base
            where = np.flatnonzero(test)
            if where.size:
                ut = us[where]
                lhs = np.log(v[where]) + log_inv_alpha - np.log(a / (ut * ut) + b)
                accept[where] = lhs <= _poisson_log_pmf(candidate[where], mean, float(base))
            if todo is None:
                np.copyto(out, candidate, casting="unsafe")
                todo = np.flatnonzero(~accept)
            else:
                out[todo[accept]] = candidate[accept]
                todo = todo[~accept]
    return out


def _fill(
    generator: np.random.Generator, mean: float, out: npt.NDArray[np.int64], headroom: int
) -> None:
    """``out[:] = clip(Poisson(mean) - Poisson(mean), -headroom, headroom)``.

    Below :data:`_LARGE_MEAN` numpy's Poisson sampler; at and above it
    :func:`_poisson_offsets` (the two draws share ``floor(mean)``, which cancels).
    """
    size = out.shape[0]
    if mean < _LARGE_MEAN:
        draws = generator.poisson(mean, size=2 * size)
    else:
        draws = _poisson_offsets(generator, mean, 2 * size)
    np.subtract(draws[:size], draws[size:], out=out)
    np.clip(out, -headroom, headroom, out=out)


def sample_skellam(
    variance: float,
    size: int,
    *,
    headroom: int,
    generator: np.random.Generator | None = None,
    out: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.int64]:
    """Symmetric Skellam noise ``Poisson(v / 2) - Poisson(v / 2)``, clipped to the headroom.

    The noise of the distributed Skellam mechanism (Agarwal, Kairouz, Liu,
    NeurIPS 2021): integer valued with variance ``v``, and a sum of independent
    shares is again Skellam.  Values beyond ``[-headroom, headroom]`` are clipped
    (see :func:`plan_skellam` for the probability).  Poisson draws are numpy's
    below a mean of ``2^20`` and :func:`_poisson_offsets` from there on: the
    planned means are 1e14-1e15, where numpy's PTRS rounds its acceptance test
    to O(1) and its variance is off by up to 25 %, so the accountant (which
    assumes exactly Skellam noise of variance ``v``) would be wrong.  The two
    draws are independent and exactly Poisson, so the output is exactly
    ``Sk(v / 2, v / 2)`` (variance ``v``, before clipping) at every scale; its
    cost is about twice numpy's (0.08-0.16 s for a million coordinates on two
    busy cores, against 0.04-0.06 s).
    Large requests are split into chunks of 65,536 samples, each drawn from its
    own generator seeded (256 bits) from ``generator`` and run on a thread pool,
    so the output of a seeded generator does not depend on the thread count.

    Parameters
    ----------
    variance : float
        Variance ``v >= 0`` of each sample (``0`` gives zeros).
    size : int
        Number of samples (``>= 0``).
    headroom : int
        Clipping bound ``H >= 0``.
    generator : numpy.random.Generator, optional
        Source of randomness (advanced by the call); ``None`` uses
        :func:`secure_generator`.
    out : numpy.ndarray, optional
        Contiguous ``(size,)`` int64 array to write into.

    Returns
    -------
    numpy.ndarray
        ``(size,)`` int64 samples in ``[-headroom, headroom]`` (``out`` when given).

    Raises
    ------
    ValueError
        For a negative or non-finite variance, a negative size or headroom, or an
        ``out`` of the wrong dtype or shape.
    """
    var = _number("variance", variance, minimum=0.0, strict=False)
    size = _integer("size", size, minimum=0)
    bound = _integer("headroom", headroom, minimum=0)
    if out is None:
        out = np.empty(size, dtype=np.int64)
    elif out.dtype != np.int64 or out.shape != (size,) or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a contiguous ({size},) int64 array, got {out.shape} {out.dtype}"
        )
    if var == 0.0 or bound == 0 or size == 0:
        out.fill(0)
        return out
    rng = secure_generator() if generator is None else generator
    mean = var / 2.0
    if size <= _SAMPLE_CHUNK:
        _fill(rng, mean, out, bound)
        return out
    starts = range(0, size, _SAMPLE_CHUNK)
    seeds = rng.integers(0, 1 << 64, size=(len(starts), 4), dtype=np.uint64)
    jobs: list[Future[None]] = []
    for start, seed in zip(starts, seeds, strict=True):
        child = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed.tolist())))
        chunk = out[start : start + _SAMPLE_CHUNK]
        jobs.append(_pool().submit(_fill, child, mean, chunk, bound))
    for job in jobs:
        job.result()
    return out
