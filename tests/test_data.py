"""Tests of fedsec.data: local data set loaders and client partitioning."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from data_fixtures import (
    CIFAR_BATCHES,
    IDX_FILES,
    fixture_images,
    idx_bytes,
    write_cifar10_bin_fixture,
    write_cifar10_pickle_fixture,
    write_mnist_fixture,
)
from fedsec.data import (
    DATASETS,
    PARTITIONERS,
    DatasetNotFoundError,
    client_dataset,
    load_dataset,
    partition_indices,
)
from fedsec.data import datasets as datasets_mod
from fedsec.data import partition as partition_mod
from fedsec.registry import UnknownNameError

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


def _denormalise(
    x: torch.Tensor,
    mean: float | npt.NDArray[np.float64],
    std: float | npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    raw: npt.NDArray[np.float64] = (x.numpy().astype(np.float64) * std + mean) * 255.0
    return np.rint(raw).astype(np.int64)


def _label_tv(labels: npt.NDArray[np.int64], parts: list[npt.NDArray[np.int64]]) -> float:
    """Mean over partitions of the total-variation distance to the global mix."""
    k = int(labels.max()) + 1
    global_mix = np.bincount(labels, minlength=k) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - global_mix).sum() for p in parts
    ]
    return float(np.mean(distances))


@pytest.fixture(scope="module")
def digits_labels() -> npt.NDArray[np.int64]:
    return load_dataset("digits", seed=0).train_y.numpy()


# ---- registry -----------------------------------------------------------------


def test_registry_names_and_unknown_dataset() -> None:
    assert DATASETS.names() == ["digits", "mnist", "fashion-mnist", "cifar10"]
    assert PARTITIONERS.names() == ["iid", "dirichlet", "shards"]
    with pytest.raises(UnknownNameError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    assert "digits, mnist, fashion-mnist, cifar10" in _one_line(info.value)


# ---- digits -------------------------------------------------------------------


def test_digits_shapes_dtypes_and_normalisation() -> None:
    data = load_dataset("digits", seed=0)
    info = data.info
    assert info == DATASETS.get("digits")
    assert (info.num_classes, info.input_shape) == (10, (1, 8, 8))
    assert (info.num_train, info.num_test) == (1437, 360)
    assert data.train_x.shape == (1437, 1, 8, 8)
    assert data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == data.test_x.dtype == torch.float32
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(10))
    # Standardised with the full set's constants: |mean| < 0.05, std within 5%.
    assert abs(data.train_x.mean().item()) < 0.05
    assert abs(data.train_x.std().item() - 1.0) < 0.05
    assert abs(data.test_x.mean().item()) < 0.1
    # Stratified: each class has 35..37 of the 360 test samples.
    counts = np.bincount(data.test_y.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_split_deterministic_per_seed() -> None:
    first = load_dataset("digits", seed=0)
    assert load_dataset("digits", "ignored", seed=0) is first  # per-process cache
    datasets_mod._load_cached.cache_clear()
    again = load_dataset("digits", seed=0)
    assert again is not first
    assert torch.equal(again.train_x, first.train_x)
    assert torch.equal(again.test_y, first.test_y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.test_y, first.test_y)


# ---- MNIST / Fashion-MNIST ----------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [
        ("mnist", "MNIST", 0.1307, 0.3081),
        ("fashion-mnist", "FashionMNIST", 0.286, 0.353),
    ],
)
def test_idx_datasets_load(
    tmp_path: Path, gz: bool, name: str, folder: str, mean: float, std: float
) -> None:
    write_mnist_fixture(tmp_path, folder, n_train=40, n_test=20, gz=gz)
    data = load_dataset(name, tmp_path)
    assert data.train_x.shape == (40, 1, 28, 28)
    assert data.test_x.shape == (20, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    # info carries the sizes actually loaded; the registry the canonical ones.
    assert (data.info.num_train, data.info.num_test) == (40, 20)
    assert (DATASETS.get(name).num_train, DATASETS.get(name).num_test) == (60000, 10000)
    expected_x, expected_y = fixture_images(40, 28, 28, seed=1)
    assert np.array_equal(data.train_y.numpy(), expected_y)
    assert np.array_equal(_denormalise(data.train_x, mean, std), expected_x)
    assert np.array_equal(data.test_y.numpy(), fixture_images(20, 28, 28, seed=2)[1])


def test_idx_accepts_mixed_plain_and_gz(tmp_path: Path) -> None:
    write_mnist_fixture(tmp_path, "MNIST", n_train=10, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    for stem in IDX_FILES[:2]:
        payload = (raw / stem).read_bytes()
        (raw / stem).unlink()
        (raw / f"{stem}.gz").write_bytes(gzip.compress(payload))
    assert load_dataset("mnist", tmp_path).train_x.shape == (10, 1, 28, 28)


@pytest.mark.parametrize(
    ("stem", "payload", "match"),
    [
        (
            "train-images-idx3-ubyte",
            idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-5],
            "corrupt IDX file .*header says dims",
        ),
        ("train-labels-idx1-ubyte", b"\x00\x00\x08\x03" + bytes(8), "magic 0x00000803"),
        (
            "t10k-images-idx3-ubyte",
            idx_bytes(np.zeros((10, 27, 28), np.uint8)),
            "27x28",
        ),
        ("t10k-labels-idx1-ubyte", idx_bytes(np.full(10, 10, np.uint8)), "label 10"),
        ("t10k-labels-idx1-ubyte", idx_bytes(np.zeros(9, np.uint8)), "mismatched"),
        ("train-images-idx3-ubyte", b"\x00\x00", "shorter than"),
    ],
)
def test_idx_corrupt_files_raise_one_line(
    tmp_path: Path, stem: str, payload: bytes, match: str
) -> None:
    write_mnist_fixture(tmp_path, "MNIST", n_train=10, n_test=10)
    (tmp_path / "MNIST" / "raw" / stem).write_bytes(payload)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("mnist", tmp_path)
    _one_line(info.value)


def test_idx_corrupt_gzip_raises_value_error(tmp_path: Path) -> None:
    write_mnist_fixture(tmp_path, "MNIST", n_train=10, n_test=10, gz=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="corrupt IDX file") as info:
        load_dataset("mnist", tmp_path)
    _one_line(info.value)


@pytest.mark.parametrize(
    ("name", "where", "files"),
    [
        ("mnist", "MNIST/raw", IDX_FILES),
        ("fashion-mnist", "FashionMNIST/raw", IDX_FILES),
        ("cifar10", "cifar-10-batches-py", CIFAR_BATCHES),
        ("cifar10", "cifar-10-batches-bin", tuple(f"{b}.bin" for b in CIFAR_BATCHES)),
    ],
)
def test_missing_dataset_one_line_names_dir_and_files(
    tmp_path: Path, name: str, where: str, files: tuple[str, ...]
) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = _one_line(info.value)
    assert f"dataset '{name}' not found" in message
    assert str((tmp_path / where).resolve()) in message
    assert all(f in message for f in files)
    assert "never downloads" in message


def test_missing_one_file_is_not_found(tmp_path: Path) -> None:
    write_mnist_fixture(tmp_path, "MNIST", n_train=10, n_test=10)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", tmp_path)


def test_relative_and_absolute_data_dir_share_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mnist_fixture(tmp_path, "MNIST", n_train=10, n_test=10)
    monkeypatch.chdir(tmp_path)
    assert load_dataset("mnist", ".") is load_dataset("mnist", tmp_path)


# ---- CIFAR-10 -----------------------------------------------------------------


def _check_cifar(data_dir: Path, n: int) -> None:
    data = load_dataset("cifar10", data_dir)
    assert data.train_x.shape == (5 * n, 3, 32, 32)
    assert data.test_x.shape == (n, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    images = [fixture_images(n, 32, 32, 3, seed=10 + i) for i in range(6)]
    expected_x = np.concatenate([x for x, _ in images[:5]])
    expected_y = np.concatenate([y for _, y in images[:5]])
    # Exact round trip also proves the R/G/B planes land in the right channels.
    assert np.array_equal(_denormalise(data.train_x, CIFAR_MEAN, CIFAR_STD), expected_x)
    assert np.array_equal(data.train_y.numpy(), expected_y)
    assert np.array_equal(data.test_y.numpy(), images[5][1])


def test_cifar10_binary(tmp_path: Path) -> None:
    write_cifar10_bin_fixture(tmp_path, n_per_batch=6)
    _check_cifar(tmp_path, 6)


@pytest.mark.parametrize(("protocol", "py2"), [(2, False), (4, False), (5, False), (2, True)])
def test_cifar10_python_pickle(tmp_path: Path, protocol: int, py2: bool) -> None:
    # py2=True mimics the published batches: Python 2 strings, numpy.core names.
    write_cifar10_pickle_fixture(tmp_path, n_per_batch=6, protocol=protocol, py2=py2)
    _check_cifar(tmp_path, 6)


def test_cifar10_prefers_binary(tmp_path: Path) -> None:
    write_cifar10_bin_fixture(tmp_path, n_per_batch=4)
    write_cifar10_pickle_fixture(tmp_path, n_per_batch=7)
    assert load_dataset("cifar10", tmp_path).train_x.shape[0] == 20


def test_cifar10_truncated_binary(tmp_path: Path) -> None:
    write_cifar10_bin_fixture(tmp_path, n_per_batch=2)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="3073-byte record") as info:
        load_dataset("cifar10", tmp_path)
    _one_line(info.value)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("__import__('os').getpid()",))


class _OtherCodec:
    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (codecs.encode, ("abc", "rot13"))


@pytest.mark.parametrize("kind", ["os.system", "eval", "codec"])
def test_cifar10_malicious_pickle_refused(tmp_path: Path, kind: str) -> None:
    write_cifar10_pickle_fixture(tmp_path, n_per_batch=2)
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _RunsShell(marker),
        "eval": _RunsEval(),
        "codec": _OtherCodec(),
    }[kind]
    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("wb") as fh:
        pickle.dump({b"data": payload, b"labels": [0]}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing") as info:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3" in _one_line(info.value)
    assert not marker.exists()


def test_malicious_pickle_is_a_value_error_and_one_line_exit_2(tmp_path: Path) -> None:
    """Refused, and reported like any bad data file: not an escaping UnpicklingError."""
    from typer.testing import CliRunner

    from fedsec.cli import cli

    write_cifar10_pickle_fixture(tmp_path, n_per_batch=2)
    marker = tmp_path / "pwned"
    with (tmp_path / "cifar-10-batches-py" / "data_batch_2").open("wb") as fh:
        pickle.dump({b"data": _RunsShell(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        load_dataset("cifar10", tmp_path)
    config = tmp_path / "cifar.toml"
    config.write_text(f"[data]\ndataset = 'cifar10'\ndata_dir = '{tmp_path}'\n")
    for command in (["validate", str(config)], ["run", str(config)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "refusing to unpickle global" in lines[0] and "data_batch_2" in lines[0]
    assert not marker.exists()


def test_cifar10_pickle_wrong_content(tmp_path: Path) -> None:
    write_cifar10_pickle_fixture(tmp_path, n_per_batch=2)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="expected uint8") as info:
        load_dataset("cifar10", tmp_path)
    _one_line(info.value)


# ---- partitions ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partitions_deterministic_and_seed_dependent(
    digits_labels: npt.NDArray[np.int64], method: str
) -> None:
    first = partition_indices(digits_labels, 10, method, seed=3)
    partition_mod._partition_cached.cache_clear()  # recompute, not a cache hit
    again = partition_indices(digits_labels, 10, method, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = partition_indices(digits_labels, 10, method, seed=4)
    assert not all(
        np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(first, other, strict=True)
    )


@pytest.mark.parametrize(
    ("method", "covers_all"), [("iid", True), ("dirichlet", True), ("shards", False)]
)
def test_partitions_disjoint_and_cover(
    digits_labels: npt.NDArray[np.int64], method: str, covers_all: bool
) -> None:
    n = len(digits_labels)
    parts = partition_indices(digits_labels, 20, method, seed=0)
    assert len(parts) == 20
    assert all(p.dtype == np.int64 and len(p) >= 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    assert joined.min() >= 0 and joined.max() < n
    if covers_all:
        assert len(joined) == n
    else:  # shards leave out less than one sample per shard
        assert n - 20 * 2 < len(joined) <= n


def test_iid_sizes_balanced(digits_labels: npt.NDArray[np.int64]) -> None:
    sizes = [len(p) for p in partition_indices(digits_labels, 20, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_partitions_are_read_only_and_list_is_fresh(
    digits_labels: npt.NDArray[np.int64],
) -> None:
    parts = partition_indices(digits_labels, 5, "iid", seed=0)
    with pytest.raises(ValueError, match="read-only"):
        parts[0][0] = 0
    parts.pop()
    assert len(partition_indices(digits_labels, 5, "iid", seed=0)) == 5


def test_dirichlet_label_skew(digits_labels: npt.NDArray[np.int64]) -> None:
    # Mean total-variation distance of each client's label mix from the global
    # one, 20 clients on 1,437 digits. Measured over seeds 0-4: alpha=0.1
    # 0.66-0.73, iid 0.13-0.15 (sampling noise of ~72-sample clients),
    # alpha=100 0.04-0.05.
    def tv(method: str, alpha: float) -> float:
        return _label_tv(
            digits_labels,
            partition_indices(digits_labels, 20, method, seed=0, alpha=alpha),
        )

    skewed, flat, iid = tv("dirichlet", 0.1), tv("dirichlet", 100.0), tv("iid", 0.5)
    assert skewed > 0.55
    assert iid < 0.2
    assert flat < 0.1
    assert skewed > 3 * iid


def test_shards_limit_labels_per_client(digits_labels: npt.NDArray[np.int64]) -> None:
    # A shard (35 samples here) is contiguous in label order, so it spans at most
    # 2 of the ~144-sample classes: a client holds at most 2 * 2 labels.
    parts = partition_indices(digits_labels, 20, "shards", seed=0)
    distinct = [len(np.unique(digits_labels[p])) for p in parts]
    assert max(distinct) <= 4
    assert np.mean(distinct) <= 3.0
    assert {len(p) for p in parts} == {70}
    single = partition_indices(digits_labels, 10, "shards", seed=0, shards_per_partition=1)
    assert max(len(np.unique(digits_labels[p])) for p in single) <= 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_partitions": 0}, "num_partitions must be >= 1, got 0"),
        ({"num_partitions": 2000}, "num_partitions=2000 is more than the 1437 samples"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ({"alpha": -1.0}, "got -1.0"),
        ({"alpha": float("nan")}, "got nan"),
        ({"min_partition_size": 100}, "min_partition_size=100"),
        ({"min_partition_size": 60, "alpha": 0.01}, "11 draws with alpha=0.01"),
        ({"method": "shards", "shards_per_partition": 0}, "got 0"),
        ({"method": "shards", "shards_per_partition": 100}, "shards of 0 samples"),
        ({"method": "iid", "min_partition_size": 80}, "below min_partition_size=80"),
    ],
)
def test_partition_errors_are_one_line(
    digits_labels: npt.NDArray[np.int64], kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"num_partitions": 20, "method": "dirichlet", "seed": 0}
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flwr-datasets' retry warnings stay inside
        with pytest.raises(ValueError, match=match) as info:
            partition_indices(digits_labels, **args)  # type: ignore[arg-type]
    _one_line(info.value)


def test_partition_unknown_method_and_bad_labels(
    digits_labels: npt.NDArray[np.int64],
) -> None:
    with pytest.raises(UnknownNameError, match="unknown partitioner 'pathological'"):
        partition_indices(digits_labels, 5, "pathological", seed=0)
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(digits_labels.reshape(-1, 1), 5, "iid", seed=0)
    with pytest.raises(ValueError, match="integers"):
        partition_indices(digits_labels.astype(float), 5, "iid", seed=0)


def test_client_dataset() -> None:
    data = load_dataset("digits", seed=0)
    parts = partition_indices(data.train_y.numpy(), 8, "dirichlet", seed=1)
    total = 0
    for pid in range(8):
        x, y = client_dataset(data, pid, 8, "dirichlet", seed=1)
        assert torch.equal(x, data.train_x[torch.from_numpy(parts[pid].copy())])
        assert torch.equal(y, data.train_y[torch.from_numpy(parts[pid].copy())])
        total += len(y)
    assert total == data.info.num_train
    x0, _ = client_dataset(data, 0, 8, "dirichlet", seed=1)
    assert client_dataset(data, 0, 8, "dirichlet", seed=1)[0] is x0  # cached
    for bad in (-1, 8):
        with pytest.raises(ValueError, match=f"partition_id={bad} is out of range"):
            client_dataset(data, bad, 8, "iid", seed=0)


# ---- digits without importing scikit-learn ---------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 42, 2**23 - 1])
def test_digits_split_equals_scikit_learns(seed: int) -> None:
    """fedsec's numpy split is scikit-learn's stratified train_test_split, index for index.

    Results from before the numpy loader (grid stores, published figures) stay
    comparable only if every seed gives the very same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fedsec.data.datasets import _load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=0.2, stratify=labels, random_state=seed)
    train_x, train_y, test_x, test_y = _load_digits(Path("unused"), seed)
    assert np.array_equal(train_y, labels[train]) and np.array_equal(test_y, labels[test])
    expected = (pixels[train] - 0.3053) / 0.3760
    assert np.array_equal(train_x[:, 0], expected.astype(np.float32))
    assert np.array_equal(test_x[:, 0], ((pixels[test] - 0.3053) / 0.3760).astype(np.float32))


def test_stratified_split_equals_scikit_learns_on_random_labels() -> None:
    """Other class counts and fractions, including ties that the seed must break alike."""
    from sklearn.model_selection import train_test_split

    from fedsec.data.datasets import stratified_split

    rng = np.random.default_rng(5)
    compared = 0
    for trial in range(40):
        classes, n = int(rng.integers(2, 12)), int(rng.integers(40, 400))
        labels = rng.integers(0, classes, size=n)
        fraction = float(rng.uniform(0.1, 0.5))
        try:
            train, test = train_test_split(
                np.arange(n), test_size=fraction, stratify=labels, random_state=trial
            )
        except ValueError:  # a class with one member: both refuse
            with pytest.raises(ValueError, match="stratify"):
                stratified_split(labels, test_fraction=fraction, seed=trial)
            continue
        ours = stratified_split(labels, test_fraction=fraction, seed=trial)
        assert np.array_equal(ours[0], train) and np.array_equal(ours[1], test), trial
        compared += 1
    assert compared >= 30  # the seeds above make nearly every trial a valid split


def test_loading_digits_imports_no_scikit_learn(tmp_path: Path) -> None:
    """A SuperNode's training process reads digits with numpy alone (issue 17, round time)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fedsec.data.datasets import load_dataset\n"
        "data = load_dataset('digits')\n"
        "assert len(data.train_y) + len(data.test_y) == 1797\n"
        "print(sorted(m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
