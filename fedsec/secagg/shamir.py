"""Shamir t-of-k secret sharing of short byte strings over GF(2**127 - 1).

Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017) shares each client's self-mask
seed and mask secret key among its peers so that the server can unmask the sum
after dropouts.  This module implements Shamir's scheme (A. Shamir, "How to
Share a Secret", CACM 22(11), 1979) over the prime field ``GF(p)`` with the
Mersenne prime ``p = 2**127 - 1``.

The secret is prefixed with its length (2 bytes, big-endian), zero-padded and
cut into 15-byte chunks; each chunk is an integer ``< 2**120 < p`` and is shared
with its own random polynomial of degree ``threshold - 1`` whose coefficients
come from :func:`secrets.randbelow`.  A :class:`Share` holds one field element
per chunk, all evaluated at the holder's point ``x`` in ``1..num_shares``.

Any ``threshold`` shares recover the secret; any ``threshold - 1`` shares are
consistent with every secret of the same length (perfect secrecy).
:func:`combine` cannot know the threshold: given fewer shares it interpolates a
lower-degree polynomial and returns a wrong secret.  The framing (length prefix,
zero padding, chunk range) usually exposes this as a ``ValueError``, but that is
not guaranteed, so callers must pass at least ``threshold`` shares.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CHUNK_BYTES",
    "MAX_SECRET_BYTES",
    "PRIME",
    "Share",
    "combine",
    "split",
]

#: The field modulus, the Mersenne prime ``2**127 - 1``.
PRIME = 2**127 - 1
#: Bytes of secret per field element (``2**120 < PRIME``).
CHUNK_BYTES = 15
#: Longest secret that :func:`split` accepts.
MAX_SECRET_BYTES = 480
_LEN_BYTES = 2
_X_BYTES = 4
_VALUE_BYTES = 16
_MAX_CHUNKS = -(-(_LEN_BYTES + MAX_SECRET_BYTES) // CHUNK_BYTES)
_MAX_X = 2 ** (8 * _X_BYTES) - 1


@dataclass(frozen=True)
class Share:
    """One holder's share: its evaluation point and one field element per chunk.

    Parameters
    ----------
    x : int
        Evaluation point, ``1 <= x < 2**32`` (never 0, where the secret lives).
    values : tuple of int
        ``f_c(x)`` for each chunk polynomial ``f_c``; each in ``[0, PRIME)``.

    Raises
    ------
    ValueError
        If ``x`` or a value is out of range, or the chunk count is not in
        ``1..33``.
    """

    x: int
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.x <= _MAX_X:
            raise ValueError(f"share x must be in [1, {_MAX_X}], got {self.x}")
        if not 1 <= len(self.values) <= _MAX_CHUNKS:
            raise ValueError(f"share must hold 1..{_MAX_CHUNKS} values, got {len(self.values)}")
        if any(not 0 <= v < PRIME for v in self.values):
            raise ValueError("share value out of range [0, PRIME)")

    def to_bytes(self) -> bytes:
        """Fixed-width encoding: ``x`` as 4 bytes, then 16 bytes per value (big-endian).

        Returns
        -------
        bytes
            ``4 + 16 * len(values)`` bytes.
        """
        return self.x.to_bytes(_X_BYTES, "big") + b"".join(
            v.to_bytes(_VALUE_BYTES, "big") for v in self.values
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse :meth:`to_bytes` output.

        Parameters
        ----------
        data : bytes
            ``4 + 16 m`` bytes with ``1 <= m <= 33``.

        Returns
        -------
        Share

        Raises
        ------
        ValueError
            On a wrong length, ``x = 0``, or a value ``>= PRIME``.
        """
        body = len(data) - _X_BYTES
        if body < _VALUE_BYTES or body % _VALUE_BYTES:
            raise ValueError(f"malformed share: {len(data)} bytes is not 4 + 16 m with m >= 1")
        x = int.from_bytes(data[:_X_BYTES], "big")
        values = tuple(
            int.from_bytes(data[i : i + _VALUE_BYTES], "big")
            for i in range(_X_BYTES, len(data), _VALUE_BYTES)
        )
        return cls(x=x, values=values)


def _eval_poly(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def split(
    secret: bytes,
    threshold: int,
    num_shares: int | None = None,
    *,
    points: Sequence[int] | None = None,
) -> list[Share]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which recover it.

    Parameters
    ----------
    secret : bytes
        1 to 480 bytes (e.g. a 32-byte X25519 private key or PRG seed).
    threshold : int
        ``t``, with ``1 <= t <= num_shares``.
    num_shares : int, optional
        ``k``, with ``k < 2**32``; shares are evaluated at ``x = 1..k``.
    points : sequence of int, optional
        Instead of ``num_shares``: the distinct evaluation points, each in
        ``[1, 2**32)`` (SecAgg+ uses the holders' client ids).

    Returns
    -------
    list of Share
        One share per point, in order (``x = 1..k`` for ``num_shares``).

    Raises
    ------
    ValueError
        On an empty or too long secret or out-of-range ``t``/``k``.

    References
    ----------
    A. Shamir, "How to Share a Secret", CACM 22(11), 1979.
    """
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if (num_shares is None) == (points is None):
        raise ValueError("give exactly one of num_shares and points")
    if num_shares is not None and not 1 <= num_shares <= _MAX_X:
        raise ValueError(f"need 1 <= num_shares <= {_MAX_X}, got {num_shares}")
    xs = list(range(1, num_shares + 1)) if num_shares is not None else list(points or ())
    if any(not 1 <= x <= _MAX_X for x in xs) or len(set(xs)) != len(xs):
        raise ValueError(f"share points must be distinct and in [1, {_MAX_X}]")
    if not 1 <= threshold <= len(xs) <= _MAX_X:
        raise ValueError(
            f"need 1 <= threshold <= num_shares <= {_MAX_X}, got t={threshold}, k={len(xs)}"
        )
    payload = len(secret).to_bytes(_LEN_BYTES, "big") + bytes(secret)
    payload += bytes(-len(payload) % CHUNK_BYTES)
    chunks = [
        int.from_bytes(payload[i : i + CHUNK_BYTES], "big")
        for i in range(0, len(payload), CHUNK_BYTES)
    ]
    polys = [[c] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in chunks]
    return [Share(x=x, values=tuple(_eval_poly(p, x) for p in polys)) for x in xs]


def combine(shares: Sequence[Share]) -> bytes:
    """Recover the secret by Lagrange interpolation at 0 over exactly ``shares``.

    Parameters
    ----------
    shares : sequence of Share
        At least ``threshold`` shares with distinct ``x``.  Fewer than the
        threshold yields a wrong secret (usually, not always, a ``ValueError``).

    Returns
    -------
    bytes
        The secret passed to :func:`split`.

    Raises
    ------
    ValueError
        If ``shares`` is empty, has duplicate ``x``, mismatched chunk counts, or
        interpolates to a malformed payload (too few or corrupted shares).

    References
    ----------
    A. Shamir, "How to Share a Secret", CACM 22(11), 1979.
    """
    if not shares:
        raise ValueError("no shares to combine")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ValueError(f"duplicate share x among {sorted(xs)}")
    m = len(shares[0].values)
    if any(len(s.values) != m for s in shares):
        raise ValueError("shares have mismatched chunk counts")
    # Lagrange basis at 0: l_i(0) = prod_{j != i} x_j / (x_j - x_i).
    basis = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        basis.append(num * pow(den, -1, PRIME) % PRIME)
    chunks = [
        sum(s.values[c] * b for s, b in zip(shares, basis, strict=True)) % PRIME for c in range(m)
    ]
    if any(c >= 1 << (8 * CHUNK_BYTES) for c in chunks):
        raise ValueError("shares are inconsistent (fewer than the threshold, or corrupted)")
    payload = b"".join(c.to_bytes(CHUNK_BYTES, "big") for c in chunks)
    n = int.from_bytes(payload[:_LEN_BYTES], "big")
    end = _LEN_BYTES + n
    if not (1 <= n <= MAX_SECRET_BYTES and -(-end // CHUNK_BYTES) == m and not any(payload[end:])):
        raise ValueError("shares are inconsistent (fewer than the threshold, or corrupted)")
    return payload[_LEN_BYTES:end]
