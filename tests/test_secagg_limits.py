"""What a curious SecAgg server can make a client spend or accept (issue 16, cases 4 and 5).

Case 4: a request naming a huge round (n = 100,000, k = 1,024) made the next
share-keys request cost about a minute and 3.4 GiB before it was refused: the
client expanded the whole neighbour graph. Now the work of every request is
that of the client's k neighbours, node limits refuse larger rounds up front,
and every list a message carries is bounded before it is parsed further.

Case 5: an unsigned round accepted any threshold; with t <= k / 2 a server that
shows clients different survivor sets collects both shares of one client.
Every client now refuses it, and every default parameter choice avoids it.

Memory is asserted with ``tracemalloc`` peaks (numpy allocations included),
never with wall-clock time.
"""

from __future__ import annotations

import secrets
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedsec.client.app import app as client_app
from fedsec.client.secagg_mod import SECAGG_KEY, SECAGG_REFUSED
from fedsec.config import ConfigError, parse_config
from fedsec.secagg.client import SecAggClient, neighbours_of
from fedsec.secagg.graph import bucket_parameters, harary_graph, harary_neighbours
from fedsec.secagg.keys import generate_keypair
from fedsec.secagg.messages import (
    CIPHERTEXT_BYTES,
    MAX_CLIENTS,
    MAX_DEGREE,
    PeerKeys,
    ProtocolError,
    ShareKeysRequest,
    request_from_record,
)
from fedsec.secagg.server import SecAggParams
from fedsec.strategies.inprocess import InProcessGrid

SESSION = bytes(range(32))
MIB = 2**20


def _advertise(n: int, k: int, t: int, *, client_id: int = 1, **extra: Any) -> dict[str, Any]:
    """An advertise-keys record as a server sends it (the content of a Flower ConfigRecord)."""
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
        **extra,
    }


def _peer(client_id: int) -> PeerKeys:
    return PeerKeys(client_id, generate_keypair()[1], generate_keypair()[1])


def _peak(step: Callable[[], object]) -> int:
    """Peak bytes of Python (and numpy) allocations while ``step`` runs."""
    tracemalloc.start()
    try:
        step()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# -- case 4: work bounded by the client's k neighbours ----------------------------------


def test_a_huge_round_costs_a_client_what_its_neighbours_cost() -> None:
    """Issue 16 case 4 as reported: n = 100,000 and k = 1,024, then a share-keys request.

    Expanding the whole graph held n * k = 1e8 entries (3.2 GiB traced); the
    client's own row and the permutation need about 2 MiB.
    """
    client = SecAggClient()
    request = request_from_record(_advertise(100_000, 1_024, 513, client_id=77_777))
    share = ShareKeysRequest(session=SESSION, round=1, peers=(_peer(1),))

    def attack() -> None:
        client.advertise_keys(request)
        with pytest.raises(ProtocolError, match=r"non-neighbours|only 1 neighbours"):
            client.share_keys(share)

    assert _peak(attack) < 16 * MIB
    assert len(client.neighbours) == 1_024 and 77_777 not in client.neighbours


def test_one_row_equals_the_whole_graph() -> None:
    """A client's row is exactly its row of the graph the server builds."""
    for n, k in ((10, 3), (11, 6), (50, 9), (64, 63), (301, 40)):
        seed = secrets.token_bytes(32)
        graph = harary_graph(n, k, seed)
        assert all(harary_neighbours(n, k, seed, u) == graph[u] for u in range(n))
    with pytest.raises(ValueError, match="outside"):
        harary_neighbours(10, 4, bytes(32), 10)


def test_node_limits_refuse_a_large_round_before_any_work() -> None:
    client = SecAggClient(max_nodes=1_000, max_degree=64)
    with pytest.raises(ProtocolError, match=r"n=1001 .* limit of 1000 .*secagg-max-nodes"):
        client.advertise_keys(request_from_record(_advertise(1_001, 10, 6)))
    with pytest.raises(ProtocolError, match=r"k=66 .* limit of 64 .*secagg-max-degree"):
        client.advertise_keys(request_from_record(_advertise(1_000, 66, 34)))
    assert client.setup is None
    client.advertise_keys(request_from_record(_advertise(1_000, 64, 33)))  # at the limits
    with pytest.raises(ValueError, match="max_degree"):
        SecAggClient(max_degree=MAX_DEGREE + 1)


def _node_reply(node_config: dict[str, Any], record: dict[str, Any]) -> Message:
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, **node_config},
        state=RecordDict(),
        run_config={},
    )
    InProcessGrid(client_app, 1)  # sets the task identity messages need
    msg = Message(
        RecordDict({SECAGG_KEY: ConfigRecord(record)}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    return client_app(msg, context)


def _refusal(node_config: dict[str, Any], record: dict[str, Any]) -> str:
    """The reason of the node's error reply (fails if it answered)."""
    reply = _node_reply(node_config, record)
    assert reply.has_error() and reply.error.code == SECAGG_REFUSED
    return str(reply.error.reason)


def test_a_node_sets_its_limits_in_its_node_config() -> None:
    record = _advertise(200, 10, 6)
    assert not _node_reply({}, record).has_error()
    assert "secagg-max-degree" in _refusal({"secagg-max-degree": 8}, record)
    assert "secagg-max-nodes" in _refusal({"secagg-max-nodes": 100}, record)
    reason = _refusal({"secagg-max-nodes": "many"}, record)
    assert "secagg-max-nodes must be an integer in [2, 100000]" in reason


def test_share_keys_listing_more_peers_than_k_is_refused_in_one_short_line() -> None:
    client = SecAggClient()
    client.advertise_keys(request_from_record(_advertise(10_000, 64, 33)))
    many = ShareKeysRequest(session=SESSION, round=1, peers=tuple(_peer(i) for i in range(2, 600)))
    with pytest.raises(ProtocolError, match="lists 598 peers; the degree is k=64") as err:
        client.share_keys(request_from_record(many.to_record()))
    assert len(str(err.value)) < 120
    strangers = set(range(2, 40)) - neighbours_of(client._setup())
    some = ShareKeysRequest(session=SESSION, round=1, peers=tuple(_peer(i) for i in strangers))
    with pytest.raises(ProtocolError, match=r"non-neighbours .* more") as err:
        client.share_keys(some)
    assert len(str(err.value)) < 120


def _share_keys_record(count: int) -> dict[str, Any]:
    key = bytes(32)
    return {
        "stage": "share-keys",
        "session": SESSION,
        "round": 1,
        "ids": list(range(1, count + 1)),
        "c_public": [key] * count,
        "s_public": [key] * count,
        "signatures": [b""] * count,
    }


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (_share_keys_record(MAX_DEGREE + 1), f"'ids' holds {MAX_DEGREE + 1} items; at most"),
        (
            {
                "stage": "masked-input",
                "session": SESSION,
                "round": 1,
                "ids": [1],
                "ciphertexts": [bytes(10 * CIPHERTEXT_BYTES)],
            },
            f"{CIPHERTEXT_BYTES}-byte values",
        ),
        (
            {
                "stage": "unmask",
                "session": SESSION,
                "round": 1,
                "survivors": list(range(1, MAX_CLIENTS + 2)),
                "signer_ids": [],
                "signatures": [],
            },
            f"'survivors' holds {MAX_CLIENTS + 1} items",
        ),
        (
            {**_advertise(10, 4, 3), "identities": ["x" * 10_000] * 10, "signed": True},
            "at most 256 chars",
        ),
    ],
)
def test_message_lists_and_sizes_are_bounded_before_parsing(
    record: dict[str, Any], words: str
) -> None:
    with pytest.raises(ProtocolError, match=words):
        request_from_record(record)


# -- case 5: no threshold at or below k / 2, in any mode --------------------------------------


@pytest.mark.parametrize(("k", "t"), [(8, 4), (8, 1), (9, 4), (2, 1)])
def test_an_unsigned_client_refuses_a_threshold_at_or_below_half_the_degree(k: int, t: int) -> None:
    record = _advertise(20, k, t)
    with pytest.raises(ProtocolError, match=r"needs t > k / 2"):
        request_from_record(record)
    client = SecAggClient()
    good = request_from_record({**record, "threshold": k // 2 + 1})
    client.advertise_keys(good)  # t = k // 2 + 1 is the floor
    assert _node_reply({}, record).has_error()


def _sum_sizes() -> list[int]:
    return [*range(3, 64), 100, 159, 300, 1_000, 10_000, 100_000]


@pytest.mark.parametrize(("drop", "corrupt"), [(0.1, 0.05), (0.0, 0.0), (0.33, 0.05), (0.3, 0.2)])
@pytest.mark.parametrize("signed", [False, True])
def test_every_derived_threshold_is_a_majority_of_the_degree(
    drop: float, corrupt: float, signed: bool
) -> None:
    """What the server derives (for_round: k and t, or t for a given k) is what clients accept."""
    derived = 0
    for n in _sum_sizes():
        for degree in (0, 8, 33):
            try:
                params = SecAggParams.for_round(
                    n,
                    4,
                    clip=1.0,
                    dropout_rate=drop,
                    corrupt_fraction=corrupt,
                    degree=degree,
                    signed=signed,
                )
            except ValueError:
                assert n <= 10 or drop >= 0.3  # only tiny or very lossy rounds are infeasible
                continue
            derived += 1
            assert 2 * params.threshold > params.degree, (n, degree, params)
    assert derived > 3 * len(_sum_sizes()) // 2
    for s in range(2, 40):
        for size in range(s, 2 * s):
            k, t = bucket_parameters(size, s, corrupt_fraction=corrupt)
            assert 2 * t > k, (size, s)


def test_config_refuses_a_minority_threshold_in_one_line() -> None:
    for secagg, words in (
        ({"degree": 10, "threshold": 5}, "threshold >= 6 for degree 10"),
        ({"threshold": 3}, "threshold >= 10 for degree 19"),  # derived k = 19 for 20 clients
    ):
        with pytest.raises(ConfigError) as err:
            parse_config({"data": {"num_clients": 20}, "secagg": {"enabled": True, **secagg}})
        assert str(err.value).startswith("secagg.threshold:") and words in str(err.value)
        assert "\n" not in str(err.value)
    parse_config({"data": {"num_clients": 20}, "secagg": {"enabled": True, "threshold": 10}})
    parse_config({"data": {"num_clients": 20}, "secagg": {"enabled": True}})  # defaults
