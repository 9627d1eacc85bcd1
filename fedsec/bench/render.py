"""Renderers of a benchmark report: Markdown, and a self-contained HTML page.

Both render one document (headings, text, identifier lists, tables, figures)
built from a :class:`~fedsec.bench.summary.Summary`, so the two cannot
disagree; the HTML embeds the figures and opens offline.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .figures import figure_captions
from .summary import CLEAN, NA, Key, Setting, Summary, _column, _slug, setting_label

__all__ = ["render_html", "render_markdown"]

_NUMERIC = re.compile(rf"^([-+]?\d|{NA}$)")

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


def _drop_text(summary: Summary, setting: Setting, defense: str, accuracy: float) -> str:
    """Points lost from the defense's clean baseline in ``setting`` (``–`` without one)."""
    clean = summary.accuracy.get((setting, defense, CLEAN))
    return NA if clean is None else f"{round(100 * (clean - accuracy), 1) + 0.0:.1f}"


def _worst_blocks(
    summary: Summary, settings: Sequence[Setting], where: str, show_setting: bool
) -> list[_Block]:
    """A worst-case table over ``settings``, best first, and the sentence naming the best.

    Each defense's row is its lowest mean final accuracy over the attacks and
    ``settings``, the attack and setting achieving it, and the clean baseline
    of that setting with the drop from it.
    """
    worst = summary.worst_over(settings)
    ranked = sorted(worst, key=lambda d: -worst[d][0])
    if not ranked:
        return []
    rows = []
    for rank, defense in enumerate(ranked, 1):
        accuracy, attack, setting = worst[defense]
        row = [str(rank), defense, _pct(accuracy), attack]
        if show_setting:
            row.append(setting_label(setting))
        row += [
            _value(summary, (setting, defense, CLEAN)),
            _drop_text(summary, setting, defense, accuracy),
        ]
        rows.append(row)
    header = ["rank", "defense", "worst-case accuracy (%)", "attack"]
    header += ["setting"] if show_setting else []
    header += ["clean (%)", "drop (points)"]
    defense, accuracy, attack, setting = summary.best(settings)
    clean = summary.accuracy.get((setting, defense, CLEAN))
    against = (
        f", against {_pct(clean)}% clean "
        f"(a drop of {_drop_text(summary, setting, defense, accuracy)} points)"
        if clean is not None
        else " (no clean baseline finished)"
    )
    at = f" ({setting_label(setting)})" if show_setting else ""
    sentence = f"Best worst case {where}: {defense}, {_pct(accuracy)}% under {attack}{at}{against}."
    return [_Table(header, rows), _Text(sentence)]


def _setting_heading(setting: Setting) -> str:
    text = f"malicious fraction {setting.fraction:g}, alpha {setting.alpha:g}"
    return f"Setting: regime {setting.regime}, {text}" if setting.regime else f"Setting: {text}"


def _document(summary: Summary, figures: Sequence[str]) -> tuple[str, list[_Block]]:
    title = f"Benchmark report: {summary.name}"
    seeds = ", ".join(str(s) for s in summary.seeds)
    fractions = ", ".join(f"{f:g}" for f in summary.fractions)
    alphas = ", ".join(f"{a:g}" for a in summary.alphas)
    blocks: list[_Block] = [
        _Text(
            (
                ""
                if summary.has_regimes
                else f"{summary.num_clients} clients, {summary.rounds} rounds, "
            )
            + f"seeds {seeds}; "
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
    if summary.has_regimes:
        shapes = ", ".join(
            f"{regime} ({clients} clients, {rounds} rounds)"
            for regime, (clients, rounds) in summary.regime_shape.items()
        )
        blocks.append(_Text(f"Regimes (see the grid file for each one's overrides): {shapes}."))
    if summary.missing:
        blocks.append(
            _Text(f"Missing (unfinished) cells, left out of every number ({len(summary.missing)}):")
        )
        blocks.append(_Codes(list(summary.missing)))
    captions = figure_captions(summary)
    several = len(summary.settings) > 1

    for setting in summary.settings:
        blocks.append(_Heading(2, _setting_heading(setting)))
        blocks.append(_Heading(3, "Final accuracy (%)"))
        columns = [CLEAN, *summary.attacks]
        rows = []
        for defense in summary.defenses:
            row = [defense] + [_value(summary, (setting, defense, a)) for a in columns]
            worst = summary.worst.get((setting, defense))
            row.append(f"{_pct(worst[0])} ({worst[1]})" if worst else NA)
            rows.append(row)
        blocks.append(_Table(["defense", *map(_column, columns), "worst case"], rows))
        if summary.references:
            names = ", ".join(summary.references)
            verb = "is a reference" if len(summary.references) == 1 else "are references"
            blocks.append(
                _Text(
                    f"{names} {verb}, not an attack: the malicious clients send nothing, so "
                    "the defense aggregates the honest clients alone (what a perfect defense "
                    "could reach with their data); left out of every worst case."
                )
            )

        worst_blocks = _worst_blocks(summary, [setting], "in this setting", show_setting=False)
        if worst_blocks:
            blocks.append(_Heading(3, "Worst case"))
            blocks.append(
                _Text(
                    "Choose a defense by its worst case: the adversary picks the attack, so "
                    "the lowest accuracy over the attacks is what a defense guarantees."
                )
            )
            blocks += worst_blocks

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

    if summary.has_regimes:
        for regime in summary.regimes:
            own = [s for s in summary.settings if s.regime == regime]
            regime_blocks = _worst_blocks(summary, own, f"in {regime}", show_setting=True)
            if len(own) > 1 and regime_blocks:
                blocks.append(_Heading(2, f"Worst case in regime {regime}"))
                blocks += regime_blocks
    if several and summary.worst_overall:
        blocks.append(_Heading(2, "Worst case over all settings"))
        blocks += _worst_blocks(summary, summary.settings, "overall", show_setting=True)
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
