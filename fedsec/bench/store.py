"""The results store of a benchmark grid: one folder that survives interruption.

Layout of ``RESULTS/``::

    grid.toml            the grid file the results belong to
    index.json           every cell of the grid: id, attack, defense, fraction,
                         alpha, seed, backdoor, num_clients, rounds
    cells/<cell-id>/     one run directory per cell (:class:`fedsec.runs.RunDirectory`):
                         metrics.json, rounds.csv, manifest.json, checkpoints/

A cell's run directory records every round as it completes (atomically, with
a checkpoint), so an interrupted grid loses at most the round in flight:
rerunning the same grid skips finished cells and resumes unfinished ones from
their last complete round. Reports (:mod:`fedsec.bench.report`) read only
this folder.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsec.checkpoint import atomic_write_bytes
from fedsec.runs import (
    DECISIONS,
    MANIFEST,
    RunDirectory,
    RunDirectoryError,
    check_results_dir,
)

from .grid import Cell, Grid

__all__ = ["CellResult", "ResultsStore", "StoreError"]

INDEX = "index.json"
GRID_FILE = "grid.toml"
CELLS = "cells"
INDEX_FORMAT = 1


class StoreError(ValueError):
    """A results folder that cannot be used; the text says why."""


@dataclass
class CellResult:
    """What the store holds for one cell.

    Attributes
    ----------
    cell : dict
        The cell's coordinates (:meth:`fedsec.bench.grid.Cell.describe`).
    rounds : list of dict
        Per-round metrics as recorded (round 0 is the initial model).
    finished : bool
        Whether every round of the cell completed.
    """

    cell: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False

    @property
    def final(self) -> dict[str, Any]:
        """The last recorded round (empty when none)."""
        return self.rounds[-1] if self.rounds else {}

    @property
    def every_round_failed(self) -> bool:
        """Whether the run finished with every training round failed.

        Such a cell (no usable reply in any round: the clients all raised, or
        the engine never reached them) ran to the end but measured nothing;
        it counts as a failed cell, not a result.
        """
        trained = [r for r in self.rounds if int(r.get("round", 0)) >= 1]
        return self.finished and bool(trained) and all(r.get("status") == "failed" for r in trained)


def _check_source(grid: Grid) -> None:
    """The grid's text must describe its cells: workers rebuild the cells from it."""
    from .grid import GridError, parse_grid

    try:
        ids = [c.id for c in parse_grid(tomllib.loads(grid.source)).cells]
    except (tomllib.TOMLDecodeError, GridError) as err:
        raise StoreError(f"the grid's source text does not parse ({err}); use load_grid") from None
    if ids != [c.id for c in grid.cells]:
        raise StoreError("the grid's source text describes other cells than the grid")


class ResultsStore:
    """A grid's results folder (see the module docstring)."""

    def __init__(self, path: Path, name: str, cells: list[dict[str, Any]]) -> None:
        self.path = path
        self.name = name
        self.cells = cells

    @classmethod
    def create_or_open(cls, path: str | Path, grid: Grid) -> ResultsStore:
        """The store of ``grid`` at ``path``: new, or the same grid's earlier results.

        Raises
        ------
        StoreError
            If ``path`` holds the results of a different grid (another name or
            other cells) or is not a results folder.
        """
        try:
            path = check_results_dir(path)
        except RunDirectoryError as err:
            raise StoreError(str(err).replace("results_dir", "results folder", 1)) from None
        cells = [cell.describe() for cell in grid.cells]
        if (path / INDEX).exists():
            store = cls.open(path)
            if store.name != grid.name or [c["id"] for c in store.cells] != [
                c["id"] for c in cells
            ]:
                raise StoreError(
                    f"{path} holds results of another grid ({store.name}, {len(store.cells)} "
                    "cells); use a new results folder for a changed grid"
                )
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} exists and is not a results folder; choose an empty one")
        _check_source(grid)
        try:
            (path / CELLS).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path / GRID_FILE, grid.source.encode())
            index = {"format": INDEX_FORMAT, "name": grid.name, "cells": cells}
            atomic_write_bytes(path / INDEX, json.dumps(index, indent=2).encode())
        except OSError as err:
            raise StoreError(
                f"{path}: cannot create the results folder ({err.strerror or err})"
            ) from None
        return cls(path, grid.name, cells)

    @classmethod
    def open(cls, path: str | Path) -> ResultsStore:
        """Open an existing results folder (for reports and resuming).

        Raises
        ------
        StoreError
            If ``path`` has no readable ``index.json``.
        """
        path = Path(path)
        try:
            index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{path}: no {INDEX}; not a fedsec bench results folder") from None
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"{path / INDEX}: unreadable ({err})") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise StoreError(f"{path / INDEX}: unsupported format")
        return cls(path, str(index["name"]), list(index["cells"]))

    def cell_path(self, cell_id: str) -> Path:
        """The run directory of a cell."""
        return self.path / CELLS / cell_id

    def is_finished(self, cell_id: str) -> bool:
        """Whether the cell's run completed every round."""
        return self.result(cell_id).finished

    def run_directory(self, cell: Cell) -> RunDirectory:
        """The cell's run directory: its earlier (partial) run, or a new one."""
        path = self.cell_path(cell.id)
        try:
            if (path / MANIFEST).exists():
                return RunDirectory.open(path)
            if path.exists():
                # Killed between making the folder and writing its manifest: nothing was
                # recorded, and a create() beside it would write to "<id>-2", which the
                # store never reads (the cell would never count as finished).
                RunDirectory.discard_unrecorded(path)
            return RunDirectory.create(cell.config, self.path / CELLS)
        except RunDirectoryError as err:
            raise StoreError(f"cell {cell.id}: {err}") from None

    def result(self, cell_id: str) -> CellResult:
        """What has been recorded for a cell (nothing yet: no rounds)."""
        described = next((c for c in self.cells if c["id"] == cell_id), None)
        if described is None:
            raise StoreError(f"{self.path}: no cell {cell_id!r}")
        manifest = self.cell_path(cell_id) / MANIFEST
        if not manifest.exists():
            return CellResult(described)
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"{manifest}: unreadable ({err})") from None
        return CellResult(described, list(data.get("rounds", [])), bool(data.get("finished")))

    def failure(self, cell_id: str) -> str | None:
        """One line on why a finished cell is a failed one (every round failed), else None.

        Names the last round's error, or one client's exclusion reason from
        the cell's decisions log (e.g. the exception its training raised).
        """
        result = self.result(cell_id)
        if not result.every_round_failed:
            return None
        last = result.rounds[-1]
        if last.get("error"):
            cause = str(last["error"]).splitlines()[0][:300]
        else:
            cause = (
                f"{last.get('num-replies', 0)} of {last.get('num-sampled', '?')} clients replied"
            )
            reason = _last_exclusion(self.cell_path(cell_id) / DECISIONS)
            if reason:
                cause += f"; e.g. {reason}"
        trained = len(result.rounds) - 1
        return f"every one of its {trained} rounds failed (last: {cause})"

    def results(self) -> list[CellResult]:
        """Every cell of the grid, in grid order, with what has been recorded."""
        return [self.result(c["id"]) for c in self.cells]


def _last_exclusion(path: Path) -> str:
    """One exclusion reason of the last round in a decisions log ("" if none or unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        excluded = json.loads(lines[-1]).get("excluded", {}) if lines else {}
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(excluded, dict) or not excluded:
        return ""
    return str(next(iter(excluded.values()))).splitlines()[0][:200]
