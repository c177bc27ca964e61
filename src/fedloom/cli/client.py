"""``fedloom client``: join a federation as one site, training the job's task on this site's own data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedloom.app.job import Job, load_job
from fedloom.cli.privacy import read_key_pair
from fedloom.cli.simulate import limit_torch_threads
from fedloom.core.errors import ConfigError, DataError, TransportError
from fedloom.data.base import ClientData, Dataset
from fedloom.data.clientfile import load_client_data
from fedloom.runtime.client import client_app
from fedloom.runtime.net.client import Backoff, run_client
from fedloom.runtime.net.tls import channel_credentials, fetch_ca
from fedloom.runtime.state import DirectoryState

TLS_MISSING = (
    "the client needs TLS: pass --ca with the federation's ca.pem, or --ca-fingerprint with the fingerprint in "
    "your invitation, or --insecure to connect without TLS to a server that runs with --insecure"
)


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
    if insecure and (ca is not None or ca_fingerprint is not None or cert is not None or key is not None):
        raise ConfigError(
            "--insecure connects without TLS; it cannot be combined with --ca, --ca-fingerprint, --cert or --key"
        )
    if ca is not None and ca_fingerprint is not None:
        raise ConfigError("give the CA once: --ca (a file) or --ca-fingerprint (from an invitation), not both")
    if ca is None and ca_fingerprint is None and (cert is not None or key is not None):
        raise ConfigError("--cert and --key need --ca or --ca-fingerprint, to check the server")
    if ca is None and ca_fingerprint is None and not insecure:
        raise ConfigError(TLS_MISSING)
    loaded = load_job(job)
    limit_torch_threads(threads)
    own = _own_data(loaded, data)
    shared = None if paillier_key is None else read_key_pair(paillier_key)
    app = client_app(loaded.task, loaded.mods, paillier_key=shared, send_logs=send_logs, deployed=True)
    trusted: Path | bytes | None = ca
    backoff = Backoff(retry_for, f"the server at {server}")
    while ca_fingerprint is not None and trusted is None:
        try:
            trusted = fetch_ca(server, ca_fingerprint)
        except TransportError as exc:
            backoff.wait(str(exc))
    credentials = None if trusted is None else channel_credentials(trusted, cert, key)
    answered = run_client(
        app,
        own,
        server=server,
        token=token,
        retry_for=retry_for,
        heartbeat=heartbeat,
        credentials=credentials,
        state=DirectoryState(state_dir),
    )
    typer.echo(f"answered {answered} instructions; the server said bye")


def _own_data(job: Job, path: Path) -> ClientData:
    """A client-data file as it is, or the dataset that the job's data function reads from a folder."""
    if path.is_dir():
        loaded = job.load_data(str(path))
        if not isinstance(loaded, Dataset):
            raise DataError(f"the data function of job {job.name!r} made a whole federation, not one site's data")
        return ClientData(train=loaded.train, test=loaded.test)
    return load_client_data(path)
