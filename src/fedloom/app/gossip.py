"""``simulate_gossip``: run a job as decentralized FL (gossip averaging over a topology, no server) in simulation.

import fedloom as fl
result = fl.simulate_gossip(fl.load_job("digits"), topology="regular", degree=4)
print(result.final.client_accuracy, result.final.consensus_distance, result.spectral_gap)
"""

from __future__ import annotations

import logging

from fedloom.app.job import Job
from fedloom.app.simulation import load_federation
from fedloom.core.config import FitConfig, SimulationConfig
from fedloom.core.errors import ConfigError
from fedloom.core.graphs import check_topology
from fedloom.runtime.sim.gossip import GossipResult, GossipRound, run_gossip

__all__ = ["GossipResult", "GossipRound", "format_round", "simulate_gossip"]

announce = logging.getLogger("fedloom.run")  # the headline and a line per round: the CLI prints these

# The fields shown on each round's line, in order, with their short labels.
_SHOWN = (
    ("fit_loss", "fit_loss"),
    ("client_loss", "client_loss"),
    ("client_accuracy", "client_acc"),
    ("central_loss", "loss"),
    ("central_accuracy", "acc"),
)


def simulate_gossip(
    job: Job, *, topology: str = "ring", degree: int | None = None, simulation: SimulationConfig | None = None
) -> GossipResult:
    """Run ``job`` as decentralized FL: no server; every client trains its own model and, after each round,
    averages it with its neighbours' on the ``topology`` graph (``ring``, ``regular`` with ``degree``
    neighbours per client, or ``full``), with Metropolis-Hastings weights (see :mod:`fedloom.core.graphs`).

    The job's task and data are used as :func:`fedloom.simulate` uses them, and every client trains as
    ``job.strategy.fit`` says; the strategy's aggregation and client sampling are not used (every client
    trains every round). ``simulation`` replaces ``job.simulation`` when given: its rounds, clients, partition,
    holdout, data folder and seed apply; clients run one after another in this process, whatever its
    ``backend``. The run is not recorded in the run store. A line per round is logged to ``fedloom.run``.

    Raises :class:`ConfigError` when the strategy has no ``fit``, for an unknown topology or a degree that does
    not fit it, and for settings gossip does not simulate (attacks, dropout, client systems).
    """
    config = simulation or job.simulation
    fit = getattr(job.strategy, "fit", None)
    if not isinstance(fit, FitConfig):
        raise ConfigError(
            f"gossip trains every client as the job's strategy's fit (a FitConfig) says, but job {job.name!r} "
            f"uses {type(job.strategy).__name__}, which has none"
        )
    _check_settings(config, topology, degree)
    data, made = load_federation(job, config)
    announce.info(
        "fedloom: job %s, %d clients, %d rounds, %s, seed %d, gossip on a %s topology (no server, not recorded)",
        job.name,
        len(data.client_ids),
        config.rounds,
        made,
        config.seed,
        topology if degree is None else f"{topology} (degree {degree})",
    )

    def progress(record: GossipRound) -> None:
        announce.info("%s", format_round(record, config.rounds), extra={"gossip_round": record.round})

    result = run_gossip(
        job.task,
        data,
        topology=topology,
        degree=degree,
        rounds=config.rounds,
        fit=fit,
        seed=config.seed,
        progress=progress,
    )
    announce.info(
        "gossip: spectral gap %.4f, consensus distance %.6g", result.spectral_gap, result.final.consensus_distance
    )
    return result


def _check_settings(config: SimulationConfig, topology: str, degree: int | None) -> None:
    """Refuse what gossip would otherwise ignore silently, before any data is loaded."""
    check_topology(topology, degree)
    if config.attacks:
        raise ConfigError("gossip runs do not simulate attacks; remove the job's attacks (or --attack)")
    if config.dropout:
        raise ConfigError(f"gossip runs do not simulate dropout; every client takes part, got dropout {config.dropout}")
    if not config.system.is_default:
        raise ConfigError("gossip runs do not simulate client systems (availability, stragglers, deadlines)")


def format_round(record: GossipRound, rounds: int) -> str:
    """One line: round, main metrics, consensus distance, seconds."""
    parts = [f"round {record.round:>{len(str(rounds))}}/{rounds}"]
    for field, label in _SHOWN:
        value = getattr(record, field)
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    parts += [f"consensus {record.consensus_distance:.4g}", f"{record.seconds:.2f}s"]
    return "  ".join(parts)
