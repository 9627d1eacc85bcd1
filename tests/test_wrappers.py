"""Bucketing and nearest-neighbour mixing around the mean and small test doubles."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.aggregation.base import AggregationResult, Mean, Rule, require
from fedsec.aggregation.flame import Flame
from fedsec.aggregation.trust import FLTrust, FoolsGold
from fedsec.aggregation.wrappers import Bucketing, NearestNeighborMixing

# ---------------------------------------------------------------- test doubles


class Recorder(Rule):
    """Weighted mean that remembers what it was given."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        self.seen.append((updates.clone(), weights.clone()))
        return AggregationResult(weights.to(updates.dtype) @ updates, weights)


class PickFirst(Rule):
    """Returns row 0 plus the number of earlier calls (a stateful, non-linear rule)."""

    name = "pickfirst"

    def __init__(self) -> None:
        self.calls = 0

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        out = updates[0] + self.calls
        self.calls += 1
        chosen = torch.zeros_like(weights)
        chosen[0] = 1
        return AggregationResult(out, chosen)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self.calls)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.calls = int(state["calls"])


class Median(Rule):
    """Coordinate-wise median (torch's lower median is fine here), weights uniform."""

    name = "median"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n >= self.minimum, f"n >= {self.minimum}", n=n)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        return AggregationResult(
            updates.median(dim=0).values, torch.full_like(weights, 1 / len(weights))
        )


# ---------------------------------------------------------------- references


def bucket_reference(
    x: np.ndarray, w: np.ndarray, perm: list[int], s: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bucket means (member-weighted) and bucket weights, with loops."""
    means, weights = [], []
    for start in range(0, len(perm), s):
        members = perm[start : start + s]
        total = sum(w[i] for i in members)
        if total > 0:
            means.append(sum(w[i] * x[i] for i in members) / total)
        else:
            means.append(sum(x[i] for i in members) / len(members))
        weights.append(total)
    return np.stack(means), np.array(weights)


def nnm_reference(x: np.ndarray, f: int) -> np.ndarray:
    """Mixing matrix of Allouah et al. 2023 with loops: row i averages i's n - f nearest."""
    n = x.shape[0]
    mixing = np.zeros((n, n))
    for i in range(n):
        dist = [float(sum((x[i] - x[j]) ** 2)) for j in range(n)]
        order = sorted(range(n), key=lambda j: (j != i, dist[j]))
        for j in order[: n - f]:
            mixing[i, j] = 1.0 / (n - f)
    return mixing


def first_permutation(n: int, s: int, seed: int) -> list[int]:
    """The permutation a fresh Bucketing(seed) draws on its first call."""
    return [int(i) for i in Bucketing(Mean(), s=s, seed=seed).permutation(n)]


# ---------------------------------------------------------------- Bucketing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "s", "seed"), [(1, 2, 0), (7, 2, 1), (10, 3, 2), (9, 9, 3), (12, 5, 4)]
)
def test_bucket_means_match_reference(n: int, s: int, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    w = torch.rand(n, generator=gen, dtype=dtype) + 0.1
    inner = Recorder()
    result = Bucketing(inner, s=s, seed=seed)(x, w)
    perm = first_permutation(n, s, seed)
    wn = (w / w.sum()).double().numpy()
    means, bucket_w = bucket_reference(x.double().numpy(), wn, perm, s)
    seen_x, seen_w = inner.seen[0]
    assert seen_x.shape == (math.ceil(n / s), 6) and seen_x.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(seen_x.double().numpy(), means, atol=tol)
    np.testing.assert_allclose(seen_w.double().numpy(), bucket_w, atol=tol)
    # composed with the mean: the weighted mean of all clients, with their weights
    np.testing.assert_allclose(result.aggregate.double().numpy(), wn @ x.double().numpy(), atol=tol)
    np.testing.assert_allclose(result.weights.double().numpy(), wn, atol=tol)


def test_bucketing_s1_fixed_permutation_is_inner_on_permuted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.randn(6, 4, dtype=torch.float64)
    w = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    inner = PickFirst()
    rule = Bucketing(inner, s=1)
    monkeypatch.setattr(rule, "permutation", lambda n: perm)
    result = rule(x, w)
    direct = PickFirst()(x[perm], w[perm])
    assert torch.equal(result.aggregate, direct.aggregate)
    expected = torch.zeros(6, dtype=torch.float64)
    expected[perm] = direct.weights
    assert torch.equal(result.weights, expected)


def test_bucketing_client_weights_split_inner_bucket_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Non-linear inner rule: the chosen bucket's weight goes to its members pro rata."""
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    rule = Bucketing(PickFirst(), s=2)
    monkeypatch.setattr(rule, "permutation", lambda n: torch.tensor([1, 4, 0, 2, 3]))
    result = rule(x, w)
    # bucket 0 = clients {1, 4} with weights 3 and 2
    assert torch.allclose(result.weights, torch.tensor([0, 0.6, 0, 0, 0.4], dtype=torch.float64))
    assert torch.allclose(result.aggregate, (3 * x[1] + 2 * x[4]) / 5)


def test_bucketing_zero_weight_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.tensor([[1.0, 1.0], [3.0, 5.0], [2.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    inner = PickFirst()
    rule = Bucketing(inner, s=2)
    monkeypatch.setattr(rule, "permutation", lambda n: torch.tensor([0, 1, 2, 3]))
    result = rule(x, w)
    # bucket {0, 1} has weight 0: plain mean of its members; PickFirst chose it
    assert torch.allclose(result.aggregate, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(result.weights, torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))


def test_bucketing_permutations_reproducible_and_fresh_each_call() -> None:
    a, b = Bucketing(Mean(), seed=7), Bucketing(Mean(), seed=7)
    pa = [a.permutation(20).tolist() for _ in range(3)]
    pb = [b.permutation(20).tolist() for _ in range(3)]
    assert pa == pb
    assert pa[0] != pa[1]
    assert Bucketing(Mean(), seed=8).permutation(20).tolist() != pa[0]


def test_bucketing_state_round_trip() -> None:
    x = torch.randn(9, 5)
    rule = Bucketing(PickFirst(), s=2, seed=4)
    rule(x)
    rule(x)
    state = rule.state_dict()
    assert set(state) == {"counter", "inner.calls"}
    restored = Bucketing(PickFirst(), s=2, seed=4)
    restored.load_state_dict(state)
    a, b = rule(x), restored(x)
    assert torch.equal(a.aggregate, b.aggregate) and torch.equal(a.weights, b.weights)


def test_bucketing_refuses_rules_needing_client_ids() -> None:
    with pytest.raises(
        ValueError,
        match="bucketing cannot wrap foolsgold: it needs client_ids, and buckets are not clients",
    ):
        Bucketing(FoolsGold())


def test_bucketing_passes_reference_through() -> None:
    rule = Bucketing(FLTrust(), s=2)
    assert rule.requires == frozenset({"reference"})
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="bucketing needs reference"):
        rule(x)
    result = rule(x, reference=x.mean(dim=0))
    assert result.aggregate.shape == (4,)
    assert Bucketing(Mean()).requires == frozenset()


def test_bucketing_check_delegates_with_bucket_count() -> None:
    rule = Bucketing(Median(minimum=5), s=2)
    rule.check(9)  # 5 buckets
    with pytest.raises(ValueError, match="median needs n >= 5, got n=4"):
        rule(torch.randn(8, 3))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"s": 0}, "bucketing: s must be an integer >= 1, got 0"),
        ({"s": 2.0}, "bucketing: s must be an integer >= 1, got 2.0"),
        ({"seed": -3}, "bucketing: seed must be an integer >= 0, got -3"),
        ({"inner": "krum"}, "bucketing: inner must be an aggregation Rule, got 'krum'"),
    ],
)
def test_bucketing_parameter_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Bucketing(**{"inner": Mean(), **params})


def test_bucketing_does_not_modify_input() -> None:
    x, w = torch.randn(7, 5), torch.rand(7) + 0.5
    saved_x, saved_w = x.clone(), w.clone()
    Bucketing(Mean(), s=3)(x, w)
    assert torch.equal(x, saved_x) and torch.equal(w, saved_w)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    s=st.integers(1, 5),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_bucketing_with_mean_is_the_weighted_mean(n: int, s: int, seed: int, data: Any) -> None:
    raw = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 7.0]), min_size=n, max_size=n))
    if sum(raw) == 0:
        raw[0] = 1.0
    w = torch.tensor(raw, dtype=torch.float64)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    result = Bucketing(Mean(), s=s, seed=seed)(x, w)
    wn = w / w.sum()
    assert torch.allclose(result.aggregate, wn @ x)
    assert torch.allclose(result.weights, wn)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 14), s=st.integers(1, 3), seed=st.integers(0, 1000), data=st.data())
def test_bucketing_median_contains_outliers(n: int, s: int, seed: int, data: Any) -> None:
    """f outliers spoil at most f buckets: with 2f < buckets the median stays honest."""
    buckets = math.ceil(n / s)
    f = data.draw(st.integers(0, (buckets - 1) // 2))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    bad = torch.randperm(n, generator=gen)[:f]
    honest = torch.ones(n, dtype=torch.bool)
    honest[bad] = False
    x[bad] = 1e6 * torch.randn(f, 5, generator=gen, dtype=torch.float64)
    out = Bucketing(Median(), s=s, seed=seed)(x).aggregate
    lo, hi = x[honest].min(dim=0).values, x[honest].max(dim=0).values
    assert torch.all(out >= lo - 1e-9) and torch.all(out <= hi + 1e-9)


# ---------------------------------------------------------------- NNM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "f", "seed"), [(1, 0, 0), (3, 1, 1), (7, 2, 2), (10, 4, 3), (15, 0, 4)]
)
def test_nnm_mixing_matches_reference(n: int, f: int, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64) * (
        1 + 3 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    )
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    expected = nnm_reference(x.numpy(), f)
    rule = NearestNeighborMixing(Recorder(), f=f)
    mixing = rule.mixing_matrix(x.to(dtype))
    np.testing.assert_array_equal(mixing.numpy(), expected)
    assert torch.allclose(mixing.sum(dim=1), torch.ones(n, dtype=torch.float64))
    result = rule(x.to(dtype), w.to(dtype))
    wn = (w / w.sum()).numpy()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    seen_x, seen_w = rule.inner.seen[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(seen_x.double().numpy(), expected @ x.numpy(), atol=tol)
    np.testing.assert_allclose(seen_w.double().numpy(), wn, atol=tol)
    # composed with the mean: w @ M @ x, and the client weights are w @ M
    assert result.aggregate.dtype == dtype
    np.testing.assert_allclose(
        result.aggregate.double().numpy(), wn @ expected @ x.numpy(), atol=tol
    )
    np.testing.assert_allclose(result.weights.double().numpy(), wn @ expected, atol=tol)


def test_nnm_f0_gives_everyone_the_mean() -> None:
    x = torch.randn(5, 3, dtype=torch.float64)
    inner = Recorder()
    NearestNeighborMixing(inner, f=0)(x)
    assert torch.allclose(inner.seen[0][0], x.mean(dim=0).expand(5, 3))


def test_nnm_requirements_and_delegation() -> None:
    with pytest.raises(ValueError, match="nnm needs n > 2f, got n=4, f=2"):
        NearestNeighborMixing(Mean(), f=2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="median needs n >= 6, got n=5"):
        NearestNeighborMixing(Median(minimum=6), f=2)(torch.randn(5, 3))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"f": -1}, "nnm: f must be an integer >= 0, got -1"),
        ({"f": 1.0}, "nnm: f must be an integer >= 0, got 1.0"),
        ({"inner": None}, "nnm: inner must be an aggregation Rule, got None"),
    ],
)
def test_nnm_parameter_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NearestNeighborMixing(**{"inner": Mean(), **params})


def test_nnm_state_and_requires_pass_through() -> None:
    x = torch.randn(7, 4)
    rule = NearestNeighborMixing(PickFirst(), f=2)
    rule(x)
    assert rule.state_dict() == {"calls": torch.tensor(1)}
    restored = NearestNeighborMixing(PickFirst(), f=2)
    restored.load_state_dict(rule.state_dict())
    assert torch.equal(rule(x).aggregate, restored(x).aggregate)
    wrapped = NearestNeighborMixing(FoolsGold(), f=1)
    assert wrapped.requires == frozenset({"client_ids"})
    with pytest.raises(ValueError, match="nnm needs client_ids"):
        wrapped(x)
    assert wrapped(x, client_ids=list(range(7))).aggregate.shape == (4,)
    flame = NearestNeighborMixing(Flame(seed=1), f=1)
    flame(x)
    assert int(flame.state_dict()["counter"]) == 1


def test_nnm_does_not_modify_input() -> None:
    x, w = torch.randn(7, 5), torch.rand(7) + 0.5
    saved_x, saved_w = x.clone(), w.clone()
    NearestNeighborMixing(Mean(), f=2)(x, w)
    assert torch.equal(x, saved_x) and torch.equal(w, saved_w)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 1000), data=st.data())
def test_nnm_median_permutation_invariant_and_contains_outliers(
    n: int, seed: int, data: Any
) -> None:
    """Honest updates' n - f nearest neighbours are the honest ones, so with
    2f < n their mixed updates coincide and form the median's majority."""
    f = data.draw(st.integers(0, (n - 1) // 2))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    x[n - f :] = 1e6 * torch.randn(f, 4, generator=gen, dtype=torch.float64)
    rule = NearestNeighborMixing(Median(), f=f)
    a = rule(x)
    lo, hi = x[: n - f].min(dim=0).values, x[: n - f].max(dim=0).values
    assert torch.all(a.aggregate >= lo - 1e-9) and torch.all(a.aggregate <= hi + 1e-9)
    perm = torch.randperm(n, generator=gen)
    b = rule(x[perm])
    assert torch.allclose(a.aggregate, b.aggregate, rtol=1e-9, atol=1e-9)
    assert torch.allclose(a.weights[perm], b.weights)


# ---------------------------------------------------------------- composition


def test_linear_chain_weights_are_exact_contributions() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    w = torch.rand(11, generator=gen, dtype=torch.float64) + 0.1
    rule = Bucketing(NearestNeighborMixing(Mean(), f=1), s=2, seed=3)
    result = rule(x, w)
    assert torch.isclose(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(result.aggregate, result.weights @ x)


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = """
import resource, sys, torch
from fedsec.aggregation.base import Mean
from fedsec.aggregation.wrappers import Bucketing, NearestNeighborMixing
make = (lambda: Bucketing(Mean(), s=2)) if sys.argv[1] == "bucketing" else (lambda: NearestNeighborMixing(Mean(), f=4))
make()(torch.randn(10, 1000))
x = torch.randn({n}, {d})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
make()(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (x.numel() * 4))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bucketing", "nnm"])
def test_memory_peak_below_twice_the_input(name: str) -> None:
    """Bucket means are n/s rows; NNM's mixed updates are as large as the input.

    d = 8M so that the fixed-size column blocks of the distance computation
    (up to ~0.7 GB at float64) stay small next to the 0.64 GB input.
    """
    script = textwrap.dedent(MEMORY_SCRIPT.format(n=20, d=8_000_000))
    out = subprocess.run(
        [sys.executable, "-c", script, name], capture_output=True, text=True, check=True
    )
    ratio = float(out.stdout.strip())
    assert ratio < 2.0, f"{name}: peak extra memory {ratio:.2f}x the input"
