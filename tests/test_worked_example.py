"""The worked example (simulations/example): a plain Flower app adopts each fedsec part.

The app is written as Flower's quickstart-pytorch is (its own CNN with
BatchNorm, its own digits data and partitioning, its own loop and loss,
``@app.train`` / ``@app.evaluate``, ``strategy.start``). Each fedsec part sits
between ``# fedsec: <part>`` and ``# end fedsec`` in the app's files; the
first test counts those lines, so "at most 5 lines a part" is measured.

The simulation test runs the app on Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray) as plain FedAvg (Flower's own
``FedAvg``, no mods) and with every defense on and no attack (a robust rule
over bucketed secure aggregation, local DP with a budget, DP-SGD through
``make_private`` on the app's loop, signed replies verified by the server),
and checks the held-out accuracy of the second is within 2 points of the
first. A third run adds a colluding attack (ALIE by two clients, through the
masked rounds) and checks that the malicious clients acted.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "simulations" / "example"
PACKAGE = EXAMPLE / "fedsec_example"
PARTS = (
    "robust-rule",
    "secure-aggregation",
    "local-dp",
    "dp-sgd",
    "signed-replies",
    "collusion",
)
#: The issue's bound on each part's own code.
MAX_LINES = 5
#: Bound on the accuracy the defenses may cost without an attack (points).
MARGIN = 0.02
NUM_CLIENTS = 6  # three buckets of two under bucketed secure aggregation
SEED = 2026

_START = re.compile(r"#\s*fedsec:\s*([\w-]+)")
_END = re.compile(r"#\s*end fedsec")


def part_lines(folder: Path = PACKAGE) -> dict[str, int]:
    """Lines of code between ``# fedsec: <part>`` and ``# end fedsec``, per part, all files.

    Blank lines and comment-only lines do not count; a part may have several
    blocks (client and server side), which add up.

    Raises
    ------
    ValueError
        If a block opens inside another or is never closed.
    """
    counts: dict[str, int] = {}
    for path in sorted(folder.glob("*.py")):
        current: str | None = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.strip()
            start, end = _START.match(text), _END.match(text)
            if start:
                if current is not None:
                    raise ValueError(f"{path.name}:{number}: block {current!r} is not closed")
                current = start[1]
                counts.setdefault(current, 0)
            elif end:
                if current is None:
                    raise ValueError(f"{path.name}:{number}: '# end fedsec' without a block")
                current = None
            elif current is not None and text and not text.startswith("#"):
                counts[current] += 1
        if current is not None:
            raise ValueError(f"{path.name}: block {current!r} is not closed")
    return counts


def test_each_part_is_at_most_five_lines_of_the_apps_own_code() -> None:
    counts = part_lines()
    assert set(counts) == set(PARTS), f"parts marked in the example: {sorted(counts)}"
    too_long = {part: n for part, n in counts.items() if n > MAX_LINES}
    assert not too_long, f"parts over {MAX_LINES} lines: {too_long}"
    assert all(n >= 1 for n in counts.values())


def test_the_counter_sees_every_line_and_refuses_open_blocks(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(
        "x = 1\n# fedsec: demo\nif y:\n\n    # why\n    z = 2\n# end fedsec\n"
    )
    (tmp_path / "b.py").write_text("# fedsec: demo\nw = 3\n# end fedsec\n")
    assert part_lines(tmp_path) == {"demo": 3}
    (tmp_path / "c.py").write_text("# fedsec: open\nv = 4\n")
    with pytest.raises(ValueError, match="not closed"):
        part_lines(tmp_path)


# -- end to end on Flower's simulation engine ---------------------------------------


@pytest.fixture(scope="module")
def example() -> Iterator[Any]:
    """The example's package on ``sys.path`` (Flower hands it to the Ray workers)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import fedsec_example.client_app
        import fedsec_example.server_app

        yield fedsec_example
    finally:
        sys.path.remove(str(EXAMPLE))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reply-signing keys as ``fedsec certs OUT --nodes 6`` writes them."""
    from fedsec.deploy.certs import write_deployment_keys

    made = write_deployment_keys(tmp_path_factory.mktemp("certs") / "out", nodes=NUM_CLIENTS)
    return made.signing_dir


def _simulate(
    example: Any,
    parts: frozenset[str],
    keys: Path,
    state: Path,
    collusion: Any = None,
    settings: dict[str, Any] | None = None,
) -> tuple[Any, Any, float]:
    """Run the app on Ray; (Result, strategy, wall seconds)."""
    import torch
    from flwr.simulation import run_simulation

    done: list[tuple[Any, Any]] = []
    state.mkdir()
    torch.manual_seed(SEED)  # the server's initial model
    server = example.server_app.make_server_app(
        parts,
        keys_dir=keys,
        collusion=collusion,
        on_result=lambda result, strategy: done.append((result, strategy)),
        settings=settings,
    )
    client = example.client_app.make_client_app(
        parts, keys_dir=keys, state_dir=state, collusion=collusion
    )
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    wall = time.perf_counter() - started
    assert done, f"the ServerApp with parts {sorted(parts)} did not finish its rounds"
    result, strategy = done[0]
    return result, strategy, wall


def _final_accuracy(result: Any) -> float:
    last = max(result.evaluate_metrics_serverapp)
    return float(result.evaluate_metrics_serverapp[last]["accuracy"])


DEFENSES = frozenset(PARTS) - {"collusion"}


@pytest.mark.example
@pytest.mark.simulation
def test_every_defense_stays_within_two_points_of_fedavg(
    example: Any, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr.serverapp.strategy import FedAvg

    from fedsec.strategies import FedSecStrategy, SecureAggregation, SignatureFilter

    plain, plain_strategy, plain_wall = _simulate(example, frozenset(), keys, tmp_path / "a")
    assert type(plain_strategy) is FedAvg
    fedsec, strategy, fedsec_wall = _simulate(example, DEFENSES, keys, tmp_path / "b")
    assert isinstance(strategy, FedSecStrategy)
    assert isinstance(strategy.secure, SecureAggregation) and strategy.secure.bucketed
    assert any(isinstance(f, SignatureFilter) for f in strategy.filters)

    rounds = max(fedsec.train_metrics_clientapp)
    for r, metrics in fedsec.train_metrics_clientapp.items():
        # Every round was a bucketed secure round of every client; none was lost.
        assert metrics["secagg_buckets"] == NUM_CLIENTS // 2, (r, dict(metrics))
        assert metrics["secagg_buckets_unmasked"] == NUM_CLIENTS // 2, (r, dict(metrics))
        assert metrics["num-accepted"] == NUM_CLIENTS, (r, dict(metrics))
    # Each client's DP ledger recorded every round it trained.
    ledgers = sorted((tmp_path / "b" / "privacy").glob("partition-*.json"))
    assert len(ledgers) == NUM_CLIENTS
    assert rounds == max(plain.train_metrics_clientapp)

    baseline, defended = _final_accuracy(plain), _final_accuracy(fedsec)
    with capsys.disabled():
        print(
            f"\nworked example, {rounds} rounds: FedAvg {baseline:.4f} ({plain_wall:.1f} s), "
            f"fedsec {defended:.4f} ({fedsec_wall:.1f} s), lines {part_lines()}"
        )
    assert baseline > 0.9, f"FedAvg reached only {baseline:.3f}: the example does not converge"
    assert defended >= baseline - MARGIN, f"fedsec {defended:.4f} vs FedAvg {baseline:.4f}"


@pytest.mark.example
@pytest.mark.simulation
def test_colluding_clients_act_through_the_masked_rounds(
    example: Any, keys: Path, tmp_path: Path
) -> None:
    from fedsec.simulation import Collusion
    from fedsec.strategies.adversary import AdversaryFilter

    collusion = Collusion("alie", malicious={0, 1}, seed=SEED)
    rounds = 2
    result, strategy, _ = _simulate(
        example,
        DEFENSES,
        keys,
        tmp_path / "c",
        collusion=collusion,
        settings={"num-server-rounds": rounds, "fraction-evaluate": 0.0},
    )
    adversary = [f for f in strategy.filters if isinstance(f, AdversaryFilter)]
    assert len(adversary) == 1
    # The colluders pooled their updates and sent crafted ones, masked, every round.
    assert adversary[0].rounds_attacked == rounds
    assert sorted(result.train_metrics_clientapp) == list(range(1, rounds + 1))
