"""Benchmark grids: attacks x defenses x malicious fraction x heterogeneity x seeds.

A grid is a TOML file::

    [grid]
    name = "standard"
    seeds = [0]
    fractions = [0.2]          # malicious fraction of data.num_clients
    alphas = [0.5]             # Dirichlet alpha (data.partition = "dirichlet")

    [base]                     # an experiment config every cell starts from
    experiment = { rounds = 20 }
    data = { dataset = "digits", num_clients = 20, partition = "dirichlet" }

    [[attack]]                 # any [attack] keys but num_malicious / fraction
    name = "ipm"
    params = { epsilon = 100.0 }

    [[defense]]                # [aggregation] keys, plus optional tables
    label = "bucketing+median" # privacy = {...}, secagg = {...}, server = {...}
    rule = "median"
    pre = ["bucketing"]

Each cell is one experiment config, validated like any other. A defense's
``f`` defaults to ``"auto"``: the expected number of malicious clients per
round (the rule is told the true f, as in the papers). The attack ``none``
is the clean baseline and is run once per defense, alpha and seed (fraction
0). A cell's id is readable and ends in a hash of its full config, so editing
the grid makes new cells and never reuses stale results.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsec.assembly import sampled_clients
from fedsec.config import ConfigError, ExperimentConfig, parse_config

__all__ = ["Cell", "Grid", "GridError", "load_grid", "parse_grid"]

#: Keys of a ``[[defense]]`` table that go to ``[aggregation]``.
AGGREGATION_KEYS = ("rule", "params", "pre", "f", "bucket_size", "root_size")
#: Sub-tables a defense may set besides its aggregation.
DEFENSE_TABLES = ("privacy", "secagg", "server")
#: Attack keys the grid sets itself.
GRID_ATTACK_KEYS = ("num_malicious", "fraction")


class GridError(ValueError):
    """An invalid grid; ``str(err)`` is one line naming the place and the problem."""


@dataclass(frozen=True)
class Cell:
    """One experiment of a grid.

    Attributes
    ----------
    id : str
        Unique, readable, filesystem-safe; ends in a hash of ``config``.
    attack, defense : str
        The labels of its attack and defense.
    fraction, alpha : float
        Malicious fraction (0 for the clean baseline) and Dirichlet alpha.
    seed : int
        The experiment seed.
    config : ExperimentConfig
        The validated experiment.
    """

    id: str
    attack: str
    defense: str
    fraction: float
    alpha: float
    seed: int
    config: ExperimentConfig

    def describe(self) -> dict[str, Any]:
        """The cell's coordinates as plain values (what the results store indexes)."""
        return {
            "id": self.id,
            "attack": self.attack,
            "defense": self.defense,
            "fraction": self.fraction,
            "alpha": self.alpha,
            "seed": self.seed,
            "backdoor": self.config.attack.name == "backdoor",
            "num_clients": self.config.data.num_clients,
            "rounds": self.config.experiment.rounds,
        }


@dataclass(frozen=True)
class Grid:
    """A parsed grid: its name and cells (clean baselines first)."""

    name: str
    cells: tuple[Cell, ...]
    source: str  # the grid file's text, kept with the results


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid TOML.

    Raises
    ------
    GridError
        If the file is missing, not TOML, or any cell is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise GridError(f"{path}: cannot read grid ({err.strerror or err})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"{path}: not valid TOML ({err})") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise GridError(f"{path}: not valid TOML (arrays or tables nested too deeply)") from None
    return parse_grid(raw, source=text)


def parse_grid(raw: Mapping[str, Any], source: str = "") -> Grid:
    """Validate a parsed grid into its cells.

    Raises
    ------
    GridError
        Naming the key or the cell (attack x defense) and the problem.
    """
    unknown = set(raw) - {"grid", "base", "attack", "defense"}
    if unknown:
        raise GridError(
            f"unknown top-level key(s) {sorted(unknown)}; valid: grid, base, attack, defense"
        )
    head = _table(raw, "grid")
    extra = set(head) - {"name", "seeds", "fractions", "alphas"}
    if extra:
        raise GridError(
            f"grid: unknown key(s) {sorted(extra)}; valid: name, seeds, fractions, alphas"
        )
    name = head.get("name", "grid")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise GridError(f"grid.name: must be letters, digits, '.', '_', '-', got {name!r}")
    seeds = _numbers(head, "seeds", [0], int)
    fractions = _numbers(head, "fractions", [0.2], float)
    alphas = _numbers(head, "alphas", [0.5], float)
    if any(not 0 < f < 1 for f in fractions):
        raise GridError(
            f'grid.fractions: each must be in (0, 1) (the clean baseline is attack "none"), '
            f"got {fractions}"
        )
    base = _table(raw, "base")
    attacks = _entries(raw, "attack")
    defenses = _entries(raw, "defense")

    cells: list[Cell] = []
    seen: set[str] = set()
    combos = itertools.product(attacks, defenses, fractions, alphas, seeds)
    for attack, defense, fraction, alpha, seed in combos:
        clean = attack["name"] == "none"
        if clean and fraction != fractions[0]:
            continue  # the clean baseline does not depend on the fraction
        cell = _cell(base, attack, defense, 0.0 if clean else fraction, alpha, seed)
        if cell.id in seen:
            raise GridError(f"cell {cell.id} appears twice; give the repeated entry a label")
        seen.add(cell.id)
        cells.append(cell)
    cells.sort(key=lambda c: c.fraction != 0.0)  # clean baselines first (stable)
    return Grid(name=name, cells=tuple(cells), source=source)


def _cell(
    base: Mapping[str, Any],
    attack: Mapping[str, Any],
    defense: Mapping[str, Any],
    fraction: float,
    alpha: float,
    seed: int,
) -> Cell:
    attack_label, defense_label = _label(attack), _label(defense)
    where = f"cell {attack_label} x {defense_label}"
    raw: dict[str, dict[str, Any]] = {k: dict(v) for k, v in base.items()}
    data = raw.setdefault("data", {})
    data.setdefault("partition", "dirichlet")
    data["alpha"] = alpha
    raw.setdefault("experiment", {})["seed"] = seed
    attack_section = {k: v for k, v in attack.items() if k != "label"}
    if attack["name"] != "none":
        attack_section["fraction"] = fraction
    raw["attack"] = attack_section
    aggregation = dict(raw.get("aggregation", {}))
    for key, value in defense.items():
        if key in AGGREGATION_KEYS:
            aggregation[key] = value
        elif key in DEFENSE_TABLES:
            raw.setdefault(key, {}).update(value)
    if aggregation.get("f", "auto") == "auto":
        aggregation["f"] = _expected_malicious(raw, fraction, where)
    raw["aggregation"] = aggregation
    # A defense that lets the model diverge fails every later round (each reply is
    # excluded as non-finite): that is the cell's result, not a dead engine, so a
    # cell runs all its rounds unless the grid sets server.max_failed_rounds.
    rounds = raw["experiment"].get("rounds", ExperimentConfig().experiment.rounds)
    if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1:
        raw.setdefault("server", {}).setdefault("max_failed_rounds", rounds)
    raw["experiment"]["name"] = "cell"  # replaced by the id below
    try:
        config = parse_config(raw)
    except ConfigError as err:
        raise GridError(f"{where} (fraction {fraction:g}, alpha {alpha:g}): {err}") from None
    digest = hashlib.sha256(json.dumps(_identity(config), sort_keys=True).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{attack_label}__{defense_label}")
    cell_id = f"{slug}__m{fraction:g}_a{alpha:g}_s{seed}__{digest[:8]}"
    config = config.replace("experiment", name=cell_id)
    return Cell(cell_id, attack_label, defense_label, fraction, alpha, seed, config)


def _identity(config: ExperimentConfig) -> dict[str, Any]:
    """What a cell's id hashes: the config, less keys added later at their defaults.

    A key added to the schema must not rename the cells of every existing
    grid (a results folder matches its grid by cell ids): ``client.train_fn``
    enters the hash only when set.
    """
    described = config.to_dict()
    if not described["client"].get("train_fn"):
        described["client"].pop("train_fn", None)
    return described


def _expected_malicious(raw: Mapping[str, Any], fraction: float, where: str) -> int:
    """Malicious clients expected among a round's sampled clients."""
    try:
        probe = parse_config({k: v for k, v in raw.items() if k not in ("attack", "aggregation")})
    except ConfigError as err:
        raise GridError(f"{where}: {err}") from None
    total = probe.data.num_clients
    malicious = round(fraction * total)
    sampled = sampled_clients(probe)
    return malicious if sampled == total else round(malicious * sampled / total)


def _label(entry: Mapping[str, Any]) -> str:
    label = entry.get("label", entry.get("name", entry.get("rule")))
    return str(label)


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise GridError(f"{key}: must be a table, got {type(value).__name__}")
    return value


def _numbers(head: Mapping[str, Any], key: str, default: list[Any], kind: type) -> list[Any]:
    values = head.get(key, default)
    if (
        not isinstance(values, list)
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values)
        or (kind is int and any(not isinstance(v, int) for v in values))
    ):
        raise GridError(f"grid.{key}: must be a non-empty list of {kind.__name__}s, got {values!r}")
    if len(set(values)) != len(values):
        raise GridError(f"grid.{key}: lists a value twice ({values})")
    return [kind(v) for v in values]


def _entries(raw: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    entries = raw.get(key)
    if not isinstance(entries, list) or not entries:
        raise GridError(f"{key}: the grid needs at least one [[{key}]] table")
    out: list[dict[str, Any]] = []
    labels: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise GridError(f"{key}[{index}]: must be a table")
        entry = dict(entry)
        if key == "attack":
            if "name" not in entry:
                raise GridError(f'attack[{index}]: needs a name (use "none" for the baseline)')
            clash = set(entry) & set(GRID_ATTACK_KEYS)
            if clash:
                raise GridError(
                    f"attack[{index}]: {sorted(clash)} come from grid.fractions; remove them"
                )
        else:
            if "rule" not in entry:
                raise GridError(f"defense[{index}]: needs a rule")
            valid = {"label", *AGGREGATION_KEYS, *DEFENSE_TABLES}
            extra = set(entry) - valid
            if extra:
                raise GridError(
                    f"defense[{index}]: unknown key(s) {sorted(extra)}; valid: {sorted(valid)}"
                )
        label = _label(entry)
        if label in labels:
            raise GridError(f"{key}[{index}]: label {label!r} is used twice; give each a label")
        labels.add(label)
        out.append(entry)
    return out
