"""Benchmark reports: numbers from a synthetic results store, Markdown, HTML, figures."""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedsec.bench.grid import parse_grid
from fedsec.bench.report import (
    make_figures,
    render_html,
    render_markdown,
    summarize,
    write_report,
)
from fedsec.bench.store import ResultsStore
from fedsec.bench.summary import Setting

PNG = b"\x89PNG\r\n\x1a\n"
SETTING = (0.25, 0.5)

GRID = """
[grid]
name = "tiny"
seeds = [0, 1]
fractions = {fractions}
alphas = [0.5]

[base]
experiment = {{ rounds = 2 }}
data = {{ dataset = "digits", num_clients = 4, partition = "dirichlet" }}

[[attack]]
name = "none"

[[attack]]
name = "ipm"

[[attack]]
name = "backdoor"

[[defense]]
rule = "mean"

[[defense]]
rule = "median"
"""

# Final test accuracy per (attack, defense, seed).
FINAL = {
    ("none", "mean", 0): 0.90,
    ("none", "mean", 1): 0.92,
    ("none", "median", 0): 0.88,
    ("none", "median", 1): 0.86,
    ("ipm", "mean", 0): 0.20,
    ("ipm", "mean", 1): 0.30,  # unfinished in the main store: must not count
    ("ipm", "median", 0): 0.80,
    ("ipm", "median", 1): 0.84,
    ("backdoor", "mean", 0): 0.89,
    ("backdoor", "mean", 1): 0.91,
    ("backdoor", "median", 0): 0.78,
    ("backdoor", "median", 1): 0.80,
}
# Final attack success rate of the backdoor cells per (defense, seed); round 1 has 0.5.
ASR = {("mean", 0): 0.95, ("mean", 1): 0.97, ("median", 0): 0.10, ("median", 1): 0.20}
# Detection per (attack, defense, seed): {round: {metric: value}}; absent elsewhere.
DETECTION: dict[tuple[str, str, int], dict[int, dict[str, float]]] = {
    ("ipm", "median", 0): {
        1: {"detection_precision": 1.0, "detection_recall": 0.5},
        2: {"detection_precision": 0.5},
    },
    ("ipm", "median", 1): {1: {"detection_precision": 1.0, "detection_recall": 1.0}},
}
UNFINISHED = ("ipm", "mean", 1)


def _rounds(attack: str, defense: str, seed: int, fraction: float) -> list[dict[str, Any]]:
    final = FINAL[(attack, defense, seed)] - (fraction - 0.25 if attack != "none" else 0.0)
    rows: list[dict[str, Any]] = [
        {"round": 0, "status": "initial", "test_accuracy": 0.1, "test_loss": 2.3}
    ]
    for rnd, accuracy in ((1, (0.1 + final) / 2), (2, final)):
        row: dict[str, Any] = {
            "round": rnd,
            "status": "ok",
            "test_accuracy": accuracy,
            "test_loss": 1.0 / rnd,
            "round_time_s": 0.5,
        }
        if attack == "backdoor":
            row["attack_success_rate"] = 0.5 if rnd == 1 else ASR[(defense, seed)]
        row.update(DETECTION.get((attack, defense, seed), {}).get(rnd, {}))
        rows.append(row)
    return rows


def build_store(
    path: Path, fractions: list[float], unfinished: tuple[str, str, int] | None = None
) -> Path:
    """A results store of the tiny grid, every cell's manifest written by hand."""
    source = GRID.format(fractions=json.dumps(fractions))
    grid = parse_grid(tomllib.loads(source), source=source)
    store = ResultsStore.create_or_open(path, grid)
    for cell in grid.cells:
        rounds = _rounds(cell.attack, cell.defense, cell.seed, cell.fraction)
        finished = (cell.attack, cell.defense, cell.seed) != unfinished
        manifest = {
            "format": 1,
            "config": cell.config.to_dict(),
            "finished": finished,
            "checkpoints": [],
            "rounds": rounds if finished else rounds[:2],
        }
        folder = store.cell_path(cell.id)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("bench") / "results", [0.25], UNFINISHED)


@pytest.fixture(scope="module")
def figures(store_path: Path) -> dict[str, bytes]:
    return make_figures(summarize(ResultsStore.open(store_path).results(), name="tiny"))


def _mean(*values: float) -> float:
    return statistics.fmean(values)


# ---- summarize -----------------------------------------------------------------------------


def test_summary_accuracy_is_the_mean_over_finished_seeds(store_path: Path) -> None:
    summary = summarize(ResultsStore.open(store_path).results(), name="tiny")
    assert summary.settings == [SETTING]
    assert summary.defenses == ["mean", "median"]
    assert summary.attacks == ["ipm", "backdoor"]
    assert (summary.name, summary.num_clients, summary.rounds, summary.seeds) == (
        "tiny",
        4,
        2,
        [0, 1],
    )
    for defense in ("mean", "median"):
        for attack in ("none", "backdoor"):
            values = (FINAL[(attack, defense, 0)], FINAL[(attack, defense, 1)])
            key = (SETTING, defense, attack)
            assert summary.accuracy[key] == pytest.approx(_mean(*values))
            assert summary.accuracy_std[key] == pytest.approx(statistics.stdev(values))
    # The unfinished seed of ipm x mean is left out: one seed, no std.
    assert summary.accuracy[(SETTING, "mean", "ipm")] == pytest.approx(0.20)
    assert (SETTING, "mean", "ipm") not in summary.accuracy_std
    assert summary.accuracy[(SETTING, "median", "ipm")] == pytest.approx(0.82)


def test_summary_drop_and_worst_case(store_path: Path) -> None:
    summary = summarize(ResultsStore.open(store_path).results())
    assert summary.drop[(SETTING, "mean", "ipm")] == pytest.approx(0.91 - 0.20)
    assert summary.drop[(SETTING, "median", "backdoor")] == pytest.approx(0.87 - 0.79)
    assert (SETTING, "mean", "none") not in summary.drop
    worst_mean, worst_median = summary.worst[(SETTING, "mean")], summary.worst[(SETTING, "median")]
    assert worst_mean[1] == "ipm" and worst_mean[0] == pytest.approx(0.20)
    assert worst_median[1] == "backdoor" and worst_median[0] == pytest.approx(0.79)
    accuracy, attack, setting = summary.worst_overall["median"]
    assert (attack, setting) == ("backdoor", SETTING) and accuracy == pytest.approx(0.79)


def test_summary_asr_detection_curves_and_missing(store_path: Path) -> None:
    results = ResultsStore.open(store_path).results()
    summary = summarize(results)
    assert summary.backdoor_attacks == ["backdoor"]
    assert summary.asr[(SETTING, "mean", "backdoor")] == pytest.approx(0.96)  # final, not 0.5
    assert summary.asr[(SETTING, "median", "backdoor")] == pytest.approx(0.15)
    assert not any(key[2] != "backdoor" for key in summary.asr)
    # Per cell the mean over the rounds that recorded it, then over seeds.
    precision, recall = summary.detection[(SETTING, "median", "ipm")]
    assert precision == pytest.approx(_mean(_mean(1.0, 0.5), 1.0))
    assert recall == pytest.approx(_mean(0.5, 1.0))
    assert set(summary.detection) == {(SETTING, "median", "ipm")}
    curve = summary.curves[(SETTING, "median", "none")]
    assert [r for r, _ in curve] == [0, 1, 2]
    assert curve[2][1] == pytest.approx(0.87)
    assert curve[1][1] == pytest.approx(_mean((0.1 + 0.88) / 2, (0.1 + 0.86) / 2))
    unfinished = [r.cell["id"] for r in results if not r.finished]
    assert len(unfinished) == 1 and unfinished[0].startswith("ipm__mean__")
    assert summary.missing == unfinished
    assert (summary.total_cells, summary.finished_cells) == (12, 11)


# ---- Markdown and HTML ---------------------------------------------------------------------


def _md_tables(text: str) -> dict[str, list[list[str]]]:
    """Each Markdown table under its preceding heading: header row, then body rows."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            tables.setdefault(heading, []).append(cells)
    return tables


CELL = re.compile(r"^(\d+\.\d)(?: \(([+-]\d+\.\d)\))?(?: ± (\d+\.\d))?$")


def _expected_from_manifests(path: Path) -> dict[tuple[str, str], list[float]]:
    """(defense, attack) -> final accuracies of the finished cells, read straight from the files."""
    index = json.loads((path / "index.json").read_text())
    out: dict[tuple[str, str], list[float]] = {}
    for cell in index["cells"]:
        manifest = json.loads((path / "cells" / cell["id"] / "manifest.json").read_text())
        if manifest["finished"]:
            finals = out.setdefault((cell["defense"], cell["attack"]), [])
            finals.append(manifest["rounds"][-1]["test_accuracy"])
    return out


def test_markdown_accuracy_table_matches_the_manifests(store_path: Path) -> None:
    summary = summarize(ResultsStore.open(store_path).results(), name="tiny")
    text = render_markdown(summary, {"accuracy_curves": "figures/accuracy_curves.png"})
    assert text.startswith("# Benchmark report: tiny")
    assert "4 clients, 2 rounds, seeds 0, 1" in text
    assert "Cells finished: 11/12" in text and summary.missing[0] in text
    assert "![" in text and "(figures/accuracy_curves.png)" in text
    assert "figures/accuracy_drop.png" not in text  # only the figures given are linked

    tables = _md_tables(text)
    header, *rows = tables["Final accuracy (%)"]
    assert header == ["defense", "clean", "ipm", "backdoor", "worst case"]
    expected = _expected_from_manifests(store_path)
    worst_seen = {}
    for row in rows:
        defense = row[0]
        clean_values = expected[(defense, "none")]
        for column, cell in zip(header[1:-1], row[1:-1], strict=True):
            attack = "none" if column == "clean" else column
            values = expected[(defense, attack)]
            match = CELL.match(cell)
            assert match, cell
            accuracy, change, std = match.groups()
            assert float(accuracy) == pytest.approx(100 * statistics.fmean(values), abs=0.051)
            if attack == "none":
                assert change is None
            else:
                delta = 100 * (statistics.fmean(values) - statistics.fmean(clean_values))
                assert float(change) == pytest.approx(delta, abs=0.051)
            if len(values) > 1:
                assert float(std) == pytest.approx(100 * statistics.stdev(values), abs=0.051)
            else:
                assert std is None
        worst_seen[defense] = row[-1]
    assert worst_seen == {"mean": "20.0 (ipm)", "median": "79.0 (backdoor)"}

    # Worst-case table: descending by worst-case accuracy, with the advice sentence.
    assert "Choose a defense by its worst case" in text
    ranking = [(r[1], r[2], r[3]) for r in tables["Worst case"][1:]]
    assert ranking == [("median", "79.0", "backdoor"), ("mean", "20.0", "ipm")]

    asr = tables["Attack success rate (%)"]
    assert asr[0] == ["defense", "backdoor"]
    assert asr[1][0] == "mean" and asr[1][1].startswith("96.0 ± ")
    assert asr[2][0] == "median" and asr[2][1].startswith("15.0 ± ")

    detection = tables["Detection (precision / recall, %)"]
    assert detection == [["defense", "ipm"], ["mean", "–"], ["median", "87.5 / 75.0"]]


def _html_tables(text: str) -> list[list[str]]:
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", text, flags=re.S):
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, flags=re.S)
        rows.append([html.unescape(c) for c in cells])
    return rows


def test_html_is_self_contained_with_the_markdown_numbers(
    store_path: Path, figures: dict[str, bytes]
) -> None:
    summary = summarize(ResultsStore.open(store_path).results(), name="tiny")
    page = render_html(summary, figures)
    assert page.startswith("<!DOCTYPE html>")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(figures) == 2
    assert all(base64.b64decode(uri).startswith(PNG) for uri in uris)
    lowered = page.lower()
    for external in ('src="http', 'href="http', "src='http", "<link", "<script", "url(", "@import"):
        assert external not in lowered

    markdown = render_markdown(summary, {n: f"figures/{n}.png" for n in figures})
    md_rows = [row for table in _md_tables(markdown).values() for row in table]
    assert _html_tables(page) == md_rows
    assert "20.0 (ipm)" in page and "87.5 / 75.0" in page


# ---- files and figures ---------------------------------------------------------------------


def test_write_report_writes_markdown_html_and_pngs(store_path: Path, tmp_path: Path) -> None:
    md_path, html_path = write_report(store_path, tmp_path / "out")
    assert (md_path, html_path) == (
        tmp_path / "out" / "report.md",
        tmp_path / "out" / "report.html",
    )
    markdown = md_path.read_text(encoding="utf-8")
    pngs = sorted((tmp_path / "out" / "figures").glob("*.png"))
    assert {p.stem for p in pngs} == {"accuracy_curves", "accuracy_drop"}
    for png in pngs:
        assert png.read_bytes().startswith(PNG)
        assert f"](figures/{png.name})" in markdown
    assert html_path.read_text(encoding="utf-8").count("data:image/png;base64,") == 2


def test_write_report_refuses_a_store_with_no_finished_cell(tmp_path: Path) -> None:
    source = GRID.format(fractions="[0.25]")
    ResultsStore.create_or_open(tmp_path / "empty", parse_grid(tomllib.loads(source), source))
    with pytest.raises(ValueError, match="no finished cell"):
        write_report(tmp_path / "empty")
    assert not (tmp_path / "empty" / "report.md").exists()


def test_accuracy_vs_fraction_only_with_several_fractions(
    tmp_path: Path, figures: dict[str, bytes]
) -> None:
    assert "accuracy_vs_fraction" not in figures
    path = build_store(tmp_path / "two", [0.25, 0.3])
    summary = summarize(ResultsStore.open(path).results(), name="two")
    assert summary.settings == [(0.25, 0.5), (0.3, 0.5)]
    # The clean baseline is shared by both settings; attacked cells differ per fraction.
    assert summary.accuracy[((0.3, 0.5), "median", "none")] == pytest.approx(0.87)
    assert summary.accuracy[((0.3, 0.5), "median", "ipm")] == pytest.approx(0.82 - 0.05)
    two = make_figures(summary)
    assert set(two) == {
        "accuracy_curves_m0.25_a0.5",
        "accuracy_drop_m0.25_a0.5",
        "accuracy_curves_m0.3_a0.5",
        "accuracy_drop_m0.3_a0.5",
        "accuracy_vs_fraction",
    }
    assert two["accuracy_vs_fraction"].startswith(PNG)
    text = render_markdown(summary, {n: f"figures/{n}.png" for n in two})
    assert "(figures/accuracy_vs_fraction.png)" in text
    assert "Worst case over all settings" in text


# ---- regimes and the worst case (issue 19) -------------------------------------------------

REGIME_GRID = """
[grid]
name = "regimes"
seeds = [0]
fractions = [0.25]
alphas = [0.5]

[base]
experiment = { rounds = 2 }
data = { dataset = "digits", num_clients = 8, partition = "dirichlet" }

[[regime]]
label = "fedsgd"
fractions = [0.25, 0.375]
alphas = [0.1]
client = { local_steps = 1 }
server = { momentum = 0.9 }

[[regime]]
label = "cross"
data = { num_clients = 16 }
client = { fraction = 0.5 }

[[attack]]
name = "none"

[[attack]]
name = "ipm"

[[attack]]
name = "alie"

[[defense]]
rule = "mean"

[[defense]]
rule = "median"

[[defense]]
rule = "dnc"
"""

# Final accuracy per (regime, fraction, attack, defense); fraction 0 is the clean baseline.
REGIME_FINAL = {
    ("fedsgd", 0.0, "none"): {"mean": 0.90, "median": 0.88, "dnc": 0.89},
    ("fedsgd", 0.25, "ipm"): {"mean": 0.30, "median": 0.80, "dnc": 0.86},
    ("fedsgd", 0.25, "alie"): {"mean": 0.85, "median": 0.70, "dnc": 0.84},
    ("fedsgd", 0.375, "ipm"): {"mean": 0.10, "median": 0.60, "dnc": 0.82},
    ("fedsgd", 0.375, "alie"): {"mean": 0.80, "median": 0.50, "dnc": 0.78},
    ("cross", 0.0, "none"): {"mean": 0.92, "median": 0.91, "dnc": 0.90},
    ("cross", 0.25, "ipm"): {"mean": 0.20, "median": 0.85, "dnc": 0.88},
    ("cross", 0.25, "alie"): {"mean": 0.90, "median": 0.83, "dnc": 0.87},
}
FEDSGD_25, FEDSGD_375, CROSS_25 = (
    Setting(0.25, 0.1, "fedsgd"),
    Setting(0.375, 0.1, "fedsgd"),
    Setting(0.25, 0.5, "cross"),
)


@pytest.fixture(scope="module")
def regime_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    grid = parse_grid(tomllib.loads(REGIME_GRID), source=REGIME_GRID)
    path = tmp_path_factory.mktemp("bench") / "regimes"
    store = ResultsStore.create_or_open(path, grid)
    for cell in grid.cells:
        final = REGIME_FINAL[(cell.regime, cell.fraction, cell.attack)][cell.defense]
        rounds = [
            {"round": 0, "status": "initial", "test_accuracy": 0.1},
            {"round": 1, "status": "ok", "test_accuracy": (0.1 + final) / 2},
            {"round": 2, "status": "ok", "test_accuracy": final},
        ]
        manifest = {"format": 1, "config": cell.config.to_dict(), "finished": True}
        manifest |= {"checkpoints": [], "rounds": rounds}
        folder = store.cell_path(cell.id)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return path


def test_summary_groups_settings_by_regime(regime_store: Path) -> None:
    summary = summarize(ResultsStore.open(regime_store).results(), name="regimes")
    assert summary.regimes == ["fedsgd", "cross"] and summary.has_regimes
    assert summary.settings == [FEDSGD_25, FEDSGD_375, CROSS_25]
    assert summary.regime_shape == {"fedsgd": (8, 2), "cross": (16, 2)}
    # A regime's clean baseline goes under its own settings only.
    assert summary.accuracy[(FEDSGD_375, "median", "none")] == pytest.approx(0.88)
    assert summary.accuracy[(CROSS_25, "median", "none")] == pytest.approx(0.91)
    assert summary.drop[(FEDSGD_375, "median", "alie")] == pytest.approx(0.88 - 0.50)
    worst = {
        defense: (round(accuracy, 6), attack, setting)
        for defense, (accuracy, attack, setting) in summary.worst_by_regime["fedsgd"].items()
    }
    assert worst == {
        "mean": (0.10, "ipm", FEDSGD_375),
        "median": (0.50, "alie", FEDSGD_375),
        "dnc": (0.78, "alie", FEDSGD_375),
    }
    accuracy, attack, setting = summary.worst_by_regime["cross"]["median"]
    assert (round(accuracy, 6), attack, setting) == (0.83, "alie", CROSS_25)
    defense, accuracy, attack, setting = summary.best([FEDSGD_25])
    assert (defense, round(accuracy, 6), attack, setting) == ("dnc", 0.84, "alie", FEDSGD_25)
    defense, accuracy, attack, setting = summary.best()
    assert (defense, round(accuracy, 6), attack, setting) == ("dnc", 0.78, "alie", FEDSGD_375)
    # A setting without a regime is the plain (fraction, alpha) pair.
    assert Setting(0.25, 0.5) == (0.25, 0.5) and hash(Setting(0.25, 0.5)) == hash((0.25, 0.5))


def test_report_states_each_regimes_worst_case_and_the_best_defense(regime_store: Path) -> None:
    summary = summarize(ResultsStore.open(regime_store).results(), name="regimes")
    text = render_markdown(summary, {})
    assert (
        "Regimes (see the grid file for each one's overrides): fedsgd (8 clients, 2 rounds)" in text
    )
    assert "## Setting: regime fedsgd, malicious fraction 0.375, alpha 0.1" in text
    sections = text.split("\n## ")
    fedsgd_25 = next(
        s for s in sections if s.startswith("Setting: regime fedsgd, malicious fraction 0.25")
    )
    # Per setting: sorted by worst case, with the clean accuracy and the drop in points.
    assert _md_tables("## " + fedsgd_25)["Worst case"] == [
        ["rank", "defense", "worst-case accuracy (%)", "attack", "clean (%)", "drop (points)"],
        ["1", "dnc", "84.0", "alie", "89.0", "5.0"],
        ["2", "median", "70.0", "alie", "88.0", "18.0"],
        ["3", "mean", "30.0", "ipm", "90.0", "60.0"],
    ]
    assert (
        "Best worst case in this setting: dnc, 84.0% under alie, against 89.0% clean (a drop of 5.0 points)."
        in fedsgd_25
    )
    tables = _md_tables(text)
    label = "regime fedsgd, fraction 0.375, alpha 0.1"
    assert tables["Worst case in regime fedsgd"] == [
        [
            "rank",
            "defense",
            "worst-case accuracy (%)",
            "attack",
            "setting",
            "clean (%)",
            "drop (points)",
        ],
        ["1", "dnc", "78.0", "alie", label, "89.0", "11.0"],
        ["2", "median", "50.0", "alie", label, "88.0", "38.0"],
        ["3", "mean", "10.0", "ipm", label, "90.0", "80.0"],
    ]
    # The cross regime has one setting: its per-setting table says it all.
    assert "Worst case in regime cross" not in tables
    assert [r[1:4] for r in tables["Worst case over all settings"][1:]] == [
        ["dnc", "78.0", "alie"],
        ["median", "50.0", "alie"],
        ["mean", "10.0", "ipm"],
    ]
    assert (
        f"Best worst case overall: dnc, 78.0% under alie ({label}), against 89.0% clean "
        "(a drop of 11.0 points)."
    ) in text
    md_rows = [
        [c.strip() for c in line.strip().strip("|").split(" | ")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    assert _html_tables(render_html(summary, {})) == md_rows


def test_regime_figures_and_an_index_written_before_regimes(
    regime_store: Path, store_path: Path, tmp_path: Path
) -> None:
    summary = summarize(ResultsStore.open(regime_store).results(), name="regimes")
    names = set(make_figures(summary))
    assert "accuracy_drop_fedsgd_m0.375_a0.1" in names and "accuracy_vs_fraction" in names
    # A store indexed before cells had a regime reads as a grid without regimes.
    old = tmp_path / "old"
    old.mkdir()
    for entry in store_path.iterdir():
        if entry.is_dir():
            (old / entry.name).symlink_to(entry)
    index = json.loads((store_path / "index.json").read_text())
    for cell in index["cells"]:
        del cell["regime"]
    (old / "index.json").write_text(json.dumps(index))
    before = summarize(ResultsStore.open(store_path).results())
    after = summarize(ResultsStore.open(old).results())
    assert after.regimes == [""] and not after.has_regimes
    assert after.accuracy == before.accuracy and after.worst == before.worst


def test_the_honest_only_reference_is_shown_but_never_a_worst_case(tmp_path: Path) -> None:
    """``abstain`` (the malicious clients send nothing) is a column, not an attack."""
    source = GRID.format(fractions="[0.25]").replace(
        '[[attack]]\nname = "ipm"', '[[attack]]\nname = "ipm"\n\n[[attack]]\nname = "abstain"'
    )
    grid = parse_grid(tomllib.loads(source), source=source)
    store = ResultsStore.create_or_open(tmp_path / "results", grid)
    for cell in grid.cells:
        # Lower than any attack's accuracy: it would be every worst case if it counted.
        final = 0.05 if cell.attack == "abstain" else FINAL[(cell.attack, cell.defense, cell.seed)]
        manifest = {
            "format": 1,
            "config": cell.config.to_dict(),
            "finished": True,
            "checkpoints": [],
            "rounds": [{"round": 1, "status": "ok", "test_accuracy": final}],
        }
        folder = store.cell_path(cell.id)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    summary = summarize(ResultsStore.open(tmp_path / "results").results())
    assert summary.attacks == ["ipm", "abstain", "backdoor"]
    assert summary.references == ["abstain"]
    assert summary.accuracy[(SETTING, "median", "abstain")] == pytest.approx(0.05)
    assert summary.worst[(SETTING, "mean")][1] == "ipm"
    assert summary.worst[(SETTING, "median")][1] == "backdoor"
    assert all(attack != "abstain" for _, attack, _ in summary.worst_overall.values())
    assert "abstain is a reference" in render_markdown(summary, {})
