"""Norm-based robust rules: geometric median (RFA), centered clipping, norm bounding.

All three only need, besides weighted sums of the updates, Euclidean norms of
``x_i - v`` for some centre v. Those are computed in float64 over column
blocks, so temporaries stay at [n, block] whatever d is:

- the geometric median computes one [n, n] Gram matrix of the updates
  centred at a robust starting point, after which every Weiszfeld iteration
  costs O(n^2) and never touches the [n, d] updates again;
- centered clipping makes one pass for the norms and one for the weighted sum
  per clipping iteration;
- norm bounding makes one pass for the norms and one for the weighted sum.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedsec.aggregation.base import AggregationResult, Rule, column_blocks, require, weighted_sum
from fedsec.aggregation.coordinate import trimmed_coordinates

#: Elements of one [n, block] float64 temporary (2 MiB): blocks that stay in
#: cache and below the allocator's fresh-mapping threshold are several times
#: faster here than large ones.
NORM_BLOCK_ELEMENTS = 1 << 18


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def row_sq_distances(updates: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean norms ``||x_i - center||^2`` [n] in float64, over column blocks."""
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_blocks(n, d, NORM_BLOCK_ELEMENTS):
        block = updates[:, cols].to(torch.float64)  # the input itself when float64
        if center is None:
            out += block.square().sum(dim=1)
        else:
            out += (block - center[cols].to(torch.float64)).square_().sum(dim=1)
    return out


def centred_gram(updates: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Gram matrix of ``updates - center`` [n, n] in float64, over column blocks."""
    n, d = updates.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
    for cols in column_blocks(n, d, NORM_BLOCK_ELEMENTS):
        block = updates[:, cols].to(torch.float64) - center[cols].to(torch.float64)
        gram += block @ block.T
    return gram


def median_of(values: torch.Tensor) -> torch.Tensor:
    """Median of a 1-D tensor, the mean of the two middle values for even length."""
    ordered = torch.sort(values).values
    m = ordered.shape[0]
    return (ordered[(m - 1) // 2] + ordered[m // 2]) / 2


def _clip_scales(sq_norms: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """``min(1, bound / norm)`` in float64; 1 where the norm is 0 (or within the bound)."""
    norms = sq_norms.sqrt()
    bound_t = torch.as_tensor(bound, dtype=torch.float64, device=norms.device)
    scales = torch.where(norms > bound_t, bound_t / norms, torch.ones_like(norms))
    return scales


class GeometricMedian(Rule):
    """Geometric median by the smoothed Weiszfeld algorithm (RFA).

    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning",
    IEEE Transactions on Signal Processing, 2022.

    Approximates ``argmin_v sum_i alpha_i ||v - x_i||`` with the client
    weights as the alpha_i, by the smoothed Weiszfeld iteration
    ``beta_i = alpha_i / max(nu, ||v - x_i||)``, ``v = sum_i beta_i x_i /
    sum_i beta_i``, for at most ``iterations`` steps, stopping early once the
    objective changes by less than ``tol`` times its value (RFA's stopping
    rule). The returned weights are the final beta_i, normalised, so the
    aggregate is ``sum_i weights_i x_i``.

    The iteration starts from the coordinate-wise median by default: from
    the weighted mean (RFA's reference code, ``init="mean"``) a few huge
    outliers pull the start far away and the iterate approaches the honest
    points only by a factor of about f / (n - f) per step, so ten steps do not
    undo a 1e6-scale attack when f is close to n / 2. Distances come from one
    float64 Gram matrix of the updates centred at the start, so extra
    iterations are nearly free. Their error is about sqrt(float64 eps), 1.5e-8,
    of the updates' distances to the start (float32 resolution), also next to
    huge outliers; it shows only when the iterate closes in on a data point.

    RFA's stopping rule compares the change of the objective with the whole
    objective, which huge outliers dominate: against them it stops after a
    step or two, so the start matters. Set ``tol=0`` to run every iteration.

    The exact geometric median lies within ``r / (1 - 2a)`` of the centre of
    any ball of radius r that holds client weight ``1 - a > 1/2``: f < n/2
    arbitrary outliers move it by a bounded amount, though not necessarily
    into the honest clients' coordinate-wise range. Requires n > 2f.

    Parameters
    ----------
    iterations : int
        Maximum number of Weiszfeld steps, >= 1 (default 10).
    nu : float
        Smoothing: distances below nu count as nu (default 1e-6).
    tol : float
        Relative change of the objective that stops the iteration (default
        1e-6; with 0 only an unchanged objective stops it early).
    init : str
        Starting point: ``"median"`` (coordinate-wise median, default) or
        ``"mean"`` (weighted mean, as RFA's code).
    f : int
        Number of Byzantine clients the caller expects (default 0); only used
        to check n > 2f.
    """

    name = "geometric-median"

    def __init__(
        self,
        iterations: int = 10,
        nu: float = 1e-6,
        tol: float = 1e-6,
        init: str = "median",
        f: int = 0,
    ) -> None:
        self.iterations = _check_int(iterations, "iterations", 1)
        self.nu = _check_positive(nu, "nu")
        self.tol = _check_positive(tol, "tol", allow_zero=True)
        if init not in ("median", "mean"):
            raise ValueError(f"init must be 'median' or 'mean', got {init!r}")
        self.init = init
        self.f = _check_int(f, "f", 0)

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        n = updates.shape[0]
        if self.init == "median":
            center = trimmed_coordinates(updates, (n - 1) // 2).aggregate
        else:
            center = weighted_sum(weights, updates)
        gram = centred_gram(updates, center)
        alpha = weights.to(torch.float64)
        diagonal = gram.diagonal()

        def distances(coefficients: torch.Tensor) -> torch.Tensor:
            # v - center = sum_j c_j (x_j - center): ||x_i - v||^2 from the Gram matrix.
            projected = gram @ coefficients
            sq = diagonal - 2 * projected + coefficients @ projected
            return sq.clamp_(min=0).sqrt_()

        dist = diagonal.clamp(min=0).sqrt()  # v = center
        objective = float(alpha @ dist)
        beta = alpha
        for _ in range(self.iterations):
            beta = alpha / dist.clamp(min=self.nu)
            beta = beta / beta.sum()
            dist = distances(beta)
            previous, objective = objective, float(alpha @ dist)
            if abs(previous - objective) <= self.tol * objective:
                break
        out_weights = beta.to(updates.dtype)
        return AggregationResult(aggregate=weighted_sum(out_weights, updates), weights=out_weights)


class CenteredClipping(Rule):
    """Centered clipping around the previous round's aggregate.

    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021.

    Starting from v = the previous round's aggregate (zeros in the first
    round), repeat ``iterations`` times
    ``v <- v + sum_i w_i clip(x_i - v, tau)`` with
    ``clip(z, tau) = z * min(1, tau / ||z||)`` and w the client weights (the
    paper's uniform 1/n when clients are unweighted). The centre is kept
    across rounds (:meth:`state_dict`): the paper's history. A stored centre
    of another shape (the model changed) is dropped and the rule starts again
    from zeros; one of another dtype or device is converted. The returned
    weights are the effective weights of the last iteration,
    ``w_i * min(1, tau / ||x_i - v||)``, normalised. Tolerates f Byzantine
    clients for n > 2f.

    Parameters
    ----------
    tau : float
        Clipping radius, > 0 (default 10.0).
    iterations : int
        Clipping iterations per round, >= 1 (default 1, the paper's l = 1).
    f : int
        Number of Byzantine clients the caller expects (default 0); only used
        to check n > 2f.
    """

    name = "centered-clipping"

    def __init__(self, tau: float = 10.0, iterations: int = 1, f: int = 0) -> None:
        self.tau = _check_positive(tau, "tau")
        self.iterations = _check_int(iterations, "iterations", 1)
        self.f = _check_int(f, "f", 0)
        self._center: torch.Tensor | None = None

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        d = updates.shape[1]
        stored = self._center
        if stored is None or stored.shape != (d,):
            center = updates.new_zeros(d)
        else:
            center = stored.to(dtype=updates.dtype, device=updates.device)
        w = weights.to(torch.float64)
        effective = w
        for _ in range(self.iterations):
            scales = _clip_scales(row_sq_distances(updates, center), self.tau)
            effective = w * scales
            # v + sum_i e_i (x_i - v) = (1 - sum_i e_i) v + sum_i e_i x_i
            remainder = (1 - effective.sum()).to(updates.dtype)
            center = weighted_sum(effective, updates) + remainder * center
        self._center = center.detach().clone()
        total = effective.sum()
        out_weights = effective / total if total > 0 else w
        return AggregationResult(aggregate=center, weights=out_weights.to(updates.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self._center is None else {"center": self._center.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        center = state.get("center")
        self._center = None if center is None else center.detach().clone()


class NormBounding(Rule):
    """Weighted mean of the updates clipped to a norm bound.

    Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated
    Learning?", arXiv:1911.07963, 2019 (NeurIPS 2019 FL workshop).

    Each update is scaled by ``s_i = min(1, M / ||x_i||)`` so its norm is at
    most M, then the scaled updates are averaged with the client weights:
    ``sum_i w_i s_i x_i``. M is ``max_norm``, or with ``adaptive=True`` the
    median norm of this round's updates (mean of the two middle norms for
    even n). The returned weights are ``w_i * s_i`` normalised. Bounds the
    influence of each client (no exclusion); requires n >= 1.

    Parameters
    ----------
    max_norm : float
        Norm bound M, > 0 (default 1.0); ignored when ``adaptive``.
    adaptive : bool
        Use the median norm of the round's updates as the bound (default False).
    """

    name = "norm-bounding"

    def __init__(self, max_norm: float = 1.0, adaptive: bool = False) -> None:
        self.max_norm = _check_positive(max_norm, "max_norm")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {adaptive!r}")
        self.adaptive = adaptive

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        sq_norms = row_sq_distances(updates)
        bound: float | torch.Tensor = median_of(sq_norms.sqrt()) if self.adaptive else self.max_norm
        scales = _clip_scales(sq_norms, bound)
        effective = weights.to(torch.float64) * scales
        aggregate = weighted_sum(effective, updates)
        total = effective.sum()
        out_weights = effective / total if total > 0 else weights.to(torch.float64)
        return AggregationResult(aggregate=aggregate, weights=out_weights.to(updates.dtype))
