"""Fixed-point encoding of float updates for summation modulo ``2**modulus_bits``.

Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017; Bell et al., CCS 2020) sums
masked integer vectors in the ring ``Z_R`` with ``R = 2**modulus_bits``.  Each
client clips its float update to ``[-clip, clip]``, maps it onto the integer grid
``{0, ..., 2**bits - 1}`` with unbiased stochastic rounding, and the server
decodes the (unmasked) sum.  The encoder refuses parameters for which the sum of
``num_clients`` encodings could exceed ``R - 1``, so the modular sum equals the
integer sum and decoding is exact up to quantisation.

Weighted averaging
------------------
The ring only carries a sum.  For a weighted mean each client multiplies its
update by its (public) weight ``w_i`` *before* encoding, the server decodes the
sum and divides it by the total weight ``sum_i w_i``.  ``clip`` must then cover
the weighted range, i.e. ``clip >= max_i w_i * max|x_i|`` (values beyond it are
clipped).  Normalised weights (``w_i = n_i / sum_j n_j``, scaled by
``num_clients``) keep ``clip`` small.

Noise headroom
--------------
For distributed DP (:mod:`fedsec.privacy.distributed`) each client adds integer
noise to its codes.  With ``headroom = H`` every code is shifted by ``+H`` and
the noise is clipped to ``[-H, H]``, so a code lies in ``[0, levels + 2H]`` and
the no-wrap condition becomes ``n * (levels + 2H) < 2**modulus_bits``; decoding
removes ``count * H`` and leaves the summed noise in the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

if TYPE_CHECKING:
    # torch is imported where tensors are handled: a SecAgg client's key and unmask
    # stages (one fresh process per message on a SuperNode) touch none.
    import torch

__all__ = ["MAX_BITS", "FixedPointEncoder", "max_bits_for"]

#: Largest quantisation depth: the scaled values are computed in float64, whose
#: 53-bit significand represents every integer of the grid exactly.
MAX_BITS = 53

_MODULUS_BITS = (32, 64)


def max_bits_for(num_clients: int, modulus_bits: int = 32) -> int:
    """Largest ``bits`` for which ``num_clients`` encodings sum without wrapping.

    Parameters
    ----------
    num_clients : int
        Number ``n >= 1`` of encoded vectors that will be summed.
    modulus_bits : int, default 32
        Ring size ``2**modulus_bits``; 32 or 64.

    Returns
    -------
    int
        The largest ``b <= MAX_BITS`` with ``n * (2**b - 1) < 2**modulus_bits``.

    Raises
    ------
    ValueError
        If ``num_clients < 1``, ``modulus_bits`` is not 32 or 64, or no ``b >= 1``
        fits (``num_clients >= 2**modulus_bits``).
    """
    if modulus_bits not in _MODULUS_BITS:
        raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    limit = 1 << modulus_bits
    best = 0
    for b in range(1, MAX_BITS + 1):
        if num_clients * ((1 << b) - 1) < limit:
            best = b
        else:
            break
    if best == 0:
        raise ValueError(f"no bit depth fits: n={num_clients} clients x max 1 >= 2^{modulus_bits}")
    return best


@dataclass(frozen=True)
class FixedPointEncoder:
    """Clip, quantise and stochastically round floats to unsigned integers.

    A value ``v`` is clipped to ``[-clip, clip]`` and mapped to
    ``(v + clip) / (2 clip) * (2**bits - 1)``, then rounded up with probability
    equal to its fractional part (unbiased stochastic rounding).  The sum of
    ``count`` encodings decodes to the sum of the clipped inputs with an error
    below :meth:`quantisation_bound` per coordinate.

    Parameters
    ----------
    clip : float
        Clipping bound, ``> 0``; values are clipped to ``[-clip, clip]``.
    bits : int, default 16
        Quantisation depth: ``2**bits - 1`` steps over ``[-clip, clip]``;
        ``1 <= bits <= MAX_BITS``.
    num_clients : int, default 2
        Maximum number ``n`` of encoded vectors that will be summed.
    modulus_bits : int, default 32
        Ring size ``2**modulus_bits`` (``np.uint32`` or ``np.uint64``).
    headroom : int, default 0
        Room for integer noise on each code (see "Noise headroom" above).

    Raises
    ------
    ValueError
        On invalid parameters, or if ``n * (2**bits - 1 + 2 headroom) >=
        2**modulus_bits`` (the sum could wrap around the modulus).

    References
    ----------
    Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
    Machine Learning", CCS 2017.  Bell et al., "Secure Single-Server
    Aggregation with (Poly)Logarithmic Overhead", CCS 2020.
    """

    clip: float
    bits: int = 16
    num_clients: int = 2
    modulus_bits: int = 32
    headroom: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}], got {self.bits}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.modulus_bits not in _MODULUS_BITS:
            raise ValueError(f"modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if self.headroom < 0 or self.max_code > 1 << MAX_BITS:
            raise ValueError(
                f"headroom must be in [0, 2^{MAX_BITS - 1} - levels / 2], got {self.headroom}"
            )
        worst = self.num_clients * self.max_code
        if worst >= 1 << self.modulus_bits:
            hint = (
                f"use bits <= {_max_bits_or_zero(self.num_clients, self.modulus_bits)} or a larger"
                " modulus"
                if not self.headroom
                else "use fewer bits, less noise or a larger modulus"
            )
            raise ValueError(
                f"encoding overflows: n={self.num_clients} clients x max {self.max_code}"
                f" = {worst} >= 2^{self.modulus_bits}; {hint}"
            )

    @property
    def levels(self) -> int:
        """Largest code, ``2**bits - 1`` (the number of quantisation steps)."""
        return (1 << self.bits) - 1

    @property
    def max_code(self) -> int:
        """Largest encoded value, ``levels + 2 * headroom``."""
        return self.levels + 2 * self.headroom

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """``np.uint32`` for a 32-bit modulus, ``np.uint64`` for 64 bits."""
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    def encode(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        weight: float = 1.0,
        out: npt.NDArray[np.unsignedinteger[Any]] | None = None,
        noise: npt.NDArray[np.int64] | None = None,
    ) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Encode ``weight * clip(x)`` as integers in ``[0, max_code]``.

        Works in cache-sized chunks (clip, scale, add the coins, floor, store)
        so a million values take a few milliseconds and no full-size
        temporaries.

        Parameters
        ----------
        x : torch.Tensor
            Shape ``[d]``, floating point; NaN is rejected, values (including
            infinities) are clipped to ``[-clip, clip]``.
        generator : torch.Generator, optional
            CPU generator for the rounding coins (reproducible tests).  ``None``
            draws them from an AES-256-CTR keystream under a fresh
            ``os.urandom`` key (32-bit coins, so the rounding probability is
            exact to ``2**-32``), which is unpredictable and fast.
        weight : float, default 1.0
            In ``[0, 1]``: encodes ``weight * clip(x)`` (weighted averaging).
        out : numpy.ndarray, optional
            Contiguous ``[d]`` array of :attr:`dtype` to write into.
        noise : numpy.ndarray of int64, optional
            ``[d]`` integer noise added to the codes, clipped to
            ``[-headroom, headroom]`` (needs ``headroom > 0``).

        Returns
        -------
        numpy.ndarray
            Shape ``[d]``, dtype :attr:`dtype` (``out`` when given).

        Raises
        ------
        ValueError
            If ``x`` is not 1-D floating point or contains NaN, ``weight`` is
            outside ``[0, 1]``, or ``out`` does not fit.
        """
        if x.ndim != 1 or not x.is_floating_point():
            raise ValueError(
                f"x must be a 1-D floating tensor, got shape {tuple(x.shape)} {x.dtype}"
            )
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        import torch

        values = x.detach().to("cpu")
        if values.dtype not in (torch.float32, torch.float64):
            values = values.to(torch.float64)
        source = values.numpy()
        if np.isnan(source).any():
            raise ValueError("x contains NaN")
        size = source.size
        if out is None:
            out = np.empty(size, dtype=self.dtype)
        elif out.dtype != self.dtype or out.shape != (size,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous ({size},) array of {np.dtype(self.dtype)}")
        if noise is not None and (noise.shape != (size,) or not self.headroom):
            raise ValueError(
                f"noise must be a ({size},) array and needs headroom > 0, got shape "
                f"{noise.shape} with headroom {self.headroom}"
            )
        levels = float(self.levels)
        # v = weight * clip(x) in [-clip, clip] maps to (v + clip) / (2 clip) * levels.
        slope, offset = weight * levels / (2.0 * self.clip), levels / 2.0
        coins = _Coins(generator, min(size, _CHUNK))
        scaled = np.empty(min(size, _CHUNK), dtype=np.float64)
        for start in range(0, size, _CHUNK):
            stop = min(start + _CHUNK, size)
            chunk = scaled[: stop - start]
            np.clip(source[start:stop], -self.clip, self.clip, out=chunk)
            chunk *= slope
            chunk += offset
            # floor(s + U[0, 1)) rounds s up with probability frac(s): unbiased.
            chunk += coins.draw(stop - start)
            if self.headroom:
                np.floor(chunk, out=chunk)
                np.clip(chunk, 0.0, levels, out=chunk)
                chunk += self.headroom  # integers below 2**53: exact in float64
                if noise is not None:
                    chunk += np.clip(noise[start:stop], -self.headroom, self.headroom)
            else:
                # Clipped to [0, levels] first, the cast's truncation is the floor:
                # one pass less, the same codes.
                np.clip(chunk, 0.0, levels, out=chunk)
            np.copyto(out[start:stop], chunk, casting="unsafe")
        return out

    def decode_sum(
        self,
        total: npt.NDArray[np.unsignedinteger[Any]],
        count: int,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Map the sum of ``count`` encodings back to the sum of the clipped floats.

        Parameters
        ----------
        total : numpy.ndarray
            Shape ``[d]``, unsigned integers: the (modular) sum of ``count``
            outputs of :meth:`encode`.
        count : int
            Number of summed encodings, ``1 <= count <= num_clients``.
        dtype : torch.dtype, optional
            Result dtype, ``torch.float32`` by default; ``torch.float64`` keeps
            the sum exact to the grid.

        Returns
        -------
        torch.Tensor
            ``dtype`` ``[d]``: ``(total - count * headroom) / (2**bits - 1) * 2 clip -
            count * clip``.

        Raises
        ------
        ValueError
            If ``count`` is out of range, ``total`` is not 1-D unsigned, or an
            entry exceeds ``count * (2**bits - 1)`` (a wrapped or wrong sum).
        """
        if not 1 <= count <= self.num_clients:
            raise ValueError(f"count must be in [1, {self.num_clients}], got {count}")
        arr = np.asarray(total)
        if arr.ndim != 1 or arr.dtype.kind != "u":
            raise ValueError(f"total must be a 1-D unsigned array, got {arr.shape} {arr.dtype}")
        if arr.size and int(arr.max()) > count * self.max_code:
            raise ValueError(
                f"total entry {int(arr.max())} exceeds count x max = {count * self.max_code}:"
                " wrong count or the sum wrapped"
            )
        out = arr.astype(np.float64)
        if self.headroom:
            out -= float(count * self.headroom)
        out *= 2.0 * self.clip / float(self.levels)
        out -= count * self.clip
        import torch

        return torch.from_numpy(out).to(torch.float32 if dtype is None else dtype)

    def quantisation_bound(self, count: int) -> float:
        """Largest per-coordinate error of :meth:`decode_sum` vs the clipped sum.

        Each encoding is off by less than one step ``2 clip / (2**bits - 1)``, so
        the sum of ``count`` of them is off by less than ``count`` steps (in
        exact arithmetic; the float32 result adds at most half an ulp).

        Parameters
        ----------
        count : int
            Number of summed encodings.

        Returns
        -------
        float
            ``count * 2 clip / (2**bits - 1)``.
        """
        return count * 2.0 * self.clip / self.levels


_CHUNK = 1 << 16  # values per encoding chunk: 512 KiB of float64 stays in cache


class _Coins:
    """Uniform ``[0, 1)`` coins for stochastic rounding, drawn chunk by chunk."""

    def __init__(self, generator: torch.Generator | None, chunk: int) -> None:
        self.generator = generator
        self.floats = np.empty(chunk, dtype=np.float64)
        if generator is None:
            key = os.urandom(32)
            self.stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
            self.words = np.empty(chunk, dtype=np.uint32)
            self.zeros = memoryview(bytes(4 * chunk))  # sliced without copying

    def draw(self, size: int) -> npt.NDArray[np.float64]:
        if self.generator is not None:
            import torch

            return torch.rand(size, generator=self.generator, dtype=torch.float64).numpy()
        words = self.words[:size]
        self.stream.update_into(self.zeros[: 4 * size], words.data.cast("B"))
        return np.multiply(words, 2.0**-32, out=self.floats[:size])


def _max_bits_or_zero(num_clients: int, modulus_bits: int) -> int:
    try:
        return max_bits_for(num_clients, modulus_bits)
    except ValueError:
        return 0
