"""Bucketed secure aggregation on Flower's Message API (in-process grid, real mod and strategy).

Most tests use a ClientApp whose "training" adds a known vector to the model,
so the plaintext bucket sums are known exactly; the attack test at the end
trains real clients on digits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV
from fedsec.client.app import app as real_client_app
from fedsec.client.secagg_mod import MASKED_KEY, SECAGG_KEY, secagg_mod
from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig, parse_config
from fedsec.data import DATASETS
from fedsec.models import make_model
from fedsec.params import flatten_state, unflatten_state
from fedsec.runs import RoundMetrics, RunDirectory
from fedsec.secagg.signing import write_key_dir
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.pipeline import pipeline
from fedsec.strategies.server_app import build_strategy, make_secagg_workflow, run_experiment
from fedsec.strategies.strategy import FedSecStrategy

CAP = 100  # weight_cap: a client of n examples weighs min(n, 100) / 100


def _config(clients: int, s: int, rule: str = "mean", **secagg: Any) -> ExperimentConfig:
    return parse_config(
        {
            "experiment": {"name": "buckets", "rounds": 1, "seed": 5},
            "data": {"num_clients": clients},
            "aggregation": {"rule": rule, "pre": ["bucketing"], "bucket_size": s},
            "secagg": {"enabled": True, "clip": 1.0, "weight_cap": CAP, **secagg},
        }
    )


class KnownUpdates:
    """A ClientApp (with the real secagg mod) whose update for partition p is ``updates[p]``."""

    def __init__(self, clients: int, dim: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.updates = torch.randn(clients, dim, generator=gen) * 0.05
        self.examples = [20 + 13 * p for p in range(clients)]
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

    def weight(self, pid: int) -> float:
        return min(self.examples[pid], CAP) / CAP

    def bucket_mean(self, nodes: list[int]) -> torch.Tensor:
        pids = [n - 1 for n in nodes]  # InProcessGrid: node n holds partition n - 1
        w = torch.tensor([self.weight(p) for p in pids], dtype=torch.float64)
        return (w[:, None] * self.updates[pids].double()).sum(0) / w.sum()


class Recorder:
    """Spies on one secure round: the buckets, what the strategy got, every message sent."""

    def __init__(self, workflow: Any, strategy: FedSecStrategy, grid: InProcessGrid) -> None:
        self.buckets: list[list[int]] = []
        self.means: torch.Tensor | None = None
        self.sent: list[tuple[int, str]] = []  # (node, stage)
        split, aggregate, send = workflow._split, strategy.aggregate_buckets, grid.send_and_receive

        def record_split(server_round: int, nodes: list[int]) -> list[list[int]]:
            self.buckets = split(server_round, nodes)
            return self.buckets

        def record_aggregate(server_round: int, means: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.means = means.clone()
            return aggregate(server_round, means, *a, **k)

        def record_send(messages: Any, *, timeout: float | None = None) -> list[Message]:
            messages = list(messages)
            for m in messages:
                record = m.content.config_records.get(SECAGG_KEY)
                if record is not None:
                    self.sent.append((m.metadata.dst_node_id, str(record["stage"])))
            return send(messages, timeout=timeout)

        workflow._split = record_split
        strategy.aggregate_buckets = record_aggregate  # type: ignore[method-assign]
        grid.send_and_receive = record_send  # type: ignore[method-assign]


def _round(
    cfg: ExperimentConfig,
    app: KnownUpdates,
    tamper: dict[int, Callable[[Message], Message | None]] | None = None,
) -> tuple[ArrayRecord | None, MetricRecord, Recorder]:
    info = DATASETS.get(cfg.data.dataset)
    model = make_model(cfg.model.name, info.input_shape, info.num_classes, seed=0)
    grid = InProcessGrid(app.app, cfg.data.num_clients, tamper=tamper)
    strategy = build_strategy(cfg)
    workflow = make_secagg_workflow(cfg)
    recorder = Recorder(workflow, strategy, grid)
    wire = ConfigRecord({WIRE_CONFIG_KEY: __import__("json").dumps(cfg.to_dict())})
    g = grid.as_grid()
    new, metrics = workflow.run_round(
        pipeline(g), g, strategy, 1, ArrayRecord(model.state_dict()), wire
    )
    return new, metrics, recorder


def _dim(cfg: ExperimentConfig) -> int:
    info = DATASETS.get(cfg.data.dataset)
    model = make_model(cfg.model.name, info.input_shape, info.num_classes)
    return sum(v.numel() for v in model.state_dict().values())


@pytest.mark.parametrize(("clients", "s", "sizes"), [(12, 3, [3, 3, 3, 3]), (9, 2, [3, 2, 2, 2])])
def test_bucket_sums_equal_plaintext_sums(clients: int, s: int, sizes: list[int]) -> None:
    cfg = _config(clients, s)
    app = KnownUpdates(clients, _dim(cfg))
    new, metrics, rec = _round(cfg, app)
    assert new is not None
    assert sorted(len(b) for b in rec.buckets) == sorted(sizes)
    assert sorted(n for b in rec.buckets for n in b) == list(range(1, clients + 1))
    assert rec.means is not None and rec.means.shape[0] == len(sizes)
    for bucket, mean in zip(rec.buckets, rec.means, strict=True):
        # A 27..30-bit grid over [-1, 1]: the quantisation error is ~1e-8 per coordinate.
        torch.testing.assert_close(mean.double(), app.bucket_mean(bucket), atol=1e-6, rtol=0)
    assert metrics["secagg_buckets_unmasked"] == len(sizes)
    assert metrics["secagg_min_bucket"] == min(sizes)
    # Rule "mean" across bucket means weighted by bucket weights is the overall weighted mean.
    overall = app.bucket_mean(list(range(1, clients + 1)))
    moved = flatten_state(new.to_torch_state_dict()) - flatten_state(
        make_model(cfg.model.name, (1, 8, 8), 10, seed=0).state_dict()
    )
    torch.testing.assert_close(moved.double(), overall, atol=1e-6, rtol=0)


def test_signed_buckets_give_the_plaintext_sums(tmp_path: Path) -> None:
    """Malicious-server mode inside every bucket: signed keys, consistency check, t > k / 2."""
    clients, s = 9, 3
    write_key_dir(tmp_path, [f"client-{i}" for i in range(clients)])
    cfg = _config(clients, s, signed=True, key_dir=str(tmp_path))
    app = KnownUpdates(clients, _dim(cfg))
    new, metrics, rec = _round(cfg, app)
    assert new is not None and metrics["secagg_buckets_unmasked"] == 3
    assert ("1", "consistency-check") in {(str(n), st) for n, st in rec.sent}
    assert rec.means is not None
    for bucket, mean in zip(rec.buckets, rec.means, strict=True):
        torch.testing.assert_close(mean.double(), app.bucket_mean(bucket), atol=1e-6, rtol=0)


def _vanish_at(stage: str) -> Callable[[Message], Message | None]:
    def vanish(reply: Message) -> Message | None:
        if stage == "masked-input":
            return None if MASKED_KEY in reply.content.array_records else reply
        record = reply.content.config_records.get(SECAGG_KEY)
        keys = {"share-keys": "ciphertexts", "unmask": "seed_ids", "advertise-keys": "c_public"}
        return None if record is not None and keys[stage] in record else reply

    return vanish


@pytest.mark.parametrize("seed", range(6))
def test_no_bucket_smaller_than_s_is_ever_unmasked(seed: int) -> None:
    """Random dropouts at random stages: every sum unmasked has at least s members, and
    the members of a bucket that fell below s never get an unmask request."""
    clients, s = 12, 3
    cfg = _config(clients, s)
    app = KnownUpdates(clients, _dim(cfg), seed=seed)
    rng = random.Random(seed)
    lost = rng.sample(range(1, clients + 1), 3)
    tamper = {
        node: _vanish_at(rng.choice(["advertise-keys", "share-keys", "masked-input"]))
        for node in lost
    }
    new, metrics, rec = _round(cfg, app, tamper)
    unmask_sent = {node for node, stage in rec.sent if stage == "unmask"}
    survivors = [[n for n in bucket if n not in lost] for bucket in rec.buckets]
    for bucket, alive in zip(rec.buckets, survivors, strict=True):
        if len(alive) < s:
            assert not unmask_sent & set(bucket), (bucket, lost)
    kept = [alive for alive in survivors if len(alive) >= s]
    assert metrics.get("secagg_buckets_unmasked", 0) == len(kept)
    if not kept:
        assert new is None
        return
    assert new is not None and metrics["secagg_min_bucket"] >= s
    assert rec.means is not None and rec.means.shape[0] == len(kept)
    for mean, alive in zip(rec.means, kept, strict=True):
        torch.testing.assert_close(mean.double(), app.bucket_mean(alive), atol=1e-6, rtol=0)


def _shift_masked(codes: int) -> Callable[[Message], Message | None]:
    """A client that adds ``codes`` to every coordinate of its masked vector (mod R):
    the masks still cancel, so its bucket's sum grows by that much."""

    def shift(reply: Message) -> Message | None:
        arrays = reply.content.array_records.get(MASKED_KEY)
        if arrays is None:
            return reply
        masked = arrays[MASKED_KEY].numpy()
        shifted = (masked + np.array(codes, dtype=masked.dtype)).astype(masked.dtype)
        shifted[-1] = masked[-1]  # leave the weight coordinate alone
        reply.content[MASKED_KEY] = ArrayRecord({MASKED_KEY: Array(shifted)})
        return reply

    return shift


def test_norm_bound_discards_an_implausible_bucket(caplog: pytest.LogCaptureFixture) -> None:
    clients, s = 12, 3
    cfg = _config(clients, s, norm_bound=0.2)
    app = KnownUpdates(clients, _dim(cfg))  # honest updates of norm ~0.05 sqrt(d) ~ 3.3
    new, metrics, rec = _round(cfg, app, tamper={5: _shift_masked(1 << 26)})
    assert new is not None
    assert metrics["secagg_buckets_unmasked"] == 4
    assert metrics["secagg_buckets_discarded"] == 1
    assert "sum norm" in caplog.text and "exceeds" in caplog.text
    poisoned = next(b for b in rec.buckets if 5 in b)
    assert rec.means is not None and rec.means.shape[0] == 3
    for mean in rec.means:  # every kept bucket is an honest, norm-bounded one
        assert float((mean.double()).norm()) <= 0.2 + 1e-4
    assert all(5 not in b or b is poisoned for b in rec.buckets)


def test_round_fails_and_model_stays_when_every_bucket_is_discarded() -> None:
    clients, s = 6, 3
    cfg = _config(clients, s, norm_bound=0.2)
    app = KnownUpdates(clients, _dim(cfg))
    tamper = {n: _shift_masked(1 << 24) for n in range(1, clients + 1)}
    new, metrics, _ = _round(cfg, app, tamper=tamper)
    assert new is None and metrics["secagg_aborted"] == 1


@pytest.mark.parametrize("bucketed", [True, False])
def test_distributed_dp_run_reports_a_growing_epsilon(tmp_path: Path, bucketed: bool) -> None:
    """Two rounds with Skellam noise on digits (bucketed, or one sum of all six): the
    run completes and reports the client-level epsilon against the server, growing
    with the rounds."""
    aggregation = {"rule": "median", "pre": ["bucketing"], "bucket_size": 3}
    cfg = parse_config(
        {
            "experiment": {"name": "ddp", "rounds": 2, "seed": 1},
            "data": {"num_clients": 6},
            "client": {"local_epochs": 1},
            "aggregation": aggregation if bucketed else {},
            "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "update_clip": 1.0},
            "secagg": {"enabled": True, "weight_cap": 0},
        }
    )
    run = RunDirectory.create(cfg, tmp_path)
    rounds = run_experiment(InProcessGrid(real_client_app, 6).as_grid(), cfg, run)
    assert [r["status"] for r in rounds[1:]] == ["ok", "ok"]
    eps = [float(r["dp_distributed_epsilon"]) for r in rounds[1:]]
    assert 0 < eps[0] < eps[1]
    assert rounds[1]["dp_accountant"] == "skellam-rdp"


# -- robustness under attack --------------------------------------------------------


def _simulate(tmp_path: Path, **sections: dict[str, Any]) -> list[RoundMetrics]:
    """20 clients, Dirichlet alpha = 0.5, digits MLP, 2 local epochs, 12 rounds, seed 0."""
    raw: dict[str, dict[str, Any]] = {
        "experiment": {"name": "attack", "rounds": 12, "seed": 0},
        "data": {"partition": "dirichlet", "alpha": 0.5, "num_clients": 20},
        "client": {"local_epochs": 2},
        "secagg": {"enabled": True},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    cfg = parse_config(raw)
    run = RunDirectory.create(cfg, tmp_path)
    return run_experiment(InProcessGrid(real_client_app, 20).as_grid(), cfg, run)


IPM = {"name": "ipm", "num_malicious": 4, "params": {"epsilon": 100.0}}


def test_bucketed_robust_rules_hold_where_the_secure_mean_falls(tmp_path: Path) -> None:
    """20 % IPM (epsilon 100; the 4 colluders pool their own updates before masking).

    Bucketed secure aggregation (s = 2) with a norm bound of 2 (honest update
    norms are 0.7-1.2) and coordinate median or centered clipping stays within
    10 points of the clean secure mean; the plain secure mean (no buckets, no
    bound) falls at least 20 points further than the worse of the two.
    """
    clean = float(_simulate(tmp_path / "clean")[-1]["test_accuracy"])
    bucketed: dict[str, float] = {}
    for rule, params in (("median", {}), ("centered-clipping", {"tau": 0.1})):
        rounds = _simulate(
            tmp_path / rule,
            attack=IPM,
            aggregation={"rule": rule, "params": params, "pre": ["bucketing"], "bucket_size": 2},
            secagg={"norm_bound": 2.0},
        )
        assert all(r["status"] == "ok" for r in rounds[1:])
        assert sum(r["secagg_buckets_discarded"] for r in rounds[1:]) > 0  # the bound bit
        bucketed[rule] = float(rounds[-1]["test_accuracy"])
    mean = float(_simulate(tmp_path / "mean", attack=IPM)[-1]["test_accuracy"])
    print(f"clean {clean:.3f}, bucketed {bucketed}, secure mean {mean:.3f}")
    for rule, accuracy in bucketed.items():
        assert accuracy >= clean - 0.10, (rule, accuracy, clean)
    assert mean <= min(bucketed.values()) - 0.20, (mean, bucketed)


def test_a_deployed_client_never_sends_its_plain_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a simulation's adversary mode, a config that names the node a colluder
    changes nothing: every masked-input reply is masked, and a crafted update is refused."""
    cfg = parse_config(
        {
            "experiment": {"name": "deployed", "rounds": 1, "seed": 0},
            "data": {"num_clients": 6},
            "client": {"local_epochs": 1},
            "attack": {"name": "ipm", "num_malicious": 2, "params": {"epsilon": 10.0}},
            "secagg": {"enabled": True},
        }
    )
    grid = InProcessGrid(real_client_app, 6)
    monkeypatch.delenv(SIMULATED_ADVERSARY_ENV)
    replies: list[Message] = []
    send = grid.send_and_receive

    def spy(messages: Any, *, timeout: float | None = None) -> list[Message]:
        out = send(messages, timeout=timeout)
        replies.extend(out)
        return out

    grid.send_and_receive = spy  # type: ignore[method-assign]
    info = DATASETS.get(cfg.data.dataset)
    model = make_model(cfg.model.name, info.input_shape, info.num_classes, seed=0)
    wire = ConfigRecord({WIRE_CONFIG_KEY: __import__("json").dumps(cfg.to_dict())})
    strategy = build_strategy(cfg)
    g = grid.as_grid()
    new, _ = make_secagg_workflow(cfg).run_round(
        pipeline(g), g, strategy, 1, ArrayRecord(model.state_dict()), wire
    )
    assert new is not None
    masked = [r for r in replies if not r.has_error() and MASKED_KEY in r.content.array_records]
    assert len(masked) == 6
    assert not any("arrays" in r.content.array_records for r in replies if not r.has_error())
    metrics = [r.content.metric_records.get("metrics") for r in replies if not r.has_error()]
    assert not any(m is not None and any(k.startswith("fedsec.") for k in m) for m in metrics)
