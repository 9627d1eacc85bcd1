"""Short digits simulations under attack (in-process grid, real apps and strategy).

Setting (unless a test says otherwise): 20 clients, Dirichlet alpha=0.5, 4
malicious (20%), seed 0, MLP. Each margin is stated in its test; they were
set with headroom from the measured figures noted beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


#: The default local training: 2 epochs, batch 32; 20 rounds.
NORMAL: dict[str, dict[str, Any]] = {"experiment": {"rounds": 20}, "client": {"local_epochs": 2}}

#: FedSGD-like rounds (one local step on a batch of 8, server momentum 0.9), as
#: in the papers' ALIE experiments: stochastic updates whose per-coordinate
#: spread dwarfs their mean, which is where ALIE's small shifts add up.
FEDSGD: dict[str, dict[str, Any]] = {
    "experiment": {"rounds": 40},
    "client": {"local_epochs": 1, "local_steps": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.0},
    "server": {"momentum": 0.9},
}


def _with(base: dict[str, dict[str, Any]], **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) for k, v in base.items()}
    for key, values in extra.items():
        merged.setdefault(key, {}).update(values)
    return merged


@pytest.fixture(scope="module")
def clean_fedavg(tmp_path_factory: pytest.TempPathFactory) -> float:
    # measured: 0.933
    return final(simulate(tmp_path_factory.mktemp("clean"), **NORMAL))


def test_ipm_breaks_fedavg(tmp_path: Path, clean_fedavg: float) -> None:
    attack = {"name": "ipm", "num_malicious": 4, "params": {"epsilon": 100.0}}
    # The model diverges to non-finite values, after which every reply is excluded:
    # let those rounds fail instead of stopping the run (server.max_failed_rounds).
    server = {"max_failed_rounds": 20}
    attacked = final(simulate(tmp_path, **_with(NORMAL, attack=attack, server=server)))
    assert attacked <= clean_fedavg - 0.30  # measured: 0.100 vs 0.933


def test_label_flipping_hurts_fedavg(tmp_path: Path, clean_fedavg: float) -> None:
    attack = {
        "name": "label-flip",
        "num_malicious": 4,
        "params": {"mode": "all-to-one", "target": 7},
    }
    attacked = final(simulate(tmp_path, **_with(NORMAL, attack=attack)))
    assert attacked <= clean_fedavg - 0.05  # measured: 0.772 vs 0.933


def test_backdoor_with_model_replacement(tmp_path: Path, clean_fedavg: float) -> None:
    # boost = 0: model replacement, each attacker scales by n / (eta * m).
    attack = {"name": "backdoor", "num_malicious": 4, "boost": 0.0, "params": {"target": 0}}
    rounds = simulate(tmp_path, **_with(NORMAL, attack=attack))
    assert final(rounds, "attack_success_rate") >= 0.80  # measured: 1.00
    assert final(rounds) >= clean_fedavg - 0.05  # measured: 0.933 vs 0.933
    # The same clients, never acting (start_round after the last round): no backdoor.
    dormant = simulate(tmp_path / "dormant", **_with(NORMAL, attack=attack | {"start_round": 21}))
    assert final(dormant, "attack_success_rate") <= 0.2  # measured: 0.00


def test_alie_hurts_median_and_krum_more_than_centered_clipping(tmp_path: Path) -> None:
    # z = 0.5 keeps the colluders' update close enough to the honest ones that
    # Krum selects it (with z >= 1.5 it is rejected and Krum even improves).
    alie = {"name": "alie", "num_malicious": 4, "knowledge": "omniscient", "params": {"z": 0.5}}
    drops = {}
    for rule, aggregation in {
        "median": {"rule": "median"},
        "krum": {"rule": "krum", "f": 4},
        "centered-clipping": {"rule": "centered-clipping", "params": {"tau": 0.1}},
    }.items():
        clean = final(simulate(tmp_path / rule / "clean", **_with(FEDSGD, aggregation=aggregation)))
        attacked = final(
            simulate(
                tmp_path / rule / "alie", **_with(FEDSGD, aggregation=aggregation, attack=alie)
            )
        )
        drops[rule] = clean - attacked
    # measured: median 0.781 -> 0.717 (drop 0.064), Krum 0.603 -> 0.528 (0.075),
    # centered clipping 0.775 -> 0.842 (no loss)
    assert drops["median"] >= 0.04
    assert drops["krum"] >= 0.04
    assert drops["centered-clipping"] <= min(drops["median"], drops["krum"]) - 0.04


def test_pgd_robust_accuracy_improves_with_adversarial_training(tmp_path: Path) -> None:
    evasion = {"attack": "pgd", "eps": 0.1, "steps": 5, "eval_samples": 200}
    plain = simulate(tmp_path / "plain", **_with(NORMAL, evasion=evasion))
    trained = simulate(
        tmp_path / "adv", **_with(NORMAL, evasion=evasion | {"adversarial_training": True})
    )
    assert "robust_accuracy" in plain[0]  # reported from round 0 on
    assert final(plain, "robust_accuracy") < final(plain) - 0.2  # measured: 0.525 vs 0.933
    # measured: 0.650 vs 0.525
    assert final(trained, "robust_accuracy") >= final(plain, "robust_accuracy") + 0.08
