"""``fedloom ui``: serve the dashboard over a runs folder (needs the ``fedloom[ui]`` extra)."""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
from pathlib import Path
from typing import Annotated

import typer

from fedloom.cli.runs import DbUrl, RunsDir
from fedloom.core.errors import ConfigError

TOKEN_ENV = "FEDLOOM_UI_TOKEN"

# The listening options of the commands that serve HTTP (ui, serve); each sets its own default port.
Port = Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).", min=0, max=65535)]
Host = Annotated[str, typer.Option("--host", help="Address to bind. Anything but a loopback address requires a token.")]


def ui_command(
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
    port: Port = 8765,
    host: Host = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help="Token every request must carry. Bound beyond loopback without one, a random token is made and "
            "printed in the address to open.",
        ),
    ] = None,
) -> None:
    """Serve the dashboard for the runs in RUNS: the run list, a page per run (charts per round, per-client heat
    map, participation, system profile, privacy, config), a page per client, and runs compared. Pages follow
    runs still in progress. Stop it with Ctrl-C."""
    try:
        import uvicorn

        from fedloom.ui import create_app
    except ImportError as exc:
        raise ConfigError(
            f"the dashboard needs the ui extra ({exc.name} is missing): pip install 'fedloom[ui]'"
        ) from None
    loopback = is_loopback(host)
    if not loopback and token is None:
        token = secrets.token_urlsafe(24)
    listener = bind_listener(host, port)
    bound_port = listener.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    address = f"http://{shown_host}:{bound_port}/" + (f"?token={token}" if token else "")
    typer.echo(f"fedloom dashboard for {runs.resolve()} at {address}")
    if not runs.is_dir():
        typer.echo(f"({runs} does not exist yet: runs appear once it does)")
    app = create_app(runs, token=token, loopback_only=loopback, db_url=db)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    server.run(sockets=[listener])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_listener(host: str, port: int, what: str = "the dashboard") -> socket.socket:
    """A listening socket on ``host``:``port``, bound here so a taken port is one clear error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind {what} to {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use; give another with --port (0 picks a free one)"
            ) from None
        raise ConfigError(f"cannot bind {what} to {host}:{port}: {exc.strerror or exc}") from None
    listener.listen(128)
    os.set_inheritable(listener.fileno(), True)
    return listener
