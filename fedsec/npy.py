"""The ``.npy`` payloads of Flower ``Array`` objects: read without trusting them, write fast.

A Flower ``Array`` carries metadata (``dtype``, ``shape``, ``stype``) and
``data``, a ``.npy`` file with its own header, which is what crosses the wire
between a server and its clients. Flower converts with ``np.save`` and
``np.load``. Both directions are the per-client overhead of every round, and
``np.load`` is the wrong reader for bytes from a peer:

- it trusts the header and allocates what it claims before reading a byte of
  data (a 1 TiB claim with an 8-byte payload raises ``MemoryError``);
- it parses that header with ``ast.literal_eval`` on every call (about half
  its cost for a model's small arrays).

So :func:`payload_view` parses only the bounded header, checks dtype, shape
and the exact byte length against what the caller expects, and only then views
the bytes in place (``np.frombuffer``, no copy). A header byte-identical to
the one ``np.save`` writes for that dtype and shape (what every well-behaved
peer sends) is recognised by comparing bytes, without parsing it. Writing
(:func:`to_array`) builds the same bytes as ``np.save`` from a cached header
and the array's buffer. The server's robust path (:mod:`fedsec.strategies.arrays`)
and the client's (:func:`state_dict_from_record`, :func:`record_from_state_dict`)
share these readers, so both sides refuse a malformed payload with one line.

Only numpy and torch are imported: a SuperNode's ClientApp imports this with
its training side.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedsec.checks import short_repr

__all__ = [
    "NPY_MAX_HEADER",
    "NpyLayout",
    "payload_view",
    "read_npy_layout",
    "record_from_state_dict",
    "state_dict_from_record",
    "to_array",
    "to_numpy",
]

#: Largest ``.npy`` header accepted. np.save writes ~120 bytes for a float array
#: (padded to 64); numpy's own limit is 10,000 (literal_eval cost).
NPY_MAX_HEADER = 4096
_NPY_PREFIX = 10  # magic (6) + version (2) + header length (2, or 4 in version 2.0)
_MAX_DIMS = 64  # numpy's own limit (NPY_MAXDIMS)
_MAX_DTYPE_TEXT = 32  # "float32", "<f8", ">i4": a few characters


@dataclass(frozen=True)
class NpyLayout:
    """What a ``.npy`` payload's header declares, and where its data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int


def read_npy_layout(data: bytes) -> NpyLayout:
    """Parse the header of a ``.npy`` payload without touching (or allocating) its data.

    Raises
    ------
    ValueError
        In one line, if the magic, version or header is malformed or longer
        than :data:`NPY_MAX_HEADER` (numpy's own errors, whatever their type
        or length, are turned into that line: the header is the sender's).
    """
    # Only the header's bytes are copied; ``data`` may be a GiB.
    fp = io.BytesIO(memoryview(data)[: _NPY_PREFIX + 2 + NPY_MAX_HEADER])
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(
                fp, max_header_size=NPY_MAX_HEADER
            )
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(
                fp, max_header_size=NPY_MAX_HEADER
            )
        else:  # 3.0 only adds utf-8 field names, which numeric arrays never have
            raise ValueError(f".npy format version {version} is not supported")
        return NpyLayout(dtype, tuple(int(s) for s in shape), bool(fortran_order), fp.tell())
    except Exception as err:  # TokenError, TypeError, IndexError, RecursionError, ...
        detail = " ".join(str(err).split())  # numpy's messages can span lines
        raise ValueError(f".npy header: {short_repr(detail)}") from None


@functools.lru_cache(maxsize=1024)
def _c_order_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact bytes ``np.save`` writes before the data of a C-order array.

    Version 1.0 (what ``np.save`` picks for any header under 64 KiB), with its
    padding; cached per dtype and shape, a model has a handful of each.
    """
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    fp = io.BytesIO()
    np.lib.format.write_array_header_1_0(fp, header)
    return fp.getvalue()


def payload_view(
    array: Array, name: str, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray | str:
    """``array``'s values as a flat read-only view of its bytes, or why they are refused.

    The ``.npy`` header must declare exactly ``dtype`` (either byte order) and
    ``shape``, and the payload must hold exactly that many bytes; all checked
    before any data is read, so a lying header cannot make the caller allocate
    or decode more than ``shape`` allows. No copy is made (``np.frombuffer``)
    unless the payload is column-major. Raises ``ValueError`` on a malformed
    header.
    """
    label = short_repr(name)  # a record key is the sender's: quoted, cut to one line
    if array.stype != SType.NUMPY:
        return f"array {label} has stype {short_repr(array.stype)}, expected {SType.NUMPY}"
    data = array.data
    if not isinstance(data, bytes):
        return f"array {label} payload is {type(data).__name__}, not bytes"
    expected_header = _c_order_header(dtype, shape)
    if data.startswith(expected_header):  # what np.save writes: nothing to parse
        layout = NpyLayout(dtype, shape, False, len(expected_header))
    else:
        layout = read_npy_layout(data)
    # Same type and width; a big-endian payload is converted on copy. float64,
    # complex or bool sent as float32 never reach the (lossy) assignment below.
    if layout.dtype.newbyteorder("=") != dtype:
        return f"array {label} payload has dtype {short_repr(layout.dtype)}, declared {dtype}"
    if layout.shape != shape:
        return f"array {label} payload has shape {short_repr(layout.shape)}, declared {shape}"
    size = math.prod(shape)
    expected = size * dtype.itemsize
    if len(data) - layout.offset != expected:
        return (
            f"array {label} payload holds {len(data) - layout.offset} bytes of data, "
            f"its shape and dtype need {expected}"
        )
    values = np.frombuffer(data, dtype=layout.dtype, count=size, offset=layout.offset)
    if layout.fortran_order:  # column-major payload: same values, transposed layout
        values = values.reshape(shape[::-1]).transpose().reshape(-1)
    return values


def to_numpy(array: Array, name: str = "array") -> np.ndarray:
    """``array``'s values as a new, writable, native-order array of its declared shape.

    What ``Array.numpy()`` returns for a well-formed payload, read by
    :func:`payload_view`: the payload must agree with the metadata.

    Raises
    ------
    ValueError
        In one line, if the dtype is not numeric or the payload disagrees with
        the metadata (header, shape or length).
    """
    label = short_repr(name)  # a record key is the sender's: quoted, cut to one line
    # The metadata is the sender's: bounded before numpy parses it or a header is cached.
    if not isinstance(array.dtype, str) or len(array.dtype) > _MAX_DTYPE_TEXT:
        raise ValueError(f"array {label} has dtype {short_repr(array.dtype)}")
    if len(array.shape) > _MAX_DIMS:
        raise ValueError(f"array {label} has {len(array.shape)} dimensions, at most {_MAX_DIMS}")
    try:
        dtype = np.dtype(array.dtype).newbyteorder("=")  # a big-endian payload is converted
    except TypeError:
        raise ValueError(f"array {label} has dtype {short_repr(array.dtype)}") from None
    # Numeric and at most 8 bytes a value (16 for complex): what numpy and torch share
    # (float128 and complex256 would pass numpy and fail in torch.from_numpy).
    if dtype.kind not in "biufc" or dtype.itemsize > (16 if dtype.kind == "c" else 8):
        raise ValueError(f"array {label} has dtype {dtype}; only numeric arrays are read")
    shape = tuple(int(s) for s in array.shape)
    if any(not 0 <= s < 2**63 for s in shape):  # also bounds the header cached below
        raise ValueError(f"array {label} has shape {short_repr(shape)}")
    values = payload_view(array, name, shape, dtype)
    if isinstance(values, str):
        raise ValueError(values)
    return np.array(values, dtype=dtype).reshape(shape)


def to_array(values: np.ndarray) -> Array:
    """An ``Array`` holding ``values``, with the bytes ``np.save`` would write.

    Byte-identical to ``Array(values)`` for any array that is not
    Fortran-ordered (np.save writes those column-major; here every payload is
    row-major, with the same values).
    """
    dtype = values.dtype
    if dtype.hasobject:
        raise ValueError("object arrays cannot be sent")
    shape = tuple(int(s) for s in values.shape)
    return Array(
        dtype=str(dtype),
        shape=shape,
        stype=SType.NUMPY,
        data=_c_order_header(dtype, shape) + values.tobytes(order="C"),
    )


def state_dict_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A torch state dict from ``record``, each payload checked (:func:`to_numpy`).

    Replaces ``ArrayRecord.to_torch_state_dict()``, which trusts every header.
    """
    return {name: torch.from_numpy(to_numpy(array, name)) for name, array in record.items()}


def record_from_state_dict(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state``'s tensors (replaces ``ArrayRecord(state_dict)``)."""
    return ArrayRecord(
        {name: to_array(tensor.detach().cpu().numpy()) for name, tensor in state.items()}
    )
