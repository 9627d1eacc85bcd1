"""Harary neighbour graph and SecAgg+ parameters (fedsec.secagg.graph)."""

from __future__ import annotations

import pytest

from fedsec.secagg.graph import harary_graph, secagg_parameters

SEED = bytes(32)


@pytest.mark.parametrize(("n", "k"), [(10, 4), (10, 3), (11, 6), (50, 9), (7, 6), (100, 72)])
def test_harary_regular_and_symmetric(n: int, k: int) -> None:
    g = harary_graph(n, k, SEED)
    assert set(g) == set(range(n))
    for u, nbrs in g.items():
        assert len(nbrs) == k and u not in nbrs
        assert all(u in g[v] for v in nbrs)


def test_harary_deterministic_and_permuted() -> None:
    g1 = harary_graph(30, 4, SEED)
    assert g1 == harary_graph(30, 4, SEED)
    other = harary_graph(30, 4, b"\x01" * 32)
    assert g1 != other
    ring = {i: frozenset({(i + d) % 30 for d in (-2, -1, 1, 2)}) for i in range(30)}
    assert g1 != ring and other != ring


def test_harary_rejects_bad_arguments() -> None:
    for n, k in [(10, 0), (10, 10), (11, 3)]:
        with pytest.raises(ValueError):
            harary_graph(n, k, SEED)
    with pytest.raises(ValueError):
        harary_graph(10, 4, b"short")


@pytest.mark.parametrize("n", [3, 4, 5, 10, 20, 50, 100, 300, 1000, 10_000, 1_000_000])
@pytest.mark.parametrize(("drop", "corrupt"), [(0.33, 0.05), (0.1, 0.1), (0.0, 0.0), (0.2, 0.3)])
def test_parameters_satisfy_constraints(n: int, drop: float, corrupt: float) -> None:
    try:
        k, t = secagg_parameters(n, dropout_rate=drop, corrupt_fraction=corrupt)
    except ValueError:
        assert n <= 10  # only tiny federations may be infeasible here
        return
    assert 0 < k < n and (k % 2 == 0 or n % 2 == 0)
    assert k * corrupt < t <= k * (1 - drop)
    assert 2 * t > k  # what every client checks
    if n <= 1000:  # the graph for these parameters exists and is k-regular
        assert all(len(nb) == k for nb in harary_graph(n, k, SEED).values())


def test_parameters_at_google_setting_keep_a_majority_threshold() -> None:
    """Google's finder gives (72, 24) at n = 1000 and (102, 34) at 10**6 (5% corrupt,
    33% dropout): t < k / 2, which every client now refuses, so the degree grows to
    keep t > k / 2 reachable by the 67% survivors, still slowly with n."""
    k3, t3 = secagg_parameters(1000, dropout_rate=0.33, corrupt_fraction=0.05)
    k6, t6 = secagg_parameters(10**6, dropout_rate=0.33, corrupt_fraction=0.05)
    for k, t in ((k3, t3), (k6, t6)):
        assert 2 * t > k and t <= 0.67 * k
    assert (k3, t3) == (295, 148) and (k6, t6) == (405, 203)
    assert k6 < 1.5 * k3


def test_parameters_infeasible_raises() -> None:
    with pytest.raises(ValueError, match="no \\(k, t\\)"):
        secagg_parameters(5, dropout_rate=0.5, corrupt_fraction=0.5)
    with pytest.raises(ValueError):
        secagg_parameters(2, dropout_rate=0.1, corrupt_fraction=0.1)
    with pytest.raises(ValueError):
        secagg_parameters(100, dropout_rate=1.0, corrupt_fraction=0.1)
