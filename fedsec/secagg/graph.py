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

import hashlib
import math

import numpy as np
import numpy.typing as npt

from fedsec.secagg.masking import expand_mask

__all__ = [
    "bucket_parameters",
    "harary_graph",
    "harary_neighbours",
    "malicious_threshold",
    "secagg_parameters",
]

#: Statistical security: P[some client has >= t corrupt neighbours] <= 2**-SECURITY_BITS.
SECURITY_BITS = 40
#: Correctness: P[some client has < t surviving neighbours] <= 2**-CORRECTNESS_BITS.
CORRECTNESS_BITS = 20


def _permutation(n: int, rng_seed: bytes) -> npt.NDArray[np.intp]:
    """Uniform permutation of ``range(n)`` (position -> label) expanded from ``rng_seed``.

    Every label draws a 64-bit key from the AES-256-CTR stream of a key derived
    from ``rng_seed`` (domain-separated from the seed's other uses); sorting
    the labels by key (stable, ties by label) gives the permutation. It is
    uniform unless two keys tie (probability below ``n**2 / 2**65``, about
    ``3e-10`` at ``n = 10**5``), identical on every party, and costs ``O(n)``
    memory and one C sort, so a client can afford it for any ``n`` it accepts.
    """
    key = hashlib.sha256(b"fedsec-secagg-harary-permutation" + rng_seed).digest()
    return np.argsort(expand_mask(key, n, np.uint64), kind="stable")


def _offsets(n: int, k: int) -> npt.NDArray[np.int64]:
    """Ring offsets of a position's ``k`` neighbours in ``H_{k,n}`` (all distinct as ``k < n``)."""
    half = np.arange(1, k // 2 + 1, dtype=np.int64)
    parts = [half, n - half] + ([np.array([n // 2], dtype=np.int64)] if k % 2 else [])
    return np.concatenate(parts)


def _check_graph_args(n: int, k: int, rng_seed: bytes) -> None:
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < n, got k={k}, n={n}")
    if k % 2 and n % 2:
        raise ValueError(f"odd degree k={k} needs an even number of nodes, got n={n}")
    if len(rng_seed) != 32:
        raise ValueError(f"rng_seed must be 32 bytes, got {len(rng_seed)}")


def harary_graph(n: int, k: int, rng_seed: bytes) -> dict[int, frozenset[int]]:
    """Harary graph ``H_{k,n}`` with randomly permuted labels (Bell et al. 2020).

    Construction on ring positions ``0..n-1``: position ``i`` is linked to
    ``i +- j (mod n)`` for ``j = 1..k//2``; for odd ``k`` (which needs even
    ``n``) also to the opposite position ``i + n/2``. Every node has degree
    exactly ``k``. Client ``perm[i]`` sits at position ``i``, where ``perm`` is
    a uniform permutation expanded from ``rng_seed`` (:func:`_permutation`).

    The whole graph holds ``n * k`` entries: the server builds it; a client
    needs only its own row, :func:`harary_neighbours`.

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
    _check_graph_args(n, k, rng_seed)
    perm = _permutation(n, rng_seed)
    offsets = _offsets(n, k)
    rows = perm[(np.arange(n, dtype=np.int64)[:, None] + offsets[None, :]) % n].tolist()
    return {u: frozenset(row) for u, row in zip(perm.tolist(), rows, strict=True)}


def harary_neighbours(n: int, k: int, rng_seed: bytes, node: int) -> frozenset[int]:
    """Neighbours of ``node`` in :func:`harary_graph` ``(n, k, rng_seed)``, without the rest.

    Costs one permutation (``O(n)`` memory, one C sort) and ``O(k)`` for the
    row, so a request naming a huge round cannot make a client build ``n * k``
    entries it never uses.

    Raises
    ------
    ValueError
        Bad graph arguments, or ``node`` outside ``0..n-1``.
    """
    _check_graph_args(n, k, rng_seed)
    if not 0 <= node < n:
        raise ValueError(f"node {node} outside [0, {n})")
    perm = _permutation(n, rng_seed)
    position = int(np.flatnonzero(perm == node)[0])
    return frozenset(perm[(position + _offsets(n, k)) % n].tolist())


def _log2_binom_tails(k: int, p: float) -> npt.NDArray[np.float64]:
    """``log2 P[Binomial(k, p) >= t]`` for every ``t = 0..k+1``, in log space.

    One pass: the log pmf of every outcome, then a suffix log-sum-exp, so the
    parameter search costs ``O(k)`` per candidate degree instead of ``O(k**2)``.
    """
    if p <= 0.0:
        return np.array([0.0] + [-math.inf] * (k + 1))
    if p >= 1.0:
        return np.array([0.0] * (k + 1) + [-math.inf])
    i = np.arange(k + 1, dtype=np.float64)
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, k + 1, dtype=np.float64)))))
    log_pmf = log_fact[k] - log_fact - log_fact[::-1] + i * math.log(p) + (k - i) * math.log1p(-p)
    tails = np.logaddexp.accumulate(log_pmf[::-1])[::-1] / math.log(2)
    return np.append(np.minimum(tails, 0.0), -math.inf)


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

    * in every mode ``t > k / 2`` (``t >= k // 2 + 1``), the floor every
      client enforces: with ``2 t <= k`` a server that tells half of a
      client's neighbours it survived and the other half it dropped gets ``t``
      shares of both its self-mask seed and its mask key, hence its input.

    ``k`` is the smallest admissible degree (even, or any when ``n`` is even)
    and ``t`` the smallest threshold meeting these for it. When no ``k < n - 1``
    works, the complete graph ``k = n - 1`` is used with worst-case counts
    ``c = ceil(gamma * n)`` corrupt and ``d = ceil(delta * n)`` dropped clients:
    ``t = max(c + 1, k // 2 + 1)``, refused if ``t > k - d``. Google's finder
    gives (k, t) = (72, 24) for n = 1000 and (102, 34) for n = 10**6 at 5%
    corrupt / 33% dropout; its ``t < k / 2`` is what the majority floor here
    rules out, so the degrees come out larger.

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
        secure = np.flatnonzero(
            _log2_binom_tails(k, corrupt_fraction)[1 : k + 1] + log2_n <= -SECURITY_BITS
        )
        t = int(secure[0]) + 1 if secure.size else None
        if t is None:
            continue
        # Every mode: t > k / 2, which every client checks (else a server showing
        # halves of a neighbourhood different survivor sets collects both shares).
        t = max(t, malicious_threshold(k, t - 1 if malicious else 0))
        # P[Bin(k, 1-delta) < t] = P[Bin(k, delta) >= k - t + 1]
        if _log2_binom_tails(k, dropout_rate)[k - t + 1] + log2_n <= -CORRECTNESS_BITS:
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
    t = max(corrupt + 1, malicious_threshold(k, 0))
    if t > k - dropped:
        raise ValueError(
            f"no (k, t) for n={n}: t={t} (> k/2 and > {corrupt} corrupt) exceeds the "
            f"{k - dropped} neighbours left after {dropped} dropouts; tolerate fewer dropouts"
        )
    return k, t


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
    ``s - 1`` others), so a bucket of ``s`` survivors can still finish. Every
    mode also needs ``t > k / 2`` (what every client checks), so a bucket of
    more than ``s`` members (``k > 2 s - 3``) gets ``t = k // 2 + 1`` and
    needs ``t + 1`` survivors to finish. Signed
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
    # Unsigned: still t > k / 2 (every client checks it); that floor can exceed
    # s - 1 in buckets larger than s, which then need t + 1 survivors to finish.
    return k, max(malicious_threshold(k, 0), min(k, max(corrupt + 1, min_survivors - 1)))
