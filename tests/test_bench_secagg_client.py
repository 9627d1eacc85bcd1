"""The SecAgg client-cost benchmark (simulations/bench_secagg_client.py), at toy size."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from script_loader import load_simulation_script


def _bench() -> ModuleType:
    return load_simulation_script("bench_secagg_client")


def test_stage_timer_books_nested_calls_once_to_the_outer_side() -> None:
    bench = _bench()

    class Owner:
        @staticmethod
        def inner() -> int:
            return sum(range(1000))

        @staticmethod
        def outer() -> int:
            return Owner.inner() + Owner.inner()

    timer = bench.StageTimer()
    original = Owner.__dict__["inner"]
    with timer.wrap([(Owner, "inner", "server", "inner"), (Owner, "outer", "client", "other")]):
        assert Owner.outer() == 2 * sum(range(1000))
    assert Owner.__dict__["inner"] is original  # restored
    # inner ran inside a client call: booked to the client, never counted twice.
    assert timer.calls == {("client", "inner"): 2, ("client", "other"): 1}
    assert all(v >= 0.0 for v in timer.cpu.values())


def test_unfused_reference_is_the_masking_it_replaces() -> None:
    from fedsec.secagg.masking import apply_masks

    bench = _bench()
    x = np.arange(70_001, dtype=np.uint32)
    pairwise = [(1, bytes(range(32))), (5, bytes(32))]
    expected = apply_masks(x, bytes(range(3, 35)), pairwise, 2)
    assert np.array_equal(bench.unfused_apply_masks(x, bytes(range(3, 35)), pairwise, 2), expected)


def test_benchmark_prints_the_ratio_and_every_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    out = tmp_path / "figures.json"
    argv = ["bench", "--clients", "8", "--dim", "3000", "--repeats", "1", "--dropout", "0.25"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench.main()  # exits 1 if the implementations differ or the aggregate is wrong
    text = capsys.readouterr().out
    assert "bit-identical: yes" in text and "within its bound: yes" in text
    for stage in (
        "floor: AES-256-CTR keystream",
        "key agreement (X25519 + HKDF)",
        "Shamir split",
        "Shamir combine",
        "AES-GCM of shares",
        "encoding",
        bench.MASKING,
        "server sum",
        "unmask: mask removal",
        "decoding",
    ):
        assert stage in text, stage
    figures = json.loads(out.read_text(encoding="utf-8"))
    overhead = figures["overhead"]
    assert overhead["masks"] == figures["k"] + 1 and overhead["ratio_after"] > 0
    assert figures["breakdown"]["dropped"] == 2
