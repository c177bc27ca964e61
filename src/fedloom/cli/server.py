"""``fedloom server``: run a job's server for clients at other sites, and record the run in the run store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedloom.cli.progress import format_round
from fedloom.cli.simulate import limit_torch_threads
from fedloom.core.errors import ConfigError, user_code
from fedloom.core.params import Params
from fedloom.job import Job, describe, load_job
from fedloom.runtime.loop import LoopResult
from fedloom.runtime.net.server import FleetServer
from fedloom.runtime.net.tls import server_credentials
from fedloom.runtime.records import RoundRecord
from fedloom.simulation import run_recorded
from fedloom.tracking import RunRecorder

TLS_MISSING = (
    "the server needs TLS: pass --certs DIR with the files of `fedloom certs init --out DIR --host HOST`, "
    "or --insecure to run without TLS on a trusted network"
)


def server_command(
    job: Annotated[str, typer.Argument(help="A job file (path/to/job.py) or a built-in example such as digits.")],
    address: Annotated[str, typer.Option(help="HOST:PORT to listen on (only this address).")],
    rounds: Annotated[int, typer.Option(help="Number of rounds.", min=1)],
    min_clients: Annotated[int, typer.Option(help="Clients to wait for before the first round.", min=1)],
    run_dir: Annotated[Path, typer.Option(help="Runs folder; the run goes to RUN_DIR/<run-id>/.")] = Path("runs"),
    seed: Annotated[int, typer.Option(help="Seed of the initial model and of client sampling.", min=0)] = 0,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds a round waits for replies; later ones are dropped.", min=0.001)
    ] = 300.0,
    join_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for --min-clients clients to connect.", min=0.001)
    ] = 600.0,
    certs: Annotated[
        Path | None,
        typer.Option(help="Folder of `fedloom certs init`: serve TLS with its server.pem and server.key."),
    ] = None,
    mutual_tls: Annotated[
        bool,
        typer.Option(
            "--mutual-tls", help="Accept only clients whose certificate is signed by the CA in --certs (ca.pem)."
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Run without TLS instead: traffic is unencrypted and clients are not authenticated; use only on "
            "a trusted network.",
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="CPU threads torch may use.", min=1)] = 1,
) -> None:
    """Serve a federation: wait for clients to dial in, run the rounds, record the run.

    TLS is on by default: make the certificates once with `fedloom certs init --out certs --host HOST`, serve
    with --certs certs, and give each site certs/ca.pem. Clients connect with
    `fedloom client JOB --server HOST:PORT --data PATH --name NAME --ca ca.pem`.
    """
    if insecure and (certs is not None or mutual_tls):
        raise ConfigError("--insecure runs without TLS; it cannot be combined with --certs or --mutual-tls")
    if mutual_tls and certs is None:
        raise ConfigError("--mutual-tls needs --certs DIR (its ca.pem signs the client certificates)")
    if certs is None and not insecure:
        raise ConfigError(TLS_MISSING)
    credentials = None if certs is None else server_credentials(certs, mutual=mutual_tls)
    loaded = load_job(job)
    limit_torch_threads(threads)
    console = Console(soft_wrap=True)
    security = "without TLS" if certs is None else "with mutual TLS" if mutual_tls else "with TLS"
    with FleetServer(address, credentials=credentials) as server:
        console.print(
            f"fedloom server: job {loaded.name}, listening on {address} {security}, waiting for {min_clients} clients"
        )
        clients = server.wait_for_clients(min_clients, join_timeout)
        console.print(f"clients connected: {', '.join(clients)}", highlight=False)
        try:
            run_id, run_path, result = _run(loaded, server, rounds, seed, round_timeout, run_dir, address, console)
        finally:
            server.say_bye()
    final: dict[str, float] = {}
    for record in result.history:
        final.update(record.metrics)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in final.items())
    console.print(f"finished run [bold]{run_id}[/]: {shown}", highlight=False)
    console.print(f"params_sha256 {result.params.sha256()}\nrun directory {run_path}", highlight=False)


def _run(
    job: Job,
    server: FleetServer,
    rounds: int,
    seed: int,
    timeout: float,
    runs_dir: Path,
    address: str,
    console: Console,
) -> tuple[str, Path, LoopResult]:
    """Run the rounds over the server's grid, recorded as :func:`fedloom.simulate` records a simulation."""
    with user_code(f"the model of job {job.name!r} (init_params)"):
        initial = job.task.init_params(seed)
    recorded: dict[str, Any] = {
        "job": job.name,
        "backend": "deployment",
        "address": address,
        "task": describe(job.task),
        "strategy": describe(job.strategy),
        "deployment": {"rounds": rounds, "seed": seed, "round_timeout": timeout, "clients": server.grid.client_ids()},
    }
    recorder = RunRecorder.create(runs_dir, job.name, recorded)
    result = run_recorded(
        recorder,
        strategy=job.strategy,
        grid=server.grid,
        initial_params=initial,
        rounds=rounds,
        seed=seed,
        observers=[_RoundLines(console, rounds)],
        timeout=timeout,
    )
    return recorder.run_id, recorder.run_dir, result


class _RoundLines:
    """Prints a line per finished round."""

    def __init__(self, console: Console, rounds: int) -> None:
        self._console = console
        self._rounds = rounds

    def on_round(self, record: RoundRecord, params: Params) -> None:
        self._console.print(format_round(record, self._rounds), highlight=False)
