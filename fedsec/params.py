"""State-dict utilities: model state <-> one flat vector, and nested state by key prefix."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def flatten_state(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate a state dict's tensors (in its order) into one float32 CPU vector."""
    return torch.cat([v.detach().to("cpu", torch.float32).reshape(-1) for v in state.values()])


def unflatten_state(
    flat: torch.Tensor, like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split ``flat`` back into tensors shaped (and typed) like ``like``.

    Raises
    ------
    ValueError
        If the sizes do not match.
    """
    total = sum(v.numel() for v in like.values())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} values, the state needs {total}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, ref in like.items():
        size = ref.numel()
        out[name] = flat[offset : offset + size].reshape(ref.shape).to(ref.dtype)
        offset += size
    return out


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with every key put under ``prefix`` (e.g. ``"inner."``)."""
    return {prefix + key: value for key, value in state.items()}


def unprefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
