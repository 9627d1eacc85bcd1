"""The numbers of a benchmark report, computed once from a results folder.

:func:`summarize` turns a store's cell results (:mod:`fedsec.bench.store`)
into a :class:`Summary` that the renderers (:mod:`fedsec.bench.render`) and
the figures (:mod:`fedsec.bench.figures`) read. Only finished cells count;
unfinished ones are named as missing. A *setting* is a (malicious fraction,
Dirichlet alpha) pair of the attacked cells, and their regime when the grid
has regimes, the axes along which robust aggregation is usually evaluated
(e.g. Shejwalkar and Houmansadr, NDSS 2021; Karimireddy et al., ICLR 2022); a
defense's clean baseline in a setting is its attack-``none`` cell with the
same alpha and regime. Values are means over seeds, with the sample standard
deviation when more than one seed finished.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .store import CellResult

__all__ = ["CLEAN", "Key", "Setting", "Summary", "setting_label", "summarize"]

#: The attack label of the clean baseline cells.
CLEAN = "none"
#: Placeholder for a value no finished cell provides.
NA = "–"


class Setting(tuple[Any, ...]):
    """Where a defense is evaluated: ``(fraction, alpha)``, or ``(fraction, alpha, regime)``.

    Without a regime the setting is (and equals, and hashes as) the plain pair,
    so the numbers of a grid without regimes are keyed as they always were.
    """

    def __new__(cls, fraction: float, alpha: float, regime: str = "") -> Setting:
        values = (
            (float(fraction), float(alpha), regime) if regime else (float(fraction), float(alpha))
        )
        return super().__new__(cls, values)

    @property
    def fraction(self) -> float:
        """The malicious fraction (0 for a grid of clean cells only)."""
        return float(self[0])

    @property
    def alpha(self) -> float:
        """The Dirichlet alpha."""
        return float(self[1])

    @property
    def regime(self) -> str:
        """The regime's label; ``""`` when the grid has none."""
        return str(self[2]) if len(self) > 2 else ""


# (setting, defense, attack); a plain (fraction, alpha) pair indexes as its Setting.
Key = tuple[tuple[Any, ...], str, str]


@dataclass
class Summary:
    """Everything a report shows, computed once by :func:`summarize`.

    Accuracies and rates are fractions in [0, 1]; the renderers print percent.

    Attributes
    ----------
    name : str
        The grid's name.
    num_clients, rounds : int
        Clients and rounds of the cells (of the first cell).
    seeds : list of int
        Every seed of the grid.
    defenses : list of str
        Defense labels in grid order (first appearance).
    attacks : list of str
        Attack labels in grid order, without the clean baseline ``"none"``.
    references : list of str
        The labels among ``attacks`` that are references, not attacks
        (``abstain``: the honest clients alone, what a perfect defense could
        reach); shown beside the attacks, left out of every worst case.
    backdoor_attacks : list of str
        The attacks whose cells report an attack success rate.
    settings : list of Setting
        The settings of the attacked cells, by regime (grid order), then
        fraction and alpha; ``(0.0, alpha)`` per alpha and regime for a grid
        with only clean cells.
    regimes : list of str
        Regime labels in grid order; ``[""]`` for a grid without regimes.
    regime_shape : dict
        ``regime -> (num_clients, rounds)`` of its first cell.
    accuracy, accuracy_std : dict
        ``(setting, defense, attack) ->`` final test accuracy, mean and sample
        std over the finished seeds (std only with more than one). The clean
        baseline appears under every setting with its alpha, as attack ``"none"``.
    drop : dict
        ``(setting, defense, attack) ->`` clean minus attacked mean accuracy.
    worst : dict
        ``(setting, defense) -> (accuracy, attack)``: the lowest mean final
        accuracy over the setting's attacks (the clean baseline excluded).
    worst_overall : dict
        ``defense -> (accuracy, attack, setting)``: the lowest over all settings.
    worst_by_regime : dict
        ``regime -> {defense -> (accuracy, attack, setting)}``: the lowest over
        the regime's settings.
    asr, asr_std : dict
        ``(setting, defense, attack) ->`` final attack success rate.
    detection : dict
        ``(setting, defense, attack) -> (precision, recall)``: each the mean
        over the rounds that recorded it, then over seeds; None when only the
        other was recorded. Present only where either was recorded.
    curves : dict
        ``(setting, defense, attack) -> [(round, accuracy), ...]``, mean over seeds.
    missing : list of str
        Ids of the cells that have not finished.
    total_cells : int
        Cells in the grid.
    """

    name: str
    num_clients: int
    rounds: int
    seeds: list[int]
    defenses: list[str]
    attacks: list[str]
    backdoor_attacks: list[str]
    settings: list[Setting]
    references: list[str] = field(default_factory=list)
    regimes: list[str] = field(default_factory=lambda: [""])
    regime_shape: dict[str, tuple[int, int]] = field(default_factory=dict)
    accuracy: dict[Key, float] = field(default_factory=dict)
    accuracy_std: dict[Key, float] = field(default_factory=dict)
    drop: dict[Key, float] = field(default_factory=dict)
    worst: dict[tuple[tuple[Any, ...], str], tuple[float, str]] = field(default_factory=dict)
    worst_overall: dict[str, tuple[float, str, Setting]] = field(default_factory=dict)
    worst_by_regime: dict[str, dict[str, tuple[float, str, Setting]]] = field(default_factory=dict)
    asr: dict[Key, float] = field(default_factory=dict)
    asr_std: dict[Key, float] = field(default_factory=dict)
    detection: dict[Key, tuple[float | None, float | None]] = field(default_factory=dict)
    curves: dict[Key, list[tuple[int, float]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    total_cells: int = 0

    @property
    def finished_cells(self) -> int:
        """Cells that completed every round."""
        return self.total_cells - len(self.missing)

    @property
    def fractions(self) -> list[float]:
        """The malicious fractions of the settings, sorted."""
        return sorted({s.fraction for s in self.settings})

    @property
    def alphas(self) -> list[float]:
        """The Dirichlet alphas of the settings, sorted."""
        return sorted({s.alpha for s in self.settings})

    @property
    def has_regimes(self) -> bool:
        """Whether the grid names its regimes (``[[regime]]`` tables)."""
        return self.regimes != [""]

    def worst_over(self, settings: Iterable[Setting]) -> dict[str, tuple[float, str, Setting]]:
        """Each defense's worst case over ``settings``.

        Returns
        -------
        dict
            ``defense -> (accuracy, attack, setting)``, in grid order: the
            lowest mean final accuracy over the attacks and ``settings`` (the
            first setting on a tie).
        """
        wanted = set(settings)
        chosen = [s for s in self.settings if s in wanted]
        out: dict[str, tuple[float, str, Setting]] = {}
        for defense in self.defenses:
            scores = [(*self.worst[(s, defense)], s) for s in chosen if (s, defense) in self.worst]
            if scores:
                out[defense] = min(scores, key=lambda w: w[0])
        return out

    def best(self, settings: Iterable[Setting] | None = None) -> tuple[str, float, str, Setting]:
        """The defense with the best worst case over ``settings`` (default: all).

        Users choose a defense by its worst case: the adversary picks the attack.

        Returns
        -------
        (str, float, str, Setting)
            The defense, its worst-case accuracy, the attack achieving it and
            the setting where it does (ties: the first defense in grid order).

        Raises
        ------
        ValueError
            If no defense has an attacked result in ``settings``.
        """
        worst = self.worst_over(self.settings if settings is None else settings)
        if not worst:
            raise ValueError("no attacked result in these settings")
        defense = max(worst, key=lambda d: worst[d][0])
        return (defense, *worst[defense])


# ---- the numbers -------------------------------------------------------------------------


def summarize(results: list[CellResult], name: str = "grid") -> Summary:
    """Compute a report's numbers from a store's results (:meth:`ResultsStore.results`).

    Parameters
    ----------
    results : list of CellResult
        Every cell of the grid, in grid order; unfinished cells are listed as missing.
    name : str
        The grid's name, for the title.

    Returns
    -------
    Summary
        Means (and sample stds) over seeds of the finished cells.

    Raises
    ------
    ValueError
        If ``results`` is empty.
    """
    if not results:
        raise ValueError("no cells to summarize")
    cells = [r.cell for r in results]
    defenses = _unique(c["defense"] for c in cells)
    attacks = _unique(c["attack"] for c in cells if c["attack"] != CLEAN)
    # Stores written before references existed have no "reference" key: all attacks.
    references = _unique(c["attack"] for c in cells if c.get("reference"))
    regimes = _unique(_regime(c) for c in cells)
    attacked = [c for c in cells if c["attack"] != CLEAN]
    if attacked:
        found = {_setting(c) for c in attacked}
    else:
        found = {Setting(0.0, c["alpha"], _regime(c)) for c in cells}
    settings = sorted(found, key=lambda s: (regimes.index(s.regime), s.fraction, s.alpha))
    summary = Summary(
        name=name,
        num_clients=int(cells[0]["num_clients"]),
        rounds=int(cells[0]["rounds"]),
        seeds=sorted({int(c["seed"]) for c in cells}),
        defenses=defenses,
        attacks=attacks,
        backdoor_attacks=[],
        settings=settings,
        references=references,
        regimes=regimes,
        regime_shape={
            regime: next(
                (int(c["num_clients"]), int(c["rounds"])) for c in cells if _regime(c) == regime
            )
            for regime in regimes
        },
        missing=[r.cell["id"] for r in results if not r.finished],
        total_cells=len(results),
    )

    # Group the finished cells by (setting, defense, attack) over seeds; the clean
    # baseline of an alpha and regime goes under every setting with those.
    groups: dict[Key, list[CellResult]] = {}
    for result in results:
        if not result.finished:
            continue
        cell = result.cell
        alpha, regime = float(cell["alpha"]), _regime(cell)
        keys: list[Key]
        if cell["attack"] == CLEAN:
            keys = [
                (s, cell["defense"], CLEAN)
                for s in settings
                if s.alpha == alpha and s.regime == regime
            ]
        else:
            keys = [(_setting(cell), cell["defense"], cell["attack"])]
        for key in keys:
            groups.setdefault(key, []).append(result)

    backdoor: set[str] = set()
    for key, group in groups.items():
        finals = [_final(r, "test_accuracy") for r in group]
        _mean_into(
            key, [v for v in finals if v is not None], summary.accuracy, summary.accuracy_std
        )
        asrs = [_final(r, "attack_success_rate") for r in group] if key[2] != CLEAN else []
        if _mean_into(key, [v for v in asrs if v is not None], summary.asr, summary.asr_std):
            backdoor.add(key[2])
        precision = _mean_of_means(group, "detection_precision")
        recall = _mean_of_means(group, "detection_recall")
        if precision is not None or recall is not None:
            summary.detection[key] = (precision, recall)
        curve = _mean_curve(group)
        if curve:
            summary.curves[key] = curve
    summary.backdoor_attacks = [a for a in attacks if a in backdoor]

    for (setting, defense, attack), value in summary.accuracy.items():
        clean = summary.accuracy.get((setting, defense, CLEAN))
        if attack != CLEAN and clean is not None:
            summary.drop[(setting, defense, attack)] = clean - value
    for setting in settings:
        for defense in defenses:
            scores = [
                (summary.accuracy[(setting, defense, attack)], attack)
                for attack in attacks
                if attack not in references and (setting, defense, attack) in summary.accuracy
            ]
            if scores:
                summary.worst[(setting, defense)] = min(scores, key=lambda s: s[0])
    summary.worst_overall = summary.worst_over(settings)
    for regime in regimes:
        own = summary.worst_over(s for s in settings if s.regime == regime)
        if own:
            summary.worst_by_regime[regime] = own
    return summary


def _regime(cell: dict[str, Any]) -> str:
    """A cell's regime label (stores written before regimes existed have none)."""
    return str(cell.get("regime") or "")


def _setting(cell: dict[str, Any]) -> Setting:
    return Setting(cell["fraction"], cell["alpha"], _regime(cell))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _final(result: CellResult, metric: str) -> float | None:
    """The metric's value in the last round that recorded it."""
    for row in reversed(result.rounds):
        if row.get(metric) is not None:
            return float(row[metric])
    return None


def _mean_into(
    key: Key, values: list[float], means: dict[Key, float], stds: dict[Key, float]
) -> bool:
    if not values:
        return False
    means[key] = statistics.fmean(values)
    if len(values) > 1:
        stds[key] = statistics.stdev(values)
    return True


def _mean_of_means(group: list[CellResult], metric: str) -> float | None:
    """Per cell the mean over the rounds that recorded ``metric``, then the mean over cells."""
    per_cell = []
    for result in group:
        values = [float(r[metric]) for r in result.rounds if r.get(metric) is not None]
        if values:
            per_cell.append(statistics.fmean(values))
    return statistics.fmean(per_cell) if per_cell else None


def _mean_curve(group: list[CellResult]) -> list[tuple[int, float]]:
    by_round: dict[int, list[float]] = {}
    for result in group:
        for row in result.rounds:
            if row.get("test_accuracy") is not None:
                by_round.setdefault(int(row["round"]), []).append(float(row["test_accuracy"]))
    return [(rnd, statistics.fmean(values)) for rnd, values in sorted(by_round.items())]


# ---- labels ----


def setting_label(setting: tuple[Any, ...]) -> str:
    """``"fraction 0.2, alpha 0.5"``; ``"regime fedsgd, fraction 0.2, alpha 0.1"`` with one."""
    setting = Setting(*setting)
    text = f"fraction {setting.fraction:g}, alpha {setting.alpha:g}"
    return f"regime {setting.regime}, {text}" if setting.regime else text


def _slug(setting: tuple[Any, ...]) -> str:
    setting = Setting(*setting)
    text = f"m{setting.fraction:g}_a{setting.alpha:g}"
    return f"{setting.regime}_{text}" if setting.regime else text


def _column(attack: str) -> str:
    return "clean" if attack == CLEAN else attack
