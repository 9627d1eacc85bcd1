"""Hostile client replies (issue 16, case 3 and its smaller defects).

Each test replays one malicious reply through FedSecStrategy (or ArraySpec)
and checks the server's contract: the reply is excluded with a reason, never
allocated or decoded beyond the model's size, never fails the round, never
outweighs the others, and never writes over the server's own metrics. The
last test runs the red-team script's whole case list through the real round
loop and ClientApp.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsec import aggregation
from fedsec.config import parse_config
from fedsec.strategies import ArraySpec, FedSecStrategy
from fedsec.strategies.server_app import _decisions, build_strategy

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


class FakeGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = Array(value)
    return record


def _shifted(value: float) -> dict[str, np.ndarray]:
    return {k: v + value for k, v in GLOBAL.items()}


def _strategy(**kwargs: Any) -> FedSecStrategy:
    return FedSecStrategy(rule=aggregation.make("mean"), **kwargs)


def _configure(strategy: FedSecStrategy, nodes: int = 3) -> list[Message]:
    grid: Any = FakeGrid(nodes)
    return list(strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), grid))


def _reply(request: Message, value: float = 1.0, **metrics: Any) -> Message:
    record = MetricRecord({"num-examples": 10, "train_loss": 1.0})
    for name, metric in metrics.items():
        record._data[name.replace("_", "-") if name == "num_examples" else name] = metric
    content = RecordDict({"arrays": _record(_shifted(value)), "metrics": record})
    return Message(content=content, reply_to=request)


def _flat(record: ArrayRecord) -> torch.Tensor:
    spec = ArraySpec.from_record(record)
    out = torch.empty(spec.dim)
    assert spec.flatten_into(record, out) is None
    return out


def npy(descr: str, shape: tuple[int, ...], body: bytes, fortran: bool = False) -> bytes:
    """A .npy file whose header says ``descr`` and ``shape``, whatever ``body`` holds."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _with_payload(reply: Message, name: str, data: bytes, **metadata: Any) -> Message:
    """Replace one array's payload, keeping the honest metadata unless overridden."""
    arrays = reply.content.array_records["arrays"]
    honest = arrays[name]
    fields = {"dtype": honest.dtype, "shape": honest.shape, "stype": honest.stype, **metadata}
    arrays[name] = Array(
        dtype=fields["dtype"], shape=fields["shape"], stype=fields["stype"], data=data
    )
    return reply


def _round_with(bad: Message, good: Message, strategy: FedSecStrategy) -> str:
    """Aggregate ``bad`` with ``good``: the round must succeed on ``good`` alone."""
    arrays, metrics = strategy.aggregate_train(1, [bad, good])
    assert arrays is not None and metrics is not None
    assert (metrics["num-accepted"], metrics["num-excluded"]) == (1, 1)
    assert torch.equal(_flat(arrays), torch.full((8,), 2.0))
    assert strategy.last_report is not None
    return strategy.last_report.excluded[bad.metadata.src_node_id]


# -- (3a) array headers and payloads ------------------------------------------------


@pytest.mark.parametrize("claim", [2**38, 2**32])  # 1 TiB and 16 GiB of float32
def test_huge_header_claim_is_refused_before_allocating(claim: int) -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    bad = _with_payload(_reply(requests[0]), "b", npy("<f4", (claim,), b"\0" * 8))
    reason = _round_with(bad, _reply(requests[1], 2.0), strategy)
    assert "shape" in reason


def test_big_payload_is_not_decoded_before_the_shape_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = 64 * 2**20  # the red-team script uses 1 GiB; the path is the same
    decoded: list[int] = []
    load, frombuffer = np.load, np.frombuffer

    def spy_load(file: Any, *args: Any, **kwargs: Any) -> Any:
        array = load(file, *args, **kwargs)
        decoded.append(array.nbytes)
        return array

    def spy_frombuffer(buffer: Any, *args: Any, **kwargs: Any) -> Any:
        array = frombuffer(buffer, *args, **kwargs)
        decoded.append(array.nbytes)
        return array

    strategy = _strategy()
    requests = _configure(strategy)
    bad = _with_payload(_reply(requests[0]), "w", npy("<f4", (big // 4,), bytes(big)))
    monkeypatch.setattr(np, "load", spy_load)
    monkeypatch.setattr(np, "frombuffer", spy_frombuffer)
    reason = _round_with(bad, _reply(requests[1], 2.0), strategy)
    assert "shape" in reason
    assert max(decoded) < 1024, "the big payload was decoded"


@pytest.mark.parametrize("trim", [-4, 4])
def test_payload_length_must_match_its_header(trim: int) -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    body = np.ones(2, dtype=np.float32).tobytes()
    body = body[:trim] if trim < 0 else body + b"\0" * trim
    bad = _with_payload(_reply(requests[0]), "b", npy("<f4", (2,), body))
    assert "bytes" in _round_with(bad, _reply(requests[1], 2.0), strategy)


@pytest.mark.parametrize(
    ("descr", "dtype"),
    [("<f8", "float64"), ("<c8", "complex64"), ("|b1", "bool"), ("<f2", "float16")],
)
def test_payload_dtype_must_be_the_declared_one(descr: str, dtype: str) -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    values = np.full(2, 1.5, dtype=dtype)
    bad = _with_payload(_reply(requests[0]), "b", npy(descr, (2,), values.tobytes()))
    reason = _round_with(bad, _reply(requests[1], 2.0), strategy)
    assert "dtype" in reason and dtype in reason


@pytest.mark.parametrize(
    "data",
    [b"\0" * 64, b"\x93NUMPY\x01\x00\xff\xff" + b" " * 65535, b"\x93NUMPY\x03\x00" + b"\0" * 64],
    ids=["not-npy", "64k-header", "version-3"],
)
def test_undecodable_payload_is_excluded_not_fatal(data: bytes) -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    bad = _with_payload(_reply(requests[0]), "b", data)
    assert "cannot be decoded" in _round_with(bad, _reply(requests[1], 2.0), strategy)


def test_stype_must_be_numpy() -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    honest = _reply(requests[0]).content.array_records["arrays"]["b"].data
    bad = _with_payload(_reply(requests[0]), "b", honest, stype="torch.tensor")
    assert "stype" in _round_with(bad, _reply(requests[1], 2.0), strategy)


def test_column_major_and_big_endian_payloads_keep_their_values() -> None:
    """Honest but unusual encodings still decode to the right values."""
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    record = ArrayRecord()
    record["w"] = Array(np.asfortranarray(values))
    record["b"] = Array(np.array([7.0, 8.0], dtype=">f4"))
    record["b"].dtype = "float32"  # numpy names '>f4' float32 too
    spec = ArraySpec.from_record(_record(GLOBAL))
    out = torch.empty(spec.dim)
    assert spec.flatten_into(record, out) is None
    assert out.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]


# -- (3b, 3c, 3d) example counts -------------------------------------------------------


@pytest.mark.parametrize(
    "count",
    [1e39, 2**62, 2**1100, math.nan, math.inf, -1, 0, 0.5, True, [1e9]],
    ids=["1e39", "2^62", "2^1100", "nan", "inf", "-1", "0", "0.5", "bool", "list"],
)
def test_example_count_outside_the_cap_is_excluded(count: object) -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    bad = _reply(requests[0], 9.0, num_examples=count)
    assert "num-examples" in _round_with(bad, _reply(requests[1], 2.0), strategy)


def test_cap_is_configurable() -> None:
    strategy = _strategy(max_examples=100)
    requests = _configure(strategy)
    arrays, metrics = strategy.aggregate_train(
        1,
        [
            _reply(requests[0], 9.0, num_examples=101),
            _reply(requests[1], 2.0, num_examples=100),
        ],
    )
    assert arrays is not None and metrics is not None and metrics["num-excluded"] == 1
    with pytest.raises(ValueError, match="max_examples"):
        _strategy(max_examples=2**31 + 1)


def test_build_strategy_caps_counts_at_the_training_split() -> None:
    cfg = parse_config({"data": {"num_clients": 3}})
    assert build_strategy(cfg, train_size=1500).max_examples == 1500
    assert build_strategy(cfg, train_size=2**40).max_examples == 2**31
    assert build_strategy(cfg).max_examples == 2**31
    capped = parse_config({"data": {"num_clients": 3}, "server": {"max_examples": 40}})
    assert build_strategy(capped, train_size=1500).max_examples == 40


def test_float32_weight_overflow_never_yields_a_zero_update_marked_ok() -> None:
    """3 x 3e38 examples: finite each, inf summed in float32; all excluded, model kept."""
    strategy = _strategy()
    requests = _configure(strategy)
    replies = [_reply(r, 1.0, num_examples=3e38) for r in requests]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics is not None and metrics["num-excluded"] == 3


def test_weight_sums_are_checked_before_the_rule() -> None:
    from fedsec.strategies.strategy import checked_weights

    assert checked_weights([1.0, 2.0]).dtype == torch.float32
    for weights in ([3e38, 3e38, 3e38], [1e39], [0.0], [math.inf]):
        with pytest.raises(FloatingPointError):
            checked_weights(weights)


# -- duplicates ----------------------------------------------------------------------


def test_duplicate_replies_count_once() -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    copy = _reply(requests[0], 6.0)
    arrays, metrics = strategy.aggregate_train(1, [copy] * 6 + [_reply(requests[1], 0.0)])
    assert arrays is not None and metrics is not None
    assert torch.allclose(_flat(arrays), torch.full((8,), 3.0))  # (6 + 0) / 2, not 36 / 7
    assert (metrics["num-accepted"], metrics["num-duplicates"]) == (2, 5)
    assert strategy.last_report is not None and strategy.last_report.duplicates == {1: 5}


def test_evaluation_replies_are_deduplicated_and_capped() -> None:
    strategy = _strategy()
    requests = _configure(strategy)

    def evaluation(request: Message, loss: float, count: object) -> Message:
        record = MetricRecord({"eval_loss": loss})
        record._data["num-examples"] = count
        return Message(RecordDict({"metrics": record}), reply_to=request)

    merged = strategy.aggregate_evaluate(
        1,
        [evaluation(requests[0], 1.0, 10)] * 4
        + [evaluation(requests[1], 3.0, 10), evaluation(requests[2], 99.0, 2**62)],
    )
    assert merged is not None and merged["eval_loss"] == pytest.approx(2.0)


# -- metrics -------------------------------------------------------------------------


def test_client_metrics_cannot_overwrite_server_counts() -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    only = _reply(requests[0], 1.0, **{"num-accepted": 99, "num-excluded": 99})
    _, metrics = strategy.aggregate_train(1, [only])
    assert metrics is not None
    assert (metrics["num-accepted"], metrics["num-excluded"]) == (1, 0)
    assert metrics["client_num-accepted"] == 99 and metrics["train_loss"] == 1.0


@pytest.mark.parametrize(
    "name", ["x" * 2**20, "x" * 65, "a,b\nc", "", "ü"], ids=["1MB", "65", "csv", "empty", "utf8"]
)
def test_unsafe_metric_names_are_dropped(name: str) -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    _, metrics = strategy.aggregate_train(1, [_reply(requests[0], 1.0, **{name: 1.0})])
    assert metrics is not None and metrics["num-metrics-dropped"] == 1
    assert all(len(key) <= 64 + len("client_") for key in metrics)
    assert not any(name and name in key for key in metrics)


def test_too_many_metrics_or_unbounded_values_are_dropped() -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    crowded = _reply(requests[0], 1.0, **{f"m{i}": 1.0 for i in range(100)})
    _, metrics = strategy.aggregate_train(1, [crowded])
    assert metrics is not None and not any(k.startswith("client_m") for k in metrics)
    assert "train_loss" not in metrics  # the crowded reply's metrics all go
    requests = _configure(strategy)
    huge = _reply(requests[0], 1.0, big=1e308, nan=math.nan)
    other = _reply(requests[1], 1.0, big=1e308)
    _, metrics = strategy.aggregate_train(1, [huge, other])
    assert metrics is not None and "client_nan" not in metrics
    assert metrics["client_big"] == 1e308


# -- decisions.jsonl names partitions -----------------------------------------------


def test_decisions_name_claimed_partitions_and_keep_node_ids() -> None:
    strategy = _strategy()
    requests = _configure(strategy)
    replies = [
        _reply(requests[0], 1.0, **{"partition-id": 4}),
        _reply(requests[1], 1.0, **{"partition-id": 0, "num_examples": -1}),
    ]
    strategy.aggregate_train(1, replies)
    line = _decisions(strategy, 1)
    clients = {c["node"]: c for c in line["clients"]}  # type: ignore[attr-defined]
    assert clients[1]["partition"] == 4 and clients[1]["status"] == "accepted"
    assert clients[2]["partition"] == 0 and clients[2]["status"] == "excluded"
    assert clients[3]["partition"] is None and clients[3]["status"] == "no reply"
    assert line["sampled"] == [1, 2, 3] and set(line["excluded"]) == {"2"}  # type: ignore[arg-type]


# -- the red-team script -----------------------------------------------------------


def test_redteam_script_cases_all_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case of simulations/redteam_replies.py holds through the real round loop."""
    path = Path(__file__).parent.parent / "simulations" / "redteam_replies.py"
    spec = importlib.util.spec_from_file_location("redteam_replies", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    results = module.replay(module.cases(big_mib=16))
    failed = {case.name: why for case, why in results if why is not None}
    assert not failed
    assert len(results) >= 30
