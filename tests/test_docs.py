"""The docs: generated reference pages match the code, the README stays a front page.

The reference pages (config keys, rules, attacks) are written by
``scripts/gen_docs.py``; a code change without regenerating them fails here.
The MkDocs build itself runs in ``scripts/test.sh`` (``mkdocs build --strict``);
the tests below check that its configuration does fail on a broken link.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _load_gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


gen_docs = _load_gen_docs()

# The top-level sections of the README before it became a front page (issue 18):
# each must still exist as a heading somewhere in docs/.
OLD_README_SECTIONS = [
    "Quick start",
    "Usage",
    "In your own Flower app",
    "With `flwr run`",
    "On a Ray cluster",
    "Deployment on a LAN (TLS, SuperNode authentication)",
    "Signed updates",
    "Edge GPU clients",
    "Data",
    "Models",
    "Configuration reference",
    "Aggregation rules",
    "Attacks",
    "Differential privacy",
    "Secure aggregation",
    "Robust rules under secure aggregation (bucketed mode)",
    "Distributed DP",
    "What it costs",
    "Privacy audit",
    "Benchmarks: attacks x defenses",
    "The standard grid",
    "Threat model and limits",
    "How a round works",
    "Layout",
]


def _headings(text: str) -> list[str]:
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.*)", line)):
            out.append(m.group(1).strip())
    return out


# ---- generated pages ------------------------------------------------------------------


@pytest.mark.parametrize("page", sorted(gen_docs.PAGES))
def test_generated_page_matches_the_code(page: str) -> None:
    path = DOCS / page
    expected = gen_docs.PAGES[page]()
    assert path.exists(), f"docs/{page} missing: run python scripts/gen_docs.py"
    assert path.read_text(encoding="utf-8") == expected, (
        f"docs/{page} is stale: run python scripts/gen_docs.py and commit the result"
    )


def test_a_stale_page_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Freshly generated pages, one of them then edited by hand: the check names it.
    monkeypatch.setattr(gen_docs, "DOCS", tmp_path / "docs")
    assert gen_docs.main([]) == 0
    assert gen_docs.stale_pages() == []
    edited = tmp_path / "docs" / "reference" / "rules.md"
    edited.write_text(edited.read_text(encoding="utf-8").replace("n > 2f + 2", "n > 2f"))
    assert gen_docs.stale_pages() == [edited]
    assert gen_docs.main(["--check"]) == 1


def test_every_config_key_is_documented() -> None:
    _, missing, stale = gen_docs.config_descriptions()
    assert missing == [], f"add a `#:` comment or an entry in fedsec/_config_help.py: {missing}"
    assert stale == [], f"fedsec/_config_help.py describes keys that do not exist: {stale}"
    rows = {f"{section}.{f.name}" for section, _, fields in gen_docs.config_keys() for f in fields}
    page = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## \[(\w+)\]$", page, re.M))
    assert sections == {key.split(".")[0] for key in rows}
    assert len(rows) == page.count("\n| `")


def test_field_comments_are_read_from_the_source() -> None:
    @dataclasses.dataclass
    class Section:
        plain: int = 0
        #: What this key does,
        #: over two lines.
        commented: float = 1.0

    assert gen_docs.field_comments(Section) == {"commented": "What this key does, over two lines."}


def test_requirements_come_from_the_rules_own_checks() -> None:
    from fedsec.aggregation import make

    assert gen_docs.requirement_of(make("krum", f=1)) == "n > 2f + 2"
    assert gen_docs.requirement_of(make("bulyan", f=1)) == "n >= 4f + 3"
    assert gen_docs.requirement_of(make("mean")) == "n >= 1"


def test_every_rule_and_attack_cites_its_paper() -> None:
    from fedsec.aggregation.registry import PRE_AGGREGATORS, RULES
    from fedsec.attacks.data_poisoning import DATA_ATTACKS
    from fedsec.attacks.model_poisoning import MODEL_ATTACKS

    uncited = [
        name
        for registry in (RULES, PRE_AGGREGATORS, DATA_ATTACKS, MODEL_ATTACKS)
        for name in registry
        if not gen_docs.paper_of(registry.get(name))
    ]
    assert uncited == [], f"no paper cited in the first paragraphs of the docstring: {uncited}"
    assert gen_docs.paper_of(RULES.get("krum")) == "Blanchard et al., NeurIPS 2017"


# ---- README and docs -------------------------------------------------------------------


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_keeps_the_test_command_ci_runs() -> None:
    # .ci/run runs "the README's test command", scripts/test.sh.
    assert "bash scripts/test.sh" in README.read_text(encoding="utf-8")
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_relative_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:", link) and link[0] != "#"]
    assert relative, "the README links into docs/"
    broken = [link for link in relative if not (ROOT / link.split("#")[0]).exists()]
    assert broken == []


def test_every_old_readme_section_lands_in_docs() -> None:
    found = {h for page in DOCS.rglob("*.md") for h in _headings(page.read_text("utf-8"))}
    assert [s for s in OLD_README_SECTIONS if s not in found] == []


def _build(root: Path) -> None:
    mkdocs_config = pytest.importorskip("mkdocs.config")
    from mkdocs.commands.build import build

    config = mkdocs_config.load_config(
        config_file=str(root / "mkdocs.yml"), site_dir=str(root / "site")
    )
    build(config)


def _copy_site(tmp_path: Path) -> Path:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path


def test_docs_build_cleanly(tmp_path: Path) -> None:
    _build(_copy_site(tmp_path))
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


@pytest.mark.parametrize(
    ("page", "addition"),
    [
        ("usage.md", "\nSee [a page](no-such-page.md).\n"),
        ("usage.md", "\nSee [a section](aggregation.md#no-such-section).\n"),
        ("orphan.md", "# A page missing from the navigation\n"),
    ],
    ids=["broken-link", "broken-anchor", "page-not-in-nav"],
)
def test_docs_build_fails_on(tmp_path: Path, page: str, addition: str) -> None:
    exceptions = pytest.importorskip("mkdocs.exceptions")
    root = _copy_site(tmp_path)
    path = root / "docs" / page
    path.write_text((path.read_text("utf-8") if path.exists() else "") + addition)
    with pytest.raises(exceptions.Abort, match="strict mode"):
        _build(root)
