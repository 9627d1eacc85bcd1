"""The user's data: synthetic 8x8 pattern images, and a partitioner of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

PATTERNS = 4
SIZE = 8


def _patterns() -> npt.NDArray[np.float32]:
    """Horizontal stripes, vertical stripes, a diagonal and a checkerboard."""
    rows, cols = np.indices((SIZE, SIZE))
    return np.stack(
        [rows % 2 == 0, cols % 2 == 0, np.abs(rows - cols) <= 1, (rows + cols) % 2 == 0]
    ).astype(np.float32)


def stripes(data_dir: Path, seed: int) -> tuple[Any, Any, Any, Any]:
    """The data set factory fedsec calls: ``(data_dir, seed) -> (train_x, train_y, test_x, test_y)``.

    400 training and 100 test images of 4 noisy patterns, normalised to zero
    mean and unit variance; the same images for every seed (``seed`` picks
    nothing here), nothing read from ``data_dir``.
    """
    del data_dir, seed
    rng = np.random.default_rng(2024)
    labels = rng.integers(0, PATTERNS, size=500)
    images = _patterns()[labels] + rng.normal(0.0, 0.6, size=(500, SIZE, SIZE))
    x = ((images - images.mean()) / images.std()).astype(np.float32)[:, None]
    return x[:400], labels[:400], x[400:], labels[400:]


def blocks(
    labels: npt.NDArray[np.int64], num_partitions: int, *, seed: int, **_: Any
) -> list[npt.NDArray[np.int64]]:
    """The user's partitioner: a seeded shuffle cut into equal contiguous blocks."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(block) for block in np.array_split(order, num_partitions)]


def not_a_factory() -> str:
    """Returns a string, not data: fedsec must refuse it in one line."""
    return "nothing"
