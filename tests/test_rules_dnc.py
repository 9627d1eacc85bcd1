"""Divide-and-Conquer: reference algorithm, attack removal, reproducibility."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.aggregation.dnc import DivideAndConquer, dnc_good_set, sample_coordinates


def ref_dnc(
    x: np.ndarray, w: np.ndarray, subsamples: list[np.ndarray], removed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 3 of the paper, literally: SVD per iteration, intersect the kept sets."""
    n = len(x)
    good = set(range(n))
    for coordinates in subsamples:
        sub = x[:, coordinates]
        centred = sub - sub.mean(axis=0)
        top = np.linalg.svd(centred, full_matrices=False)[2][0]
        scores = [float(np.dot(centred[i], top)) ** 2 for i in range(n)]
        kept = sorted(range(n), key=lambda i: (scores[i], i))[: n - removed]
        good &= set(kept)
    weights = np.zeros(n)
    for i in good:
        weights[i] = w[i]
    weights /= weights.sum()
    return weights @ x, weights


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("n", "d", "f", "b", "niters", "c"),
    [
        (5, 40, 1, 10, 1, 1.0),
        (10, 200, 3, 50, 3, 1.0),
        (12, 30, 2, 100, 2, 1.5),  # b capped at d
        (20, 500, 4, 64, 5, 1.0),
        (9, 60, 4, 20, 4, 0.5),
    ],
)
def test_matches_reference(
    seed: int, n: int, d: int, f: int, b: int, niters: int, c: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[: f // 2] += 3 * torch.randn(d, generator=g, dtype=torch.float64)  # a few outliers
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    rule = DivideAndConquer(f=f, subsample_dim=b, niters=niters, c=c, seed=seed)
    subsamples = rule.subsamples(d)
    assert all(len(s) == min(b, d) for s in subsamples)
    result = rule(x, w)
    agg, weights = ref_dnc(x.numpy(), w.numpy(), [s.numpy() for s in subsamples], int(c * f))
    np.testing.assert_allclose(result.aggregate.numpy(), agg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.weights.numpy(), weights, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_removes_aligned_malicious_updates(seed: int) -> None:
    """Colluders sharing a large direction stand out along the top singular vector."""
    g = torch.Generator().manual_seed(seed)
    n, f, d = 25, 5, 20_000
    honest = 0.1 + torch.randn(n - f, d, generator=g)
    direction = torch.randn(d, generator=g)
    direction *= 3 * honest.std(dim=0).norm() / direction.norm()  # 3x the honest spread
    malicious = honest.mean(dim=0) + direction + 0.1 * torch.randn(f, d, generator=g)
    x = torch.cat([malicious, honest])
    perm = torch.randperm(n, generator=g)
    x, bad = x[perm], perm < f
    result = DivideAndConquer(f=f, subsample_dim=5_000, seed=seed)(x)
    assert (result.weights[bad] == 0).all()
    assert (result.weights[~bad] > 0).sum() >= n - 2 * f
    distance = (result.aggregate - x[~bad].mean(dim=0)).norm()
    assert distance < 0.2 * direction.norm()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 15),
    d=st.integers(1, 30),
    niters=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_good_set_permutation_invariant(n: int, d: int, niters: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    f = (n - 1) // 2
    subsamples = [sample_coordinates(d, max(1, d // 2), g) for _ in range(niters)]
    perm = torch.randperm(n, generator=g)
    good = dnc_good_set(x, subsamples, n - f)
    assert torch.equal(dnc_good_set(x[perm], subsamples, n - f), good[perm])
    assert good.any()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 12), d=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_aggregate_permutation_invariant(n: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    perm = torch.randperm(n, generator=g)
    f = (n - 1) // 2
    a = DivideAndConquer(f=f, subsample_dim=7, niters=2, seed=seed)(x, w)
    b = DivideAndConquer(f=f, subsample_dim=7, niters=2, seed=seed)(x[perm], w[perm])
    torch.testing.assert_close(b.aggregate, a.aggregate, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.weights, a.weights[perm], rtol=1e-12, atol=1e-15)


# ---- coordinate subsamples -------------------------------------------------------


@pytest.mark.parametrize(("d", "b"), [(10, 20), (10, 10), (100, 30), (1000, 30), (10**7, 10_000)])
def test_sample_coordinates_distinct_sorted_in_range(d: int, b: int) -> None:
    idx = sample_coordinates(d, b, torch.Generator().manual_seed(1))
    assert idx.dtype == torch.int64 and len(idx) == min(b, d)
    assert (idx[1:] > idx[:-1]).all()
    assert idx[0] >= 0 and idx[-1] < d


@pytest.mark.parametrize(("d", "b"), [(40, 4), (40, 25)])  # sparse and dense branches
def test_sample_coordinates_uniform(d: int, b: int) -> None:
    g = torch.Generator().manual_seed(0)
    draws = 4000
    hits = torch.zeros(d)
    for _ in range(draws):
        hits[sample_coordinates(d, b, g)] += 1
    expected = draws * b / d
    # Binomial standard deviation is at most sqrt(expected); allow 5 of them.
    assert (hits - expected).abs().max() < 5 * expected**0.5


def test_reproducible_and_stateful() -> None:
    x1, x2 = torch.randn(8, 300), torch.randn(8, 300)
    rule = DivideAndConquer(f=2, subsample_dim=50, niters=3, seed=7)
    first = rule.subsamples(300)
    assert all(torch.equal(a, b) for a, b in zip(first, rule.subsamples(300), strict=True))
    rule(x1)
    second = rule.subsamples(300)
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # A fresh rule with the saved state continues identically.
    resumed = DivideAndConquer(f=2, subsample_dim=50, niters=3, seed=7)
    resumed.load_state_dict(rule.state_dict())
    assert rule.state_dict()["calls"].item() == 1
    a, b = rule(x2), resumed(x2)
    assert torch.equal(a.aggregate, b.aggregate) and torch.equal(a.weights, b.weights)
    # Same seed, same history: same result; another seed: other subsamples.
    again = DivideAndConquer(f=2, subsample_dim=50, niters=3, seed=7)
    assert torch.equal(
        again(x1).aggregate, DivideAndConquer(f=2, subsample_dim=50, niters=3, seed=7)(x1).aggregate
    )
    other = DivideAndConquer(f=2, subsample_dim=50, niters=3, seed=8).subsamples(300)
    assert not torch.equal(other[0], first[0])


def test_empty_intersection_falls_back_to_most_kept() -> None:
    # Three points on a line; each iteration sees one coordinate and drops one.
    x = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    subsamples = [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])]
    good = dnc_good_set(x, subsamples, keep=3)
    assert good.tolist() == [False, False, False, True]
    good = dnc_good_set(x[:3], subsamples, keep=2)  # everyone is dropped once
    assert good.tolist() == [True, True, True]


# ---- errors, parameters, dtypes, input untouched ----------------------------------


def test_requirement_messages() -> None:
    with pytest.raises(ValueError, match=r"^dnc needs n > 2f, got n=4, f=2$"):
        DivideAndConquer(f=2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"^dnc needs n > floor\(c\*f\), got n=3, removed=3$"):
        DivideAndConquer(f=1, c=3.0)(torch.randn(3, 3))
    DivideAndConquer(f=2)(torch.randn(5, 3))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"f": -1}, "f must be an integer >= 0, got -1"),
        ({"subsample_dim": 0}, "subsample_dim must be an integer >= 1, got 0"),
        ({"niters": 2.0}, "niters must be an integer >= 1, got 2.0"),
        ({"seed": -3}, "seed must be an integer >= 0, got -3"),
        ({"c": -0.5}, "c must be a finite number >= 0, got -0.5"),
        ({"c": float("nan")}, "c must be a finite number >= 0, got nan"),
    ],
)
def test_parameter_validation(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DivideAndConquer(**params)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_input_untouched(dtype: torch.dtype) -> None:
    x = torch.randn(9, 2000, dtype=dtype)
    before = x.clone()
    result = DivideAndConquer(f=2, subsample_dim=300)(x, torch.arange(1.0, 10.0))
    assert torch.equal(x, before)
    assert result.aggregate.dtype == dtype and result.aggregate.shape == (2000,)
    assert result.weights.dtype == dtype
    assert torch.isclose(result.weights.sum(), torch.tensor(1.0, dtype=dtype))
    assert (result.weights == 0).sum() >= 2  # at least floor(c f) = 2 removed


def test_zero_weight_good_set_is_uniform() -> None:
    x = torch.randn(5, 50, dtype=torch.float64)
    x[4] += 100  # the outlier; the honest clients all have weight 0
    result = DivideAndConquer(f=1)(x, torch.tensor([0.0, 0, 0, 0, 1]))
    assert result.weights.tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]


MEMORY_SCRIPT = """
import resource, torch
from fedsec.aggregation.dnc import DivideAndConquer
rule = DivideAndConquer(f=4)
rule(torch.randn(20, 1000))  # warm up libraries and thread pools
torch.manual_seed(0)
x = torch.randn(20, 3_000_000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rule(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (x.numel() * x.element_size()))
"""


@pytest.mark.slow
def test_peak_memory_below_twice_the_input() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True
    )
    assert float(out.stdout.strip()) < 2.0
