"""The numbers of a benchmark report, computed once from a results folder.

:func:`summarize` turns a store's cell results (:mod:`fedsec.bench.store`)
into a :class:`Summary` that the renderers (:mod:`fedsec.bench.render`) and
the figures (:mod:`fedsec.bench.figures`) read. Only finished cells count;
unfinished ones are named as missing. A *setting* is a (malicious fraction,
Dirichlet alpha) pair of the attacked cells, the axes along which robust
aggregation is usually evaluated (e.g. Shejwalkar and Houmansadr, NDSS 2021;
Karimireddy et al., ICLR 2022); a defense's clean baseline in a setting is its
attack-``none`` cell with the same alpha. Values are means over seeds, with
the sample standard deviation when more than one seed finished.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from .store import CellResult

__all__ = ["CLEAN", "Key", "Setting", "Summary", "setting_label", "summarize"]

#: The attack label of the clean baseline cells.
CLEAN = "none"
#: Placeholder for a value no finished cell provides.
NA = "–"

Setting = tuple[float, float]  # (malicious fraction, Dirichlet alpha)
Key = tuple[Setting, str, str]  # (setting, defense, attack)


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
    backdoor_attacks : list of str
        The attacks whose cells report an attack success rate.
    settings : list of (float, float)
        Sorted (fraction, alpha) pairs of the attacked cells; ``(0.0, alpha)``
        per alpha for a grid with only clean cells.
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
    accuracy: dict[Key, float] = field(default_factory=dict)
    accuracy_std: dict[Key, float] = field(default_factory=dict)
    drop: dict[Key, float] = field(default_factory=dict)
    worst: dict[tuple[Setting, str], tuple[float, str]] = field(default_factory=dict)
    worst_overall: dict[str, tuple[float, str, Setting]] = field(default_factory=dict)
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
        return sorted({fraction for fraction, _ in self.settings})

    @property
    def alphas(self) -> list[float]:
        """The Dirichlet alphas of the settings, sorted."""
        return sorted({alpha for _, alpha in self.settings})


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
    attacked = [c for c in cells if c["attack"] != CLEAN]
    if attacked:
        settings = sorted({(float(c["fraction"]), float(c["alpha"])) for c in attacked})
    else:
        settings = sorted({(0.0, float(c["alpha"])) for c in cells})
    summary = Summary(
        name=name,
        num_clients=int(cells[0]["num_clients"]),
        rounds=int(cells[0]["rounds"]),
        seeds=sorted({int(c["seed"]) for c in cells}),
        defenses=defenses,
        attacks=attacks,
        backdoor_attacks=[],
        settings=settings,
        missing=[r.cell["id"] for r in results if not r.finished],
        total_cells=len(results),
    )

    # Group the finished cells by (setting, defense, attack) over seeds; the clean
    # baseline of an alpha goes under every setting with that alpha.
    groups: dict[Key, list[CellResult]] = {}
    for result in results:
        if not result.finished:
            continue
        cell = result.cell
        alpha = float(cell["alpha"])
        if cell["attack"] == CLEAN:
            keys = [(s, cell["defense"], CLEAN) for s in settings if s[1] == alpha]
        else:
            keys = [((float(cell["fraction"]), alpha), cell["defense"], cell["attack"])]
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
                if (setting, defense, attack) in summary.accuracy
            ]
            if scores:
                summary.worst[(setting, defense)] = min(scores, key=lambda s: s[0])
    for defense in defenses:
        overall = [
            (*summary.worst[(setting, defense)], setting)
            for setting in settings
            if (setting, defense) in summary.worst
        ]
        if overall:
            summary.worst_overall[defense] = min(overall, key=lambda w: w[0])
    return summary


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


def setting_label(setting: Setting) -> str:
    """``"fraction 0.2, alpha 0.5"``."""
    return f"fraction {setting[0]:g}, alpha {setting[1]:g}"


def _slug(setting: Setting) -> str:
    return f"m{setting[0]:g}_a{setting[1]:g}"


def _column(attack: str) -> str:
    return "clean" if attack == CLEAN else attack
