"""Divide-and-Conquer (DnC): spectral outlier filtering on coordinate subsamples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsec.aggregation.base import AggregationResult, Rule, require, weighted_sum


def sample_coordinates(d: int, b: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random set of ``min(b, d)`` distinct coordinates of ``range(d)``.

    Sparse subsets (4b <= d) take the first b distinct values of a stream of
    uniform draws, which costs O(b) instead of the O(d) of a permutation
    (``randperm`` of 10M takes about 0.5 s here); denser ones cut a
    permutation. Deterministic given the generator's state.

    Parameters
    ----------
    d : int
        Number of coordinates.
    b : int
        Subset size (capped at d).
    generator : torch.Generator
        CPU generator the draws come from.

    Returns
    -------
    torch.Tensor
        Sorted int64 indices [min(b, d)] on the CPU.
    """
    if b >= d:
        return torch.arange(d)
    if 4 * b > d:
        return torch.sort(torch.randperm(d, generator=generator)[:b]).values
    draws = torch.empty(0, dtype=torch.int64)
    distinct = 0
    while distinct < b:
        extra = torch.randint(0, d, (b - distinct + b // 8 + 16,), generator=generator)
        draws = torch.cat([draws, extra])
        values, inverse = torch.unique(draws, return_inverse=True)
        distinct = values.numel()
    # The first b distinct values in order of appearance: a uniform b-subset.
    first = torch.full((distinct,), draws.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    return torch.sort(values[torch.sort(first).indices[:b]]).values


def dnc_kept(updates: torch.Tensor, coordinates: torch.Tensor, keep: int) -> torch.Tensor:
    """One DnC iteration on given coordinates: the ``keep`` least outlying updates.

    The sub-sampled updates are centred on their (unweighted) mean; the
    outlier score of each is its squared projection on the top right singular
    vector of the centred matrix (computed in float64, through the equivalent
    eigenproblem of its [n, n] Gram matrix).

    Parameters
    ----------
    updates : torch.Tensor
        [n, d] updates.
    coordinates : torch.Tensor
        int64 indices of the sub-sampled coordinates.
    keep : int
        Number of updates kept: the lowest scores (ties: lower index first).

    Returns
    -------
    torch.Tensor
        bool mask [n] of the kept updates.
    """
    sub = updates.index_select(1, coordinates.to(updates.device)).to(torch.float64)
    centred = sub - sub.mean(dim=0)
    # With C = U S V^T, the projection of row i on the top right singular
    # vector is (C v)_i = s u_i, so its square is the top eigenvalue of the
    # [n, n] Gram matrix C C^T times the square of its eigenvector's entry i:
    # an n x n eigenproblem instead of an SVD of [n, b]. NumPy's eigh: torch's
    # multi-threaded one takes ~60 ms instead of ~0.3 ms on busy 2-core hosts.
    gram = (centred @ centred.T).cpu().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    top = max(float(eigenvalues[-1]), 0.0) * eigenvectors[:, -1] ** 2
    scores = torch.from_numpy(top).to(updates.device)
    kept = torch.zeros(updates.shape[0], dtype=torch.bool, device=updates.device)
    kept[torch.sort(scores, stable=True).indices[:keep]] = True
    return kept


def dnc_good_set(
    updates: torch.Tensor, subsamples: Sequence[torch.Tensor], keep: int
) -> torch.Tensor:
    """DnC's good set: the updates kept by every iteration.

    If no update is kept by all iterations (possible for several iterations
    when ``keep`` is close to n/2), those kept by the most iterations are
    used instead, so the set is never empty.

    Parameters
    ----------
    updates : torch.Tensor
        [n, d] updates.
    subsamples : sequence of torch.Tensor
        One coordinate index set per iteration (see :func:`sample_coordinates`).
    keep : int
        Number of updates kept per iteration.

    Returns
    -------
    torch.Tensor
        bool mask [n] of the good set.
    """
    votes = torch.zeros(updates.shape[0], dtype=torch.int64, device=updates.device)
    for coordinates in subsamples:
        votes += dnc_kept(updates, coordinates, keep)
    return votes == votes.max()


class DivideAndConquer(Rule):
    """Divide-and-Conquer: drop the outliers along the top singular direction.

    Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS 2021
    (Algorithm 3).

    Each of ``niters`` iterations samples ``subsample_dim`` coordinates
    uniformly without replacement, centres the sub-sampled updates on their
    mean, scores each by its squared projection on the top right singular
    vector and keeps the n - floor(c f) lowest scores. The good set is the
    intersection over iterations (the clients kept most often if it is
    empty); the output is their mean with client weights renormalised over
    the good set (uniform if those weights are all 0). Returned weights are
    those renormalised weights, 0 outside the good set.

    The subsamples come from a generator seeded with (``seed``, number of
    previous calls), so runs are reproducible; the call count is the rule's
    state (:meth:`state_dict`). :meth:`subsamples` gives the coordinates the
    next call will use.

    Requires n > 2f (an honest majority, the paper's threat model) and
    n > floor(c f) so that something is kept.

    Parameters
    ----------
    f : int
        Number of Byzantine clients tolerated (default 1).
    subsample_dim : int
        Coordinates per iteration, b (default 10000, as in the paper; capped at d).
    niters : int
        Iterations (default 5; each costs one gather of [n, b] and one SVD).
    c : float
        Filtering fraction: floor(c f) updates are removed per iteration (default 1.0).
    seed : int
        Seed of the coordinate subsamples (default 0).
    """

    name = "dnc"

    def __init__(
        self,
        f: int = 1,
        subsample_dim: int = 10_000,
        niters: int = 5,
        c: float = 1.0,
        seed: int = 0,
    ) -> None:
        for label, value, low in (
            ("f", f, 0),
            ("subsample_dim", subsample_dim, 1),
            ("niters", niters, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 0:
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        self.f = f
        self.subsample_dim = subsample_dim
        self.niters = niters
        self.c = float(c)
        self.seed = seed
        self._calls = 0

    @property
    def removed(self) -> int:
        """Updates removed per iteration: floor(c f)."""
        return math.floor(self.c * self.f + 1e-9)

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)
        require(self.name, n > self.removed, "n > floor(c*f)", n=n, removed=self.removed)

    def subsamples(self, d: int) -> list[torch.Tensor]:
        """The coordinate subsamples (one per iteration) of the next call on d coordinates."""
        state = np.random.SeedSequence([self.seed, self._calls]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return [sample_coordinates(d, self.subsample_dim, generator) for _ in range(self.niters)]

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        n, d = updates.shape
        subsamples = self.subsamples(d)
        self._calls += 1
        good = dnc_good_set(updates, subsamples, n - self.removed).to(weights.dtype)
        selected = weights * good
        total = selected.sum()
        selected = selected / total if total > 0 else good / good.sum()
        return AggregationResult(aggregate=weighted_sum(selected, updates), weights=selected)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self._calls, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._calls = int(state["calls"])
