"""Local data sets and client partitioning; nothing here touches the network."""

from fedsec.data.datasets import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    SplitData,
    load_dataset,
    pixel_bounds,
)
from fedsec.data.partition import (
    PARTITIONERS,
    PartitionFn,
    client_dataset,
    partition_indices,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "PartitionFn",
    "SplitData",
    "client_dataset",
    "load_dataset",
    "partition_indices",
    "pixel_bounds",
]
