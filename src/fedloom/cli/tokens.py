"""``fedloom token`` and ``fedloom invite``: who may join a deployment, and the one command a site pastes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedloom.core.errors import ConfigError

app = typer.Typer(help="Client tokens of a deployment: create, revoke, list.", no_args_is_help=True)

RunDir = Annotated[Path, typer.Option(help="The deployment's run directory (the server's --run-dir).")]
Name = Annotated[str, typer.Argument(help="The site's name in the federation (letters, digits, '.', '_', '-').")]


@app.command("create")
def create_command(name: Name, run_dir: RunDir) -> None:
    """Make a token for site NAME and print it, once: it is stored only as a hash. Give it to NAME's operator
    over a channel you trust."""
    from fedloom.tracking.tokens import TokenStore

    token = TokenStore(run_dir).create(name)
    typer.echo(token)


@app.command("revoke")
def revoke_command(name: Name, run_dir: RunDir) -> None:
    """Revoke NAME's token: the server refuses it from the next connection or round on."""
    from fedloom.tracking.tokens import TokenStore

    TokenStore(run_dir).revoke(name)
    typer.echo(f"revoked the token of {name}")


@app.command("list")
def list_command(run_dir: RunDir) -> None:
    """List the sites that have (or had) a token."""
    from fedloom.tracking.tokens import TokenStore

    infos = TokenStore(run_dir).list()
    console = Console(soft_wrap=True, highlight=False)
    if not infos:
        console.print(f"no tokens in {run_dir}")
        return
    for info in infos:
        state = "valid" if info.revoked_at is None else f"revoked {info.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
        console.print(f"{info.client_name}  created {info.created_at:%Y-%m-%d %H:%M:%S} UTC  {state}")


def invite_command(
    name: Name,
    run_dir: RunDir,
    server: Annotated[str, typer.Option(help="HOST:PORT that the site dials: a host named in the server certificate.")],
    job: Annotated[str, typer.Option(help="The job the federation runs (a built-in example or a job file).")],
    certs: Annotated[
        Path | None, typer.Option(help="Folder of `fedloom certs init` (its ca.pem's fingerprint goes in).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="The server runs with --insecure: invite without TLS.")
    ] = False,
) -> None:
    """Make a token for site NAME and print the one command that site runs to join.

    The command carries the server's address, the token and the fingerprint of the federation's CA: the site
    takes the CA from the server and trusts it only if the fingerprint matches, so no file needs to travel.
    Send it over a channel you trust (it holds the token), and replace DATA with the site's data.
    """
    from fedloom.runtime.net.options import parse_address
    from fedloom.runtime.net.tls import fingerprint
    from fedloom.tracking.tokens import TokenStore

    parse_address(server)
    if insecure == (certs is not None):
        raise ConfigError("give --certs DIR (the federation's certificates), or --insecure for a server without TLS")
    trust = ["--insecure"]
    if certs is not None:
        ca = certs / "ca.pem"
        try:
            trust = ["--ca-fingerprint", fingerprint(ca.read_bytes())]
        except OSError as exc:
            raise ConfigError(f"cannot read the CA certificate {ca}: {exc.strerror or exc}") from None
    token = TokenStore(run_dir).create(name)
    command = ["fedloom", "client", job, "--server", server, "--token", token, *trust, "--data"]
    typer.echo(" ".join(shlex.quote(part) for part in command) + " DATA")
