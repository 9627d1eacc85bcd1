"""Split a training pool into client partitions (IID, Dirichlet label skew, shards).

The splitting itself is done by flwr-datasets' partitioners; this module feeds
them a two-column table (``label``, ``index``) and reads back each partition's
original indices. The ``index`` column matters: ``ShardPartitioner`` sorts the
table by label before cutting shards, so row positions in a partition do not
refer to the caller's array.

All partitions of one configuration are computed together and cached per
process, because simulated clients ask for their partition every round.

A config may name the user's own partitioner (``data.partition``): one
registered with :func:`fedsec.registry.register_partitioner`, or a dotted
``"package.module:function"`` that every process imports. It has the
signature of :class:`PartitionFn`; what it returns is checked (one array of
in-range, disjoint indices per partition).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from fedsec.data.datasets import SplitData
from fedsec.registry import Registry, dotted_callables

__all__ = [
    "PARTITIONERS",
    "PartitionFn",
    "client_dataset",
    "partition_indices",
]

_IndexArray = npt.NDArray[np.int64]


class PartitionFn(Protocol):
    """Signature of a registered partitioning method.

    Arguments are validated by :func:`partition_indices` before the call except
    the method-specific ones (``alpha``, ``shards_per_partition``), which the
    method checks itself.
    """

    def __call__(
        self,
        labels: _IndexArray,
        num_partitions: int,
        *,
        seed: int,
        alpha: float,
        shards_per_partition: int,
        min_partition_size: int,
    ) -> list[_IndexArray]:
        """Return one array of indices into ``labels`` per partition."""
        ...


PARTITIONERS: Registry[PartitionFn] = Registry("partitioner", dotted_callables("partitioner"))


def _label_table(labels: _IndexArray, order: _IndexArray | None = None) -> Any:
    """Build the ``datasets.Dataset`` the flwr-datasets partitioners work on."""
    # Imported lazily: `datasets` takes seconds to import and only this needs it.
    import datasets

    index = np.arange(len(labels), dtype=np.int64) if order is None else order
    return datasets.Dataset.from_dict({"label": labels[index], "index": index})


def _read_partitions(partitioner: Any, num_partitions: int) -> list[_IndexArray]:
    # The arrow format skips the per-row Python conversion of the default
    # format (several times faster on 60,000 rows).
    return [
        np.asarray(
            partitioner.load_partition(pid).with_format("arrow")["index"].to_numpy(),
            dtype=np.int64,
        )
        for pid in range(num_partitions)
    ]


@PARTITIONERS.register("iid")
def _iid(
    labels: _IndexArray,
    num_partitions: int,
    *,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
) -> list[_IndexArray]:
    """Shuffle, then cut into contiguous near-equal parts (sizes differ by <= 1)."""
    del alpha, shards_per_partition
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner takes contiguous shards and has no seed; shuffle first.
    order = np.random.default_rng(seed).permutation(len(labels)).astype(np.int64)
    smallest = len(labels) // num_partitions
    if smallest < min_partition_size:
        raise ValueError(
            f"iid partitioning of {len(labels)} samples into {num_partitions} "
            f"partitions gives {smallest} samples to the smallest, below "
            f"min_partition_size={min_partition_size}"
        )
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _label_table(labels, order)
    return _read_partitions(partitioner, num_partitions)


@PARTITIONERS.register("dirichlet")
def _dirichlet(
    labels: _IndexArray,
    num_partitions: int,
    *,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
) -> list[_IndexArray]:
    """Split each class over the partitions with proportions drawn from Dir(alpha).

    Uses ``self_balancing=False``, so the proportions are exactly the Dirichlet
    draws and ``alpha`` alone sets the heterogeneity (label and quantity skew);
    the balancing heuristic would cap partitions in a data-dependent way. A draw
    that leaves a partition below ``min_partition_size`` is redrawn (up to 10
    times by flwr-datasets).
    """
    del shards_per_partition
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    if min_partition_size * num_partitions > len(labels):
        raise ValueError(
            f"dirichlet partitioning cannot give each of {num_partitions} partitions "
            f"min_partition_size={min_partition_size} samples: only {len(labels)} "
            "samples"
        )
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = _label_table(labels)
    try:
        # Each redraw warns at length; the outcome is either a valid split or
        # the one-line error below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_partitions(partitioner, num_partitions)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        raise ValueError(
            f"dirichlet partitioning failed: 11 draws with alpha={alpha} all left a "
            f"partition of {len(labels)} samples over {num_partitions} partitions "
            f"below min_partition_size={min_partition_size}; raise alpha or lower "
            "min_partition_size or num_partitions"
        ) from None


@PARTITIONERS.register("shards")
def _shards(
    labels: _IndexArray,
    num_partitions: int,
    *,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
) -> list[_IndexArray]:
    """Sort by label, cut equal shards, deal ``shards_per_partition`` to each.

    Shard size is ``len(labels) // (num_partitions * shards_per_partition)``, so
    up to ``num_partitions * shards_per_partition - 1`` samples are left out. A
    shard spans two labels when it straddles a class boundary, so a partition
    holds at most ``2 * shards_per_partition`` labels (more only if a shard is
    larger than a whole class).
    """
    del alpha
    if shards_per_partition < 1:
        raise ValueError(f"shards_per_partition must be >= 1, got {shards_per_partition}")
    num_shards = num_partitions * shards_per_partition
    shard_size = len(labels) // num_shards
    if shard_size * shards_per_partition < max(min_partition_size, 1):
        raise ValueError(
            f"shards partitioning of {len(labels)} samples into {num_partitions} "
            f"partitions x {shards_per_partition} shards gives shards of "
            f"{shard_size} samples, so partitions of "
            f"{shard_size * shards_per_partition} < "
            f"min_partition_size={max(min_partition_size, 1)}"
        )
    from flwr_datasets.partitioner import ShardPartitioner

    partitioner = ShardPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_shards_per_partition=shards_per_partition,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = _label_table(labels)
    # pyarrow warns about a deprecated sort option that `datasets` passes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _read_partitions(partitioner, num_partitions)


def partition_indices(
    labels: np.ndarray[Any, Any],
    num_partitions: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_partition_size: int = 1,
) -> list[_IndexArray]:
    """Split sample indices into disjoint client partitions.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels of the training pool.
    num_partitions : int
        Number of partitions (clients), ``1 <= num_partitions <= len(labels)``.
    method : str
        Registered method: ``"iid"``, ``"dirichlet"`` or ``"shards"``, one
        registered by the user, or a dotted ``"package.module:function"``.
    seed : int
        Seed; the same arguments always give the same partitions.
    alpha : float, default 0.5
        Dirichlet concentration (``"dirichlet"`` only); smaller is more skewed.
    shards_per_partition : int, default 2
        Shards per partition (``"shards"`` only).
    min_partition_size : int, default 1
        Smallest allowed partition.

    Returns
    -------
    list of np.ndarray
        One read-only ``int64`` array of indices into ``labels`` per partition,
        in the partitioner's (shuffled) order. Partitions are disjoint; for
        ``"iid"`` and ``"dirichlet"`` they cover every index, for ``"shards"``
        a remainder smaller than the number of shards is left out.

    Raises
    ------
    UnknownNameError
        If ``method`` is not registered.
    ValueError
        On invalid arguments, or when no split satisfies ``min_partition_size``.
    """
    PARTITIONERS.get(method)  # unknown names fail here with the valid choices
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(f"num_partitions={num_partitions} is more than the {len(labels)} samples")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
    canonical = np.ascontiguousarray(labels, dtype=np.int64)
    cached = _partition_cached(
        canonical.tobytes(),
        method,
        num_partitions,
        seed,
        float(alpha),
        int(shards_per_partition),
        int(min_partition_size),
    )
    return list(cached)  # a new list, so callers cannot reorder the cached one


@functools.lru_cache(maxsize=32)
def _partition_cached(
    label_bytes: bytes,
    method: str,
    num_partitions: int,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
) -> tuple[_IndexArray, ...]:
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    parts = PARTITIONERS.get(method)(
        labels,
        num_partitions,
        seed=seed,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
        min_partition_size=min_partition_size,
    )
    if method not in _BUILT_IN:
        parts = _checked_user_partition(
            method, parts, len(labels), num_partitions, min_partition_size
        )
    for part in parts:
        part.flags.writeable = False  # shared by every caller of the cache
    return tuple(parts)


_BUILT_IN = ("iid", "dirichlet", "shards")


def _checked_user_partition(
    method: str, parts: Any, num_samples: int, num_partitions: int, min_size: int
) -> list[_IndexArray]:
    """A user's partitioner's output as int64 arrays, or a one-line ``ValueError``."""
    if not isinstance(parts, list | tuple) or len(parts) != num_partitions:
        got = len(parts) if isinstance(parts, list | tuple) else type(parts).__name__
        raise ValueError(
            f"partitioner '{method}' must return a list of {num_partitions} index arrays, got {got}"
        )
    out: list[_IndexArray] = []
    for pid, part in enumerate(parts):
        array = np.asarray(part)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(
                f"partitioner '{method}': partition {pid} is not a 1-D integer index array "
                f"(dtype {array.dtype}, shape {array.shape})"
            )
        if array.size and (array.min() < 0 or array.max() >= num_samples):
            raise ValueError(
                f"partitioner '{method}': partition {pid} has indices outside 0 .. "
                f"{num_samples - 1}"
            )
        if array.size < min_size:
            raise ValueError(
                f"partitioner '{method}': partition {pid} has {array.size} samples, below "
                f"min_partition_size={min_size}"
            )
        out.append(np.array(array, dtype=np.int64))
    joined = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
    if len(np.unique(joined)) != len(joined):
        raise ValueError(f"partitioner '{method}': partitions overlap (an index is used twice)")
    return out


def client_dataset(
    data: SplitData,
    partition_id: int,
    num_partitions: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one client's training partition, cached per process.

    Parameters
    ----------
    data : SplitData
        The loaded data set (from :func:`fedsec.data.load_dataset`); the cache
        is keyed on the object's identity, which ``load_dataset`` keeps stable.
    partition_id : int
        The client's partition, ``0 <= partition_id < num_partitions``.
    num_partitions : int
        Total number of partitions.
    method : str
        Partitioning method, see :func:`partition_indices`.
    seed : int
        Partitioning seed.
    alpha : float, default 0.5
        Dirichlet concentration.
    shards_per_partition : int, default 2
        Shards per partition for ``"shards"``.

    Returns
    -------
    x : torch.Tensor
        ``float32`` images ``[n, C, H, W]`` of the partition (a copy of the
        selected rows of ``data.train_x``).
    y : torch.Tensor
        ``int64`` labels ``[n]``.

    Notes
    -----
    Returned tensors are shared between calls with the same arguments; do not
    modify them in place.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id={partition_id} is out of range for num_partitions="
            f"{num_partitions} (valid: 0..{num_partitions - 1})"
        )
    return _client_dataset_cached(
        data,
        partition_id,
        num_partitions,
        method,
        seed,
        float(alpha),
        int(shards_per_partition),
    )


@functools.lru_cache(maxsize=256)
def _client_dataset_cached(
    data: SplitData,
    partition_id: int,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float,
    shards_per_partition: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = partition_indices(
        data.train_y.numpy(),
        num_partitions,
        method,
        seed=seed,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
    )
    # np.array copies: torch warns on (and cannot index with) read-only memory.
    index = torch.from_numpy(np.array(parts[partition_id], dtype=np.int64))
    return data.train_x[index], data.train_y[index]
