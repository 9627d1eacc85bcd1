"""The weighted mean rule and the shared input checks."""

from __future__ import annotations

import pytest
import torch

from fedsec import aggregation
from fedsec.registry import UnknownNameError


def test_weighted_mean_matches_manual() -> None:
    updates = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    result = aggregation.make("mean")(updates, torch.tensor([1.0, 3.0]))
    assert torch.allclose(result.aggregate, torch.tensor([2.5, 3.0]))
    assert torch.allclose(result.weights, torch.tensor([0.25, 0.75]))


def test_unweighted_mean_float64() -> None:
    updates = torch.randn(5, 7, dtype=torch.float64)
    result = aggregation.weighted_mean(updates)
    assert result.aggregate.dtype == torch.float64
    assert torch.allclose(result.aggregate, updates.mean(dim=0))


@pytest.mark.parametrize(
    ("updates", "weights", "message"),
    [
        (torch.zeros(0, 3), None, r"shape \[n, d\] with n >= 1"),
        (torch.zeros(3), None, r"shape \[n, d\]"),
        (torch.zeros(2, 3, dtype=torch.int64), None, "floating point"),
        (torch.zeros(2, 3), torch.ones(3), r"weights must have shape \[2\]"),
        (torch.zeros(2, 3), torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.zeros(2, 3), torch.zeros(2), "sum to > 0"),
    ],
)
def test_bad_inputs(updates: torch.Tensor, weights: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregation.weighted_mean(updates, weights)


def test_registry_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="valid choices: mean"):
        aggregation.make("krumm")
    with pytest.raises(ValueError, match="aggregation rule 'mean'"):
        aggregation.make("mean", f=2)
