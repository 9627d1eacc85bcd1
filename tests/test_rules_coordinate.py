"""Coordinate median and trimmed mean: reference, Flower, properties, memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.aggregation.coordinate import CoordinateMedian, TrimmedMean, trimmed_coordinates


def reference_trimmed(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Yin et al.'s trimmed mean, one coordinate at a time, in float64.

    Weights: in each coordinate, the kept sorted positions [k, n - k) holding a
    value are shared evenly by the clients holding that value.
    """
    n, d = x.shape
    out = np.zeros(d)
    counts = np.zeros(n)
    for j in range(d):
        column = [float(v) for v in x[:, j]]
        ordered = sorted(column)
        kept = ordered[k : n - k]
        out[j] = sum(kept) / len(kept)
        for i in range(n):
            holders = sum(1 for v in column if v == column[i])
            slots = sum(1 for v in kept if v == column[i])
            counts[i] += slots / holders
    return out, counts / counts.sum()


def random_updates(seed: int, n: int, d: int, ties: bool, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties at the cuts
        return torch.randint(-2, 3, (n, d), generator=generator).to(dtype)
    return torch.randn(n, d, generator=generator, dtype=dtype)


@pytest.mark.parametrize("use_numpy", [True, False])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("seed", "n", "d"), [(0, 1, 5), (1, 2, 7), (2, 5, 30), (3, 8, 40), (4, 13, 25)]
)
def test_matches_reference(seed: int, n: int, d: int, ties: bool, use_numpy: bool) -> None:
    x = random_updates(seed, n, d, ties, torch.float64)
    for k in range((n - 1) // 2 + 1):
        result = trimmed_coordinates(x, k, use_numpy=use_numpy)
        expected, weights = reference_trimmed(x.numpy(), k)
        np.testing.assert_allclose(result.aggregate.numpy(), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result.weights.numpy(), weights, rtol=1e-10, atol=1e-12)


def test_rules_use_the_right_cut() -> None:
    x = random_updates(5, 10, 20, False, torch.float64)
    median = CoordinateMedian()(x)
    np.testing.assert_allclose(median.aggregate.numpy(), reference_trimmed(x.numpy(), 4)[0])
    np.testing.assert_allclose(median.aggregate.numpy(), np.median(x.numpy(), axis=0))
    for beta, k in [(0.0, 0), (0.1, 1), (0.25, 2), (0.49, 4)]:
        result = TrimmedMean(beta=beta)(x)
        np.testing.assert_allclose(result.aggregate.numpy(), reference_trimmed(x.numpy(), k)[0])
    by_f = TrimmedMean(beta=0.4, f=1)(x)  # f overrides beta
    np.testing.assert_allclose(by_f.aggregate.numpy(), reference_trimmed(x.numpy(), 1)[0])


def test_weights_are_shares_of_kept_values() -> None:
    x = torch.tensor([[0.0, 5.0, 1.0], [1.0, 4.0, 1.0], [2.0, 3.0, 1.0]])
    median = CoordinateMedian()(x)
    # Client 1 holds the median of columns 0 and 1; column 2 is a three-way tie.
    assert torch.allclose(median.aggregate, torch.tensor([1.0, 4.0, 1.0]))
    assert torch.allclose(median.weights, torch.tensor([1 / 9, 7 / 9, 1 / 9]))
    assert torch.allclose(TrimmedMean(beta=0.0)(x).weights, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 25])
def test_median_equals_flower(n: int) -> None:
    x = torch.randn(n, 3000, generator=torch.Generator().manual_seed(n))
    flower = aggregate_median([([row.numpy()], 1) for row in x])[0]
    assert np.array_equal(CoordinateMedian()(x).aggregate.numpy(), flower)


@pytest.mark.parametrize("n", [1, 3, 4, 10, 21, 50])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.45])
def test_trimmed_mean_equals_flower(n: int, beta: float) -> None:
    x = torch.randn(n, 2000, generator=torch.Generator().manual_seed(n))
    flower = aggregate_trimmed_avg([([row.numpy()], 1) for row in x], beta)[0]
    ours = TrimmedMean(beta=beta)(x).aggregate.numpy()
    np.testing.assert_allclose(ours, flower, rtol=1e-5, atol=1e-6)


@st.composite
def matrices(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    n = draw(st.integers(1, 9))
    d = draw(st.integers(1, 6))
    values = st.one_of(
        st.sampled_from([-1.0, 0.0, 2.5]),
        st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
    )
    rows = draw(st.lists(st.lists(values, min_size=d, max_size=d), min_size=n, max_size=n))
    perm = draw(st.permutations(list(range(n))))
    return torch.tensor(rows, dtype=torch.float32), perm


@settings(max_examples=40, deadline=None)
@given(data=matrices(), beta=st.floats(0.0, 0.49))
def test_permutation_invariance(data: tuple[torch.Tensor, list[int]], beta: float) -> None:
    x, perm = data
    index = torch.tensor(perm)
    for rule in (CoordinateMedian(), TrimmedMean(beta=beta)):
        result, permuted = rule(x), rule(x[index])
        assert torch.equal(result.aggregate, permuted.aggregate)
        assert torch.allclose(result.weights[index], permuted.weights, atol=1e-6)
        assert abs(float(result.weights.sum()) - 1) < 1e-5


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 15), data=st.data())
def test_outliers_stay_in_honest_range(n: int, data: st.DataObject) -> None:
    f = data.draw(st.integers(0, (n - 1) // 2))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    good = torch.rand(n - f, 6, generator=generator, dtype=torch.float64) * 2 - 1
    bad = torch.randn(f, 6, generator=generator, dtype=torch.float64).sign() * 1e6
    x = torch.cat([good, bad])[torch.randperm(n, generator=generator)]
    low, high = good.min(dim=0).values, good.max(dim=0).values
    rules = [CoordinateMedian(f=f), TrimmedMean(f=f)]
    if 2 * f + 1 < n:  # int(beta * n) == f
        rules.append(TrimmedMean(beta=(f + 0.5) / n))
    for rule in rules:
        out = rule(x).aggregate
        assert torch.all(out >= low) and torch.all(out <= high), (rule, out, low, high)


def test_requirements_and_messages() -> None:
    with pytest.raises(ValueError, match="median needs n > 2f, got n=4, f=2"):
        CoordinateMedian(f=2)(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="trimmed-mean needs n > 2f, got n=6, f=3"):
        TrimmedMean(f=3)(torch.zeros(6, 3))
    CoordinateMedian(f=2)(torch.zeros(5, 3))
    TrimmedMean(f=3)(torch.zeros(7, 3))
    assert TrimmedMean(beta=0.49)(torch.zeros(1, 3)).aggregate.shape == (3,)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrimmedMean(beta=0.5), "beta must be a number in"),
        (lambda: TrimmedMean(beta=-0.1), "beta must be a number in"),
        (lambda: TrimmedMean(beta=True), "beta must be a number in"),
        (lambda: TrimmedMean(beta="0.1"), "beta must be a number in"),
        (lambda: TrimmedMean(f=-1), "f must be an integer >= 0, got -1"),
        (lambda: TrimmedMean(f=1.5), "f must be an integer >= 0, got 1.5"),
        (lambda: CoordinateMedian(f=True), "f must be an integer >= 0, got True"),
    ],
)
def test_parameter_validation(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_input_untouched(dtype: torch.dtype) -> None:
    x = torch.randn(9, 100, dtype=dtype)
    before = x.clone()
    for rule in (CoordinateMedian(), TrimmedMean(beta=0.2)):
        result = rule(x, torch.arange(1.0, 10.0))
        assert result.aggregate.dtype == dtype and result.aggregate.shape == (100,)
        assert result.weights.dtype == dtype and result.weights.shape == (9,)
        assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1), (4, 2)])
def test_thin_inputs_untouched(shape: tuple[int, int]) -> None:
    # The transposed block of a one-column or one-row input is already contiguous:
    # sorting it must not sort the caller's tensor.
    x = torch.tensor([[3.0, -1.0], [0.0, 2.0], [-1.0, 5.0], [1.0, 0.0], [2.0, 1.0]])
    x = x[: shape[0], : shape[1]].contiguous()
    before = x.clone()
    for rule in (CoordinateMedian(), TrimmedMean(beta=0.3)):
        rule(x)
        assert torch.equal(x, before)


def test_non_contiguous_and_half_precision() -> None:
    x = torch.randn(40, 7, dtype=torch.float64).T  # [7, 40], non-contiguous
    expected = reference_trimmed(x.contiguous().numpy(), 3)[0]
    np.testing.assert_allclose(CoordinateMedian()(x).aggregate.numpy(), expected)
    half = CoordinateMedian()(x.to(torch.bfloat16))  # torch.sort path
    assert half.aggregate.dtype == torch.bfloat16
    assert torch.allclose(half.aggregate.double(), torch.from_numpy(expected), atol=0.05)
    with pytest.raises(ValueError, match="NumPy sorting needs"):
        trimmed_coordinates(x.to(torch.bfloat16), 1, use_numpy=True)


def test_many_blocks_and_ties_across_blocks() -> None:
    x = random_updates(7, 6, 50_000, True, torch.float32)
    for k in (1, 2):
        ours = trimmed_coordinates(x, k)
        other = trimmed_coordinates(x, k, use_numpy=False)
        assert torch.allclose(ours.aggregate, other.aggregate)
        assert torch.allclose(ours.weights, other.weights)
        sub = x[:, :300]
        np.testing.assert_allclose(
            trimmed_coordinates(sub, k).weights.numpy(),
            reference_trimmed(sub.numpy(), k)[1],
            rtol=1e-5,
        )


@pytest.mark.parametrize("ties", [False, True])
def test_results_are_bit_identical_whatever_the_thread_count(
    monkeypatch: pytest.MonkeyPatch, ties: bool
) -> None:
    """Median and trimmed mean with 1, 2 and 3 threads (FEDSEC_THREADS), bit for bit; the
    pool really had that many threads."""
    import fedsec.aggregation.coordinate as coordinate

    pools: list[int] = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, max_workers: int) -> None:
            pools.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(coordinate, "ThreadPoolExecutor", Recording)
    x = random_updates(11, 9, 60_000, ties, torch.float32)  # several sorting blocks
    rules = [CoordinateMedian(), TrimmedMean(beta=0.2), TrimmedMean(f=1)]
    outputs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for count in (1, 2, 3):
        monkeypatch.setenv("FEDSEC_THREADS", str(count))
        for rule in rules:
            result = rule(x)
            outputs.setdefault(repr(rule), []).append(
                (result.aggregate.numpy().copy(), result.weights.numpy().copy())
            )
    assert pools == [2] * len(rules) + [3] * len(rules)  # 1 thread runs without a pool
    for runs in outputs.values():
        for aggregate, weights in runs[1:]:
            assert aggregate.tobytes() == runs[0][0].tobytes()
            assert weights.tobytes() == runs[0][1].tobytes()


def test_busy_cores_mean_one_thread_and_no_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no core free (fedsec.cores says 1), the blocks run in the calling thread."""
    import fedsec.aggregation.coordinate as coordinate
    from fedsec import cores

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread pool on a busy machine")

    monkeypatch.delenv("FEDSEC_THREADS", raising=False)
    monkeypatch.delenv("FEDSEC_THREAD_BUDGET", raising=False)
    monkeypatch.setattr(cores, "free_cores", lambda refresh=False: 1)
    monkeypatch.setattr(coordinate, "ThreadPoolExecutor", no_pool)
    x = random_updates(12, 7, 60_000, False, torch.float32)
    result = CoordinateMedian()(x)
    assert torch.equal(result.aggregate, torch.from_numpy(np.median(x.numpy(), axis=0)))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from fedsec.aggregation.coordinate import CoordinateMedian, TrimmedMean
    torch.manual_seed(0)
    x = torch.randn(20, 3_000_000)
    rule = CoordinateMedian() if sys.argv[1] == "median" else TrimmedMean(beta=0.2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rule(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / (x.numel() * x.element_size()))
    """
)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_memory_stays_bounded(rule: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, rule], capture_output=True, text=True, check=True
    )
    extra = float(done.stdout.strip().splitlines()[-1])
    assert extra < 0.5, f"peak grew by {extra:.2f}x the input size"
