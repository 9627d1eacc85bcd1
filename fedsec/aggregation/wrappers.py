"""Pre-aggregation wrappers: transform the updates, then apply any inner rule.

A wrapper is itself a :class:`~fedsec.aggregation.base.Rule` holding the
inner rule, so wrappers compose (``Bucketing(NearestNeighborMixing(Krum()))``)
and the strategy treats them like any rule. Each maps the n client updates to
m rows as a linear mixing ``M @ updates`` (M: [m, n], rows summing to 1),
applies the inner rule to the rows, and reports per-client weights
``inner_weights @ M``: for an inner rule that is linear in its rows (mean,
Multi-Krum's average, FLTrust's weighted sum) these are the clients' exact
shares of the aggregate; for coordinate-wise rules they are the inner rule's
coordinate shares spread over the clients mixed into each row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedsec.aggregation.base import AggregationResult, Rule, pairwise_sq_distances, require
from fedsec.params import prefixed, unprefixed


def _non_negative_int(rule: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{rule}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _inner_rule(rule: str, inner: Any) -> Rule:
    if not isinstance(inner, Rule):
        raise ValueError(f"{rule}: inner must be an aggregation Rule, got {inner!r}")
    return inner


def _round_generator(seed: int, counter: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, counter)`` by numpy's SeedSequence."""
    mixed = np.random.SeedSequence([seed, counter]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed))


class Bucketing(Rule):
    """Bucketing: apply the inner rule to means of random buckets of s clients.

    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", ICLR 2022. Each call draws a random permutation of
    the n clients, splits it into ``ceil(n / s)`` buckets of s consecutive
    clients (the last may be smaller), averages each bucket and hands the
    bucket means to the inner rule. Averaging reduces the heterogeneity the
    inner rule sees; a Byzantine client spoils only its own bucket, so at most
    f of the ``ceil(n / s)`` bucket means are bad (the paper picks s so that
    this fraction stays below the inner rule's breakdown point).

    Requirement: whatever the inner rule needs for ``ceil(n / s)`` rows
    (:meth:`check` delegates with that number).

    Parameters
    ----------
    inner : Rule
        The rule applied to the bucket means. It must not need ``client_ids``
        (a bucket is not a client, e.g. FoolsGold cannot be wrapped).
    s : int
        Bucket size (paper: 2). s = 1 only permutes the clients.
    seed : int
        Seed of the permutations; call t uses a generator seeded from
        ``(seed, t)``, and t is part of the state (with the inner rule's state
        under the prefix ``inner.``).

    Notes
    -----
    * A bucket's mean is the mean of its members weighted by their (example)
      weights, and its weight for the inner rule is the sum of its members'
      weights; the paper's plain mean is the case of equal weights. A bucket
      whose members all have weight 0 gets their plain mean and weight 0.
    * Per-client weights: the inner rule's weight of the bucket, split among
      the members in proportion to their weights (``inner_weights @ M``).
    * Extra memory: the [ceil(n / s), d] bucket means.
    """

    name = "bucketing"

    def __init__(self, inner: Rule, s: int = 2, seed: int = 0) -> None:
        self.inner = _inner_rule(self.name, inner)
        if "client_ids" in inner.requires:
            raise ValueError(
                f"bucketing cannot wrap {inner.name}: it needs client_ids, "
                "and buckets are not clients"
            )
        self.s = _non_negative_int(self.name, "s", s, minimum=1)
        self.seed = _non_negative_int(self.name, "seed", seed)
        self._counter = 0

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's context keywords, passed through."""
        return self.inner.requires

    @property
    def uses(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's optional context but ``client_ids`` (buckets are not clients)."""
        return self.inner.uses - {"client_ids"}

    def buckets(self, n: int) -> int:
        """Number of buckets for n clients."""
        return math.ceil(n / self.s)

    def check(self, n: int) -> None:
        super().check(n)
        self.inner.check(self.buckets(n))

    def permutation(self, n: int) -> torch.Tensor:
        """This call's random order of the n clients (advances the call counter)."""
        permutation = torch.randperm(n, generator=_round_generator(self.seed, self._counter))
        self._counter += 1
        return permutation

    def membership(self, permutation: torch.Tensor) -> torch.Tensor:
        """0/1 matrix [buckets, n] in float64: which clients form which bucket.

        ``permutation[k]`` is the client at position k; positions
        ``b*s .. b*s + s - 1`` form bucket b.
        """
        n = permutation.shape[0]
        bucket_of = torch.empty(n, dtype=torch.int64)
        bucket_of[permutation] = torch.arange(n) // self.s
        members = torch.zeros(self.buckets(n), n, dtype=torch.float64)
        members[bucket_of, torch.arange(n)] = 1.0
        return members

    def mixing_matrix(self, members: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """M [buckets, n] in float64: bucket b's mean is ``M[b] @ updates``."""
        mixing = members * weights.to(torch.float64)[None, :]
        mixing = torch.where(mixing.sum(dim=1, keepdim=True) > 0, mixing, members)
        return mixing / mixing.sum(dim=1, keepdim=True)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        members = self.membership(self.permutation(updates.shape[0])).to(updates.device)
        mixing = self.mixing_matrix(members, weights)
        bucket_weights = members @ weights.to(torch.float64)
        means = mixing.to(updates.dtype) @ updates
        result = self.inner(means, bucket_weights.to(updates.dtype), **context)
        client_weights = result.weights.to(torch.float64) @ mixing
        return AggregationResult(
            aggregate=result.aggregate, weights=client_weights.to(updates.dtype)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The call counter, and the inner rule's state under ``inner.``."""
        state = {"counter": torch.tensor(self._counter, dtype=torch.int64)}
        state.update(prefixed(self.inner.state_dict(), "inner."))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._counter = int(state["counter"])
        self.inner.load_state_dict(unprefixed(state, "inner."))


class NearestNeighborMixing(Rule):
    """NNM: replace each update by the mean of its n - f nearest neighbours.

    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing:
    A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023. For
    each client i, ``N_i`` is the set of the n - f updates closest to x_i in
    Euclidean distance (x_i itself included); x_i is replaced by the plain mean
    of ``N_i``, then the inner rule aggregates the mixed updates with the
    original client weights. Mixing makes the honest clients' mixed updates
    close to each other, which lets rules such as Krum, median or trimmed mean
    reach the optimal error under heterogeneity.

    Requires n > 2f (the paper's standing assumption f < n / 2), plus the inner
    rule's own requirement on n.

    Parameters
    ----------
    inner : Rule
        The rule applied to the mixed updates.
    f : int
        Assumed number of Byzantine clients (each update mixes n - f others).

    Notes
    -----
    * The neighbourhood mean is unweighted, as in the paper; the clients'
      weights go to the inner rule unchanged.
    * Per-client weights are ``inner_weights @ M`` with M the [n, n] mixing
      matrix (rows sum to 1): exact contributions for linear inner rules.
    * Ties in distance are broken arbitrarily (by ``torch.topk``), except that
      a client always counts itself.
    * Extra memory: the [n, d] mixed updates (one matmul ``M @ updates``), i.e.
      as much as the input; the state is the inner rule's, passed through.
    """

    name = "nnm"

    def __init__(self, inner: Rule, f: int = 1) -> None:
        self.inner = _inner_rule(self.name, inner)
        self.f = _non_negative_int(self.name, "f", f)

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's context keywords, passed through."""
        return self.inner.requires

    @property
    def uses(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's optional context keywords, passed through."""
        return self.inner.uses

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)
        self.inner.check(n)

    def mixing_matrix(self, updates: torch.Tensor) -> torch.Tensor:
        """M [n, n] in float64: ``M[i, j] = 1 / (n - f)`` for j among i's n - f nearest."""
        n = updates.shape[0]
        k = n - self.f
        distances = pairwise_sq_distances(updates).fill_diagonal_(-1.0)
        nearest = torch.topk(distances, k, dim=1, largest=False).indices
        mixing = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
        return mixing.scatter_(1, nearest, 1.0 / k)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        mixing = self.mixing_matrix(updates)
        mixed = mixing.to(updates.dtype) @ updates
        result = self.inner(mixed, weights, **context)
        del mixed
        client_weights = result.weights.to(torch.float64) @ mixing
        return AggregationResult(
            aggregate=result.aggregate, weights=client_weights.to(updates.dtype)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner rule's state, unchanged."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)
