"""Shared types and helpers of the aggregation rules, and the weighted mean.

A rule is a small configured object, called on a stacked update matrix::

    rule = fedsec.aggregation.make("krum", f=2)
    result = rule(updates)            # updates: torch tensor [n, d]
    result.aggregate                  # [d]
    result.weights                    # [n], 0 for clients the rule excluded

Rules check their requirement on (n, f) first and raise ``ValueError`` with the
numbers. They work on float32 or float64 tensors on any device, never modify
their input, and bound their temporaries: nothing of size n x n x d, and work
over d is done in column blocks so that n = 100, d = 10M stays within about
3x the memory of the stacked updates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

#: Elements of one [n, block] temporary (4 MiB at float32): small enough to stay in
#: cache, which measured 2x faster than 128 MiB blocks for the Gram products here.
BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class AggregationResult:
    """What a rule returns.

    Attributes
    ----------
    aggregate : torch.Tensor
        The aggregated update, shape [d], same dtype and device as the input.
    weights : torch.Tensor
        Per-client weights actually used, shape [n], summing to 1; 0 marks a
        client the rule excluded. For coordinate-wise rules (median, trimmed
        mean) it is the share of coordinates at which the client's value
        entered the aggregate, normalised.
    """

    aggregate: torch.Tensor
    weights: torch.Tensor


class Rule:
    """Base class of configured aggregation rules.

    Subclasses set ``name``, implement :meth:`aggregate` and, when they
    tolerate f Byzantine clients only for some n, :meth:`check`. Rules that
    need more than the updates (client identities, a server reference update)
    list the keyword arguments in ``requires``; the caller passes them.
    Stateful rules (momentum, history) override :meth:`state_dict` and
    :meth:`load_state_dict` so a resumed run continues identically.
    """

    name: ClassVar[str] = "rule"
    requires: ClassVar[frozenset[str]] = frozenset()

    def check(self, n: int) -> None:
        """Raise ``ValueError`` (with the numbers) if n clients are too few."""
        if n < 1:
            raise ValueError(f"{self.name} needs n >= 1, got n={n}")

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        """Aggregate validated ``updates`` [n, d] with normalised ``weights`` [n]."""
        raise NotImplementedError

    def __call__(
        self, updates: torch.Tensor, weights: torch.Tensor | None = None, **context: Any
    ) -> AggregationResult:
        w = check_updates(updates, weights)
        self.check(updates.shape[0])
        missing = self.requires - context.keys()
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(sorted(missing))}")
        return self.aggregate(updates, w, **{k: context[k] for k in self.requires})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


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


def require(name: str, ok: bool, requirement: str, **numbers: int) -> None:
    """Raise ``ValueError("krum needs n > 2f + 2, got n=5, f=2")`` unless ``ok``."""
    if not ok:
        got = ", ".join(f"{k}={v}" for k, v in numbers.items())
        raise ValueError(f"{name} needs {requirement}, got {got}")


def column_blocks(n: int, d: int, max_elements: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices of ``range(d)`` whose [n, block] temporaries hold at most ``max_elements``."""
    step = max(1, max_elements // max(n, 1))
    for start in range(0, d, step):
        yield slice(start, min(start + step, d))


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows, [n, n] in float64.

    Computed as a Gram matrix over column blocks of the centred updates:
    centring makes the ``|a|^2 + |b|^2 - 2ab`` form accurate when updates are
    close to each other but far from the origin, and blocks keep temporaries
    at [n, block]. Each block's product runs in the input dtype (float32 is
    twice as fast, relative error ~1e-6) and is summed in float64; a block
    whose product overflows (an attacker's 1e20s) is redone in float64.
    """
    n, d = updates.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
    for cols in column_blocks(n, d):
        raw = updates[:, cols]
        block = raw - raw.mean(dim=0)
        product = block @ block.T
        if not torch.isfinite(product).all():
            block = raw.to(torch.float64)
            block -= block.mean(dim=0)
            product = block @ block.T
        gram += product
        del block, product  # keep one block alive at a time
    # A float32 matmul need not be exactly symmetric; Krum's tie-breaks rely on it.
    gram = (gram + gram.T) / 2
    sq_norms = gram.diagonal()
    distances = sq_norms[:, None] + sq_norms[None, :] - 2 * gram
    distances.clamp_(min=0).fill_diagonal_(0)
    return distances


def dot_products(updates: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix ``updates @ other.T`` in float64, accumulated over column blocks.

    Products run in the input dtype and are redone in float64 for a block
    that overflows, as in :func:`pairwise_sq_distances`.
    """
    symmetric = other is None
    other = updates if other is None else other
    n, d = updates.shape
    gram = torch.zeros(n, other.shape[0], dtype=torch.float64, device=updates.device)
    for cols in column_blocks(max(n, other.shape[0]), d):
        left, right = updates[:, cols], other[:, cols]
        product = left @ right.T
        if not torch.isfinite(product).all():
            product = left.to(torch.float64) @ right.to(torch.float64).T
        gram += product
        del product
    return (gram + gram.T) / 2 if symmetric else gram


def weighted_sum(weights: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """``weights @ updates`` ([n] x [n, d] -> [d]) without a float64 copy of the updates."""
    return weights.to(updates.dtype) @ updates


class Mean(Rule):
    """Weighted mean of the updates: FedAvg's rule.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017. No robustness: a single client can move
    the aggregate arbitrarily far. Requires n >= 1.
    """

    name = "mean"

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        return AggregationResult(aggregate=weighted_sum(weights, updates), weights=weights)


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Plain-function form of :class:`Mean`."""
    return Mean()(updates, weights)
