"""The split SuperLink's LAN listener passes the Fleet API and nothing else (issue 16, case 1).

Fast checks of :mod:`fedsec.deploy.lan_superlink` without starting Flower;
``tests/test_deployment.py`` runs it for real and has an outsider try
``flwr supernode register`` and ``flwr run`` on the LAN address.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import pytest

from fedsec.deploy import lan_superlink
from fedsec.deploy.lan_superlink import FleetOnly, fleet_paths


def _call(scope_type: str, path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Send one request through the LAN listener's filter.

    Returns the paths the wrapped (SuperLink) app saw and the messages sent back.
    """
    seen: list[str] = []
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    app = FleetOnly(inner, fleet_paths())
    asyncio.run(app({"type": scope_type, "path": path}, receive, send))
    return seen, sent


def test_fleet_paths_are_the_fleet_api_only() -> None:
    paths = fleet_paths()
    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/activate-node" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/register-node",  # flwr supernode register
        "/v1/control/start-run",  # flwr run
        "/v1/control/stop-run",
        "/v1/control/list-runs",
        "/v1/runtime/acquire-task",  # a ServerApp's task
        "/v1/runtime/push-messages",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/pull-messages/../../control/start-run",
        "/v1/fleet/",
        "/docs",
        "/openapi.json",
        "/health",
    ],
)
def test_lan_listener_refuses_everything_but_fleet(path: str) -> None:
    seen, sent = _call("http", path)
    assert seen == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 404
    assert b"only the Fleet API" in sent[1]["body"]


def test_lan_listener_passes_fleet_routes_and_closes_websockets() -> None:
    for path in fleet_paths():
        assert _call("http", path) == ([path], [])
    seen, sent = _call("websocket", "/v1/fleet/pull-messages")
    assert seen == [] and sent == [{"type": "websocket.close", "code": 1008}]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])
def test_wildcard_admin_address_is_refused(
    host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands Flower its own argv
    with pytest.raises(SystemExit) as exc:
        lan_superlink.main(["--fleet-host", "127.0.0.1", "--insecure", "--host", host])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --host") and "every interface" in err


def test_one_address_for_both_listeners_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exc:
        lan_superlink.main(
            ["--fleet-host", "127.0.0.1", "--fleet-port", port, "--insecure",
             "--host", "127.0.0.1", "--port", port]
        )  # fmt: skip
    assert exc.value.code == 2
    assert "cannot bind the Fleet API" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--insecure"], "has no TLS"), ([], "--enable-supernode-auth is off")],
)
def test_an_open_fleet_on_a_lan_address_is_refused(
    extra: list[str],
    message: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A LAN (non-loopback) Fleet address without TLS or without node authentication
    # would let any machine that reaches it join as a node. Refused before anything
    # binds, so a documentation address (RFC 5737) is enough and nothing is sent.
    from fedsec.deploy.certs import write_deployment_keys

    lan = "192.0.2.10"
    write_deployment_keys(tmp_path, nodes=1)
    tls = [
        "--ssl-ca-certfile", str(tmp_path / "ca.crt"),
        "--ssl-certfile", str(tmp_path / "server.crt"),
        "--ssl-keyfile", str(tmp_path / "server.key"),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exc:
        lan_superlink.main(["--fleet-host", lan, *(extra or tls), "--host", "127.0.0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --fleet-host") and message in err
    assert lan_superlink._is_loopback("127.0.0.2") and lan_superlink._is_loopback("localhost")
    assert not lan_superlink._is_loopback(lan)
