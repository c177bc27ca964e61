"""``fedloom partition``: split a job's dataset over clients as ``simulate`` would, one data file per client."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedloom.core.config import PARTITION_SCHEMES, PartitionConfig
from fedloom.core.errors import ConfigError


def partition_command(
    job: Annotated[str, typer.Argument(help="A job file (path/to/job.py) or a built-in example such as digits.")],
    out: Annotated[Path, typer.Option(help="Folder for the files; client ID's data goes to OUT/ID.npz.")],
    clients: Annotated[int | None, typer.Option(help="Number of clients (default: the job's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split (default: the job's).")] = None,
    partition: Annotated[
        str | None, typer.Option(help=f"Partition scheme: {', '.join(PARTITION_SCHEMES)} (default: the job's).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration (dirichlet, quantity).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Folder to read the dataset from.")] = None,
) -> None:
    """Split the job's dataset over clients exactly as `fedloom simulate` does with the same flags, and write
    each client's data to OUT/<client-id>.npz, so a simulated federation can be deployed client by client."""
    from fedloom.app.job import load_job
    from fedloom.data.base import Dataset
    from fedloom.data.clientfile import save_client_data
    from fedloom.data.federate import federate

    loaded = load_job(job)
    sim = loaded.simulation
    scheme = dataclasses.asdict(sim.partition)
    scheme.update({k: v for k, v in {"scheme": partition, "alpha": alpha}.items() if v is not None})
    num_clients = sim.num_clients if clients is None else clients
    chosen_seed = sim.seed if seed is None else seed
    dataset = loaded.load_data(data if data is not None else sim.data_dir, num_clients=num_clients, seed=chosen_seed)
    if not isinstance(dataset, Dataset):
        raise ConfigError(f"job {loaded.name!r} makes a lazy federation of simulated clients; nothing to write")
    federation = federate(dataset, num_clients, PartitionConfig(**scheme), chosen_seed, sim.holdout)
    console = Console(soft_wrap=True)
    for client_id, client_data in federation.clients.items():
        written = save_client_data(out / f"{client_id}.npz", client_data)
        console.print(f"{client_id}: {len(client_data.train)} train, {len(client_data.test)} test -> {written}")
