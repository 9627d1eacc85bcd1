"""Neighbour graph and parameter choice for SecAgg+.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) replaces the complete graph of SecAgg (Bonawitz et al.,
CCS 2017) with a k-regular Harary graph whose node labels are randomly
permuted, with ``k = O(log n)``; each client shares keys and Shamir shares only
with its ``k`` neighbours, using threshold ``t``.

Who picks the graph seed: the server samples a fresh 32-byte seed per round
(``secrets.token_bytes(32)``) and broadcasts it with the client list; every
party expands it with :func:`harary_graph` and gets the same graph. This is the
semi-honest-server setting of Bell et al.; against a malicious server the seed
must come from a joint coin toss (e.g. commit-then-reveal by the clients).
"""

from __future__ import annotations

import math

import numpy as np

from fedsec.secagg.masking import expand_mask

__all__ = ["harary_graph", "malicious_threshold", "secagg_parameters"]

#: Statistical security: P[some client has >= t corrupt neighbours] <= 2**-SECURITY_BITS.
SECURITY_BITS = 40
#: Correctness: P[some client has < t surviving neighbours] <= 2**-CORRECTNESS_BITS.
CORRECTNESS_BITS = 20


def _permutation(n: int, rng_seed: bytes) -> list[int]:
    """Fisher-Yates shuffle of ``range(n)`` driven by the AES-256-CTR stream of ``rng_seed``.

    Uniform draws use rejection sampling on 64-bit words, so the result is
    unbiased and identical on every party.
    """
    perm = list(range(n))
    words: list[int] = []
    block = max(2 * n, 64)
    counter = 0
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (2**64 // bound) * bound
        while True:
            if not words:
                # A fresh key per block keeps the stream deterministic and non-repeating.
                key = (int.from_bytes(rng_seed, "big") ^ counter).to_bytes(32, "big")
                counter += 1
                words = expand_mask(key, block, np.uint64).tolist()
            w = words.pop()
            if w < limit:
                break
        j = w % bound
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def harary_graph(n: int, k: int, rng_seed: bytes) -> dict[int, frozenset[int]]:
    """Harary graph ``H_{k,n}`` with randomly permuted labels (Bell et al. 2020).

    Construction on ring positions ``0..n-1``: position ``i`` is linked to
    ``i +- j (mod n)`` for ``j = 1..k//2``; for odd ``k`` (which needs even
    ``n``) also to the opposite position ``i + n/2``. Every node has degree
    exactly ``k``. Client ``perm[i]`` sits at position ``i``, where ``perm`` is
    a uniform permutation expanded from ``rng_seed`` (AES-256-CTR + Fisher-Yates).

    Parameters
    ----------
    n : int
        Number of clients (nodes ``0..n-1``).
    k : int
        Degree, ``0 < k < n``; ``k`` even or ``n`` even.
    rng_seed : bytes
        32-byte seed chosen by the server and broadcast (see module docstring).

    Returns
    -------
    dict[int, frozenset[int]]
        Neighbour set of every client.
    """
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < n, got k={k}, n={n}")
    if k % 2 and n % 2:
        raise ValueError(f"odd degree k={k} needs an even number of nodes, got n={n}")
    if len(rng_seed) != 32:
        raise ValueError(f"rng_seed must be 32 bytes, got {len(rng_seed)}")
    perm = _permutation(n, rng_seed)
    offsets = {j % n for j in range(1, k // 2 + 1)} | {-j % n for j in range(1, k // 2 + 1)}
    if k % 2:
        offsets.add(n // 2)
    return {perm[i]: frozenset(perm[(i + d) % n] for d in offsets) for i in range(n)}


def _log2_binom_tail_ge(k: int, p: float, t: int) -> float:
    """``log2 P[Binomial(k, p) >= t]``, computed in log space."""
    if t <= 0:
        return 0.0
    if t > k:
        return -math.inf
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * lp + (k - i) * lq
        for i in range(t, k + 1)
    ]
    m = max(terms)
    return (m + math.log(sum(math.exp(x - m) for x in terms))) / math.log(2)


def malicious_threshold(k: int, corrupt: int) -> int:
    """Smallest ``t`` that defeats a server splitting the survivor set (malicious mode).

    A malicious server can show two disjoint groups of a client's honest
    neighbours different survivor sets and collect ``t`` signatures on each
    (corrupt neighbours sign both). That needs ``2 (t - c) + c <= k``; any
    ``t > (k + c) / 2`` makes it impossible (Bonawitz et al. 2017, Section 6).
    """
    return (k + corrupt) // 2 + 1


def secagg_parameters(
    n: int, *, dropout_rate: float, corrupt_fraction: float, malicious: bool = False
) -> tuple[int, int]:
    """Choose the SecAgg+ degree ``k`` and Shamir threshold ``t`` for ``n`` clients.

    This is a documented conservative rule, not Google's exact parameter finder
    (Bell et al. 2020, Section 3 / Theorem 3.6 give the ``O(log n)`` degree).
    Each neighbour is modelled as corrupt with probability ``gamma =
    corrupt_fraction`` and dropped with probability ``delta = dropout_rate``
    independently (the random labelling makes neighbourhoods random), and a
    union bound over the ``n`` clients is applied:

    * security: ``n * P[Bin(k, gamma) >= t] <= 2**-40`` (corrupt neighbours
      alone never reach the threshold), which implies ``t > k * gamma``;
    * correctness: ``n * P[Bin(k, 1 - delta) < t] <= 2**-20`` (enough
      surviving neighbours to reconstruct), which implies
      ``t <= k * (1 - delta)``.

    ``k`` is the smallest admissible degree (even, or any when ``n`` is even)
    and ``t`` the smallest secure threshold for it. When no ``k < n - 1`` works,
    the complete graph ``k = n - 1`` is used with worst-case counts
    ``c = ceil(gamma * n)`` corrupt and ``d = ceil(delta * n)`` dropped clients:
    ``t = max(c + 1, k // 2 + 1)`` if ``t <= k - d``, else ``t = c + 1``. As
    sanity anchors, Google's finder gives (k, t) = (72, 24) for n = 1000 and
    (102, 34) for n = 10**6 at 5% corrupt / 33% dropout.

    Parameters
    ----------
    n : int
        Number of clients, ``n >= 3``.
    dropout_rate : float
        Fraction of clients expected to drop, in ``[0, 1)``.
    corrupt_fraction : float
        Fraction of clients colluding with the server, in ``[0, 1)``.
    malicious : bool, default False
        Against a malicious server (signed mode) ``t`` must also exceed
        ``(k + c) / 2`` (:func:`malicious_threshold`), with ``c = t_sec - 1``
        the most corrupt neighbours the security bound allows (``c + 1`` of
        them happen with probability below ``2**-40``).

    Returns
    -------
    tuple[int, int]
        ``(k, t)``.

    Raises
    ------
    ValueError
        Invalid arguments, or no ``(k, t)`` meets both constraints.
    """
    if n < 3:
        raise ValueError(f"need n >= 3 clients, got {n}")
    if not 0.0 <= dropout_rate < 1.0 or not 0.0 <= corrupt_fraction < 1.0:
        raise ValueError("dropout_rate and corrupt_fraction must be in [0, 1)")
    log2_n = math.log2(n)
    for k in range(2, n - 1):
        if k % 2 and n % 2:
            continue
        t = next(
            (
                t
                for t in range(1, k + 1)
                if _log2_binom_tail_ge(k, corrupt_fraction, t) + log2_n <= -SECURITY_BITS
            ),
            None,
        )
        if t is None:
            continue
        if malicious:
            t = max(t, malicious_threshold(k, t - 1))
        # P[Bin(k, 1-delta) < t] = P[Bin(k, delta) >= k - t + 1]
        if _log2_binom_tail_ge(k, dropout_rate, k - t + 1) + log2_n <= -CORRECTNESS_BITS:
            return k, t
    k = n - 1
    corrupt = math.ceil(corrupt_fraction * n)
    dropped = math.ceil(dropout_rate * n)
    if corrupt + 1 > k - dropped:
        raise ValueError(
            f"no (k, t) for n={n}: {corrupt} corrupt and {dropped} dropped clients leave no "
            "threshold that is both secure and reachable"
        )
    if malicious:
        t = max(corrupt + 1, malicious_threshold(k, corrupt))
        if t > k - dropped:
            raise ValueError(
                f"no (k, t) for n={n} against a malicious server: t={t} > {k - dropped} "
                "surviving neighbours; tolerate fewer dropouts or corrupt clients"
            )
        return k, t
    t = max(corrupt + 1, k // 2 + 1)
    return (k, t) if t <= k - dropped else (k, corrupt + 1)


def bucket_parameters(
    size: int, min_survivors: int, *, corrupt_fraction: float = 0.05, signed: bool = False
) -> tuple[int, int]:
    """Degree ``k`` and threshold ``t`` for one bucket of bucketed secure aggregation.

    A bucket is small (``s`` to ``2s - 1`` clients), so it uses the complete
    graph ``k = size - 1`` (minus one when both are odd). With ``c`` corrupt
    members tolerated (``ceil(corrupt_fraction * k)``, at least 1 when the
    fraction is positive), ``t >= c + 1`` keeps any member's secrets from
    the colluders; up to that floor ``t = s - 1``, the largest threshold that
    ``s`` survivors always reach (each survivor's shares are held by the
    ``s - 1`` others), so a bucket of ``s`` survivors can still finish. Signed
    mode needs ``t > (k + c) / 2`` (:func:`malicious_threshold`) against a
    server that splits the survivor set, so a bucket there needs ``t + 1``
    survivors and ``k >= t``: buckets of 2 cannot be signed.

    A bucket of two has ``t = 1``: each member's neighbour holds its secrets
    outright, which reveals no more than the bucket sum does to that
    neighbour (its own input and the sum give the other's).

    Raises
    ------
    ValueError
        Unless ``2 <= min_survivors <= size``, or when signed mode has no
        threshold for the bucket.
    """
    if not 2 <= min_survivors <= size:
        raise ValueError(
            f"a bucket needs 2 <= min_survivors <= size, got min_survivors={min_survivors}, "
            f"size={size}"
        )
    if not 0.0 <= corrupt_fraction < 1.0:
        raise ValueError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction}")
    k = size - 1
    k -= 1 if (k % 2 and size % 2) else 0
    corrupt = max(1, math.ceil(corrupt_fraction * k)) if corrupt_fraction > 0 else 0
    if signed:
        t = malicious_threshold(k, corrupt)
        if t > k:
            raise ValueError(
                f"a signed bucket of {size} cannot resist {corrupt} corrupt member(s) and a "
                f"server splitting the survivor set (needs t={t} > k={k}); use buckets of 3 or more"
            )
        return k, t
    return k, min(k, max(corrupt + 1, min_survivors - 1))
