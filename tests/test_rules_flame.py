"""FLAME against a slow reference of the paper's steps, its noise and its clipping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import sklearn.cluster
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import HDBSCAN

from fedsec.aggregation.flame import Flame


def flame_reference(
    x: np.ndarray, min_cluster_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nguyen et al. 2022, Algorithm 1 without the noise, with loops in float64.

    Returns the clipped mean of the majority cluster and the per-client shares.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    norms = np.array([np.sqrt(sum(v * v for v in row)) for row in x])
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                cos = x[i] @ x[j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0
                distances[i, j] = max(1.0 - cos, 0.0)
    size = min_cluster_size or n // 2 + 1
    labels = (
        HDBSCAN(
            min_cluster_size=size,
            min_samples=1,
            metric="precomputed",
            allow_single_cluster=True,
            copy=True,
        )
        .fit(distances)
        .labels_
    )
    if (labels < 0).all():
        kept = list(range(n))
    else:
        counts = {label: int((labels == label).sum()) for label in set(labels) if label >= 0}
        best = max(counts.values())
        majority = min(label for label, c in counts.items() if c == best)
        kept = [i for i in range(n) if labels[i] == majority]
    bound = float(np.median(norms))
    clipped = [x[i] * min(1.0, bound / norms[i]) if norms[i] > 0 else x[i] for i in kept]
    shares = np.zeros(n)
    shares[kept] = 1.0 / len(kept)
    return sum(clipped) / len(kept), shares


def clustered(
    gen: torch.Generator, honest: int, backdoor: int, d: int, spread: float = 0.3
) -> torch.Tensor:
    """Honest updates around one direction, backdoor updates around another."""
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    rows = [a + spread * torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(honest)]
    rows += [
        b + spread * torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(backdoor)
    ]
    scales = 0.5 + torch.rand(honest + backdoor, 1, generator=gen, dtype=torch.float64)
    return torch.stack(rows) * scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("seed", "honest", "backdoor", "d"),
    [(0, 2, 0, 5), (1, 5, 2, 10), (2, 7, 3, 40), (3, 11, 4, 25), (4, 6, 0, 3), (5, 20, 9, 16)],
)
def test_flame_matches_reference(
    seed: int, honest: int, backdoor: int, d: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = clustered(gen, honest, backdoor, d, spread=0.3 + 0.3 * seed)
    expected, expected_w = flame_reference(x.numpy())
    result = Flame(noise_lambda=0.0)(x.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert result.aggregate.dtype == dtype and result.weights.dtype == dtype
    np.testing.assert_allclose(result.weights.double().numpy(), expected_w, atol=tol)
    np.testing.assert_allclose(result.aggregate.double().numpy(), expected, rtol=tol, atol=tol)


def test_flame_min_cluster_size_parameter() -> None:
    gen = torch.Generator().manual_seed(9)
    x = clustered(gen, 6, 4, 12, spread=0.2)
    expected, expected_w = flame_reference(x.numpy(), min_cluster_size=3)
    result = Flame(noise_lambda=0.0, min_cluster_size=3)(x)
    np.testing.assert_allclose(result.weights.numpy(), expected_w, atol=1e-12)
    np.testing.assert_allclose(result.aggregate.numpy(), expected, atol=1e-10)


def test_flame_excludes_backdoor_cluster() -> None:
    gen = torch.Generator().manual_seed(0)
    x = clustered(gen, 7, 3, 100, spread=0.2)
    x[7:] *= 20  # boosted backdoor updates (model replacement style)
    result = Flame()(x)
    assert torch.all(result.weights[7:] == 0)
    # the kept cluster has at least n // 2 + 1 = 6 members, all honest (HDBSCAN
    # may leave an honest update at the cluster's edge as noise)
    kept = result.weights[:7] > 0
    assert kept.sum() >= 6
    assert torch.allclose(result.weights[:7][kept], 1 / kept.sum().double())


def test_flame_noise_std_is_lambda_times_median_norm() -> None:
    """Noise = aggregate with noise minus without; d = 200k samples.

    The relative standard error of a sample std over d samples is 1/sqrt(2d) =
    0.16%, so a 2% tolerance is about 12 standard errors (the seed is fixed,
    so the test is deterministic anyway).
    """
    gen = torch.Generator().manual_seed(1)
    d = 200_000
    x = torch.randn(5, d, generator=gen) * torch.tensor([[1.0], [2.0], [3.0], [4.0], [50.0]])
    noisy = Flame(noise_lambda=0.01, seed=3)(x).aggregate.double()
    clean = Flame(noise_lambda=0.0)(x).aggregate.double()
    noise = noisy - clean
    bound = x.double().norm(dim=1).median()  # odd n: the middle norm
    sigma = 0.01 * bound
    assert abs(noise.std() / sigma - 1) < 0.02
    assert abs(noise.mean()) < 5 * sigma / d**0.5


def test_flame_noise_reproducible_and_fresh_each_round() -> None:
    x = torch.randn(6, 50)
    a, b = Flame(seed=5), Flame(seed=5)
    first = [a(x).aggregate for _ in range(3)]
    second = [b(x).aggregate for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(Flame(seed=6)(x).aggregate, first[0])


def test_flame_state_round_trip() -> None:
    x = torch.randn(7, 30)
    rule = Flame(noise_lambda=0.1, seed=2)
    rule(x)
    rule(x)
    restored = Flame(noise_lambda=0.1, seed=2)
    restored.load_state_dict(rule.state_dict())
    assert int(rule.state_dict()["counter"]) == 2
    assert torch.equal(rule(x).aggregate, restored(x).aggregate)


def test_flame_all_noise_keeps_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    class AllNoise:
        def __init__(self, **params: Any) -> None:
            self.params = params

        def fit(self, distances: np.ndarray) -> AllNoise:
            self.labels_ = np.full(distances.shape[0], -1)
            return self

    monkeypatch.setattr(sklearn.cluster, "HDBSCAN", AllNoise)
    x = torch.randn(5, 8, dtype=torch.float64)
    result = Flame(noise_lambda=0.0)(x)
    assert torch.allclose(result.weights, torch.full((5,), 0.2, dtype=torch.float64))


def test_flame_two_clients_and_zero_updates() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    result = Flame(noise_lambda=0.0)(x)
    # median norm is 2: the second update is clipped to norm 2
    assert torch.allclose(result.aggregate, torch.tensor([0.5, 1.0]))
    zeros = Flame()(torch.zeros(4, 3))
    assert torch.equal(zeros.aggregate, torch.zeros(3))  # S_t = 0: no noise either


def test_flame_requirements() -> None:
    with pytest.raises(ValueError, match="flame needs n >= 2, got n=1"):
        Flame()(torch.randn(1, 3))
    with pytest.raises(ValueError, match="flame needs n > 2f, got n=6, f=3"):
        Flame(f=3)(torch.randn(6, 3))
    Flame(f=2)(torch.randn(5, 3))
    with pytest.raises(
        ValueError, match="flame needs n >= min_cluster_size, got n=4, min_cluster_size=5"
    ):
        Flame(min_cluster_size=5)(torch.randn(4, 3))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"noise_lambda": -0.1}, "noise_lambda must be a non-negative number, got -0.1"),
        ({"noise_lambda": float("nan")}, "noise_lambda"),
        ({"noise_lambda": "0.1"}, "noise_lambda"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"seed": 1.5}, "seed"),
        ({"min_cluster_size": 1}, "min_cluster_size must be an integer >= 2 or None, got 1"),
        ({"min_cluster_size": True}, "min_cluster_size"),
        ({"f": -1}, "f must be a non-negative integer, got -1"),
    ],
)
def test_flame_parameter_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Flame(**params)


def test_flame_does_not_modify_input() -> None:
    x = torch.randn(8, 20)
    saved = x.clone()
    Flame()(x)
    assert torch.equal(x, saved)


@settings(max_examples=40, deadline=None)
@given(
    honest=st.integers(2, 10),
    outliers=st.integers(0, 4),
    d=st.integers(2, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_flame_clipping_bound_and_permutation_invariance(
    honest: int, outliers: int, d: int, seed: int
) -> None:
    """With fewer than n/2 outliers of 1e6 scale, the noiseless aggregate's norm
    stays within the median norm, hence within the largest honest norm."""
    outliers = min(outliers, honest - 1)  # f < n / 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(honest + outliers, d, generator=gen, dtype=torch.float64)
    x[honest:] *= 1e6
    n = x.shape[0]
    result = Flame(noise_lambda=0.0)(x)
    norms = x.norm(dim=1)
    assert result.aggregate.norm() <= norms.quantile(0.5) * (1 + 1e-9)
    assert result.aggregate.norm() <= norms[:honest].max() * (1 + 1e-9)
    assert torch.isclose(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    perm = torch.randperm(n, generator=gen)
    a = Flame(noise_lambda=0.01, seed=seed)(x)
    b = Flame(noise_lambda=0.01, seed=seed)(x[perm])
    assert torch.allclose(a.weights[perm], b.weights)
    assert torch.allclose(a.aggregate, b.aggregate, rtol=1e-9, atol=1e-9)


MEMORY_SCRIPT = """
import resource, torch
import sklearn.cluster
from fedsec.aggregation.flame import Flame
Flame()(torch.randn(4, 1000))
x = torch.randn({n}, {d})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Flame()(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (x.numel() * 4))
"""


@pytest.mark.slow
def test_flame_memory_peak_below_twice_the_input() -> None:
    script = textwrap.dedent(MEMORY_SCRIPT.format(n=20, d=4_000_000))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    ratio = float(out.stdout.strip())
    assert ratio < 2.0, f"flame: peak extra memory {ratio:.2f}x the input"
