"""Coordinate-wise robust rules: the coordinate median and the trimmed mean.

Both rules look at each coordinate on its own: sort the n client values,
drop the k smallest and the k largest, and average what is left. The median
is the case k = (n - 1) // 2 (one middle value for odd n, the mean of the two
middle values for even n, as NumPy's ``median``). Client weights play no part
in the aggregate, as in Flower's ``aggregate_median`` and
``aggregate_trimmed_avg``.

The work is done over column blocks. On the CPU, each block is transposed to
[block, n] and sorted along its contiguous rows by NumPy (whose float sorts
use SIMD sorting networks, several times faster than ``torch.sort`` on short
rows), and the same pass counts, on the block still in cache, how many of each
client's values were kept (NumPy, about 4x faster than torch's comparisons on
one thread). The blocks run in a few threads (NumPy releases the GIL), as many
as there are cores free (:func:`fedsec.cores.threads`): a server shares its
cores, and a pool sized to the machine's core count loses to the
single-threaded path when other processes keep them busy (issue 20: 0.43-1.19x
Flower's speed with two threads, against 3.4-5.6x with one). Block boundaries
do not depend on the thread count, nor do the results (bit for bit). Elsewhere
(GPU, half precision) ``torch.sort`` does the same job. Temporaries stay at a
few block-sized arrays plus three [d] vectors, whatever n x d is.

The returned weights are the share of coordinates at which each client's
value entered the aggregate. When equal values straddle a cut (say two
clients share the smallest kept value but only one of them was kept), the
kept slots are split evenly between the clients holding that value, so the
weights do not depend on the order of the clients.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from fedsec.aggregation.base import AggregationResult, Rule, column_blocks, require
from fedsec.cores import sized_to_free_cores, threads

#: Elements of one [block, n] sorting block on the CPU (512 KiB at float32):
#: small enough to stay in cache while NumPy sorts it.
SORT_BLOCK_ELEMENTS = 1 << 17

#: Elements of one [n, block] temporary when counting which clients entered.
COUNT_BLOCK_ELEMENTS = 1 << 18

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _check_f(f: int, name: str = "f") -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {f!r}")
    return f


def _numpy_summaries(
    updates: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trimmed means, lowest and highest kept values, boundary ties, kept counts [n].

    NumPy sorts each [block, n] column block and counts, per client, the values
    in [lowest kept, highest kept] (ties at the cuts are settled later). Counts
    are integers, so their sum is exact in any order: the result is the same
    for any number of threads.
    """
    n, d = updates.shape
    source = updates.numpy()
    dtype = _NUMPY_DTYPES[updates.dtype]
    out = np.empty(d, dtype=dtype)
    low = np.empty(d, dtype=dtype)
    high = np.empty(d, dtype=dtype)
    ties = np.zeros(d, dtype=bool)
    kept = n - 2 * k
    blocks = list(column_blocks(n, d, SORT_BLOCK_ELEMENTS))
    counts = np.zeros((len(blocks), n), dtype=np.int64)

    def work(index: int) -> None:
        cols = blocks[index]
        block = source[:, cols]  # [n, block] view
        # A copy even when the transposed view is already contiguous (n or the
        # block of width 1): the sort is in place.
        rows = np.array(block.T, order="C", copy=True)  # [block, n]
        rows.sort(axis=1)
        out[cols] = rows[:, k : n - k].sum(axis=1, dtype=np.float64) / kept
        lo, hi = rows[:, k], rows[:, n - k - 1]
        low[cols] = lo
        high[cols] = hi
        if k > 0:
            ties[cols] = (rows[:, k - 1] == lo) | (hi == rows[:, n - k])
            inside = block >= lo
            inside &= block <= hi
            counts[index] = inside.sum(axis=1)

    # Capped by torch's setting: trimmed_coordinates has sized it to the free cores.
    workers = threads(work=len(blocks), cap=torch.get_num_threads())
    if workers == 1:
        for index in range(len(blocks)):
            work(index)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(work, range(len(blocks))):
                pass
    return (
        torch.from_numpy(out),
        torch.from_numpy(low),
        torch.from_numpy(high),
        torch.from_numpy(ties),
        torch.from_numpy(counts.sum(axis=0).astype(np.float64)),
    )


def _torch_summaries(
    updates: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same as :func:`_numpy_summaries` with ``torch.sort`` (GPU, other dtypes)."""
    n, d = updates.shape
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    low = torch.empty_like(out)
    high = torch.empty_like(out)
    ties = torch.zeros(d, dtype=torch.bool, device=updates.device)
    kept = n - 2 * k
    accumulate = torch.float64 if updates.device.type == "cpu" else torch.float32
    for cols in column_blocks(n, d):
        rows = torch.sort(updates[:, cols], dim=0).values  # [n, block]
        middle = rows[k : n - k].to(accumulate).sum(dim=0) / kept
        out[cols] = middle.to(updates.dtype)
        low[cols] = rows[k]
        high[cols] = rows[n - k - 1]
        if k > 0:
            ties[cols] = (rows[k - 1] == rows[k]) | (rows[n - k - 1] == rows[n - k])
    return out, low, high, ties


def _tie_shares(block: torch.Tensor, low: torch.Tensor, high: torch.Tensor, k: int) -> torch.Tensor:
    """Exact per-client shares [n] over columns whose cuts fall inside runs of ties.

    In a column, the clients holding value v fill sorted positions
    [#(x < v), #(x <= v)); the kept positions are [k, n - k). The kept slots
    holding v are split evenly between the clients holding v.
    """
    n = block.shape[0]
    counts = block.new_zeros(n, dtype=torch.float64)
    inner = ((block > low) & (block < high)).sum(dim=1, dtype=torch.float64)
    counts += inner
    for value, distinct in ((low, None), (high, high != low)):
        equal = block == value
        below = (block < value).sum(dim=0)
        at_most = below + equal.sum(dim=0)
        slots = (torch.clamp(at_most, max=n - k) - torch.clamp(below, min=k)).clamp(min=0)
        share = slots.to(torch.float64) / equal.sum(dim=0).clamp(min=1)
        if distinct is not None:
            share = share * distinct
        counts += (equal.to(torch.float64) * share).sum(dim=1)
    return counts


@sized_to_free_cores
def trimmed_coordinates(
    updates: torch.Tensor, k: int, use_numpy: bool | None = None
) -> AggregationResult:
    """Coordinate-wise mean after cutting the k smallest and k largest values.

    Parameters
    ----------
    updates : torch.Tensor
        Updates [n, d], n > 2k. Not modified.
    k : int
        Values cut from each side of every coordinate; ``(n - 1) // 2`` gives
        the median.
    use_numpy : bool or None
        Sort with NumPy (CPU float32/float64 only) or with ``torch.sort``;
        ``None`` picks NumPy where it can.

    Returns
    -------
    AggregationResult
        The trimmed means [d] (summed in float64 on the CPU, returned in the
        input dtype) and each client's share of the kept values [n].

    Notes
    -----
    Runs with as many threads (NumPy's block pool and torch's intra-op
    threads) as there are cores free, see :mod:`fedsec.cores`; the result does
    not depend on their number.
    """
    n, d = updates.shape
    if not 0 <= 2 * k < n:
        raise ValueError(f"need n > 2k, got n={n}, k={k}")
    numpy_ok = updates.device.type == "cpu" and updates.dtype in _NUMPY_DTYPES
    if use_numpy is None:
        use_numpy = numpy_ok
    if use_numpy and not numpy_ok:
        raise ValueError(f"NumPy sorting needs CPU float32/float64, got {updates.dtype}")
    source = updates.detach()
    if use_numpy:  # NumPy views any strided tensor: no contiguous copy needed
        out, low, high, ties, counts = _numpy_summaries(source, k)
    else:
        out, low, high, ties = _torch_summaries(source, k)
        counts = torch.zeros(n, dtype=torch.float64, device=updates.device)
        if k > 0:
            for cols in column_blocks(n, d, COUNT_BLOCK_ELEMENTS):
                block = source[:, cols]
                kept = (block >= low[cols]) & (block <= high[cols])
                counts += kept.sum(dim=1, dtype=torch.float64)

    if k == 0:
        counts = torch.full((n,), float(d), dtype=torch.float64, device=updates.device)
    else:
        tied = torch.nonzero(ties).squeeze(1)
        if tied.numel() > 0:
            step = max(1, COUNT_BLOCK_ELEMENTS // n)
            for start in range(0, tied.numel(), step):
                index = tied[start : start + step]
                block = source.index_select(1, index)
                lo, hi = low[index], high[index]
                counts -= ((block >= lo) & (block <= hi)).sum(dim=1, dtype=torch.float64)
                counts += _tie_shares(block, lo, hi, k)
    weights = (counts / counts.sum()).to(updates.dtype)
    return AggregationResult(aggregate=out, weights=weights)


class CoordinateMedian(Rule):
    """Coordinate-wise median of the updates.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018.

    Each coordinate of the aggregate is the median of the n client values
    (for even n the mean of the two middle values, as ``np.median`` and
    Flower's ``aggregate_median``). Unweighted: client weights do not enter
    the aggregate. The returned weights are each client's share of the
    coordinates where its value was (one of) the median value(s). Tolerates
    f Byzantine clients for n > 2f.

    Parameters
    ----------
    f : int
        Number of Byzantine clients the caller expects (default 0); only used
        to check n > 2f.
    """

    name = "median"

    def __init__(self, f: int = 0) -> None:
        self.f = _check_f(f)

    def check(self, n: int) -> None:
        super().check(n)
        require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        return trimmed_coordinates(updates, (updates.shape[0] - 1) // 2)


class TrimmedMean(Rule):
    """Coordinate-wise trimmed mean of the updates.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018.

    Each coordinate of the aggregate is the mean of the n client values after
    removing the k smallest and the k largest, with k = int(beta * n) (as
    ``scipy.stats.trim_mean`` and Flower's ``aggregate_trimmed_avg``) or
    k = f when ``f`` is given. Unweighted: client weights do not enter the
    aggregate. The returned weights are each client's share of the kept
    values. Tolerates up to k Byzantine clients; requires n > 2k.

    Parameters
    ----------
    beta : float
        Fraction cut from each side, in [0, 0.5) (default 0.1).
    f : int or None
        If given, cut exactly f values from each side (overrides ``beta``).
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.1, f: int | None = None) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ValueError(f"beta must be a number in [0, 0.5), got {beta!r}")
        self.beta = float(beta)
        self.f = None if f is None else _check_f(f)

    def cut(self, n: int) -> int:
        """Values cut from each side of a coordinate when there are n clients."""
        return self.f if self.f is not None else int(self.beta * n)

    def check(self, n: int) -> None:
        super().check(n)
        if self.f is not None:
            require(self.name, n > 2 * self.f, "n > 2f", n=n, f=self.f)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        return trimmed_coordinates(updates, self.cut(updates.shape[0]))
