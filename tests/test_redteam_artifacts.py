"""Red-team regressions for issue 17's artifacts (keys, compose mounts).

Each test is an attack that once worked, against ``fedsec certs`` or
docker/compose.yaml, kept so it cannot come back:

* a layout folder that already exists but is a symbolic link, another user's
  folder, or one others can write: keys went into it (a link sends them to a
  folder of the attacker's choosing; a folder they can write lets them swap
  ``superlink/signing/client-0.pub`` for their own key and sign as client-0);
* a write that fails midway (disk full, a file size limit) left a partial
  ``ca/ca.crt`` behind, which also blocked every later run;
* compose's ``register`` and ``admin`` services mounted the SuperLink's whole
  folder, its TLS private key included, though they need only the CA
  certificate and the nodes' public keys; and the mount check read only
  ``volumes``, so ``volumes_from``, ``secrets`` or ``configs`` could hand a
  container any key unseen.

Fast, no containers, no timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_docker import DOCKER, KEYS, _key_problems, _mounts, _services
from typer.testing import CliRunner

from fedsec.cli import cli
from fedsec.deploy.certs import DeploymentKeys, write_deployment_keys

# ---- fedsec certs: folders that already exist ---------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_certs_refuses_a_symlinked_node_folder(tmp_path: Path) -> None:
    """A planted ``supernode-0 -> elsewhere`` must not receive node 0's private keys."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "supernode-0").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="supernode-0 is a symbolic link"):
        write_deployment_keys(keys, nodes=1, split=True)
    assert _files(elsewhere) == []
    assert _files(keys) == ["supernode-0"]  # the link, and nothing the call made


def test_cli_certs_names_the_link_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "superlink").symlink_to(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, ["certs", str(keys), "--split", "--nodes", "1"])
    assert result.exit_code == 2, result.output
    assert "superlink is a symbolic link" in result.output
    assert _files(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("loose", ["", "superlink", "supernode-0"])
def test_certs_refuses_a_folder_others_can_write(tmp_path: Path, loose: str) -> None:
    """Group- or world-writable: another user could swap a public key after the call."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / loose).mkdir(exist_ok=True)
    (keys / loose).chmod(0o777)
    with pytest.raises(ValueError, match="writable by group or others"):
        write_deployment_keys(keys, nodes=1, split=True)
    assert _files(keys) == ([loose] if loose else [])


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_certs_refuses_another_users_folder_but_not_the_owners(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "superlink").mkdir(mode=0o700)
    os.chown(keys / "superlink", 4242, 4242)
    with pytest.raises(ValueError, match="superlink belongs to uid 4242"):
        write_deployment_keys(keys, nodes=1, split=True, owner=(1000, 1000))
    assert _files(keys) == ["superlink"]
    # A folder of the user the keys are given to (compose: uid 1000's ./keys) is fine.
    os.chown(keys / "superlink", 1000, 1000)
    written = write_deployment_keys(keys, nodes=1, split=True, owner=(1000, 1000))
    assert written.server_key.stat().st_uid == 1000


# ---- fedsec certs: a write that fails midway --------------------------------------

_FAIL_WRITES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # below a P-384 CA certificate
from fedsec.deploy.certs import write_deployment_keys
try:
    write_deployment_keys(sys.argv[1], nodes=2, split=True)
except OSError as err:
    print(err.strerror)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_certs_leaves_nothing_when_a_write_fails(tmp_path: Path, existing: bool) -> None:
    keys = tmp_path / "keys"
    if existing:  # as Docker makes it
        keys.mkdir(mode=0o755)
    run = subprocess.run(
        [sys.executable, "-c", _FAIL_WRITES, str(keys)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "File too large", run.stderr
    assert keys.exists() == existing
    if existing:
        assert _files(keys) == []  # no partial ca/ca.crt
    # And the next run is not blocked by what the failed one left.
    written = write_deployment_keys(keys, nodes=2, split=True)
    assert all(p.is_file() for p in written.all())


# ---- compose: which private key each container can read ---------------------------


def _reachable(name: str, services: dict[str, Any], layout: DeploymentKeys) -> set[Path]:
    """Every file of the key layout that service ``name`` sees through a mount."""
    service = services[name]
    seen = {
        path
        for path in layout.all()
        for mount in _mounts(service)
        if path.is_relative_to(mount.source)
    }
    for other in service.get("volumes_from") or []:
        other_name = str(other["service"] if isinstance(other, dict) else other).split(":")[0]
        seen |= _reachable(other_name, services, layout)
    return seen


def _private_reach(services: dict[str, Any]) -> dict[str, set[str]]:
    nodes = sorted(n for n in services if n.startswith("supernode-"))
    layout = DeploymentKeys(KEYS, len(nodes), split=True)
    private = {layout.ca_key, layout.server_key, *layout.node_keys, *layout.signing_keys}
    reach: dict[str, set[str]] = {}
    for name, service in services.items():
        if service.get("secrets") or service.get("configs"):
            reach[name] = {"<secrets or configs: unchecked>"}
            continue
        reach[name] = {
            str(p.relative_to(KEYS)) for p in _reachable(name, services, layout) & private
        }
    return reach


def _expected(services: dict[str, Any]) -> dict[str, set[str]]:
    """Only certs (which writes them) sees several private keys; no CLI service sees one."""
    nodes = sorted(n for n in services if n.startswith("supernode-"))
    layout = DeploymentKeys(KEYS, len(nodes), split=True)
    everything = {
        str(p.relative_to(KEYS))
        for p in (layout.ca_key, layout.server_key, *layout.node_keys, *layout.signing_keys)
    }
    expected = {name: set[str]() for name in services}
    expected["certs"] = everything
    expected["superlink"] = {"superlink/server.key"}
    for node in nodes:
        expected[node] = {f"{node}/auth.key", f"{node}/signing.pem"}
    return expected


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DOCKER / "compose.yaml").read_text()


def test_only_the_superlink_reads_its_tls_key(compose_text: str) -> None:
    services = _services(compose_text)
    assert {"register", "admin"} <= set(services)
    assert _private_reach(services) == _expected(services)


_NODE0 = "  supernode-0:\n    <<: *supernode\n"


@pytest.mark.parametrize(
    ("old", "new", "extra"),
    [
        # register/admin as first written: the SuperLink's whole folder, server.key in it.
        (
            "      - ./keys/superlink/ca.crt:/keys/ca.crt:ro\n"
            "      - ./keys/superlink/supernodes:/keys/supernodes:ro\n",
            "      - ./keys/superlink:/keys:ro\n",
            "",
        ),
        (
            "      - ./keys/superlink/ca.crt:/keys/ca.crt:ro  # the CA certificate only\n",
            "      - ./keys/superlink:/keys:ro\n",
            "",
        ),
        # Mounts outside `volumes`.
        (_NODE0, _NODE0 + "    volumes_from: [certs]\n", ""),
        (_NODE0, _NODE0 + "    secrets: [ca]\n", "secrets:\n  ca:\n    file: ./keys/ca/ca.key\n"),
        (_NODE0, _NODE0 + "    configs: [ca]\n", "configs:\n  ca:\n    file: ./keys/ca/ca.key\n"),
    ],
)
def test_both_mount_checks_catch_a_key_handed_out(
    compose_text: str, old: str, new: str, extra: str
) -> None:
    assert compose_text.count(old) == 1
    services = _services(compose_text.replace(old, new) + extra)
    assert _private_reach(services) != _expected(services)
    assert _key_problems(services) != []
