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

The SuperLink runs as the README's LAN walkthrough starts it
(``python -m fedsec.deploy.lan_superlink``): the Fleet API alone on the "LAN"
address (127.0.0.2 stands in for it), the Control and Runtime APIs on
127.0.0.1, where the administrator registers keys and runs ``flwr run``. An
outsider on the LAN holding only ``ca.crt`` can neither register a SuperNode
key nor submit a run (issue 16, case 1): under plain ``flower-superlink``
both succeed, since Flower 1.42 serves every API on one port.

Both tests run from an installed wheel, as a user's machines would: a
session fixture builds fedsec's wheel from a clean copy of the tree, installs
it (non-editable, with torch) into a fresh virtual environment, and every
process -- the SuperLink, the SuperNodes, the ``flwr`` CLI and the
``flower-superexec``/``flwr-serverapp``/``flwr-clientapp`` processes Flower
spawns from PATH -- comes from that environment, started outside the checkout
with no PYTHONPATH, so the checkout cannot be imported. ``flwr run`` is still
given the repository: its pyproject builds the FAB (configuration only).

A second test runs ``simulations/deploy_ledger.toml`` (local DP, a budget of
exactly 2 rounds, 4 rounds) on two registered SuperNodes, each with its own
``state-dir``: SuperNode 0 is killed with -9 after round 1 and started again
with the same key and folder, and must continue its privacy ledger (issue 16,
case 2): both nodes end with 2 rounds spent and refuse the rest.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wheel_build import build_wheel, clean_copy

from fedsec.client.privacy import LEDGER_SUBDIR, STATE_DIR_KEY, ledger_file_name
from fedsec.config import load_config
from fedsec.deploy.certs import write_deployment_keys
from fedsec.privacy.accounting import Accountant, check_accountant, epsilon_for_history

ROOT = Path(__file__).resolve().parents[1]
DEV_BIN = Path(sys.executable).parent  # the dev venv's, which no deployed process may use
CONFIG = ROOT / "simulations" / "deploy_tls.toml"
NODES = 4
LAN = "127.0.0.2"  # the SuperLink's LAN address (Fleet API only); the admin side is 127.0.0.1
ADMIN = "127.0.0.1"


def _free_port(host: str = ADMIN) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def _can_bind(host: str) -> bool:
    try:
        _free_port(host)
    except OSError:
        return False
    return True


def _connection(home: Path, name: str, address: str, ca_cert: Path) -> None:
    """A flwr CLI home whose only (and default) SuperLink connection is ``name``."""
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not _can_bind(LAN), reason=f"cannot bind {LAN} (no 127/8 loopback)"),
]

# ---- fedsec installed from its wheel into a fresh virtual environment --------------------

TORCH = "torch==2.13.0"  # as scripts/setup.sh pins it on CPU machines (the CPU wheel)
# Flower starts these from PATH; each must be the wheel environment's.
SPAWNED = ("flower-superexec", "flwr-serverapp", "flwr-clientapp")


@dataclass(frozen=True)
class WheelEnv:
    """A virtual environment holding fedsec's wheel (non-editable) and its dependencies."""

    venv: Path
    bin: Path
    site_packages: Path
    cwd: Path  # every process starts here: outside the checkout
    env: dict[str, str]  # PATH starts with bin, no dev venv, no PYTHONPATH
    wheel_s: float
    venv_s: float
    install_s: float


def _outside_env(bin_dir: Path) -> dict[str, str]:
    """os.environ with ``bin_dir`` first on PATH and nothing that reaches the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    path = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and not Path(p).resolve().is_relative_to(ROOT) and Path(p) != DEV_BIN
    ]
    env["PATH"] = os.pathsep.join([str(bin_dir), *path])
    return env


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> WheelEnv:
    """Build the wheel from a clean copy, make a venv, install the wheel and torch into it.

    No ``--system-site-packages``: nothing of the dev environment (whose fedsec
    is the editable checkout) is visible from it.
    """
    tmp = tmp_path_factory.mktemp("wheel-env")
    started = time.monotonic()
    wheel = build_wheel(clean_copy(tmp / "src"), tmp)
    built = time.monotonic()
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    made = time.monotonic()
    bin_dir = venv / "bin"
    cwd = tmp / "cwd"
    cwd.mkdir()
    env = _outside_env(bin_dir)
    pip = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", TORCH, str(wheel)],
        cwd=cwd, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert pip.returncode == 0, f"pip install {TORCH} {wheel.name} failed:\n{pip.stderr[-3000:]}"
    installed = time.monotonic()
    site = subprocess.run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return WheelEnv(
        venv, bin_dir, Path(site.stdout.strip()), cwd, env,
        built - started, made - built, installed - made,
    )  # fmt: skip


def test_wheel_env_imports_fedsec_from_its_site_packages_only(wheel_env: WheelEnv) -> None:
    """The environment's python finds fedsec in site-packages: no finder, no checkout."""
    code = (
        "import sys, fedsec, fedsec.strategies.server_app, fedsec.client.app;"
        "assert not any('editable' in repr(f).lower() for f in sys.meta_path), sys.meta_path;"
        "print(fedsec.strategies.__file__); print(fedsec.client.app.__file__)"
    )
    out = subprocess.run(
        [str(wheel_env.bin / "python"), "-c", code],
        cwd=wheel_env.cwd, env=wheel_env.env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert Path(line).is_relative_to(wheel_env.site_packages / "fedsec"), out.stdout
    assert not any((wheel_env.site_packages).glob("__editable__*"))
    for tool in ("flower-superlink", "flower-supernode", "flwr", *SPAWNED):
        assert (wheel_env.bin / tool).exists(), tool
    print(
        f"wheel {wheel_env.wheel_s:.1f} s, venv {wheel_env.venv_s:.1f} s, "
        f"pip install {TORCH} + wheel {wheel_env.install_s:.1f} s"
    )


class Processes:
    """Started processes (each in its own session), killed with their children at the end."""

    def __init__(self, logs: Path, env: dict[str, str], bin_dir: Path, cwd: Path) -> None:
        self.logs = logs
        self.env = env
        self.bin = bin_dir
        self.cwd = cwd
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        # What Flower spawned from PATH under the started processes: pid -> argv.
        self.spawned: dict[int, list[str]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.cwd,
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

    def record_spawned(self) -> None:
        """Note the argv of every Flower process now running under a started one."""
        for process in self.started.values():
            for pid in _descendants(process.pid):
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                    if any(Path(a).name in SPAWNED for a in argv[:2]):
                        self.spawned[pid] = [a for a in argv if a]

    def assert_spawned_from(self, bin_dir: Path) -> None:
        """Every recorded Flower process ran ``bin_dir``'s interpreter and script."""
        seen = {Path(argv[1]).name for argv in self.spawned.values() if len(argv) > 1}
        assert {"flower-superexec", "flwr-serverapp", "flwr-clientapp"} <= seen, self.spawned
        for argv in self.spawned.values():
            assert Path(argv[0]).parent == bin_dir and Path(argv[1]).parent == bin_dir, argv

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name in self.started:
            self.kill(name)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return [d for c in children for d in (*_descendants(c), c)]


@dataclass
class Deployment:
    """A running split SuperLink: its processes, addresses, keys and CLI homes."""

    procs: Processes
    tmp: Path
    keys: Path
    fleet: str  # host:port on the LAN address: the Fleet API, nothing else
    admin: str  # host:port on loopback: the Control and Runtime APIs
    outsider_env: dict[str, str]  # a LAN machine's flwr CLI, holding only ca.crt


@pytest.fixture
def deployment(tmp_path: Path, wheel_env: WheelEnv) -> Iterator[Deployment]:
    # The last key pair is never registered; LAN is in the server certificate's names.
    keys = write_deployment_keys(tmp_path / "keys", nodes=NODES + 1, hosts=(LAN,))
    admin = f"{ADMIN}:{_free_port(ADMIN)}"
    fleet = f"{LAN}:{_free_port(LAN)}"
    home = tmp_path / "flwr-home"
    _connection(home, "tls", admin, keys.ca_cert)  # the administrator's, on the SuperLink host
    env = {
        **wheel_env.env,  # the wheel's venv first on PATH, no PYTHONPATH, no dev venv
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FEDSEC_SIMULATED_ADVERSARY", None)  # a deployment, not a simulation
    outsider_home = tmp_path / "outsider-home"
    _connection(outsider_home, "lan", fleet, keys.ca_cert)  # all a client machine holds
    logs = tmp_path / "logs"
    logs.mkdir()
    cwd = tmp_path / "cwd"  # every process starts outside the checkout
    cwd.mkdir()
    procs = Processes(logs, env, wheel_env.bin, cwd)
    try:
        # As the README starts it: the Fleet API alone on the LAN address, the rest on loopback.
        procs.start(
            "superlink",
            "python", "-m", "fedsec.deploy.lan_superlink",
            "--fleet-host", LAN,
            "--fleet-port", str(_split(fleet)[1]),
            "--host", ADMIN,
            "--port", str(_split(admin)[1]),
            "--ssl-ca-certfile", str(keys.ca_cert),
            "--ssl-certfile", str(keys.server_cert),
            "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not (_listening(*_split(admin)) and _listening(*_split(fleet))):
            assert procs.started["superlink"].poll() is None, procs.log("superlink")[-2000:]
            assert time.monotonic() < deadline, procs.log("superlink")[-2000:]
            time.sleep(0.25)
        for i in range(NODES):
            registered = _flwr(
                procs, env, "supernode", "register", str(keys.node_public_keys[i]), "tls"
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr
        outsider_env = {**env, "FLWR_HOME": str(outsider_home)}
        yield Deployment(procs, tmp_path, keys.folder, fleet, admin, outsider_env)
    finally:
        procs.close()


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _flwr(procs: Processes, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The deployment's ``flwr`` CLI (the wheel's venv), run outside the checkout with ``env``."""
    return subprocess.run(
        [str(procs.bin / "flwr"), *args],
        cwd=procs.cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def start_supernode(
    d: Deployment,
    name: str,
    i: int,
    *auth: str,
    signing_key: Path | None = None,
    partitions: int = NODES,
    state_dir: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start SuperNode ``name`` for partition ``i`` on the LAN address (call again to restart)."""
    node_config = f"partition-id={i} num-partitions={partitions}"
    if signing_key is not None:
        node_config += f" signing-key='{signing_key}'"
    if state_dir is not None:
        node_config += f" {STATE_DIR_KEY}='{state_dir}'"
    return d.procs.start(
        name,
        "flower-supernode",
        *auth,
        "--superlink", d.fleet,
        "--host", ADMIN,
        "--port", str(_free_port()),
        "--max-retries", "3",
        "--node-config", node_config,
    )  # fmt: skip


def start_registered_supernode(
    d: Deployment,
    i: int,
    *,
    name: str | None = None,
    partitions: int = NODES,
    state_dir: Path | None = None,
) -> subprocess.Popen[bytes]:
    """SuperNode ``node-i`` (or ``name``): TLS, its registered key, its reply-signing key."""
    return start_supernode(
        d, name or f"node-{i}", i,
        "--root-certificates", str(d.keys / "ca.crt"),
        "--auth-supernode-private-key", str(d.keys / f"supernode-{i}.key"),
        signing_key=d.keys / "signing" / f"client-{i}.pem",
        partitions=partitions,
        state_dir=state_dir,
    )  # fmt: skip


def submit_run(d: Deployment, shipped: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``flwr run`` of a shipped config whose signatures.key_dir is set to this test's keys.

    Returns the streaming ``flwr run`` process and the run's results folder.
    """
    relative = 'key_dir = "keys/signing"'
    assert relative in shipped.read_text()
    config = d.tmp / shipped.name
    config.write_text(shipped.read_text().replace(relative, f'key_dir = "{d.keys / "signing"}"'))
    results = d.tmp / "results"
    run = subprocess.Popen(
        [str(d.procs.bin / "flwr"), "run", str(ROOT), "tls", "--stream", "--run-config",
         f"config-file='{config}' results-dir='{results}'"],
        cwd=d.procs.cwd, env=d.procs.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return run, results


def assert_outsider_locked_out(d: Deployment) -> None:
    """A LAN machine holding only ca.crt can neither register a key nor submit a run.

    Its flwr CLI points at the address the SuperNodes use. The key it offers is
    the one the test's "unregistered" SuperNode uses, so a registration that
    slipped through would also show as that SuperNode being admitted.
    """
    rogue = d.keys / f"supernode-{NODES}.pub"
    register = _flwr(d.procs, d.outsider_env, "supernode", "register", str(rogue), "lan")
    out = register.stdout + register.stderr
    assert register.returncode != 0, f"an outsider registered a SuperNode key:\n{out}"
    assert "only the Fleet API is served on this address" in out, out
    run = _flwr(
        d.procs,
        d.outsider_env,
        "run",
        str(ROOT),
        "lan",
        "--run-config",
        "config-file='nowhere.toml'",
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0, f"an outsider submitted a run:\n{out}"
    assert "only the Fleet API is served on this address" in out, out
    # Nor is the Runtime API (a ServerApp's tasks and messages) on the LAN address.
    host, port = _split(d.fleet)
    context = ssl.create_default_context(cafile=str(d.keys / "ca.crt"))
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    try:
        conn.request("POST", "/v1/runtime/acquire-task", body=b"",
                     headers={"content-type": "application/protobuf"})  # fmt: skip
        assert conn.getresponse().status == 404
    finally:
        conn.close()


def test_tls_deployment_with_node_auth_survives_a_killed_supernode(
    deployment: Deployment,
) -> None:
    d = deployment
    procs, keys = d.procs, d.keys
    # First, before any SuperNode is up: nobody on the LAN may register a key or start a run.
    assert_outsider_locked_out(d)
    for i in range(NODES):
        start_registered_supernode(d, i)
    # Refused: a key the SuperLink never registered, and a connection without TLS.
    start_supernode(d, "unregistered", 0, "--root-certificates", str(keys / "ca.crt"),
                    "--auth-supernode-private-key", str(keys / f"supernode-{NODES}.key"))  # fmt: skip
    start_supernode(d, "no-tls", 0, "--insecure")

    run, results = submit_run(d, CONFIG)
    metrics = results / "deploy-tls" / "metrics.json"
    deadline = time.monotonic() + 600  # generous: 2-3.5 min on 2 idle cores, far more under load
    killed = False
    while run.poll() is None and time.monotonic() < deadline:
        if not killed and metrics.exists():
            rounds = json.loads(metrics.read_text())["rounds"]
            if any(r["round"] == 1 for r in rounds):
                procs.kill("node-0")  # during round 2: its set-up already rode on round 1
                killed = True
        procs.record_spawned()
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
    # The administrator's view: only the registered keys, and only the legitimate run.
    nodes = _flwr(procs, procs.env, "supernode", "ls", "tls", "--format", "json")
    assert nodes.returncode == 0, nodes.stderr
    assert len(json.loads(nodes.stdout)["nodes"]) == NODES, nodes.stdout
    runs = _flwr(procs, procs.env, "ls", "tls", "--format", "json")
    assert runs.returncode == 0, runs.stderr
    (listed,) = json.loads(runs.stdout)["runs"]
    assert listed["status"] == "finished:completed", listed
    # Flower's processes (SuperExec, ServerApp, ClientApps) were the wheel env's.
    procs.assert_spawned_from(procs.bin)
    times = {n: round(r["round_time_s"], 1) for n, r in rounds.items() if n}
    print(
        f"round times {times}; round 2: {rounds[2]['num-accepted']} accepted, "
        f"{rounds[2]['secagg_buckets_unmasked']} of {rounds[2]['secagg_buckets']} buckets"
    )


# ---- a SuperNode restarted mid-run keeps its privacy spend (issue 16, case 2) -------------

LEDGER_CONFIG = ROOT / "simulations" / "deploy_ledger.toml"


def _ledger_history(path: Path) -> list[list[float]] | None:
    """A ledger file's history (None before the node's first round)."""
    try:
        return list(json.loads(path.read_text())["history"])
    except FileNotFoundError:
        return None


def _decision_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a run's decisions.jsonl (one per recorded round)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # the server is writing it
            break
    return lines


def _client(line: dict[str, Any], node: int) -> dict[str, Any]:
    """A node's entry in one round's decisions ("absent" when the round names it not)."""
    entries = [c for c in line["clients"] if c["node"] == node]
    return entries[0] if entries else {"node": node, "status": "absent"}


def _rounds_in_budget(budget: float, sigma: float, delta: float, accountant: Accountant) -> int:
    """How many local-DP rounds (one Gaussian mechanism each, q = 1) fit the budget."""
    rounds = 0
    while (
        epsilon_for_history([(sigma, 1.0, 1)] * (rounds + 1), delta=delta, accountant=accountant)
        <= budget
    ):
        rounds += 1
    return rounds


def test_supernode_killed_and_restarted_mid_run_keeps_its_privacy_spend(
    deployment: Deployment,
) -> None:
    """A SuperNode killed with -9 and started again continues its ledger from its state-dir.

    Two registered SuperNodes with local DP and a budget that fits exactly K
    rounds run K + 2 rounds. Node 0 is killed once round 1 is recorded and
    started again, same key and state-dir, once the server has seen it gone.
    Both nodes must end with exactly K rounds in their ledger files, never
    more than K accepted updates, and refuse the last round. A node whose
    ledger lived in memory only (Flower's node state, before issue 16) comes
    back with an empty history and trains again: more than K accepted updates,
    a ledger file that stopped growing, and a last round it does not refuse.
    """
    d = deployment
    cfg = load_config(LEDGER_CONFIG)
    dp, nodes, total = cfg.privacy, cfg.data.num_clients, cfg.experiment.rounds
    accountant = check_accountant(dp.accountant)
    budget_rounds = _rounds_in_budget(dp.epsilon_budget, dp.noise_multiplier, dp.delta, accountant)
    assert (dp.mode, budget_rounds, total) == ("local", 2, budget_rounds + 2)
    states = [d.tmp / f"state-{i}" for i in range(nodes)]  # each node's own, as on its machine
    ledgers = [state / LEDGER_SUBDIR / ledger_file_name(i) for i, state in enumerate(states)]
    for i, state in enumerate(states):
        state.mkdir()
        start_registered_supernode(d, i, partitions=nodes, state_dir=state)
    run, results = submit_run(d, LEDGER_CONFIG)
    decisions = results / cfg.experiment.name / "decisions.jsonl"

    deadline = time.monotonic() + 900  # generous: about 2 min on 2 idle cores
    seen: list[int] = []  # node 0's ledger length at every poll, in order
    node0, kill_round, killed_at, killed_with = 0, 0, 0.0, -1
    restarted_after = 0.0  # seconds from the kill to the restart
    while run.poll() is None and time.monotonic() < deadline:
        polled = _ledger_history(ledgers[0])
        if polled is not None:
            seen.append(len(polled))
        lines = _decision_lines(decisions)
        if not killed_at and lines:
            # Round 1 is recorded: node 0 has spent at least one round.
            node0 = next(c["node"] for c in lines[0]["clients"] if c["partition"] == 0)
            d.procs.kill("node-0")
            killed_at, kill_round = time.monotonic(), lines[-1]["round"]
            killed_with = len(_ledger_history(ledgers[0]) or [])
            seen.append(killed_with)
        elif killed_at and not restarted_after:
            # Start it again once the server has given up on it for a round (it
            # counts as online, and cannot re-activate, until two heartbeats are
            # missed), or after 150 s whatever the server saw.
            gone = any(
                line["round"] > kill_round and _client(line, node0)["status"] != "accepted"
                for line in lines
            )
            if gone or time.monotonic() - killed_at > 150:
                start_registered_supernode(
                    d, 0, name="node-0-restarted", partitions=nodes, state_dir=states[0]
                )
                restarted_after = time.monotonic() - killed_at
        d.procs.record_spawned()
        time.sleep(0.5)
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    output = run.communicate()[0].decode(errors="replace")
    assert run.returncode == 0, output[-3000:]
    assert restarted_after, output[-3000:]
    assert d.procs.started["node-0-restarted"].poll() is None, d.procs.log("node-0-restarted")
    runs = _flwr(d.procs, d.procs.env, "ls", "tls", "--format", "json")
    assert runs.returncode == 0, runs.stderr
    (listed,) = json.loads(runs.stdout)["runs"]
    assert listed["status"] == "finished:completed", listed
    d.procs.assert_spawned_from(d.procs.bin)

    # Node 0's history only grew: the restart continued it, never started it again at 1.
    final = _ledger_history(ledgers[0])
    assert final is not None
    seen.append(len(final))
    assert killed_with >= 1 and seen == sorted(seen), seen
    # Each file: exactly the budget's rounds, its epsilon the accountant's for that history.
    for i, path in enumerate(ledgers):
        data = json.loads(path.read_text())
        history = [(float(s), float(q), int(t)) for s, q, t in data["history"]]
        assert len(history) == budget_rounds, (i, history)
        epsilon = epsilon_for_history(history, delta=data["delta"], accountant=data["accountant"])
        assert data["epsilon_spent"] == pytest.approx(epsilon, rel=1e-12)
        assert data["epsilon_budget"] == dp.epsilon_budget and epsilon <= dp.epsilon_budget
        after = epsilon_for_history([*history, history[-1]], delta=dp.delta, accountant=accountant)
        assert after > dp.epsilon_budget, (i, after)

    # The server's view: who trained, who refused, round by round.
    lines = _decision_lines(decisions)
    assert [line["round"] for line in lines] == list(range(1, total + 1))
    partitions = {c["partition"]: c["node"] for c in lines[0]["clients"]}
    assert sorted(partitions) == list(range(nodes)) and partitions[0] == node0
    timeline: dict[int, list[str]] = {}
    for partition, node in sorted(partitions.items()):
        entries = [_client(line, node) for line in lines]
        accepted = [n for n, e in enumerate(entries, 1) if e["status"] == "accepted"]
        refused = [
            n
            for n, e in enumerate(entries, 1)
            if e["status"] == "excluded" and "privacy budget exhausted" in e.get("reason", "")
        ]
        missed = sorted(set(range(1, total + 1)) - set(accepted) - set(refused))
        timeline[partition] = [e["status"] for e in entries]
        # Never more updates than the budget allows, and refusals only once it is spent.
        assert 1 in accepted and len(accepted) <= budget_rounds, timeline
        assert refused and min(refused) > max(accepted) and total in refused, timeline
        if partition == 0:  # the one round it was dead for (or none, if it died idle)
            assert len(missed) <= 1 and all(n > kill_round for n in missed), timeline
        else:
            assert (accepted, refused) == (
                list(range(1, budget_rounds + 1)),
                list(range(budget_rounds + 1, total + 1)),
            ), timeline
    metrics = json.loads((results / cfg.experiment.name / "metrics.json").read_text())
    assert metrics["finished"]
    assert all(r.get("dp_epsilon_max", 0.0) <= dp.epsilon_budget for r in metrics["rounds"])
    print(
        f"node 0 killed after round {kill_round} with {killed_with} round(s) in its ledger, "
        f"restarted {restarted_after:.0f} s later; per partition {timeline}"
    )
