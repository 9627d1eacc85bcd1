"""fedsec.npy: Flower Array payloads written as np.save writes them, read without trusting them."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsec.models import make_model
from fedsec.npy import record_from_state_dict, state_dict_from_record, to_array, to_numpy

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.linspace(-1, 1, 7, dtype=np.float64),
    np.array(5, dtype=np.int64),  # 0-d, as BatchNorm's num_batches_tracked
    np.zeros((2, 0, 3), dtype=np.float32),  # empty
    np.array([True, False]),
    np.arange(24, dtype=np.int32).reshape(2, 3, 4)[:, ::2],  # not contiguous
    np.ones((1, 3, 8, 8), dtype=np.float16),
]


@pytest.mark.parametrize("values", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_to_array_writes_the_bytes_np_save_writes(values: np.ndarray) -> None:
    ours, flowers = to_array(values), Array(values)
    assert ours.data == flowers.data
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (
        flowers.dtype,
        tuple(flowers.shape),
        flowers.stype,
    )
    back = to_numpy(ours)
    assert back.dtype == values.dtype and back.shape == values.shape
    np.testing.assert_array_equal(back, values)
    assert back.flags.writeable  # as np.load's result: the caller may change it


def test_a_fortran_ordered_array_is_sent_row_major_with_the_same_values() -> None:
    values = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(Array(to_array(values).numpy()).numpy(), values)
    # ... and a column-major payload from np.save is read correctly too.
    np.testing.assert_array_equal(to_numpy(Array(values)), values)


def _raw(header: str, body: bytes = b"") -> bytes:
    """A version 1.0 ``.npy`` payload with this header text, as a hostile peer may write it."""
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


_GOOD = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"


def _payload(values: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    fp = io.BytesIO()
    if version is None:
        np.save(fp, values, allow_pickle=False)
    else:
        np.lib.format.write_array(fp, values, version=version, allow_pickle=False)
    return fp.getvalue()


def test_headers_other_than_np_saves_are_parsed_and_read_alike() -> None:
    values = np.arange(10, dtype=np.float32)
    v2 = Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=_payload(values, (2, 0)))
    np.testing.assert_array_equal(to_numpy(v2), values)
    big = values.astype(">f4")
    swapped = Array(dtype=">f4", shape=(10,), stype="numpy.ndarray", data=_payload(big))
    read = to_numpy(swapped)
    assert read.dtype == np.float32  # native order
    np.testing.assert_array_equal(read, values)


@pytest.mark.parametrize(
    ("payload", "shape", "dtype", "message"),
    [
        # A header claiming 1 TiB over 8 bytes: refused before anything is allocated.
        (
            _payload(np.zeros(2, np.float32)).replace(b"(2,)", b"(274877906944,)"),
            (2,),
            "float32",
            "payload has shape (274877906944,), declared (2,)",
        ),
        (_payload(np.zeros(2, np.float32))[:-1], (2,), "float32", "holds 7 bytes of data"),
        (_payload(np.zeros(2, np.float64)), (2,), "float32", "payload has dtype"),
        (b"not an npy file at all", (2,), "float32", "the magic string is not correct"),
        (_payload(np.zeros(2, np.float32)), (2,), "object", "only numeric arrays"),
        (_payload(np.zeros(2, np.float32)), (1,) * 65, "float32", "65 dimensions, at most 64"),
        (_payload(np.zeros(2, np.float32)), (2,), "f4" * 1000, "has dtype 'f4f4"),
        # Red team (numpy raised other types, or several lines, on these headers):
        (
            _raw("{'descr': '<f4', 'fortran_order': False, 'shape': (2,\n"),
            (2,),
            "float32",
            ".npy header",
        ),
        (_raw("{1: 1, 'a': 2}\n"), (2,), "float32", ".npy header"),
        (
            _raw("{'descr': (), 'fortran_order': False, 'shape': (2,), }\n"),
            (2,),
            "float32",
            ".npy header",
        ),
        (
            _raw("{'descr':'<f4','fortran_order':False,'shape':(" + "-" * 3000 + "1,),}\n"),
            (2,),
            "float32",
            ".npy header",
        ),
        (_raw(_GOOD + " " * (4097 - len(_GOOD)) + "\n"), (2,), "float32", ".npy header"),
        (_payload(np.zeros(2, np.float32)), (2,), "float128", "only numeric arrays"),
        (_payload(np.zeros(2, np.float32)), (10**30,), "float32", "has shape"),
    ],
    ids=[
        "huge-claim",
        "truncated",
        "dtype-lie",
        "not-npy",
        "object",
        "ndim",
        "dtype-text",
        "unclosed-header",
        "odd-keys",
        "odd-descr",
        "deep-header",
        "4k-header",
        "float128",
        "huge-dim",
    ],
)
def test_a_payload_that_disagrees_with_its_metadata_is_refused_in_one_line(
    payload: bytes, shape: tuple[int, ...], dtype: str, message: str
) -> None:
    array = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=payload)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        to_numpy(array, "w")
    assert "\n" not in str(caught.value)


def test_a_record_key_cannot_forge_a_log_line() -> None:
    """A server chooses the record's keys: they are quoted in the one-line error."""
    good = Array(np.zeros(2, dtype=np.float32))
    bad = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=good.data)
    with pytest.raises(ValueError) as caught:
        state_dict_from_record(ArrayRecord({"w\nINFO forged": bad}))
    assert "\n" not in str(caught.value) and "INFO forged" in str(caught.value)


def test_state_dicts_round_trip_as_flowers_records_do() -> None:
    torch.manual_seed(0)
    state = make_model("resnet", (3, 32, 32), 10).state_dict()
    ours, flowers = record_from_state_dict(state), ArrayRecord(state)
    assert list(ours.keys()) == list(flowers.keys())
    for name in state:
        assert ours[name].data == flowers[name].data
    back = state_dict_from_record(flowers)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor) and back[name].dtype == tensor.dtype
