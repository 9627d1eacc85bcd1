"""Conversion between Flower ArrayRecords and flat update vectors.

The global model fixes an :class:`ArraySpec` (names, shapes, dtypes and each
array's slice of the flat vector). Client replies are checked against it and
copied straight into rows of one preallocated [n, d] tensor, so the rules work
on a single matrix and no per-layer arithmetic happens in Python.

A reply's payload is untrusted bytes: an ``Array`` carries metadata
(``dtype``, ``shape``, ``stype``) and ``data``, a ``.npy`` file with its own
header. ``np.load`` trusts that header and allocates what it claims before
reading a byte of data (a 1 TiB claim with an 8-byte payload raises
``MemoryError``). So :meth:`ArraySpec.flatten_into` never calls it: it reads
each payload with :func:`fedsec.npy.payload_view`, which checks dtype, shape
and the exact byte length against the spec before viewing the bytes in place
(``np.frombuffer``, no copy).

Non-float arrays. Only floating-point arrays are model weights that an
aggregation rule can average; the flat update vector holds those alone. A
model's integer arrays are buffers (BatchNorm's ``num_batches_tracked`` is an
int64 counter of 0-d shape), and a reply's are checked byte for byte like the
floats (dtype, exact shape, payload length) but never enter the rule. Their
new value (:meth:`ArraySpec.merge_integers`) is the element-wise lower median
of the accepted replies' values, never below the server's current value: for
a counter that is the server's count plus the median client's increment, as
Flower's FedAvg gives it up to the mean, but a minority of clients cannot
move it beyond the range of the honest clients' values, nor can anyone make
it go back. Boolean arrays stay at the server's value. Any other dtype
(complex, strings, objects) is refused when the spec is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedsec.checks import short_repr
from fedsec.npy import payload_view, to_array


@dataclass(frozen=True)
class ArraySpec:
    """Layout of a model's arrays: the float ones inside one flat float32 vector.

    ``names``, ``shapes`` and ``dtypes`` list every array of the record in its
    order; ``offsets`` gives each float array's start in the flat vector (for a
    non-float array, where it would start: it takes no room). ``dim`` counts
    the float values only. ``fixed`` holds the server's current value of each
    non-float array (see the module notes for their policy).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    dim: int
    fixed: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: ArrayRecord) -> ArraySpec:
        """Spec of the (trusted) global model's record.

        Raises
        ------
        ValueError
            If an array is neither floating point, integer nor boolean (updates
            are defined for floats; integer and boolean buffers have a policy).
        """
        names, shapes, dtypes, offsets = [], [], [], []
        fixed: dict[str, np.ndarray] = {}
        offset = 0
        for name, array in record.items():
            kind = np.dtype(array.dtype).kind
            if kind not in "fiub":
                raise ValueError(
                    f"array '{name}' has dtype {array.dtype}; only float, integer and "
                    "boolean arrays are supported"
                )
            names.append(name)
            shapes.append(tuple(array.shape))
            dtypes.append(array.dtype)
            offsets.append(offset)
            if kind == "f":
                offset += math.prod(array.shape)
            else:  # the trusted global model: its own header, read as numpy does
                value = np.array(array.numpy(), dtype=np.dtype(array.dtype), order="C")
                value.flags.writeable = False
                fixed[name] = value
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets), offset, fixed)

    def check(self, record: ArrayRecord) -> str | None:
        """Return why ``record`` does not match this spec, or None if it does.

        Only the metadata is checked here; :meth:`flatten_into` checks the
        payload itself, which a malicious client could make disagree with it.
        """
        if len(record) != len(self.names) or tuple(record.keys()) != self.names:
            missing = sorted(set(self.names) - set(record.keys()))
            extra = sorted(set(record.keys()) - set(self.names))
            if missing or extra:
                return (
                    f"array names differ (missing {short_repr(missing[:3])}, "
                    f"unexpected {short_repr(extra[:3])})"
                )
            return "arrays are in a different order"
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            array = record[name]
            if tuple(array.shape) != shape:
                return f"array '{name}' has shape {short_repr(array.shape)}, expected {shape}"
            if array.dtype != dtype:
                return f"array '{name}' has dtype {short_repr(array.dtype)}, expected {dtype}"
            if array.stype != SType.NUMPY:
                return f"array '{name}' has stype {short_repr(array.stype)}, expected {SType.NUMPY}"
        return None

    def flatten_into(
        self,
        record: ArrayRecord,
        out: torch.Tensor,
        others: dict[str, np.ndarray] | None = None,
    ) -> str | None:
        """Copy ``record``'s float arrays into the 1-D tensor ``out``; return a reason on failure.

        Each payload's ``.npy`` header must declare exactly the spec's dtype
        (either byte order) and shape, and the payload must hold exactly that
        many bytes; all of this is checked before any data is read, so a lying
        header cannot make the server allocate or decode more than the model's
        size. Non-float arrays get the same checks; their values are copied
        into ``others`` (name -> native-order array of the exact shape) when it
        is given. Fails (returning why) on any mismatch, on NaN or infinite
        values, or on any error while decoding; never raises for a malformed
        record.
        """
        flat = out.numpy()
        for name, shape, dtype, offset in zip(
            self.names, self.shapes, self.dtypes, self.offsets, strict=True
        ):
            try:
                if name in self.fixed:
                    reason = _read_other(record[name], name, shape, np.dtype(dtype), others)
                else:
                    reason = _copy_payload(record[name], name, shape, np.dtype(dtype), flat, offset)
            except Exception as err:  # any decoding failure excludes the reply
                kind = type(err).__name__
                reason = f"array '{name}' cannot be decoded ({kind}: {short_repr(err)})"
            if reason is not None:
                return reason
        if not torch.isfinite(out).all():
            return "update contains NaN or infinite values"
        return None

    def merge_integers(self, replies: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """New values of the non-float arrays from the accepted replies' values.

        Integer arrays: the element-wise lower median of ``replies`` (the
        ``others`` that :meth:`flatten_into` filled), but never below the
        server's current value. With ``k`` of ``n`` replies malicious, the
        result lies within the honest replies' range whenever
        ``k <= (n - 1) // 2``, and never leaves ``[server value, largest
        honest value]`` while ``k <= n // 2`` (an ``n = 2`` round with one liar
        keeps the server's count or takes the honest one). Boolean arrays keep
        the server's value. No reply: the server's values.
        """
        merged: dict[str, np.ndarray] = {}
        for name, current in self.fixed.items():
            if current.dtype.kind == "b" or not replies:
                merged[name] = current
                continue
            stacked = np.stack([reply[name] for reply in replies])
            lower_median = np.sort(stacked, axis=0)[(len(replies) - 1) // 2]
            merged[name] = np.asarray(np.maximum(lower_median, current), dtype=current.dtype)
        return merged

    def to_record(
        self, flat: torch.Tensor, others: Mapping[str, np.ndarray] | None = None
    ) -> ArrayRecord:
        """Split a flat vector back into a named ArrayRecord of the original dtypes and shapes.

        Non-float arrays come from ``others`` (e.g. :meth:`merge_integers`),
        else from the server's current values. 0-d arrays stay 0-d.
        """
        values = flat.detach().cpu().numpy()
        record = ArrayRecord()
        for name, shape, dtype, offset in zip(
            self.names, self.shapes, self.dtypes, self.offsets, strict=True
        ):
            if name in self.fixed:
                chunk = (others or self.fixed).get(name, self.fixed[name])
            else:
                size = math.prod(shape)
                # A contiguous slice reshaped stays contiguous, and keeps 0-d shapes
                # (np.ascontiguousarray would make them (1,)).
                chunk = values[offset : offset + size].reshape(shape).astype(dtype, copy=False)
            record[name] = to_array(np.asarray(chunk, dtype=np.dtype(dtype)).reshape(shape))
        return record


def _read_other(
    array: Array,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    others: dict[str, np.ndarray] | None,
) -> str | None:
    """Check a non-float payload like a float one; copy its values into ``others``."""
    values = payload_view(array, name, shape, dtype)
    if isinstance(values, str):
        return values
    if others is not None:
        others[name] = np.array(values, dtype=dtype).reshape(shape)  # native byte order
    return None


def _copy_payload(
    array: Array,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    flat: np.ndarray,
    offset: int,
) -> str | None:
    """Check one payload's header and length against the spec, then copy it into ``flat``."""
    values = payload_view(array, name, shape, dtype)
    if isinstance(values, str):
        return values
    flat[offset : offset + values.size] = values
    return None
