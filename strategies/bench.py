"""Running a benchmark grid on Flower's simulation engine, resumably and in parallel.

Starting Flower's simulation engine (Ray) takes seconds, and each client
call through it costs tens of milliseconds, so a grid never pays the start-up
per cell: each worker process starts one engine with ``num_clients``
SuperNodes and its ServerApp runs cell after cell on that grid of nodes (the
ClientApp reads each cell's config from the messages, so one set of nodes
serves every cell). ``jobs`` workers run side by side, each on its share of
the machine's cores, and take the next unfinished cell from a shared queue.

Every cell records its rounds into its run directory in the results store as
they complete (:mod:`fedsec.bench.store`); a rerun skips finished cells and
resumes unfinished ones from their last complete round. Workers report
progress as events on a queue: ``("start", worker, cell_id, rounds)``,
``("round", worker, cell_id, round)``, ``("done", worker, cell_id, seconds)``,
``("skip", worker, cell_id, 0)``, ``("error", worker, cell_id, message)``.

``engine = "inprocess"`` runs the same apps on :class:`InProcessGrid` (no Ray),
for quick sweeps and tests.

A cell counts as failed when it raised, did not finish, or finished with
every training round failed (no usable reply, e.g. each client's training
raised): such a cell measured nothing, and a rerun reports it again (delete
its folder under ``cells/`` to run it anew).

The user's own model, data set, partitioner and training function run here
as anywhere: by dotted ``"package.module:factory"`` names in the grid's
configs, imported in each worker process (spawned with the parent's
``sys.path``) and in each Ray actor (Flower's engine passes the worker's
``sys.path`` on as ``PYTHONPATH``). Names registered with
:mod:`fedsec.registry` exist only in processes that import the registering
module, so a grid run here should use the dotted form.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsec.bench.grid import Cell, load_grid
from fedsec.bench.store import GRID_FILE, ResultsStore

__all__ = ["ENGINES", "BenchEvent", "run_grid"]

ENGINES = ("ray", "inprocess")

#: ``(kind, worker, cell_id, value)``; see the module docstring.
BenchEvent = tuple[str, int, str, Any]

logger = logging.getLogger("fedsec")

#: Seconds a worker has to exit after reporting it is done (shutting down Ray
#: can take long on a busy machine); then it is stopped. Not a failure either way:
#: a grid's failures are its cells that did not finish.
EXIT_GRACE_S = 10.0


@dataclass(frozen=True)
class _Job:
    store: str
    engine: str
    num_clients: int
    cpus: int


def run_grid(
    store: ResultsStore,
    *,
    jobs: int = 1,
    engine: str = "ray",
    on_event: Callable[[BenchEvent], None] | None = None,
) -> dict[str, str]:
    """Run every unfinished cell of ``store``'s grid; return the cells that failed.

    Parameters
    ----------
    store : ResultsStore
        The grid's results folder (made by :meth:`ResultsStore.create_or_open`).
    jobs : int
        Worker processes, each with its own engine; at most the number of cores.
    engine : {"ray", "inprocess"}
        Flower's simulation engine, or the in-process grid.
    on_event : callable, optional
        Receives every progress event, in the calling process.

    Returns
    -------
    dict of str to str
        Failed cell ids and their error (empty when all finished).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    cores = os.cpu_count() or 1
    if not 1 <= jobs <= cores:
        raise ValueError(f"jobs must be in [1, {cores}] (the machine's cores), got {jobs}")
    on_event = on_event or (lambda _: None)
    cells = load_grid(store.path / GRID_FILE).cells
    failed: dict[str, str] = {}
    for num_clients, group in _groups(cells):
        pending = [c.id for c in group if not store.is_finished(c.id)]
        for cell in group:
            if cell.id not in pending:
                failure = store.failure(cell.id)
                if failure is None:
                    on_event(("skip", 0, cell.id, 0))
                else:  # finished earlier without a single usable round: still failed
                    failed[cell.id] = failure
                    on_event(("error", 0, cell.id, failure))
        if not pending:
            continue
        workers = min(jobs, len(pending))
        job = _Job(str(store.path), engine, num_clients, max(1, cores // workers))
        failed |= _run_workers(job, pending, workers, on_event)
    return failed


def _groups(cells: tuple[Cell, ...]) -> Iterator[tuple[int, list[Cell]]]:
    """Cells by number of clients (one engine serves one node count), in grid order."""
    sizes: dict[int, list[Cell]] = {}
    for cell in cells:
        sizes.setdefault(cell.config.data.num_clients, []).append(cell)
    yield from sizes.items()


def _run_workers(
    job: _Job,
    pending: list[str],
    workers: int,
    on_event: Callable[[BenchEvent], None],
    target: Callable[..., None] | None = None,
) -> dict[str, str]:
    """Run ``pending`` cells on ``workers`` processes; return the cells that did not finish.

    ``target`` replaces :func:`_worker` (tests). A worker that reported its
    exit but is slow to end is stopped and is no failure; one that died first
    leaves its cells unfinished, and those are reported with its exit code.
    """
    context = multiprocessing.get_context("spawn")  # fresh interpreters: Ray and torch dislike fork
    todo: Any = context.Queue()
    events: Any = context.Queue()
    for cell_id in pending:
        todo.put(cell_id)
    for _ in range(workers):
        todo.put(None)  # one stop sign per worker
    processes = [
        context.Process(target=target or _worker, args=(job, index, todo, events), daemon=True)
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    failed: dict[str, str] = {}
    done: set[str] = set()
    exited: set[int] = set()
    finished_workers = 0
    try:
        while finished_workers < workers:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
                continue
            if event[0] == "exit":
                finished_workers += 1
                exited.add(int(event[1]))
                continue
            if event[0] == "error":
                failed[event[2]] = str(event[3])
            elif event[0] == "done":
                done.add(event[2])
            on_event(event)
    finally:
        for process in processes:
            process.join(timeout=EXIT_GRACE_S)
            if process.is_alive():
                process.terminate()
                process.join(timeout=EXIT_GRACE_S)
                if process.is_alive():
                    process.kill()
                    process.join()
    # Judged by the cells, not by how the workers ended.
    crashed = [
        f"worker {index} ended with exit {process.exitcode} before reporting"
        for index, process in enumerate(processes)
        if index not in exited
    ]
    for cell_id in pending:
        if cell_id not in done and cell_id not in failed:
            failed[cell_id] = "not finished" + (f" ({'; '.join(crashed)})" if crashed else "")
    return failed


def _worker(job: _Job, index: int, todo: Any, events: Any) -> None:
    """One worker: an engine of ``num_clients`` nodes running cells from ``todo``."""
    from fedsec.attacks.threat import enable_simulated_adversary
    from fedsec.cli import quiet_logs

    quiet_logs(False)
    enable_simulated_adversary()  # the local engine's workers inherit it
    try:
        store = ResultsStore.open(job.store)
        cells = {cell.id: cell for cell in load_grid(Path(job.store) / GRID_FILE).cells}
    except Exception as err:  # e.g. a name registered in the parent only: say so per cell
        reason = f"worker cannot read the grid ({type(err).__name__}: {err})"
        while (cell_id := todo.get()) is not None:
            events.put(("error", index, cell_id, reason))
        events.put(("exit", index, "", 0))
        return

    def next_cells() -> Iterator[Cell]:
        while (cell_id := todo.get()) is not None:
            yield cells[cell_id]

    def run_cells(grid: Grid) -> None:
        from .server_app import run_experiment

        for cell in next_cells():
            started = time.perf_counter()
            events.put(("start", index, cell.id, cell.config.experiment.rounds))

            def on_round(metrics: dict[str, Any], cell_id: str = cell.id) -> None:
                events.put(("round", index, cell_id, metrics["round"]))

            try:
                run = store.run_directory(cell)
                try:
                    if not run.finished:
                        run_experiment(grid, cell.config, run, on_round=on_round, plot=False)
                finally:
                    run.close()  # unlock the cell's folder
            except Exception as err:  # the cell stays unfinished; the grid goes on
                logger.debug("cell %s failed:\n%s", cell.id, traceback.format_exc())
                events.put(("error", index, cell.id, f"{type(err).__name__}: {err}"))
                continue
            failure = store.failure(cell.id)
            if failure is not None:  # ran to the end without one usable round
                events.put(("error", index, cell.id, failure))
                continue
            events.put(("done", index, cell.id, time.perf_counter() - started))

    try:
        if job.engine == "inprocess":
            import torch

            from fedsec.client.app import app as client_app

            torch.set_num_threads(job.cpus)  # as Ray gives each client actor its CPUs
            from .inprocess import InProcessGrid

            run_cells(InProcessGrid(client_app, job.num_clients).as_grid())
        else:
            _simulate(job, run_cells)
    finally:
        events.put(("exit", index, "", 0))


def _simulate(job: _Job, run_cells: Callable[[Grid], None]) -> None:
    """Start Flower's simulation engine once and run cells on it."""
    from flwr.simulation import run_simulation

    from fedsec.client.app import app as client_app

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_cells(grid)

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=job.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": job.cpus,
                "logging_level": logging.ERROR,
                "log_to_driver": False,
            },
        },
    )
