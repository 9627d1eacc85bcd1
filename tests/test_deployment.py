"""Flower's deployment engine as separate processes: TLS, SuperNode authentication, dropouts.

One SuperLink (TLS, ``--enable-supernode-auth``) and four registered SuperNodes
on loopback run ``simulations/deploy_tls.toml`` with ``flwr run``: 2 rounds of
bucketed secure aggregation with a coordinate median and distributed DP, every
reply signed with the node's key from ``fedsec certs`` and checked by the
ServerApp (none may be rejected). One
SuperNode is killed once round 1 is recorded (round 2's keys were already set
up during round 1, so it dies inside round 2): its bucket falls below 2 and is
discarded, never unmasked, and round 2 completes with the other bucket.
A SuperNode whose key was never registered and one that connects without TLS
must both be refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsec.deploy.certs import write_deployment_keys

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "simulations" / "deploy_tls.toml"
NODES = 4

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        not (BIN / "flower-superlink").exists(), reason="Flower's deployment CLIs not installed"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Processes:
    """Started processes (each in its own session), killed with their children at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.started[name]
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name in self.started:
            self.kill(name)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return [d for c in children for d in (*_descendants(c), c)]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Processes, Path, dict[str, str]]]:
    keys = write_deployment_keys(tmp_path / "keys", nodes=NODES + 1)  # the last: unregistered
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{keys.ca_cert}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FEDSEC_SIMULATED_ADVERSARY", None)  # a deployment, not a simulation
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, env)
    try:
        procs.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile", str(keys.ca_cert),
            "--ssl-certfile", str(keys.server_cert),
            "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert time.monotonic() < deadline, procs.log("superlink")[-2000:]
            time.sleep(0.25)
        for i in range(NODES):
            registered = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(keys.node_public_keys[i]), "tls"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr
        yield procs, tmp_path, {"port": str(port), "keys": str(keys.folder)}
    finally:
        procs.close()


def _supernode(
    procs: Processes, name: str, i: int, port: int, *auth: str, signing_key: Path | None = None
) -> None:
    node_config = f"partition-id={i} num-partitions={NODES}"
    if signing_key is not None:
        node_config += f" signing-key='{signing_key}'"
    procs.start(
        name,
        "flower-supernode",
        *auth,
        "--superlink", f"127.0.0.1:{port}",
        "--host", "127.0.0.1",
        "--port", str(_free_port()),
        "--max-retries", "3",
        "--node-config", node_config,
    )  # fmt: skip


def test_tls_deployment_with_node_auth_survives_a_killed_supernode(
    deployment: tuple[Processes, Path, dict[str, str]],
) -> None:
    procs, tmp, info = deployment
    port, keys = int(info["port"]), Path(info["keys"])
    tls = ("--root-certificates", str(keys / "ca.crt"))
    for i in range(NODES):
        _supernode(procs, f"node-{i}", i, port, *tls, "--auth-supernode-private-key",
                   str(keys / f"supernode-{i}.key"),
                   signing_key=keys / "signing" / f"client-{i}.pem")  # fmt: skip
    # Refused: a key the SuperLink never registered, and a connection without TLS.
    _supernode(procs, "unregistered", 0, port, *tls, "--auth-supernode-private-key",
               str(keys / f"supernode-{NODES}.key"))  # fmt: skip
    _supernode(procs, "no-tls", 0, port, "--insecure")

    # The shipped config with the server's registry of signing keys set to this test's.
    relative = 'key_dir = "keys/signing"'
    assert relative in CONFIG.read_text()
    config = tmp / "deploy_tls.toml"
    config.write_text(CONFIG.read_text().replace(relative, f'key_dir = "{keys / "signing"}"'))
    results = tmp / "results"
    run = subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", "tls", "--stream", "--run-config",
         f"config-file='{config}' results-dir='{results}'"],
        cwd=ROOT, env=procs.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    metrics = results / "deploy-tls" / "metrics.json"
    deadline = time.monotonic() + 170
    killed = False
    while run.poll() is None and time.monotonic() < deadline:
        if not killed and metrics.exists():
            rounds = json.loads(metrics.read_text())["rounds"]
            if any(r["round"] == 1 for r in rounds):
                procs.kill("node-0")  # during round 2: its set-up already rode on round 1
                killed = True
        time.sleep(0.2)
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    output = run.communicate()[0].decode(errors="replace")
    assert run.returncode == 0, output[-3000:]
    assert killed

    data = json.loads(metrics.read_text())
    rounds = {r["round"]: r for r in data["rounds"]}
    assert data["finished"] and rounds[1]["status"] == "ok" and rounds[2]["status"] == "ok", rounds
    assert rounds[1]["num-accepted"] == NODES
    assert rounds[1]["signatures_rejected"] == 0 and rounds[2]["signatures_rejected"] == 0
    assert rounds[2]["secagg_pipelined"] == 1
    assert rounds[2]["num-accepted"] == NODES - 2  # node 0 and its bucket partner
    assert (rounds[2]["secagg_buckets"], rounds[2]["secagg_buckets_unmasked"]) == (2, 1)
    assert rounds[2]["secagg_min_bucket"] == 2
    assert rounds[2]["dp_distributed_epsilon"] > rounds[1]["dp_distributed_epsilon"] > 0

    for name in ("unregistered", "no-tls"):
        process = procs.started[name]
        process.wait(timeout=30)
        assert process.returncode not in (0, None), procs.log(name)[-1500:]
    assert "Failed to activate SuperNode" in procs.log("unregistered")
    nodes = subprocess.run(
        [str(BIN / "flwr"), "supernode", "ls", "tls", "--format", "json"],
        env=procs.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert nodes.returncode == 0, nodes.stderr
    assert nodes.stdout.count('"online"') + nodes.stdout.count('"offline"') <= NODES
    times = {n: round(r["round_time_s"], 1) for n, r in rounds.items() if n}
    print(
        f"round times {times}; round 2: {rounds[2]['num-accepted']} accepted, "
        f"{rounds[2]['secagg_buckets_unmasked']} of {rounds[2]['secagg_buckets']} buckets"
    )
