"""Model checkpoints in safetensors, verified by SHA-256 before use.

Checkpoints never use pickle: safetensors stores raw tensors and a JSON header,
so loading one cannot execute code. The hash recorded in the run's manifest
guards against a file replaced or corrupted after it was written. A checkpoint
is read only if it is a regular file of bounded size (never a device, pipe or
directory, which a symlink could point at), and before a run resumes
:func:`check_model_state` checks that its tensors fit the configured model.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

if TYPE_CHECKING:
    from fedsec.config import ExperimentConfig

#: Largest checkpoint read when the caller knows no exact size: far above any
#: model here (a CIFAR ResNet with its server state is well under 1 GiB), far
#: below what would exhaust a machine's memory.
MAX_CHECKPOINT_BYTES = 4 * 2**30


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


def read_checkpoint_bytes(
    path: str | Path, *, max_bytes: int = MAX_CHECKPOINT_BYTES, expected_bytes: int | None = None
) -> bytes:
    """Read a checkpoint file whole, refusing anything but a regular file of bounded size.

    The file is opened once (non-blocking, so a FIFO cannot hang the open) and
    checked through its descriptor, so a path swapped after the check is not
    read either; at most ``max_bytes + 1`` bytes are ever read.

    Parameters
    ----------
    path : str or Path
        The checkpoint; a symlink is followed, but must end at a regular file.
    max_bytes : int
        Largest size accepted.
    expected_bytes : int, optional
        The exact size recorded for it (a manifest's), checked before reading.

    Raises
    ------
    CheckpointError
        If it is missing, unreadable, not a regular file, or of another size.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot open ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"checkpoint {path}: not a regular file (a device, pipe or directory); "
                "refusing to read it"
            )
        limit = max_bytes if expected_bytes is None else min(max_bytes, expected_bytes)
        if expected_bytes is not None and info.st_size != expected_bytes:
            raise CheckpointError(
                f"checkpoint {path.name}: {info.st_size} bytes, the manifest records "
                f"{expected_bytes}; refusing to use it"
            )
        if info.st_size > limit:
            raise CheckpointError(
                f"checkpoint {path.name}: {info.st_size} bytes exceeds the limit of {limit}; "
                "refusing to read it"
            )
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)  # a file growing under us stops here too
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CheckpointError(f"checkpoint {path.name}: grew past {limit} bytes while read")
    return data


def load_checkpoint(
    path: str | Path,
    expected_sha256: str,
    *,
    max_bytes: int = MAX_CHECKPOINT_BYTES,
    expected_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint after checking its SHA-256 against ``expected_sha256``.

    The file is read with :func:`read_checkpoint_bytes` (``max_bytes``,
    ``expected_bytes``), so the hash never runs over an unbounded stream.

    Raises
    ------
    CheckpointError
        If the file is missing, not a regular file, too large, its hash
        differs, or it is not valid safetensors.
    """
    path = Path(path)
    data = read_checkpoint_bytes(path, max_bytes=max_bytes, expected_bytes=expected_bytes)
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


def check_state_fits(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str
) -> None:
    """Check that ``state`` has exactly ``reference``'s tensor names, shapes and dtypes.

    ``torch.nn.Module.load_state_dict`` would refuse a missing or misshapen
    tensor only when called, and silently casts another dtype; this names the
    first difference in one line, before anything starts.

    Raises
    ------
    CheckpointError
        ``"{what}: ..."`` naming the first missing, unexpected or different tensor.
    """
    missing = [name for name in reference if name not in state]
    unexpected = [name for name in state if name not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (first '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first '{unexpected[0]}')")
        raise CheckpointError(f"{what}: {', '.join(parts)}")
    for name, want in reference.items():
        got = state[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{what}: '{name}' has shape {list(got.shape)}, the model {list(want.shape)}"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(f"{what}: '{name}' is {got.dtype}, the model {want.dtype}")


def check_model_state(
    cfg: ExperimentConfig, model_state: Mapping[str, torch.Tensor], what: str = "checkpoint"
) -> None:
    """Check a checkpoint's model tensors against the model ``cfg`` builds, before a resume.

    Raises
    ------
    CheckpointError
        ``"{what} does not fit model '<name>': ..."`` naming the first difference.
    """
    from fedsec.data import DATASETS
    from fedsec.models import make_model

    info = DATASETS.get(cfg.data.dataset)
    reference = make_model(cfg.model.name, info.input_shape, info.num_classes).state_dict()
    check_state_fits(model_state, reference, f"{what} does not fit model '{cfg.model.name}'")
