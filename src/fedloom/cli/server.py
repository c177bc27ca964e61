"""``fedloom server``: run a job's server for clients at other sites, and record the run in its run directory."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedloom.app.job import Job, describe, load_job
from fedloom.app.run import run_recorded
from fedloom.cli.exporting import MlflowUri, TensorBoardDir, exporters
from fedloom.cli.privacy import read_public_key
from fedloom.cli.progress import format_round, metric_text
from fedloom.cli.protection import (
    PANEL,
    DPClipOption,
    DPDeltaOption,
    DPFlags,
    DPNoiseOption,
    DPQuantileOption,
    DPTargetOption,
    SecAggDegreeOption,
    SecAggOption,
    with_protection,
)
from fedloom.cli.runs import DbUrl
from fedloom.cli.simulate import StrategyArgOption, StrategyOption, limit_torch_threads, with_strategy
from fedloom.core.errors import ConfigError, FedloomError, user_code
from fedloom.core.params import Params
from fedloom.runtime.loop import LoopResult, Resume
from fedloom.runtime.net.server import FleetServer
from fedloom.runtime.net.tls import server_credentials
from fedloom.runtime.records import ClientEvent, ClientStatus, RoundRecord
from fedloom.tracking import RunRecorder
from fedloom.tracking.tokens import TokenStore

TLS_MISSING = (
    "the server needs TLS: pass --certs DIR with the files of `fedloom certs init --out DIR --host HOST`, "
    "or --insecure to run without TLS on a trusted network"
)


def server_command(
    job: Annotated[str, typer.Argument(help="A job file (path/to/job.py) or a built-in example such as digits.")],
    address: Annotated[str, typer.Option(help="HOST:PORT to listen on (only this address).")],
    rounds: Annotated[int, typer.Option(help="Number of rounds.", min=1)],
    min_clients: Annotated[int, typer.Option(help="Clients to wait for before the first round.", min=1)],
    run_dir: Annotated[
        Path,
        typer.Option(
            help="This deployment's run directory: its client tokens, round log and checkpoints. Run the same "
            "command again with it to resume after a crash."
        ),
    ],
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
            help="Run without TLS instead: traffic is unencrypted and tokens travel in the clear; use only on "
            "a trusted network.",
        ),
    ] = False,
    max_message_mb: Annotated[
        float, typer.Option(help="Largest reply a client may send, in MiB; larger ones are declined.", min=0.001)
    ] = 4096.0,
    max_uploads: Annotated[
        int, typer.Option(help="Client replies asked for at once (bounds the server's memory).", min=1)
    ] = 4,
    heartbeat: Annotated[
        float, typer.Option(help="Seconds between keepalive pings; a client silent that long after one is gone.", min=1)
    ] = 30.0,
    threads: Annotated[int, typer.Option(help="CPU threads torch may use.", min=1)] = 1,
    strategy: StrategyOption = None,
    strategy_arg: StrategyArgOption = None,
    secagg: SecAggOption = False,
    secagg_degree: SecAggDegreeOption = None,
    dp_noise: DPNoiseOption = None,
    dp_clip: DPClipOption = None,
    dp_quantile: DPQuantileOption = None,
    dp_delta: DPDeltaOption = None,
    dp_target_epsilon: DPTargetOption = None,
    dp_clients: Annotated[
        int | None,
        typer.Option(
            help="With --dp-noise: the number of clients n sampled from (default: the valid tokens in --run-dir).",
            min=1,
            rich_help_panel=PANEL,
        ),
    ] = None,
    paillier: Annotated[
        Path | None,
        typer.Option(
            help="Aggregate under Paillier encryption with the sites' key: its public half (paillier.pub from "
            "`fedloom privacy paillier-keys`). The sites join with --paillier-key.",
            dir_okay=False,
            rich_help_panel=PANEL,
        ),
    ] = None,
    mlflow_uri: MlflowUri = None,
    tensorboard: TensorBoardDir = None,
    db: DbUrl = None,
) -> None:
    """Serve a federation: wait for clients to dial in, run the rounds, record the run.

    Make a token per site first (`fedloom token create NAME --run-dir DIR`, or `fedloom invite`). TLS is on by
    default: make the certificates once with `fedloom certs init --out certs --host HOST` and serve with
    --certs certs. If the server stops (a crash, kill -9, a reboot), the same command resumes the run after
    its last completed round; the clients reconnect by themselves. --strategy NAME runs another built-in
    algorithm than the job's (the sites need nothing more: every client has the client halves built in).
    --secagg aggregates each round securely: the server learns only the sum of the sites' updates; --paillier
    does it with additive encryption under the sites' shared key.
    """
    if insecure and (certs is not None or mutual_tls):
        raise ConfigError("--insecure runs without TLS; it cannot be combined with --certs or --mutual-tls")
    if mutual_tls and certs is None:
        raise ConfigError("--mutual-tls needs --certs DIR (its ca.pem signs the client certificates)")
    if certs is None and not insecure:
        raise ConfigError(TLS_MISSING)
    credentials = None if certs is None else server_credentials(certs, mutual=mutual_tls)
    tokens = TokenStore(run_dir)
    if tokens.count_valid() == 0:
        raise ConfigError(
            f"no client tokens in {run_dir}: make one per site with `fedloom token create NAME --run-dir {run_dir}` "
            "(or `fedloom invite NAME ...`)"
        )
    public = None if paillier is None else read_public_key(paillier)
    loaded = with_protection(
        with_strategy(load_job(job), strategy, strategy_arg),
        num_clients=dp_clients if dp_clients is not None else tokens.count_valid(),
        dp=DPFlags(dp_noise, dp_clip, dp_quantile, dp_delta, dp_target_epsilon),
        secagg=secagg,
        degree=secagg_degree,
        paillier=public,
    )
    limit_torch_threads(threads)
    identity = {
        "job": loaded.name,
        "backend": "deployment",
        "task": describe(loaded.task),
        "strategy": describe(loaded.strategy),
        "rounds": rounds,
        "seed": seed,
    }
    with user_code(f"the model of job {loaded.name!r} (init_params)"):
        initial = loaded.task.init_params(seed)
    server = FleetServer(  # binds the address now, so a port in use fails before anything is recorded
        address,
        authenticate=tokens.authenticate,
        credentials=credentials,
        max_message_bytes=int(max_message_mb * 2**20),
        max_uploads=max_uploads,
        heartbeat=heartbeat,
    )
    try:
        recorder, resume = RunRecorder.open(run_dir, loaded.name, identity, exporters(mlflow_uri, tensorboard), url=db)
    except BaseException:
        server.stop(0)
        raise
    console = Console(soft_wrap=True, highlight=False)
    if resume is not None:
        console.print(f"resuming run {recorder.run_id} after round {resume.completed_rounds} of {rounds}")
    security = "without TLS" if certs is None else "with mutual TLS" if mutual_tls else "with TLS"
    with server:
        console.print(
            f"fedloom server: job {loaded.name}, listening on {address} {security}, waiting for {min_clients} clients"
        )
        try:
            clients = server.wait_for_clients(min_clients, join_timeout)
        except FedloomError as exc:
            recorder.on_events(server.take_events())  # who came, and who was refused
            recorder.finish(resume.params if resume else initial, status="failed", error=str(exc))
            raise
        console.print(f"clients connected: {', '.join(clients)}")
        result = _run(loaded, server, recorder, initial, resume, rounds, seed, round_timeout, console)
    final: dict[str, float] = {}
    for record in result.history:
        final.update(record.metrics)
    shown = "  ".join(f"{k} {metric_text(v)}" for k, v in final.items())
    console.print(f"finished run [bold]{recorder.run_id}[/]: {shown}", highlight=False)
    console.print(f"params_sha256 {result.params.sha256()}\nrun directory {run_dir}")


def _run(
    job: Job,
    server: FleetServer,
    recorder: RunRecorder,
    initial: Params,
    resume: Resume | None,
    rounds: int,
    seed: int,
    timeout: float,
    console: Console,
) -> LoopResult:
    """Run the rounds over the server's grid, recorded as :func:`fedloom.simulate` records a simulation."""
    timeline = _Timeline(server, recorder)
    return run_recorded(
        recorder,
        strategy=job.strategy,
        grid=server.grid,
        initial_params=initial,
        rounds=rounds,
        seed=seed,
        observers=[timeline, _RoundLines(console, rounds)],
        timeout=timeout,
        resume=resume,
        on_close=timeline.close,
    )


class _Timeline:
    """After each round: tells each client whose reply was refused why, and records the clients' events
    (connections, instructions, replies, refusals, drops) in the run's timeline."""

    def __init__(self, server: FleetServer, recorder: RunRecorder) -> None:
        self._server = server
        self._recorder = recorder

    def on_round(self, record: RoundRecord, params: Params) -> None:
        events = self._server.take_events()
        now = datetime.now(timezone.utc)
        for client in record.clients:
            if client.status != ClientStatus.REFUSED:
                continue
            reason = f"round {record.server_round}: the server refused your {client.phase} reply: {client.detail}"
            self._server.notify(client.client_id, reason)
            events.append(ClientEvent(now, client.client_id, "refused", record.server_round, detail=client.detail))
        self._recorder.on_events(events)

    def close(self, error: BaseException | None) -> None:
        """Record the events since the last round: those of a round that failed, or, when the run is over, the
        clients leaving after the server says bye. A run that failed or was interrupted says no bye: the
        clients keep trying to reconnect, and rejoin when the same command resumes the run."""
        if error is None:
            self._server.say_bye()
        self._recorder.on_events(self._server.take_events())


class _RoundLines:
    """Prints a line per finished round."""

    def __init__(self, console: Console, rounds: int) -> None:
        self._console = console
        self._rounds = rounds

    def on_round(self, record: RoundRecord, params: Params) -> None:
        self._console.print(format_round(record, self._rounds), highlight=False)
