"""The ``fedsec`` command.

``fedsec run [CONFIG]`` runs one experiment on Flower's simulation engine (Ray)
with a live per-round display and writes ``results/<run-name>/``;
``fedsec run --resume RUN_DIR`` continues an interrupted run;
``fedsec validate CONFIG`` checks a config without running it;
``fedsec bench GRID`` runs a grid of attacks x defenses into a resumable
results folder and ``fedsec report RESULTS`` writes its Markdown and HTML
report; ``fedsec certs OUT`` makes the TLS certificates and SuperNode keys of
a deployment.

Bad input (a config that does not parse or validate, a missing data set, a
checkpoint whose hash does not match, an unusable ``results_dir``, a run
folder another process is writing) prints one ``error:`` line and exits with
code 2, before anything starts.

Exit codes of ``fedsec run``: 0 done; 1 the run failed (its completed rounds
are kept); 2 bad input; 3 the run stopped because ``server.max_failed_rounds``
rounds in a row had no usable reply (the engine or every client died);
130 interrupted (Ctrl-C). After 1, 3 and 130, ``fedsec run --resume RUN_DIR``
continues from the last complete round.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedsec.checkpoint import CheckpointError
from fedsec.config import ConfigError, ExperimentConfig, default_config, load_config
from fedsec.runs import (
    EngineStoppedError,
    RoundMetrics,
    RunDirectory,
    RunDirectoryError,
    check_results_dir,
)

# The ServerApp lives in fedsec.strategies (a layer above this package's core);
# the CLI is the top-level entry point, so it loads it by name, as Flower does.
SERVER_APP_MODULE = "fedsec.strategies.server_app"
AUDIT_MODULE = "fedsec.strategies.audit"
BENCH_MODULE = "fedsec.strategies.bench"
CLIENT_APP_MODULE = "fedsec.client.app"

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENGINE_STOPPED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
ENGINES = ("ray", "inprocess")

cli = typer.Typer(
    name="fedsec",
    help="Federated learning that stays correct under hostile clients and a curious server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Soft wrap: a long line or a Markdown table is never hard-wrapped at the width
# rich assumes (80 columns when the output is a file or a pipe).
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    # One line, no traceback: the message names the problem.
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(config: Path | None) -> ExperimentConfig:
    try:
        return load_config(config) if config is not None else default_config()
    except ConfigError as err:
        raise _fail(str(err)) from None


def _round_table(rows: list[RoundMetrics], total_rounds: int, limit: int = 0) -> Table:
    table = Table(title=None, show_edge=False, header_style="bold")
    table.add_column("round", justify="right")
    table.add_column("test acc", justify="right")
    table.add_column("test loss", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("clients", justify="right")
    # Columns that only some experiments report (backdoor ASR, robust accuracy).
    optional = [
        (key, title)
        for key, title in (
            ("attack_success_rate", "ASR"),
            ("robust_accuracy", "robust acc"),
            ("dp_epsilon_max", "client eps"),
            ("dp_epsilon", "eps"),
        )
        if any(key in row for row in rows)
    ]
    for _, title in optional:
        table.add_column(title, justify="right")
    table.add_column("elapsed", justify="right")
    shown = rows[-limit:] if limit else rows
    for row in shown:
        accepted = row.get("num-accepted")
        sampled = row.get("num-sampled")
        clients = f"{accepted}/{sampled}" if accepted is not None else "-"
        train_loss = row.get("train_loss")
        status = "" if row.get("status") in ("ok", "initial") else f" [red]{row['status']}[/]"
        table.add_row(
            f"{row['round']}/{total_rounds}{status}",
            f"{100 * row['test_accuracy']:.2f}%",
            f"{row['test_loss']:.4f}",
            f"{train_loss:.4f}" if isinstance(train_loss, float) else "-",
            clients,
            *(_cell(row, key) for key, _ in optional),
            f"{row.get('elapsed_s', 0.0):.1f}s",
        )
    return table


def _cell(row: RoundMetrics, key: str) -> str:
    if key not in row:
        return "-"
    value = float(row[key])
    return f"{value:.2f}" if key.startswith("dp_") else f"{100 * value:.2f}%"


def quiet_logs(verbose: bool) -> None:
    """Keep Flower's, Ray's and gRPC's chatter out of the terminal unless ``verbose``."""
    # Import first: importing flwr resets its logger's level.
    import flwr.common.logger  # noqa: F401

    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    fedsec_logger = logging.getLogger("fedsec")
    fedsec_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not fedsec_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s fedsec: %(message)s"))
        fedsec_logger.addHandler(handler)
    # Ray configures the root logger; without this each warning would print twice.
    fedsec_logger.propagate = False
    # Ray and gRPC chatter would tear the live display apart.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)


def _data_problem(cfg: ExperimentConfig) -> str | None:
    """Why ``cfg``'s data set or split cannot be had, in one line; None if it can."""
    from fedsec.data import DatasetNotFoundError, load_dataset

    try:
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)
    except DatasetNotFoundError as err:
        return str(err)
    except ValueError as err:
        return f"data.dataset: {err}"
    # The split: a partitioner that cannot make it (Dirichlet 0.1 over 100 clients of
    # digits) would otherwise fail every client in every round. The split is computed
    # once for all partitions, so asking for the first one checks them all.
    from fedsec.client.app import client_partition

    try:
        client_partition(cfg, data, 0)
    except ValueError as err:
        return f"data.partition: {err}"
    return None


def _preflight(cfg: ExperimentConfig, run: RunDirectory | None) -> None:
    """Fail fast, with one line, on problems that would otherwise surface mid-run."""
    problem = _data_problem(cfg)
    if problem is not None:
        raise _fail(problem)
    if run is not None and run.last_round is not None:
        from fedsec.checkpoint import check_model_state

        try:  # the tensors must fit the model now, not after the engine has started
            last, model_state, _ = run.load_last_checkpoint()
            check_model_state(cfg, model_state, f"checkpoint of round {last}")
        except CheckpointError as err:
            raise _fail(str(err)) from None


def simulate(
    cfg: ExperimentConfig,
    run: RunDirectory,
    on_round: Any = None,
    verbose: bool = False,
) -> list[RoundMetrics]:
    """Run ``cfg`` on Flower's simulation engine (Ray), recording into ``run``."""
    from flwr.simulation import run_simulation

    server_module = importlib.import_module(SERVER_APP_MODULE)
    client_module = importlib.import_module(CLIENT_APP_MODULE)
    from fedsec.attacks.threat import enable_simulated_adversary

    # A local engine's workers inherit this; on a cluster started with `ray start`,
    # the workers have the environment of their `ray start` (Flower sets the
    # runtime_env itself), so colluding attacks need it exported there.
    enable_simulated_adversary()
    init_args: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    run_simulation(
        server_app=server_module.make_server_app(cfg, run, on_round),
        client_app=client_module.app,
        num_supernodes=cfg.data.num_clients,
        backend_config={
            "client_resources": {
                "num_cpus": cfg.simulation.cpus_per_client,
                "num_gpus": cfg.simulation.gpus_per_client,
            },
            "init_args": init_args,
        },
        verbose_logging=verbose,
    )
    if not run.finished:
        raise RuntimeError("the simulation ended before all rounds completed")
    return run.rounds


def inprocess_grid(cfg: ExperimentConfig) -> Any:
    """The in-process engine's grid of ``data.num_clients`` nodes (no Ray)."""
    inprocess = importlib.import_module("fedsec.strategies.inprocess")
    client_module = importlib.import_module(CLIENT_APP_MODULE)
    return inprocess.InProcessGrid(client_module.app, cfg.data.num_clients).as_grid()


def simulate_inprocess(
    cfg: ExperimentConfig, run: RunDirectory, on_round: Any = None
) -> list[RoundMetrics]:
    """Run ``cfg`` on the in-process engine, recording into ``run``.

    The rounds run in their own thread, as Flower's ServerApp thread does, so
    the main thread stays free to handle Ctrl-C.
    """
    server_module = importlib.import_module(SERVER_APP_MODULE)
    grid = inprocess_grid(cfg)
    raised: list[BaseException] = []

    def rounds() -> None:
        try:
            server_module.run_experiment(grid, cfg, run, on_round)
        except BaseException as err:  # handed to the main thread
            raised.append(err)

    # Not a daemon, like Flower's ServerApp thread: only the SIGINT handler ends it early.
    thread = threading.Thread(target=rounds, name="fedsec-rounds", daemon=False)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: a signal handler runs between them
    if raised:
        raise raised[0]
    if not run.finished:
        raise RuntimeError("the run ended before all rounds completed")
    return run.rounds


def _on_interrupt(run_dir: RunDirectory) -> Callable[[int, Any], None]:
    """The SIGINT handler of ``fedsec run``: stop now, leave the folder consistent.

    The rounds run in another thread (Flower's ServerApp thread, or the
    in-process engine's), which may be waiting for replies that will never
    come. Closing the run waits for a round being recorded and refuses any
    later one; then the process ends at once with 130 (the OS releases the
    run folder's lock; Ray's processes share the driver's fate).
    """

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not re-enter
        run_dir.close()
        try:
            console.show_cursor(True)  # the live display hides it
            sys.stdout.flush()
        except Exception:  # a reentrant flush: the line below still goes out
            pass
        last = run_dir.last_round
        done = "no round recorded" if last is None else f"round {last} is the last one recorded"
        message = f"\ninterrupted: {done}; continue with `fedsec run --resume {run_dir.path}`\n"
        os.write(sys.stderr.fileno(), message.encode())
        _stop_ray(timeout=5.0)
        os._exit(EXIT_INTERRUPTED)

    return handler


def _stop_ray(timeout: float) -> None:
    """Shut down the local Ray instance this process started, waiting at most ``timeout``.

    Its raylet and GCS die with the driver anyway (fate sharing), but the
    agents they started would linger for up to a minute; a graceful shutdown
    stops them too. Bounded, from a helper thread: the main thread may be
    inside Ray itself.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    helper = threading.Thread(target=ray.shutdown, name="fedsec-ray-shutdown", daemon=True)
    helper.start()
    helper.join(timeout)


@contextmanager
def _interruptible(run_dir: RunDirectory) -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, _on_interrupt(run_dir))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _leave(run_dir: RunDirectory, message: str, code: int) -> NoReturn:
    """End a failed run with one line, even if its round thread is still waiting.

    The engine can fail under a ServerApp thread that still waits for replies
    (up to ``server.round_timeout``); the run is closed so that thread records
    nothing more, and the process does not wait for it.
    """
    run_dir.close()
    error = _fail(message, code)
    waiting = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    if waiting:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise error


def _round_line(row: RoundMetrics, total_rounds: int) -> str:
    """One plain progress line per round, for output that is not a terminal."""
    accepted, sampled = row.get("num-accepted"), row.get("num-sampled")
    parts = [
        f"test acc {100 * row['test_accuracy']:.2f}%",
        f"test loss {row['test_loss']:.4f}",
    ]
    if accepted is not None:
        parts.append(f"clients {accepted}/{sampled}")
    if row.get("status") not in ("ok", "initial"):
        parts.append(str(row.get("status")))
    parts.append(f"{row.get('elapsed_s', 0.0):.1f} s")
    return f"round {row['round']}/{total_rounds}: " + ", ".join(parts)


@contextmanager
def _round_progress(rows: list[RoundMetrics], total_rounds: int) -> Iterator[Any]:
    """A live table on a terminal; one plain line per round otherwise (logs, CI)."""
    if not console.is_terminal:

        def print_line(metrics: RoundMetrics) -> None:
            rows.append(metrics)
            console.print(_round_line(metrics, total_rounds), highlight=False, markup=False)

        yield print_line
        return
    with Live(
        _round_table(rows, total_rounds, limit=12),
        console=console,
        refresh_per_second=4,
        transient=True,
    ) as live:

        def on_round(metrics: RoundMetrics) -> None:
            rows.append(metrics)
            live.update(_round_table(rows, total_rounds, limit=12))

        try:
            yield on_round
        finally:
            live.stop()


def _print_table(table: Table) -> None:
    if console.is_terminal:
        console.print(table)
        return
    # Not a terminal: rich would squeeze the table into 80 columns (print's width
    # can only narrow it); a console as wide as the rows need prints one line per row.
    Console(file=console.file, width=10_000, soft_wrap=True).print(table)


@cli.command()
def run(
    config: Annotated[
        Path | None,
        typer.Argument(help="Experiment TOML; omit to run the embedded digits quickstart."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in RUN_DIR from its last complete round."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name (experiment.name).")] = None,
    rounds: Annotated[
        int | None,
        typer.Option(help="Number of rounds (experiment.rounds); extends a resumed run."),
    ] = None,
    results_dir: Annotated[
        Path | None, typer.Option("--results-dir", help="Parent of the run directory.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="'ray' (Flower's simulation engine) or 'inprocess' (no Ray: one process, "
            "clients one after another; for small runs and tests)."
        ),
    ] = "ray",
) -> None:
    """Run one experiment and write results/<run-name>/."""
    if engine not in ENGINES:
        raise _fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    run_dir: RunDirectory | None = None
    if resume is not None:
        if config is not None or name is not None or results_dir is not None:
            raise _fail(
                "--resume takes the config and name from RUN_DIR; drop CONFIG/--name/--results-dir"
            )
        try:
            run_dir = RunDirectory.open(resume)
        except RunDirectoryError as err:
            raise _fail(str(err)) from None
        cfg = run_dir.config
    else:
        cfg = _load(config)
    try:
        if name is not None:
            cfg = cfg.replace("experiment", name=name)
        if rounds is not None:
            cfg = cfg.replace("experiment", rounds=rounds)
    except ConfigError as err:
        raise _fail(str(err)) from None

    if run_dir is not None:
        done = run_dir.last_round or 0
        if done >= cfg.experiment.rounds:
            console.print(
                f"Run {run_dir.path} already completed {done} rounds; pass --rounds N to extend it."
            )
            return
        run_dir.config = cfg
        run_dir.finished = False
    quiet_logs(verbose)
    _preflight(cfg, run_dir)
    if run_dir is None:
        try:
            run_dir = RunDirectory.create(cfg, results_dir)
        except RunDirectoryError as err:
            raise _fail(str(err)) from None

    console.print(
        f"[bold]fedsec[/] {run_dir.name}: {cfg.data.num_clients} clients "
        f"({cfg.data.partition}) on {cfg.data.dataset}, model {cfg.model.name}, "
        f"rule {cfg.aggregation.rule}, {cfg.experiment.rounds} rounds",
        highlight=False,
    )
    rows: list[RoundMetrics] = list(run_dir.rounds)
    started = time.perf_counter()
    with _interruptible(run_dir):
        if engine == "ray":
            console.print(
                f"starting Flower's simulation engine (Ray) with {cfg.data.num_clients} "
                "clients; the first round follows once it is up (often 20-150 s)",
                highlight=False,
            )
        else:
            console.print("starting the in-process engine", highlight=False)
        try:
            with _round_progress(rows, cfg.experiment.rounds) as on_round:
                if engine == "ray":
                    simulate(cfg, run_dir, on_round, verbose=verbose)
                else:
                    simulate_inprocess(cfg, run_dir, on_round)
        except EngineStoppedError as err:
            _leave(
                run_dir,
                f"run stopped: {err}; completed rounds are saved, continue with "
                f"`fedsec run --resume {run_dir.path}`",
                EXIT_ENGINE_STOPPED,
            )
        except Exception as err:  # the run directory keeps every completed round
            _leave(
                run_dir,
                f"run failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                f"completed rounds are saved, continue with `fedsec run --resume {run_dir.path}`",
                EXIT_FAILED,
            )

    _print_table(_round_table(run_dir.rounds, cfg.experiment.rounds))
    final = run_dir.rounds[-1]
    console.print(
        f"\nFinal test accuracy: [bold]{100 * final['test_accuracy']:.2f}%[/] after round "
        f"{final['round']} ({time.perf_counter() - started:.1f} s)\nResults: {run_dir.path}",
        highlight=False,
    )


@cli.command()
def validate(
    config: Annotated[Path, typer.Argument(help="Experiment TOML to check.")],
) -> None:
    """Check a config file without running it."""
    cfg = _load(config)
    _preflight(cfg, None)  # the data set must be there, as `run` requires
    try:
        check_results_dir(cfg.experiment.results_dir)
    except RunDirectoryError as err:
        raise _fail(str(err)) from None
    console.print(
        f"ok: {config} ({cfg.data.num_clients} clients, {cfg.data.dataset}, "
        f"{cfg.model.name}, {cfg.experiment.rounds} rounds)",
        highlight=False,
    )


@cli.command()
def audit(
    config: Annotated[
        Path | None,
        typer.Argument(help="Experiment TOML; omit to audit the embedded digits quickstart."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default results/<name>-audit).")
    ] = None,
    images: Annotated[int, typer.Option(help="Client examples attacked by inversion.")] = 4,
    epsilons: Annotated[
        str, typer.Option(help="Comma-separated DP-SGD epsilons to compare.")
    ] = "1,8",
    secure_clients: Annotated[int, typer.Option(help="Clients in one secure sum (k).")] = 5,
    bucket_size: Annotated[int, typer.Option(help="Clients per bucket (s).")] = 2,
    steps: Annotated[int, typer.Option(help="Optimisation steps per reconstruction.")] = 200,
    membership: Annotated[
        bool, typer.Option(help="Train global models and run membership inference.")
    ] = True,
) -> None:
    """Audit what a curious server could learn: gradient inversion and membership inference."""
    audit_module = importlib.import_module(AUDIT_MODULE)  # Flower glue lives in strategies
    cfg = _load(config)
    try:
        eps = tuple(float(e) for e in epsilons.split(",") if e.strip())
        settings = audit_module.AuditSettings(
            images=images,
            epsilons=eps,
            secure_clients=secure_clients,
            bucket_size=bucket_size,
            inversion_steps=steps,
            membership=membership,
        )
    except ValueError as err:
        raise _fail(f"--epsilons/--images/...: {err}") from None
    folder = out or Path("results") / f"{cfg.experiment.name}-audit"
    try:
        with console.status("auditing..."):
            audit_module.run_audit(cfg, folder, settings)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print((folder / "report.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {folder}/report.md, audit.json, inversion.png", highlight=False)


@cli.command()
def bench(
    grid_file: Annotated[Path, typer.Argument(metavar="GRID", help="Grid TOML.")],
    results: Annotated[
        Path | None,
        typer.Option(help="Results folder (default results/bench/<grid name>); reruns resume."),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Cells run in parallel (worker engines).")] = 1,
    engine: Annotated[
        str, typer.Option(help="'ray' (Flower's simulation engine) or 'inprocess'.")
    ] = "ray",
) -> None:
    """Run a grid of attacks x defenses; rerunning skips finished cells."""
    from fedsec.bench.grid import GridError, load_grid
    from fedsec.bench.store import ResultsStore, StoreError
    from fedsec.cores import budget_for_jobs, set_thread_budget

    bench_module = importlib.import_module(BENCH_MODULE)  # Flower glue lives in strategies
    # Every option is checked before the results folder is made: bad input writes nothing.
    if engine not in bench_module.ENGINES:
        raise _fail(f"--engine must be one of {', '.join(bench_module.ENGINES)}, got {engine!r}")
    cores = os.cpu_count() or 1
    if not 1 <= jobs <= cores:
        raise _fail(f"--jobs must be in [1, {cores}] (this machine's cores), got {jobs}")
    try:
        grid = load_grid(grid_file)
    except GridError as err:
        raise _fail(str(err)) from None
    # Each distinct data set and split once (a grid has a handful): a cell whose split
    # cannot be made would otherwise run every round with every client failing.
    checked: set[str] = set()
    for cell in grid.cells:
        data = cell.config.data
        key = repr((data, cell.config.experiment.seed))
        if key not in checked:
            checked.add(key)
            problem = _data_problem(cell.config)
            if problem is not None:
                raise _fail(f"cell {cell.id}: {problem}")
    try:
        folder = results or Path("results") / "bench" / grid.name
        store = ResultsStore.create_or_open(folder, grid)
    except StoreError as err:
        raise _fail(str(err)) from None
    # Each worker's share of the cores caps its threads (fedsec.cores); spawned workers
    # inherit it through the environment.
    set_thread_budget(budget_for_jobs(jobs, cores))
    quiet_logs(False)
    console.print(
        f"[bold]fedsec bench[/] {grid.name}: {len(grid.cells)} cells, {jobs} job(s), "
        f"engine {engine}; results in {folder}",
        highlight=False,
    )
    progress = BenchProgress(grid.cells, jobs)
    started = time.perf_counter()
    if console.is_terminal:
        with Live(progress.render(), console=console, refresh_per_second=2, transient=True) as live:

            def on_event(event: tuple[str, int, str, Any]) -> None:
                progress.update(event)
                live.update(progress.render())

            failed = bench_module.run_grid(store, jobs=jobs, engine=engine, on_event=on_event)
    else:  # logs, CI: one plain line per finished (or failed) cell

        def on_event(event: tuple[str, int, str, Any]) -> None:
            progress.update(event)
            kind, _, cell_id, value = event
            if kind in ("done", "error"):
                status = f"{float(value):.1f} s" if kind == "done" else f"failed: {value}"
                console.print(
                    f"cell {progress.done}/{progress.total} {cell_id}: {status}",
                    highlight=False,
                    markup=False,
                )

        failed = bench_module.run_grid(store, jobs=jobs, engine=engine, on_event=on_event)
    _print_table(progress.render(final=True))
    console.print(
        f"{progress.done} of {len(grid.cells)} cells finished ({progress.skipped} from an earlier "
        f"run) in {time.perf_counter() - started:.1f} s; `fedsec report {folder}` writes the "
        "report",
        highlight=False,
    )
    if failed:
        for cell_id, reason in failed.items():
            err_console.print(f"[bold red]failed:[/] {cell_id}: {reason}", highlight=False)
        raise typer.Exit(1)


class BenchProgress:
    """Live progress of a grid: cells done of total, the cells running, an ETA."""

    def __init__(self, cells: Any, jobs: int) -> None:
        self.total = len(cells)
        self.rounds = {cell.id: cell.config.experiment.rounds for cell in cells}
        self.jobs = jobs
        self.done = 0
        self.skipped = 0
        self.seconds: list[float] = []
        self.running: dict[int, tuple[str, int]] = {}  # worker -> (cell, round)
        self.started = time.perf_counter()

    def update(self, event: tuple[str, int, str, Any]) -> None:
        """Take one event of :func:`fedsec.strategies.bench.run_grid`."""
        kind, worker, cell_id, value = event
        if kind == "skip":
            self.done += 1
            self.skipped += 1
        elif kind == "start":
            self.running[worker] = (cell_id, 0)
        elif kind == "round":
            self.running[worker] = (cell_id, int(value))
        elif kind in ("done", "error"):
            self.running.pop(worker, None)
            if kind == "done":
                self.done += 1
                self.seconds.append(float(value))

    def eta(self) -> float | None:
        """Seconds left: mean cell time of this run x cells left / jobs."""
        if not self.seconds:
            return None
        return sum(self.seconds) / len(self.seconds) * (self.total - self.done) / self.jobs

    def render(self, final: bool = False) -> Table:
        """The progress table."""
        table = Table(show_header=False, box=None)
        eta = self.eta()
        left = "?" if eta is None else f"{eta / 60:.1f} min"
        elapsed = time.perf_counter() - self.started
        table.add_row(
            "cells",
            f"{self.done}/{self.total} done ({self.skipped} skipped), {elapsed:.0f} s"
            + ("" if final else f", ETA {left}"),
        )
        if not final:
            for worker, (cell_id, at) in sorted(self.running.items()):
                table.add_row(f"job {worker}", f"{cell_id}: round {at}/{self.rounds[cell_id]}")
        return table


@cli.command()
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for the keys (must not hold them yet).")],
    nodes: Annotated[
        int, typer.Option(help="SuperNodes: one authentication and one signing key pair each.")
    ] = 2,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="SuperLink host name or IP (repeat); localhost and 127.0.0.1 are always added."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
    split: Annotated[
        bool,
        typer.Option(
            "--split",
            help="One folder per recipient (ca/, superlink/, supernode-<i>/), each "
            "mountable alone; no private key in two places.",
        ),
    ] = False,
    owner: Annotated[
        str | None,
        typer.Option(
            metavar="UID:GID",
            help="Give every file and folder written to this user and group (needs root).",
        ),
    ] = None,
) -> None:
    """Make a CA, the SuperLink's TLS certificate, SuperNode and reply-signing keys."""
    from fedsec.deploy.certs import parse_owner, write_deployment_keys

    try:
        ids = None if owner is None else parse_owner(owner)
        keys = write_deployment_keys(
            out,
            nodes=nodes,
            hosts=host or ("localhost", "127.0.0.1"),
            days=days,
            split=split,
            owner=ids,
        )
    except (ValueError, OSError) as err:
        raise _fail(str(err)) from None
    console.print(f"wrote {len(keys.all())} files to {out}:", highlight=False)
    for path in keys.all():
        console.print(f"  {path.relative_to(out)}", highlight=False)
    if split:
        # Which folder goes where: the point of the split layout.
        console.print(
            f"mount {keys.superlink_dir.relative_to(out)}/ on the SuperLink, "
            "supernode-<i>/ on SuperNode i only; "
            f"keep {keys.ca_dir.relative_to(out)}/ (the CA key) off every machine",
            highlight=False,
        )


@cli.command()
def report(
    results: Annotated[Path, typer.Argument(metavar="RESULTS", help="A `fedsec bench` folder.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the report (default RESULTS).")
    ] = None,
) -> None:
    """Write report.md and a self-contained report.html for a grid's results."""
    from fedsec.bench.report import write_report
    from fedsec.bench.store import StoreError

    try:
        markdown, html = write_report(results, out)
    except (StoreError, ValueError) as err:
        raise _fail(str(err)) from None
    console.print(markdown.read_text(encoding="utf-8"), highlight=False, markup=False)
    console.print(f"wrote {markdown} and {html}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
