"""Red team: replay malicious client replies against the in-process engine (issue 16, case 3).

Every case runs one real round: fedsec's ServerApp loop (``run_experiment``,
with its checkpoint, metrics and decisions files) drives the real ClientApp on
three in-process nodes, then the case rewrites the round's replies the way a
hostile client (or a grid delivering twice) could. A case *held* when the
round did what the server's contract says, checked against two clean runs of
the same seed:

* an excluded reply: the round is ok, the reply is excluded with the expected
  reason, and the global model equals the run in which that node never
  answered (bit for bit: the honest replies are deterministic);
* duplicates: one copy counts, the model equals the clean run's;
* metric attacks: the server's counts and the record's columns are the
  server's own, the client's names stay bounded.

Secure-mode cases (``secure-*``) replay the same attacks at every SecAgg+
stage the server receives (advertise-keys, share-keys, masked-input, unmask)
on six nodes under ``secagg.enabled`` with equal weights: the victim drops out
with its reason and the model equals the secure round without it (up to the
quantisation, 1e-5), duplicates count once, and a masked weight no honest
client sends makes the server refuse the sum (the round fails, the model stays).

Prints one line per case (``held`` or ``FAILED`` with why) and exits 1 if any
case failed. About 10 s on a 2-core machine, most of it imports and the
1 GiB payload (``--big-mib`` makes it smaller).

    python simulations/redteam_replies.py
    python simulations/redteam_replies.py --big-mib 64 --only tib,dtype
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Array, Error, Message, RecordDict

from fedsec.checkpoint import load_checkpoint
from fedsec.client.app import app as client_app
from fedsec.config import ExperimentConfig, parse_config
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

#: Characters of every column name the server writes (client ones included).
SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
#: The node whose reply each case rewrites (partition 1).
VICTIM = 2
NODES = 3

Replies = list[Message]
Tamper = Callable[[Replies], Replies]


@dataclass(frozen=True)
class Outcome:
    """What one round produced, and the clean runs to compare it with."""

    row: dict[str, object]
    decisions: dict[str, object]
    header: list[str]
    model: dict[str, torch.Tensor]
    clean: dict[str, torch.Tensor]
    without_victim: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    decoded: int  # bytes of the largest array numpy decoded during the round


Check = Callable[[Outcome], str | None]


@dataclass(frozen=True)
class Case:
    """One malicious input: how it rewrites the replies and what must hold."""

    name: str
    what: str
    tamper: Tamper
    check: Check


class ReplayGrid(InProcessGrid):
    """The in-process grid, with the round's replies rewritten by a case.

    Every case's round sends the same requests (same seed, model and config),
    so each node's honest reply is computed once by the real ClientApp and
    replayed as a fresh copy afterwards (training dominates the run time).
    """

    honest: ClassVar[dict[tuple[int, str], RecordDict]] = {}

    def __init__(
        self, num_nodes: int, tamper: Tamper | None = None, dead: tuple[int, ...] = ()
    ) -> None:
        super().__init__(client_app, num_nodes, dead=dead)
        self.rewrite = tamper

    def send_and_receive(  # type: ignore[override]
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The real ClientApp's replies (or copies); training replies then go through the case."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            key = (node, msg.content.object_id)
            if key not in self.honest:
                fresh = super().send_and_receive([msg], timeout=timeout)
                if not fresh or fresh[0].has_error():
                    raise RuntimeError(f"node {node} gave no honest reply to replay")
                self.honest[key] = copy.deepcopy(fresh[0].content)
            elif node not in self.dead:
                msg.metadata.__dict__["_message_id"] = msg.object_id  # as the grid does on push
            if node not in self.dead:
                replies.append(Message(copy.deepcopy(self.honest[key]), reply_to=msg))
        if self.rewrite is not None and replies and replies[0].metadata.message_type == "train":
            replies = self.rewrite(replies)
        return replies


# -- building hostile payloads ------------------------------------------------------


def npy(descr: str, shape: tuple[int, ...], body: bytes, fortran: bool = False) -> bytes:
    """A ``.npy`` file whose header says ``descr`` and ``shape``, whatever ``body`` holds."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _victim(replies: Replies) -> Message:
    return next(m for m in replies if m.metadata.src_node_id == VICTIM)


def forge_array(
    make: Callable[[Array], bytes], metadata: dict[str, object] | None = None
) -> Tamper:
    """Replace the victim's first array's payload, keeping (or overriding) its metadata."""

    def tamper(replies: Replies) -> Replies:
        arrays = _victim(replies).content.array_records["arrays"]
        name = next(iter(arrays))
        honest = arrays[name]
        fields = {"dtype": honest.dtype, "shape": honest.shape, "stype": honest.stype}
        fields.update(metadata or {})
        arrays[name] = Array(
            dtype=fields["dtype"],  # type: ignore[arg-type]
            shape=fields["shape"],  # type: ignore[arg-type]
            stype=fields["stype"],  # type: ignore[arg-type]
            data=make(honest),
        )
        return replies

    return tamper


def _same_shape(descr: str, dtype: str) -> Callable[[Array], bytes]:
    """The honest values converted to ``dtype``, sent with a header saying ``descr``."""

    def make(honest: Array) -> bytes:
        values = honest.numpy().astype(dtype)
        return npy(descr, tuple(honest.shape), values.tobytes())

    return make


def _claim(count: int) -> Callable[[Array], bytes]:
    """A header claiming ``count`` float32 values, followed by only 8 bytes."""
    return lambda honest: npy("<f4", (count,), b"\0" * 8)


def set_metric(name: str, value: object, nodes: tuple[int, ...] = (VICTIM,)) -> Tamper:
    """Set a metric in the given nodes' replies (bypassing MetricRecord's type check)."""

    def tamper(replies: Replies) -> Replies:
        for msg in replies:
            if msg.metadata.src_node_id in nodes:
                msg.content.metric_records["metrics"]._data[name] = value
        return replies

    return tamper


def duplicate(copies: int) -> Tamper:
    """The victim's reply delivered ``copies`` more times."""
    return lambda replies: replies + [_victim(replies)] * copies


def only_victim(then: Tamper) -> Tamper:
    """Keep only the victim's reply (the others time out), then apply ``then``."""
    return lambda replies: then([_victim(replies)])


def many_metrics(count: int) -> Tamper:
    """Every reply carries ``count`` extra metrics."""

    def tamper(replies: Replies) -> Replies:
        for msg in replies:
            record = msg.content.metric_records["metrics"]
            for i in range(count):
                record[f"m{i}"] = 1.0
        return replies

    return tamper


# -- what must hold -----------------------------------------------------------------


def _equal(model: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(model[k], other[k]) for k in model)


def excluded(fragment: str) -> Check:
    """The victim is excluded with ``fragment`` in the reason; the rest aggregate as usual."""

    def check(out: Outcome) -> str | None:
        reason = dict(out.decisions.get("excluded", {})).get(str(VICTIM), "")  # type: ignore[call-overload]
        if out.row.get("status") != "ok":
            return f"round {out.row.get('status')}: {out.row.get('error', '')}"[:200]
        if (out.row.get("num-accepted"), out.row.get("num-excluded")) != (NODES - 1, 1):
            return f"accepted {out.row.get('num-accepted')}, excluded {out.row.get('num-excluded')}"
        if fragment not in reason:
            return f"reason {reason!r} does not mention {fragment!r}"
        if not _equal(out.model, out.without_victim):
            return "model differs from the round without the victim"
        return None

    return check


def not_decoded(limit: int, then: Check) -> Check:
    """No array larger than ``limit`` bytes was decoded, and ``then`` holds."""

    def check(out: Outcome) -> str | None:
        if out.decoded > limit:
            return f"a {out.decoded}-byte array was decoded"
        return then(out)

    return check


def all_excluded(fragment: str) -> Check:
    """Every reply excluded: the round fails and the model stays the initial one."""

    def check(out: Outcome) -> str | None:
        reasons = dict(out.decisions.get("excluded", {}))  # type: ignore[call-overload]
        if out.row.get("status") != "failed" or out.row.get("num-accepted") != 0:
            return f"status {out.row.get('status')}, accepted {out.row.get('num-accepted')}"
        if len(reasons) != NODES or not all(fragment in r for r in reasons.values()):
            return f"reasons {reasons}"
        if not _equal(out.model, out.initial):
            return "model changed"
        return None

    return check


def one_vote(out: Outcome) -> str | None:
    """Duplicates ignored: three accepted, the model equals the clean run's."""
    if out.row.get("status") != "ok" or out.row.get("num-accepted") != NODES:
        return f"status {out.row.get('status')}, accepted {out.row.get('num-accepted')}"
    if dict(out.decisions.get("duplicates", {})) != {str(VICTIM): 5}:  # type: ignore[call-overload]
        return f"duplicates recorded as {out.decisions.get('duplicates')}"
    if not _equal(out.model, out.clean):
        return "model differs from the clean round (a copy was counted)"
    return None


def server_counts(out: Outcome) -> str | None:
    """The only reply's metrics cannot overwrite the server's counts."""
    if (out.row.get("num-accepted"), out.row.get("num-excluded")) != (1, 0):
        counts = (out.row.get("num-accepted"), out.row.get("num-excluded"))
        return f"num-accepted, num-excluded = {counts}"
    if out.row.get("status") != "ok":
        return f"status {out.row.get('status')}"
    return None


def bounded_columns(out: Outcome) -> str | None:
    """No column of rounds.csv is longer than a prefixed 64-character name; round ok."""
    longest = max(len(c) for c in out.header)
    if longest > 64 + len("client_"):
        return f"a {longest}-character column in rounds.csv"
    unsafe = [k for k in out.row if not SAFE_NAME.fullmatch(k)]
    if unsafe:
        return f"unsafe column {unsafe[0][:20]!r} in the round's record"
    if out.row.get("status") != "ok" or out.row.get("num-accepted") != NODES:
        return f"status {out.row.get('status')}, accepted {out.row.get('num-accepted')}"
    return None


def few_columns(out: Outcome) -> str | None:
    """A reply with too many metrics adds none of them."""
    extra = [c for c in out.row if re.fullmatch(r"(client_)?m\d+", c)]
    if extra:
        return f"{len(extra)} client metric columns added"
    return bounded_columns(out)


def partitions_named(out: Outcome) -> str | None:
    """decisions.jsonl names each node's claimed partition (node id - 1 in-process)."""
    clients = out.decisions.get("clients", [])
    claims = {c["node"]: c.get("partition") for c in clients}  # type: ignore[union-attr]
    if claims != {n: n - 1 for n in range(1, NODES + 1)}:
        return f"partitions {claims}"
    return None


def _count(value: object) -> Tamper:
    return set_metric("num-examples", value)


def _collide(replies: Replies) -> Replies:
    return set_metric("num-excluded", 99)(set_metric("num-accepted", 99)(replies))


def _values(descr: str, shape: tuple[int, ...], values: np.ndarray) -> bytes:
    return npy(descr, shape, values.astype(np.float32).tobytes())


def cases(big_mib: int = 1024) -> list[Case]:
    """Every malicious-reply case of issue 16 (3) and its list of smaller defects."""
    big = big_mib * 2**20
    everyone = tuple(range(1, NODES + 1))
    dtype, count = excluded("dtype"), excluded("num-examples")
    return [
        Case(
            "tib",
            "header claims 1 TiB, 8-byte payload",
            forge_array(_claim(2**38)),
            excluded("shape"),
        ),
        Case(
            "16gib",
            "header claims 16 GiB, 8-byte payload",
            forge_array(_claim(2**32)),
            excluded("shape"),
        ),
        Case(
            "short",
            "payload 4 bytes shorter than its header says",
            forge_array(lambda a: _values("<f4", a.shape, a.numpy())[:-4]),
            excluded("bytes"),
        ),
        Case(
            "long",
            "payload 4 bytes longer than its header says",
            forge_array(lambda a: _values("<f4", a.shape, a.numpy()) + b"\0" * 4),
            excluded("bytes"),
        ),
        Case(
            "gib",
            f"{big_mib} MiB payload, its header true to it, not to the model",
            forge_array(lambda a: npy("<f4", (big // 4,), bytes(big))),
            not_decoded(2**20, excluded("shape")),
        ),
        Case(
            "float64",
            "float64 payload declared float32",
            forge_array(_same_shape("<f8", "float64")),
            dtype,
        ),
        Case(
            "complex",
            "complex64 payload (same width) declared float32",
            forge_array(_same_shape("<c8", "complex64")),
            dtype,
        ),
        Case(
            "bool", "bool payload declared float32", forge_array(_same_shape("|b1", "bool")), dtype
        ),
        Case(
            "float16",
            "float16 payload declared float32",
            forge_array(_same_shape("<f2", "float16")),
            dtype,
        ),
        Case(
            "object",
            "object (pickle) payload",
            forge_array(lambda a: npy("|O", a.shape, b"\x80N.")),
            dtype,
        ),
        Case(
            "magic",
            "payload that is not a .npy file",
            forge_array(lambda a: bytes(64)),
            excluded("decoded"),
        ),
        Case(
            "header",
            "64 KiB .npy header",
            forge_array(lambda a: b"\x93NUMPY\x01\x00\xff\xff" + b" " * 65535),
            excluded("decoded"),
        ),
        Case(
            "stype",
            "stype other than numpy",
            forge_array(lambda a: a.data, {"stype": "torch"}),
            excluded("stype"),
        ),
        Case(
            "meta-dtype",
            "metadata says float64",
            forge_array(lambda a: a.data, {"dtype": "float64"}),
            dtype,
        ),
        Case(
            "nan",
            "NaN in the payload",
            forge_array(lambda a: _values("<f4", a.shape, np.full(a.shape, np.nan))),
            excluded("NaN"),
        ),
        Case("ex-1e39", "num-examples 1e39 (inf in float32)", _count(1e39), count),
        Case("ex-2^62", "num-examples 2**62 (takes a mean's whole weight)", _count(2**62), count),
        Case("ex-2^1100", "num-examples 2**1100 (beyond float)", _count(2**1100), count),
        Case("ex-nan", "num-examples NaN", _count(math.nan), count),
        Case("ex-inf", "num-examples inf", _count(math.inf), count),
        Case("ex-neg", "num-examples -1", _count(-1), count),
        Case("ex-zero", "num-examples 0", _count(0), count),
        Case("ex-bool", "num-examples True", _count(True), count),
        Case("ex-list", "num-examples [1e9]", _count([1e9]), count),
        Case(
            "3x3e38",
            "three clients claim 3e38 examples (float32 sum overflows)",
            set_metric("num-examples", 3e38, nodes=everyone),
            all_excluded("num-examples"),
        ),
        Case("dup5", "the same reply delivered 6 times", duplicate(5), one_vote),
        Case(
            "collide",
            "only reply reports num-accepted = num-excluded = 99",
            only_victim(_collide),
            server_counts,
        ),
        Case(
            "1mb-name",
            "every reply has a metric with a 1 MB name",
            set_metric("x" * 2**20, 1.0, nodes=everyone),
            bounded_columns,
        ),
        Case(
            "csv-name",
            "metric name with a comma and a newline",
            set_metric("a,b\nc", 1.0, nodes=everyone),
            bounded_columns,
        ),
        Case("1000-metrics", "every reply has 1,000 metrics", many_metrics(1000), few_columns),
        Case("partition", "decisions.jsonl names partitions", lambda r: r, partitions_named),
    ]


# -- running ---------------------------------------------------------------------


def config() -> ExperimentConfig:
    """One round, three digits clients, three local steps: fast, and deterministic."""
    return parse_config(
        {
            "experiment": {"name": "redteam", "rounds": 1, "seed": 5},
            "data": {"num_clients": NODES},
            "client": {"local_epochs": 1, "local_steps": 3},
        }
    )


def run_round(root: Path, grid: InProcessGrid) -> tuple[RunDirectory, dict[str, object]]:
    """One round on ``grid``; its run directory and decisions line."""
    cfg = config()
    run = RunDirectory.create(cfg, root)
    run_experiment(grid.as_grid(), cfg, run)
    line = (run.path / "decisions.jsonl").read_text().splitlines()
    return run, (json.loads(line[-1]) if line else {})


def _state(run: RunDirectory) -> dict[str, torch.Tensor]:
    return run.load_last_checkpoint()[1]


@contextlib.contextmanager
def decoded_sizes() -> Iterator[list[int]]:
    """Record the size of every array ``np.load`` or ``np.frombuffer`` returns meanwhile."""
    sizes: list[int] = []
    load, frombuffer = np.load, np.frombuffer

    def spy_load(*args: Any, **kwargs: Any) -> Any:
        out = load(*args, **kwargs)
        sizes.append(getattr(out, "nbytes", 0))
        return out

    def spy_frombuffer(*args: Any, **kwargs: Any) -> Any:
        out = frombuffer(*args, **kwargs)
        sizes.append(out.nbytes)
        return out

    np.load, np.frombuffer = spy_load, spy_frombuffer  # type: ignore[assignment]
    try:
        yield sizes
    finally:
        np.load, np.frombuffer = load, frombuffer  # type: ignore[assignment]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The server logs every exclusion; the script prints one line per case instead."""
    log = logging.getLogger("fedsec")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def replay(selected: list[Case]) -> list[tuple[Case, str | None]]:
    """Run each case; pair it with why it failed (None when it held)."""
    results: list[tuple[Case, str | None]] = []
    with tempfile.TemporaryDirectory() as tmp, quiet():
        root = Path(tmp)
        clean_run, _ = run_round(root / "clean", ReplayGrid(NODES))
        without_run, _ = run_round(root / "without", ReplayGrid(NODES, dead=(VICTIM,)))
        clean, without = _state(clean_run), _state(without_run)
        first = clean_run.checkpoints[0]
        initial = load_checkpoint(clean_run.path / first["file"], first["sha256"])
        for case in selected:
            try:
                with decoded_sizes() as sizes:
                    run, decisions = run_round(root / case.name, ReplayGrid(NODES, case.tamper))
                row = run.rounds[-1]
                header = (run.path / "rounds.csv").read_text().splitlines()[0].split(",")
                outcome = Outcome(
                    row, decisions, header, _state(run), clean, without, initial, max(sizes)
                )
                results.append((case, case.check(outcome)))
                run.close()
            except Exception as err:  # the server must never raise on a reply
                results.append((case, f"{type(err).__name__}: {str(err)[:200]}"))
            finally:
                with contextlib.suppress(OSError):
                    for path in sorted((root / case.name).rglob("*"), reverse=True):
                        path.unlink() if path.is_file() else path.rmdir()
    return results


# -- secure aggregation (the SecAgg+ stages the server receives) ----------------------

#: Secure rounds drop the victim and must still meet the threshold: 6 nodes (k = 4, t = 3).
SECURE_NODES = 6


def secure_config() -> ExperimentConfig:
    """The plain cases' round under SecAgg+ (equal weights: a weight is then checkable)."""
    raw = config().to_dict()
    raw["data"]["num_clients"] = SECURE_NODES
    raw["secagg"] = {"enabled": True, "clip": 4.0, "weight_cap": 0}
    return parse_config(raw)


def secure_stage(reply: Message) -> str:
    """Which SecAgg stage a client's reply answers (the workflow's message layout)."""
    from fedsec.wire import MASKED_KEY, SECAGG_KEY

    if reply.has_error():
        return "error"
    if MASKED_KEY in reply.content.array_records:
        return "masked-input"
    record = reply.content.config_records.get(SECAGG_KEY)
    fields = set() if record is None else set(record.keys())
    for key, stage in (
        ("identity", "identify"),
        ("c_public", "advertise-keys"),
        ("ciphertexts", "share-keys"),
        ("seed_ids", "unmask"),
        ("signature", "consistency-check"),
    ):
        if key in fields:
            return stage
    return "other"


def at_stage(stage: str, rewrite: Callable[[Message], Replies]) -> Tamper:
    """Rewrite the victim's reply at ``stage`` into the messages ``rewrite`` returns."""

    def tamper(replies: Replies) -> Replies:
        out: Replies = []
        for msg in replies:
            hit = msg.metadata.src_node_id == VICTIM and secure_stage(msg) == stage
            out.extend(rewrite(msg) if hit else [msg])
        return out

    return tamper


def set_fields(**fields: object) -> Callable[[Message], Replies]:
    """Set fields of the reply's protocol record (bypassing ConfigRecord's type checks)."""
    from fedsec.wire import SECAGG_KEY

    def rewrite(msg: Message) -> Replies:
        record = msg.content.config_records[SECAGG_KEY]
        for key, value in fields.items():
            record._data[key] = value if value != "S_PUBLIC" else record["s_public"]
        return [msg]

    return rewrite


def masked_payload(make: Callable[[Array], Array]) -> Callable[[Message], Replies]:
    """Replace the masked vector (built from the honest one)."""
    from fedsec.wire import MASKED_KEY

    def rewrite(msg: Message) -> Replies:
        arrays = msg.content.array_records[MASKED_KEY]
        arrays[MASKED_KEY] = make(arrays[MASKED_KEY])
        return [msg]

    return rewrite


def masked_npy(descr: str, shape: Callable[[int], tuple[int, ...]], body: Callable[[Array], bytes]):  # type: ignore[no-untyped-def]
    """A masked array whose header says ``descr``/``shape(n)`` (n: the honest length)."""

    def make(honest: Array) -> Array:
        data = npy(descr, shape(honest.shape[0]), body(honest))
        return Array(dtype=honest.dtype, shape=tuple(honest.shape), stype=honest.stype, data=data)

    return make


def shift_weight(delta: int) -> Callable[[Array], Array]:
    """Add ``delta`` grid steps to the (masked) weight coordinate, modulo the ring."""

    def make(honest: Array) -> Array:
        values = honest.numpy().copy()
        values[-1] = (int(values[-1]) + delta) % 2**32
        return Array(values)

    return make


def resend(
    copies: int, then: Callable[[Message], Replies] | None = None
) -> Callable[[Message], Replies]:
    """The reply, then ``copies`` more (each rewritten by ``then``)."""

    def rewrite(msg: Message) -> Replies:
        extra: Replies = []
        for _ in range(copies):
            twin = copy.deepcopy(msg)
            extra.extend(then(twin) if then else [twin])
        return [msg, *extra]

    return rewrite


def error_reply(reason: str) -> Callable[[Message], Replies]:
    """An error from the same node in place of the reply (same routing metadata)."""
    return lambda msg: [Message(metadata=copy.deepcopy(msg.metadata), error=Error(1, reason))]


def _close(model: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    """Equal up to SecAgg's quantisation (a 27-bit grid over [-4, 4]: ~1e-7)."""
    return all(torch.allclose(model[k].float(), other[k].float(), atol=1e-5, rtol=0) for k in model)


def secure_excluded(fragment: str) -> Check:
    """The victim drops out with ``fragment`` in the reason; the others' sum makes the round."""

    def check(out: Outcome) -> str | None:
        reason = dict(out.decisions.get("excluded", {})).get(str(VICTIM), "")  # type: ignore[call-overload]
        if out.row.get("status") != "ok":
            return f"round {out.row.get('status')}: {out.row.get('error', '')}"[:200]
        if out.row.get("num-accepted") != SECURE_NODES - 1:
            return f"accepted {out.row.get('num-accepted')}"
        if fragment not in reason or len(reason) > 400:
            return f"reason {reason[:120]!r} does not mention {fragment!r} in one short line"
        if not _close(out.model, out.without_victim):
            return "model differs from the round without the victim"
        return None

    return check


def secure_kept(out: Outcome) -> str | None:
    """Every input counts once: the model equals the clean secure round's."""
    if out.row.get("status") != "ok" or out.row.get("num-accepted") != SECURE_NODES:
        return f"status {out.row.get('status')}, accepted {out.row.get('num-accepted')}"
    if not _close(out.model, out.clean):
        return "model differs from the clean round"
    return None


def secure_refused(fragment: str) -> Check:
    """A sum no honest clients give is refused: the round fails, the model stays."""

    def check(out: Outcome) -> str | None:
        if out.row.get("status") != "failed":
            return f"status {out.row.get('status')} (the sum was accepted)"
        if fragment not in str(out.row.get("error", "")):
            return f"error {str(out.row.get('error', ''))[:120]!r} does not mention {fragment!r}"
        if not _equal(out.model, out.initial):
            return "model changed"
        return None

    return check


def secure_cases() -> list[Case]:
    """The malformed-reply cases at every SecAgg stage the server receives."""
    mi, ak, sk, um = "masked-input", "advertise-keys", "share-keys", "unmask"
    honest_values = lambda a: a.numpy().tobytes()  # noqa: E731
    return [
        Case(
            "secure-tib",
            "masked input whose header claims 1 TiB, 8-byte payload",
            at_stage(
                mi, masked_payload(masked_npy("<u4", lambda n: (2**38,), lambda a: b"\0" * 8))
            ),
            not_decoded(2**24, secure_excluded("shape")),
        ),
        Case(
            "secure-long",
            "masked input 4 bytes longer than its header says",
            at_stage(
                mi,
                masked_payload(
                    masked_npy("<u4", lambda n: (n,), lambda a: honest_values(a) + bytes(4))
                ),
            ),
            secure_excluded("bytes"),
        ),
        Case(
            "secure-float32",
            "masked input as float32 (same width) instead of uint32",
            at_stage(mi, masked_payload(masked_npy("<f4", lambda n: (n,), honest_values))),
            secure_excluded("dtype"),
        ),
        Case(
            "secure-stype",
            "masked input with stype torch",
            at_stage(
                mi,
                masked_payload(
                    lambda a: Array(dtype=a.dtype, shape=tuple(a.shape), stype="torch", data=a.data)
                ),
            ),
            secure_excluded("stype"),
        ),
        Case(
            "secure-weight",
            "masked weight lowered by 2**28 grid steps (equal weights)",
            at_stage(mi, masked_payload(shift_weight(-(2**28)))),
            secure_refused("weight check"),
        ),
        Case(
            "secure-dup-masked",
            "masked input sent 6 times, later copies garbage",
            at_stage(mi, resend(5, masked_payload(shift_weight(12345)))),
            secure_kept,
        ),
        Case(
            "secure-low-order",
            "advertise-keys with the all-zero (low-order) X25519 key",
            at_stage(ak, set_fields(c_public=bytes(32))),
            secure_excluded("low-order"),
        ),
        Case(
            "secure-same-key",
            "advertise-keys with c_pk = s_pk",
            at_stage(ak, set_fields(c_public="S_PUBLIC")),
            secure_excluded("same key twice"),
        ),
        Case(
            "secure-1mb-sig",
            "advertise-keys with a 1 MB signature",
            at_stage(ak, set_fields(signature=bytes(2**20))),
            secure_excluded("signature"),
        ),
        Case(
            "secure-dup-keys",
            "advertise-keys sent 6 times, later copies with other keys",
            at_stage(ak, resend(5, set_fields(c_public=bytes(32)))),
            secure_kept,
        ),
        Case(
            "secure-error",
            "error reply with a 1 MB reason at advertise-keys",
            at_stage(ak, error_reply("x\n" * 2**19)),
            secure_excluded("client error"),
        ),
        Case(
            "secure-shares-list",
            "share-keys reply listing 2,000 ids",
            at_stage(sk, set_fields(ids=list(range(1, 2001)))),
            secure_excluded("at most"),
        ),
        Case(
            "secure-dup-shares",
            "share-keys sent 6 times, later copies addressing nobody",
            at_stage(sk, resend(5, set_fields(ids=[], ciphertexts=[]))),
            secure_kept,
        ),
        Case(
            "secure-unmask-list",
            "unmask reply listing 5,000 seed ids (input already in the sum)",
            at_stage(um, set_fields(seed_ids=list(range(1, 5001)))),
            secure_kept,
        ),
        Case(
            "secure-stage",
            "reply to advertise-keys with an unknown stage's record",
            at_stage(ak, set_fields(stage="no-such-stage", c_public=None)),
            secure_excluded("c_public"),
        ),
    ]


class SecureGrid(InProcessGrid):
    """The in-process grid whose replies of each exchange go through a case's tamper."""

    def __init__(self, tamper: Tamper | None = None, dead: tuple[int, ...] = ()) -> None:
        super().__init__(client_app, SECURE_NODES, dead=dead)
        self.rewrite = tamper

    def send_and_receive(  # type: ignore[override]
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The real replies, rewritten by the case."""
        replies = super().send_and_receive(messages, timeout=timeout)
        return self.rewrite(replies) if self.rewrite is not None else replies


def run_secure_round(root: Path, grid: InProcessGrid) -> tuple[RunDirectory, dict[str, object]]:
    """One secure round on ``grid``; its run directory and decisions line."""
    cfg = secure_config()
    run = RunDirectory.create(cfg, root)
    run_experiment(grid.as_grid(), cfg, run)
    line = (run.path / "decisions.jsonl").read_text().splitlines()
    return run, (json.loads(line[-1]) if line else {})


def replay_secure(selected: list[Case]) -> list[tuple[Case, str | None]]:
    """Run each secure case; pair it with why it failed (None when it held)."""
    results: list[tuple[Case, str | None]] = []
    with tempfile.TemporaryDirectory() as tmp, quiet():
        root = Path(tmp)
        clean_run, _ = run_secure_round(root / "clean", SecureGrid())
        without_run, _ = run_secure_round(root / "without", SecureGrid(dead=(VICTIM,)))
        clean, without = _state(clean_run), _state(without_run)
        first = clean_run.checkpoints[0]
        initial = load_checkpoint(clean_run.path / first["file"], first["sha256"])
        for case in selected:
            try:
                with decoded_sizes() as sizes:
                    run, decisions = run_secure_round(root / case.name, SecureGrid(case.tamper))
                row = run.rounds[-1]
                header = (run.path / "rounds.csv").read_text().splitlines()[0].split(",")
                outcome = Outcome(
                    row, decisions, header, _state(run), clean, without, initial, max(sizes)
                )
                results.append((case, case.check(outcome)))
                run.close()
            except Exception as err:  # the server must never raise on a reply
                results.append((case, f"{type(err).__name__}: {str(err)[:200]}"))
    return results


def main(argv: list[str] | None = None) -> int:
    """Replay the cases; print one line each; 1 if any failed, 2 on a bad option."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big payload")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args(argv)
    if args.big_mib < 1:
        parser.error("--big-mib must be >= 1")
    plain = cases(args.big_mib)
    selected = plain + secure_cases()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in selected}
        if unknown:
            parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
        selected = [c for c in selected if c.name in wanted]
    plain_names = {c.name for c in plain}
    chosen_plain = [c for c in selected if c.name in plain_names]
    chosen_secure = [c for c in selected if c.name not in plain_names]
    results = (replay(chosen_plain) if chosen_plain else []) + (
        replay_secure(chosen_secure) if chosen_secure else []
    )
    width = max(len(c.name) for c, _ in results)
    for case, failure in results:
        verdict = "held  " if failure is None else "FAILED"
        detail = "" if failure is None else f" -- {failure}"
        print(f"{verdict} {case.name:<{width}}  {case.what}{detail}")
    failed = sum(f is not None for _, f in results)
    print(f"{len(results) - failed}/{len(results)} held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
