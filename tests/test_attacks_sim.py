"""Short digits simulations under attack (in-process grid, real apps and strategy).

Setting (unless a test says otherwise): 20 clients, Dirichlet alpha=0.5, 4
malicious (20%), seed 0, MLP. Each margin is stated in its test; they were
set with headroom from the measured figures noted beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsec.client.app import app as client_app
from fedsec.config import parse_config
from fedsec.runs import RoundMetrics, RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment

CLIENTS = 20


def simulate(tmp_path: Path, **sections: dict[str, Any]) -> list[RoundMetrics]:
    raw: dict[str, dict[str, Any]] = {
        "experiment": {"name": "attack", "rounds": 10, "seed": 0},
        "data": {"partition": "dirichlet", "alpha": 0.5, "num_clients": CLIENTS},
        "client": {"local_epochs": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    cfg = parse_config(raw)
    run = RunDirectory.create(cfg, tmp_path)
    return run_experiment(InProcessGrid(client_app, CLIENTS).as_grid(), cfg, run)


def final(rounds: list[RoundMetrics], key: str = "test_accuracy") -> float:
    return float(rounds[-1][key])
