"""Client-level differential privacy: local Gaussian noise, and central DP-FedAvg.

Two ways of making a client's whole contribution differentially private:

* :func:`privatize_update` — *local* DP: the client clips its update and adds
  Gaussian noise before sending it, so that even the server sees only a
  privatized update.
* :class:`CentralDPFedAvg` — *central* DP-FedAvg (McMahan, Ramage, Talwar,
  Zhang, "Learning Differentially Private Recurrent Language Models", ICLR
  2018): the server clips every client update, averages them and adds Gaussian
  noise calibrated to the sensitivity of the mean, once per round. The server
  sees the raw updates; the released model is private with respect to any one
  client. Account for it with :func:`fedsec.privacy.accounting.client_level_epsilon`.

Both use the Gaussian mechanism (Dwork, Roth, "The Algorithmic Foundations of
Differential Privacy", 2014) with noise std ``noise_multiplier`` times the L2
sensitivity.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from fedsec.aggregation.base import AggregationResult, Mean, Rule
from fedsec.params import prefixed, unprefixed

#: Pairs of normals drawn per block by :func:`secure_standard_normal` (bounds its
#: float64 temporaries to a few times 8 MiB).
_SECURE_BLOCK = 1 << 20
_TWO_PI = 2.0 * math.pi


def _check_clip_sigma(owner: str, clip: float, noise_multiplier: float) -> tuple[float, float]:
    for name, value in (("clip", clip), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"{owner}: clip must be finite and > 0, got {clip!r}")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(
            f"{owner}: noise_multiplier must be finite and >= 0, got {noise_multiplier!r}"
        )
    return float(clip), float(noise_multiplier)


def secure_standard_normal(n: int) -> torch.Tensor:
    """``n`` independent N(0, 1) samples in float64 from the operating system's CSPRNG.

    Box-Muller transform (Box, Muller, "A Note on the Generation of Random
    Normal Deviates", Ann. Math. Stat. 1958) on uniforms built from
    ``os.urandom`` bytes: each 64-bit word keeps its top 53 bits, giving
    ``u1 = (k + 1) / 2^53`` in (0, 1] and ``u2 = k' / 2^53`` in [0, 1); then
    ``sqrt(-2 ln u1) * (cos, sin)(2 pi u2)`` are two independent normals.

    Notes
    -----
    * Why not a seeded ``torch.Generator``: torch's generator is a Mersenne
      Twister/Philox stream whose state (at most 64 bits of seed) can be
      recovered or guessed, after which the noise can be subtracted.
      ``os.urandom`` (getrandom(2) on Linux) is unpredictable, and each call
      draws fresh bytes.
    * The radius is at most ``sqrt(2 * 53 ln 2) ~ 8.57``, so the tails beyond
      8.57 standard deviations (probability ~1e-17) are cut.
    * Like any floating-point Gaussian sampler (torch's included) this does not
      escape Mironov's attack on the least significant bits ("On Significance
      of the Least Significant Bits for Differential Privacy", CCS 2012); an
      exact alternative is the discrete Gaussian (Canonne, Kamath, Steinke,
      NeurIPS 2020), not implemented here.
    * Throughput is tens of millions of samples per second on one core, which
      is small next to a training round.

    Raises
    ------
    ValueError
        If ``n`` is not an integer >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    out = np.empty(n, dtype=np.float64)
    pairs = (n + 1) // 2
    for start in range(0, pairs, _SECURE_BLOCK):
        count = min(_SECURE_BLOCK, pairs - start)
        words = np.frombuffer(os.urandom(16 * count), dtype=np.uint64).reshape(2, count)
        top = (words >> np.uint64(11)).astype(np.float64)  # exact: < 2^53
        radius = np.sqrt(-2.0 * np.log((top[0] + 1.0) * 2.0**-53))
        angle = top[1] * (_TWO_PI * 2.0**-53)
        # Block b holds its cosines, then its sines; any fixed order of iid draws is iid.
        first = 2 * start
        out[first : first + count] = radius * np.cos(angle)
        take = min(count, n - first - count)
        if take > 0:
            out[first + count : first + count + take] = (radius * np.sin(angle))[:take]
    return torch.from_numpy(out)


def clip_update(update: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale ``update`` to L2 norm at most ``clip``: ``update * min(1, clip / ||update||)``.

    The norm is computed in float64; the result has the input's dtype and device.

    Raises
    ------
    ValueError
        If ``update`` is not a finite floating-point tensor or ``clip <= 0``.
    """
    clip, _ = _check_clip_sigma("clip_update", clip, 0.0)
    if not update.is_floating_point():
        raise ValueError(f"update must be floating point, got {update.dtype}")
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
    if not math.isfinite(norm):
        raise ValueError("update must be finite to be clipped")
    return update * min(1.0, clip / norm) if norm > 0 else update.clone()


def privatize_update(
    update: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> torch.Tensor:
    """Local DP: clip a client's update to L2 norm ``clip`` and add Gaussian noise.

    Returns ``clip_update(update, clip) + N(0, (noise_multiplier * clip)^2 I)``,
    the Gaussian mechanism (Dwork, Roth, 2014) applied by the client itself,
    as in the local-DP variants of DP-FedAvg (McMahan et al., ICLR 2018; Flower's
    ``LocalDpMod``).

    Parameters
    ----------
    update : torch.Tensor
        The client's flat update [d] (floating point, finite).
    clip : float
        L2 clipping bound C (> 0).
    noise_multiplier : float
        Noise std divided by C (>= 0; 0 only clips).
    generator : torch.Generator or None
        Source of the noise when ``secure`` is false (the global torch RNG if
        None). The noise is drawn on the generator's device (the update's if
        None) and moved to the update's device.
    secure : bool
        Draw the noise from the operating system's CSPRNG instead
        (:func:`secure_standard_normal`: Box-Muller on ``os.urandom`` bytes, in
        float64); use it whenever the noise protects real data, since a seeded
        PRNG's noise can be reproduced and removed by whoever knows the seed.

    Returns
    -------
    torch.Tensor
        The privatized update, same shape, dtype and device as ``update``.

    Notes
    -----
    Privacy of one release: whatever the client's data, the clipped update
    lies in the ball of radius C, so two datasets of the client move it by at
    most 2C (replace-one, i.e. local DP of the whole dataset): the mechanism is
    the Gaussian mechanism with sensitivity 2C and noise multiplier
    ``noise_multiplier / 2``. Against the presence or absence of the client's
    contribution (clipped update vs. zero) the sensitivity is C and the noise
    multiplier is ``noise_multiplier``. Compose rounds with
    :func:`fedsec.privacy.accounting.epsilon_spent` at ``sample_rate = 1``.

    Raises
    ------
    ValueError
        For a non-[d] or non-finite update, ``clip <= 0``, ``noise_multiplier <
        0``, or a generator together with ``secure=True``.
    """
    clip, sigma = _check_clip_sigma("privatize_update", clip, noise_multiplier)
    if update.ndim != 1:
        raise ValueError(f"update must have shape [d], got {tuple(update.shape)}")
    if secure and generator is not None:
        raise ValueError("privatize_update: pass either secure=True or a generator, not both")
    clipped = clip_update(update, clip)
    if sigma == 0.0:
        return clipped
    std = sigma * clip
    if secure:
        noise = secure_standard_normal(update.shape[0]).mul_(std)
    else:
        device = generator.device if generator is not None else update.device
        noise = torch.randn(
            update.shape[0], generator=generator, dtype=update.dtype, device=device
        ).mul_(std)
    return clipped.add_(noise.to(dtype=update.dtype, device=update.device))


def _round_generator(seed: int, counter: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, counter)`` by numpy's SeedSequence."""
    mixed = np.random.SeedSequence([seed, counter]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed))


class CentralDPFedAvg(Rule):
    """Central DP-FedAvg: per-client clipping, mean, Gaussian noise on the mean.

    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018 (with the fixed-clipping server-side variant of
    Flower's ``DifferentialPrivacyServerSideFixedClipping``). Each round:

    1. every update is clipped to L2 norm ``clip`` (C);
    2. the inner :class:`~fedsec.aggregation.base.Mean` averages the clipped
       updates with the clients' weights w (normalised to sum to 1);
    3. Gaussian noise of std ``noise_multiplier * C * max_i w_i`` is added per
       coordinate: ``noise_multiplier * C / n`` for the uniform weights of
       DP-FedAvg, where the sensitivity of the mean of n clipped updates to one
       client is C / n (noise std ``noise_multiplier * C`` on the sum).

    Account with :func:`fedsec.privacy.accounting.client_level_epsilon`
    (``noise_multiplier`` = sigma, rounds, clients per round / total clients).

    Parameters
    ----------
    inner : Rule
        Must be exactly :class:`~fedsec.aggregation.base.Mean`: the C / n
        sensitivity holds for the mean of clipped updates only; a robust rule
        (median, Krum, ...) has a different sensitivity and the guarantee would
        not hold, so other rules are refused.
    clip : float
        Per-client L2 clipping bound C (> 0).
    noise_multiplier : float
        sigma, the noise std on the sum of clipped updates divided by C (>= 0;
        0 gives clipping without privacy).
    seed : int
        Seed of the noise; call t draws from a generator seeded from
        ``(seed, t)``, and t is the state (:meth:`state_dict`).

    Notes
    -----
    * Weights: the guarantee treats the (normalised) weights as public and
      data-independent. With uniform weights (``weights=None``, or equal
      weights) this is the paper's estimator; with example-count weights the
      noise grows to ``sigma * C * max_i w_i`` so that the largest per-client
      share is still covered, but the counts themselves are disclosed.
    * The number n of aggregated clients is treated as fixed (McMahan et al.'s
      fixed-denominator estimator, Flower's ``num_sampled_clients``), which
      makes the division by n post-processing of the noisy sum.
    * Non-finite updates are refused (``ValueError``, as by every rule); a
      finite row whose norm overflows float64 is replaced by zeros before
      averaging, so any row's contribution stays within C.
    * The noise comes from a seeded torch generator, so a resumed run is
      reproducible; whoever knows the seed can remove the noise. For
      deployment against a curious observer, keep the seed secret (e.g.
      ``secrets.randbits(63)``).
    * Extra memory: one [n, d] copy (the clipped updates).
    """

    name = "dp-fedavg"

    def __init__(self, inner: Rule, *, clip: float, noise_multiplier: float, seed: int = 0) -> None:
        if type(inner) is not Mean:
            got = inner.name if isinstance(inner, Rule) else repr(inner)
            raise ValueError(
                f"dp-fedavg: inner rule must be mean (the clip/n sensitivity holds only "
                f"for the mean of clipped updates), got {got}"
            )
        self.inner: Rule = inner
        self.clip, self.noise_multiplier = _check_clip_sigma(self.name, clip, noise_multiplier)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"dp-fedavg: seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self._counter = 0

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's context keywords, passed through."""
        return self.inner.requires

    @property
    def uses(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's optional context keywords, passed through."""
        return self.inner.uses

    def check(self, n: int) -> None:
        super().check(n)
        self.inner.check(n)

    def noise_std(self, weights: torch.Tensor) -> float:
        """Std of the noise added to the aggregate: ``sigma * C * max(w)`` (w normalised).

        For n equal weights this is ``noise_multiplier * clip / n``.
        """
        w = weights.to(torch.float64)
        return self.noise_multiplier * self.clip * float(w.max() / w.sum())

    def clip_rows(self, updates: torch.Tensor) -> torch.Tensor:
        """Copy of ``updates`` [n, d] with each row scaled to L2 norm <= clip.

        Rows with non-finite entries (or a norm overflowing float64) become zero.
        """
        norms = torch.linalg.vector_norm(updates, dim=1, dtype=torch.float64)
        finite = torch.isfinite(norms)
        scale = torch.where(
            finite, (self.clip / norms).clamp(max=1.0), torch.zeros_like(norms)
        )  # norm 0 gives clip / 0 = inf, clamped to 1
        clipped = updates * scale.to(updates.dtype)[:, None]
        clipped[~finite] = 0
        return clipped

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        clipped = self.clip_rows(updates)
        result = self.inner(clipped, weights, **context)
        del clipped
        std = self.noise_std(weights)
        generator = _round_generator(self.seed, self._counter)
        self._counter += 1
        aggregate = result.aggregate
        if std > 0:
            noise = torch.randn(aggregate.shape[0], generator=generator, dtype=aggregate.dtype)
            aggregate = aggregate + noise.mul_(std).to(aggregate.device)
        return AggregationResult(aggregate=aggregate, weights=result.weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The call counter, and the inner rule's state under ``inner.``."""
        state = {"counter": torch.tensor(self._counter, dtype=torch.int64)}
        state.update(prefixed(self.inner.state_dict(), "inner."))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._counter = int(state["counter"])
        self.inner.load_state_dict(unprefixed(state, "inner."))
