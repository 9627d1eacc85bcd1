"""FLTrust and FoolsGold against slow references of the papers' definitions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.aggregation.trust import FLTrust, FoolsGold

# ---------------------------------------------------------------- references


def fltrust_reference(x: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cao et al. 2021, eq. (4)-(6), with loops in float64."""
    x = np.asarray(x, dtype=np.float64)
    g0 = np.asarray(g0, dtype=np.float64)
    n = x.shape[0]
    g0_norm = np.sqrt(sum(v * v for v in g0))
    trust = np.zeros(n)
    scaled = np.zeros_like(x)
    for i in range(n):
        norm = np.sqrt(sum(v * v for v in x[i]))
        cos = 0.0 if norm == 0 or g0_norm == 0 else float(x[i] @ g0) / (norm * g0_norm)
        trust[i] = max(cos, 0.0)
        scaled[i] = x[i] * (g0_norm / norm) if norm > 0 else 0.0
    if trust.sum() == 0:
        return np.zeros(x.shape[1]), np.zeros(n)
    aggregate = sum(trust[i] * scaled[i] for i in range(n)) / trust.sum()
    return aggregate, trust / trust.sum()


class FoolsGoldReference:
    """Algorithm 1 of Fung et al. 2020, following the authors' numpy code line by line."""

    def __init__(self, kappa: float = 1.0) -> None:
        self.kappa = kappa
        self.history: dict[int, np.ndarray] = {}

    def __call__(self, x: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        n, d = x.shape
        for i, c in enumerate(ids):
            self.history[c] = self.history.get(c, np.zeros(d)) + x[i]
        if n == 1:
            return x[0], np.ones(1)
        h = [self.history[c] for c in ids]
        cs = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                ni, nj = np.linalg.norm(h[i]), np.linalg.norm(h[j])
                if i != j and ni > 0 and nj > 0:
                    cs[i, j] = h[i] @ h[j] / (ni * nj)
        maxcs = cs.max(axis=1)
        for i in range(n):
            for j in range(n):
                if i != j and maxcs[i] < maxcs[j]:
                    cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
        wv = 1 - cs.max(axis=1)
        wv[wv > 1] = 1
        wv[wv < 0] = 0
        if wv.max() == 0:
            return np.zeros(d), np.zeros(n)
        wv = wv / wv.max()
        wv[wv == 1] = 0.99
        with np.errstate(divide="ignore"):
            wv = self.kappa * (np.log(wv / (1 - wv)) + 0.5)
        wv[(np.isinf(wv) + wv > 1)] = 1
        wv[wv < 0] = 0
        if wv.sum() == 0:
            return np.zeros(d), np.zeros(n)
        share = wv / wv.sum()
        return share @ x, share


def sybil_round(rng: np.random.Generator, honest: int, sybils: int, d: int) -> np.ndarray:
    """Diverse honest updates plus sybils pushing one direction with small noise."""
    target = rng.normal(size=d)
    rows = [rng.normal(size=d) for _ in range(honest)]
    rows += [target + 0.05 * rng.normal(size=d) for _ in range(sybils)]
    return np.stack(rows)


# ---------------------------------------------------------------- FLTrust


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("seed", "n", "d"), [(0, 1, 5), (1, 4, 7), (2, 9, 30), (3, 15, 3)])
def test_fltrust_matches_reference(seed: int, n: int, d: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    g0 = x.mean(dim=0) + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    x[0] *= 100.0  # a scaled update: rescaled to ||g0|| anyway
    expected, expected_w = fltrust_reference(x.numpy(), g0.numpy())
    result = FLTrust()(x.to(dtype), torch.rand(n, generator=gen) + 0.1, reference=g0.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert result.aggregate.dtype == dtype
    np.testing.assert_allclose(result.aggregate.double().numpy(), expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(result.weights.double().numpy(), expected_w, rtol=tol, atol=tol)


def test_fltrust_ignores_example_weights() -> None:
    x = torch.randn(5, 8, dtype=torch.float64)
    g0 = torch.randn(8, dtype=torch.float64)
    a = FLTrust()(x, torch.tensor([1.0, 1, 1, 1, 1]), reference=g0)
    b = FLTrust()(x, torch.tensor([100.0, 1, 3, 1, 7]), reference=g0)
    assert torch.equal(a.aggregate, b.aggregate)


def test_fltrust_no_trusted_client_keeps_model() -> None:
    g0 = torch.tensor([1.0, 0.0, 0.0])
    x = torch.tensor([[-1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    result = FLTrust()(x, reference=g0)
    assert torch.equal(result.aggregate, torch.zeros(3))
    assert torch.equal(result.weights, torch.zeros(3))


def test_fltrust_zero_update_gets_no_trust() -> None:
    g0 = torch.tensor([1.0, 1.0])
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    result = FLTrust()(x, reference=g0)
    assert torch.allclose(result.weights, torch.tensor([0.0, 1.0]))
    assert torch.allclose(result.aggregate, g0)


def test_fltrust_float32_overflow_falls_back_to_float64() -> None:
    g0 = torch.ones(4)
    x = torch.tensor([[1.0, 2.0, 1.0, 1.0], [3e30, 3e30, 3e30, 3e30]])
    result = FLTrust()(x, reference=g0)
    expected, expected_w = fltrust_reference(x.double().numpy(), g0.double().numpy())
    np.testing.assert_allclose(result.aggregate.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(result.weights.numpy(), expected_w, rtol=1e-5)


def test_fltrust_needs_a_reference_of_the_right_shape() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="fltrust needs reference"):
        FLTrust()(x)
    with pytest.raises(ValueError, match=r"reference must be a tensor of shape \[4\], got \(3,\)"):
        FLTrust()(x, reference=torch.zeros(3))
    assert FLTrust.requires == frozenset({"reference"})


def test_fltrust_does_not_modify_input() -> None:
    x = torch.randn(6, 10)
    g0 = torch.randn(10)
    saved, saved_g0 = x.clone(), g0.clone()
    FLTrust()(x, reference=g0)
    assert torch.equal(x, saved) and torch.equal(g0, saved_g0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 10),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    outliers=st.integers(0, 3),
)
def test_fltrust_permutation_invariant_and_norm_bounded(
    n: int, d: int, seed: int, outliers: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[: min(outliers, n)] *= 1e6  # huge updates cannot exceed the reference's norm
    g0 = torch.randn(d, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    a = FLTrust()(x, reference=g0)
    b = FLTrust()(x[perm], reference=g0)
    assert torch.allclose(a.aggregate, b.aggregate, rtol=1e-9, atol=1e-12)
    assert torch.allclose(a.weights[perm], b.weights, atol=1e-12)
    assert a.aggregate.norm() <= g0.norm() * (1 + 1e-9)


# ---------------------------------------------------------------- FoolsGold


@pytest.mark.parametrize("kappa", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foolsgold_matches_reference_over_rounds(seed: int, kappa: float) -> None:
    """Partial participation over several rounds, with and without sybils."""
    rng = np.random.default_rng(seed)
    pool, d = 10, 12
    rule, reference = FoolsGold(kappa=kappa), FoolsGoldReference(kappa=kappa)
    for _ in range(5):
        n = int(rng.integers(1, pool + 1))
        ids = [int(c) for c in rng.choice(pool, size=n, replace=False)]
        sybils = int(rng.integers(0, n // 2 + 1))
        x = sybil_round(rng, n - sybils, sybils, d).astype(np.float32)
        expected, expected_w = reference(x.astype(np.float64), ids)
        result = rule(torch.from_numpy(x), torch.ones(n), client_ids=ids)
        np.testing.assert_allclose(result.weights.numpy(), expected_w, atol=2e-4)
        np.testing.assert_allclose(result.aggregate.numpy(), expected, atol=2e-4)


def test_foolsgold_suppresses_sybils() -> None:
    rng = np.random.default_rng(0)
    rule = FoolsGold()
    ids = list(range(8))
    for _ in range(3):
        x = torch.from_numpy(sybil_round(rng, 5, 3, 50)).float()
        result = rule(x, client_ids=ids)
    assert torch.all(result.weights[5:] == 0)
    assert torch.all(result.weights[:5] > 0.1)
    assert torch.isclose(result.weights.sum(), torch.tensor(1.0))


def test_foolsgold_identical_clients_all_zero() -> None:
    x = torch.ones(3, 4)
    result = FoolsGold()(x, client_ids=[1, 2, 3])
    assert torch.equal(result.aggregate, torch.zeros(4))
    assert torch.equal(result.weights, torch.zeros(3))


def test_foolsgold_single_client_returns_its_update_and_records_history() -> None:
    rule = FoolsGold()
    x = torch.tensor([[1.0, 2.0]])
    result = rule(x, client_ids=[7])
    assert torch.equal(result.aggregate, x[0]) and torch.equal(result.weights, torch.ones(1))
    assert torch.equal(rule.state_dict()["history"], x)
    assert torch.equal(rule.state_dict()["ids"], torch.tensor([7]))


def test_foolsgold_float64_input_keeps_float32_history() -> None:
    x = torch.randn(4, 6, dtype=torch.float64)
    rule = FoolsGold()
    result = rule(x, client_ids=[0, 1, 2, 3])
    assert result.aggregate.dtype == torch.float64
    assert result.weights.dtype == torch.float64
    assert rule.state_dict()["history"].dtype == torch.float32


def test_foolsgold_state_round_trip() -> None:
    rng = np.random.default_rng(3)
    rounds = [
        (torch.from_numpy(sybil_round(rng, 4, 2, 20)).float(), ids)
        for ids in ([0, 1, 2, 3, 4, 5], [5, 3, 9, 1, 0, 2], [2, 9, 4, 3, 1, 5])
    ]
    rule = FoolsGold(kappa=2.0)
    for x, ids in rounds[:2]:
        rule(x, client_ids=ids)
    state = rule.state_dict()
    assert state["ids"].tolist() == [0, 1, 2, 3, 4, 5, 9]
    assert state["history"].shape == (7, 20)
    restored = FoolsGold(kappa=2.0)
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    x, ids = rounds[2]
    a, b = rule(x, client_ids=ids), restored(x, client_ids=ids)
    assert torch.equal(a.aggregate, b.aggregate) and torch.equal(a.weights, b.weights)
    # an empty state round-trips too
    empty = FoolsGold()
    empty.load_state_dict(FoolsGold().state_dict())
    assert empty.state_dict()["ids"].numel() == 0


def test_foolsgold_bad_state_and_ids() -> None:
    rule = FoolsGold()
    with pytest.raises(ValueError, match=r"ids \[k\] and history \[k, d\]"):
        rule.load_state_dict(
            {"ids": torch.zeros(2, dtype=torch.int64), "history": torch.zeros(3, 4)}
        )
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="foolsgold needs client_ids"):
        rule(x)
    with pytest.raises(ValueError, match="client_ids has 2 entries for n=3"):
        rule(x, client_ids=[1, 2])
    with pytest.raises(ValueError, match="client_ids must be distinct"):
        rule(x, client_ids=[1, 2, 2])
    rule(x, client_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="the histories have 4 coordinates, the updates have 5"):
        rule(torch.randn(2, 5), client_ids=[9, 1])
    assert 9 not in rule.state_dict()["ids"].tolist()  # nothing recorded on failure


@pytest.mark.parametrize("kappa", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_foolsgold_parameter_validation(kappa: object) -> None:
    with pytest.raises(ValueError, match="foolsgold: kappa must be"):
        FoolsGold(kappa=kappa)  # type: ignore[arg-type]


def test_foolsgold_does_not_modify_input() -> None:
    x = torch.randn(5, 7)
    saved = x.clone()
    FoolsGold()(x, client_ids=[0, 1, 2, 3, 4])
    assert torch.equal(x, saved)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_foolsgold_permutation_invariant(n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(sybil_round(rng, n - n // 3, n // 3, d))
    ids = [int(c) for c in rng.choice(100, size=n, replace=False)]
    perm = rng.permutation(n)
    a = FoolsGold()(x, client_ids=ids)
    b = FoolsGold()(x[perm], client_ids=[ids[i] for i in perm])
    assert torch.allclose(a.weights[perm], b.weights, atol=1e-6)
    assert torch.allclose(a.aggregate, b.aggregate, atol=1e-6)


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = """
import resource, sys, torch
from fedsec.aggregation.trust import FLTrust, FoolsGold
name = sys.argv[1]
rule = FLTrust() if name == "fltrust" else FoolsGold()
context = lambda x: {{"reference": x[0].clone()}} if name == "fltrust" else {{"client_ids": list(range(x.shape[0]))}}
small = torch.randn(4, 1000)
rule(small, **context(small))
rule = FLTrust() if name == "fltrust" else FoolsGold()
x = torch.randn({n}, {d})
ctx = context(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rule(x, **ctx)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (x.numel() * 4))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fltrust", "foolsgold"])
def test_memory_peak_below_twice_the_input(name: str) -> None:
    """Peak extra RSS < 2x the stacked updates (FoolsGold's history is 1x of it)."""
    script = textwrap.dedent(MEMORY_SCRIPT.format(n=20, d=4_000_000))
    out = subprocess.run(
        [sys.executable, "-c", script, name], capture_output=True, text=True, check=True
    )
    ratio = float(out.stdout.strip())
    assert ratio < 2.0, f"{name}: peak extra memory {ratio:.2f}x the input"
