"""``fedloom simulate JOB --topology ...``: the job as decentralized FL (gossip, no server), and its table."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from fedloom.core.errors import ConfigError

if TYPE_CHECKING:
    from fedloom.app.job import Job

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


def run_decentralized(console: Console, job: Job, topology: str, degree: int | None, *, quiet: bool) -> None:
    """Run ``job`` with :func:`~fedloom.app.gossip.simulate_gossip`, printing its round lines (unless ``quiet``) and
    a final table. Nothing is recorded in the run store."""
    from fedloom.app.gossip import simulate_gossip

    if quiet:
        for handler in logging.getLogger("fedloom.run").handlers:
            handler.addFilter(lambda record: not hasattr(record, "gossip_round"))
    result = simulate_gossip(job, topology=topology, degree=degree)
    final = result.final
    table = Table(title="decentralized run (gossip, no server)")
    table.add_column("", justify="left")
    table.add_column("final", justify="right")
    rows = {
        "topology": topology if degree is None else f"{topology}, degree {degree}",
        "clients, rounds": f"{len(result.models)}, {final.round}",
        "spectral gap": f"{result.spectral_gap:.4f}",
        "mean client accuracy (own model, own test split)": _number(final.client_accuracy),
        "average model's central accuracy": _number(final.central_accuracy),
        "consensus distance (mean ||x_i - x_mean||^2)": f"{final.consensus_distance:.4g}",
        "seconds": f"{sum(r.seconds for r in result.history):.1f}",
    }
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
    console.print(f"params_sha256 {result.average.sha256()}", highlight=False)
    console.print("(the average model's; gossip runs are not recorded in the run store)", highlight=False)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
