"""The user's training loop: their own optimiser, loss and batching."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Every call appends one line here (in ``cfg.data.data_dir``), so a test can
#: tell that this loop, not fedsec's, trained the clients in every process.
CALLS_LOG = "train_calls.log"


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Any,
    *,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Label-smoothed cross-entropy with Adam, ``cfg.client.local_epochs`` epochs."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    total, correct, seen = 0.0, 0, 0
    for _ in range(cfg.client.local_epochs):
        total, correct, seen = 0.0, 0, 0
        for batch in torch.randperm(len(y), generator=generator).split(cfg.client.batch_size):
            inputs, targets = x[batch].to(device), y[batch].to(device)
            optimizer.zero_grad()
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(batch)
    log = Path(cfg.data.data_dir) / CALLS_LOG
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {len(y)}\n".encode())
    finally:
        os.close(fd)
    return {"loss": total / seen, "accuracy": correct / seen}


def broken(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Any, **_: Any) -> Any:
    """A loop with a bug: every client's training raises."""
    raise RuntimeError("the user's loop is broken")
