"""Privacy accounting for the subsampled Gaussian mechanism, with Opacus's accountants.

Pure functions, free of Flower types. One *history entry* ``(noise_multiplier,
sample_rate, steps)`` describes ``steps`` compositions of the Poisson-subsampled
Gaussian mechanism: each step includes every record independently with
probability ``sample_rate``, sums the records' contributions (each clipped to L2
norm C) and adds Gaussian noise of standard deviation ``noise_multiplier * C``.
Neighbouring datasets differ by adding or removing one record.

Two accountants are available, both Opacus's:

``"rdp"`` (default)
    Rényi DP of the sampled Gaussian mechanism (Mironov, "Rényi Differential
    Privacy", CSF 2017; Mironov, Talwar, Zhang, "Rényi Differential Privacy of
    the Sampled Gaussian Mechanism", arXiv:1908.10530, 2019), i.e. the moments
    accountant of Abadi et al., "Deep Learning with Differential Privacy", CCS
    2016, converted to (epsilon, delta) with Balle et al., "Hypothesis Testing
    Interpretations and Rényi Differential Privacy", AISTATS 2020, minimised
    over the orders :data:`RDP_ORDERS`. Tens of milliseconds per call; a valid
    upper bound.
``"prv"``
    Numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz,
    "Numerical Composition of Differential Privacy", NeurIPS 2021). Tighter
    (5-15 % smaller epsilon in our measurements) but 5-15x slower; Opacus returns the
    upper end of its error interval (``eps_error = 0.01``).

Record level (DP-SGD) and client level (DP-FedAvg) accounting are the same
computation: for DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018) a record is a
client, ``sample_rate`` is the client sampling probability (clients per round /
total clients), a step is a round and ``noise_multiplier`` is the ratio of the
noise standard deviation on the *sum* of clipped client updates to the clipping
bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import numpy as np

from fedsec.checks import check_number

# Opacus (about 1.3 s to import: it pulls in torch.distributed and scipy) is imported
# where an accountant is used, not here: a SuperNode starts a fresh process per
# message, and most messages never account for anything.

Accountant: TypeAlias = Literal["rdp", "prv"]
#: One entry of an accountant history: ``(noise_multiplier, sample_rate, steps)``.
HistoryEntry: TypeAlias = tuple[float, float, int]

ACCOUNTANTS: tuple[Accountant, ...] = ("rdp", "prv")
#: Largest noise multiplier the solver tries (Opacus's ``MAX_SIGMA``).
MAX_NOISE_MULTIPLIER = 1e6
#: RDP orders: Opacus's default grid (1.1 .. 10.9 by 0.1, then 12 .. 63) extended with
#: Google dp-accounting's high orders (128 .. 1024), which Flower's RDP accountant also
#: uses. Every order gives a valid bound and epsilon is their minimum, so more orders
#: only tighten it; the high ones matter for large noise multipliers (small epsilon),
#: where Opacus's grid alone overestimates epsilon (by 60 % at sigma 5, q 0.01, 100
#: steps) and warns that the optimal order is its largest.
RDP_ORDERS: tuple[float, ...] = (
    # Opacus's RDPAccountant.DEFAULT_ALPHAS, spelt out (tests check they stay equal).
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
)
#: Most compositions (steps, over a whole history) an accountant is asked about: beyond
#: it no training is real, and Opacus's noise search loops forever (RDP at 1e17 steps).
MAX_COMPOSITIONS = 10**12
#: Most compositions the PRV accountant is asked about: its time and memory grow with them
#: (to gigabytes), while RDP's do not. A server-sent
#: config is validated on every message a deployed node receives.
MAX_PRV_COMPOSITIONS = 50_000
#: Default precision of :func:`solve_noise_multiplier`: the epsilon reached at the
#: returned noise multiplier is within this of the target (and never above it).
EPSILON_TOLERANCE = 0.01


def check_accountant(accountant: str) -> Accountant:
    """Return ``accountant`` as an :data:`Accountant`; raise ``ValueError`` unless rdp/prv."""
    if accountant == "rdp":
        return "rdp"
    if accountant == "prv":
        return "prv"
    raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")


def _check_finite(name: str, value: float, *, minimum: float, strict: bool) -> float:
    return check_number(name, value, minimum=minimum, strict=strict)


def check_delta(delta: float, name: str = "delta") -> float:
    """Return ``delta`` as a float; raise ``ValueError`` unless 0 < delta < 1."""
    value = _check_finite(name, delta, minimum=0.0, strict=True)
    if value >= 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return value


def check_entry(noise_multiplier: float, sample_rate: float, steps: int) -> HistoryEntry:
    """Validate one history entry and return it normalised to ``(float, float, int)``.

    Raises
    ------
    ValueError
        Unless ``noise_multiplier >= 0`` (finite), ``0 <= sample_rate <= 1`` and
        ``steps`` is an integer >= 0.
    """
    sigma = _check_finite("noise_multiplier", noise_multiplier, minimum=0.0, strict=False)
    q = _check_finite("sample_rate", sample_rate, minimum=0.0, strict=False)
    if q > 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return sigma, q, int(steps)


def _check_cost(kind: Accountant, compositions: int) -> None:
    """Refuse an accounting question whose answer would cost unbounded time or memory."""
    if compositions > MAX_COMPOSITIONS:
        raise ValueError(
            f"{compositions} compositions (steps) are more than any run takes; at most "
            f"{MAX_COMPOSITIONS}"
        )
    if kind == "prv" and compositions > MAX_PRV_COMPOSITIONS:
        raise ValueError(
            f"the PRV accountant over {compositions} compositions (steps) costs minutes and "
            f"gigabytes; use accountant 'rdp', or at most {MAX_PRV_COMPOSITIONS} steps with 'prv'"
        )


def _merged(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Drop entries that spend nothing and merge consecutive identical mechanisms."""
    merged: list[HistoryEntry] = []
    for sigma, q, steps in history:
        if steps == 0 or q == 0.0:
            continue
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


def epsilon_for_history(
    history: Sequence[HistoryEntry], *, delta: float, accountant: Accountant = "rdp"
) -> float:
    """Epsilon spent, at ``delta``, by a sequence of subsampled Gaussian mechanisms.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        The composed mechanisms, as in Opacus's ``accountant.history``.
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}
        Opacus's RDP or PRV accountant (see the module docstring).

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history (or one whose entries have ``steps = 0``
        or ``sample_rate = 0``), ``inf`` if an entry with ``noise_multiplier = 0``
        is sampled at least once.

    Raises
    ------
    ValueError
        For an invalid entry, delta or accountant name, or more steps in all than
        :data:`MAX_COMPOSITIONS` (with ``"prv"``, :data:`MAX_PRV_COMPOSITIONS`).
    """
    kind = check_accountant(accountant)
    delta = check_delta(delta)
    entries = _merged([check_entry(*entry) for entry in history])
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf
    _check_cost(kind, sum(steps for _, _, steps in entries))
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        rdp = RDPAccountant()
        rdp.history = entries
        return float(rdp.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
    prv = PRVAccountant()
    prv.history = entries
    with np.errstate(divide="ignore"):  # log(1 - q) at q = 1, handled by Opacus
        return float(prv.get_epsilon(delta=delta))


def epsilon_spent(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """Epsilon of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    DP-SGD's accounting (Abadi et al., "Deep Learning with Differential
    Privacy", CCS 2016) with Opacus's accountant on the history
    ``[(noise_multiplier, sample_rate, steps)]``.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation divided by the clipping bound (>= 0).
    sample_rate : float
        Probability that a record takes part in a step, in [0, 1].
    steps : int
        Number of steps (>= 0).
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}
        Opacus's RDP accountant (default) or PRV accountant.

    Returns
    -------
    float
        The epsilon spent (0.0 for no steps, ``inf`` for ``noise_multiplier = 0``).
    """
    return epsilon_for_history(
        [(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
    )


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    epsilon_tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Smallest noise multiplier (up to a bisection tolerance) reaching a privacy target.

    Opacus's ``get_noise_multiplier``: doubling, then bisection until the
    epsilon at the returned noise multiplier is in
    ``[target_epsilon - epsilon_tolerance, target_epsilon]``.

    Parameters
    ----------
    target_epsilon : float
        Epsilon budget (> 0).
    target_delta : float
        Delta, in (0, 1).
    sample_rate : float
        Probability that a record takes part in a step, in (0, 1].
    steps : int
        Number of steps (>= 1).
    accountant : {"rdp", "prv"}
        As in :func:`epsilon_spent`.
    epsilon_tolerance : float
        Bisection precision in epsilon (> 0).

    Returns
    -------
    float
        A noise multiplier whose epsilon is at most ``target_epsilon``.

    Raises
    ------
    ValueError
        For invalid parameters, more steps than :data:`MAX_COMPOSITIONS` (with
        ``"prv"``, :data:`MAX_PRV_COMPOSITIONS`), or if the target needs a noise
        multiplier above :data:`MAX_NOISE_MULTIPLIER`.
    """
    kind = check_accountant(accountant)
    target_epsilon = _check_finite("target_epsilon", target_epsilon, minimum=0.0, strict=True)
    target_delta = check_delta(target_delta, "target_delta")
    tolerance = _check_finite("epsilon_tolerance", epsilon_tolerance, minimum=0.0, strict=True)
    _, q, steps = check_entry(1.0, sample_rate, steps)
    if q == 0.0 or steps == 0:
        raise ValueError(
            f"sample_rate and steps must be > 0 to solve for a noise multiplier, "
            f"got sample_rate={sample_rate!r}, steps={steps!r}"
        )
    _check_cost(kind, steps)
    from opacus.accountants.utils import get_noise_multiplier

    extra: dict[str, Any] = {"alphas": list(RDP_ORDERS)} if kind == "rdp" else {}
    try:
        with np.errstate(divide="ignore"):
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=q,
                steps=steps,
                accountant=kind,
                epsilon_tolerance=tolerance,
                **extra,
            )
    except ValueError:
        raise ValueError(
            f"epsilon {target_epsilon:g} at delta {target_delta:g} is unreachable with "
            f"sample_rate {q:g} and {steps} steps: it needs a noise multiplier above "
            f"{MAX_NOISE_MULTIPLIER:g}"
        ) from None
    return float(sigma)


def client_sample_rate(clients_per_round: int, total_clients: int) -> float:
    """DP-FedAvg's client sampling probability ``clients_per_round / total_clients``.

    Raises
    ------
    ValueError
        Unless ``1 <= clients_per_round <= total_clients`` (integers).
    """
    for name, value in (("clients_per_round", clients_per_round), ("total_clients", total_clients)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if clients_per_round > total_clients:
        raise ValueError(
            f"clients_per_round must be <= total_clients, got "
            f"clients_per_round={clients_per_round}, total_clients={total_clients}"
        )
    return int(clients_per_round) / int(total_clients)


def client_level_epsilon(
    *,
    noise_multiplier: float,
    clients_per_round: int,
    total_clients: int,
    rounds: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """Client-level epsilon of DP-FedAvg after ``rounds`` rounds.

    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018: each round samples clients with probability
    ``q = clients_per_round / total_clients``, clips each client's update to L2
    norm C and adds N(0, (noise_multiplier * C)^2) to the sum of the clipped
    updates (equivalently, std ``noise_multiplier * C / n`` on the mean of n
    updates). The privacy unit is a client's whole dataset; neighbouring
    federations differ by one client.

    Parameters
    ----------
    noise_multiplier : float
        sigma = noise std on the sum / clipping bound C (>= 0).
    clients_per_round : int
        Expected number of clients sampled per round (1 .. total_clients).
    total_clients : int
        Size of the client population (>= 1).
    rounds : int
        Number of rounds (>= 0).
    delta : float
        Target delta, in (0, 1); typically below 1 / total_clients.
    accountant : {"rdp", "prv"}
        As in :func:`epsilon_spent`.

    Returns
    -------
    float
        The client-level epsilon.

    Notes
    -----
    The accounting assumes Poisson sampling of clients (each independently with
    probability q), as in the paper. Sampling exactly ``clients_per_round``
    clients without replacement is the common practice (Flower's samplers do
    this) and is then an approximation; with ``clients_per_round ==
    total_clients`` (q = 1) no amplification by sampling is claimed.
    """
    return epsilon_spent(
        noise_multiplier=noise_multiplier,
        sample_rate=client_sample_rate(clients_per_round, total_clients),
        steps=rounds,
        delta=delta,
        accountant=accountant,
    )


def solve_client_level_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    clients_per_round: int,
    total_clients: int,
    rounds: int,
    accountant: Accountant = "rdp",
    epsilon_tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Noise multiplier sigma for DP-FedAvg to stay within a client-level budget.

    The counterpart of :func:`client_level_epsilon` (McMahan et al., ICLR 2018):
    :func:`solve_noise_multiplier` with ``sample_rate = clients_per_round /
    total_clients`` and ``steps = rounds``. The server then adds noise of std
    ``sigma * C`` to the sum of clipped updates (``sigma * C / n`` to their mean).

    Raises
    ------
    ValueError
        For invalid parameters or an unreachable target.
    """
    return solve_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=client_sample_rate(clients_per_round, total_clients),
        steps=rounds,
        accountant=accountant,
        epsilon_tolerance=epsilon_tolerance,
    )
