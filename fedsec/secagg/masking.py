"""Mask expansion and (un)masking for SecAgg / SecAgg+.

A client ``u`` with input ``x_u`` (unsigned integers mod ``2**bits``) sends

``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(s_uv)  (mod 2**bits)``

with ``sign(u, v) = +1`` if ``u < v`` else ``-1``, so the pairwise masks cancel
in the sum over all clients (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Section 4; with the neighbour
graph ``N(u)`` of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020). The PRG is the AES-256-CTR keystream
keyed by the 32-byte seed, as in Google's production deployment.

Uint arithmetic wraps modulo ``2**bits`` for free, so all operations are
in-place ``np.add`` / ``np.subtract`` with ``out=``.

Masks are never materialised at full length: :func:`add_masks` walks the
vector in cache-sized blocks and, for each block, runs every seed's keystream
into one small reusable buffer and adds it into the block while both are still
in cache. CTR mode makes a keystream resumable, so the result is bit-identical
to expanding each mask whole (:func:`expand_mask`) and adding it, but memory
traffic drops from three passes over the vector per mask to about one pass in
all, which leaves the client's masking cost close to the AES keystream itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "add_masks",
    "apply_masks",
    "expand_mask",
    "remove_pairwise_mask",
    "remove_self_mask",
]

UIntArray = npt.NDArray[np.unsignedinteger[Any]]

# A fixed all-zero counter block is safe: every seed (self seed b_u, or the
# pairwise s_uv derived per session, round and purpose) keys exactly one
# keystream per round, so no (key, counter) pair is ever reused.
_ZERO_NONCE = bytes(16)
_CHUNK = 1 << 20  # bytes of zeros fed per update_into call
#: Bytes of vector per block in :func:`add_masks`: a block and its keystream
#: buffer (2 x 256 KiB) stay in a 1-2 MiB L2 cache across all seeds.
BLOCK_BYTES = 1 << 18
_ZEROS = bytes(max(_CHUNK, BLOCK_BYTES))
_ALLOWED = (np.dtype(np.uint32), np.dtype(np.uint64))


def _check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt not in _ALLOWED:
        raise ValueError(f"dtype must be uint32 or uint64, got {dt}")
    return dt


def expand_mask(
    seed: bytes,
    length: int,
    dtype: npt.DTypeLike = np.uint32,
    out: UIntArray | None = None,
) -> UIntArray:
    """Expand a 32-byte seed into ``length`` pseudorandom unsigned integers.

    The mask is the AES-256-CTR keystream with key ``seed`` and an all-zero
    initial counter block, written by ``encryptor.update_into`` directly into a
    preallocated buffer and viewed as ``dtype`` (native byte order). The zero
    counter is safe because each seed is used for one keystream per round.

    Parameters
    ----------
    seed : bytes
        32-byte AES-256 key.
    length : int
        Number of elements.
    dtype : numpy dtype, default ``np.uint32``
        ``np.uint32`` or ``np.uint64``.
    out : numpy.ndarray, optional
        C-contiguous buffer of ``length`` elements of ``dtype`` to overwrite;
        reuse it across calls to avoid allocation (about 10x faster).

    Returns
    -------
    numpy.ndarray
        ``out`` (or a new array) holding the mask; deterministic given ``seed``.
    """
    _check_seed(seed)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    dt = _check_dtype(dtype)
    if out is None:
        out = np.empty(length, dtype=dt)
    elif out.dtype != dt or out.shape != (length,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous ({length},) array of {dt}")
    encryptor = _stream(seed)
    buf = out.data.cast("B")
    zeros = memoryview(_ZEROS)
    total = buf.nbytes
    offset = 0
    while offset < total:
        n = min(_CHUNK, total - offset)
        encryptor.update_into(zeros[:n], buf[offset : offset + n])
        offset += n
    return out


def _check_vector(vector: UIntArray) -> np.dtype[Any]:
    if vector.ndim != 1:
        raise ValueError(f"vector must be 1-D, got shape {vector.shape}")
    return _check_dtype(vector.dtype)


def _check_seed(seed: bytes) -> None:
    if len(seed) != 32:
        raise ValueError(f"seed must be 32 bytes, got {len(seed)}")


def add_masks(
    vector: UIntArray,
    add: Sequence[bytes] = (),
    subtract: Sequence[bytes] = (),
    *,
    scratch: UIntArray | None = None,
) -> UIntArray:
    """Add and subtract PRG masks in place: ``vector += sum PRG(a) - sum PRG(s)``.

    Fused keystream and addition: the vector is processed in blocks of
    :data:`BLOCK_BYTES`; for each block every seed's AES-256-CTR stream (kept
    open across blocks) is written into one block-sized buffer and added to
    (or subtracted from) the block while it is in cache. The result equals,
    bit for bit, adding each :func:`expand_mask` of full length modulo
    ``2**bits``, with one block of scratch memory instead of a full vector
    and one pass over the vector instead of three per mask. This is the
    masking step of Bonawitz et al., "Practical Secure Aggregation for
    Privacy-Preserving Machine Learning", CCS 2017, Section 4, and of its
    unmasking at the server.

    Parameters
    ----------
    vector : numpy.ndarray
        1-D ``uint32`` or ``uint64`` array; modified in place.
    add, subtract : sequence of bytes
        32-byte seeds whose masks are added, respectively subtracted.
    scratch : numpy.ndarray, optional
        A buffer of the vector's dtype whose first block (or whole, if
        shorter) is reused for the keystream; a small one is allocated
        otherwise.

    Returns
    -------
    numpy.ndarray
        ``vector``.

    Raises
    ------
    ValueError
        On a bad dtype or layout, or a seed that is not 32 bytes; ``vector``
        is then left unchanged.
    """
    dt = _check_vector(vector)
    if not vector.flags.writeable:
        raise ValueError("masks are added in place: the vector must be writeable")
    for seed in (*add, *subtract):
        _check_seed(seed)
    size = vector.size
    if size == 0 or not (add or subtract):
        return vector
    step = min(size, BLOCK_BYTES // dt.itemsize)
    if (
        scratch is not None
        and scratch.dtype == dt
        and scratch.ndim == 1
        and scratch.flags.c_contiguous
        and scratch.size >= step
    ):
        buffer = scratch[:step]
    else:
        buffer = np.empty(step, dtype=dt)
    streams = [(_stream(seed), np.add) for seed in add] + [
        (_stream(seed), np.subtract) for seed in subtract
    ]
    raw, zeros = buffer.data.cast("B"), memoryview(_ZEROS)
    for start in range(0, size, step):
        stop = min(start + step, size)
        block, mask = vector[start:stop], buffer[: stop - start]
        nbytes = mask.nbytes
        into, source = raw[:nbytes], zeros[:nbytes]
        for stream, op in streams:
            stream.update_into(source, into)
            op(block, mask, out=block)
    return vector


def _stream(seed: bytes) -> Any:
    """An AES-256-CTR keystream at counter 0, the PRG of :func:`expand_mask`."""
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()


def apply_masks(
    vector: UIntArray,
    self_seed: bytes,
    pairwise: Sequence[tuple[int, bytes]],
    my_id: int,
    *,
    in_place: bool = False,
) -> UIntArray:
    """Mask a client's encoded input (Bonawitz et al. 2017, MaskedInputCollection).

    Computes ``y = x + PRG(self_seed) + sum_v sign(my_id, v) * PRG(s_uv)``
    modulo ``2**bits`` with ``sign = +1`` if ``my_id < v`` else ``-1``, fused
    block by block (:func:`add_masks`).

    Parameters
    ----------
    vector : numpy.ndarray
        1-D ``uint32`` or ``uint64`` encoded input; not modified.
    self_seed : bytes
        32-byte self-mask seed ``b_u``.
    pairwise : sequence of (int, bytes)
        ``(v, s_uv)`` for each neighbour ``v``, ``s_uv`` from
        :func:`fedsec.secagg.keys.derive_key` with ``purpose="mask"``.
    my_id : int
        This client's id ``u``.
    in_place : bool, default False
        Mask ``vector`` itself (it must be C-contiguous) instead of a copy.

    Returns
    -------
    numpy.ndarray
        The masked vector ``y`` (``vector`` itself when ``in_place``).

    Raises
    ------
    ValueError
        On a bad vector or seed, or ``my_id`` among its own neighbours; checked
        before any mask is added, so an in-place ``vector`` is left unchanged.
    """
    dt = _check_vector(vector)
    if in_place and not vector.flags.c_contiguous:
        raise ValueError("in-place masking needs a C-contiguous vector")
    if any(peer == my_id for peer, _ in pairwise):
        raise ValueError(f"client {my_id} cannot be its own neighbour")
    y: UIntArray = vector if in_place else np.array(vector, dtype=dt, copy=True, order="C")
    plus = [self_seed] + [seed for peer, seed in pairwise if my_id < peer]
    minus = [seed for peer, seed in pairwise if my_id > peer]
    return add_masks(y, plus, minus)


def remove_self_mask(
    total: UIntArray, self_seed: bytes, *, scratch: UIntArray | None = None
) -> UIntArray:
    """Subtract a surviving client's self mask ``PRG(b_u)`` from ``total`` in place.

    Parameters
    ----------
    total : numpy.ndarray
        1-D ``uint32`` / ``uint64`` running sum of masked inputs; modified.
    self_seed : bytes
        The survivor's self-mask seed ``b_u``, reconstructed from its shares.
    scratch : numpy.ndarray, optional
        Reusable buffer of ``total``'s dtype for the keystream (see
        :func:`add_masks`).

    Returns
    -------
    numpy.ndarray
        ``total``.
    """
    return add_masks(total, subtract=[self_seed], scratch=scratch)


def remove_pairwise_mask(
    total: UIntArray,
    seed: bytes,
    dropped_id: int,
    survivor_id: int,
    *,
    scratch: UIntArray | None = None,
) -> UIntArray:
    """Cancel the mask a survivor shared with a dropped client, in place.

    Survivor ``v``'s masked input contains ``sign(v, u) * PRG(s_uv)`` for the
    dropped neighbour ``u``, which no longer cancels; the server recomputes
    ``s_uv`` from ``u``'s reconstructed mask key and removes it (Bonawitz et
    al. 2017, Unmasking).

    Parameters
    ----------
    total : numpy.ndarray
        1-D ``uint32`` / ``uint64`` running sum of masked inputs; modified.
    seed : bytes
        Pairwise seed ``s_uv``.
    dropped_id : int
        The dropped client ``u``.
    survivor_id : int
        The surviving neighbour ``v`` whose input holds the mask.
    scratch : numpy.ndarray, optional
        Reusable buffer of ``total``'s dtype for the keystream (see
        :func:`add_masks`).

    Returns
    -------
    numpy.ndarray
        ``total``.
    """
    if dropped_id == survivor_id:
        raise ValueError("dropped_id and survivor_id must differ")
    if survivor_id < dropped_id:  # survivor added +PRG(s_uv)
        return add_masks(total, subtract=[seed], scratch=scratch)
    return add_masks(total, add=[seed], scratch=scratch)  # survivor added -PRG(s_uv)
