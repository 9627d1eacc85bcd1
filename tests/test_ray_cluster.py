"""A simulation on an existing Ray cluster: a head and a worker started with `ray start`.

The cluster is private to the test: its own temp dir and ports, each `ray start`
in its own process group. Teardown stops exactly those processes; it never runs
`ray stop`, which would end every Ray instance on the machine (a user's running
simulation included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def _ray_start(temp_dir: str, *args: str) -> subprocess.Popen[bytes]:
    """`ray start --block`: it stays in the foreground, in a process group of its own."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--temp-dir", temp_dir, "--num-cpus", "1",
         "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )  # fmt: skip


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (our private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop(starts: list[subprocess.Popen[bytes]], temp_dir: str) -> None:
    """Stop the processes this test started, and only those."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for start in starts:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(start.pid, sig)  # `ray start` and the node processes it spawned
        if sys.platform.startswith("linux"):
            for pid in _processes_mentioning(temp_dir):  # any that left the group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(s.poll() is None for s in starts):
            time.sleep(0.2)
    for start in starts:
        start.wait(timeout=30)


def _wait_for_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not open port {port} in {timeout:.0f} s")


@pytest.fixture
def bystander() -> Iterator[None]:
    """A process that `ray stop` would kill (its command line names a Ray worker).

    It stands for someone else's Ray instance: it must survive the test.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)", "default_worker.py"],
        start_new_session=True,
    )
    try:
        yield
        assert process.poll() is None, "the test's teardown stopped a process it did not start"
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def cluster() -> Iterator[str]:
    # Short: Ray puts unix sockets under it (about 100 characters at most).
    temp_dir = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    starts: list[subprocess.Popen[bytes]] = []
    try:
        head = ["--head", "--port", str(port), "--include-dashboard", "false"]
        ports = ["--node-manager-port", str(_free_port())]
        starts.append(_ray_start(temp_dir, *head, *ports))
        _wait_for_port(port)
        starts.append(_ray_start(temp_dir, "--address", address))
        yield address
    finally:
        _stop(starts, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _active_nodes(address: str) -> int:
    status = _ray("status", "--address", address).stdout
    if "Active:" not in status:  # the head is up but has no report yet
        return 0
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return len(re.findall(r"node_[0-9a-f]+", active))


def test_simulation_runs_on_a_two_node_ray_cluster(
    bystander: None, cluster: str, tmp_path: Path
) -> None:
    for _ in range(60):  # the worker needs a moment to show up
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
