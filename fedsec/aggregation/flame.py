"""FLAME: cluster out backdoor updates, clip to the median norm, add noise."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedsec.aggregation.base import AggregationResult, Rule, dot_products, require, weighted_sum


def round_generator(seed: int, counter: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, counter)`` by numpy's SeedSequence.

    Each call of a randomised rule uses the next counter, so a rule restored
    with the counter from its state continues with the same random stream.
    """
    mixed = np.random.SeedSequence([seed, counter]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed))


def _non_negative_int(rule: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{rule}: {name} must be a non-negative integer, got {value!r}")
    return value


class Flame(Rule):
    """FLAME: HDBSCAN on cosine distances, median-norm clipping, Gaussian noise.

    Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX
    Security 2022. Each round:

    1. Cosine distances ``1 - cos(x_i, x_j)`` between the updates ([n, n] from
       blocked float64 dot products).
    2. HDBSCAN (scikit-learn, ``metric="precomputed"``, ``min_cluster_size =
       n // 2 + 1``, ``min_samples = 1``, ``allow_single_cluster=True``); the
       largest cluster is kept, every other client (other clusters and noise)
       is excluded.
    3. ``S_t`` = median L2 norm of all n updates (mean of the two middle
       values for even n); each kept update is scaled by ``min(1, S_t / ||x_i||)``.
    4. The plain mean of the clipped kept updates, plus Gaussian noise with
       standard deviation ``noise_lambda * S_t`` per coordinate.

    Requires n >= 2 (clustering needs pairs); the guarantee assumes fewer than
    n / 2 malicious clients, checked as n > 2f when ``f`` is given.

    Parameters
    ----------
    noise_lambda : float
        Noise level relative to the clipping bound (paper: 0.001 for image
        classification, 0.01 for NLP). 0 disables the noise.
    seed : int
        Seed of the noise; round t uses a generator seeded from ``(seed, t)``.
    min_cluster_size : int or None
        HDBSCAN's minimum cluster size; None means ``n // 2 + 1`` (the paper's
        choice, so the kept cluster is a majority).
    f : int or None
        Assumed number of malicious clients, only to check n > 2f.

    Notes
    -----
    * The paper clusters the local models ``W_i``; we cluster the updates
      ``x_i = W_i - G`` (all clients start from the same global model G). The
      clipping and the noise are the paper's, whose norms are already those of
      ``W_i - G``; the noised mean update, added to G, is the paper's noised
      model.
    * The mean is unweighted as in the paper: the clients' example weights are
      ignored. ``AggregationResult.weights`` is ``1 / |kept|`` for kept clients
      (the clipping factors are not folded in).
    * If HDBSCAN labels every client as noise, all clients are kept.
    * The noise is drawn on the CPU in the updates' dtype and moved to their
      device, so a run is reproducible across devices; the round counter is the
      rule's state.
    """

    name = "flame"

    def __init__(
        self,
        noise_lambda: float = 0.001,
        seed: int = 0,
        min_cluster_size: int | None = None,
        f: int | None = None,
    ) -> None:
        if (
            isinstance(noise_lambda, bool)
            or not isinstance(noise_lambda, int | float)
            or not math.isfinite(noise_lambda)
            or noise_lambda < 0
        ):
            raise ValueError(
                f"flame: noise_lambda must be a non-negative number, got {noise_lambda!r}"
            )
        self.noise_lambda = float(noise_lambda)
        self.seed = _non_negative_int(self.name, "seed", seed)
        if min_cluster_size is not None and (
            isinstance(min_cluster_size, bool)
            or not isinstance(min_cluster_size, int)
            or min_cluster_size < 2
        ):
            raise ValueError(
                f"flame: min_cluster_size must be an integer >= 2 or None, got {min_cluster_size!r}"
            )
        self.min_cluster_size = min_cluster_size
        self.f = None if f is None else _non_negative_int(self.name, "f", f)
        self._counter = 0

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n >= 2, "n >= 2", n=n)
        if self.f is not None:
            require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)
        if self.min_cluster_size is not None:
            require(
                self.name,
                n >= self.min_cluster_size,
                "n >= min_cluster_size",
                n=n,
                min_cluster_size=self.min_cluster_size,
            )

    def cluster(self, gram: torch.Tensor) -> torch.Tensor:
        """Boolean mask [n] of the clients in the largest HDBSCAN cluster."""
        from sklearn.cluster import HDBSCAN

        n = gram.shape[0]
        norms = gram.diagonal().clamp(min=0).sqrt()
        denominator = norms[:, None] * norms[None, :]
        positive = denominator > 0
        cosine = torch.where(positive, gram / torch.where(positive, denominator, 1.0), 0.0)
        distances = (1 - cosine).clamp(min=0).fill_diagonal_(0).cpu().numpy()
        size = self.min_cluster_size if self.min_cluster_size is not None else n // 2 + 1
        labels = (
            HDBSCAN(
                min_cluster_size=size,
                min_samples=1,
                metric="precomputed",
                allow_single_cluster=True,
                copy=True,
            )
            .fit(distances)
            .labels_
        )
        clustered = labels[labels >= 0]
        if clustered.size == 0:
            return torch.ones(n, dtype=torch.bool, device=gram.device)
        largest = int(np.bincount(clustered).argmax())
        return torch.from_numpy(labels == largest).to(gram.device)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        d = updates.shape[1]
        gram = dot_products(updates)
        kept = self.cluster(gram)
        norms = gram.diagonal().clamp(min=0).sqrt()
        bound = torch.quantile(norms, 0.5)
        scale = torch.where(norms > bound, bound / torch.where(norms > 0, norms, 1.0), 1.0)
        share = kept.to(torch.float64) / kept.sum()
        aggregate = weighted_sum(share * scale, updates)
        generator = round_generator(self.seed, self._counter)
        self._counter += 1
        if self.noise_lambda > 0:
            noise = torch.randn(d, generator=generator, dtype=updates.dtype)
            aggregate.add_(noise.to(updates.device), alpha=self.noise_lambda * float(bound))
        return AggregationResult(aggregate=aggregate, weights=share.to(updates.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The round counter of the noise generator."""
        return {"counter": torch.tensor(self._counter, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._counter = int(state["counter"])
