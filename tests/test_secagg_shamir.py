"""Shamir secret sharing over GF(2**127 - 1) (fedsec.secagg.shamir)."""

from __future__ import annotations

import contextlib
import itertools
import random
import secrets

import pytest

from fedsec.secagg.shamir import MAX_SECRET_BYTES, PRIME, Share, combine, split


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """Reference Lagrange interpolation mod PRIME (independent of the module's)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


@pytest.mark.parametrize(
    ("t", "k"), [(1, 1), (1, 3), (2, 2), (2, 3), (2, 4), (3, 5), (4, 4), (5, 8), (6, 6)]
)
@pytest.mark.parametrize("length", [1, 16, 32, 100])
def test_round_trip(t: int, k: int, length: int) -> None:
    secret = secrets.token_bytes(length)
    shares = split(secret, t, k)
    assert [s.x for s in shares] == list(range(1, k + 1))
    assert combine(shares) == secret
    assert combine(shares[-t:]) == secret


@pytest.mark.parametrize(("t", "k"), [(2, 4), (3, 5), (4, 6)])
def test_every_t_subset_recovers(t: int, k: int) -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, t, k)
    for subset in itertools.combinations(shares, t):
        assert combine(subset) == secret
        assert combine(list(reversed(subset))) == secret


def test_even_num_shares() -> None:
    # Flower's implementation failed for even num_shares; k=4, t=2 must work.
    secret = bytes(range(32))
    shares = split(secret, 2, 4)
    assert len(shares) == 4
    for pair in itertools.combinations(shares, 2):
        assert combine(pair) == secret


def test_boundary_secrets() -> None:
    for secret in (b"\x00", b"\x00" * 32, b"\xff" * MAX_SECRET_BYTES, b"\x00" * 13):
        assert combine(split(secret, 3, 4)[1:]) == secret


@pytest.mark.parametrize("t", [2, 3, 4])
def test_t_minus_one_shares_consistent_with_every_secret(t: int) -> None:
    # Perfect secrecy: for fixed t-1 shares of secret A, any candidate secret B
    # of the same length has a degree-(t-1) polynomial through the t-1 points
    # and (0, B) — we construct its share at a fresh x, and combining the t-1
    # real shares with it yields B.
    rng = random.Random(t)
    secret_a = rng.randbytes(32)
    observed = split(secret_a, t, t + 2)[: t - 1]
    for candidate in (secret_a, rng.randbytes(32), bytes(32), b"\xff" * 32):
        chunks = split(candidate, 1, 1)[0].values  # t=1: shares are the chunks
        forged_x = t + 2
        forged = Share(
            x=forged_x,
            values=tuple(
                _interpolate([(0, c)] + [(s.x, s.values[i]) for s in observed], forged_x)
                for i, c in enumerate(chunks)
            ),
        )
        assert combine([*observed, forged]) == candidate


def test_fewer_than_threshold_does_not_recover() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, 5)
    # Usually detected through the framing (ValueError); not guaranteed.
    with contextlib.suppress(ValueError):
        assert combine(shares[:2]) != secret


def test_shares_are_field_elements_and_randomised() -> None:
    secret = b"k" * 32
    a, b = split(secret, 2, 3), split(secret, 2, 3)
    assert all(0 <= v < PRIME for s in a for v in s.values)
    assert len(a[0].values) == 3  # (2 + 32) bytes -> three 15-byte chunks
    assert a[0].values != b[0].values


def test_bytes_round_trip() -> None:
    for share in split(secrets.token_bytes(32), 3, 5):
        data = share.to_bytes()
        assert len(data) == 4 + 16 * len(share.values)
        assert Share.from_bytes(data) == share
    big = Share(x=2**32 - 1, values=(PRIME - 1, 0))
    assert Share.from_bytes(big.to_bytes()) == big


def test_from_bytes_rejects_malformed() -> None:
    good = split(b"secret", 2, 3)[0].to_bytes()
    bad_inputs = [
        b"",
        good[:4],
        good[:-1],
        good + b"\x00",
        b"\x00\x00\x00\x00" + good[4:],  # x = 0
        good[:4] + PRIME.to_bytes(16, "big"),  # value == PRIME
        good[:4] + (2**128 - 1).to_bytes(16, "big"),
        good[:4] + bytes(16 * 34),  # too many chunks
    ]
    for data in bad_inputs:
        with pytest.raises(ValueError):
            Share.from_bytes(data)


def test_combine_rejects_duplicates_and_mismatch() -> None:
    shares = split(secrets.token_bytes(32), 2, 3)
    with pytest.raises(ValueError, match="duplicate"):
        combine([shares[0], shares[0]])
    other = split(secrets.token_bytes(100), 2, 3)
    with pytest.raises(ValueError, match="mismatched"):
        combine([shares[0], other[1]])
    with pytest.raises(ValueError, match="no shares"):
        combine([])


def test_split_rejects_bad_arguments() -> None:
    for secret, t, k in [
        (b"", 1, 1),
        (b"x" * (MAX_SECRET_BYTES + 1), 1, 1),
        (b"x", 0, 3),
        (b"x", 4, 3),
        (b"x", 1, 0),
        (b"x", 1, 2**32),
    ]:
        with pytest.raises(ValueError):
            split(secret, t, k)


def test_share_validates_fields() -> None:
    with pytest.raises(ValueError):
        Share(x=0, values=(1,))
    with pytest.raises(ValueError):
        Share(x=1, values=())
    with pytest.raises(ValueError):
        Share(x=1, values=(PRIME,))
    with pytest.raises(ValueError):
        Share(x=1, values=(-1,))
