"""Conversion between Flower ArrayRecords and flat update vectors.

The global model fixes an :class:`ArraySpec` (names, shapes, dtypes and each
array's slice of the flat vector). Client replies are checked against it and
copied straight into rows of one preallocated [n, d] tensor, so the rules work
on a single matrix and no per-layer arithmetic happens in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class ArraySpec:
    """Layout of a model's arrays inside one flat float32 vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    dim: int

    @classmethod
    def from_record(cls, record: ArrayRecord) -> ArraySpec:
        """Spec of the (trusted) global model's record.

        Raises
        ------
        ValueError
            If an array is not floating point (updates are only defined for floats).
        """
        names, shapes, dtypes, offsets = [], [], [], []
        offset = 0
        for name, array in record.items():
            if not np.issubdtype(np.dtype(array.dtype), np.floating):
                raise ValueError(
                    f"array '{name}' has dtype {array.dtype}; only float arrays are supported"
                )
            names.append(name)
            shapes.append(tuple(array.shape))
            dtypes.append(array.dtype)
            offsets.append(offset)
            offset += math.prod(array.shape)
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets), offset)

    def check(self, record: ArrayRecord) -> str | None:
        """Return why ``record`` does not match this spec, or None if it does.

        Only the metadata is checked here; :meth:`flatten_into` checks the
        payload itself, which a malicious client could make disagree with it.
        """
        if tuple(record.keys()) != self.names:
            missing = sorted(set(self.names) - set(record.keys()))
            extra = sorted(set(record.keys()) - set(self.names))
            if missing or extra:
                return f"array names differ (missing {missing[:3]}, unexpected {extra[:3]})"
            return "arrays are in a different order"
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            array = record[name]
            if tuple(array.shape) != shape:
                return f"array '{name}' has shape {tuple(array.shape)}, expected {shape}"
            if array.dtype != dtype:
                return f"array '{name}' has dtype {array.dtype}, expected {dtype}"
        return None

    def flatten_into(self, record: ArrayRecord, out: torch.Tensor) -> str | None:
        """Copy ``record``'s arrays into the 1-D tensor ``out``; return a reason on failure.

        Fails (returning why) if a payload does not deserialise to the declared
        shape, or holds NaN or infinite values.
        """
        flat = out.numpy()
        for name, shape, offset in zip(self.names, self.shapes, self.offsets, strict=True):
            try:
                values = record[name].numpy()
            except (TypeError, ValueError, OSError) as err:
                return f"array '{name}' cannot be decoded ({err})"
            if values.shape != shape:
                return f"array '{name}' payload has shape {values.shape}, declared {shape}"
            size = values.size
            flat[offset : offset + size] = values.reshape(-1)
        if not torch.isfinite(out).all():
            return "update contains NaN or infinite values"
        return None

    def to_record(self, flat: torch.Tensor) -> ArrayRecord:
        """Split a flat vector back into a named ArrayRecord of the original dtypes."""
        values = flat.detach().cpu().numpy()
        record = ArrayRecord()
        for name, shape, dtype, offset in zip(
            self.names, self.shapes, self.dtypes, self.offsets, strict=True
        ):
            size = math.prod(shape)
            chunk = values[offset : offset + size].reshape(shape).astype(dtype, copy=False)
            record[name] = Array(np.ascontiguousarray(chunk))
        return record
