"""Argument checks shared by the gradient-inversion audit modules.

Each raises a one-line ``ValueError`` naming the argument. Used by
:mod:`fedsec.audit.image_quality`, :mod:`fedsec.audit.server_view` and
:mod:`fedsec.audit.inversion` (Geiping et al., "Inverting Gradients -- How
easy is it to break privacy in federated learning?", NeurIPS 2020).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedsec.checks import check_int, check_number

# fedsec's shared number checks, under the names the audit modules import.
_check_int = check_int
_check_number = check_number


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
    ):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
    return input_shape[0], input_shape[1], input_shape[2]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def _flatten(
    update: Mapping[str, torch.Tensor] | torch.Tensor, named: list[tuple[str, nn.Parameter]]
) -> torch.Tensor:
    """The update (or gradient) as one vector in ``named`` order, after shape checks."""
    total = sum(p.numel() for _, p in named)
    if isinstance(update, torch.Tensor):
        if update.dim() != 1 or update.numel() != total:
            raise ValueError(
                f"a flat update must be a vector of the model's {total} trainable "
                f"parameters, got shape {tuple(update.shape)}"
            )
        return update.detach()
    if not isinstance(update, Mapping):
        raise ValueError(f"update must be a dict of tensors or a flat tensor, got {update!r}")
    names = [n for n, _ in named]
    if set(update) != set(names):
        missing = sorted(set(names) - set(update))
        extra = sorted(set(update) - set(names))
        raise ValueError(
            f"update keys do not match the model's trainable parameters: "
            f"missing {missing}, unexpected {extra}"
        )
    parts = []
    for name, p in named:
        value = update[name]
        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"update[{name!r}] must have shape {tuple(p.shape)}, got {shape}")
        parts.append(value.detach().reshape(-1))
    return torch.cat(parts)


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating-point tensor [B, ...]")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise ValueError("y must be an int64 tensor [B]")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
