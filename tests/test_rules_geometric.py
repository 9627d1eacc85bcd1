"""Geometric median (RFA), centered clipping and norm bounding."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.aggregation.geometric import (
    CenteredClipping,
    GeometricMedian,
    NormBounding,
    centred_gram,
    row_sq_distances,
)

# ---- direct, slow references (float64, one client at a time) ----------------


def reference_geometric_median(
    x: np.ndarray, alpha: np.ndarray, iterations: int, nu: float, tol: float, init: str
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed Weiszfeld (Pillutla et al., Algorithm 2) with RFA's stopping rule."""
    n = x.shape[0]
    alpha = alpha / alpha.sum()
    v = np.median(x, axis=0) if init == "median" else sum(alpha[i] * x[i] for i in range(n))

    def objective(v: np.ndarray) -> float:
        return float(sum(alpha[i] * np.linalg.norm(x[i] - v) for i in range(n)))

    value = objective(v)
    beta = alpha
    for _ in range(iterations):
        beta = np.array([alpha[i] / max(nu, np.linalg.norm(x[i] - v)) for i in range(n)])
        beta = beta / beta.sum()
        v = sum(beta[i] * x[i] for i in range(n))
        previous, value = value, objective(v)
        if abs(previous - value) <= tol * value:
            break
    return v, beta


def reference_clipping(
    rounds: list[np.ndarray], w: np.ndarray, tau: float, iterations: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Karimireddy et al.'s centered clipping over several rounds, v kept across rounds."""
    v = np.zeros(rounds[0].shape[1])
    w = w / w.sum()
    outputs = []
    for x in rounds:
        for _ in range(iterations):
            norms = [float(np.linalg.norm(x[i] - v)) for i in range(len(x))]
            scales = [1.0 if norm <= tau else tau / norm for norm in norms]
            step = sum(w[i] * scales[i] * (x[i] - v) for i in range(len(x)))
            v = v + step
        effective = w * np.array(scales)
        outputs.append((v.copy(), effective / effective.sum()))
    return outputs


def reference_norm_bounding(
    x: np.ndarray, w: np.ndarray, bound: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Sun et al.: clip every update to norm ``bound`` (median norm if None), weighted mean."""
    w = w / w.sum()
    norms = [np.linalg.norm(row) for row in x]
    m = float(np.median(norms)) if bound is None else bound
    scales = np.array([1.0 if norm <= m else m / norm for norm in norms])
    aggregate = sum(w[i] * scales[i] * x[i] for i in range(len(x)))
    return aggregate, w * scales / (w * scales).sum()


CASES = [(0, 1, 4), (1, 2, 3), (2, 5, 10), (3, 8, 33), (4, 13, 7)]


def case(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64) * 3 + 1
    w = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    return x, w


# ---- helpers -----------------------------------------------------------------


def test_blocked_helpers_match_direct() -> None:
    x, _ = case(9, 6, 300_000)
    center = x[2] * 0.5
    assert torch.allclose(row_sq_distances(x, center), ((x - center) ** 2).sum(1))
    assert torch.allclose(row_sq_distances(x.float()), (x.float().double() ** 2).sum(1))
    assert torch.allclose(centred_gram(x, center), (x - center) @ (x - center).T)


# ---- geometric median ----------------------------------------------------------


@pytest.mark.parametrize("init", ["median", "mean"])
@pytest.mark.parametrize(("seed", "n", "d"), CASES)
@pytest.mark.parametrize(("iterations", "tol"), [(1, 1e-6), (10, 1e-6), (25, 0.0)])
def test_geometric_median_matches_reference(
    seed: int, n: int, d: int, init: str, iterations: int, tol: float
) -> None:
    x, w = case(seed, n, d)
    scale = float(x.abs().max())
    result = GeometricMedian(iterations=iterations, tol=tol, init=init)(x, w)
    v, beta = reference_geometric_median(x.numpy(), w.numpy(), iterations, 1e-6, tol, init)
    # Distances from the Gram matrix lose precision when the iterate nears a data
    # point: about sqrt(float64 eps) = 1.5e-8 of the spread (float32 resolution).
    np.testing.assert_allclose(result.aggregate.numpy(), v, rtol=0, atol=1e-7 * scale)
    np.testing.assert_allclose(result.weights.numpy(), beta, rtol=1e-5, atol=1e-9)


def test_geometric_median_converges_to_the_minimiser() -> None:
    x, w = case(11, 9, 20)
    v = GeometricMedian(iterations=500, tol=0.0)(x, w).aggregate
    # First-order condition of argmin sum_i w_i ||v - x_i||: weighted unit vectors cancel.
    diff = v - x
    gradient = (w[:, None] * diff / diff.norm(dim=1, keepdim=True)).sum(0) / w.sum()
    assert gradient.norm() < 1e-6


def test_geometric_median_of_identical_points() -> None:
    x = torch.ones(4, 3)
    result = GeometricMedian()(x)
    assert torch.equal(result.aggregate, torch.ones(3))
    assert torch.allclose(result.weights, torch.full((4,), 0.25))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_geometric_median_outliers_bounded(n: int, data: st.DataObject) -> None:
    """f < n/2 outliers at scale 1e6 move the output by at most r / (1 - 2f/n).

    For the exact geometric median, if honest points lie within r of their mean
    z, the median lies within r / (1 - 2a) of z, a the outliers' weight share.
    It can leave the honest coordinate-wise range (two honest points (0, +-1)
    and a far outlier on the x axis give x = 1/sqrt(3)), so the honest range
    widened by that radius is the tolerance checked here, with the default
    10 iterations.
    """
    f = data.draw(st.integers(0, (n - 1) // 2))
    d = data.draw(st.integers(1, 8))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    good = torch.rand(n - f, d, generator=generator, dtype=torch.float64) * 2 - 1
    bad = torch.randn(f, d, generator=generator, dtype=torch.float64) * 1e6
    x = torch.cat([good, bad])[torch.randperm(n, generator=generator)]
    z = good.mean(0)
    radius = float((good - z).norm(dim=1).max()) / (1 - 2 * f / n)
    out = GeometricMedian(f=f)(x).aggregate
    assert float((out - z).norm()) <= radius + 1e-9
    low, high = good.min(0).values - radius - 1e-9, good.max(0).values + radius + 1e-9
    assert torch.all(out >= low) and torch.all(out <= high)


def test_geometric_median_leaves_the_honest_box() -> None:
    """Documented: the exact geometric median need not be in the honest range."""
    x = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1e6, 0.0]], dtype=torch.float64)
    out = GeometricMedian(iterations=200, tol=0.0)(x).aggregate
    assert abs(float(out[0]) - 1 / 3**0.5) < 1e-6 and abs(float(out[1])) < 1e-9


def test_mean_start_needs_many_iterations_against_huge_outliers() -> None:
    generator = torch.Generator().manual_seed(0)
    good = torch.rand(6, 5, generator=generator, dtype=torch.float64)
    x = torch.cat([good, torch.full((5, 5), 1e6, dtype=torch.float64)])
    far = GeometricMedian(init="mean")(x).aggregate
    near = GeometricMedian()(x).aggregate
    assert float(far.max()) > 100  # RFA's start from the mean: 10 steps are not enough
    assert float(near.max()) < 2


# ---- centered clipping -----------------------------------------------------------


@pytest.mark.parametrize(("seed", "n", "d"), CASES)
@pytest.mark.parametrize(("tau", "iterations"), [(0.5, 1), (3.0, 1), (2.0, 3), (1e9, 2)])
def test_centered_clipping_matches_reference(
    seed: int, n: int, d: int, tau: float, iterations: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    rounds = [torch.randn(n, d, generator=generator, dtype=torch.float64) + r for r in range(3)]
    w = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    rule = CenteredClipping(tau=tau, iterations=iterations)
    expected = reference_clipping([r.numpy() for r in rounds], w.numpy(), tau, iterations)
    for x, (v, weights) in zip(rounds, expected, strict=True):
        result = rule(x, w)
        np.testing.assert_allclose(result.aggregate.numpy(), v, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result.weights.numpy(), weights, rtol=1e-10, atol=1e-12)


def test_centered_clipping_state_round_trip() -> None:
    generator = torch.Generator().manual_seed(3)
    rounds = [torch.randn(6, 50, generator=generator) * 4 for _ in range(3)]
    rule = CenteredClipping(tau=1.0)
    assert rule.state_dict() == {}
    rule(rounds[0])
    state = rule.state_dict()
    fresh = CenteredClipping(tau=1.0)
    fresh.load_state_dict(state)
    for x in rounds[1:]:
        assert torch.equal(rule(x).aggregate, fresh(x).aggregate)
    state["center"].add_(1.0)  # the returned state is a copy
    assert not torch.equal(rule.state_dict()["center"], state["center"])
    empty = CenteredClipping(tau=1.0)
    empty.load_state_dict({})
    assert torch.equal(empty(rounds[0]).aggregate, CenteredClipping(tau=1.0)(rounds[0]).aggregate)


def test_centered_clipping_restarts_on_new_shape_and_converts_dtype() -> None:
    x = torch.randn(5, 8, dtype=torch.float64) * 10
    rule = CenteredClipping(tau=1.0)
    first = rule(x).aggregate
    wider = torch.randn(5, 9, dtype=torch.float64)
    assert torch.equal(rule(wider).aggregate, CenteredClipping(tau=1.0)(wider).aggregate)
    rule.load_state_dict({"center": first})
    as_float = rule(x.float())
    twin = CenteredClipping(tau=1.0)
    twin.load_state_dict({"center": first.float()})
    assert as_float.aggregate.dtype == torch.float32
    assert torch.equal(as_float.aggregate, twin(x.float()).aggregate)


def test_centered_clipping_moves_at_most_tau_per_iteration() -> None:
    x = torch.cat([torch.randn(7, 20), torch.full((3, 20), 1e6)])
    for iterations in (1, 2, 5):
        out = CenteredClipping(tau=2.0, iterations=iterations, f=3)(x).aggregate
        assert float(out.norm()) <= 2.0 * iterations * (1 + 1e-5)


# ---- norm bounding -------------------------------------------------------------


@pytest.mark.parametrize(("seed", "n", "d"), CASES)
@pytest.mark.parametrize("bound", [0.5, 4.0, 1e9, None])
def test_norm_bounding_matches_reference(seed: int, n: int, d: int, bound: float | None) -> None:
    x, w = case(seed, n, d)
    rule = NormBounding(adaptive=True) if bound is None else NormBounding(max_norm=bound)
    result = rule(x, w)
    aggregate, weights = reference_norm_bounding(x.numpy(), w.numpy(), bound)
    np.testing.assert_allclose(result.aggregate.numpy(), aggregate, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.weights.numpy(), weights, rtol=1e-10, atol=1e-12)


def test_norm_bounding_zero_updates_and_zero_median() -> None:
    x = torch.zeros(4, 3)
    x[0] = 5.0
    result = NormBounding(adaptive=True)(x)  # median norm 0: only zero updates count
    assert torch.equal(result.aggregate, torch.zeros(3))
    assert torch.allclose(result.weights, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))


# ---- shared properties and checks --------------------------------------------------


RULES = {
    "geometric-median": lambda: GeometricMedian(),
    "geometric-median-mean": lambda: GeometricMedian(init="mean", iterations=5),
    "centered-clipping": lambda: CenteredClipping(tau=1.5, iterations=2),
    "norm-bounding": lambda: NormBounding(max_norm=2.0),
    "norm-bounding-adaptive": lambda: NormBounding(adaptive=True),
}


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(RULES)),
    n=st.integers(1, 9),
    d=st.integers(1, 6),
    data=st.data(),
)
def test_permutation_invariance(name: str, n: int, d: int, data: st.DataObject) -> None:
    values = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
    x = torch.tensor(
        data.draw(st.lists(st.lists(values, min_size=d, max_size=d), min_size=n, max_size=n)),
        dtype=torch.float64,
    )
    w = torch.tensor(data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n)))
    index = torch.tensor(data.draw(st.permutations(list(range(n)))))
    result, permuted = RULES[name]()(x, w), RULES[name]()(x[index], w[index])
    scale = 1 + float(x.abs().max())
    assert torch.allclose(result.aggregate, permuted.aggregate, atol=1e-7 * scale, rtol=1e-7)
    assert torch.allclose(result.weights[index], permuted.weights, atol=1e-7)
    assert abs(float(result.weights.sum()) - 1) < 1e-9


@pytest.mark.parametrize(
    ("rule", "n", "message"),
    [
        (GeometricMedian(f=2), 4, "geometric-median needs n > 2f, got n=4, f=2"),
        (CenteredClipping(f=3), 6, "centered-clipping needs n > 2f, got n=6, f=3"),
        (NormBounding(), 0, r"shape \[n, d\] with n >= 1"),
    ],
)
def test_requirements(rule: object, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule(torch.zeros(n, 3))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GeometricMedian(iterations=0), "iterations must be an integer >= 1, got 0"),
        (lambda: GeometricMedian(iterations=2.5), "iterations must be an integer >= 1"),
        (lambda: GeometricMedian(nu=0.0), "nu must be a finite number > 0, got 0.0"),
        (lambda: GeometricMedian(tol=-1.0), "tol must be a finite number >= 0, got -1.0"),
        (lambda: GeometricMedian(init="zero"), "init must be 'median' or 'mean', got 'zero'"),
        (lambda: GeometricMedian(f=-1), "f must be an integer >= 0, got -1"),
        (lambda: CenteredClipping(tau=0), "tau must be a finite number > 0, got 0"),
        (lambda: CenteredClipping(tau=float("inf")), "tau must be a finite number > 0"),
        (lambda: CenteredClipping(iterations=True), "iterations must be an integer >= 1"),
        (lambda: NormBounding(max_norm=-2.0), "max_norm must be a finite number > 0"),
        (lambda: NormBounding(adaptive="yes"), "adaptive must be true or false, got 'yes'"),
    ],
)
def test_parameter_validation(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_input_untouched(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(7, 40, dtype=dtype) * 3
    before = x.clone()
    result = RULES[name]()(x, torch.arange(1.0, 8.0))
    assert result.aggregate.dtype == dtype and result.aggregate.shape == (40,)
    assert result.weights.dtype == dtype and result.weights.shape == (7,)
    assert torch.equal(x, before)
    if dtype == torch.float32:
        again = RULES[name]()(x.double(), torch.arange(1.0, 8.0))
        assert torch.allclose(result.aggregate.double(), again.aggregate, rtol=1e-4, atol=1e-5)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from fedsec.aggregation.geometric import CenteredClipping, GeometricMedian, NormBounding
    rule = {"gm": GeometricMedian, "cc": CenteredClipping, "nb": NormBounding}[sys.argv[1]]()
    x = torch.randn(20, 3_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rule(x)
    rule(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / (x.numel() * x.element_size()))
    """
)


@pytest.mark.parametrize("rule", ["gm", "cc", "nb"])
def test_memory_stays_bounded(rule: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, rule], capture_output=True, text=True, check=True
    )
    extra = float(done.stdout.strip().splitlines()[-1])
    assert extra < 0.5, f"peak grew by {extra:.2f}x the input size"
