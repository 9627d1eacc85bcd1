"""A run's directory: config, manifest, per-round metrics, checkpoints and plot.

Layout of ``results/<run-name>/``::

    config.toml          the validated config the run uses
    manifest.json        machine state: completed rounds, checkpoints and hashes
    decisions.jsonl      per round: clients sampled, excluded (with reason), weights used
    metrics.json         per-round metrics and the final figures
    rounds.csv           the same rows, one per round
    accuracy.png         test accuracy over rounds
    checkpoints/round_NNNN.safetensors

Each round's checkpoint is written before the manifest that names it, and both
are replaced atomically, so an interrupted run leaves a directory that
``fedsec run --resume`` continues from the last complete round.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
MANIFEST_FORMAT = 1
SERVER_STATE_PREFIX = "fedsec.server_state."

RoundMetrics = dict[str, Any]


class RunDirectoryError(ValueError):
    """A run directory that cannot be created, read or resumed."""


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

    @classmethod
    def create(
        cls, config: ExperimentConfig, results_dir: str | Path | None = None
    ) -> RunDirectory:
        """Make ``<results_dir>/<name>``; an existing run is never overwritten.

        If the name is taken, ``-2``, ``-3``, ... is appended.
        """
        base = Path(results_dir or config.experiment.results_dir)
        name = config.experiment.name
        path = base / name
        suffix = 2
        while path.exists():
            path = base / f"{name}-{suffix}"
            suffix += 1
        (path / "checkpoints").mkdir(parents=True)
        run = cls(path=path.resolve(), config=config)
        (run.path / "config.toml").write_text(to_toml(config), encoding="utf-8")
        run._write_manifest()
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """Open an existing run directory to resume it.

        Raises
        ------
        RunDirectoryError
            If the manifest is missing or malformed, or its config is invalid.
        """
        path = Path(path).resolve()
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirectoryError(f"{path}: no {MANIFEST}; not a fedsec run directory") from None
        except (OSError, json.JSONDecodeError) as err:
            raise RunDirectoryError(f"{manifest_path}: unreadable manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise RunDirectoryError(f"{manifest_path}: unsupported manifest format")
        try:
            config = parse_config(manifest["config"])
        except ConfigError as err:
            raise RunDirectoryError(f"{manifest_path}: config {err}") from None
        except KeyError:
            raise RunDirectoryError(f"{manifest_path}: manifest has no config") from None
        run = cls(
            path=path,
            config=config,
            rounds=list(manifest.get("rounds", [])),
            checkpoints=list(manifest.get("checkpoints", [])),
            finished=bool(manifest.get("finished", False)),
        )
        run._trim_decisions()
        return run

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
        goes to ``decisions.jsonl``, one line per round.
        """
        server_round = int(metrics["round"])
        tensors = {**model_state, **prefixed(server_state or {}, SERVER_STATE_PREFIX)}
        relative = f"checkpoints/round_{server_round:04d}.safetensors"
        digest = save_checkpoint(self.path / relative, tensors)
        self.checkpoints.append({"round": server_round, "file": relative, "sha256": digest})
        self.rounds.append(metrics)
        self._write_manifest()
        self._write_metrics()
        if decisions is not None:
            with open(self.path / DECISIONS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(decisions) + "\n")

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

    def finish(self) -> None:
        """Mark the run complete and draw its accuracy plot."""
        self.finished = True
        self._write_manifest()
        self._write_metrics()
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
