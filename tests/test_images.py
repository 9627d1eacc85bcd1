"""The container images, built with ``docker/build.sh`` and run with podman.

``docker/build.sh`` installs buildah and podman from apt, makes the base image
with mmdebstrap and builds the SuperLink and CPU SuperNode images (minutes
cold, seconds when its layers are cached). The test then runs a TLS
deployment in containers on loopback (``--network host``, every server bound
to 127.0.0.1 on a free port):

* the SuperLink image (``fedsec.deploy.lan_superlink``, Fleet and admin APIs on
  separate ports, ``--enable-supernode-auth``), mounting only the SuperLink's
  folder of ``fedsec certs --split`` (its TLS key, the CA certificate, the
  nodes' public keys) plus the run's config and a results folder;
* 4 CPU SuperNode containers, each mounting only its own ``supernode-<i>``
  folder (CA certificate, its authentication key, its signing key). Four:
  bucketed secure aggregation needs at least 2 buckets of 2.

The nodes' keys are registered with the image's own ``flwr`` CLI inside the
SuperLink container; ``flwr run`` from this checkout (the FAB carries only
configuration; the containers run their installed fedsec) starts
``simulations/deploy_images.toml``: 2 rounds of bucketed secure aggregation
with distributed DP, signatures required. ``flwr run --stream`` exits 0 even
when the ServerApp fails, so the run's status comes from ``flwr ls``: it must
be ``finished:completed``, with no signature rejected and a final test
accuracy above chance (10 classes).

Marked ``images`` (``pytest -m images``; scripts/test.sh runs it after the
deployment tests). It needs root on Linux and skips otherwise; a failure to
install the tools skips it outside CI and fails it under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedsec.deploy.certs import DeploymentKeys, write_deployment_keys

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUILD = ROOT / "docker" / "build.sh"
CONFIG = ROOT / "simulations" / "deploy_images.toml"
SUPERLINK_IMAGE = "localhost/fedsec-superlink:latest"
SUPERNODE_IMAGE = "localhost/fedsec-supernode-cpu:latest"
NODES = 4
HOST = "127.0.0.1"
UID = 1000  # the images' USER
#: build.sh's exit status when apt-get could not install the tools.
TOOLS_MISSING = 3
CHANCE = 0.1  # 10 digit classes

PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(ROOT / "docker" / "podman" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(ROOT / "docker" / "podman" / "storage.conf"),
}

pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="buildah/podman need Linux"),
    pytest.mark.skipif(
        sys.platform.startswith("linux") and os.geteuid() != 0,
        reason="docker/build.sh needs root (apt-get, mmdebstrap, rootful podman)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Run docker/build.sh; its output (step times, image sizes) is returned."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with open(log, "w") as out:
        build = subprocess.run(
            ["bash", str(BUILD)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1500
        )
    text = log.read_text(errors="replace")
    if build.returncode == TOOLS_MISSING and os.environ.get("CI") != "true":
        pytest.skip(f"buildah/podman/mmdebstrap could not be installed:\n{text[-1500:]}")
    assert build.returncode == 0, text[-4000:]
    steps = [
        line
        for line in text.splitlines()
        if line.startswith(("== [build.sh]", "   done in")) or line.endswith(" MB")
    ]
    print(f"docker/build.sh: {time.monotonic() - started:.0f} s", *steps, sep="\n")
    return text


@dataclass
class Containers:
    """Containers this test started (a unique name prefix), removed at the end."""

    prefix: str = field(default_factory=lambda: f"fedsec-test-{uuid.uuid4().hex[:8]}")
    names: list[str] = field(default_factory=list)

    def run(self, name: str, image: str, *args: str, mounts: dict[Path, str]) -> str:
        """``podman run -d``: host network, runc's limits, only the given bind mounts."""
        full = f"{self.prefix}-{name}"
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = 1048576 if hard == resource.RLIM_INFINITY else hard
        volumes = [f"--volume={src}:{dst}" for src, dst in mounts.items()]
        started = _podman(
            "run", "--detach", "--name", full, "--network", "host",
            f"--ulimit=nofile={nofile}:{nofile}", "--ulimit=nproc=32768:32768",
            "--env", "PYTHONUNBUFFERED=1", *volumes, image, *args,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        self.names.append(full)
        return full

    def running(self, name: str) -> bool:
        out = _podman("inspect", "--format", "{{.State.Running}}", name)
        return out.stdout.strip() == "true"

    def logs(self, name: str) -> str:
        out = _podman("logs", name)
        return (out.stdout + out.stderr)[-2500:]

    def all_logs(self) -> str:
        return "\n".join(f"---- {n}\n{self.logs(n)}" for n in self.names)

    def remove(self) -> None:
        # A slow shutdown is not a failure: force after a short grace period.
        for name in self.names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                _podman("rm", "--force", "--time", "5", name, timeout=120)


@pytest.fixture
def containers() -> Iterator[Containers]:
    started = Containers()
    try:
        yield started
    finally:
        started.remove()


def _chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def _flwr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _run_status(env: dict[str, str]) -> dict[str, str]:
    listed = _flwr(env, "ls", "images", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert len(runs) == 1, runs
    return dict(runs[0])


def test_images_run_a_tls_deployment_with_signed_bucketed_secagg(
    images: str, containers: Containers, tmp_path: Path
) -> None:
    assert shutil.which("podman", path=PODMAN_ENV.get("PATH")), "build.sh installs podman"
    keys: DeploymentKeys = write_deployment_keys(
        tmp_path / "keys", nodes=NODES, hosts=(HOST, "localhost"), split=True, owner=(UID, UID)
    )
    results = tmp_path / "results"
    results.mkdir()
    _chown_tree(results, UID)  # the ServerApp writes here as the images' user
    fleet, admin = _free_port(), _free_port()

    started = time.monotonic()
    superlink = containers.run(
        "superlink", SUPERLINK_IMAGE,
        "--ssl-ca-certfile", "/keys/ca.crt",
        "--ssl-certfile", "/keys/server.crt",
        "--ssl-keyfile", "/keys/server.key",
        "--enable-supernode-auth",
        "--fleet-host", HOST, "--fleet-port", str(fleet),
        "--host", HOST, "--port", str(admin),
        mounts={
            keys.superlink_dir: "/keys:ro",
            CONFIG: "/config/run.toml:ro",
            results: "/results",
        },
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (_listening(fleet) and _listening(admin)):
        assert containers.running(superlink), containers.logs(superlink)
        assert time.monotonic() < deadline, containers.logs(superlink)
        time.sleep(0.5)

    # Register the nodes' keys with the image's flwr CLI, on the SuperLink's side.
    cli_config = (
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{HOST}:{admin}"\n'
        'root-certificates = "/keys/ca.crt"\n'
    )
    register = " && ".join(
        [
            "mkdir -p $FLWR_HOME",
            'printf %s "$CLI_CONFIG" > $FLWR_HOME/config.toml',
            *(
                f"flwr supernode register /keys/supernodes/{p.name} local"
                for p in keys.node_public_keys
            ),
        ]
    )
    registered = _podman(
        "exec", "--env", "FLWR_HOME=/tmp/flwr-home", "--env", f"CLI_CONFIG={cli_config}",
        superlink, "sh", "-c", register, timeout=300,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stdout + registered.stderr

    for i in range(NODES):
        containers.run(
            f"supernode-{i}", SUPERNODE_IMAGE,
            "--root-certificates", "/keys/ca.crt",
            "--auth-supernode-private-key", "/keys/auth.key",
            "--superlink", f"{HOST}:{fleet}",
            "--host", HOST, "--port", str(_free_port()),
            "--node-config",
            f"partition-id={i} num-partitions={NODES} signing-key='/keys/signing.pem' "
            f"signing-identity='{keys.signing_identities[i]}'",
            mounts={keys.node_dir(i): "/keys:ro"},
        )  # fmt: skip

    # The administrator's flwr CLI on the SuperLink host (this checkout's FAB: config only).
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "images"\n\n[superlink.images]\naddress = "{HOST}:{admin}"\n'
        f'root-certificates = "{keys.superlink_ca_cert}"\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("FEDSEC_SIMULATED_ADVERSARY", None)
    run = subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", "images", "--stream", "--run-config",
         "config-file='/config/run.toml' results-dir='/results'"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = run.communicate(timeout=900)  # 2-3 min on 2 shared cores
    except subprocess.TimeoutExpired:
        run.kill()
        output = run.communicate()[0]
        pytest.fail(f"flwr run did not finish:\n{output[-2000:]}\n{containers.all_logs()}")
    assert run.returncode == 0, output[-3000:]
    # The stream ends with the run; its status may lag by a moment.
    deadline = time.monotonic() + 60
    status = _run_status(env)
    while not status["status"].startswith("finished") and time.monotonic() < deadline:
        time.sleep(1)
        status = _run_status(env)
    elapsed = time.monotonic() - started
    assert status["status"] == "finished:completed", (
        f"{status}\n{output[-2000:]}\n{containers.all_logs()}"
    )

    data = json.loads((results / "deploy-images" / "metrics.json").read_text())
    rounds = {r["round"]: r for r in data["rounds"]}
    assert data["finished"] and [rounds[n]["status"] for n in (1, 2)] == ["ok", "ok"], rounds
    for n in (1, 2):
        assert rounds[n]["num-accepted"] == NODES, rounds[n]
        assert rounds[n]["signatures_rejected"] == 0, rounds[n]
        assert rounds[n]["secagg_buckets"] == NODES // 2, rounds[n]
    accuracy = float(rounds[2]["test_accuracy"])
    assert accuracy > CHANCE, rounds[2]
    print(
        f"containers: {elapsed:.0f} s from the SuperLink's start to finished:completed; "
        f"final test accuracy {accuracy:.3f} (chance {CHANCE}, margin {accuracy - CHANCE:+.3f}); "
        f"round times {[round(rounds[n]['round_time_s'], 1) for n in (1, 2)]} s"
    )
