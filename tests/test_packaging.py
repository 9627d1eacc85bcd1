"""A built wheel (not only the editable install) imports, and adds only `fedsec`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_fedsec_and_imports(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fedsec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedsec"}
    assert "fedsec/strategies/server_app.py" in names
    assert "fedsec/py.typed" in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            target,
            wheel,
        ],
        check=True,
        capture_output=True,
    )
    # Run from an empty folder with only the unpacked wheel in front of the path,
    # so neither the checkout nor the editable install can answer the imports.
    code = (
        "import fedsec, fedsec.strategies.server_app, fedsec.client.app, fedsec.cli;"
        "import importlib.util;"
        "assert importlib.util.find_spec('strategies') is None;"
        "print(fedsec.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(target)!r}); {code}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
