"""Issue 16 (3) on the secure-aggregation server path: one client cannot stop a round.

Each test plays one hostile client (node ``VICTIM``) at one SecAgg stage the
server receives (identify, advertise-keys, share-keys, masked-input, unmask)
on the in-process grid, with the real client mod and server workflow, and a
ClientApp whose "training" adds a known vector to the model, so the mean of
the honest clients is known exactly. The contract: the reply is excluded (the
client drops out, with a one-line reason), nothing raises out of the round,
nothing is allocated per the client's claim, and the round completes with the
others; where the server cannot tell which client spoiled a sum (a weight
that no honest set of clients gives), that sum is discarded, and in bucketed
mode the round completes with the other buckets.
"""

from __future__ import annotations

import json
import logging
import tracemalloc
from collections.abc import Callable, Iterable
from copy import deepcopy
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedsec.client.secagg_mod import MASKED_KEY, SECAGG_KEY, secagg_mod
from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig, parse_config
from fedsec.data import DATASETS
from fedsec.models import make_model
from fedsec.params import flatten_state, unflatten_state
from fedsec.secagg.messages import MAX_DEGREE
from fedsec.secagg.signing import write_key_dir
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.server_app import build_strategy, make_secagg_workflow

CLIENTS = 6
VICTIM = 3
CAP = 100  # weight_cap: a client of n examples weighs min(n, 100) / 100
TIB = 2**40
#: (reply, the request it answers) -> the messages delivered instead.
Rewrite = Callable[[Message, Message], list[Message]]


def _config(bucket_size: int = 0, **secagg: Any) -> ExperimentConfig:
    raw: dict[str, Any] = {
        "experiment": {"name": "secagg-replies", "rounds": 1, "seed": 7},
        "data": {"num_clients": CLIENTS},
        "secagg": {"enabled": True, "clip": 1.0, "weight_cap": CAP, **secagg},
    }
    if bucket_size:
        raw["aggregation"] = {"rule": "mean", "pre": ["bucketing"], "bucket_size": bucket_size}
    return parse_config(raw)


class KnownUpdates:
    """A ClientApp (real secagg mod) whose update for node ``n`` is ``updates[n - 1]``."""

    def __init__(self, dim: int) -> None:
        gen = torch.Generator().manual_seed(11)
        self.updates = torch.randn(CLIENTS, dim, generator=gen) * 0.05
        self.examples = [20 + 13 * p for p in range(CLIENTS)]
        self.app = ClientApp()

        @self.app.train(mods=[secagg_mod])
        def train(msg: Message, context: Context) -> Message:
            pid = int(context.node_config["partition-id"])
            state = msg.content.array_records["arrays"].to_torch_state_dict()
            moved = unflatten_state(flatten_state(state) + self.updates[pid], state)
            metrics = MetricRecord({"num-examples": self.examples[pid]})
            return Message(
                RecordDict({"arrays": ArrayRecord(moved), "metrics": metrics}), reply_to=msg
            )

    def mean(self, nodes: Iterable[int], cap: int = CAP) -> torch.Tensor:
        pids = [n - 1 for n in nodes]
        w = torch.tensor(
            [min(self.examples[p], cap) / cap if cap else 1.0 for p in pids], dtype=torch.float64
        )
        return (w[:, None] * self.updates[pids].double()).sum(0) / w.sum()


class HostileGrid(InProcessGrid):
    """The in-process grid, where ``VICTIM``'s replies at one stage are rewritten.

    ``rewrite`` returns the messages delivered in place of the honest reply
    (several: duplicates; none: a dropout).
    """

    #: The latest reply of each node at each stage (what a colluder could copy).
    seen: ClassVar[dict[tuple[int, str], Message]] = {}

    def __init__(self, app: ClientApp, stage: str, rewrite: Rewrite) -> None:
        super().__init__(app, CLIENTS)
        self.stage, self.rewrite = stage, rewrite
        self.seen.clear()

    def send_and_receive(  # type: ignore[override]
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out: list[Message] = []
        for request in messages:
            for reply in super().send_and_receive([request], timeout=timeout):
                self.seen[(reply.metadata.src_node_id, _stage(reply))] = reply
                hostile = reply.metadata.src_node_id == VICTIM and _stage(reply) == self.stage
                out.extend(self.rewrite(reply, request) if hostile else [reply])
        return out


def _stage(reply: Message) -> str:
    """Which protocol stage a client's reply answers."""
    if reply.has_error():
        return "error"
    if MASKED_KEY in reply.content.array_records:
        return "masked-input"
    record = reply.content.config_records.get(SECAGG_KEY)
    if record is None:
        return "plain"
    for key, stage in (
        ("identity", "identify"),
        ("c_public", "advertise-keys"),
        ("ciphertexts", "share-keys"),
        ("seed_ids", "unmask"),
        ("signature", "consistency-check"),
    ):
        if key in record:
            return stage
    return "other"


class Outcome:
    """One secure round: what the strategy got and what the workflow reported."""

    def __init__(self, cfg: ExperimentConfig, stage: str, rewrite: Rewrite) -> None:
        info = DATASETS.get(cfg.data.dataset)
        model = make_model(cfg.model.name, info.input_shape, info.num_classes, seed=0)
        dim = sum(v.numel() for v in model.state_dict().values())
        self.app = KnownUpdates(dim)
        grid = HostileGrid(self.app.app, stage, rewrite)
        self.strategy = build_strategy(cfg)
        self.workflow = make_secagg_workflow(cfg)
        self.mean: torch.Tensor | None = None
        self.contributors: list[int] = []
        secure, buckets = self.strategy.aggregate_secure, self.strategy.aggregate_buckets

        def spy_secure(server_round: int, mean: torch.Tensor, **kw: Any) -> Any:
            self.mean, self.contributors = mean.clone(), list(kw["contributors"])
            return secure(server_round, mean, **kw)

        def spy_buckets(server_round: int, means: torch.Tensor, weights: Any, **kw: Any) -> Any:
            w = weights.double()
            self.mean = (w[:, None] * means.double()).sum(0) / w.sum()
            self.contributors = list(kw["contributors"])
            return buckets(server_round, means, weights, **kw)

        self.strategy.aggregate_secure = spy_secure  # type: ignore[method-assign]
        self.strategy.aggregate_buckets = spy_buckets  # type: ignore[method-assign]
        wire = ConfigRecord({WIRE_CONFIG_KEY: json.dumps(cfg.to_dict())})
        g = grid.as_grid()
        self.new, self.metrics = self.workflow.run_round(
            pipeline(g), g, self.strategy, 1, ArrayRecord(model.state_dict()), wire
        )

    @property
    def excluded(self) -> dict[int, str]:
        report = self.strategy.last_report
        return {} if report is None else dict(report.excluded)

    def assert_completed_without_victim(self, fragment: str, cap: int = CAP) -> None:
        """Round ok, the victim out with ``fragment`` in one short line, the others' mean."""
        assert self.new is not None, self.workflow.last_error
        assert sorted(self.contributors) == [n for n in range(1, CLIENTS + 1) if n != VICTIM]
        reason = self.excluded.get(VICTIM, "")
        assert fragment in reason, reason
        assert "\n" not in reason and len(reason) < 400, reason[:400]
        assert self.mean is not None
        expected = self.app.mean(self.contributors, cap)
        torch.testing.assert_close(self.mean.double(), expected, atol=1e-6, rtol=0)

    def assert_completed_with_victim(self) -> None:
        """Round ok with every client: the hostile extras changed nothing."""
        assert self.new is not None, self.workflow.last_error
        assert sorted(self.contributors) == list(range(1, CLIENTS + 1)), self.excluded
        assert self.mean is not None
        expected = self.app.mean(self.contributors)
        torch.testing.assert_close(self.mean.double(), expected, atol=1e-6, rtol=0)


# -- building hostile replies ---------------------------------------------------------


def npy(descr: str, shape: tuple[int, ...], body: bytes) -> bytes:
    """A ``.npy`` file whose header says ``descr`` and ``shape``, whatever ``body`` holds."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _honest_masked(reply: Message) -> Array:
    return reply.content.array_records[MASKED_KEY][MASKED_KEY]


def set_masked(make: Callable[[Array], Array]) -> Rewrite:
    """Replace the masked array (built from the honest one)."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        arrays = reply.content.array_records[MASKED_KEY]
        arrays[MASKED_KEY] = make(arrays[MASKED_KEY])
        return [reply]

    return rewrite


def forged(descr: str, shape: Callable[[int], tuple[int, ...]], body: Callable[[Array], bytes]):  # type: ignore[no-untyped-def]
    """A masked array with header ``descr``/``shape(n)`` (n: honest length) and ``body``."""

    def make(honest: Array) -> Array:
        n = honest.shape[0]
        return Array(
            dtype=honest.dtype,
            shape=tuple(honest.shape),
            stype=honest.stype,
            data=npy(descr, shape(n), body(honest)),
        )

    return make


def _values(honest: Array) -> np.ndarray:
    return honest.numpy()  # the honest client's own array


def set_record(**fields: Any) -> Rewrite:
    """Set fields of the reply's ``fedsec-secagg`` record (bypassing type checks)."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        record = reply.content.config_records[SECAGG_KEY]
        for key, value in fields.items():
            record._data[key] = value  # bypasses type checks: a hostile client is not bound by them
        return [reply]

    return rewrite


def copies(count: int, then: Rewrite | None = None) -> Rewrite:
    """The honest reply first, then ``count`` more copies (rewritten by ``then``)."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        extra = []
        for _ in range(count):
            copy = Message(deepcopy(reply.content), reply_to=request)
            extra.extend(then(copy, request) if then else [copy])
        return [reply, *extra]

    return rewrite


def error(reason: str) -> Rewrite:
    """An error reply in place of the honest one."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        return [Message(Error(code=1, reason=reason), reply_to=request)]

    return rewrite


def add_weight(delta_weight: float) -> Rewrite:
    """Add ``delta_weight`` to the victim's (masked) weight coordinate, mod 2**32."""

    def make(honest: Array) -> Array:
        values = _values(honest).copy()
        levels = 2**27 - 1  # about right for these sums (27 to 31 bits): the sign is what counts
        values[-1] = (int(values[-1]) + int(delta_weight * levels / 2)) % 2**32
        return Array(values)

    return set_masked(make)


# -- masked-input ------------------------------------------------------------------------


def test_masked_input_claiming_a_tib_is_excluded() -> None:
    """A header claiming 1 TiB with an 8-byte payload: np.load raised MemoryError out of
    the round; now the victim drops out and the others' mean is used."""
    out = Outcome(
        _config(),
        "masked-input",
        set_masked(forged("<u4", lambda n: (TIB // 4,), lambda a: b"\0" * 8)),
    )
    out.assert_completed_without_victim("shape")


def test_masked_input_claiming_16_gib_allocates_nothing_of_it() -> None:
    """A 16 GiB claim (header true about dtype, 8-byte payload) is refused before any
    allocation: the round's peak traced memory stays far below the claim."""
    rewrite = set_masked(forged("<u4", lambda n: (2**32,), lambda a: b"\0" * 8))
    tracemalloc.start()
    try:
        out = Outcome(_config(), "masked-input", rewrite)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**28, peak  # the round's own arrays are a few MB; the claim was 16 GiB
    out.assert_completed_without_victim("shape")


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        ("short", forged("<u4", lambda n: (n,), lambda a: bytes(a.data[-8:])), "bytes"),
        (
            "long",
            forged("<u4", lambda n: (n,), lambda a: _values(a).tobytes() + b"\0" * 4),
            "bytes",
        ),
        (
            "uint64",
            forged("<u8", lambda n: (n,), lambda a: _values(a).astype("u8").tobytes()),
            "dtype",
        ),
        ("float32", forged("<f4", lambda n: (n,), lambda a: _values(a).tobytes()), "dtype"),
        ("int32", forged("<i4", lambda n: (n,), lambda a: _values(a).tobytes()), "dtype"),
        ("object", forged("|O", lambda n: (n,), lambda a: b"\x80N."), "dtype"),
        ("2-d", forged("<u4", lambda n: (1, n), lambda a: _values(a).tobytes()), "shape"),
        (
            "one-less",
            forged("<u4", lambda n: (n - 1,), lambda a: _values(a)[:-1].tobytes()),
            "shape",
        ),
        (
            "not-npy",
            lambda a: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=bytes(64)),
            "magic",
        ),
        (
            "stype",
            lambda a: Array(dtype=a.dtype, shape=tuple(a.shape), stype="torch", data=a.data),
            "stype",
        ),
    ],
)
def test_malformed_masked_input_is_excluded(name: str, make: Any, fragment: str) -> None:
    out = Outcome(_config(), "masked-input", set_masked(make))
    out.assert_completed_without_victim(fragment)


def test_masked_input_with_extra_arrays_is_excluded() -> None:
    """Only the masked vector may come back (an honest reply carries nothing else)."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        reply.content.array_records[MASKED_KEY]["extra"] = Array(np.zeros(4, dtype=np.float32))
        return [reply]

    Outcome(_config(), "masked-input", rewrite).assert_completed_without_victim("one 'masked'")


def test_masked_input_duplicates_count_once() -> None:
    """Five more copies, each a different (garbage) vector: the first reply is the one used."""

    def garbage(copy: Message, request: Message) -> list[Message]:
        arrays = copy.content.array_records[MASKED_KEY]
        arrays[MASKED_KEY] = Array(_values(arrays[MASKED_KEY]) + np.uint32(12345))
        return [copy]

    out = Outcome(_config(), "masked-input", copies(5, garbage))
    out.assert_completed_with_victim()
    assert out.metrics["num-duplicates"] == 5


@pytest.mark.parametrize(
    ("delta", "fragment"), [(-0.5, "weight check"), (0.01, "bucket discarded")]
)
def test_impossible_total_weight_discards_only_that_bucket(delta: float, fragment: str) -> None:
    """A weight outside an honest client's [1 / cap, 1] (here with equal weights: exactly 1)
    hides in the masked sum. Lower: the server refuses the sum whose total weight no honest
    set of clients gives (before, it rescaled the mean); higher: the sum leaves the grid's
    range (it wraps, or exceeds what c clients can sum). Only that bucket is discarded."""
    cfg = _config(bucket_size=2, weight_cap=0)
    out = Outcome(cfg, "masked-input", add_weight(delta))
    assert out.new is not None, out.workflow.last_error
    assert out.metrics["secagg_buckets_discarded"] == 1
    assert VICTIM not in out.contributors and len(out.contributors) >= CLIENTS - 3
    assert fragment in out.excluded[VICTIM], out.excluded
    assert out.mean is not None
    torch.testing.assert_close(
        out.mean.double(), out.app.mean(out.contributors, cap=0), atol=1e-6, rtol=0
    )


def test_impossible_total_weight_fails_an_unbucketed_round_with_the_reason() -> None:
    """Unbucketed, the one sum holds the victim's weight: refused (not a silently rescaled
    mean), the round fails with one line naming the weight check."""
    out = Outcome(_config(weight_cap=0), "masked-input", add_weight(-0.5))
    assert out.new is None
    assert "weight check" in out.workflow.last_error
    assert out.metrics["secagg_aborted"] == 1


# -- advertise-keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"c_public": bytes(32)}, "low-order"),  # the all-zero point: every exchange gives 0
        ({"s_public": b"\x01" + bytes(31)}, "low-order"),
        ({"c_public": "SAME"}, "same key twice"),
        ({"c_public": bytes(33)}, "32 bytes"),
        ({"signature": bytes(2**20)}, "signature"),
        ({"c_public": [bytes(32)] * 5000}, "c_public"),
        ({"stage": "no-such-stage", "c_public": None}, "c_public"),
    ],
)
def test_unusable_advertised_keys_leave_only_their_owner_out(
    fields: dict[str, Any], fragment: str
) -> None:
    """A low-order or repeated key made every neighbour refuse its share-keys request
    (the round aborted); now only the owner drops out at advertise-keys."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        record = reply.content.config_records[SECAGG_KEY]
        values = dict(fields)
        if values.get("c_public") == "SAME":
            values["c_public"] = record["s_public"]
        return set_record(**values)(reply, request)

    out = Outcome(_config(), "advertise-keys", rewrite)
    out.assert_completed_without_victim(fragment)
    assert out.excluded[VICTIM].startswith("advertise-keys:")


def test_a_key_advertised_by_two_clients_leaves_both_out() -> None:
    """The victim re-advertises node 1's key: every neighbour of either would refuse the
    share-keys request (a repeated key); the server cannot tell who copied, so both are
    left out at advertise-keys and the round completes with the other four."""

    def rewrite(reply: Message, request: Message) -> list[Message]:
        other = HostileGrid.seen[(1, "advertise-keys")].content.config_records[SECAGG_KEY]
        return set_record(s_public=other["s_public"])(reply, request)

    out = Outcome(_config(), "advertise-keys", rewrite)
    assert out.new is not None, out.workflow.last_error
    assert sorted(out.contributors) == [2, 4, 5, 6]
    for node in (1, VICTIM):
        assert "another client advertised too" in out.excluded[node]
    assert out.mean is not None
    torch.testing.assert_close(out.mean.double(), out.app.mean(out.contributors), atol=1e-6, rtol=0)


def test_advertise_keys_duplicates_count_once() -> None:
    """The first reply counts: later copies with other keys do not replace it."""
    out = Outcome(_config(), "advertise-keys", copies(5, set_record(c_public=bytes(32))))
    out.assert_completed_with_victim()


def test_error_reply_reason_is_one_short_line() -> None:
    out = Outcome(_config(), "advertise-keys", error("boom\n" * 200_000))
    out.assert_completed_without_victim("client error")


# -- share-keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"ids": list(range(1, MAX_DEGREE + 2))}, "at most"),
        ({"ciphertexts": [bytes(2**20)]}, "ciphertexts"),
        ({"ids": [True]}, "ids"),
        ({"ids": [2**70]}, "ids"),
        ({"ids": "1,2"}, "ids"),
    ],
)
def test_malformed_share_keys_reply_is_excluded(fields: dict[str, Any], fragment: str) -> None:
    out = Outcome(_config(), "share-keys", set_record(**fields))
    out.assert_completed_without_victim(fragment)


def test_share_keys_duplicates_count_once() -> None:
    """Later copies addressing nobody (before: the last copy won and the node dropped)."""
    out = Outcome(_config(), "share-keys", copies(5, set_record(ids=[], ciphertexts=[])))
    out.assert_completed_with_victim()
    assert out.metrics["num-duplicates"] == 5


# -- unmask ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"seed_ids": list(range(1, 5000))}, "at most"),
        ({"seed_shares": [bytes(2**20)]}, "seed_shares"),
        ({"seed_ids": [VICTIM + 40], "seed_shares": [bytes(52)]}, "should not"),
        ({"key_ids": None}, "key_ids"),
    ],
)
def test_malformed_unmask_reply_leaves_the_sum_intact(
    fields: dict[str, Any], fragment: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its masked input is in the sum and the others hold enough shares: the round
    completes with every input, and the victim's unmask reply is refused (logged)."""
    with caplog.at_level(logging.INFO, logger="fedsec"):
        out = Outcome(_config(), "unmask", set_record(**fields))
    assert out.new is not None, out.workflow.last_error
    assert sorted(out.contributors) == list(range(1, CLIENTS + 1))
    assert out.mean is not None
    torch.testing.assert_close(out.mean.double(), out.app.mean(out.contributors), atol=1e-6, rtol=0)
    lines = [r.getMessage() for r in caplog.records if f"client {VICTIM} out" in r.getMessage()]
    assert len(lines) == 1 and fragment in lines[0] and len(lines[0]) < 400, lines


def test_unmask_duplicates_count_once() -> None:
    out = Outcome(_config(), "unmask", copies(5, set_record(seed_ids=[], seed_shares=[])))
    out.assert_completed_with_victim()
    assert out.metrics["num-duplicates"] == 5


# -- identify (signed mode) --------------------------------------------------------------


def test_oversized_identity_leaves_only_its_node_out(tmp_path: Path) -> None:
    """A 1 MB identity went to every client, which refused the round; now only its node
    sits out (signed mode)."""
    write_key_dir(tmp_path, [f"client-{i}" for i in range(CLIENTS)])
    cfg = _config(signed=True, key_dir=str(tmp_path))
    out = Outcome(cfg, "identify", set_record(identity="x" * 2**20))
    out.assert_completed_without_victim("identity must be")


def _signed(tmp_path: Path) -> ExperimentConfig:
    write_key_dir(tmp_path, [f"client-{i}" for i in range(CLIENTS)])
    return _config(signed=True, key_dir=str(tmp_path))


def test_bad_key_signature_leaves_only_its_owner_out(tmp_path: Path) -> None:
    """Signed mode: a signature on its keys that does not verify made every neighbour refuse
    the share-keys request; the server holding the public keys now drops only its owner."""
    out = Outcome(_signed(tmp_path), "advertise-keys", set_record(signature=bytes(64)))
    out.assert_completed_without_victim("bad signature")


def test_bad_survivor_signature_is_not_relayed(tmp_path: Path) -> None:
    """Signed mode: a bad signature on the survivor set made every neighbour refuse to
    unmask; now it is not relayed, and the victim's input (already in the sum) still counts."""
    out = Outcome(_signed(tmp_path), "consistency-check", set_record(signature=bytes(64)))
    out.assert_completed_with_victim()
