"""``fedloom client``: join a federation as one site, training the job's task on this site's own data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedloom.cli.privacy import read_key_pair
from fedloom.cli.simulate import limit_torch_threads


def client_command(
    job: Annotated[str, typer.Argument(help="The same job file (or built-in example) that the server runs.")],
    server: Annotated[str, typer.Option(help="HOST:PORT of the federation's server.")],
    data: Annotated[
        Path,
        typer.Option(
            help="This site's data: a client-data .npz file (as `fedloom partition` writes), or a folder that "
            "the job's data function reads (its train and test splits become this client's data)."
        ),
    ],
    token: Annotated[
        str,
        typer.Option(
            envvar="FEDLOOM_TOKEN",
            help="This site's token (from `fedloom token create` or an invitation); it names the client. "
            "Also read from $FEDLOOM_TOKEN, which keeps it out of the process list.",
        ),
    ],
    ca: Annotated[
        Path | None,
        typer.Option(help="The federation's CA certificate (ca.pem): connect over TLS, trusting only this CA."),
    ] = None,
    ca_fingerprint: Annotated[
        str | None,
        typer.Option(
            help="Instead of --ca: the CA's fingerprint (sha256:...) from an invitation; the CA is taken from the "
            "server and trusted only if it matches."
        ),
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="This client's certificate, for a server with --mutual-tls (with --key).")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="The private key of --cert.")] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Connect without TLS instead (to a server run with --insecure)."),
    ] = False,
    retry_for: Annotated[
        float,
        typer.Option(help="Seconds to keep trying to reach the server (at the start, or after losing it).", min=0),
    ] = 600.0,
    heartbeat: Annotated[float, typer.Option(help="Seconds between keepalive pings to the server.", min=1)] = 30.0,
    threads: Annotated[int, typer.Option(help="CPU threads torch may use.", min=1)] = 1,
    state_dir: Annotated[
        Path,
        typer.Option(
            help="Folder where this site keeps what an algorithm carries between rounds (SCAFFOLD's control "
            "variate, personal layers); it survives restarts and is never sent unless the algorithm sends it."
        ),
    ] = Path("fedloom-client-state"),
    paillier_key: Annotated[
        Path | None,
        typer.Option(
            help="The federation's Paillier key pair (paillier.key from `fedloom privacy paillier-keys`), for a "
            "server run with --paillier. Keep it from the server.",
            dir_okay=False,
        ),
    ] = None,
    send_logs: Annotated[
        bool,
        typer.Option(
            help="Send the lines this client logs while it trains or evaluates (INFO and up, tracebacks included) "
            "to the server, which keeps them with the run; --no-send-logs keeps them here. System metrics go "
            "either way."
        ),
    ] = True,
) -> None:
    """Join a federation: dial out to the server and train on local data until the server says bye.

    The connection is lost and found again by itself (a server restart, a network failure). TLS is on by
    default: --ca names the federation's ca.pem (or --ca-fingerprint checks the CA the server sends), and
    the host in --server must be one that the server's certificate names (a --host of `fedloom certs init`).
    """
    from fedloom.app.deployment import ClientTLS, connect
    from fedloom.app.job import load_job

    tls = ClientTLS(ca=ca, ca_fingerprint=ca_fingerprint, cert=cert, key=key, insecure=insecure)
    loaded = load_job(job)
    limit_torch_threads(threads)
    answered = connect(
        loaded,
        server=server,
        data=data,
        token=token,
        tls=tls,
        retry_for=retry_for,
        heartbeat=heartbeat,
        state_dir=state_dir,
        paillier_key=None if paillier_key is None else read_key_pair(paillier_key),
        send_logs=send_logs,
    )
    typer.echo(f"answered {answered} instructions; the server said bye")
