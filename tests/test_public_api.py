"""The public API: what ``fedsec`` exports, that it is documented, and that it stays cheap.

A Flower user imports from ``fedsec`` (its ``__all__``), ``fedsec.aggregation``
and ``fedsec.registry``. These tests hold that set to its promises: every name
resolves and has a docstring, the generated reference lists exactly these
names, ``import fedsec`` stays light (a SuperNode starts a fresh process per
message), and the worked example imports nothing else from fedsec.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import fedsec

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {"fedsec", "fedsec.aggregation", "fedsec.registry"}


def test_all_lists_exactly_the_exported_names() -> None:
    assert fedsec.__all__ == sorted(fedsec._EXPORTS)


@pytest.mark.parametrize("name", fedsec.__all__)
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    obj = getattr(fedsec, name)
    assert getattr(sys.modules[fedsec._EXPORTS[name]], name) is obj
    if typing.get_origin(obj) is None:  # type aliases carry a `#:` comment instead
        assert (inspect.getdoc(obj) or "").strip(), f"fedsec.{name} has no docstring"


def test_unknown_names_fail_as_attributes_do() -> None:
    with pytest.raises(AttributeError, match="no attribute 'FedAvg'"):
        _ = fedsec.FedAvg  # type: ignore[attr-defined]


def test_importing_fedsec_loads_neither_torch_nor_flower() -> None:
    code = "import sys, fedsec; print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_the_api_reference_lists_every_public_name() -> None:
    page = (ROOT / "docs" / "reference" / "api.md").read_text(encoding="utf-8")
    listed = {
        line.split("`")[1].removeprefix("fedsec.")
        for line in page.splitlines()
        if line.startswith("| `fedsec.")
    }
    assert listed == set(fedsec.__all__)


def _is_fedsec(module: str) -> bool:
    return module == "fedsec" or module.startswith("fedsec.")


def _fedsec_imports(path: Path) -> set[str]:
    """The fedsec modules a file imports (``from fedsec.x import y`` -> ``fedsec.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and _is_fedsec(node.module):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _is_fedsec(a.name))
    return found


def test_the_worked_example_uses_only_the_public_api() -> None:
    files = sorted((ROOT / "simulations" / "example").rglob("*.py"))
    assert files, "the worked example is missing"
    used = set().union(*(_fedsec_imports(f) for f in files))
    assert used, "the worked example imports nothing from fedsec"
    assert used <= PUBLIC_MODULES, f"private modules imported: {sorted(used - PUBLIC_MODULES)}"
