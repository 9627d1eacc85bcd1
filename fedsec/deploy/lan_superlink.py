"""A SuperLink whose Fleet API is the only API on the LAN address.

Flower 1.42's ``flower-superlink`` serves its Fleet API (SuperNodes), Control
API (``flwr supernode register``, ``flwr run``, ``flwr stop``, ``flwr ls``) and
Runtime API (the ServerApp's SuperExec: acquire a run's task, push messages
to nodes) as protobuf over HTTP on one socket, ``--host``/``--port``.
``--control-api-address`` is deprecated and has no effect (the Control routes
still answer on ``--host``/``--port``), and the Control API's only
authentication in the open-source build is a no-op (OIDC needs Flower
Enterprise and an identity provider). So on the documented LAN deployment
anyone holding the public ``ca.crt`` could register a SuperNode key and submit
a run whose code then executes on the SuperLink host and on every node.

This launcher runs the same SuperLink (same arguments, same state, same
SuperExec) with two listeners in one process:

* ``--host``/``--port``: every API, for the administrator. Bind it to
  loopback (or an admin-only address); wildcard addresses are refused.
* ``--fleet-host``/``--fleet-port``: the LAN address, where only the Fleet
  API's routes (``/v1/fleet/...``) are served; every other path gets 404
  before Flower sees it.

Run it as ``python -m fedsec.deploy.lan_superlink --fleet-host 192.168.1.10
--host 127.0.0.1 --port 9093 --ssl-... --enable-supernode-auth ...`` (any other
``flower-superlink`` argument passes through unchanged).

It builds on Flower internals (``flwr.superlink.main.create_app`` and the
argument parsing of ``flwr.superlink.cli.flower_superlink``); with a Flower
release that lacks them it stops with one line instead of starting unsplit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any, NoReturn

import uvicorn

__all__ = ["FleetOnly", "fleet_paths", "main"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
DEFAULT_FLEET_PORT = 9092


class FleetOnly:
    """ASGI wrapper that passes exactly the given HTTP paths and answers 404 to the rest.

    Parameters
    ----------
    app : ASGI application
        The SuperLink's FastAPI app.
    paths : collection of str
        Exact request paths to pass (the Fleet router's routes). Matching is
        on the exact path, so ``/v1/fleet/../control/start-run`` (which the
        router would not resolve either) is refused here as well.
    """

    def __init__(self, app: ASGIApp, paths: Sequence[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http":
            body = b'{"detail":"Not Found: only the Fleet API is served on this address"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        # lifespan: the LAN listener runs with lifespan="off", so nothing to do.


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _bind(host: str, port: int, what: str) -> socket.socket:
    """Bind a listening socket now, so that a taken port stops start-up with one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # now, so that two listeners on one address clash here
    except OSError as exc:
        _fail(f"cannot bind the {what} to {host}:{port}: {exc.strerror or exc}")
    return sock


def _unspecified(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:0.0.0.0 binds every IPv4 address
    return ip.is_unspecified or (mapped is not None and mapped.is_unspecified)


def _is_wildcard(host: str) -> bool:
    """Whether binding ``host`` would listen on every interface.

    Judged on what the resolver makes of it (as :func:`_bind` does), not on the
    spelling: ``0``, ``0.0``, ``0x0``, ``*``, ``::ffff:0.0.0.0`` and host names
    resolving to ``0.0.0.0`` are all the wildcard address.
    """
    host = host.strip()
    if host in ("", "*"):
        return True
    try:
        if _unspecified(host.strip("[]")):
            return True
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        return False  # cannot be bound either: _bind stops with one line
    return any(_unspecified(str(info[4][0])) for info in infos)


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host.strip().strip("[]"), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedsec.deploy.lan_superlink",
        description="Flower's SuperLink with the Fleet API alone on the LAN address; "
        "every other flower-superlink argument passes through (--host/--port: the "
        "admin address of the Control and Runtime APIs).",
    )
    parser.add_argument("--fleet-host", required=True, help="LAN address for SuperNodes")
    parser.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT)
    parser.add_argument(
        "--allow-open-fleet",
        action="store_true",
        help="start on a non-loopback --fleet-host without TLS or without "
        "--enable-supernode-auth (anyone who reaches it could then join as a node)",
    )
    ours, rest = parser.parse_known_args(argv)
    if not 0 < ours.fleet_port < 65536:
        _fail(f"--fleet-port must be in 1..65535, got {ours.fleet_port}")
    return ours, rest


def fleet_paths() -> list[str]:
    """The Fleet API's request paths in the installed Flower (``/v1/fleet/...``)."""
    from flwr.superlink.routers.fleet.router import router

    every = [str(getattr(route, "path", "")) for route in router.routes]
    paths = [p for p in every if p.startswith(FLEET_PREFIX)]
    if not paths:
        _fail("this Flower release has no /v1/fleet/ routes; the split SuperLink cannot run")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Start the split SuperLink (blocks until SIGINT or SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = _parse(argv)
    try:
        from flwr.supercore.http_logging import get_uvicorn_log_config
        from flwr.supercore.logger import console_handler
        from flwr.superlink.main import create_app

        # The module, not the function of the same name that flwr.superlink.cli exports.
        fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
        parse_config = fs._parse_superlink_lifespan_config
        lifespan_class = fs.SuperLinkLifespan
    except (ImportError, AttributeError) as exc:
        _fail(f"this Flower release lacks what the split SuperLink needs ({exc})")

    # Flower's own parser and checks (TLS files, --enable-supernode-auth needs TLS, ...).
    sys.argv = ["flower-superlink", *rest]
    config = parse_config()
    if _is_wildcard(config.host):
        _fail(
            f"--host {config.host} would put the Control and Runtime APIs on every "
            "interface; give a loopback or admin-only address"
        )
    if os.environ.get("FLWR_INTERNAL_GRPC_CONTROL_API") == "1":
        # Flower then also starts its legacy gRPC Control API on
        # --control-api-address (default 0.0.0.0:9093), outside both listeners.
        _fail(
            "FLWR_INTERNAL_GRPC_CONTROL_API=1 would start Flower's gRPC Control API on "
            f"{config.control_address}, outside the split; unset it"
        )
    if not ours.allow_open_fleet and not _is_loopback(ours.fleet_host):
        # On a LAN, the Fleet API without TLS sends updates in clear, and without
        # node authentication lets any machine that reaches it register as a node.
        if config.ssl_certfile is None:
            _fail(
                f"--fleet-host {ours.fleet_host} is not loopback and the SuperLink has no "
                "TLS; give --ssl-* files (or --allow-open-fleet)"
            )
        if not config.enable_supernode_auth:
            _fail(
                f"--fleet-host {ours.fleet_host} is not loopback and --enable-supernode-auth "
                "is off: any machine could join as a node; enable it (or --allow-open-fleet)"
            )
    # Binding both now: a clash or a taken port stops here, before any SuperExec starts.
    admin_sock = _bind(config.host, config.port, "Control/Runtime APIs (--host/--port)")
    if _unspecified(str(admin_sock.getsockname()[0])):  # a name that resolved differently
        admin_sock.close()
        _fail(f"--host {config.host} is bound to every interface; give a loopback address")
    fleet_sock = _bind(ours.fleet_host, ours.fleet_port, "Fleet API (--fleet-host/--fleet-port)")

    paths = fleet_paths()
    app = create_app(config, lifespan_class)
    admin = _Server(
        uvicorn.Config(
            app,
            log_config=get_uvicorn_log_config(console_handler.level),
            access_log=True,
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
        )
    )
    fleet = _Server(
        uvicorn.Config(
            FleetOnly(app, paths),
            lifespan="off",  # the admin listener owns start-up and shut-down
            log_config=None,  # configured once, above
            access_log=True,
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
        )
    )
    scheme = "http" if config.ssl_certfile is None else "https"
    print(
        f"fedsec: Fleet API on {scheme}://{ours.fleet_host}:{ours.fleet_port} (SuperNodes); "
        f"Control and Runtime APIs on {config.host}:{config.port} only",
        flush=True,
    )
    asyncio.run(_serve(admin, admin_sock, fleet, fleet_sock))


class _Server(uvicorn.Server):
    """A uvicorn server whose signals the caller handles (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True


async def _serve(
    admin: _Server, admin_sock: socket.socket, fleet: _Server, fleet_sock: socket.socket
) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        admin.stop()
        fleet.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    # The admin listener first: its lifespan starts the SuperExec the ServerApp needs.
    tasks = [
        asyncio.create_task(admin.serve(sockets=[admin_sock])),
        asyncio.create_task(fleet.serve(sockets=[fleet_sock])),
    ]
    # If either listener ends (signal, failed start), the other goes down with it.
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    main()
