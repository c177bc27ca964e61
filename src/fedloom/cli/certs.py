"""``fedloom certs``: make the certificates of a federation (a private CA, the server's, clients')."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Certificates for TLS between the server and the clients.", no_args_is_help=True)


@app.command("init")
def init_command(
    out: Annotated[Path, typer.Option(help="Folder to write ca.pem, ca.key, server.pem, server.key (and clients/).")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="A DNS name or IP address that clients dial to reach the server (repeatable)."),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(help="Also make a client certificate for mutual TLS: clients/NAME.pem and .key (repeatable)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace files that exist (a new CA: old certificates stop working).")
    ] = False,
) -> None:
    """Make a private CA for a federation and a server certificate signed by it (and client certificates).

    Serve with `fedloom server ... --certs OUT`; give every site OUT/ca.pem (never ca.key) and connect with
    `fedloom client ... --ca ca.pem`. Keys are written with mode 0600.
    """
    from fedloom.runtime.net.tls import init_certs

    _report(init_certs(out, host or [], client or [], force=force), out)


@app.command("issue")
def issue_command(
    out: Annotated[Path, typer.Option(help="The folder of `certs init`, with the federation's ca.pem and ca.key.")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="A new server certificate for these hosts (repeatable; list them all: it replaces the old)."),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(help="A client certificate for this site: clients/NAME.pem and .key (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace client certificates that exist.")] = False,
) -> None:
    """Sign new certificates with the federation's existing CA: a site's certificate for mutual TLS, or a server
    certificate for another host. The CA's fingerprint does not change, so every site keeps working; restart the
    server after a new server certificate.
    """
    from fedloom.runtime.net.tls import issue_certs

    _report(issue_certs(out, host or [], client or [], force=force), out)


def _report(written: list[Path], out: Path) -> None:
    from fedloom.runtime.net.tls import fingerprint

    console = Console(soft_wrap=True, highlight=False)
    for path in written:
        console.print(f"wrote {path}{'  (private key: keep it secret)' if path.suffix == '.key' else ''}")
    console.print(f"CA fingerprint {fingerprint((Path(out) / 'ca.pem').read_bytes())}")
