"""``fedloom server``: run a job's server for clients at other sites, and record the run in its run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedloom.cli.exporting import MlflowUri, TensorBoardDir, exporters
from fedloom.cli.privacy import read_public_key
from fedloom.cli.progress import RoundLines, metric_text, print_announcements
from fedloom.cli.protection import (
    PANEL,
    DPClipOption,
    DPDeltaOption,
    DPNoiseOption,
    DPQuantileOption,
    DPTargetOption,
    SecAggDegreeOption,
    SecAggOption,
)
from fedloom.cli.runs import DbUrl
from fedloom.cli.simulate import StrategyArgOption, StrategyOption, limit_torch_threads, with_strategy


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
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="A site never asked to train or evaluate (repeat, or separate with commas): how a run whose model "
            "diverged resumes without the sites whose updates made it, as its error says.",
        ),
    ] = None,
    from_checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Start this new run from the model of another: its run directory (its last checkpoint) or a "
            "checkpoint file (.safetensors), instead of the job's initial model. How a changed job (same "
            "parameters) goes on from a run's model in a new --run-dir; give it again to resume this run.",
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
    its last completed round; the clients reconnect by themselves. The run is bound to its job: a resume with
    a changed job file is refused (start a new --run-dir, --from-checkpoint the old one), and so is a site
    whose job differs from the server's. --strategy NAME runs another built-in
    algorithm than the job's (the sites need nothing more: every client has the client halves built in).
    --secagg aggregates each round securely: the server learns only the sum of the sites' updates; --paillier
    does it with additive encryption under the sites' shared key.
    """
    from fedloom.app.deployment import ServerTLS, serve
    from fedloom.app.job import load_job
    from fedloom.app.protection import DPSettings, PrivacySettings

    tls = ServerTLS(certs, mutual=mutual_tls, insecure=insecure)
    privacy = PrivacySettings(
        DPSettings(dp_noise, dp_clip, dp_quantile, dp_delta, dp_target_epsilon),
        secagg=secagg,
        secagg_degree=secagg_degree,
        paillier=None if paillier is None else read_public_key(paillier),
    )
    loaded = with_strategy(load_job(job), strategy, strategy_arg)
    limit_torch_threads(threads)
    console = Console(soft_wrap=True, highlight=False)
    print_announcements(console)
    run = serve(
        loaded,
        address=address,
        rounds=rounds,
        min_clients=min_clients,
        run_dir=run_dir,
        tls=tls,
        seed=seed,
        round_timeout=round_timeout,
        join_timeout=join_timeout,
        max_message_bytes=int(max_message_mb * 2**20),
        max_uploads=max_uploads,
        heartbeat=heartbeat,
        privacy=privacy,
        dp_clients=dp_clients,
        exporters=exporters(mlflow_uri, tensorboard),
        db_url=db,
        observers=[RoundLines(console, rounds)],
        exclude=[site.strip() for item in exclude or () for site in item.split(",") if site.strip()],
        from_checkpoint=from_checkpoint,
    )
    shown = "  ".join(f"{k} {metric_text(v)}" for k, v in run.final_metrics.items())
    console.print(f"finished run [bold]{run.run_id}[/]: {shown}", highlight=False)
    console.print(f"params_sha256 {run.params_sha256}\nrun directory {run_dir}")
