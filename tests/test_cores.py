"""Threads sized to the free cores (issue 20, item 2): the estimate, the budget, the override."""

from __future__ import annotations

import os
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedsec import cores
from fedsec.aggregation.base import AggregationResult, Rule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """No override or budget from the environment, no cached estimate."""
    monkeypatch.delenv(cores.ENV_THREADS, raising=False)
    monkeypatch.delenv(cores.ENV_BUDGET, raising=False)
    monkeypatch.setattr(cores, "_cached", None)


def _machine(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    affinity: int,
    online: int,
    runnable: int | None,
    own: int = 1,
    load1: float = 0.0,
) -> None:
    """A fake machine: affinity mask, online cores, runnable count, own running threads."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(os, "cpu_count", lambda: online)
    monkeypatch.setattr(os, "getloadavg", lambda: (load1, load1, load1))
    monkeypatch.setattr(cores, "_runnable_now", lambda: runnable)
    monkeypatch.setattr(cores, "own_running_threads", lambda: own)
    monkeypatch.setattr(cores, "_CPU_MAX", tmp_path / "no-cgroup")


@pytest.mark.parametrize(
    ("usable", "online", "busy", "free"),
    [
        (2, 2, 0.0, 2),  # quiet
        (2, 2, 1.0, 1),
        (2, 2, 2.0, 1),  # all taken: still one thread, the single-threaded path
        (2, 2, 7.0, 1),
        (2, 16, 10.0, 2),  # pinned to 2 of 16 cores, others busy elsewhere
        (8, 8, 2.6, 5),
        (8, 8, 2.4, 6),
    ],
)
def test_estimate_free(usable: int, online: int, busy: float, free: int) -> None:
    assert cores.estimate_free(usable, online, busy) == free


def test_free_cores_from_runnable_tasks_less_our_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # 4 runnable on the machine, 2 of them ours: 2 busy elsewhere of 4 cores
    _machine(monkeypatch, tmp_path, affinity=4, online=4, runnable=4, own=2, load1=9.0)
    assert cores.busy_elsewhere() == 2
    assert cores.free_cores() == 2
    # only our caller is running: all 4 free, whatever the lagging 1-minute load says
    _machine(monkeypatch, tmp_path, affinity=4, online=4, runnable=1, own=1, load1=9.0)
    assert cores.free_cores(refresh=True) == 4


def test_free_cores_falls_back_on_the_load_average(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # no /proc: 1-minute load 3.4, one thread of it ours -> 2.4 busy of 4 -> 2 free
    _machine(monkeypatch, tmp_path, affinity=4, online=4, runnable=None, own=1, load1=3.4)
    assert cores.busy_elsewhere() == pytest.approx(2.4)
    assert cores.free_cores() == 2
    _machine(monkeypatch, tmp_path, affinity=2, online=2, runnable=None, own=1, load1=0.3)
    assert cores.free_cores(refresh=True) == 2


def test_runnable_count_is_the_median_of_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = iter([9, 1, 2])  # one blip of 9 does not count
    monkeypatch.setattr(cores, "_runnable_now", lambda: next(snapshots))
    monkeypatch.setattr(cores, "own_running_threads", lambda: 1)
    assert cores.busy_elsewhere() == 1


def test_the_estimate_is_cached_then_refreshed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _machine(monkeypatch, tmp_path, affinity=2, online=2, runnable=1)
    monkeypatch.setattr(cores, "CACHE_SECONDS", 1e9)
    assert cores.free_cores() == 2
    _machine(monkeypatch, tmp_path, affinity=2, online=2, runnable=3)
    assert cores.free_cores() == 2  # cached
    monkeypatch.setattr(cores, "CACHE_SECONDS", 0.0)
    assert cores.free_cores() == 1  # stale: measured again


def test_proc_files_are_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 5/300 1234\n")
    monkeypatch.setattr(cores, "_LOADAVG", loadavg)
    assert cores._runnable_now() == 5
    monkeypatch.setattr(cores, "_LOADAVG", tmp_path / "missing")
    assert cores._runnable_now() is None

    tasks = tmp_path / "task"
    for tid, stat in [("1", "1 (odd) R name) S 0 1"), ("2", "2 (w) R 0 1"), ("3", "3 (x) S 0")]:
        (tasks / tid).mkdir(parents=True)
        (tasks / tid / "stat").write_text(stat)
    monkeypatch.setattr(cores, "_TASKS", tasks)
    assert cores.own_running_threads() == 1  # the state follows the last ")"
    (tasks / "3" / "stat").write_text("3 (x) R 0")
    assert cores.own_running_threads() == 2


def test_cgroup_quota_caps_the_usable_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _machine(monkeypatch, tmp_path, affinity=8, online=8, runnable=1)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cores, "_CPU_MAX", cpu_max)
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of quota -> 2 threads
    assert cores.usable_cores() == 2
    cpu_max.write_text("max 100000\n")
    assert cores.usable_cores() == 8


def test_threads_override_budget_cap_and_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _machine(monkeypatch, tmp_path, affinity=8, online=8, runnable=3)  # 2 busy -> 6 free
    assert cores.threads() == 6
    assert cores.threads(work=4) == 4
    assert cores.threads(cap=3) == 3
    monkeypatch.setenv(cores.ENV_BUDGET, "2")
    assert cores.threads() == 2
    monkeypatch.setenv(cores.ENV_THREADS, "7")  # the user's override wins over all but work
    assert cores.threads(cap=3) == 7
    assert cores.threads(work=5) == 5
    _machine(monkeypatch, tmp_path, affinity=2, online=2, runnable=9)
    assert cores.threads() == 7  # the override holds on a busy machine too


@pytest.mark.parametrize("name", [cores.ENV_THREADS, cores.ENV_BUDGET])
@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name} must be a positive integer, got '{value}'$"):
        cores.threads()


def test_budget_for_jobs_and_set_thread_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cores.budget_for_jobs(1, cores=2) == 2
    assert cores.budget_for_jobs(2, cores=2) == 1
    assert cores.budget_for_jobs(3, cores=8) == 2
    assert cores.budget_for_jobs(4, cores=2) == 1  # never 0
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="jobs must be a positive integer"):
            cores.budget_for_jobs(bad)  # type: ignore[arg-type]
    cores.set_thread_budget(3)
    assert os.environ[cores.ENV_BUDGET] == "3"
    cores.set_thread_budget(5)  # a lower budget already set is kept
    assert os.environ[cores.ENV_BUDGET] == "3"
    cores.set_thread_budget(1)
    assert os.environ[cores.ENV_BUDGET] == "1"
    with pytest.raises(ValueError, match="thread budget must be a positive integer"):
        cores.set_thread_budget(0)
    assert os.environ[cores.ENV_BUDGET] == "1"


def test_fedsec_bench_jobs_sets_each_workers_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``fedsec bench --jobs N`` caps the workers it starts at cores // N threads."""
    from fedsec import cli

    seen: list[str | None] = []

    def run_grid(store: object, jobs: int, engine: str, on_event: object) -> dict[str, str]:
        seen.append(os.environ.get(cores.ENV_BUDGET))  # what a spawned worker inherits
        return {}

    fake = types.ModuleType("fake_bench_for_cores")
    fake.ENGINES = ("inprocess",)  # type: ignore[attr-defined]
    fake.run_grid = run_grid  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, fake.__name__, fake)
    monkeypatch.setattr(cli, "BENCH_MODULE", fake.__name__)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv(cores.ENV_BUDGET, "64")  # so that monkeypatch restores it afterwards
    grid = ROOT / "simulations" / "grids" / "quick.toml"
    runner = CliRunner()
    result = runner.invoke(
        cli.cli,
        ["bench", str(grid), "--jobs", "2", "--engine", "inprocess", "--results", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert seen == ["1"]

    # bad input changes nothing
    monkeypatch.setenv(cores.ENV_BUDGET, "64")
    result = runner.invoke(cli.cli, ["bench", str(grid), "--jobs", "3", "--engine", "inprocess"])
    assert result.exit_code == 2
    assert os.environ[cores.ENV_BUDGET] == "64"


def test_torch_threads_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    with cores.torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cores.torch_threads(other):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before


class _Probe(Rule):
    """Records torch's thread count while it aggregates."""

    name = "probe"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: object
    ) -> AggregationResult:
        self.seen.append(torch.get_num_threads())
        return AggregationResult(aggregate=updates.mean(dim=0), weights=weights)


def test_rules_run_with_torch_threads_sized_to_the_free_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    probe = _Probe()
    x = torch.randn(5, 10)
    monkeypatch.setattr(cores, "free_cores", lambda refresh=False: 1)
    probe(x)
    monkeypatch.setenv(cores.ENV_THREADS, "3")
    probe(x)
    assert probe.seen == [1, 3]
    assert torch.get_num_threads() == before


def test_torch_threads_are_per_calling_thread() -> None:
    """Sizing one thread's torch pool leaves the others' setting alone."""
    before = torch.get_num_threads()
    seen: list[int] = []

    def inside() -> None:
        with cores.torch_threads(1 if before > 1 else 2):
            seen.append(torch.get_num_threads())
            seen.append(-1)  # marks the point where main reads its own setting
            main_reads.wait(10)

    main_reads = threading.Event()
    worker = threading.Thread(target=inside)
    worker.start()
    while len(seen) < 2:
        threading.Event().wait(0.01)
    assert torch.get_num_threads() == before
    main_reads.set()
    worker.join()
    assert seen[0] != before


def test_skellam_pool_follows_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsec.privacy import distributed

    monkeypatch.setattr(distributed, "_POOL", None)
    draws = []
    for count in ("1", "3", "2"):
        monkeypatch.setenv(cores.ENV_THREADS, count)
        assert distributed._pool()._max_workers == int(count)
        generator = np.random.Generator(np.random.PCG64(7))
        draws.append(
            distributed.sample_skellam(
                50.0, 5 * distributed._SAMPLE_CHUNK, headroom=10_000, generator=generator
            )
        )
    pool = distributed._pool()
    assert distributed._pool() is pool  # unchanged count: the same pool
    for other in draws[1:]:
        np.testing.assert_array_equal(draws[0], other)
