"""``fedloom simulate JOB --topology ...``: the job as decentralized FL (gossip, no server), and its table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from fedloom.core.errors import ConfigError

if TYPE_CHECKING:
    from fedloom.app.job import Job
    from fedloom.tracking import Exporter

# Flags of `fedloom simulate` that a gossip run has no use for: its clients all train every round, in this
# process, and there is no server to run a strategy or to attack.
_NOT_FOR_GOSSIP = (
    "--strategy",
    "--strategy-arg",
    "--secagg",
    "--paillier",
    "--dp-noise",
    "--attack",
    "--fraction",
    "--min-clients",
    "--clients-per-round",
    "--backend",
    "--device",
    "--workers",
    "--ray-address",
    "--memory-budget-mb",
)


def check_gossip_flags(given: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line) when a flag that gossip cannot honour was given with --topology;
    ``given`` maps each of those flags to its value (``None``: not given)."""
    clashing = [flag for flag in _NOT_FOR_GOSSIP if given.get(flag) not in (None, [])]
    if clashing:
        raise ConfigError(
            f"--topology runs the job decentralized (no server, every client every round, in this process), so "
            f"{', '.join(clashing)} cannot be used with it"
        )


def run_decentralized(
    console: Console,
    job: Job,
    topology: str,
    degree: int | None,
    *,
    quiet: bool,
    out: Path,
    exporters: Sequence[Exporter] = (),
    db_url: str | None = None,
) -> None:
    """Run ``job`` with :func:`~fedloom.app.gossip.simulate_gossip`, recorded under ``out`` (its rows at ``db_url``
    where given), printing its round lines (unless ``quiet``), a final table, and the run's id and directory."""
    from fedloom.app.gossip import simulate_gossip

    if quiet:
        for handler in logging.getLogger("fedloom.run").handlers:
            handler.addFilter(lambda record: not hasattr(record, "gossip_round"))
    run = simulate_gossip(job, topology=topology, degree=degree, runs_dir=out, exporters=exporters, db_url=db_url)
    final = run.final
    table = Table(title="decentralized run (gossip, no server)")
    table.add_column("", justify="left")
    table.add_column("final", justify="right")
    rows = {
        "topology": topology if degree is None else f"{topology}, degree {degree}",
        "clients, rounds": f"{len(run.models)}, {final.round}",
        "spectral gap": f"{run.spectral_gap:.4f}",
        "mean client accuracy (own model, own test split)": _number(final.client_accuracy),
        "average model's central accuracy": _number(final.central_accuracy),
        "consensus distance (mean ||x_i - x_mean||^2)": f"{final.consensus_distance:.4g}",
        "seconds": f"{sum(r.seconds for r in run.history):.1f}",
    }
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
    console.print(
        f"finished run [bold]{run.run_id}[/] (its checkpoints and params_sha256 are the clients' average model's)",
        highlight=False,
    )
    console.print(f"params_sha256 {run.params_sha256}\nrun directory {run.run_dir}", highlight=False)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
