"""``fedloom simulate``: run a job file or a built-in example as a simulated federation."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedloom.cli.progress import ConsoleProgress
from fedloom.core.config import PARTITION_SCHEMES, PartitionConfig
from fedloom.core.errors import ConfigError
from fedloom.job import Job, load_job
from fedloom.simulation import simulate
from fedloom.strategy.fedavg import FedAvg

_PANEL_SIM = "Federation"
_PANEL_FIT = "Strategy and local training"


def simulate_command(
    job: Annotated[
        str,
        typer.Argument(
            help="A job file (path/to/job.py) or a built-in example: digits, "
            "heart_disease, mnist, mnist_2nn, synthetic."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Runs folder; the run goes to OUT/<run-id>/.")] = Path("runs"),
    clients: Annotated[
        int | None, typer.Option(help="Number of simulated clients.", rich_help_panel=_PANEL_SIM)
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Number of rounds.", rich_help_panel=_PANEL_SIM)] = None,
    partition: Annotated[
        str | None, typer.Option(help=f"Partition scheme: {', '.join(PARTITION_SCHEMES)}.", rich_help_panel=_PANEL_SIM)
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Dirichlet concentration (dirichlet, quantity).", rich_help_panel=_PANEL_SIM)
    ] = None,
    shards: Annotated[int | None, typer.Option(help="Shards per client (shards).", rich_help_panel=_PANEL_SIM)] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Folder to read the dataset from.", rich_help_panel=_PANEL_SIM)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of everything random.", rich_help_panel=_PANEL_SIM)] = None,
    dropout: Annotated[
        float | None,
        typer.Option(help="Probability that a selected client fails to reply.", rich_help_panel=_PANEL_SIM),
    ] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Fraction C of clients trained per round.", rich_help_panel=_PANEL_FIT)
    ] = None,
    min_clients: Annotated[
        int | None, typer.Option(help="Fewest replies a round accepts.", rich_help_panel=_PANEL_FIT)
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs E.", rich_help_panel=_PANEL_FIT)] = None,
    local_steps: Annotated[
        int | None, typer.Option(help="Local SGD steps S (instead of epochs).", rich_help_panel=_PANEL_FIT)
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size B.", rich_help_panel=_PANEL_FIT)] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate.", rich_help_panel=_PANEL_FIT)] = None,
    threads: Annotated[int, typer.Option(help="CPU threads torch may use.", min=1)] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final summary.")] = False,
) -> None:
    """Run a simulated federation and record it in the runs folder."""
    loaded = load_job(job)
    _limit_torch_threads(threads)
    configured = _apply_flags(
        loaded,
        simulation={"num_clients": clients, "rounds": rounds, "seed": seed, "dropout": dropout, "data_dir": data},
        partition={"scheme": partition, "alpha": alpha, "shards_per_client": shards},
        strategy={"fraction": fraction, "min_clients": min_clients},
        fit={"local_epochs": local_epochs, "local_steps": local_steps, "batch_size": batch_size, "lr": lr},
    )
    console = Console(soft_wrap=True)  # a round line stays one line, whatever the terminal's width
    sim = configured.simulation
    console.print(
        f"fedloom: job [bold]{configured.name}[/], {sim.num_clients} clients, {sim.rounds} rounds, "
        f"partition {sim.partition.scheme}, seed {sim.seed}",
        highlight=False,
    )
    observers = [] if quiet else [ConsoleProgress(console, sim.rounds, configured.name)]
    if observers:
        with observers[0]:
            run = simulate(configured, runs_dir=out, observers=observers)
    else:
        run = simulate(configured, runs_dir=out)
    final = "  ".join(f"{k} {v:.4f}" for k, v in run.final_metrics.items())
    console.print(f"finished run [bold]{run.run_id}[/]: {final}", highlight=False)
    console.print(f"params_sha256 {run.params_sha256}\nrun directory {run.run_dir}", highlight=False)


def _limit_torch_threads(threads: int) -> None:
    """Clients train one after another on small batches, where torch's thread pool costs more than it gives
    (measured: a 64-32-10 MLP runs the quickstart 20x slower with 2 threads on a busy 2-core machine). Only
    a job that already imported torch is affected; a NumPy-only job never loads it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _apply_flags(
    job: Job,
    *,
    simulation: dict[str, Any],
    partition: dict[str, Any],
    strategy: dict[str, Any],
    fit: dict[str, Any],
) -> Job:
    """The job with the given flags laid over its defaults (flags left out keep the job's values)."""
    sim = job.simulation
    if _given(partition):
        sim = dataclasses.replace(
            sim, partition=PartitionConfig(**{**dataclasses.asdict(sim.partition), **_given(partition)})
        )
    sim = dataclasses.replace(sim, **_given(simulation))
    chosen = job.strategy
    strategy_flags, fit_flags = _given(strategy), _given(fit)
    if strategy_flags or fit_flags:
        if not isinstance(chosen, FedAvg):
            raise ConfigError(
                f"--fraction, --min-clients and the local training flags apply to FedAvg; "
                f"job {job.name!r} uses {type(chosen).__name__}"
            )
        if "local_steps" in fit_flags and "local_epochs" not in fit_flags:
            fit_flags["local_epochs"] = None
        if "local_epochs" in fit_flags and "local_steps" not in fit_flags:
            fit_flags["local_steps"] = None
        chosen = dataclasses.replace(chosen, fit=dataclasses.replace(chosen.fit, **fit_flags), **strategy_flags)
    return dataclasses.replace(job, simulation=sim, strategy=chosen)
