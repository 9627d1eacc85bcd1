"""One layout everywhere: a plain checkout, the wheel, the sdist and the FAB agree.

``strategies/`` (top level, the product's layout) is ``fedsec.strategies``
through a committed relative symlink ``fedsec/strategies -> ../strategies``,
not through a setuptools mapping that only an installed fedsec knows. The
built wheel carries real files, adds only ``fedsec``, and imports without the
checkout; the FAB ``flwr run`` ships carries no code (every node runs its
installed fedsec).
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from wheel_build import ROOT, build_wheel, clean_copy

# Dependencies come from here, added by hand to a `python -S` interpreter: no
# .pth file runs, so the editable install's finder (or any other) is absent.
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages"))


def _bare_python(code: str, *path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with sys.path = ``path`` + site-packages, no site processing."""
    prelude = (
        "import sys;"
        f"sys.path[:] = [*{[str(p) for p in path]!r}, *sys.path, {SITE_PACKAGES!r}];"
        "assert not any('editable' in repr(f).lower() for f in sys.meta_path), sys.meta_path;"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code], cwd=cwd, capture_output=True, text=True
    )


def _packages(top: Path) -> set[str]:
    """Dotted names of the packages (``__init__.py`` folders) under ``top``, links followed."""
    return {
        str(Path(folder).relative_to(top.parent)).replace(os.sep, ".")
        for folder, _, files in os.walk(top, followlinks=True)
        if "__init__.py" in files
    }


def _is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    return build_wheel(clean_copy(tmp / "src"), tmp)


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Path:
    """The wheel unpacked by pip into a folder of its own (``--target``)."""
    target = wheel.parent / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
        check=True,
        capture_output=True,
    )
    return target


def test_strategies_is_a_package_of_fedsec_on_disk_not_only_in_setuptools() -> None:
    link = ROOT / "fedsec" / "strategies"
    # Relative, so it resolves in any clone and in any image that copies both folders.
    assert link.is_symlink() and os.readlink(link) == "../strategies"
    assert link.resolve() == (ROOT / "strategies").resolve()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in setuptools
    assert _packages(ROOT / "fedsec") == set(setuptools["packages"])


def test_plain_checkout_imports_fedsec_strategies(tmp_path: Path) -> None:
    # The checkout alone on sys.path, no installer's finder: every module imports,
    # from the checkout. (With the setuptools-only mapping this failed with
    # ModuleNotFoundError: No module named 'fedsec.strategies'.)
    code = (
        "import importlib, pkgutil, fedsec.strategies as s;"
        "[importlib.import_module(m.name) for m in pkgutil.iter_modules(s.__path__, s.__name__ + '.')];"
        "print(s.__file__)"
    )
    out = _bare_python(code, ROOT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "fedsec" / "strategies" / "__init__.py"


def test_wheel_holds_real_files_and_only_fedsec(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    infos = archive.infolist()
    names = [i.filename for i in infos]
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedsec"}
    assert not [i.filename for i in infos if _is_link(i)]
    assert "fedsec/py.typed" in names
    # Every package of the checkout, and the strategies as the files themselves.
    assert {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")} == (
        _packages(ROOT / "fedsec")
    )
    modules = sorted(p.name for p in (ROOT / "strategies").glob("*.py"))
    assert "server_app.py" in modules
    for name in modules:
        assert (
            archive.read(f"fedsec/strategies/{name}") == (ROOT / "strategies" / name).read_bytes()
        )


def test_installed_wheel_imports_without_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = (
        "import importlib, pkgutil, fedsec;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fedsec.__path__, 'fedsec.')];"
        "assert importlib.util.find_spec('strategies') is None;"
        "import fedsec.strategies as s; print(s.__file__)"
    )
    out = _bare_python(code, installed, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(installed))


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="`build` not installed")
def test_sdist_then_wheel_carries_the_same_files(wheel: Path, tmp_path: Path) -> None:
    # `python -m build`: an sdist, then a wheel built from the unpacked sdist.
    # The link becomes a folder of real files in the sdist (a link would dangle:
    # the sdist has no top-level strategies/).
    source = clean_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
         "-o", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (sdist,) = (tmp_path / "dist").glob("fedsec-*.tar.gz")
    (from_sdist,) = (tmp_path / "dist").glob("fedsec-*.whl")
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
    assert not [m.name for m in members if m.issym() or m.islnk()]
    files = {m.name.split("/", 1)[1] for m in members if m.isfile()}
    assert "fedsec/strategies/server_app.py" in files
    assert not {f for f in files if f.startswith("strategies/")}
    assert sorted(zipfile.ZipFile(from_sdist).namelist()) == sorted(
        zipfile.ZipFile(wheel).namelist()
    )


def test_fab_carries_no_code_and_its_components_import_from_the_wheel(
    installed: Path, tmp_path: Path
) -> None:
    # `flwr run .` ships a FAB that the SuperLink and SuperNodes unpack and put
    # first on sys.path. It must carry no code: anything it carried would shadow
    # the installed fedsec (a FAB of the checkout had `fedsec/` without
    # `fedsec.strategies`, and every deployed run failed with exit code 607).
    from flwr.cli.build import build_fab_from_disk

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT)))
    assert {n for n in fab.namelist() if not n.startswith(".info/")} == {
        "pyproject.toml",
        "README.md",
    }
    app_dir = tmp_path / "fab"
    fab.extractall(app_dir)
    components = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"
    ]
    code = (
        "import importlib, fedsec;"
        + "".join(
            f"assert getattr(importlib.import_module({ref.split(':')[0]!r}), {ref.split(':')[1]!r});"
            for ref in components.values()
        )
        + "print(fedsec.__file__)"
    )
    out = _bare_python(code, app_dir, installed, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(installed))
