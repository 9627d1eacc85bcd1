"""Image classification data sets, read from local files only.

Every loader returns normalised ``float32`` tensors in ``[N, C, H, W]`` layout
and ``int64`` labels, split into the clients' training pool and the held-out
test split that stays on the server. fedsec never downloads anything: the
bundled scikit-learn ``digits`` set works offline, and the others are read from
the on-disk layout that torchvision uses, so an existing torchvision download
can be pointed at directly.

Results are cached per process, because every simulated client in a process
would otherwise re-read and re-normalise the same files.

The user's own data set plugs in the same way (:func:`load_dataset`): a
factory registered with :func:`fedsec.registry.register_dataset`, or named
in a config as a dotted ``"package.module:factory"`` that every process
imports. It is called as ``factory(data_dir, seed)`` and returns what the
built-in loaders return: a :class:`SplitData`, or the tuple ``(train_x,
train_y, test_x, test_y)`` of float images ``[N, C, H, W]`` (already
normalised) and integer labels ``[N]``, as numpy arrays or tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsec.registry import Registry, UnknownNameError, dotted_callables, is_dotted

__all__ = [
    "DATASETS",
    "DATASET_FACTORIES",
    "DatasetFactory",
    "DatasetInfo",
    "DatasetNotFoundError",
    "SplitData",
    "UnsafePickleError",
    "dataset_info",
    "load_dataset",
    "pixel_bounds",
]

_U8Array = npt.NDArray[np.uint8]
_I64Array = npt.NDArray[np.int64]
_F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a registered data set.

    Parameters
    ----------
    name : str
        Registry name.
    num_classes : int
        Number of label classes; labels are ``0 .. num_classes - 1``.
    input_shape : tuple of int
        Shape of one sample, ``(C, H, W)``.
    num_train : int
        Number of samples in the clients' training pool (for ``digits``: after
        the server's held-out split).
    num_test : int
        Number of samples in the server's held-out test split.
    description : str
        One-line human-readable description.
    pixel_mean : tuple of float, default (0.0,)
        Per-channel mean subtracted from the ``[0, 1]``-scaled pixels; one value
        applies to every channel. The default means "not normalised".
    pixel_std : tuple of float, default (1.0,)
        Per-channel standard deviation the centred pixels are divided by, so a
        stored input is ``(pixel - pixel_mean) / pixel_std``.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    description: str
    pixel_mean: tuple[float, ...] = (0.0,)
    pixel_std: tuple[float, ...] = (1.0,)


# eq=False: instances hash and compare by identity. Field-wise equality would
# compare tensors element-wise (ambiguous truth value) and identity is what the
# per-process caches downstream need, since load_dataset returns the same object.
@dataclass(frozen=True, eq=False)
class SplitData:
    """A loaded data set, split into the training pool and server test split.

    The tensors are shared by every caller in the process (see
    :func:`load_dataset`); treat them as read-only and copy before modifying.

    Parameters
    ----------
    info : DatasetInfo
        Description of the data set; ``num_train``/``num_test`` are the sizes
        actually loaded (they differ from the registry entry for partial files).
    train_x : torch.Tensor
        ``float32`` images ``[N, C, H, W]``, normalised.
    train_y : torch.Tensor
        ``int64`` labels ``[N]``.
    test_x : torch.Tensor
        Held-out test images that stay on the server, ``float32`` ``[M, C, H, W]``.
    test_y : torch.Tensor
        Held-out test labels, ``int64`` ``[M]``.
    """

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A CIFAR-10 python batch that asks for more than numpy arrays; refused unread.

    An ``UnpicklingError`` (what callers of an unpickler test for) and a
    ``ValueError`` (what every other bad data file raises), so the commands
    report it as one line like any corrupt file.
    """


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not on disk; the message says what goes where."""


def pixel_bounds(info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel range of valid normalised inputs of a data set.

    Pixels scaled to ``[0, 1]`` are stored as ``(pixel - mean) / std``, so the
    valid inputs of channel ``c`` lie in ``[(0 - mean_c) / std_c, (1 - mean_c) /
    std_c]``. Attacks clamp into this box so that a perturbed or triggered image
    is still an image the data pipeline could have produced.

    Parameters
    ----------
    info : DatasetInfo
        The data set; a single ``pixel_mean``/``pixel_std`` value applies to all
        ``input_shape[0]`` channels.

    Returns
    -------
    low, high : torch.Tensor
        ``float32`` tensors of shape ``[C, 1, 1]``, broadcastable against
        ``[N, C, H, W]`` inputs.

    Raises
    ------
    ValueError
        If the statistics do not have 1 or ``C`` entries, or a std is not > 0.
    """
    channels = info.input_shape[0]
    stats = {"pixel_mean": info.pixel_mean, "pixel_std": info.pixel_std}
    for field, values in stats.items():
        if len(values) not in (1, channels):
            raise ValueError(
                f"{field} of dataset '{info.name}' needs 1 or {channels} values, got {values}"
            )
    if not all(s > 0 for s in info.pixel_std):
        raise ValueError(f"pixel_std of dataset '{info.name}' must be > 0, got {info.pixel_std}")
    # float64 for the division, so the bounds match the loaders' float32 output
    # to within one rounding.
    mean = torch.tensor(info.pixel_mean, dtype=torch.float64).expand(channels)
    std = torch.tensor(info.pixel_std, dtype=torch.float64).expand(channels)
    low = ((0.0 - mean) / std).to(torch.float32).reshape(channels, 1, 1)
    high = ((1.0 - mean) / std).to(torch.float32).reshape(channels, 1, 1)
    return low, high


#: ``factory(data_dir, seed)`` of a user's data set: a :class:`SplitData` or
#: ``(train_x, train_y, test_x, test_y)`` (see the module docstring).
DatasetFactory = Callable[[Path, int], Any]

#: The user's data set factories by registered name
#: (:func:`fedsec.registry.register_dataset`); dotted names resolve by import.
DATASET_FACTORIES: Registry[DatasetFactory] = Registry("dataset", dotted_callables("dataset"))

#: ``(data_dir, seed)`` of the latest load of each user data set in this process:
#: a lookup by name alone (``DATASETS.get``) describes the data actually in use.
_LAST_LOAD: dict[str, tuple[str, int]] = {}


def _is_user_dataset(name: str) -> bool:
    return name in DATASET_FACTORIES or is_dotted(name)


def _unknown_dataset(name: str) -> UnknownNameError:
    names = [*DATASETS.names(), *DATASET_FACTORIES.names()]
    return UnknownNameError(f"unknown dataset '{name}'; valid choices: {', '.join(names)}")


def _user_dataset_info(name: str) -> DatasetInfo:
    """The info of a user's data set, as loaded (the loaded sizes and shapes are the truth)."""
    if not _is_user_dataset(name):
        raise _unknown_dataset(name)
    data_dir, seed = _LAST_LOAD.get(name, ("data", 0))
    return load_dataset(name, data_dir, seed=seed).info


#: Built-in data sets' static descriptions. A user's data set (registered or
#: dotted) resolves too, by loading it (cached), so ``DATASETS.get(name)``
#: works for every name a config accepts.
DATASETS: Registry[DatasetInfo] = Registry("dataset", _user_dataset_info)

# Mean/std of all 1,797 digits after scaling 0..16 to [0, 1].
_DIGITS_MEAN = 0.3053
_DIGITS_STD = 0.3760
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

DATASETS.add(
    "digits",
    DatasetInfo(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        num_train=1437,
        num_test=360,
        description="scikit-learn's bundled 8x8 handwritten digits (1,797 images)",
        pixel_mean=(_DIGITS_MEAN,),
        pixel_std=(_DIGITS_STD,),
    ),
)
DATASETS.add(
    "mnist",
    DatasetInfo(
        name="mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        num_train=60000,
        num_test=10000,
        description="MNIST handwritten digits, 28x28 grayscale",
        pixel_mean=(_MNIST_MEAN,),
        pixel_std=(_MNIST_STD,),
    ),
)
DATASETS.add(
    "fashion-mnist",
    DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        num_train=60000,
        num_test=10000,
        description="Fashion-MNIST clothing images, 28x28 grayscale",
        pixel_mean=(_FMNIST_MEAN,),
        pixel_std=(_FMNIST_STD,),
    ),
)
DATASETS.add(
    "cifar10",
    DatasetInfo(
        name="cifar10",
        num_classes=10,
        input_shape=(3, 32, 32),
        num_train=50000,
        num_test=10000,
        description="CIFAR-10 natural images, 32x32 RGB",
        pixel_mean=_CIFAR_MEAN,
        pixel_std=_CIFAR_STD,
    ),
)

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

_CIFAR_PY_DIR = "cifar-10-batches-py"
_CIFAR_BIN_DIR = "cifar-10-batches-bin"
_CIFAR_PY_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR_BIN_FILES = tuple(f"{f}.bin" for f in _CIFAR_PY_FILES)
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_RECORD = 1 + _CIFAR_PIXELS

# (train_x, train_y, test_x, test_y) as numpy arrays, before tensor conversion.
_Arrays = tuple[_F32Array, _I64Array, _F32Array, _I64Array]


def dataset_info(name: str, data_dir: str | Path = "data", *, seed: int = 0) -> DatasetInfo:
    """Describe data set ``name``: a built-in's static info, a user's as loaded.

    A built-in data set is not read; a user's (registered or dotted) is loaded
    with :func:`load_dataset` (cached), since only its data knows its size.

    Raises
    ------
    UnknownNameError
        If ``name`` is neither built in, registered nor dotted;
        :class:`~fedsec.registry.DottedNameError` if a dotted name does not import.
    """
    if name in DATASETS:
        return DATASETS.get(name)
    return load_dataset(name, data_dir, seed=seed).info


def load_dataset(name: str, data_dir: str | Path = "data", *, seed: int = 0) -> SplitData:
    """Load a data set from local files, cached per process.

    Parameters
    ----------
    name : str
        Registry name: ``"digits"``, ``"mnist"``, ``"fashion-mnist"`` or
        ``"cifar10"``; a name registered with
        :func:`fedsec.registry.register_dataset`; or a dotted
        ``"package.module:factory"``. A user's factory is called as
        ``factory(data_dir, seed)`` (``data_dir`` resolved to an absolute
        ``Path``) and returns a :class:`SplitData` or ``(train_x, train_y,
        test_x, test_y)``: float images ``[N, C, H, W]``, integer labels
        ``[N]`` in ``0 .. num_classes - 1``. With the tuple, ``num_classes`` is
        the largest label plus one and pixels are taken as already in their
        final scale (``pixel_mean`` 0, ``pixel_std`` 1: attacks that clamp to
        the pixel box assume ``[0, 1]``); return a ``SplitData`` to say
        otherwise.
    data_dir : str or Path, default "data"
        Root of the torchvision-style layout (``<data_dir>/MNIST/raw``,
        ``<data_dir>/FashionMNIST/raw``, ``<data_dir>/cifar-10-batches-bin`` or
        ``<data_dir>/cifar-10-batches-py``). Ignored for ``digits``.
    seed : int, default 0
        Seed of the stratified train/test split of ``digits``; the other data
        sets use their official test split and ignore it.

    Returns
    -------
    SplitData
        The training pool and the server's held-out test split. The same object
        is returned for the same arguments within a process, so its tensors must
        not be mutated by callers.

    Raises
    ------
    UnknownNameError
        If ``name`` is not registered; :class:`~fedsec.registry.DottedNameError`
        if a dotted name does not import or is not callable.
    DatasetNotFoundError
        If the files are missing; the message names the files and directory.
    ValueError
        If a file is corrupt; :class:`UnsafePickleError`, a ``ValueError`` and
        a ``pickle.UnpicklingError``, if a CIFAR-10 python batch references
        anything but numpy array globals. For a user's data set: if what the
        factory returns is malformed (the message says how).
    """
    if name not in _LOADERS:
        if not _is_user_dataset(name):
            raise _unknown_dataset(name)
        DATASET_FACTORIES.get(name)  # a dotted name that does not import fails here
        key = str(Path(data_dir).expanduser().resolve())
        _LAST_LOAD[name] = (key, seed)
        return _load_user_cached(name, key, seed)
    # Normalise the key so equivalent calls share one cache entry: digits has no
    # files, and only digits' split depends on the seed.
    if name == "digits":
        return _load_cached(name, "", seed)
    return _load_cached(name, str(Path(data_dir).expanduser().resolve()), 0)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str, seed: int) -> SplitData:
    train_x, train_y, test_x, test_y = _LOADERS[name](Path(data_dir), seed)
    info = dataclasses.replace(DATASETS.get(name), num_train=len(train_y), num_test=len(test_y))
    return SplitData(
        info=info,
        train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)),
        train_y=torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32)),
        test_y=torch.from_numpy(np.ascontiguousarray(test_y, dtype=np.int64)),
    )


@functools.lru_cache(maxsize=8)
def _load_user_cached(name: str, data_dir: str, seed: int) -> SplitData:
    return _as_split_data(name, DATASET_FACTORIES.get(name)(Path(data_dir), seed))


def _as_tensor(name: str, what: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(
        f"dataset '{name}': {what} must be a numpy array or a tensor, got {type(value).__name__}"
    )


def _as_split_data(name: str, result: Any) -> SplitData:
    """Check and normalise what a user's data set factory returned (see :func:`load_dataset`)."""
    given: DatasetInfo | None = None
    if isinstance(result, SplitData):
        given = result.info
        parts: Any = (result.train_x, result.train_y, result.test_x, result.test_y)
    elif isinstance(result, tuple | list) and len(result) == 4:
        parts = result
    else:
        raise ValueError(
            f"dataset '{name}' must return a SplitData or (train_x, train_y, test_x, test_y), "
            f"got {type(result).__name__}"
        )
    what = ("train_x", "train_y", "test_x", "test_y")
    train_x, train_y, test_x, test_y = (
        _as_tensor(name, w, v) for w, v in zip(what, parts, strict=True)
    )
    for label, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"dataset '{name}': {label}_x must be float images [N, C, H, W], got "
                f"{x.dtype} of shape {tuple(x.shape)}"
            )
        if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"dataset '{name}': {label}_y must be integer labels [N], got {y.dtype} "
                f"of shape {tuple(y.shape)}"
            )
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"dataset '{name}': {label} split has {len(x)} images and {len(y)} labels"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"dataset '{name}': {label}_x holds non-finite values")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise ValueError(
            f"dataset '{name}': test images are {tuple(test_x.shape[1:])}, train images "
            f"{tuple(train_x.shape[1:])}"
        )
    low = int(min(train_y.min(), test_y.min()))
    high = int(max(train_y.max(), test_y.max()))
    num_classes = given.num_classes if given is not None else high + 1
    if low < 0 or high >= num_classes or num_classes < 2:
        raise ValueError(
            f"dataset '{name}': labels must lie in 0 .. num_classes - 1 with num_classes "
            f">= 2, got labels {low} .. {high} for {num_classes} classes"
        )
    c, h, w = (int(d) for d in train_x.shape[1:])
    num_train, num_test = len(train_y), len(test_y)
    if given is not None:
        if given.input_shape != (c, h, w):
            raise ValueError(
                f"dataset '{name}': info.input_shape is {given.input_shape}, the images "
                f"are {(c, h, w)}"
            )
        info = dataclasses.replace(given, num_train=num_train, num_test=num_test)
    else:
        description = f"user data set {name}"
        info = DatasetInfo(name, num_classes, (c, h, w), num_train, num_test, description)
    pixel_bounds(info)  # 1 or C statistics, positive std
    return SplitData(
        info=info,
        train_x=train_x.to(torch.float32).contiguous(),
        train_y=train_y.to(torch.int64).contiguous(),
        test_x=test_x.to(torch.float32).contiguous(),
        test_y=test_y.to(torch.int64).contiguous(),
    )


# ---- digits -------------------------------------------------------------------


def _load_digits(data_dir: Path, seed: int) -> _Arrays:
    del data_dir  # bundled with scikit-learn
    flat, target = _read_digits()
    images = flat.reshape(-1, 8, 8).astype(np.float32) / 16.0
    x = ((images - _DIGITS_MEAN) / _DIGITS_STD)[:, None, :, :].astype(np.float32)
    y = target.astype(np.int64)
    train, test = stratified_split(y, test_fraction=0.2, seed=seed)
    return x[train], y[train], x[test], y[test]


def _read_digits() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Pixels [1797, 64] and labels of scikit-learn's bundled ``digits.csv.gz``.

    Read with numpy from the installed scikit-learn's data folder, without
    importing scikit-learn: a deployed SuperNode starts a fresh process for
    every message, and importing scikit-learn (scipy with it) costs about a
    CPU-second there. The file is the one ``sklearn.datasets.load_digits`` reads.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package, imports nothing
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError("digits: scikit-learn, which bundles it, is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        # An unusual install layout: let scikit-learn find its own file.
        from sklearn.datasets import load_digits

        flat, target = load_digits(return_X_y=True)
        return np.asarray(flat, dtype=np.float64), np.asarray(target, dtype=np.int64)
    with gzip.open(path, "rt") as file:
        data = np.loadtxt(file, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def _approximate_mode(
    counts: npt.NDArray[np.int64], draws: int, rng: np.random.RandomState
) -> npt.NDArray[np.int64]:
    """Per-class draws of a stratified sample: floors, then the largest remainders.

    Ties among equal remainders are broken at random with ``rng``, exactly as
    scikit-learn's ``_approximate_mode`` does (same calls, same order), so the
    split below equals ``train_test_split(..., stratify=y, random_state=seed)``.
    """
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add = min(len(tied), need)
            floored[rng.choice(tied, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return np.asarray(floored, dtype=np.int64)


def stratified_split(
    y: npt.NDArray[np.int64], *, test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Train and test indices of a stratified shuffle split of labels ``y``.

    The same indices as scikit-learn's ``train_test_split(x, y,
    test_size=test_fraction, stratify=y, random_state=seed)`` (its
    ``StratifiedShuffleSplit``; ``tests/test_data.py`` checks the equality), in
    numpy alone, so a SuperNode's training process need not import
    scikit-learn. Every class must have at least 2 members.
    """
    n = len(y)
    n_test = int(np.ceil(test_fraction * n))
    n_train = n - n_test
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(classes):
        raise ValueError(
            f"cannot stratify {n} labels of {len(classes)} classes into {n_train} train "
            f"and {n_test} test (every class needs 2 members, each side a member per class)"
        )
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _approximate_mode(counts, n_train, rng)
    test_counts = _approximate_mode(counts - train_counts, n_test, rng)
    train: list[npt.NDArray[np.int64]] = []
    test: list[npt.NDArray[np.int64]] = []
    for i in range(len(classes)):
        shuffled = members[i].take(rng.permutation(counts[i]), mode="clip")
        train.append(shuffled[: train_counts[i]])
        test.append(shuffled[train_counts[i] : train_counts[i] + test_counts[i]])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# ---- MNIST / Fashion-MNIST (IDX) ------------------------------------------------


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def _find_idx_file(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int, ndim: int) -> _U8Array:
    """Read an unsigned-byte IDX file (big-endian header) into an array."""
    try:
        raw = _read_maybe_gz(path)
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError
        raise ValueError(f"corrupt IDX file {path}: {exc}") from None
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"corrupt IDX file {path}: {len(raw)} bytes is shorter than the "
            f"{header_len}-byte header"
        )
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise ValueError(
            f"corrupt IDX file {path}: magic 0x{found_magic:08x}, expected 0x{magic:08x}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"corrupt IDX file {path}: header says dims {dims} ({expected} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _idx_pair(
    raw_dir: Path, files: dict[str, Path], prefix: str, num_classes: int
) -> tuple[_U8Array, _I64Array]:
    images_path = files[f"{prefix}-images-idx3-ubyte"]
    labels_path = files[f"{prefix}-labels-idx1-ubyte"]
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise ValueError(
            f"corrupt IDX file {images_path}: images are "
            f"{images.shape[1]}x{images.shape[2]}, expected 28x28"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"mismatched IDX files in {raw_dir}: {len(images)} {prefix} images "
            f"but {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(
            f"corrupt IDX file {labels_path}: label {int(labels.max())} is not below {num_classes}"
        )
    return images, labels


def _load_idx_dataset(name: str, data_dir: Path, mean: float, std: float) -> _Arrays:
    raw_dir = data_dir / _IDX_DIRS[name] / "raw"
    found = {stem: _find_idx_file(raw_dir, stem) for stem in _IDX_FILES}
    files = {stem: path for stem, path in found.items() if path is not None}
    if len(files) != len(_IDX_FILES):
        raise DatasetNotFoundError(
            f"dataset '{name}' not found: put {', '.join(_IDX_FILES)} "
            f"(optionally .gz) in {raw_dir} (torchvision layout); "
            "fedsec never downloads"
        )
    num_classes = DATASETS.get(name).num_classes
    arrays: list[np.ndarray[Any, Any]] = []
    for prefix in ("train", "t10k"):
        images, labels = _idx_pair(raw_dir, files, prefix, num_classes)
        # In place: the float copy of 60,000 images is large enough to matter.
        x = images[:, None, :, :].astype(np.float32)
        x /= 255.0
        x -= mean
        x /= std
        arrays += [x, labels]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _load_mnist(data_dir: Path, seed: int) -> _Arrays:
    del seed  # official test split
    return _load_idx_dataset("mnist", data_dir, _MNIST_MEAN, _MNIST_STD)


def _load_fashion_mnist(data_dir: Path, seed: int) -> _Arrays:
    del seed  # official test split
    return _load_idx_dataset("fashion-mnist", data_dir, _FMNIST_MEAN, _FMNIST_STD)


# ---- CIFAR-10 ---------------------------------------------------------------


def _numpy_global(module: str, name: str) -> Callable[..., Any] | None:
    """Resolve a numpy internal under its NumPy 2 (``_core``) or 1.x path."""
    for prefix in ("numpy._core", "numpy.core"):
        try:
            mod = importlib.import_module(f"{prefix}.{module}")
        except ImportError:
            continue
        obj = getattr(mod, name, None)
        if obj is not None:
            return obj  # type: ignore[no-any-return]
    return None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as
    # _codecs.encode(str, "latin1"); allow exactly that and no other codec.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(
            f"refusing _codecs.encode with encoding {encoding!r} in a CIFAR-10 batch"
        )
    return text.encode("latin1")


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_global("multiarray", "_reconstruct")
    frombuffer = _numpy_global("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # The original batches name numpy.core.*, files written by NumPy 2 name
    # numpy._core.*; both resolve to the installed function.
    for prefix in ("numpy.core", "numpy._core"):
        if reconstruct is not None:
            allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        if frombuffer is not None:
            allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle can call any importable callable while loading; the CIFAR-10
    python batches only need numpy's array reconstruction, so every other global
    is refused before it is imported.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global or raise :class:`UnsafePickleError`."""
        cls = type(self)
        if cls._allowed is None:
            cls._allowed = _allowed_pickle_globals()
        try:
            return cls._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global '{module}.{name}': CIFAR-10 batches "
                "may only contain numpy arrays"
            ) from None


def _read_cifar_pickle(path: Path) -> tuple[_U8Array, _I64Array]:
    try:
        with path.open("rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except UnsafePickleError as exc:
        # Keep the type (callers test for it) but say which file.
        raise UnsafePickleError(f"{path}: {exc}") from None
    except Exception as exc:  # whatever a malformed pickle trips over
        raise ValueError(f"corrupt CIFAR-10 batch {path}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(
            f"corrupt CIFAR-10 batch {path}: expected a dict with b'data' and b'labels'"
        )
    data = batch[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_PIXELS
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(
            f"corrupt CIFAR-10 batch {path}: b'data' is {desc}, expected uint8 [n, {_CIFAR_PIXELS}]"
        )
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"corrupt CIFAR-10 batch {path}: b'labels': {exc}") from None
    if labels.shape != (len(data),):
        raise ValueError(
            f"corrupt CIFAR-10 batch {path}: {len(data)} images but labels of shape {labels.shape}"
        )
    return data, labels


def _read_cifar_bin(path: Path) -> tuple[_U8Array, _I64Array]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ValueError(
            f"corrupt CIFAR-10 binary batch {path}: {raw.size} bytes is not a "
            f"positive multiple of the {_CIFAR_RECORD}-byte record"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 1:], records[:, 0].astype(np.int64)


def _load_cifar10(data_dir: Path, seed: int) -> _Arrays:
    del seed  # official test split
    bin_dir = data_dir / _CIFAR_BIN_DIR
    py_dir = data_dir / _CIFAR_PY_DIR
    # The binary batches need no unpickling, so they win when complete.
    reader: Callable[[Path], tuple[_U8Array, _I64Array]]
    if all((bin_dir / f).is_file() for f in _CIFAR_BIN_FILES):
        paths = [bin_dir / f for f in _CIFAR_BIN_FILES]
        reader = _read_cifar_bin
    elif all((py_dir / f).is_file() for f in _CIFAR_PY_FILES):
        paths = [py_dir / f for f in _CIFAR_PY_FILES]
        reader = _read_cifar_pickle
    else:
        raise DatasetNotFoundError(
            f"dataset 'cifar10' not found: put {', '.join(_CIFAR_BIN_FILES)} in "
            f"{bin_dir} or {', '.join(_CIFAR_PY_FILES)} in {py_dir} "
            "(torchvision layout); fedsec never downloads"
        )
    batches = [reader(p) for p in paths]
    for path, (_, labels) in zip(paths, batches, strict=True):
        if len(labels) and int(labels.max()) >= 10:
            raise ValueError(
                f"corrupt CIFAR-10 batch {path}: label {int(labels.max())} is not below 10"
            )
    mean = np.asarray(_CIFAR_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(_CIFAR_STD, dtype=np.float32).reshape(1, 3, 1, 1)

    def normalise(data: _U8Array) -> _F32Array:
        # Rows are the R, G and B planes, each 32x32 row-major.
        x = data.reshape(-1, 3, 32, 32).astype(np.float32)
        x /= 255.0
        x -= mean
        x /= std
        return x

    train_x = normalise(np.concatenate([d for d, _ in batches[:5]]))
    train_y = np.concatenate([y for _, y in batches[:5]])
    test_x = normalise(batches[5][0])
    return train_x, train_y, test_x, batches[5][1]


_LOADERS: dict[str, Callable[[Path, int], _Arrays]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}
