"""Poisson sampling of DP-SGD batches, and the Gaussian noise of each step.

The privacy amplification of DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016) assumes each example joins each batch
independently with probability ``q``, as Opacus's
``UniformWithReplacementSampler`` draws it (Yousefpour et al.,
arXiv:2109.12298, 2021). In secure mode both the masks and the noise come
from ``os.urandom``, and the noise is Opacus's four-draw recipe against
floating-point attacks (Holohan, Braghin, "Secure Random Sampling in
Differential Privacy", ESORICS 2021, Sec. 5.1).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from fedsec.privacy.client_level import secure_standard_normal
from fedsec.privacy.per_example import _check_positive

__all__ = ["poisson_batches", "poisson_sample"]

#: Most uniforms :func:`poisson_batches` draws at once (16 MB of float32).
_DRAW_CHUNK = 1 << 22


def poisson_sample(
    n: int,
    sample_rate: float,
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each of ``n`` examples kept with prob. ``q``.

    The sampling that the privacy amplification of DP-SGD assumes (Abadi et
    al. 2016; Opacus's ``UniformWithReplacementSampler``); batch sizes are
    ``Binomial(n, q)`` and may be 0.

    Parameters
    ----------
    n : int
        Number of examples, >= 1.
    sample_rate : float
        Inclusion probability ``q`` in ``(0, 1]``.
    generator : torch.Generator, optional
        CPU generator for the uniforms (ignored when ``secure``).
    secure : bool
        Draw the uniforms from ``os.urandom`` (53-bit, exact comparison
        ``k < q * 2^53``) instead of a pseudo-random generator.

    Returns
    -------
    torch.Tensor
        Sorted ``int64`` indices on the CPU.

    Raises
    ------
    ValueError
        If ``n < 1`` or ``sample_rate`` is not in ``(0, 1]``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    q = _check_positive("sample_rate", sample_rate)
    if q > 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if secure:
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        keep = words < np.uint64(math.ceil(q * 2.0**53))
        return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))
    mask = torch.rand(n, generator=generator) < q
    return mask.nonzero().view(-1)


def poisson_batches(
    steps: int,
    n: int,
    sample_rate: float,
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> list[torch.Tensor]:
    """``steps`` Poisson-sampled batches at once: :func:`poisson_sample`'s law, one draw.

    The ``steps x n`` uniforms of an epoch come from one call (a per-step call
    costs more than the draw itself on client-sized data); row ``t`` is batch
    ``t``. With a generator the batches equal ``steps`` successive
    :func:`poisson_sample` calls only when nothing else draws from it in
    between, so callers that also draw noise from it take the batches of an
    epoch first (``dp_train`` and :class:`~fedsec.privacy.dp_loop.PoissonBatchSampler`
    do the same, which keeps them identical).

    Raises
    ------
    ValueError
        As :func:`poisson_sample`, or if ``steps < 0``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    q = _check_positive("sample_rate", sample_rate)
    if q > 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    batches: list[torch.Tensor] = []
    # At most _DRAW_CHUNK uniforms at once: one draw per epoch is fast on client-sized
    # data, but steps x n grows as n^2 / batch_size (batch_size 1 on 50k examples would
    # be 10 GB). Successive draws continue the generator's stream, so the batches are
    # the same as from a single draw.
    rows = max(1, _DRAW_CHUNK // n)
    for first in range(0, steps, rows):
        count = min(rows, steps - first)
        if secure:
            words = np.frombuffer(os.urandom(8 * n * count), dtype=np.uint64) >> np.uint64(11)
            mask = torch.from_numpy(words.reshape(count, n) < np.uint64(math.ceil(q * 2.0**53)))
        else:
            mask = torch.rand(count, n, generator=generator) < q
        columns = mask.nonzero()[:, 1]
        batches.extend(torch.split(columns, mask.sum(dim=1).tolist()))
    return batches


def _fill_noise(
    out: torch.Tensor, std: float, *, generator: torch.Generator | None, secure: bool
) -> None:
    """Overwrite ``out`` with independent ``N(0, std^2)`` draws."""
    if secure:
        # Opacus's secure_mode recipe: (z1 + z2 + z3 + z4) / 2 ~ N(0, 1).
        count = out.numel()
        z = secure_standard_normal(4 * count).view(4, count).sum(0).mul_(0.5 * std)
        out.copy_(z.view_as(out))
    else:
        out.normal_(0.0, std, generator=generator)
