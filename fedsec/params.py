"""Model state <-> one flat vector, for code that works on whole updates."""

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
