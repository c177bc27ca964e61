"""``simulate``: run a job as a simulated federation and record it in the run store."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedloom.app.job import Job, describe
from fedloom.app.jobdigest import job_digest
from fedloom.app.run import Run, run_recorded
from fedloom.core.config import SimulationConfig
from fedloom.core.errors import ConfigError, user_code
from fedloom.core.params import Params
from fedloom.core.results import EvalResult
from fedloom.data.base import Dataset, Federation
from fedloom.data.federate import federate
from fedloom.privacy.he import PaillierAgg
from fedloom.privacy.paillier import KeyPair
from fedloom.runtime.records import RoundObserver
from fedloom.runtime.sim.backends import Backend, open_backend
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.strategy.base import AsyncStrategy
from fedloom.tracking import Exporter, RunRecorder

__all__ = ["load_federation", "simulate"]

log = logging.getLogger("fedloom")
announce = logging.getLogger("fedloom.run")  # the run's headline and its backend: the CLI prints these


def simulate(
    job: Job,
    *,
    simulation: SimulationConfig | None = None,
    runs_dir: str | Path = "runs",
    observers: Sequence[RoundObserver] = (),
    exporters: Sequence[Exporter] = (),
    db_url: str | None = None,
) -> Run:
    """Run ``job`` as a simulated federation and record it under ``runs_dir/<run-id>/``.

    ``simulation`` replaces ``job.simulation`` when given; its ``backend`` chooses what runs the clients
    (``auto``: the fastest backend that supports the task; the choice and its reason are logged and recorded)
    and its ``system`` models cross-device availability and stragglers. A job whose data function returns a
    ready federation (a lazy million-client population) runs on it as it is; otherwise the dataset is
    partitioned over ``num_clients`` clients. The run directory holds the SQLite run database, a checkpoint
    per round and ``summary.json``; a run that fails is recorded as failed, with its error, and the error is
    raised again. ``exporters`` (:class:`~fedloom.tracking.MlflowExporter`,
    :class:`~fedloom.tracking.TensorBoardExporter`) mirror the run elsewhere as it is recorded. ``db_url``
    records the run's rows in a database that many runs share (PostgreSQL: see :class:`~fedloom.tracking.RunStore`)
    instead of the run directory's own SQLite file.
    """
    config = simulation or job.simulation
    data, made = load_federation(job, config)
    announce.info(
        "fedloom: job %s, %d clients, %d rounds, %s, seed %d",
        job.name,
        len(data.client_ids),
        config.rounds,
        made,
        config.seed,
    )
    with user_code(f"the model of job {job.name!r} (init_params)"):
        initial = job.task.init_params(config.seed)
    job_file = job.source if job.source is not None and job.source.endswith(".py") else None
    job, paillier_key = _simulated_keys(job)
    clients = SimulatedClients.of(job.task, data, mods=job.mods, paillier_key=paillier_key, job_file=job_file)
    asynchronous = isinstance(job.strategy, AsyncStrategy)
    with open_backend(clients, config, asynchronous=asynchronous) as backend:
        return _run(job, config, data, initial, backend, Path(runs_dir), observers, exporters, db_url)


def load_federation(job: Job, config: SimulationConfig) -> tuple[Federation, str]:
    """The federation ``job`` runs on under ``config``, and how it was made (for the run's headline): the job's
    dataset partitioned over ``config.num_clients`` clients, or the ready federation its data function returned."""
    loaded = job.load_data(config.data_dir, num_clients=config.num_clients, seed=config.seed)
    if isinstance(loaded, Dataset):
        data = federate(loaded, config.num_clients, config.partition, config.seed, config.holdout)
        return data, f"partition {config.partition.label()}"
    return loaded, f"{type(loaded).__name__} {loaded.name!r}"


def _run(
    job: Job,
    config: SimulationConfig,
    data: Federation,
    initial: Params,
    backend: Backend,
    runs_dir: Path,
    observers: Sequence[RoundObserver],
    exporters: Sequence[Exporter],
    db_url: str | None,
) -> Run:
    recorded: dict[str, Any] = {
        "job": job.name,
        "job_digest": job_digest(job, initial).sha256,  # as a deployment of the same job records it
        "dataset": data.name,
        "backend": backend.name,
        "backend_reason": backend.reason,
        "task": describe(job.task),
        "strategy": describe(job.strategy),
        "simulation": describe(config),
    }
    central = data.central_test
    evaluate_central = None
    if central is not None and len(central):

        def evaluate_central(params: Params) -> EvalResult:
            with user_code("central evaluation on the server's test set"):
                return job.task.evaluate(params, central)

    grid = backend.grid
    recorder = RunRecorder.create(runs_dir, job.name, recorded, exporters, url=db_url)
    log.info(
        "run %s: %d clients, %d rounds, on the %s backend, in %s",
        recorder.run_id,
        len(data.client_ids),
        config.rounds,
        backend.name,
        recorder.run_dir,
    )
    result = run_recorded(
        recorder,
        strategy=job.strategy,
        grid=grid,
        initial_params=initial,
        rounds=config.rounds,
        seed=config.seed,
        evaluate_central=evaluate_central,
        observers=observers,
    )
    return Run(recorder.run_id, recorder.run_dir, result.params, result.history, backend.name)


def _simulated_keys(job: Job) -> tuple[Job, KeyPair | None]:
    """For Paillier aggregation without a key, the run's key pair: its simulated clients hold it, and the
    strategy gets its public half (what a deployment distributes out of band, a simulation makes itself)."""
    strategy = job.strategy
    if not isinstance(strategy, PaillierAgg):
        return job, None
    if strategy.public_key is not None:
        raise ConfigError(
            "in a simulation, leave PaillierAgg's public_key unset: the run makes a key pair for its simulated "
            "clients (a deployment's sites get theirs with fedloom client --he-key)"
        )
    keys = KeyPair.generate(strategy.key_bits)
    return dataclasses.replace(job, strategy=dataclasses.replace(strategy, public_key=keys.public)), keys
