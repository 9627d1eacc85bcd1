"""Distributed DP with the Skellam mechanism: sampling, RDP accounting, planning, calibration."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedsec.privacy.accounting import RDP_ORDERS
from fedsec.privacy.distributed import (
    SkellamPlan,
    plan_skellam,
    sample_skellam,
    secure_generator,
    skellam_epsilon,
    skellam_noise_multiplier_for,
    skellam_rdp,
)


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Iterator[None]:
    """Opacus warns when the optimal RDP order is at the end of its grid; not a failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        yield


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _bessel_i0(x: float) -> float:
    """Modified Bessel function I_0 by its power series (fine for small x)."""
    return sum((x / 2.0) ** (2 * k) / math.factorial(k) ** 2 for k in range(60))


def _gaussian_rdp(order: float, variance: float, l2: float) -> float:
    return order * l2 * l2 / (2.0 * variance)


# A realistic round: 1000 coordinates, 100 clients per sum, at least 50 of them honest.
PLAN_KW: dict[str, Any] = {
    "noise_multiplier": 1.0,
    "norm_bound": 1.0,
    "clip": 0.1,
    "dim": 1000,
    "num_clients": 100,
    "min_clients": 50,
}


# ---- sampling ------------------------------------------------------------------------


def test_sample_skellam_moments() -> None:
    n = 400_000
    x = sample_skellam(100.0, n, headroom=1000, generator=_rng(1))
    assert x.dtype == np.int64 and x.shape == (n,)
    assert np.abs(x).max() <= 1000
    # Std of the sample variance of a near-Gaussian is var * sqrt(2 / n) ~ 0.22 % of 100,
    # so a 2 % band is > 9 sigma; the mean has std sqrt(100 / n) ~ 0.016, so 0.1 is > 6 sigma.
    assert abs(x.var() - 100.0) < 2.0
    assert abs(x.mean()) < 0.1


def test_sample_skellam_is_skellam_not_rounded_gaussian() -> None:
    # At variance 1, P(X = 0) = exp(-1) I_0(1) ~ 0.4658 for Skellam but ~ 0.383 for a
    # rounded N(0, 1).  The empirical frequency has std sqrt(p (1 - p) / n) ~ 0.0008 at
    # n = 400,000, so a 0.005 band is > 6 sigma (and far from 0.383).
    n = 400_000
    x = sample_skellam(1.0, n, headroom=100, generator=_rng(2))
    expected = math.exp(-1.0) * _bessel_i0(1.0)
    assert abs(np.mean(x == 0) - expected) < 0.005
    # And P(X = 1) = exp(-1) I_1(1) ~ 0.2079 (same band).
    i1 = sum(0.5 ** (2 * k + 1) / (math.factorial(k) * math.factorial(k + 1)) for k in range(60))
    assert abs(np.mean(x == 1) - math.exp(-1.0) * i1) < 0.005


def test_sample_skellam_small_path_moments() -> None:
    # 60,000 samples take the single-chunk path: the std of the sample variance is
    # ~0.58 % of it, so a 5 % band is > 8 sigma.
    x = sample_skellam(50.0, 60_000, headroom=500, generator=_rng(3))
    assert abs(x.var() - 50.0) < 2.5


def test_sample_skellam_clips_to_headroom() -> None:
    # Variance 100 (std 10) clipped at 3: about 38 % of the mass sits on each of -3 and 3.
    x = sample_skellam(100.0, 100_000, headroom=3, generator=_rng(4))
    assert x.min() == -3 and x.max() == 3
    assert 0.3 < np.mean(x == 3) < 0.46 and 0.3 < np.mean(x == -3) < 0.46


def test_sample_skellam_reproducible_out_and_edge_cases() -> None:
    size = 200_003  # several chunks plus a remainder
    a = sample_skellam(1e6, size, headroom=10**7, generator=_rng(5))
    b = sample_skellam(1e6, size, headroom=10**7, generator=_rng(5))
    np.testing.assert_array_equal(a, b)
    gen = _rng(6)
    first = sample_skellam(1e6, size, headroom=10**7, generator=gen)
    second = sample_skellam(1e6, size, headroom=10**7, generator=gen)
    assert not np.array_equal(first, second)  # the generator advances
    out = np.full(size, 7, dtype=np.int64)
    assert sample_skellam(1e6, size, headroom=10**7, generator=_rng(5), out=out) is out
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(sample_skellam(0.0, 5, headroom=3), np.zeros(5, np.int64))
    assert sample_skellam(4.0, 0, headroom=3).shape == (0,)
    fresh = sample_skellam(1e4, 1000, headroom=10**6)  # secure generator
    assert fresh.std() > 50
    with pytest.raises(ValueError, match="out must be"):
        sample_skellam(1.0, 5, headroom=3, out=np.zeros(5, dtype=np.int32))
    with pytest.raises(ValueError, match="out must be"):
        sample_skellam(1.0, 5, headroom=3, out=np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="variance"):
        sample_skellam(-1.0, 5, headroom=3)
    with pytest.raises(ValueError, match="variance"):
        sample_skellam(math.nan, 5, headroom=3)
    with pytest.raises(ValueError, match="headroom"):
        sample_skellam(1.0, 5, headroom=-1)
    with pytest.raises(ValueError, match="size"):
        sample_skellam(1.0, -5, headroom=3)


def test_secure_generator_streams_differ() -> None:
    a = secure_generator().integers(0, 1 << 62, size=8)
    b = secure_generator().integers(0, 1 << 62, size=8)
    assert not np.array_equal(a, b)  # equal with probability 2^-496


# ---- RDP -----------------------------------------------------------------------------


@pytest.mark.parametrize("variance", [0.5, 2.0, 10.0, 100.0, 1e4])
@pytest.mark.parametrize("order", [1.5, 2.0, 7.0, 32.0, 256.0])
def test_skellam_rdp_at_least_gaussian(variance: float, order: float) -> None:
    l2, l1 = 3.0, 3.0 * math.sqrt(20.0)
    rdp = skellam_rdp(order, variance=variance, l2_sensitivity=l2, l1_sensitivity=l1)
    assert rdp >= _gaussian_rdp(math.ceil(order), variance, l2)
    assert rdp > _gaussian_rdp(order, variance, l2)  # the discretisation term is > 0


def test_skellam_rdp_approaches_gaussian() -> None:
    l2, l1 = 10.0, 10.0 * math.sqrt(100.0)
    gaps = []
    for variance in (1e2, 1e3, 1e4, 1e6):
        rdp = skellam_rdp(8, variance=variance, l2_sensitivity=l2, l1_sensitivity=l1)
        gaussian = _gaussian_rdp(8, variance, l2)
        gaps.append(rdp / gaussian - 1.0)
    assert all(a > b for a, b in itertools.pairwise(gaps))  # shrinks with variance
    assert gaps[-1] < 0.01  # < 1 % at large variance
    assert gaps[0] > 0.01  # and visible at small variance, so the check can fail


def test_skellam_rdp_upper_bounds_exact_divergence() -> None:
    """The constants of Theorem 3.5: the bound must dominate the exact 1-D Rényi divergence.

    For a shift of ``k`` (D2 = D1 = k) the divergence between Sk and Sk + k is computed
    from the pmf ``exp(-v) I_j(v)`` (scipy's scaled Bessel function).  A bound with the
    Poisson parameter mistaken for the variance would be half as large and fail at
    variance >= 10, where the bound is within a few percent of the exact value.
    """
    special = pytest.importorskip("scipy.special")
    for variance in (0.5, 2.0, 10.0, 50.0, 200.0):
        for shift in (1, 3):
            for order in (2, 5, 20, 60):
                j = np.arange(-600, 601)
                with np.errstate(divide="ignore"):
                    log_p = np.log(special.ive(np.abs(j), variance))
                    log_q = np.log(special.ive(np.abs(j - shift), variance))
                ok = np.isfinite(log_p) & np.isfinite(log_q)
                terms = order * log_q[ok] + (1 - order) * log_p[ok]
                exact = float(special.logsumexp(terms)) / (order - 1)
                bound = skellam_rdp(
                    order, variance=variance, l2_sensitivity=shift, l1_sensitivity=shift
                )
                assert bound >= exact * (1 - 1e-9), (variance, shift, order)
    # Tightness at large variance: within 2 % of the exact value.
    assert skellam_rdp(2, variance=200.0, l2_sensitivity=1, l1_sensitivity=1) < 0.0051


def test_skellam_rdp_non_integer_order_uses_ceiling() -> None:
    kw: dict[str, float] = {"variance": 5.0, "l2_sensitivity": 2.0, "l1_sensitivity": 4.0}
    assert skellam_rdp(2.3, **kw) == skellam_rdp(3, **kw)
    assert skellam_rdp(3.0, **kw) < skellam_rdp(3.01, **kw)


def test_skellam_rdp_edge_cases_and_errors() -> None:
    assert skellam_rdp(2, variance=0.0, l2_sensitivity=1.0, l1_sensitivity=1.0) == math.inf
    assert skellam_rdp(2, variance=1.0, l2_sensitivity=0.0, l1_sensitivity=0.0) == 0.0
    with pytest.raises(ValueError, match="order"):
        skellam_rdp(1.0, variance=1.0, l2_sensitivity=1.0, l1_sensitivity=1.0)
    with pytest.raises(ValueError, match="variance"):
        skellam_rdp(2, variance=-1.0, l2_sensitivity=1.0, l1_sensitivity=1.0)
    with pytest.raises(ValueError, match="l2_sensitivity"):
        skellam_rdp(2, variance=1.0, l2_sensitivity=-1.0, l1_sensitivity=1.0)
    with pytest.raises(ValueError, match="l1_sensitivity must be >= l2_sensitivity"):
        skellam_rdp(2, variance=1.0, l2_sensitivity=2.0, l1_sensitivity=1.0)


# ---- epsilon -------------------------------------------------------------------------

EPS_KW: dict[str, Any] = {"l2_sensitivity": 10.0, "l1_sensitivity": 100.0, "delta": 1e-5}


def test_skellam_epsilon_monotone_and_edges() -> None:
    by_rounds = [skellam_epsilon(variance=400.0, rounds=r, **EPS_KW) for r in (1, 10, 100)]
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    by_variance = [skellam_epsilon(variance=v, rounds=10, **EPS_KW) for v in (1e2, 1e3, 1e4)]
    assert by_variance[0] > by_variance[1] > by_variance[2]
    assert skellam_epsilon(variance=400.0, rounds=0, **EPS_KW) == 0.0
    assert skellam_epsilon(variance=0.0, rounds=3, **EPS_KW) == math.inf
    with pytest.raises(ValueError, match="rounds"):
        skellam_epsilon(variance=1.0, rounds=-1, **EPS_KW)
    with pytest.raises(ValueError, match="delta"):
        skellam_epsilon(variance=1.0, rounds=1, l2_sensitivity=1.0, l1_sensitivity=1.0, delta=1.0)


def test_skellam_epsilon_matches_hand_computation() -> None:
    variance, d2, d1, rounds, delta = 400.0, 10.0, 100.0, 20, 1e-5
    # Independent: the theorem's formula over integer orders and the classic conversion
    # eps = rdp + log(1/delta) / (alpha - 1) (Mironov 2017, Proposition 3).  The orders
    # are the integers of RDP_ORDERS below 64 (Opacus's grid skips 11), so the library
    # sees each of them; its conversion (Balle et al. 2020) is tighter at every order.
    orders = [*range(2, 11), *range(12, 64)]
    assert all(float(a) in RDP_ORDERS for a in orders)
    hand = min(
        rounds
        * (
            a * d2**2 / (2 * variance)
            + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * variance**2), 3 * d1 / (2 * variance))
        )
        + math.log(1 / delta) / (a - 1)
        for a in orders
    )
    eps = skellam_epsilon(
        variance=variance, l2_sensitivity=d2, l1_sensitivity=d1, rounds=rounds, delta=delta
    )
    assert 0.8 * hand < eps <= hand


# ---- planning ------------------------------------------------------------------------


def _headroom(plan: SkellamPlan, kw: dict[str, Any], tail: float = 12.0) -> int:
    """Recompute the plan's headroom from the documented formulas."""
    levels = (1 << plan.bits) - 1
    scale = levels / (2 * kw["clip"])
    d2 = scale * kw["norm_bound"] + math.sqrt(kw["dim"])
    return math.ceil(tail * kw["noise_multiplier"] * d2 / math.sqrt(kw["min_clients"]))


@pytest.mark.parametrize(
    "kw",
    [
        PLAN_KW,
        {**PLAN_KW, "noise_multiplier": 0.3, "dim": 10, "num_clients": 3, "min_clients": 2},
        {**PLAN_KW, "num_clients": 1000, "min_clients": 10, "modulus_bits": 64},
        {**PLAN_KW, "noise_multiplier": 50.0, "clip": 2.0, "min_clients": 1},
    ],
)
def test_plan_picks_largest_fitting_bits(kw: dict[str, Any]) -> None:
    plan = plan_skellam(**kw)
    modulus = 1 << kw.get("modulus_bits", 32)
    levels = (1 << plan.bits) - 1
    assert plan.headroom == _headroom(plan, kw)
    assert kw["num_clients"] * (levels + 2 * plan.headroom) < modulus
    assert levels + 2 * plan.headroom <= 1 << 53
    assert plan.scale == levels / (2 * kw["clip"])
    assert plan.l2_sensitivity == pytest.approx(
        plan.scale * kw["norm_bound"] + math.sqrt(kw["dim"])
    )
    assert plan.l1_sensitivity == pytest.approx(math.sqrt(kw["dim"]) * plan.l2_sensitivity)
    assert plan.sum_variance == pytest.approx(kw["min_clients"] * plan.client_variance)
    assert plan.sum_variance == pytest.approx((kw["noise_multiplier"] * plan.l2_sensitivity) ** 2)
    # The same bits, asked for explicitly, gives the same plan; one more bit overflows.
    assert plan_skellam(**kw, bits=plan.bits) == plan
    if plan.bits < 53:
        with pytest.raises(ValueError, match=rf"bits={plan.bits + 1} overflows"):
            plan_skellam(**kw, bits=plan.bits + 1)


def test_plan_64_bit_modulus_gives_more_bits() -> None:
    small = plan_skellam(**PLAN_KW, modulus_bits=32)
    large = plan_skellam(**PLAN_KW, modulus_bits=64)
    assert large.bits > small.bits
    assert large.sum_std_float < small.sum_std_float  # finer grid, less rounding noise


def test_plan_sum_std_float() -> None:
    plan = plan_skellam(**PLAN_KW)
    expected = PLAN_KW["noise_multiplier"] * (
        PLAN_KW["norm_bound"] + math.sqrt(PLAN_KW["dim"]) / plan.scale
    )
    assert plan.sum_std_float == pytest.approx(expected, rel=1e-12)
    assert plan.clip_probability < 1e-25  # tail = 12 standard deviations
    assert plan.epsilon(10, 1e-5) == skellam_epsilon(
        variance=plan.sum_variance,
        l2_sensitivity=plan.l2_sensitivity,
        l1_sensitivity=plan.l1_sensitivity,
        rounds=10,
        delta=1e-5,
    )


def test_plan_impossible_configuration() -> None:
    # 1000 clients, a million coordinates and noise_multiplier 1000 with one trusted
    # client: even at bits = 1 the headroom is ~1.2e7 and 1000 x 2.4e7 >= 2^32.
    kw = {**PLAN_KW, "noise_multiplier": 1000.0, "dim": 10**6, "num_clients": 1000}
    kw["min_clients"] = 1
    with pytest.raises(ValueError, match=r"no bit depth fits.*modulus_bits=64"):
        plan_skellam(**kw)
    assert plan_skellam(**kw, modulus_bits=64).bits >= 1  # the suggested fix works


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"norm_bound": 0.0}, "norm_bound"),
        ({"norm_bound": math.inf}, "norm_bound"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -0.1}, "clip"),
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"min_clients": 0}, "min_clients"),
        ({"min_clients": 101}, "min_clients"),
        ({"num_clients": 0}, "num_clients"),
        ({"modulus_bits": 48}, "modulus_bits"),
        ({"modulus_bits": True}, "modulus_bits"),
        ({"bits": 54}, "bits"),
        ({"bits": -1}, "bits"),
        ({"tail": 0.0}, "tail"),
    ],
)
def test_plan_rejects_bad_parameters(change: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        plan_skellam(**{**PLAN_KW, **change})
    assert "\n" not in str(info.value)


# ---- calibration ---------------------------------------------------------------------


@pytest.mark.parametrize(("target", "rounds"), [(5.0, 50), (1.0, 10), (20.0, 200)])
def test_noise_multiplier_for_hits_target(target: float, rounds: int) -> None:
    kw: dict[str, Any] = {
        "norm_bound": 1.0,
        "clip": 0.05,
        "dim": 10_000,
        "num_clients": 20,
        "min_clients": 10,
    }
    sigma = skellam_noise_multiplier_for(target_epsilon=target, delta=1e-5, rounds=rounds, **kw)
    eps = plan_skellam(noise_multiplier=sigma, **kw).epsilon(rounds, 1e-5)
    assert target - 0.02 <= eps <= target


def test_noise_multiplier_for_unreachable() -> None:
    # Tiny budget, 32-bit ring, 1000 clients with a million coordinates: the noise needed
    # does not fit the modulus.
    kw: dict[str, Any] = {
        "norm_bound": 1.0,
        "clip": 0.1,
        "dim": 10**6,
        "num_clients": 1000,
        "min_clients": 1,
    }
    with pytest.raises(ValueError, match="unreachable"):
        skellam_noise_multiplier_for(target_epsilon=1e-3, delta=1e-5, rounds=1000, **kw)
    with pytest.raises(ValueError, match="target_epsilon"):
        skellam_noise_multiplier_for(target_epsilon=0.0, delta=1e-5, rounds=1, **kw)
    with pytest.raises(ValueError, match="rounds"):
        skellam_noise_multiplier_for(target_epsilon=1.0, delta=1e-5, rounds=0, **kw)
