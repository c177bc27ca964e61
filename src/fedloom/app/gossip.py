"""``simulate_gossip``: run a job as decentralized FL (gossip averaging over a topology, no server) in simulation,
and record it in the run store as every run is.

import fedloom as fl
result = fl.simulate_gossip(fl.load_job("digits"), topology="regular", degree=4)
print(result.final.client_accuracy, result.final.consensus_distance, result.spectral_gap, result.run_dir)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.app.job import Job, describe
from fedloom.app.run import record_run
from fedloom.app.simulation import load_federation
from fedloom.core.config import FitConfig, SimulationConfig
from fedloom.core.errors import ConfigError, user_code
from fedloom.core.graphs import check_topology
from fedloom.core.params import Params
from fedloom.runtime.records import RoundObserver
from fedloom.runtime.sim.gossip import GossipResult, GossipRound, run_gossip
from fedloom.tracking import Exporter, RunRecorder

__all__ = ["GOSSIP_STRATEGY", "GossipResult", "GossipRound", "GossipRun", "format_round", "simulate_gossip"]

log = logging.getLogger("fedloom")
announce = logging.getLogger("fedloom.run")  # the headline and a line per round: the CLI prints these

#: What a gossip run records as its ``strategy`` ``type`` (with its topology, degree, mixing weights and local
#: training), where a centralized run records its strategy's: how the run list and comparisons tell them apart.
GOSSIP_STRATEGY = "Gossip"

# The fields shown on each round's line, in order, with their short labels.
_SHOWN = (
    ("fit_loss", "fit_loss"),
    ("client_loss", "client_loss"),
    ("client_accuracy", "client_acc"),
    ("central_loss", "loss"),
    ("central_accuracy", "acc"),
)


@dataclass(frozen=True)
class GossipRun(GossipResult):
    """A recorded gossip run: what :class:`GossipResult` holds, and the run's id and directory in the run store."""

    run_id: str
    run_dir: Path

    @property
    def params_sha256(self) -> str:
        """The hash of the clients' average model, as the run store records it."""
        return self.average.sha256()


def simulate_gossip(
    job: Job,
    *,
    topology: str = "ring",
    degree: int | None = None,
    simulation: SimulationConfig | None = None,
    runs_dir: str | Path = "runs",
    exporters: Sequence[Exporter] = (),
    db_url: str | None = None,
) -> GossipRun:
    """Run ``job`` as decentralized FL: no server; every client trains its own model and, after each round,
    averages it with its neighbours' on the ``topology`` graph (``ring``, ``regular`` with ``degree``
    neighbours per client, or ``full``), with Metropolis-Hastings weights (see :mod:`fedloom.core.graphs`).

    The job's task and data are used as :func:`fedloom.simulate` uses them, and every client trains as
    ``job.strategy.fit`` says; the strategy's aggregation and client sampling are not used (every client
    trains every round). ``simulation`` replaces ``job.simulation`` when given: its rounds, clients, partition,
    holdout, data folder and seed apply; clients run one after another in this process, whatever its
    ``backend``. A line per round is logged to ``fedloom.run``.

    The run is recorded as :func:`fedloom.simulate` records one, under ``runs_dir/<run-id>/`` (its rows in the
    shared database at ``db_url`` where given, and mirrored by ``exporters``): each round's metrics (see
    :data:`~fedloom.runtime.sim.gossip.RECORDED_METRICS`), every client's ``fit`` and ``evaluate`` records, a
    checkpoint of the clients' average model after each round, and ``summary.json``. Its config records the
    strategy as :data:`GOSSIP_STRATEGY` with the topology and degree. A run that fails is recorded as failed,
    with its error, and the error is raised again.

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
    check_topology(topology, degree, len(data.client_ids))  # a degree that cannot fit is refused before a run starts
    shown = topology if degree is None else f"{topology} (degree {degree})"
    announce.info(
        "fedloom: job %s, %d clients, %d rounds, %s, seed %d, gossip on a %s topology (no server)",
        job.name,
        len(data.client_ids),
        config.rounds,
        made,
        config.seed,
        shown,
    )
    with user_code(f"the model of job {job.name!r} (init_params)"):
        initial = job.task.init_params(config.seed)
    recorded: dict[str, Any] = {
        "job": job.name,
        "dataset": data.name,
        "backend": "inline",
        "backend_reason": "a gossip run trains its clients in this process, one after another",
        "task": describe(job.task),
        "strategy": {
            "type": GOSSIP_STRATEGY,
            "topology": topology,
            "degree": degree,
            "mixing": "metropolis-hastings",
            "fit": describe(fit),
        },
        "simulation": describe(config),
    }
    recorder = RunRecorder.create(runs_dir, job.name, recorded, exporters, url=db_url)
    log.info(
        "run %s: %d clients, %d rounds, gossip on a %s topology, in %s",
        recorder.run_id,
        len(data.client_ids),
        config.rounds,
        shown,
        recorder.run_dir,
    )

    def progress(record: GossipRound) -> None:
        announce.info("%s", format_round(record, config.rounds), extra={"gossip_round": record.round})

    def run(recording: Sequence[RoundObserver]) -> tuple[GossipResult, Params]:
        result = run_gossip(
            job.task,
            data,
            topology=topology,
            degree=degree,
            rounds=config.rounds,
            fit=fit,
            seed=config.seed,
            initial_params=initial,
            progress=progress,
            observers=recording,
        )
        return result, result.average

    result = record_run(recorder, initial, run)
    announce.info(
        "gossip: spectral gap %.4f, consensus distance %.6g", result.spectral_gap, result.final.consensus_distance
    )
    return GossipRun(
        result.models,
        result.average,
        result.history,
        result.topology,
        result.spectral_gap,
        recorder.run_id,
        recorder.run_dir,
    )


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
