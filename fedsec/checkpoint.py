"""Model checkpoints in safetensors, verified by SHA-256 before use.

Checkpoints never use pickle: safetensors stores raw tensors and a JSON header,
so loading one cannot execute code. The hash recorded in the run's manifest
guards against a file replaced or corrupted after it was written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match its recorded hash."""


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor]) -> str:
    """Save ``tensors`` to ``path`` atomically and return the file's SHA-256.

    Parameters
    ----------
    path : str or Path
        Destination ``.safetensors`` file.
    tensors : dict[str, torch.Tensor]
        Named tensors (a model's state dict, possibly with server state).
    """
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = safetensors_save(contiguous)
    atomic_write_bytes(Path(path), data)
    return sha256_bytes(data)


def load_checkpoint(path: str | Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint after checking its SHA-256 against ``expected_sha256``.

    Raises
    ------
    CheckpointError
        If the file is missing, its hash differs, or it is not valid safetensors.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path.name}: SHA-256 mismatch (manifest {expected_sha256[:12]}..., "
            f"file {actual[:12]}...); refusing to use it"
        )
    try:
        return safetensors_load(data)
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path.name}: not valid safetensors ({err})") from None
