"""The user's model: a small CNN with BatchNorm (integer ``num_batches_tracked`` buffers)."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool -> linear classifier."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * (size // 2) * (size // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(torch.relu(self.norm(self.conv(x))))
        logits: torch.Tensor = self.head(out.flatten(1))
        return logits


def build(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The model factory fedsec calls: ``(input_shape, num_classes) -> nn.Module``."""
    channels, height, _ = input_shape
    return SmallNet(channels, height, num_classes)


NOT_CALLABLE = 42
