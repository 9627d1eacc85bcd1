"""A simulation on an existing Ray cluster: a head and a worker started with `ray start`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.simulation,
    pytest.mark.skipif(not (BIN / "ray").exists(), reason="the ray CLI is not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def cluster() -> Iterator[str]:
    address = f"127.0.0.1:{_free_port()}"
    port = address.split(":")[1]
    try:
        head = _ray("start", "--head", "--port", port, "--num-cpus", "1", "--include-dashboard",
                    "false", "--disable-usage-stats")  # fmt: skip
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _ray("start", "--address", address, "--num-cpus", "1", "--disable-usage-stats")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address
    finally:
        _ray("stop")


def _active_nodes(address: str) -> int:
    status = _ray("status", "--address", address).stdout
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return len(re.findall(r"node_[0-9a-f]+", active))


def test_simulation_runs_on_a_two_node_ray_cluster(cluster: str, tmp_path: Path) -> None:
    for _ in range(30):  # the worker needs a moment to show up
        if _active_nodes(cluster) == 2:
            break
        subprocess.run(["sleep", "1"], check=True)
    assert _active_nodes(cluster) == 2
    config = tmp_path / "cluster.toml"
    config.write_text(
        "[experiment]\nname = 'cluster'\nrounds = 2\n[data]\nnum_clients = 4\n"
        f"[client]\nlocal_epochs = 1\n[simulation]\nray_address = '{cluster}'\n"
        "cpus_per_client = 1.0\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", "run", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "results" / "cluster" / "metrics.json").read_text())
    assert metrics["finished"] and [r["status"] for r in metrics["rounds"]] == [
        "initial",
        "ok",
        "ok",
    ]
    assert all(r["num-accepted"] == 4 for r in metrics["rounds"][1:])
