"""PRG masks and (un)masking (fedsec.secagg.masking)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsec.secagg.keys import derive_key, generate_keypair
from fedsec.secagg.masking import (
    BLOCK_BYTES,
    add_masks,
    apply_masks,
    expand_mask,
    remove_pairwise_mask,
    remove_self_mask,
)

SEED_A = bytes(range(32))
SEED_B = bytes(range(1, 33))


def test_expand_mask_is_aes_ctr_and_deterministic() -> None:
    ref = Cipher(algorithms.AES(SEED_A), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 300))
    m64 = expand_mask(SEED_A, 300, np.uint64)
    assert m64.dtype == np.uint64 and m64.tobytes() == ref
    out = np.empty(3_000_000, dtype=np.uint32)  # > one internal chunk
    first = expand_mask(SEED_A, out.size, np.uint32, out=out).copy()
    again = expand_mask(SEED_A, out.size, np.uint32, out=out)
    assert again is out and np.array_equal(first, again)
    assert np.array_equal(first[:600], np.frombuffer(ref, np.uint32))
    assert not np.array_equal(first, expand_mask(SEED_B, out.size, np.uint32))
    assert expand_mask(SEED_A, 0).size == 0


def test_expand_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        expand_mask(bytes(16), 10)
    with pytest.raises(ValueError):
        expand_mask(SEED_A, 10, np.int32)
    with pytest.raises(ValueError):
        expand_mask(SEED_A, 10, np.uint32, out=np.empty(11, np.uint32))


def test_masked_vector_is_uniform() -> None:
    # Chi-square on the top 4 bits of 200k masked uint32 values (16 bins, 15 dof).
    # Critical value at significance 0.001 is 37.70; fixed seed, so deterministic.
    x = np.zeros(200_000, dtype=np.uint32)  # worst case: constant input
    y = apply_masks(x, SEED_A, [(1, SEED_B)], my_id=0)
    counts = np.bincount((y >> np.uint32(28)).astype(np.int64), minlength=16)
    expected = y.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.70, chi2


Arrays = list[npt.NDArray[Any]]


def _setup(
    n: int, d: int, dtype: npt.DTypeLike = np.uint32
) -> tuple[Arrays, Arrays, list[bytes], Callable[[int, int], bytes]]:
    session, rnd = b"sess", 7
    keys = [generate_keypair() for _ in range(n)]
    rng = np.random.default_rng(0)  # test inputs only, never masks
    xs = [
        rng.integers(0, np.iinfo(np.dtype(dtype)).max, d, dtype=dtype, endpoint=True)
        for _ in range(n)
    ]
    self_seeds = [bytes([i]) * 32 for i in range(n)]

    def seed(u: int, v: int) -> bytes:
        return derive_key(keys[u][0], keys[v][1], session=session, round=rnd, purpose="mask")

    ys = [
        apply_masks(xs[u], self_seeds[u], [(v, seed(u, v)) for v in range(n) if v != u], u)
        for u in range(n)
    ]
    return xs, ys, self_seeds, seed


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_masks_cancel(dtype: npt.DTypeLike) -> None:
    xs, ys, self_seeds, _ = _setup(5, 1000, dtype)
    for x, y in zip(xs, ys, strict=True):
        assert not np.array_equal(x, y)
    total = np.sum(ys, axis=0, dtype=dtype)
    for s in self_seeds:
        remove_self_mask(total, s)
    assert np.array_equal(total, np.sum(xs, axis=0, dtype=dtype))


def test_unmask_with_one_dropped_client() -> None:
    n, dropped = 5, 2
    xs, ys, self_seeds, seed = _setup(n, 1000)
    survivors = [u for u in range(n) if u != dropped]
    total = np.asarray(np.sum([ys[u] for u in survivors], axis=0), dtype=np.uint32)
    scratch = np.empty_like(total)
    for v in survivors:
        remove_self_mask(total, self_seeds[v], scratch=scratch)
        # server reconstructed the dropped client's mask key: s_uv seen from u's side
        remove_pairwise_mask(total, seed(dropped, v), dropped, v, scratch=scratch)
    assert np.array_equal(total, np.sum([xs[u] for u in survivors], axis=0, dtype=np.uint32))


def test_apply_masks_leaves_input_and_rejects_self_edge() -> None:
    x = np.arange(10, dtype=np.uint32)
    apply_masks(x, SEED_A, [(1, SEED_B)], my_id=0)
    assert np.array_equal(x, np.arange(10, dtype=np.uint32))
    with pytest.raises(ValueError):
        apply_masks(x, SEED_A, [(0, SEED_B)], my_id=0)


def test_apply_masks_in_place_masks_the_given_vector() -> None:
    x = np.arange(1000, dtype=np.uint32)
    copy = apply_masks(x.copy(), bytes(range(32)), [(2, bytes(32))], 1)
    same = apply_masks(x, bytes(range(32)), [(2, bytes(32))], 1, in_place=True)
    assert same is x and np.array_equal(same, copy)
    with pytest.raises(ValueError, match="contiguous"):
        apply_masks(np.arange(10, dtype=np.uint32)[::2], bytes(32), [], 1, in_place=True)


def _expand_then_add(
    vector: npt.NDArray[Any], add: list[bytes], subtract: list[bytes]
) -> npt.NDArray[Any]:
    """Reference: each mask expanded at full length, then added (the unfused way)."""
    y = vector.copy()
    for seed in add:
        np.add(y, expand_mask(seed, y.size, y.dtype), out=y)
    for seed in subtract:
        np.subtract(y, expand_mask(seed, y.size, y.dtype), out=y)
    return y


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("blocks", [0.0, 1e-5, 1.0, 2.5])
def test_fused_masks_equal_full_length_masks(dtype: npt.DTypeLike, blocks: float) -> None:
    # Lengths around the block size: the keystream must resume exactly across blocks.
    size = round(blocks * BLOCK_BYTES / np.dtype(dtype).itemsize) + (1 if blocks else 0)
    x = np.random.default_rng(1).integers(0, 2**32, size, dtype=np.uint64).astype(dtype)
    seeds = [bytes([i]) * 32 for i in range(5)]
    expected = _expand_then_add(x, seeds[:3], seeds[3:])
    got = add_masks(x.copy(), seeds[:3], seeds[3:])
    assert np.array_equal(got, expected)
    small = np.empty(7, dtype=dtype)  # a scratch too small is replaced, never overrun
    assert np.array_equal(add_masks(x.copy(), seeds[:3], seeds[3:], scratch=small), expected)
    whole = np.empty(size + 9, dtype=dtype)
    assert np.array_equal(add_masks(x.copy(), seeds[:3], seeds[3:], scratch=whole), expected)


def test_apply_masks_equals_expand_then_add_over_many_blocks() -> None:
    x = np.arange(3 * BLOCK_BYTES // 4 + 11, dtype=np.uint32)
    pairwise = [(0, SEED_B), (4, bytes(range(2, 34))), (9, bytes(32))]
    expected = _expand_then_add(x, [SEED_A, bytes(range(2, 34)), bytes(32)], [SEED_B])
    assert np.array_equal(apply_masks(x, SEED_A, pairwise, my_id=3), expected)


def test_masking_never_holds_a_full_length_mask() -> None:
    # Fused: one block of keystream at a time, whatever the vector's length.
    x = np.zeros(1 << 20, dtype=np.uint32)  # 4 MiB
    pairwise = [(2, SEED_B), (3, bytes(32))]
    tracemalloc.start()
    try:
        apply_masks(x, SEED_A, pairwise, my_id=1, in_place=True)
        remove_self_mask(x, SEED_A)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * BLOCK_BYTES, peak
    assert np.array_equal(x, _expand_then_add(np.zeros_like(x), [SEED_B, bytes(32)], []))


def test_bad_seed_or_self_edge_leaves_the_vector_unchanged() -> None:
    x = np.arange(1000, dtype=np.uint32)
    with pytest.raises(ValueError, match="own neighbour"):
        apply_masks(x, SEED_A, [(2, SEED_B), (1, SEED_B)], my_id=1, in_place=True)
    with pytest.raises(ValueError, match="32 bytes"):
        apply_masks(x, SEED_A, [(2, SEED_B), (3, bytes(31))], my_id=1, in_place=True)
    with pytest.raises(ValueError, match="32 bytes"):
        add_masks(x, [SEED_A], [bytes(16)])
    assert np.array_equal(x, np.arange(1000, dtype=np.uint32))
    frozen = np.arange(10, dtype=np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        add_masks(frozen, [SEED_A])
    with pytest.raises(ValueError, match="uint32 or uint64"):
        add_masks(np.zeros(4, dtype=np.int32), [SEED_A])
    assert add_masks(x, [], []) is x and np.array_equal(x, np.arange(1000, dtype=np.uint32))
