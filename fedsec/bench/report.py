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

The parts live in :mod:`fedsec.bench.summary` (the numbers),
:mod:`fedsec.bench.render` (Markdown and HTML) and :mod:`fedsec.bench.figures`;
their public names stay importable from here.
"""

from __future__ import annotations

from pathlib import Path

from fedsec.checkpoint import atomic_write_bytes

from .figures import figure_captions, make_figures
from .render import render_html, render_markdown
from .store import ResultsStore
from .summary import CLEAN, Summary, setting_label, summarize

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

FIGURES = "figures"


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
