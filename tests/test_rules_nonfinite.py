"""Non-finite and overflowing input to every rule and wrapper (issue 16, case 3).

A hostile client can send NaN or inf in its update, or claim an example count
whose float32 sum overflows (3 x 3e38). Called directly, every rule must refuse
the first with a one-line ``ValueError`` naming the rows, and treat the second
by its relative weights: never NaN, inf or a silent zero update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedsec import aggregation
from fedsec.aggregation import AggregationResult, Rule
from fedsec.aggregation.base import all_finite

N, D = 8, 6

#: Fresh rule instances (stateful rules must not carry state between calls).
FACTORIES: dict[str, Callable[[], Rule]] = {
    "mean": lambda: aggregation.make("mean"),
    "median": lambda: aggregation.make("median"),
    "trimmed-mean": lambda: aggregation.make("trimmed-mean", f=1),
    "krum": lambda: aggregation.make("krum", f=1),
    "multi-krum": lambda: aggregation.make("multi-krum", f=1),
    "bulyan": lambda: aggregation.make("bulyan", f=1),
    "geometric-median": lambda: aggregation.make("geometric-median"),
    "centered-clipping": lambda: aggregation.make("centered-clipping", tau=1.0),
    "norm-bounding": lambda: aggregation.make("norm-bounding", max_norm=1.0),
    "fltrust": lambda: aggregation.make("fltrust"),
    "foolsgold": lambda: aggregation.make("foolsgold"),
    "dnc": lambda: aggregation.make("dnc", f=1, subsample_dim=4),
    "flame": lambda: aggregation.make("flame"),
    "bucketing+mean": lambda: aggregation.make_pipeline("mean", pre=["bucketing"]),
    "bucketing+geometric-median": lambda: aggregation.make_pipeline(
        "geometric-median", pre=["bucketing"]
    ),
    "nnm+multi-krum": lambda: aggregation.make_pipeline(
        "multi-krum", {"f": 1}, ["nnm"], {"nnm": {"f": 1}}
    ),
}
#: Rules whose aggregate depends on the client weights: before the fix, weights
#: whose float32 sum overflows made them return zeros or NaN.
WEIGHTED = {
    "mean",
    "multi-krum",
    "geometric-median",
    "centered-clipping",
    "norm-bounding",
    "dnc",
    "bucketing+mean",
    "bucketing+geometric-median",
    "nnm+multi-krum",
}


def _updates(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Honest-looking updates [N, D] around a common direction (cosines > 0 for FLTrust)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(N, D, generator=generator, dtype=torch.float64)
    return (torch.linspace(0.5, 1.0, D, dtype=torch.float64) + 0.3 * noise).to(dtype)


def _call(rule: Rule, updates: torch.Tensor, weights: torch.Tensor | None) -> AggregationResult:
    context: dict[str, Any] = {}
    if "reference" in rule.requires:
        context["reference"] = torch.linspace(0.5, 1.0, D, dtype=updates.dtype)
    if "client_ids" in rule.requires:
        context["client_ids"] = list(range(N))
    return rule(updates, weights, **context)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_non_finite_update_rows_are_refused(name: str) -> None:
    rule = FACTORIES[name]()
    updates = _updates()
    updates[1, 2] = float("nan")
    updates[4, 0] = float("inf")
    updates[4, 5] = float("-inf")
    expected = rf"^{rule.name}: updates contain 3 non-finite values \(rows 1, 4\)$"
    with pytest.raises(ValueError, match=expected):
        _call(rule, updates, None)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_non_finite_weights_are_refused_with_the_row(name: str, bad: float) -> None:
    weights = torch.ones(N)
    weights[2] = bad
    expected = r"weights must be finite, non-negative and sum to > 0; 1 non-finite \(row 2\)$"
    with pytest.raises(ValueError, match=expected):
        _call(FACTORIES[name](), _updates(), weights)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_negative_and_all_zero_weights_are_named(name: str) -> None:
    negative = torch.ones(N)
    negative[[3, 5]] = -1.0
    with pytest.raises(ValueError, match=r"; 2 negative \(rows 3, 5\)$"):
        _call(FACTORIES[name](), _updates(), negative)
    with pytest.raises(ValueError, match=r"; all are 0$"):
        _call(FACTORIES[name](), _updates(), torch.zeros(N))


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, 4e37), (torch.float64, 2e307)],
    ids=["float32-sum-overflows", "float64-sum-overflows"],
)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_weights_whose_sum_overflows_keep_their_ratios(
    name: str, dtype: torch.dtype, scale: float
) -> None:
    # Weights 1..8 times `scale`: every weight is finite in `dtype`, their sum
    # (36 x scale) is not. Only the ratios may matter.
    relative = torch.arange(1, N + 1, dtype=dtype)
    huge = relative * scale
    assert torch.isfinite(huge).all() and not torch.isfinite(huge.sum())
    updates = _updates(dtype)
    expected = _call(FACTORIES[name](), updates, relative)
    got = _call(FACTORIES[name](), updates, huge)
    assert all_finite(got.aggregate) and all_finite(got.weights)
    assert _close(got.aggregate, expected.aggregate), name
    assert _close(got.weights, expected.weights), name
    if name in WEIGHTED:  # the pre-fix zero update would have matched a zero expectation
        assert bool(expected.aggregate.abs().max() > 0.1)


def test_mean_of_three_weights_of_3e38_is_the_plain_mean() -> None:
    updates = torch.tensor([[0.0, 3.0], [3.0, 6.0], [6.0, 9.0]])
    result = aggregation.make("mean")(updates, torch.full((3,), 3e38))
    assert torch.allclose(result.weights, torch.full((3,), 1 / 3))
    assert torch.allclose(result.aggregate, torch.tensor([3.0, 6.0]))


def test_float64_counts_beyond_float32_keep_their_ratios() -> None:
    # A count of 1e39 is finite in Python and float64 but inf in float32: the
    # rule must normalise before casting, not refuse (case 3(b)).
    updates = torch.tensor([[0.0], [4.0], [8.0]])
    counts = torch.tensor([1e39, 1e39, 2e39], dtype=torch.float64)
    result = aggregation.make("mean")(updates, counts)
    assert torch.allclose(result.weights, torch.tensor([0.25, 0.25, 0.5]))
    assert torch.allclose(result.aggregate, torch.tensor([5.0]))


def test_geometric_median_is_never_nan() -> None:
    rule = aggregation.make("geometric-median")
    updates = _updates()
    # Overflowing weights: the pre-fix rule divided 0 by 0 here.
    result = rule(updates, torch.full((N,), 3e38))
    assert all_finite(result.aggregate) and all_finite(result.weights)
    assert _close(result.aggregate, rule(updates).aggregate)
    # Finite float32 outliers at 1e38 (f = 3 < n/2): finite, near the honest rows.
    attacked = updates.clone()
    attacked[:3] = 1e38
    result = rule(attacked)
    assert all_finite(result.aggregate)
    honest = updates[3:].to(torch.float64)
    radius = float((honest - honest.mean(0)).norm(dim=1).max())
    assert float((result.aggregate.to(torch.float64) - honest.mean(0)).norm()) < 3 * radius
    # float64 updates near 1e200 square to inf inside the rule: refused, not NaN.
    with pytest.raises(ValueError, match=r"^geometric-median produced \d+ non-finite"):
        rule(_updates(torch.float64) * 1e200)


def test_a_rule_never_returns_a_non_finite_aggregate() -> None:
    class Overflowing(Rule):
        name = "overflowing"

        def aggregate(
            self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
        ) -> AggregationResult:
            return AggregationResult(aggregate=updates.sum(dim=0) * 1e38, weights=weights)

    with pytest.raises(ValueError, match=r"^overflowing produced \d+ non-finite aggregate"):
        Overflowing()(torch.full((2, 3), 1e10))
    # Through a wrapper too: the inner rule's check names the inner rule.
    wrapped = aggregation.Bucketing(Overflowing(), s=1)
    with pytest.raises(ValueError, match=r"^overflowing produced"):
        wrapped(torch.full((2, 3), 1e10))


def test_non_finite_reference_is_refused() -> None:
    reference = torch.linspace(0.5, 1.0, D)
    reference[3] = float("nan")
    with pytest.raises(ValueError, match=r"^fltrust: reference contains 1 non-finite value"):
        aggregation.make("fltrust")(_updates(), reference=reference)


@pytest.mark.parametrize(
    "name", ["centered-clipping", "foolsgold", "bucketing+mean", "flame", "dnc"]
)
def test_a_refused_round_leaves_the_state_unchanged(name: str) -> None:
    rule = FACTORIES[name]()
    _call(rule, _updates(), None)
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    poisoned = _updates()
    poisoned[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _call(rule, poisoned, None)
    after = rule.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_all_finite() -> None:
    x = torch.zeros(3, 4)
    assert all_finite(x) and all_finite(torch.zeros(0, 4)) and all_finite(torch.ones(3).long())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not all_finite(y)
        assert not all_finite(y.T)  # strided views too
