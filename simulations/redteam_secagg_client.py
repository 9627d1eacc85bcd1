"""Red-team: what a curious SecAgg server can make one client spend, and what it learns.

Builds malicious requests through the protocol's typed messages
(:mod:`fedsec.secagg.messages`) and hands them to a fresh
:class:`~fedsec.secagg.client.SecAggClient`, as the client mod would after
parsing a Flower ``ConfigRecord``. Each case prints ``held`` (the client
refused, or bounded its work) or ``FAILED``, with the wall time and the peak
of Python allocations (``tracemalloc``) that the malicious request caused.

Cases:

* ``huge-round``: advertise-keys with ``n = 100,000`` and ``k = 1,024``, then a
  share-keys request listing one peer. A client that expands the whole
  neighbour graph spends ``n x k`` set entries on it (issue 16, case 4:
  57.5 s and 3.4 GiB before refusing).
* ``oversized-share-keys``: a share-keys request listing more peers than the
  degree ``k`` (work and error text must stay proportional to ``k``).
* ``low-threshold``: an unsigned round with ``t <= k / 2`` (issue 16, case 5),
  which lets a server that shows different survivor sets collect both kinds
  of share of one client.

Run::

    python simulations/redteam_secagg_client.py              # all cases
    python simulations/redteam_secagg_client.py --nodes 20000 --degree 256
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from fedsec.secagg.client import SecAggClient
from fedsec.secagg.keys import generate_keypair
from fedsec.secagg.messages import (
    PeerKeys,
    ProtocolError,
    ShareKeysRequest,
    request_from_record,
)

SESSION = bytes(range(32))


def _advertise(n: int, k: int, t: int, client_id: int = 1) -> dict[str, Any]:
    """An advertise-keys record as a server would send it (a Flower ConfigRecord's content)."""
    return {
        "stage": "advertise-keys",
        "session": SESSION,
        "round": 1,
        "client_id": client_id,
        "num_clients": n,
        "degree": k,
        "threshold": t,
        "graph_seed": secrets.token_bytes(32),
        "clip": 1.0,
        "bits": 8,
        "modulus_bits": 32,
        "dim": 10,
        "signed": False,
        "identities": [],
        "min_survivors": 0,
        "norm_bound": 0.0,
        "noise_variance": 0.0,
        "headroom": 0,
    }


def _peers(ids: range) -> list[PeerKeys]:
    return [PeerKeys(i, generate_keypair()[1], generate_keypair()[1]) for i in ids]


def _measure(step: Callable[[], str]) -> tuple[str, float, int]:
    """Run ``step``; return its outcome, wall seconds and tracemalloc peak bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = step()
    except ProtocolError as err:
        outcome = f"refused: {err}"
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return outcome, seconds, peak


def huge_round(n: int, k: int) -> tuple[bool, str, float, int]:
    """Advertise a huge round, then send one share-keys request."""
    client = SecAggClient()

    def advertise() -> str:
        client.advertise_keys(request_from_record(_advertise(n, k, k // 2 + 1)))
        return "accepted"

    outcome, seconds, peak = _measure(advertise)
    if client.setup is None:  # refused up front: nothing more to spend
        return True, f"advertise-keys {outcome}", seconds, peak
    share = ShareKeysRequest(session=SESSION, round=1, peers=tuple(_peers(range(2, 3))))

    def share_keys() -> str:
        client.share_keys(share)
        return "accepted"

    outcome2, seconds2, peak2 = _measure(share_keys)
    # Held when the whole exchange costs what k neighbours cost: tens of MiB, not GiB.
    held = max(peak, peak2) < 64 * 2**20
    text = f"advertise-keys {outcome}; share-keys {outcome2}"
    return held, text, seconds + seconds2, max(peak, peak2)


def oversized_share_keys(k: int) -> tuple[bool, str, float, int]:
    """A share-keys request listing far more peers than the degree."""
    client = SecAggClient()
    client.advertise_keys(request_from_record(_advertise(10_000, k, k // 2 + 1)))
    record = ShareKeysRequest(
        session=SESSION, round=1, peers=tuple(_peers(range(2, 2 + 8 * k)))
    ).to_record()

    def share_keys() -> str:
        client.share_keys(request_from_record(record))
        return "accepted"

    outcome, seconds, peak = _measure(share_keys)
    return outcome.startswith("refused") and len(outcome) < 200, outcome, seconds, peak


def low_threshold() -> tuple[bool, str, float, int]:
    """An unsigned round whose threshold a split survivor set can meet twice."""
    client = SecAggClient()

    def advertise() -> str:
        client.advertise_keys(request_from_record(_advertise(20, 8, 4)))
        return "accepted"

    outcome, seconds, peak = _measure(advertise)
    return outcome.startswith("refused"), f"t=4, k=8: {outcome}", seconds, peak


def main() -> None:
    """Run every case and print one line each; exit 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000, help="n of the huge round")
    parser.add_argument("--degree", type=int, default=1_024, help="k of the huge round")
    args = parser.parse_args()
    if args.nodes < 3 or not 2 <= args.degree < args.nodes:
        parser.error("need --nodes >= 3 and 2 <= --degree < --nodes")
    cases = {
        f"huge-round (n={args.nodes:,}, k={args.degree:,})": lambda: huge_round(
            args.nodes, args.degree
        ),
        "oversized-share-keys (k=64, 512 peers)": lambda: oversized_share_keys(64),
        "low-threshold (unsigned, t <= k/2)": low_threshold,
    }
    failed = 0
    for name, case in cases.items():
        held, text, seconds, peak = case()
        failed += not held
        verdict = "held" if held else "FAILED"
        text = text if len(text) <= 160 else f"{text[:160]}... ({len(text)} chars)"
        print(f"{verdict:6}  {name}: {text} [{seconds:.2f} s, peak {peak / 2**20:.1f} MiB]")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
