"""Load a script of ``simulations/`` as a module, for the tests of the benchmarks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_simulation_script(name: str) -> ModuleType:
    """``simulations/<name>.py``, imported fresh under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "simulations" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
