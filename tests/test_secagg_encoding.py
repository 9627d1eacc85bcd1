"""Fixed-point encoding for secure aggregation (fedsec.secagg.encoding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsec.secagg.encoding import MAX_BITS, FixedPointEncoder, max_bits_for


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_sum_round_trip_within_quantisation_bound(seed: int) -> None:
    n, d, clip = 7, 257, 2.0
    enc = FixedPointEncoder(clip=clip, bits=16, num_clients=n)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(n)]
    total = np.zeros(d, dtype=enc.dtype)
    for x in xs:
        code = enc.encode(x, generator=gen)
        assert code.dtype == np.uint32 and code.shape == (d,)
        assert int(code.max()) <= enc.levels
        np.add(total, code, out=total)
    decoded = enc.decode_sum(total, n).double()
    expected = torch.stack([x.clamp(-clip, clip) for x in xs]).sum(0)
    err = (decoded - expected).abs().max().item()
    # float32 output adds at most half an ulp of |sum| <= n * clip.
    assert err <= enc.quantisation_bound(n) + n * clip * 2.0**-24
    assert enc.quantisation_bound(n) == pytest.approx(n * 2 * clip / 65535)


def test_stochastic_rounding_is_unbiased() -> None:
    # bits=4: one step is 2/15 ~ 0.133, so deterministic rounding would be off
    # by up to 0.067; the mean error over 20000 draws has std <= 0.067/sqrt(20000)
    # ~ 5e-4 per coordinate, and we allow 5e-3.
    enc = FixedPointEncoder(clip=1.0, bits=4, num_clients=1)
    x = torch.tensor([-0.93, -0.31, 0.0, 0.05, 0.51, 0.77], dtype=torch.float64)
    gen = torch.Generator().manual_seed(123)
    draws = 20000
    acc = torch.zeros_like(x)
    for _ in range(draws // 100):
        batch = torch.stack(
            [enc.decode_sum(enc.encode(x, generator=gen), 1).double() for _ in range(100)]
        )
        acc += batch.sum(0)
    mean_err = (acc / draws - x).abs().max().item()
    assert mean_err < 5e-3


def test_wraparound_addition_then_decode_equals_plain_sum() -> None:
    # Masks in Z_{2^32}: adding random uint32 masks that cancel must leave the
    # decoded sum unchanged, with numpy's silent wraparound and dtype preserved.
    n, d = 5, 64
    enc = FixedPointEncoder(clip=1.0, bits=16, num_clients=n)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(d, generator=gen) * 2 - 1 for _ in range(n)]
    codes = [enc.encode(x, generator=gen) for x in xs]
    masks = [
        rng.integers(0, 2**32, size=d, dtype=np.uint64).astype(np.uint32) for _ in range(n - 1)
    ]
    masks.append((-np.sum(np.stack(masks).astype(np.uint64), axis=0)).astype(np.uint32))
    masked_total = np.zeros(d, dtype=np.uint32)
    plain_total = np.zeros(d, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for code, mask in zip(codes, masks, strict=True):
            y = np.add(code, mask, dtype=np.uint32)
            assert y.dtype == np.uint32
            np.add(masked_total, y, out=masked_total)
            np.add(plain_total, code, out=plain_total)
    assert masked_total.dtype == np.uint32
    np.testing.assert_array_equal(masked_total, plain_total)
    decoded = enc.decode_sum(masked_total, n)
    expected = torch.stack(xs).sum(0)
    assert (decoded - expected).abs().max().item() <= enc.quantisation_bound(n) + 1e-5


def test_uint64_modulus() -> None:
    enc = FixedPointEncoder(clip=1.0, bits=40, num_clients=1000, modulus_bits=64)
    assert enc.dtype == np.uint64
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    code = enc.encode(x, generator=torch.Generator().manual_seed(0))
    assert code.dtype == np.uint64
    out = enc.decode_sum(code, 1)
    assert (out.double() - x).abs().max().item() <= 1e-6


def test_overflow_prone_config_refused_with_one_line_message() -> None:
    with pytest.raises(ValueError, match=r"encoding overflows: n=70000 clients") as info:
        FixedPointEncoder(clip=1.0, bits=16, num_clients=70000)
    msg = str(info.value)
    assert "\n" not in msg
    assert "65535" in msg and "2^32" in msg and "bits <= 15" in msg
    # The boundary: 65537 * 65535 = 2^32 - 1 fits, 65538 does not.
    FixedPointEncoder(clip=1.0, bits=16, num_clients=65537)
    with pytest.raises(ValueError, match="overflows"):
        FixedPointEncoder(clip=1.0, bits=16, num_clients=65538)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"clip": -1.0},
        {"clip": float("inf")},
        {"clip": 1.0, "bits": 0},
        {"clip": 1.0, "bits": MAX_BITS + 1, "modulus_bits": 64},
        {"clip": 1.0, "num_clients": 0},
        {"clip": 1.0, "modulus_bits": 16},
    ],
)
def test_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FixedPointEncoder(**kwargs)  # type: ignore[arg-type]


def test_max_bits_for() -> None:
    assert max_bits_for(1, 32) == 32
    assert max_bits_for(2, 32) == 31
    assert max_bits_for(65537, 32) == 16
    assert max_bits_for(65538, 32) == 15
    assert max_bits_for(2, 64) == MAX_BITS
    for n in (1, 3, 100, 10_000):
        b = max_bits_for(n, 32)
        FixedPointEncoder(clip=1.0, bits=b, num_clients=n)
        if b < MAX_BITS:
            with pytest.raises(ValueError):
                FixedPointEncoder(clip=1.0, bits=b + 1, num_clients=n)
    with pytest.raises(ValueError):
        max_bits_for(2**32, 32)


def test_clipping_applied() -> None:
    enc = FixedPointEncoder(clip=0.5, bits=8, num_clients=1)
    x = torch.tensor([-100.0, -0.5, 0.5, 3.0, float("inf"), float("-inf")])
    code = enc.encode(x)
    np.testing.assert_array_equal(code, np.array([0, 0, 255, 255, 255, 0], dtype=np.uint32))
    out = enc.decode_sum(code, 1)
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5, -0.5]))


def test_default_generator_is_fresh() -> None:
    enc = FixedPointEncoder(clip=1.0, bits=2, num_clients=1)
    x = torch.full((256,), 0.1)
    assert not np.array_equal(enc.encode(x), enc.encode(x))


def test_rejects_bad_inputs() -> None:
    enc = FixedPointEncoder(clip=1.0, num_clients=3)
    with pytest.raises(ValueError, match="NaN"):
        enc.encode(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        enc.encode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="1-D"):
        enc.encode(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="count"):
        enc.decode_sum(np.zeros(3, dtype=np.uint32), 4)
    with pytest.raises(ValueError, match="count"):
        enc.decode_sum(np.zeros(3, dtype=np.uint32), 0)
    with pytest.raises(ValueError, match="wrapped"):
        enc.decode_sum(np.array([2 * 65535 + 1], dtype=np.uint32), 2)
    with pytest.raises(ValueError, match="unsigned"):
        enc.decode_sum(np.zeros(3, dtype=np.int64), 1)


def test_weighted_encoding_decodes_to_the_weighted_value() -> None:
    """``weight`` scales the clipped value before rounding; ``out`` is filled in place."""
    enc = FixedPointEncoder(clip=2.0, bits=20, num_clients=4)
    x = torch.tensor([-5.0, -1.0, 0.0, 0.5, 1.5, 5.0])
    out = np.zeros(6, dtype=np.uint32)
    code = enc.encode(x, weight=0.25, out=out)
    assert code is out
    expected = 0.25 * x.clamp(-2.0, 2.0)
    assert torch.allclose(enc.decode_sum(out, 1), expected, atol=enc.quantisation_bound(1))
    with pytest.raises(ValueError, match="weight"):
        enc.encode(x, weight=1.5)
    with pytest.raises(ValueError, match="out must be"):
        enc.encode(x, out=np.zeros(5, dtype=np.uint32))


def test_encoding_is_chunked_without_seams() -> None:
    """Vectors longer than one chunk encode every element (no gap at chunk borders)."""
    enc = FixedPointEncoder(clip=1.0, bits=12, num_clients=2)
    x = torch.linspace(-1.0, 1.0, 200_003)
    decoded = enc.decode_sum(enc.encode(x), 1)
    assert (decoded - x).abs().max() <= enc.quantisation_bound(1)


@pytest.mark.parametrize("headroom", [0, 3])
def test_codes_are_the_floor_of_the_scaled_value_plus_its_coin(headroom: int) -> None:
    """Every code is ``clip(floor(s + u), 0, levels) + headroom``, across chunk borders.

    ``s = w * clip(x) * levels / (2 clip) + levels / 2`` and ``u`` the generator's
    coin, drawn chunk by chunk; infinities and values beyond ``clip`` included.
    """
    from fedsec.secagg.encoding import _CHUNK

    clip, weight, d = 0.5, 0.6, 2 * _CHUNK + 5
    enc = FixedPointEncoder(clip=clip, bits=10, num_clients=3, headroom=headroom)
    x = torch.randn(d, generator=torch.Generator().manual_seed(3))
    x[::101], x[1::103], x[2], x[3] = float("inf"), -float("inf"), clip, -clip
    code = enc.encode(x, torch.Generator().manual_seed(7), weight=weight)
    gen = torch.Generator().manual_seed(7)
    coins = torch.cat(
        [
            torch.rand(min(_CHUNK, d - start), generator=gen, dtype=torch.float64)
            for start in range(0, d, _CHUNK)
        ]
    ).numpy()
    levels = float(enc.levels)
    scaled = np.clip(x.numpy(), -clip, clip).astype(np.float64)
    scaled *= weight * levels / (2 * clip)
    scaled += levels / 2
    expected = np.clip(np.floor(scaled + coins), 0.0, levels) + headroom
    assert code.dtype == np.uint32 and np.array_equal(code, expected.astype(np.uint32))
