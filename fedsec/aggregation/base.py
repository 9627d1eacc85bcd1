"""Shared types and the weighted mean (FedAvg) rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AggregationResult:
    """What a rule returns.

    Attributes
    ----------
    aggregate : torch.Tensor
        The aggregated update, shape [d].
    weights : torch.Tensor
        Normalised per-client weights actually used, shape [n], summing to 1;
        0 marks a client the rule excluded.
    """

    aggregate: torch.Tensor
    weights: torch.Tensor


class AggregationRule(Protocol):
    """A rule over stacked updates [n, d] with optional client weights [n]."""

    def __call__(
        self, updates: torch.Tensor, weights: torch.Tensor | None = None
    ) -> AggregationResult: ...


def check_updates(updates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Validate the shapes of a rule's inputs and return normalised weights [n].

    Raises
    ------
    ValueError
        If ``updates`` is not a non-empty floating [n, d] tensor, or ``weights``
        is not [n], non-negative, finite, with a positive sum.
    """
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must have shape [n, d] with n >= 1, got {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be floating point, got {updates.dtype}")
    n = updates.shape[0]
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=updates.dtype, device=updates.device)
    if weights.shape != (n,):
        raise ValueError(
            f"weights must have shape [{n}] to match updates, got {tuple(weights.shape)}"
        )
    w = weights.to(dtype=updates.dtype, device=updates.device)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and sum to > 0")
    return w / w.sum()


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Weighted mean of the updates: FedAvg's rule.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017. Offers no robustness: a single client can
    move the aggregate arbitrarily far. Requires n >= 1.
    """
    w = check_updates(updates, weights)
    # One matrix-vector product over [n, d]; no per-client loop.
    return AggregationResult(aggregate=w @ updates, weights=w)
