"""Build fedsec's wheel as a user would: from a clean copy of the tree, never in place.

Shared by the packaging tests and the deployment test that runs from a wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Without git (an exported tree): everything but these top-level folders.
_SKIP = {".venv", ".git", "build", "dist", "results", "data", "fedsec.egg-info", ".mypy_cache"}


def _tree_files(root: Path) -> list[Path] | None:
    """Tracked and untracked-but-not-ignored paths, as a fresh clone would hold them.

    None when ``root`` is not a git checkout (or git is missing).
    """
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    return [Path(p) for p in sorted(set(out.stdout.decode().split("\0"))) if p]


def clean_copy(dest: Path, root: Path = ROOT) -> Path:
    """Copy the source tree to ``dest``, symlinks kept as links (``fedsec/strategies``).

    A clean copy matters: setuptools reuses a stale ``build/`` folder, which
    would hide a package missing from pyproject.toml, and an editable install's
    ``*.egg-info`` must not leak into the build.
    """
    files = _tree_files(root)
    if files is None:
        shutil.copytree(
            root,
            dest,
            symlinks=True,
            ignore=lambda folder, names: (
                [n for n in names if n in _SKIP] if Path(folder) == root else []
            ),
        )
        return dest
    for relative in files:
        source, target = root / relative, dest / relative
        if not source.is_symlink() and not source.exists():
            continue  # tracked but deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return dest


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` of ``source`` (no dependencies, this interpreter's setuptools)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        cwd=out,
    )  # fmt: skip
    (wheel,) = out.glob("fedsec-*.whl")
    return wheel
