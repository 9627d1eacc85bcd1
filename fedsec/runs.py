"""A run's directory: config, manifest, per-round metrics, checkpoints and plot.

Layout of ``results/<run-name>/``::

    config.toml          the validated config the run uses
    manifest.json        machine state: completed rounds, checkpoints and hashes
    decisions.jsonl      per round: clients sampled, excluded (with reason), weights used
    metrics.json         per-round metrics and the final figures
    rounds.csv           the same rows, one per round
    accuracy.png         test accuracy over rounds (not for a grid's cells)
    checkpoints/round_NNNN.safetensors
    .lock                held (``flock``) by the one process writing the run

Each round's checkpoint is written before the manifest that names it, and both
are replaced atomically, so an interrupted run leaves a directory that
``fedsec run --resume`` continues from the last complete round.

A run directory has one writer at a time: :meth:`RunDirectory.create` and
:meth:`RunDirectory.open` take an exclusive ``flock`` on ``.lock`` that the
operating system releases when the process ends, however it ends, so a second
process (a leftover run, a second ``--resume``) is refused before it changes
anything. Within the writing process, :meth:`RunDirectory.close` waits for a
round being recorded and refuses every later write, so a server thread left
running after an interrupt cannot record another round.

Where runs are written: ``results_dir`` may be any absolute or relative
folder, but not one with a ``..`` component (a config's relative path stays
below the folder it names) and not a symlink itself; a run folder is always
created new (never an existing path or a symlink), and ``--resume`` refuses a
run folder that is a symlink.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedsec import __version__
from fedsec.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from fedsec.config import ConfigError, ExperimentConfig, parse_config, to_toml
from fedsec.params import prefixed, unprefixed

MANIFEST = "manifest.json"
DECISIONS = "decisions.jsonl"
LOCK = ".lock"
MANIFEST_FORMAT = 1
SERVER_STATE_PREFIX = "fedsec.server_state."

RoundMetrics = dict[str, Any]


class RunDirectoryError(ValueError):
    """A run directory that cannot be created, read or resumed."""


class RunInUseError(RunDirectoryError):
    """The run directory is being written by another process."""


class RunClosedError(RuntimeError):
    """A write to a run directory after :meth:`RunDirectory.close`."""


class EngineStoppedError(RuntimeError):
    """Rounds stopped producing any usable reply; the run stopped (it can be resumed)."""


def checkpoint_file(server_round: int) -> str:
    """A round's checkpoint path, relative to the run directory."""
    return f"checkpoints/round_{server_round:04d}.safetensors"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHECKPOINT_NAME = re.compile(r"^round_(\d{4,})\.safetensors$")


def check_results_dir(results_dir: str | Path) -> Path:
    """The results folder ``results_dir`` names, refused with one line when unusable.

    Any absolute or relative folder is allowed except one with a ``..``
    component (it would write outside the folder the path names) or one that
    is itself a symlink (write to its target by naming the target).

    Raises
    ------
    RunDirectoryError
        Naming ``results_dir`` and the problem.
    """
    text = os.fspath(results_dir)
    if "\x00" in text:
        raise RunDirectoryError(f"results_dir {text!r}: contains a NUL byte")
    if not text:
        raise RunDirectoryError("results_dir: must not be empty")
    base = Path(text)
    if ".." in base.parts:
        raise RunDirectoryError(
            f"results_dir {text!r}: '..' is not allowed (it leaves the folder the path names); "
            "give an absolute path to write elsewhere"
        )
    try:
        if base.is_symlink():
            raise RunDirectoryError(
                f"results_dir {text!r}: is a symlink; name its target "
                f"({os.path.realpath(base)}) if you mean to write there"
            )
        if base.exists() and not base.is_dir():
            raise RunDirectoryError(f"results_dir {text!r}: exists and is not a folder")
    except OSError as err:  # ENAMETOOLONG, a file used as a folder, permissions
        raise RunDirectoryError(f"results_dir {text[:200]!r}: {err.strerror or err}") from None
    return base


class _RunLock:
    """Exclusive ``flock`` on a run's lock file, shared by the objects of one process.

    Within one process several :class:`RunDirectory` objects may refer to one
    folder (a test reopening a run it just wrote); across processes only one
    may hold it. The OS drops the lock when the process dies.
    """

    _held: ClassVar[dict[Path, list[int]]] = {}  # path -> [fd, references]
    _guard: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def acquire(cls, path: Path) -> None:
        with cls._guard:
            held = cls._held.get(path)
            if held is not None:
                held[1] += 1
                return
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            flags |= getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(path / LOCK, flags, 0o644)
            except OSError as err:
                raise RunDirectoryError(
                    f"{path}: cannot open {LOCK} ({err.strerror or err})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirectoryError(f"{path}: cannot lock {LOCK} ({err})") from None
                raise RunInUseError(
                    f"{path} is in use by another fedsec process"
                    + (f" (pid {holder})" if holder.isdigit() else "")
                    + "; wait for it to end or stop it first"
                ) from None
            # The holder's pid, for the refusal message (the lock is the flock, not this).
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            cls._held[path] = [fd, 1]

    @classmethod
    def release(cls, path: Path) -> None:
        with cls._guard:
            held = cls._held.get(path)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del cls._held[path]
                os.close(held[0])  # closing the last descriptor drops the flock


@dataclass
class RunDirectory:
    """One run's results folder and its manifest.

    Use :meth:`create` for a new run and :meth:`open` to resume one.
    """

    path: Path
    config: ExperimentConfig
    rounds: list[RoundMetrics] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    _closed: bool = field(default=False, init=False, repr=False, compare=False)
    _locked: bool = field(default=False, init=False, repr=False, compare=False)
    _write: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @classmethod
    def create(
        cls, config: ExperimentConfig, results_dir: str | Path | None = None
    ) -> RunDirectory:
        """Make ``<results_dir>/<name>``; an existing run is never overwritten.

        If the name is taken, ``-2``, ``-3``, ... is appended. The new folder
        is locked for this process (see the module docstring).

        Raises
        ------
        RunDirectoryError
            If ``results_dir`` is not allowed (see :func:`check_results_dir`)
            or cannot be created.
        """
        base = check_results_dir(results_dir or config.experiment.results_dir)
        name = config.experiment.name
        try:
            base.mkdir(parents=True, exist_ok=True)
            path = base / name
            suffix = 2
            while True:
                try:
                    path.mkdir()  # never an existing folder or symlink, even racing another run
                    break
                except FileExistsError:
                    path = base / f"{name}-{suffix}"
                    suffix += 1
            (path / "checkpoints").mkdir()
        except OSError as err:
            where = str(err.filename or base)[:200]
            raise RunDirectoryError(
                f"results_dir {where!r}: cannot create the run folder ({err.strerror or err})"
            ) from None
        run = cls(path=path.resolve(), config=config)
        run._lock()
        (run.path / "config.toml").write_text(to_toml(config), encoding="utf-8")
        run._write_manifest()
        return run

    @staticmethod
    def discard_unrecorded(path: str | Path) -> None:
        """Remove a run folder that has no manifest: a run that died before recording.

        :meth:`create` makes the folder, then writes the manifest; a process
        killed in between leaves a folder that :meth:`open` refuses and that
        makes the next :meth:`create` of the same name pick ``<name>-2``.
        Callers that own a run's path (a grid's cells) remove it with this
        first. Its lock is taken before anything is removed, so the folder of
        a live process is never pulled from under it.

        Raises
        ------
        RunDirectoryError
            If the folder is a symlink, has a manifest (it recorded a run), or
            is in use by another process (:class:`RunInUseError`).
        """
        path = Path(path)
        if path.is_symlink() or not path.is_dir():
            raise RunDirectoryError(f"{path}: not a run folder")
        if (path / MANIFEST).exists():
            raise RunDirectoryError(f"{path}: has a {MANIFEST}; resume it with open()")
        resolved = path.resolve()
        _RunLock.acquire(resolved)
        try:
            shutil.rmtree(resolved)
        except OSError as err:
            raise RunDirectoryError(f"{path}: cannot remove ({err.strerror or err})") from None
        finally:
            _RunLock.release(resolved)

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """Open an existing run directory to resume it.

        The folder is locked for this process first, so a folder another
        process is writing is refused before anything in it changes.

        Raises
        ------
        RunDirectoryError
            If the folder is a symlink, is in use by another process
            (:class:`RunInUseError`), or its manifest is missing or malformed,
            or its config is invalid.
        """
        text = os.fspath(path)
        if "\x00" in text:
            raise RunDirectoryError(f"{text!r}: contains a NUL byte")
        given = Path(text)
        try:
            if given.is_symlink():
                raise RunDirectoryError(
                    f"{given}: is a symlink; resume the run folder itself "
                    f"({os.path.realpath(given)})"
                )
            path = given.resolve()
            manifest_path = path / MANIFEST
            if not manifest_path.is_file():
                raise RunDirectoryError(f"{path}: no {MANIFEST}; not a fedsec run directory")
        except OSError as err:
            raise RunDirectoryError(f"{text[:200]!r}: {err.strerror or err}") from None
        _RunLock.acquire(path)
        try:
            run = cls._read(path, manifest_path)
        except BaseException:
            _RunLock.release(path)
            raise
        run._locked = True
        run._trim_decisions()
        return run

    @classmethod
    def _read(cls, path: Path, manifest_path: Path) -> RunDirectory:
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise RunDirectoryError(
                f"{manifest_path}: unreadable manifest ({str(err)[:200]})"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise RunDirectoryError(f"{manifest_path}: unsupported manifest format")
        if not isinstance(manifest.get("config"), dict):
            raise RunDirectoryError(f"{manifest_path}: manifest has no config")
        try:
            config = parse_config(manifest["config"])
        except ConfigError as err:
            raise RunDirectoryError(f"{manifest_path}: config {err}") from None
        try:
            rounds, checkpoints, finished = _check_manifest(manifest)
        except ValueError as err:
            raise RunDirectoryError(f"{manifest_path}: malformed manifest: {err}") from None
        return cls(
            path=path, config=config, rounds=rounds, checkpoints=checkpoints, finished=finished
        )

    def _lock(self) -> None:
        if not self._locked:
            _RunLock.acquire(self.path)
            self._locked = True

    def close(self) -> None:
        """Stop writing: wait for a round being recorded, refuse later writes, unlock.

        Safe to call from another thread (or a signal handler in the main
        thread while the rounds run in another) and more than once.
        """
        with self._write:
            self._closed = True
            if self._locked:
                self._locked = False
                _RunLock.release(self.path)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (later writes raise :class:`RunClosedError`)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RunClosedError(f"{self.path}: the run was closed; nothing more is recorded")

    def _trim_decisions(self) -> None:
        # A crash between the manifest and the decisions log can leave lines for
        # rounds that will be re-run; keep only complete rounds.
        path = self.path / DECISIONS
        if not path.exists():
            return
        last = self.last_round if self.last_round is not None else -1
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["round"]) <= last:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())

    @property
    def name(self) -> str:
        """The run's directory name."""
        return self.path.name

    @property
    def last_round(self) -> int | None:
        """The last round with a checkpoint, or None for a run that has none."""
        return self.checkpoints[-1]["round"] if self.checkpoints else None

    def record_round(
        self,
        metrics: RoundMetrics,
        model_state: dict[str, torch.Tensor],
        server_state: dict[str, torch.Tensor] | None = None,
        decisions: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint the global model after a round, then record its metrics.

        ``decisions`` (which clients the strategy excluded or down-weighted)
        goes to ``decisions.jsonl``, one line per round. The whole record
        happens under the run's write lock, so :meth:`close` never
        interrupts it half-way.

        With ``experiment.keep_checkpoints = N > 0`` only round 0's and the
        newest N checkpoints stay; older ones leave the manifest before their
        files are deleted, so the manifest never names a missing file.

        Raises
        ------
        RunClosedError
            If the run was closed.
        """
        with self._write:
            self._check_open()
            server_round = int(metrics["round"])
            tensors = {**model_state, **prefixed(server_state or {}, SERVER_STATE_PREFIX)}
            relative = checkpoint_file(server_round)
            digest = save_checkpoint(self.path / relative, tensors)
            self.checkpoints.append({"round": server_round, "file": relative, "sha256": digest})
            dropped = self._retain()
            self.rounds.append(metrics)
            self._write_manifest()
            self._write_metrics()
            if decisions is not None:
                with open(self.path / DECISIONS, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(decisions) + "\n")
            self._delete_checkpoints(dropped, server_round)

    def _retain(self) -> list[dict[str, Any]]:
        """Drop all but round 0 and the newest ``keep_checkpoints`` from the list."""
        keep = self.config.experiment.keep_checkpoints
        if keep <= 0 or len(self.checkpoints) <= keep:
            return []
        newest = self.checkpoints[-keep:]
        first = self.checkpoints[0]
        kept = ([first] if first["round"] == 0 and first not in newest else []) + newest
        dropped = [c for c in self.checkpoints if c not in kept]
        self.checkpoints = kept
        return dropped

    def _delete_checkpoints(self, dropped: list[dict[str, Any]], server_round: int) -> None:
        # After the manifest stopped naming them. Also files of earlier rounds that no
        # manifest names (a crash between a checkpoint and its manifest, or mid-cleanup).
        if self.config.experiment.keep_checkpoints <= 0:
            return
        for entry in dropped:
            (self.path / entry["file"]).unlink(missing_ok=True)
        named = {Path(c["file"]).name for c in self.checkpoints}
        for file in (self.path / "checkpoints").iterdir():
            match = _CHECKPOINT_NAME.match(file.name)
            if match and file.name not in named and int(match.group(1)) < server_round:
                file.unlink(missing_ok=True)

    def load_last_checkpoint(
        self,
    ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return ``(round, model_state, server_state)`` of the last checkpoint.

        Raises
        ------
        CheckpointError
            If there is none, or its SHA-256 does not match the manifest.
        """
        if not self.checkpoints:
            raise CheckpointError(f"{self.path}: the run has no checkpoint to resume from")
        entry = self.checkpoints[-1]
        tensors = load_checkpoint(self.path / entry["file"], entry["sha256"])
        model_state = {k: v for k, v in tensors.items() if not k.startswith(SERVER_STATE_PREFIX)}
        server_state = unprefixed(tensors, SERVER_STATE_PREFIX)
        return int(entry["round"]), model_state, server_state

    def finish(self, plot: bool = True) -> None:
        """Mark the run complete and draw its accuracy plot (unless ``plot`` is False).

        Raises
        ------
        RunClosedError
            If the run was closed.
        """
        with self._write:
            self._check_open()
            self.finished = True
            self._write_manifest()
            self._write_metrics()
            if plot:
                self.write_plot()

    def write_plot(self) -> Path:
        """Write ``accuracy.png``: server-side test accuracy over rounds."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rounds if "test_accuracy" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [r["round"] for r in rows],
            [100 * float(r["test_accuracy"]) for r in rows],
            marker="o",
        )
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{self.name}: {self.config.data.dataset}, {self.config.aggregation.rule}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "accuracy.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def _write_manifest(self) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "fedsec_version": __version__,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.config.to_dict(),
            "finished": self.finished,
            "checkpoints": self.checkpoints,
            "rounds": self.rounds,
        }
        atomic_write_bytes(self.path / MANIFEST, json.dumps(manifest, indent=2).encode())

    def _write_metrics(self) -> None:
        final = self.rounds[-1] if self.rounds else {}
        metrics = {
            "run": self.name,
            "finished": self.finished,
            "config": self.config.to_dict(),
            "rounds": self.rounds,
            "final": final,
        }
        atomic_write_bytes(self.path / "metrics.json", json.dumps(metrics, indent=2).encode())
        columns: list[str] = []
        for row in self.rounds:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rounds)
        atomic_write_bytes(self.path / "rounds.csv", buffer.getvalue().encode())


def _check_manifest(
    manifest: dict[str, Any],
) -> tuple[list[RoundMetrics], list[dict[str, Any]], bool]:
    """The manifest's rounds, checkpoints and finished flag.

    Checkpoint files must be where :func:`checkpoint_file` puts them (never a
    path elsewhere), hashes SHA-256 hex digests, and rounds strictly increasing;
    the last checkpoint is the last recorded round.

    Raises
    ------
    ValueError
        Naming the first malformed entry.
    """
    rounds = manifest.get("rounds", [])
    checkpoints = manifest.get("checkpoints", [])
    finished = manifest.get("finished", False)
    if not isinstance(finished, bool):
        raise ValueError("finished must be true or false")
    if not isinstance(rounds, list) or not isinstance(checkpoints, list):
        raise ValueError("rounds and checkpoints must be lists")
    numbers: list[int] = []
    for index, row in enumerate(rounds):
        value = row.get("round") if isinstance(row, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"rounds[{index}] has no round number")
        if numbers and value <= numbers[-1]:
            raise ValueError(f"rounds[{index}]: round {value} does not follow {numbers[-1]}")
        numbers.append(value)
    recorded = set(numbers)
    previous = -1
    for index, entry in enumerate(checkpoints):
        where = f"checkpoints[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object")
        value = entry.get("round")
        if not isinstance(value, int) or isinstance(value, bool) or value <= previous:
            raise ValueError(f"{where}.round must be an increasing round number")
        if entry.get("file") != checkpoint_file(value):
            raise ValueError(f"{where}.file must be {checkpoint_file(value)!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise ValueError(f"{where}.sha256 is not a SHA-256 hex digest")
        if value not in recorded:
            raise ValueError(f"{where}: round {value} is not among the recorded rounds")
        previous = value
    if numbers and (not checkpoints or checkpoints[-1]["round"] != numbers[-1]):
        raise ValueError(f"round {numbers[-1]} has no checkpoint")
    return list(rounds), list(checkpoints), finished
