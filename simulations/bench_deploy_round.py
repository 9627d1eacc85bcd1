"""Where a deployed round's time goes: a TLS deployment on loopback, measured.

Starts one split SuperLink (``python -m fedsec.deploy.lan_superlink``: TLS,
``--enable-supernode-auth``, the Fleet API on its own port), registers and
starts ``--nodes`` SuperNodes with their own reply-signing keys, and runs
``flwr run`` of this repository's app with ``simulations/deploy_tls.toml``
(the digits quickstart model, bucketed SecAgg, distributed DP, signatures
required) for ``--rounds`` rounds. It checks that the run ended
``finished:completed`` (``flwr ls``; ``flwr run --stream`` exits 0 even when
the ServerApp fails) and prints, per round:

- wall time: the run's own ``round_time_s`` (results ``metrics.json``);
- messages per node: ``flwr-clientapp`` processes the SuperNodes started
  (Flower 1.42 starts one per message; each logs "Start `flwr-clientapp`
  process" to its SuperNode's output);
- CPU seconds of the SuperNodes' process trees (SuperNode, its
  ``flower-superexec``, the ``flwr-clientapp`` processes, the reaped ones
  included): the sum of utime, stime, cutime and cstime in
  ``/proc/<pid>/stat`` of every process in each tree, sampled when a round is
  recorded. Unlike wall time it barely moves when other work loads the cores.

Then the import cost of the ClientApp path: a fresh interpreter importing
what a message of each kind loads (median of ``--import-repeats``).

    python simulations/bench_deploy_round.py                # 4 nodes, 3 rounds
    python simulations/bench_deploy_round.py --rounds 4 --json out.json

Exit code 0: the run completed and was measured; 1: it did not; 2: bad
arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "simulations" / "deploy_tls.toml"
HOST = "127.0.0.1"
CLIENTAPP_START = "Start `flwr-clientapp` process"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: What a fresh ``flwr-clientapp`` process imports for each kind of message: Flower's
#: runtime, then the module the app's entry point names, then what the handler needs.
IMPORT_SETS: dict[str, list[str]] = {
    "flwr runtime only": ["flwr.supernode.runtime.run_clientapp"],
    "entry module (fedsec.client.app)": [
        "flwr.supernode.runtime.run_clientapp",
        "fedsec.client.app",
    ],
    "secagg key stage (advertise/share/check/unmask)": [
        "flwr.supernode.runtime.run_clientapp",
        "fedsec.client.app",
        "fedsec.secagg.client",
        "fedsec.config",
    ],
    "train (masked input) / evaluate": [
        "flwr.supernode.runtime.run_clientapp",
        "fedsec.client.app",
        "fedsec.secagg.client",
        "fedsec.client.handlers",
        # The quickstart's digits: fedsec.data reads scikit-learn's bundled file
        # with numpy (the load itself is in the run's CPU figures, not here).
        "fedsec.data.datasets",
    ],
}
#: Modules whose presence after importing the entry module the breakdown reports.
HEAVY = ("torch", "opacus", "sklearn", "scipy", "matplotlib", "ray", "pandas")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads' children), from /proc."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [
                    int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14-17 of proc(5); fields[0] here is field 3 (state).
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s process tree, its exited and reaped descendants included."""
    return sum(_cpu_seconds(p) for p in _tree(pid))


@dataclass
class Procs:
    """Started processes, each in its own session, killed with their trees at the end."""

    logs: Path
    env: dict[str, str]
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.started.values():
            # Each started process leads its own session, which its descendants inherit.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _flwr(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _config(tmp: Path, keys: Path, rounds: int) -> Path:
    """deploy_tls.toml with this deployment's key folder and ``rounds`` rounds."""
    text = CONFIG.read_text()
    text, n_keys = re.subn(r'(?m)^key_dir = "keys/signing"$', f'key_dir = "{keys}"', text)
    text, n_rounds = re.subn(r"(?m)^rounds = \d+$", f"rounds = {rounds}", text)
    if (n_keys, n_rounds) != (1, 1):
        raise RuntimeError(f"{CONFIG} no longer has one 'key_dir' and one 'rounds' line")
    path = tmp / CONFIG.name
    path.write_text(text)
    return path


@contextlib.contextmanager
def deployment(tmp: Path, nodes: int) -> Iterator[tuple[Procs, list[int]]]:
    """A TLS SuperLink with node authentication and ``nodes`` registered SuperNodes."""
    from fedsec.deploy.certs import write_deployment_keys

    keys = write_deployment_keys(tmp / "keys", nodes=nodes)
    admin, fleet = _free_port(), _free_port()
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "{HOST}:{admin}"\n'
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
    logs = tmp / "logs"
    logs.mkdir()
    procs = Procs(logs, env)
    try:
        procs.start(
            "superlink",
            "python", "-m", "fedsec.deploy.lan_superlink",
            "--fleet-host", HOST, "--fleet-port", str(fleet),
            "--host", HOST, "--port", str(admin),
            "--ssl-ca-certfile", str(keys.ca_cert),
            "--ssl-certfile", str(keys.server_cert),
            "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (_listening(admin) and _listening(fleet)):
            if procs.started["superlink"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("SuperLink did not start:\n" + procs.log("superlink")[-2000:])
            time.sleep(0.25)
        node_pids = []
        for i in range(nodes):
            reg = _flwr(env, "supernode", "register", str(keys.node_public_keys[i]), "bench")
            if reg.returncode != 0:
                raise RuntimeError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
            signing = keys.folder / "signing" / f"client-{i}.pem"
            node = procs.start(
                f"node-{i}",
                "flower-supernode",
                "--root-certificates", str(keys.ca_cert),
                "--auth-supernode-private-key", str(keys.folder / f"supernode-{i}.key"),
                "--superlink", f"{HOST}:{fleet}",
                "--host", HOST, "--port", str(_free_port()),
                "--max-retries", "3",
                "--node-config",
                f"partition-id={i} num-partitions={nodes} signing-key='{signing}'",
            )  # fmt: skip
            node_pids.append(node.pid)
        yield procs, node_pids
    finally:
        procs.close()


def _rounds_recorded(metrics: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being written
        return []
    return [r for r in data.get("rounds", []) if r.get("round", 0) >= 1]


def run_bench(nodes: int, rounds: int, timeout: float, keep: bool) -> dict[str, Any]:
    """One measured deployment run; raises RuntimeError if it does not complete."""
    tmp = Path(tempfile.mkdtemp(prefix="fedsec-bench-deploy-"))
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with deployment(tmp, nodes) as (procs, node_pids):
        config = _config(tmp, tmp / "keys" / "signing", rounds)
        results = tmp / "results"
        started = time.monotonic()
        submit = _flwr(
            procs.env, "run", ".", "bench", "--format", "json",
            "--run-config", f"config-file='{config}' results-dir='{results}'",
        )  # fmt: skip
        try:
            run_id = json.loads(submit.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run failed: {submit.stdout}{submit.stderr}") from None
        if run_id is None:
            raise RuntimeError(f"flwr run refused the run: {submit.stdout}")
        metrics = results / "deploy-tls" / "metrics.json"
        samples: list[tuple[int, float, list[int], list[float]]] = []

        def sample(done: int) -> None:
            cpu = [tree_cpu(pid) for pid in node_pids]
            msgs = [procs.log(f"node-{i}").count(CLIENTAPP_START) for i in range(nodes)]
            samples.append((done, time.monotonic() - started, msgs, cpu))

        sample(0)
        status, deadline = "", time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = len(_rounds_recorded(metrics))
            if done > samples[-1][0]:
                sample(done)
            listed = _flwr(procs.env, "ls", "bench", "--run-id", str(run_id), "--format", "json")
            with contextlib.suppress(json.JSONDecodeError, KeyError, IndexError):
                status = json.loads(listed.stdout)["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(0.5)
        done = len(_rounds_recorded(metrics))
        if done > samples[-1][0]:
            sample(done)
        if status != "finished:completed":
            tails = "\n".join(
                f"--- {name} ---\n{procs.log(name)[-1500:]}" for name in procs.started
            )
            raise RuntimeError(
                f"run {run_id} ended '{status or 'unfinished'}' (kept {tmp})\n{tails}"
            )
        recorded = _rounds_recorded(metrics)
        final = json.loads(metrics.read_text()).get("final", {})
    per_round = []
    for (_, _, m0, c0), (n1, _, m1, c1) in itertools.pairwise(samples):
        r = recorded[n1 - 1]
        per_round.append(
            {
                "round": r["round"],
                "wall_s": r["round_time_s"],
                "messages_per_node": [b - a for a, b in zip(m0, m1, strict=True)],
                "cpu_s": sum(c1) - sum(c0),
                "stages": sorted(
                    k[len("secagg_") : -2] for k in r if re.fullmatch(r"secagg_.+_s", k)
                ),
            }
        )
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "nodes": nodes,
        "rounds": per_round,
        "final_accuracy": final.get("test_accuracy"),
        "loadavg_before": load_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
    }


def import_breakdown(repeats: int) -> dict[str, Any]:
    """Seconds a fresh interpreter takes to import each set (median), and what it pulls in."""
    out: dict[str, Any] = {}
    for label, modules in IMPORT_SETS.items():
        code = (
            "import importlib, json, sys, time\n"
            f"t = time.perf_counter()\nmissing = []\n"
            f"for m in {modules!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except ModuleNotFoundError:\n        missing.append(m)\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'missing': missing,"
            f" 'heavy': [h for h in {list(HEAVY)!r} if h in sys.modules]}}))"
        )
        times, info = [], {}
        for _ in range(repeats):
            cpu0 = os.times()
            res = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
            )
            cpu1 = os.times()
            info = json.loads(res.stdout.strip().splitlines()[-1])
            times.append(
                (
                    info["s"],
                    cpu1.children_user
                    + cpu1.children_system
                    - cpu0.children_user
                    - cpu0.children_system,
                )
            )
        out[label] = {
            "import_s": statistics.median(t for t, _ in times),
            "process_cpu_s": statistics.median(c for _, c in times),
            "heavy_loaded": info["heavy"],
            "missing": info["missing"],
        }
    return out


def _print_imports(result: dict[str, Any]) -> None:
    for label, b in result.get("imports", {}).items():
        heavy = ",".join(b["heavy_loaded"]) or "-"
        cost = f"{b['import_s']:.2f} s (process CPU {b['process_cpu_s']:.2f} s)"
        print(f"import {label}: {cost}; heavy: {heavy}")


def _print(result: dict[str, Any]) -> None:
    before, after = (" ".join(result[k]) for k in ("loadavg_before", "loadavg_after"))
    print(f"loadavg before {before}, after {after}")
    print(f"{'round':>5} {'wall s':>8} {'CPU s':>8} {'msgs/node':>12}  stages")
    for r in result["rounds"]:
        msgs = "/".join(str(m) for m in r["messages_per_node"])
        stages = ",".join(r["stages"])
        print(f"{r['round']:>5} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {msgs:>12}  {stages}")
    later = result["rounds"][1:] or result["rounds"]
    print(
        f"steady state (rounds {later[0]['round']}-{later[-1]['round']}): "
        f"wall {statistics.mean(r['wall_s'] for r in later):.1f} s, "
        f"CPU {statistics.mean(r['cpu_s'] for r in later):.1f} s per round; "
        f"final accuracy {result['final_accuracy']}"
    )
    _print_imports(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the run may take")
    parser.add_argument("--import-repeats", type=int, default=3)
    parser.add_argument("--skip-run", action="store_true", help="only the import breakdown")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 2 <= args.nodes <= 64:
        parser.error(f"--nodes must be in [2, 64], got {args.nodes}")
    if not 1 <= args.rounds <= 50:
        parser.error(f"--rounds must be in [1, 50], got {args.rounds}")
    if args.import_repeats < 0:
        parser.error("--import-repeats must be >= 0")
    result: dict[str, Any] = {"rounds": []}
    if not args.skip_run:
        try:
            result = run_bench(args.nodes, args.rounds, args.timeout, args.keep)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.import_repeats:
        result["imports"] = import_breakdown(args.import_repeats)
    if result["rounds"]:
        _print(result)
    else:
        _print_imports(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
