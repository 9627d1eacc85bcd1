"""Writers of tiny on-disk data sets in torchvision's layout, for tests.

The images are learnable (a bright 4x4 block whose position encodes the label,
plus noise), so tests that train a model on them can expect the loss to drop.
Labels cycle through 0..9, so every class is present once there are 10 samples.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def idx_bytes(array: npt.NDArray[np.uint8]) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0803 images, 0x0801 labels)."""
    magic = 0x00000800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fixture_images(
    n: int, height: int, width: int, channels: int = 1, *, seed: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Return ``n`` label-dependent uint8 images ``[n, C, H, W]`` and labels."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 64, size=(n, channels, height, width), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = (int(label) // 5) * (height // 2)
        col = (int(label) % 5) * max((width - 4) // 4, 1)
        images[i, :, row : row + 4, col : col + 4] = 255
    return images, labels


def write_mnist_fixture(
    root: Path,
    name: str = "MNIST",
    n_train: int = 64,
    n_test: int = 32,
    *,
    gz: bool = False,
) -> None:
    """Write a tiny MNIST-style IDX data set to ``root/name/raw``.

    Parameters
    ----------
    root : Path
        The ``data_dir`` later passed to ``load_dataset``.
    name : str, default "MNIST"
        ``"MNIST"`` for ``mnist``, ``"FashionMNIST"`` for ``fashion-mnist``.
    n_train, n_test : int
        Number of training and test images (28x28, labels ``i % 10``).
    gz : bool, default False
        Write the gzip-compressed ``.gz`` files instead of plain ones.
    """
    raw_dir = Path(root) / name / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = fixture_images(n_train, 28, 28, seed=1)
    test_x, test_y = fixture_images(n_test, 28, 28, seed=2)
    contents = {
        "train-images-idx3-ubyte": idx_bytes(train_x[:, 0]),
        "train-labels-idx1-ubyte": idx_bytes(train_y),
        "t10k-images-idx3-ubyte": idx_bytes(test_x[:, 0]),
        "t10k-labels-idx1-ubyte": idx_bytes(test_y),
    }
    for stem, payload in contents.items():
        if gz:
            (raw_dir / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (raw_dir / stem).write_bytes(payload)


def _cifar_batches(
    n_per_batch: int,
) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]:
    return [fixture_images(n_per_batch, 32, 32, 3, seed=10 + i) for i in range(len(CIFAR_BATCHES))]


def write_cifar10_bin_fixture(root: Path, n_per_batch: int = 8) -> None:
    """Write ``root/cifar-10-batches-bin`` with ``n_per_batch`` records per file."""
    out = Path(root) / "cifar-10-batches-bin"
    out.mkdir(parents=True, exist_ok=True)
    for stem, (images, labels) in zip(CIFAR_BATCHES, _cifar_batches(n_per_batch), strict=True):
        records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
        (out / f"{stem}.bin").write_bytes(records.astype(np.uint8).tobytes())


class _Py2Pickler(pickle._Pickler):
    """Pickle like Python 2's cPickle did for the original CIFAR-10 batches.

    Every ``str``/``bytes`` becomes a py2 ``str`` (BINSTRING opcodes, loaded as
    ``bytes`` with ``encoding="bytes"``) and numpy globals use the NumPy 1.x
    ``numpy.core`` module path.
    """

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)  # type: ignore[attr-defined]
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    def _save_global(self, obj: Any, name: str | None = None) -> None:
        module = str(obj.__module__).replace("numpy._core", "numpy.core")
        qualname = name or obj.__qualname__
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str
    dispatch[type] = _save_global


def write_cifar10_pickle_fixture(
    root: Path,
    n_per_batch: int = 8,
    *,
    protocol: int = pickle.DEFAULT_PROTOCOL,
    py2: bool = False,
) -> None:
    """Write ``root/cifar-10-batches-py`` as pickled dicts like the real batches.

    ``py2=True`` writes the batches the way the published (Python 2) files are
    encoded, ignoring ``protocol`` (it is 2).
    """
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    for stem, (images, labels) in zip(CIFAR_BATCHES, _cifar_batches(n_per_batch), strict=True):
        batch = {
            b"batch_label": stem.encode(),
            b"labels": [int(label) for label in labels],
            b"data": images.reshape(len(images), -1),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
        }
        with (out / stem).open("wb") as fh:
            if py2:
                _Py2Pickler(fh, protocol=2).dump(batch)
            else:
                pickle.dump(batch, fh, protocol=protocol)
