"""Figures of a benchmark report: accuracy curves, accuracy-drop heatmaps, worst case.

Drawn with matplotlib's Agg backend into PNG bytes from a
:class:`~fedsec.bench.summary.Summary`: per setting the test accuracy over
rounds (one panel per attack) and the accuracy drop from the clean baseline
per defense and attack, and across settings the worst-case accuracy against
the malicious fraction, the presentation of robust-aggregation evaluations
such as Shejwalkar and Houmansadr (NDSS 2021).
"""

from __future__ import annotations

import io
from typing import Any

from .summary import CLEAN, NA, Setting, Summary, _column, _slug, setting_label

__all__ = ["figure_captions", "make_figures"]


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
    """One panel per (regime, alpha): each defense's worst case against the fraction."""
    panels = list(dict.fromkeys((s.regime, s.alpha) for s in summary.settings))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 3.6), sharey=True, squeeze=False
    )
    for ax, (regime, alpha) in zip(axes.flat, panels, strict=True):
        own = [s for s in summary.settings if (s.regime, s.alpha) == (regime, alpha)]
        for defense in summary.defenses:
            points = []
            clean = [
                summary.accuracy[(s, defense, CLEAN)]
                for s in own
                if (s, defense, CLEAN) in summary.accuracy
            ]
            if clean and 0.0 not in summary.fractions:
                points.append((0.0, clean[0]))
            for setting in own:
                if (setting, defense) in summary.worst:
                    points.append((setting.fraction, summary.worst[(setting, defense)][0]))
            if points:
                ax.plot(
                    [f for f, _ in points], [100 * a for _, a in points], marker="o", label=defense
                )
        ax.set_title(f"{regime}, alpha {alpha:g}" if regime else f"alpha {alpha:g}")
        ax.set_xlabel("malicious fraction")
        ax.set_ylabel("worst-case test accuracy (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{summary.name}: worst case over attacks")
    return _png(plt, fig)
