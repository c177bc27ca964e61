"""``fedloom client``: join a federation as one site, training the job's task on this site's own data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedloom.cli.simulate import limit_torch_threads
from fedloom.core.errors import ConfigError, DataError
from fedloom.data.base import ClientData, Dataset
from fedloom.data.clientfile import load_client_data
from fedloom.job import Job, load_job
from fedloom.runtime.net.client import run_client
from fedloom.runtime.net.tls import channel_credentials

TLS_MISSING = (
    "the client needs TLS: pass --ca with the federation's ca.pem (from the server's `fedloom certs init`), "
    "or --insecure to connect without TLS to a server that runs with --insecure"
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
    name: Annotated[str, typer.Option(help="This client's name in the federation (unique).")],
    ca: Annotated[
        Path | None,
        typer.Option(help="The federation's CA certificate (ca.pem): connect over TLS, trusting only this CA."),
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="This client's certificate, for a server with --mutual-tls (with --key).")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="The private key of --cert.")] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Connect without TLS instead (to a server run with --insecure)."),
    ] = False,
    connect_attempts: Annotated[int, typer.Option(help="Tries to reach the server before giving up.", min=1)] = 5,
    threads: Annotated[int, typer.Option(help="CPU threads torch may use.", min=1)] = 1,
) -> None:
    """Join a federation: dial out to the server and train on local data until the server says bye.

    TLS is on by default: --ca names the federation's ca.pem, and the host in --server must be one that the
    server's certificate names (a --host of `fedloom certs init`).
    """
    if insecure and (ca is not None or cert is not None or key is not None):
        raise ConfigError("--insecure connects without TLS; it cannot be combined with --ca, --cert or --key")
    if ca is None and (cert is not None or key is not None):
        raise ConfigError("--cert and --key need --ca, the federation's ca.pem")
    if ca is None and not insecure:
        raise ConfigError(TLS_MISSING)
    credentials = None if ca is None else channel_credentials(ca, cert, key)
    loaded = load_job(job)
    limit_torch_threads(threads)
    own = _own_data(loaded, data)
    answered = run_client(
        loaded.task, own, server=server, name=name, connect_attempts=connect_attempts, credentials=credentials
    )
    typer.echo(f"client {name}: answered {answered} instructions; the server said bye")


def _own_data(job: Job, path: Path) -> ClientData:
    """A client-data file as it is, or the dataset that the job's data function reads from a folder."""
    if path.is_dir():
        loaded = job.load_data(str(path))
        if not isinstance(loaded, Dataset):
            raise DataError(f"the data function of job {job.name!r} made a whole federation, not one site's data")
        return ClientData(train=loaded.train, test=loaded.test)
    return load_client_data(path)
