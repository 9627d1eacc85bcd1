"""fedsec_example: the user's own model, data and training loop (as in quickstart-pytorch).

Nothing here is fedsec's except the ``dp-sgd`` part, marked below: the model
is the user's small CNN with BatchNorm, the data is scikit-learn's bundled
8x8 digits (no download) partitioned by the app itself, and the loop is an
ordinary PyTorch loop with the user's own loss and optimizer.

Privacy parameters. The example's DP-SGD (``noise_multiplier=0.04``,
``max_grad_norm=5``) and local DP (``client_app``) are chosen so that every
defense together stays within 2 points of plain FedAvg on ~190 examples per
client: at this data scale they give no meaningful privacy (the accounted
epsilon is in the thousands and beyond). Meaningful privacy (e.g. DP-SGD with
``noise_multiplier=1.0``, epsilon about 13 over 8 rounds at delta 1e-5) costs
far more accuracy here (the DP-SGD part alone reached 74% after 5 rounds at
0.6). ``make_private``'s accountant lives for one call of :func:`train`, i.e.
one round: the epsilon over rounds is the composition of these.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsec import make_private

#: Seed of the app's own train/test split and partitioning (not fedsec's).
DATA_SEED = 2026
#: Share of the digits the server keeps as its held-out test set.
TEST_SHARE = 0.2


class Net(nn.Module):
    """A small CNN for 8x8 digits, with BatchNorm (``norm="batch"``) or GroupNorm.

    DP-SGD needs every example's gradient to be its own, which BatchNorm
    breaks (it mixes the examples of a batch), so the ``dp-sgd`` part builds
    the model with ``norm="group"`` (:func:`new_model`).
    """

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(channels: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(channels)
            return nn.GroupNorm(4, channels)

        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            norm_layer(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            norm_layer(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.features(x).flatten(1))
        return logits


def new_model(parts: frozenset[str]) -> Net:
    """The model every process builds (server and clients must agree)."""
    # fedsec: dp-sgd
    return Net(norm="group" if "dp-sgd" in parts else "batch")
    # end fedsec


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 8, 8) floats in [0, 1] and labels, shuffled once."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(DATA_SEED).permutation(len(y))
    images = torch.tensor(x[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return images, torch.tensor(y[order], dtype=torch.long)


def _split() -> tuple[int, int]:
    """(start, end) of the clients' share of the shuffled digits; the rest is the test set."""
    total = len(_digits()[1])
    return 0, total - int(total * TEST_SHARE)


def load_data(
    partition_id: int, num_partitions: int, batch_size: int
) -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    """Partition ``partition_id`` of ``num_partitions`` (IID): train and validation loaders."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} not in [0, {num_partitions})")
    x, y = _digits()
    start, end = _split()
    part = torch.arange(start, end)[partition_id::num_partitions]
    cut = int(len(part) * 0.8)
    train = TensorDataset(x[part[:cut]], y[part[:cut]])
    val = TensorDataset(x[part[cut:]], y[part[cut:]])
    generator = torch.Generator().manual_seed(DATA_SEED + partition_id)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(val, batch_size=batch_size),
    )


def load_test_data(batch_size: int = 256) -> DataLoader[tuple[torch.Tensor, ...]]:
    """The server's held-out test set (no client trains on it)."""
    x, y = _digits()
    _, end = _split()
    return DataLoader(TensorDataset(x[end:], y[end:]), batch_size=batch_size)


def train(
    net: nn.Module,
    trainloader: DataLoader[tuple[torch.Tensor, ...]],
    epochs: int,
    lr: float,
    parts: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """The user's loop: SGD with momentum and cross-entropy; returns the metrics to report."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    # fedsec: dp-sgd
    if "dp-sgd" in parts:
        net, optimizer, trainloader = make_private(
            net, optimizer, trainloader, noise_multiplier=0.04, max_grad_norm=5.0
        )
    # end fedsec
    net.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            seen += len(labels)
    return {"train_loss": total / max(seen, 1)}


def test(net: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
    """Average loss and accuracy of ``net`` on ``loader``."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            outputs = net(images)
            loss += float(criterion(outputs, labels))
            correct += int((outputs.argmax(1) == labels).sum())
            count += len(labels)
    return loss / count, correct / count
