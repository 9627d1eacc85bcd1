"""A built wheel (not only the editable install) imports, and adds only `fedsec`."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_fedsec_and_imports(tmp_path: Path) -> None:
    # Build from a clean copy: setuptools reuses a stale build/ folder, which
    # would hide a package missing from pyproject.toml.
    source = tmp_path / "src"
    top_level_skip = {".venv", ".git", "build", "dist", "results", "data", "fedsec.egg-info"}
    shutil.copytree(
        ROOT,
        source,
        ignore=lambda folder, names: (
            [n for n in names if n in top_level_skip] if Path(folder) == ROOT else []
        ),
    )
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-q", "-w", tmp_path, source], check=True, capture_output=True, cwd=tmp_path
    )
    (wheel,) = tmp_path.glob("fedsec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedsec"}
    assert "fedsec/strategies/server_app.py" in names
    assert "fedsec/py.typed" in names

    # Every package in the source tree must be in the wheel.
    source_packages = {
        str(p.parent.relative_to(ROOT)).replace("strategies", "fedsec/strategies", 1)
        if p.parent.name == "strategies" and p.parent.parent == ROOT
        else str(p.parent.relative_to(ROOT))
        for p in [*(ROOT / "fedsec").rglob("__init__.py"), ROOT / "strategies" / "__init__.py"]
    }
    wheel_packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert source_packages == wheel_packages

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
        check=True,
        capture_output=True,
    )
    # -S: no site processing, so the editable install's .pth finder is absent;
    # dependencies come from site-packages added by hand, fedsec only from the wheel.
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    code = (
        "import sys;"
        f"sys.path[:0] = [{str(target)!r}]; sys.path.append({site_packages!r});"
        "import importlib, pkgutil, fedsec;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fedsec.__path__, 'fedsec.')];"
        "assert importlib.util.find_spec('strategies') is None;"
        "print(fedsec.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))

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
        "import sys;"
        f"sys.path[:0] = [{str(app_dir)!r}, {str(target)!r}]; sys.path.append({site_packages!r});"
        "import importlib, fedsec;"
        + "".join(
            f"assert getattr(importlib.import_module({ref.split(':')[0]!r}), {ref.split(':')[1]!r});"
            for ref in components.values()
        )
        + "print(fedsec.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
