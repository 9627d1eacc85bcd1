"""Reports of a benchmark grid: Markdown and a self-contained HTML page.

:func:`write_report` reads a results folder (:mod:`fedsec.bench.store`) and
writes into it (or ``out_dir``)::

    report.md            tables, and figures referenced as figures/<name>.png
    report.html          the same tables, figures embedded: opens offline
    figures/<name>.png   accuracy curves, accuracy-drop heatmaps, accuracy vs fraction

The numbers are computed once, by :func:`summarize`, into a :class:`Summary`
that both renderers and :func:`make_figures` read. Only finished cells count;
unfinished ones are named as missing. A *setting* is a (malicious fraction,
Dirichlet alpha) pair of the attacked cells; a defense's clean baseline in a
setting is its attack-``none`` cell with the same alpha. Values are means over
seeds, with the sample standard deviation when more than one seed finished.
"""

from __future__ import annotations

import base64
import html
import io
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsec.checkpoint import atomic_write_bytes

from .store import CellResult, ResultsStore

__all__ = [
    "CLEAN",
    "Summary",
    "figure_captions",
    "make_figures",
    "render_html",
    "render_markdown",
    "setting_label",
    "summarize",
    "write_report",
]

#: The attack label of the clean baseline cells.
CLEAN = "none"
#: Placeholder for a value no finished cell provides.
NA = "–"
_NUMERIC = re.compile(rf"^([-+]?\d|{NA}$)")
FIGURES = "figures"

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


# ---- the document, shared by both renderers -------------------------------------------------


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Text:
    text: str


@dataclass
class _Codes:
    """A bullet list of identifiers."""

    items: list[str]


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]

    def numeric(self) -> list[bool]:
        """Per column, whether every body cell is a number (right-aligned) or missing."""
        return [
            i > 0 and all(_NUMERIC.match(row[i]) for row in self.rows)
            for i in range(len(self.header))
        ]


@dataclass
class _Figure:
    name: str
    caption: str


_Block = _Heading | _Text | _Codes | _Table | _Figure


def setting_label(setting: Setting) -> str:
    """``"fraction 0.2, alpha 0.5"``."""
    return f"fraction {setting[0]:g}, alpha {setting[1]:g}"


def _slug(setting: Setting) -> str:
    return f"m{setting[0]:g}_a{setting[1]:g}"


def figure_captions(summary: Summary) -> dict[str, str]:
    """The figures a summary gets, name to caption, in report order.

    Per setting an accuracy-curve figure and (with attacks) an accuracy-drop
    heatmap, suffixed with the setting when there are several; an
    accuracy-vs-fraction figure only when the grid has more than one fraction.
    """
    captions: dict[str, str] = {}
    several = len(summary.settings) > 1
    for setting in summary.settings:
        suffix = f"_{_slug(setting)}" if several else ""
        label = setting_label(setting)
        captions[f"accuracy_curves{suffix}"] = (
            f"Test accuracy over rounds, one panel per attack ({label}), mean over seeds."
        )
        if summary.attacks:
            captions[f"accuracy_drop{suffix}"] = (
                f"Accuracy drop from the clean baseline, in points ({label})."
            )
    if len(summary.fractions) > 1:
        captions["accuracy_vs_fraction"] = (
            "Worst-case final accuracy over attacks against the malicious fraction "
            "(fraction 0: the clean baseline)."
        )
    return captions


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _signed_points(value: float) -> str:
    return f"{round(100 * value, 1) + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0


def _value(summary: Summary, key: Key) -> str:
    """``93.3``; ``41.2 (-52.1)`` attacked (change in points); `` ± 1.2`` with several seeds."""
    if key not in summary.accuracy:
        return NA
    text = _pct(summary.accuracy[key])
    if key in summary.drop:
        text += f" ({_signed_points(-summary.drop[key])})"
    if key in summary.accuracy_std:
        text += f" ± {_pct(summary.accuracy_std[key])}"
    return text


def _column(attack: str) -> str:
    return "clean" if attack == CLEAN else attack


def _document(summary: Summary, figures: Sequence[str]) -> tuple[str, list[_Block]]:
    title = f"Benchmark report: {summary.name}"
    seeds = ", ".join(str(s) for s in summary.seeds)
    fractions = ", ".join(f"{f:g}" for f in summary.fractions)
    alphas = ", ".join(f"{a:g}" for a in summary.alphas)
    blocks: list[_Block] = [
        _Text(
            f"{summary.num_clients} clients, {summary.rounds} rounds, seeds {seeds}; "
            f"malicious fractions {fractions}; Dirichlet alphas {alphas}. "
            f"Defenses: {', '.join(summary.defenses)}. "
            f"Attacks: {', '.join(summary.attacks) or 'none (clean baselines only)'}."
        ),
        _Text(
            f"Cells finished: {summary.finished_cells}/{summary.total_cells}. "
            "Values are final-round test accuracy, mean over the finished seeds"
            + (" ± sample standard deviation" if len(summary.seeds) > 1 else "")
            + "; in parentheses the change from the defense's clean baseline, in points."
        ),
    ]
    if summary.missing:
        blocks.append(
            _Text(f"Missing (unfinished) cells, left out of every number ({len(summary.missing)}):")
        )
        blocks.append(_Codes(list(summary.missing)))
    captions = figure_captions(summary)
    several = len(summary.settings) > 1

    for setting in summary.settings:
        blocks.append(_Heading(2, f"Setting: malicious {setting_label(setting)}"))
        blocks.append(_Heading(3, "Final accuracy (%)"))
        columns = [CLEAN, *summary.attacks]
        rows = []
        for defense in summary.defenses:
            row = [defense] + [_value(summary, (setting, defense, a)) for a in columns]
            worst = summary.worst.get((setting, defense))
            row.append(f"{_pct(worst[0])} ({worst[1]})" if worst else NA)
            rows.append(row)
        blocks.append(_Table(["defense", *map(_column, columns), "worst case"], rows))

        ranked = sorted(
            (d for d in summary.defenses if (setting, d) in summary.worst),
            key=lambda d: -summary.worst[(setting, d)][0],
        )
        if ranked:
            blocks.append(_Heading(3, "Worst case"))
            blocks.append(
                _Text(
                    "Choose a defense by its worst case: the adversary picks the attack, so "
                    "the lowest accuracy over the attacks is what a defense guarantees."
                )
            )
            worst_rows = []
            for rank, defense in enumerate(ranked, 1):
                accuracy, attack = summary.worst[(setting, defense)]
                worst_rows.append(
                    [
                        str(rank),
                        defense,
                        _pct(accuracy),
                        attack,
                        _value(summary, (setting, defense, CLEAN)),
                    ]
                )
            blocks.append(
                _Table(
                    ["rank", "defense", "worst-case accuracy (%)", "attack", "clean (%)"],
                    worst_rows,
                )
            )

        backdoors = [
            a
            for a in summary.backdoor_attacks
            if any((setting, d, a) in summary.asr for d in summary.defenses)
        ]
        if backdoors:
            blocks.append(_Heading(3, "Attack success rate (%)"))
            blocks.append(
                _Text("Final-round backdoor success on triggered test images; lower is better.")
            )
            asr_rows = []
            for defense in summary.defenses:
                cells = []
                for attack in backdoors:
                    key = (setting, defense, attack)
                    text = _pct(summary.asr[key]) if key in summary.asr else NA
                    if key in summary.asr_std:
                        text += f" ± {_pct(summary.asr_std[key])}"
                    cells.append(text)
                asr_rows.append([defense, *cells])
            blocks.append(_Table(["defense", *backdoors], asr_rows))

        detected = [
            a
            for a in [CLEAN, *summary.attacks]
            if any((setting, d, a) in summary.detection for d in summary.defenses)
        ]
        if detected:
            blocks.append(_Heading(3, "Detection (precision / recall, %)"))
            blocks.append(
                _Text(
                    "Of the clients a defense excluded, the share that were malicious "
                    "(precision), and of the malicious, the share excluded (recall); mean "
                    "over the rounds that recorded them."
                )
            )
            det_rows = []
            for defense in summary.defenses:
                cells = []
                for attack in detected:
                    pair = summary.detection.get((setting, defense, attack))
                    if pair is None:
                        cells.append(NA)
                    else:
                        cells.append(" / ".join(NA if v is None else _pct(v) for v in pair))
                det_rows.append([defense, *cells])
            blocks.append(_Table(["defense", *map(_column, detected)], det_rows))

        suffix = f"_{_slug(setting)}" if several else ""
        for name in (f"accuracy_curves{suffix}", f"accuracy_drop{suffix}"):
            if name in figures and name in captions:
                blocks.append(_Figure(name, captions[name]))

    if several and summary.worst_overall:
        blocks.append(_Heading(2, "Worst case over all settings"))
        overall = sorted(summary.worst_overall.items(), key=lambda item: -item[1][0])
        blocks.append(
            _Table(
                ["rank", "defense", "worst-case accuracy (%)", "attack", "setting"],
                [
                    [str(rank), defense, _pct(acc), attack, setting_label(setting)]
                    for rank, (defense, (acc, attack, setting)) in enumerate(overall, 1)
                ],
            )
        )
    if "accuracy_vs_fraction" in figures:
        blocks.append(_Heading(2, "Accuracy against malicious fraction"))
        blocks.append(_Figure("accuracy_vs_fraction", captions["accuracy_vs_fraction"]))
    return title, blocks


def render_markdown(summary: Summary, figures: dict[str, str]) -> str:
    """The report as Markdown.

    Parameters
    ----------
    summary : Summary
        From :func:`summarize`.
    figures : dict of str to str
        Figure name (see :func:`figure_captions`) to the path the Markdown
        links, e.g. ``"figures/accuracy_drop.png"``; figures not given are left out.

    Returns
    -------
    str
        The Markdown text.
    """
    title, blocks = _document(summary, list(figures))
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, _Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Text):
            lines += [block.text, ""]
        elif isinstance(block, _Codes):
            lines += [f"- `{item}`" for item in block.items] + [""]
        elif isinstance(block, _Table):
            lines.append(_md_row(block.header))
            lines.append("|" + "|".join("---:" if n else "---" for n in block.numeric()) + "|")
            lines += [_md_row(row) for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.name}]({figures[block.name]})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 72em; padding: 0 1em; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f2f2f2; }
td { text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
code { font-size: 0.9em; }
"""


def render_html(summary: Summary, figures_png: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page (figures embedded, no external resources).

    Parameters
    ----------
    summary : Summary
        From :func:`summarize`.
    figures_png : dict of str to bytes
        Figure name to PNG bytes (:func:`make_figures`); each is embedded as a data URI.

    Returns
    -------
    str
        The HTML text.
    """
    title, blocks = _document(summary, list(figures_png))
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, _Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, _Text):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, _Codes):
            items = "".join(f"<li><code>{esc(item)}</code></li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, _Table):
            head = "".join(f"<th>{esc(cell)}</th>" for cell in block.header)
            tags = ['<td class="num">' if n else "<td>" for n in block.numeric()]
            body = "".join(
                "<tr>"
                + "".join(f"{tag}{esc(cell)}</td>" for tag, cell in zip(tags, row, strict=True))
                + "</tr>"
                for row in block.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(figures_png[block.name]).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.caption)}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ---- figures -----------------------------------------------------------------------------


def make_figures(summary: Summary) -> dict[str, bytes]:
    """Draw the report's figures (names as in :func:`figure_captions`) as PNG bytes.

    Parameters
    ----------
    summary : Summary
        From :func:`summarize`.

    Returns
    -------
    dict of str to bytes
        Figure name to PNG bytes, in report order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, bytes] = {}
    several = len(summary.settings) > 1
    for setting in summary.settings:
        suffix = f"_{_slug(setting)}" if several else ""
        figures[f"accuracy_curves{suffix}"] = _curves_figure(plt, summary, setting)
        if summary.attacks:
            figures[f"accuracy_drop{suffix}"] = _drop_figure(plt, summary, setting)
    if len(summary.fractions) > 1:
        figures["accuracy_vs_fraction"] = _fraction_figure(plt, summary)
    return figures


def _png(plt: Any, fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _curves_figure(plt: Any, summary: Summary, setting: Setting) -> bytes:
    from matplotlib.ticker import MaxNLocator

    attacks = [CLEAN, *summary.attacks]
    ncols = min(3, len(attacks))
    nrows = -(-len(attacks) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), sharey=True, squeeze=False
    )
    for index, ax in enumerate(axes.flat):
        if index >= len(attacks):
            ax.set_visible(False)
            continue
        attack = attacks[index]
        for defense in summary.defenses:
            curve = summary.curves.get((setting, defense, attack))
            if curve:
                ax.plot(
                    [r for r, _ in curve],
                    [100 * a for _, a in curve],
                    marker="o",
                    ms=3,
                    label=defense,
                )
        ax.set_title(_column(attack))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{summary.name}: {setting_label(setting)}")
    return _png(plt, fig)


def _drop_figure(plt: Any, summary: Summary, setting: Setting) -> bytes:
    import numpy as np

    values = np.full((len(summary.defenses), len(summary.attacks)), np.nan)
    for i, defense in enumerate(summary.defenses):
        for j, attack in enumerate(summary.attacks):
            drop = summary.drop.get((setting, defense, attack))
            if drop is not None:
                values[i, j] = 100 * drop
    vmin = min(0.0, float(np.nanmin(values, initial=0.0)))
    vmax = max(1.0, float(np.nanmax(values, initial=0.0)))
    fig, ax = plt.subplots(
        figsize=(max(4.5, 2.0 + 1.2 * len(summary.attacks)), 1.6 + 0.5 * len(summary.defenses))
    )
    image = ax.imshow(values, cmap="Reds", aspect="auto", vmin=vmin, vmax=vmax)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            value = values[i, j]
            text = NA if np.isnan(value) else f"{value:.1f}"
            dark = not np.isnan(value) and value > vmin + 0.6 * (vmax - vmin)
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize="small",
                color="white" if dark else "black",
            )
    rotation = 30 if len(summary.attacks) > 4 else 0
    ax.set_xticks(
        range(len(summary.attacks)),
        summary.attacks,
        rotation=rotation,
        ha="right" if rotation else "center",
    )
    ax.set_yticks(range(len(summary.defenses)), summary.defenses)
    ax.set_title(f"accuracy drop (points)\n{setting_label(setting)}")
    fig.colorbar(image, ax=ax)
    return _png(plt, fig)


def _fraction_figure(plt: Any, summary: Summary) -> bytes:
    alphas = summary.alphas
    fig, axes = plt.subplots(
        1, len(alphas), figsize=(5 * len(alphas), 3.6), sharey=True, squeeze=False
    )
    for ax, alpha in zip(axes.flat, alphas, strict=True):
        for defense in summary.defenses:
            points = []
            clean = [
                summary.accuracy[(s, defense, CLEAN)]
                for s in summary.settings
                if s[1] == alpha and (s, defense, CLEAN) in summary.accuracy
            ]
            if clean and 0.0 not in summary.fractions:
                points.append((0.0, clean[0]))
            for setting in summary.settings:
                if setting[1] == alpha and (setting, defense) in summary.worst:
                    points.append((setting[0], summary.worst[(setting, defense)][0]))
            if points:
                ax.plot(
                    [f for f, _ in points], [100 * a for _, a in points], marker="o", label=defense
                )
        ax.set_title(f"alpha {alpha:g}")
        ax.set_xlabel("malicious fraction")
        ax.set_ylabel("worst-case test accuracy (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{summary.name}: worst case over attacks")
    return _png(plt, fig)


# ---- the files ---------------------------------------------------------------------------


def write_report(results_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` for a results folder.

    Parameters
    ----------
    results_dir : str or Path
        A grid's results folder (:class:`fedsec.bench.store.ResultsStore`).
    out_dir : str or Path, optional
        Where to write; defaults to ``results_dir``.

    Returns
    -------
    (Path, Path)
        The Markdown and HTML reports.

    Raises
    ------
    ValueError
        If no cell has finished (:class:`fedsec.bench.store.StoreError`, a
        ValueError, if the folder is not a results folder).
    """
    store = ResultsStore.open(results_dir)
    results = store.results()
    if not any(r.finished for r in results):
        raise ValueError(f"{store.path}: no finished cell to report on; run the grid first")
    summary = summarize(results, name=store.name)
    pngs = make_figures(summary)
    out = Path(out_dir) if out_dir is not None else store.path
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        atomic_write_bytes(out / FIGURES / f"{name}.png", png)
    markdown = render_markdown(summary, {name: f"{FIGURES}/{name}.png" for name in pngs})
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, markdown.encode("utf-8"))
    atomic_write_bytes(html_path, render_html(summary, pngs).encode("utf-8"))
    return md_path, html_path
