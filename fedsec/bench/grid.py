"""Benchmark grids: attacks x defenses x regimes x malicious fraction x heterogeneity x seeds.

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

    [[regime]]                 # optional: config tables deep-merged over [base]
    label = "fedsgd"           # and, optionally, this regime's own fractions
    alphas = [0.1]             # and alphas (default: the grid's)
    client = { local_steps = 1 }
    server = { momentum = 0.9 }

    [[exclude]]                # optional: drop the cells matching every key
    defense = "bulyan"         # (attack, defense, regime, fraction, alpha;
    fraction = [0.3]           # each a value or a list), e.g. where a rule's
                               # n > 4f + 3 does not hold

Each cell is one experiment config, validated like any other. A defense's
``f`` defaults to ``"auto"``: the expected number of malicious clients per
round (the rule is told the true f, as in the papers). The attack ``none``
is the clean baseline and is run once per defense, regime, alpha and seed
(fraction 0). A cell's id is readable and ends in a hash of its full config,
so editing the grid makes new cells and never reuses stale results. A cell
keeps round 0's and its newest checkpoint (``experiment.keep_checkpoints = 1``)
unless ``[base]`` sets another number.

Regimes are the training settings an attack is evaluated in: whether an attack
bites depends on them as much as on the rule (ALIE is strongest against
FedSGD-like updates with little spread, Baruch et al., NeurIPS 2019;
AGR-tailored attacks are evaluated under cross-device sampling by Shejwalkar
and Houmansadr, NDSS 2021). Without ``[[regime]]`` tables a grid has one
unnamed regime, and its cell ids do not mention it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedsec.assembly import sampled_clients
from fedsec.attacks.model_poisoning import MODEL_ATTACKS
from fedsec.config import ConfigError, ExperimentConfig, parse_config

__all__ = ["Cell", "Grid", "GridError", "load_grid", "parse_grid"]

#: Keys of a ``[[defense]]`` table that go to ``[aggregation]``.
AGGREGATION_KEYS = ("rule", "params", "pre", "f", "bucket_size", "root_size")
#: Sub-tables a defense may set besides its aggregation.
DEFENSE_TABLES = ("privacy", "secagg", "server")
#: Attack keys the grid sets itself.
GRID_ATTACK_KEYS = ("num_malicious", "fraction")
#: Config sections a ``[[regime]]`` may override (the attack comes from ``[[attack]]``).
REGIME_SECTIONS = tuple(f.name for f in fields(ExperimentConfig) if f.name != "attack")
#: Axes a regime may set for itself instead of the grid's.
REGIME_AXES = ("fractions", "alphas")
#: Config keys each cell sets, which a regime must not: key -> where they come from.
REGIME_FORBIDDEN = {
    ("data", "alpha"): "the regime's alphas (or grid.alphas)",
    ("experiment", "seed"): "grid.seeds",
    ("experiment", "name"): "the cell id",
}


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
    regime : str
        The label of its ``[[regime]]``; ``""`` in a grid without regimes.
    """

    id: str
    attack: str
    defense: str
    fraction: float
    alpha: float
    seed: int
    config: ExperimentConfig
    regime: str = ""

    def describe(self) -> dict[str, Any]:
        """The cell's coordinates as plain values (what the results store indexes)."""
        return {
            "id": self.id,
            "attack": self.attack,
            "defense": self.defense,
            "regime": self.regime,
            "fraction": self.fraction,
            "alpha": self.alpha,
            "seed": self.seed,
            "backdoor": self.config.attack.name == "backdoor",
            "reference": _is_reference(self.config.attack.name),
            "num_clients": self.config.data.num_clients,
            "rounds": self.config.experiment.rounds,
        }


def _is_reference(attack: str) -> bool:
    """Whether ``attack`` is a reference rather than an attack (``abstain``)."""
    return attack in MODEL_ATTACKS and bool(MODEL_ATTACKS.get(attack).withholds)


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
    unknown = set(raw) - {"grid", "base", "attack", "defense", "regime", "exclude"}
    if unknown:
        raise GridError(
            f"unknown top-level key(s) {sorted(unknown)}; "
            "valid: grid, base, attack, defense, regime, exclude"
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
    _check_fractions(fractions, "grid.fractions")
    base = _table(raw, "base")
    attacks = _entries(raw, "attack")
    defenses = _entries(raw, "defense")
    regimes = _regimes(raw, base, fractions, alphas)
    excludes = _excludes(raw)
    used = [False] * len(excludes)

    cells: list[Cell] = []
    seen: set[str] = set()
    for regime in regimes:
        combos = itertools.product(attacks, defenses, regime.fractions, regime.alphas, seeds)
        for attack, defense, fraction, alpha, seed in combos:
            clean = attack["name"] == "none"
            if clean and fraction != regime.fractions[0]:
                continue  # the clean baseline does not depend on the fraction
            coordinates = {
                "attack": _label(attack),
                "defense": _label(defense),
                "regime": regime.label,
                "fraction": 0.0 if clean else fraction,
                "alpha": alpha,
            }
            hits = [i for i, rule in enumerate(excludes) if _matches(rule, coordinates)]
            if hits:
                for i in hits:
                    used[i] = True
                continue
            cell = _cell(
                regime.base, attack, defense, 0.0 if clean else fraction, alpha, seed, regime.label
            )
            if cell.id in seen:
                raise GridError(f"cell {cell.id} appears twice; give the repeated entry a label")
            seen.add(cell.id)
            cells.append(cell)
    for index, was_used in enumerate(used):
        if not was_used:  # a typo would otherwise silently exclude nothing
            raise GridError(f"exclude[{index}]: {dict(excludes[index])} matches no cell")
    cells.sort(key=lambda c: c.fraction != 0.0)  # clean baselines first (stable)
    return Grid(name=name, cells=tuple(cells), source=source)


#: Keys of an ``[[exclude]]`` table: cell coordinates, each a value or a list of values.
EXCLUDE_KEYS = ("attack", "defense", "regime", "fraction", "alpha")


def _excludes(raw: Mapping[str, Any]) -> list[dict[str, list[Any]]]:
    """The ``[[exclude]]`` tables: each drops the cells matching all of its keys."""
    entries = raw.get("exclude", [])
    if not isinstance(entries, list):
        raise GridError("exclude: must be [[exclude]] tables")
    out: list[dict[str, list[Any]]] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not entry:
            raise GridError(f"exclude[{index}]: must be a table of {', '.join(EXCLUDE_KEYS)}")
        extra = set(entry) - set(EXCLUDE_KEYS)
        if extra:
            raise GridError(
                f"exclude[{index}]: unknown key(s) {sorted(extra)}; "
                f"valid: {', '.join(EXCLUDE_KEYS)}"
            )
        rule: dict[str, list[Any]] = {}
        for key, value in entry.items():
            values = value if isinstance(value, list) else [value]
            numeric = key in ("fraction", "alpha")
            if not values or any(
                isinstance(v, bool) or not isinstance(v, (int, float) if numeric else str)
                for v in values
            ):
                kind = "number" if numeric else "label"
                raise GridError(f"exclude[{index}].{key}: must be a {kind} or a list of them")
            rule[key] = [float(v) if numeric else v for v in values]
        out.append(rule)
    return out


def _matches(rule: Mapping[str, list[Any]], coordinates: Mapping[str, Any]) -> bool:
    return all(coordinates[key] in values for key, values in rule.items())


@dataclass(frozen=True)
class _Regime:
    """A ``[[regime]]``: its label, axes, and ``[base]`` with its overrides merged in."""

    label: str
    fractions: list[float]
    alphas: list[float]
    base: dict[str, Any]


def _regimes(
    raw: Mapping[str, Any], base: Mapping[str, Any], fractions: list[float], alphas: list[float]
) -> list[_Regime]:
    """The grid's regimes; one unnamed regime (``[base]`` as is) when it lists none."""
    if "regime" not in raw:
        return [_Regime("", fractions, alphas, dict(base))]
    entries = raw["regime"]
    if not isinstance(entries, list) or not entries:
        raise GridError("regime: must be one or more [[regime]] tables")
    valid = {"label", *REGIME_AXES, *REGIME_SECTIONS}
    out: list[_Regime] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise GridError(f"regime[{index}]: must be a table")
        label = entry.get("label")
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", label):
            raise GridError(
                f"regime[{index}].label: needed, letters, digits, '.', '_', '+', '-', got {label!r}"
            )
        where = f"regime {label}"
        if any(r.label == label for r in out):
            raise GridError(f"{where}: label is used twice")
        extra = set(entry) - valid
        if extra:
            hint = " (the attack comes from [[attack]])" if "attack" in extra else ""
            raise GridError(
                f"{where}: unknown key(s) {sorted(extra)}{hint}; valid: label, "
                f"{', '.join(REGIME_AXES)} and the config sections {', '.join(REGIME_SECTIONS)}"
            )
        overrides = {k: v for k, v in entry.items() if k in REGIME_SECTIONS}
        for section, table in overrides.items():
            if not isinstance(table, Mapping):
                raise GridError(
                    f"{where}: {section} must be a table such as {section} = {{ ... }}, "
                    f"got {table!r}"
                )
            for key in table:
                if (section, key) in REGIME_FORBIDDEN:
                    raise GridError(
                        f"{where}: {section}.{key} is set per cell from "
                        f"{REGIME_FORBIDDEN[(section, key)]}; remove it"
                    )
        own_fractions = _numbers(entry, "fractions", fractions, float, f"{where}: fractions")
        own_alphas = _numbers(entry, "alphas", alphas, float, f"{where}: alphas")
        _check_fractions(own_fractions, f"{where}: fractions")
        merged = _deep_merge(base, overrides)
        try:  # a bad override fails here, named by its regime, not in every cell
            parse_config({k: v for k, v in merged.items() if k not in ("attack", "aggregation")})
        except ConfigError as err:
            raise GridError(f"{where}: {err}") from None
        out.append(_Regime(label, own_fractions, own_alphas, merged))
    return out


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: tables key by key, any other value replaced."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _check_fractions(fractions: list[float], where: str) -> None:
    if any(not 0 < f < 1 for f in fractions):
        raise GridError(
            f'{where}: each must be in (0, 1) (the clean baseline is attack "none"), '
            f"got {fractions}"
        )


def _cell(
    base: Mapping[str, Any],
    attack: Mapping[str, Any],
    defense: Mapping[str, Any],
    fraction: float,
    alpha: float,
    seed: int,
    regime: str = "",
) -> Cell:
    attack_label, defense_label = _label(attack), _label(defense)
    where = f"cell {attack_label} x {defense_label}" + (f" in regime {regime}" if regime else "")
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
    # Every checkpoint holds the rule's state, and a history-keeping rule's state grows
    # with the clients (198 reputation cells kept 15 GB over 30 rounds): a cell keeps
    # round 0 and its newest round, enough to resume, unless the grid says otherwise.
    raw["experiment"].setdefault("keep_checkpoints", 1)
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
    # The regime enters the id only when the grid has regimes: older grids keep their ids.
    name = f"{attack_label}__{defense_label}" + (f"__{regime}" if regime else "")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    cell_id = f"{slug}__m{fraction:g}_a{alpha:g}_s{seed}__{digest[:8]}"
    config = config.replace("experiment", name=cell_id)
    return Cell(cell_id, attack_label, defense_label, fraction, alpha, seed, config, regime)


def _identity(config: ExperimentConfig) -> dict[str, Any]:
    """What a cell's id hashes: the config, less keys added later at their defaults.

    A key added to the schema must not rename the cells of every existing
    grid (a results folder matches its grid by cell ids): ``client.train_fn``
    enters the hash only when set.
    """
    described = config.to_dict()
    if not described["client"].get("train_fn"):
        described["client"].pop("train_fn", None)
    # How many checkpoints stay on disk changes no result: hashed at its old default.
    described["experiment"]["keep_checkpoints"] = 0
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


def _numbers(
    head: Mapping[str, Any], key: str, default: list[Any], kind: type, where: str = ""
) -> list[Any]:
    where = where or f"grid.{key}"
    values = head.get(key, default)
    if (
        not isinstance(values, list)
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values)
        or (kind is int and any(not isinstance(v, int) for v in values))
    ):
        raise GridError(f"{where}: must be a non-empty list of {kind.__name__}s, got {values!r}")
    if len(set(values)) != len(values):
        raise GridError(f"{where}: lists a value twice ({values})")
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
