"""Shared types and helpers of the aggregation rules, and the weighted mean.

A rule is a small configured object, called on a stacked update matrix::

    rule = fedsec.aggregation.make("krum", f=2)
    result = rule(updates)            # updates: torch tensor [n, d]
    result.aggregate                  # [d]
    result.weights                    # [n], 0 for clients the rule excluded

Rules check their requirement on (n, f) first and raise ``ValueError`` with the
numbers. The shared entry point (:meth:`Rule.__call__`) also refuses, with a
one-line ``ValueError`` naming the rows, non-finite updates, non-finite or
negative weights, weights that are all 0 and non-finite context tensors (a
server reference), and raises rather than return a non-finite aggregate: a
hostile client's NaN or 1e39 must never reach the global model as NaN, inf or
a silent zero. Weights are normalised in float64 after dividing by the
largest, so weights near the float32 or float64 maximum (whose sum overflows)
keep their relative sizes (3 x 3e38 gives equal thirds, not zeros).

Rules work on float32 or float64 tensors on any device, never modify their
input, and bound their temporaries: nothing of size n x n x d, and work over d
is done in column blocks so that n = 100, d = 10M stays within about 3x the
memory of the stacked updates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedsec.cores import sized_to_free_cores

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
    list the keyword arguments in ``requires``; the caller passes them. Context
    a rule uses when the caller has it, and can do without, is listed in
    ``uses`` (the reputation step's ``client_ids``: an adversary probing the
    rule has none).
    Stateful rules (momentum, history) override :meth:`state_dict` and
    :meth:`load_state_dict` so a resumed run continues identically.
    """

    name: ClassVar[str] = "rule"
    requires: ClassVar[frozenset[str]] = frozenset()
    uses: ClassVar[frozenset[str]] = frozenset()
    #: A stateless rule whose aggregate is non-finite whenever an update with a
    #: positive weight is (a weighted sum): its input scan is then skipped and
    #: done only to name the rows once the output shows a problem, which saves
    #: one full pass over [n, d] on the hot path.
    propagates_non_finite: ClassVar[bool] = False

    def check(self, n: int) -> None:
        """Raise ``ValueError`` (with the numbers) if n clients are too few."""
        if n < 1:
            raise ValueError(f"{self.name} needs n >= 1, got n={n}")

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        """Aggregate validated ``updates`` [n, d] with normalised ``weights`` [n]."""
        raise NotImplementedError

    @sized_to_free_cores  # torch's threads: no more than the cores now free (issue 20)
    def __call__(
        self, updates: torch.Tensor, weights: torch.Tensor | None = None, **context: Any
    ) -> AggregationResult:
        """Validate the input, aggregate it and validate the output.

        Raises
        ------
        ValueError
            One line naming the problem, before any work or state change:
            bad shapes or non-finite updates, weights or context tensors
            (:func:`check_updates`, :func:`check_finite`), too few clients
            (:meth:`check`), missing context; after the rule: a non-finite
            aggregate or weights (the rule's state may then already have moved).
        """
        w = check_updates(updates, weights, name=self.name, finite=False)
        # Zero weights may skip rows inside BLAS, so only all-positive weights let
        # the output stand for the input.
        deferred = self.propagates_non_finite and bool((w > 0).all())
        if not deferred:
            check_finite(updates, "updates", self.name)
        self.check(updates.shape[0])
        missing = self.requires - context.keys()
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(sorted(missing))}")
        picked = {k: context[k] for k in self.requires | (self.uses & context.keys())}
        for key, value in picked.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                check_finite(value, key, name=self.name)
        result = self.aggregate(updates, w, **picked)
        # Finite input can still overflow inside a rule (float64 updates near
        # 1e154 square to inf): refuse rather than hand NaN to the model.
        for what, value in (("aggregate", result.aggregate), ("weights", result.weights)):
            if not all_finite(value):
                if deferred:
                    check_finite(updates, "updates", self.name)
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(
                    f"{self.name} produced {bad} non-finite {what} value(s) from finite "
                    f"input: the updates overflow {updates.dtype} inside the rule"
                )
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def all_finite(values: torch.Tensor) -> bool:
    """Whether every entry of ``values`` is finite, in one pass without temporaries.

    A sum is finite only if every entry is (NaN and +-inf propagate through
    addition), so a finite sum settles it in one vectorised reduction. A sum
    that is not finite may also come from finite entries near the dtype's
    maximum (an attacker's 1e38s); then ``torch.aminmax``, which propagates
    NaN and reaches +-inf, decides exactly. Neither allocates anything of the
    input's size. On the CPU, for [50, 1M] float32, the sum measured about 2x
    faster than ``aminmax`` and over 10x faster than
    ``torch.isfinite(values).all()``, which materialises boolean masks.
    """
    if values.numel() == 0 or not values.is_floating_point():
        return True
    if bool(torch.isfinite(values.sum())):
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(torch.stack((low, high))).all())  # one device sync


def _positions(mask: torch.Tensor, unit: str, limit: int = 8) -> str:
    """``"rows 1, 4"``: where ``mask`` [m] is true, the first ``limit`` of them."""
    found = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(str(i) for i in found[:limit]) + (", ..." if len(found) > limit else "")
    return f"{unit if len(found) == 1 else unit + 's'} {shown}"


def check_finite(values: torch.Tensor, what: str, name: str | None = None) -> None:
    """Raise ``ValueError("krum: updates contain 3 non-finite values (rows 1, 4)")``.

    The check is :func:`all_finite` (one pass); the count and the rows (first
    dimension; indices for a vector) are computed only when it fails.
    """
    if all_finite(values):
        return
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    where = _positions(bad, "index") if bad.ndim == 1 else _positions(bad.flatten(1).any(1), "row")
    prefix = f"{name}: " if name else ""
    verb = "contains" if values.ndim == 1 else "contain"
    plural = "" if count == 1 else "s"
    raise ValueError(f"{prefix}{what} {verb} {count} non-finite value{plural} ({where})")


def check_updates(
    updates: torch.Tensor,
    weights: torch.Tensor | None,
    name: str | None = None,
    *,
    finite: bool = True,
) -> torch.Tensor:
    """Validate a rule's inputs and return normalised weights [n].

    Parameters
    ----------
    updates : torch.Tensor
        Client updates [n, d], floating point, every entry finite.
    weights : torch.Tensor or None
        Per-client weights [n] (any real dtype), finite, >= 0, not all 0;
        ``None`` for equal weights.
    name : str or None
        Rule name that prefixes error messages.
    finite : bool
        Whether to scan ``updates`` for non-finite entries here (``Rule``
        defers the scan for rules with ``propagates_non_finite``).

    Returns
    -------
    torch.Tensor
        Weights [n] summing to 1, in the dtype of ``updates``. They are
        normalised in float64 after dividing by the largest weight, so the sum
        cannot overflow: weights 3 x 3e38 (whose float32 sum is inf) give equal
        thirds, not zeros, and so do 3 x 1.7e308 in float64.

    Raises
    ------
    ValueError
        One line naming the problem: ``updates`` not a non-empty floating
        [n, d] tensor or with non-finite entries (count and rows), ``weights``
        of the wrong shape, with non-finite or negative entries (rows), or all 0.
    """
    prefix = f"{name}: " if name else ""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(
            f"{prefix}updates must have shape [n, d] with n >= 1, got {tuple(updates.shape)}"
        )
    if not updates.is_floating_point():
        raise ValueError(f"{prefix}updates must be floating point, got {updates.dtype}")
    if finite:
        check_finite(updates, "updates", name)
    n = updates.shape[0]
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=updates.dtype, device=updates.device)
    if weights.shape != (n,):
        raise ValueError(
            f"{prefix}weights must have shape [{n}] to match updates, got {tuple(weights.shape)}"
        )
    # float64 first: a float64 count of 1e39 is finite, its float32 cast is not.
    w = weights.detach().to(dtype=torch.float64, device=updates.device)
    problem = None
    if not all_finite(w):
        bad = ~torch.isfinite(w)
        problem = f"{int(bad.sum())} non-finite ({_positions(bad, 'row')})"
    elif bool((w < 0).any()):
        bad = w < 0
        problem = f"{int(bad.sum())} negative ({_positions(bad, 'row')})"
    elif not bool((w > 0).any()):
        problem = "all are 0"
    if problem is not None:
        raise ValueError(f"{prefix}weights must be finite, non-negative and sum to > 0; {problem}")
    w = w / w.max()  # in [0, 1]: the sum below is at most n, whatever the scale
    return (w / w.sum()).to(updates.dtype)


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
    propagates_non_finite = True

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        return AggregationResult(aggregate=weighted_sum(weights, updates), weights=weights)


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Plain-function form of :class:`Mean`."""
    return Mean()(updates, weights)
