"""The process-pool backend: the same results as the inline backend, and clean failures and shutdowns."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from pools import JOB_FILE, TASK, FailingTask, bytes_up_agree, client_rows, digits_federation, fedavg
from torch import nn

from fedloom.app.job import load_job
from fedloom.core import ConfigError, FitConfig, JobError, Message
from fedloom.core.results import fit_message
from fedloom.data.base import FederatedData
from fedloom.data.lazy import digits_population
from fedloom.runtime import ClientStatus, InlineGrid
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.runtime.sim.process import ProcessGrid
from fedloom.runtime.sim.workers import RoundQueues, home_worker
from fedloom.task.torch_task import TorchTask

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def data() -> FederatedData:
    return digits_federation()


def fit_round(data: FederatedData) -> dict[str, Message]:
    params = TASK.init_params(0)
    return {cid: fit_message(1, params, FitConfig(batch_size=8, seed=i)) for i, cid in enumerate(data.client_ids)}


def worker_processes(before: set[psutil.Process]) -> set[psutil.Process]:
    """This process's children that were not there ``before``, less multiprocessing's resource tracker."""
    new = set(psutil.Process().children(recursive=True)) - before
    return {p for p in new if "resource_tracker" not in " ".join(p.cmdline())}


def test_fedavg_over_processes_is_bit_identical_to_inline(data: FederatedData, one_torch_thread: None) -> None:
    before = set(psutil.Process().children(recursive=True))
    with DropoutGrid(ProcessGrid(SimulatedClients.of(TASK, data), workers=2), 0.2, seed=7) as grid:
        assert grid.inner.workers == 2
        workers = worker_processes(before)
        assert len(workers) == 2
        pooled = fedavg(TASK, grid)
    inline = fedavg(TASK, DropoutGrid(InlineGrid(SimulatedClients.of(TASK, data)), 0.2, seed=7))

    assert pooled.params.sha256() == inline.params.sha256()
    assert client_rows(pooled) == client_rows(inline)
    assert bytes_up_agree(pooled, inline)
    statuses = [c.status for r in pooled.history for c in r.clients]
    assert ClientStatus.DROPPED in statuses  # the dropout rule was exercised, and agreed
    assert all(c.seconds > 0 for r in pooled.history for c in r.clients if c.status == ClientStatus.OK)
    assert pooled.history[-1].metrics == inline.history[-1].metrics
    # closing stopped the workers
    assert not any(p.is_running() for p in workers)
    grid.close()  # idempotent


def test_a_lazy_federation_is_shipped_per_instruction_and_not_kept(one_torch_thread: None) -> None:
    lazy = digits_population(60, seed=1, mean_size=12)
    with ProcessGrid(SimulatedClients.of(TASK, lazy), workers=2) as grid:
        pooled = fedavg(TASK, grid)
        kept = [len(held) for held in grid._has_data]
    inline = fedavg(TASK, InlineGrid(SimulatedClients.of(TASK, lazy)))
    assert pooled.params.sha256() == inline.params.sha256()
    assert kept == [0, 0]  # workers hold no client between instructions


def test_a_task_from_a_job_file_runs_when_workers_import_the_file(
    tmp_path: Path, data: FederatedData, one_torch_thread: None
) -> None:
    path = tmp_path / "job.py"
    path.write_text(JOB_FILE)
    job = load_job(str(path))
    assert job.source is not None
    with ProcessGrid(SimulatedClients.of(job.task, data, job_file=job.source), workers=2) as grid:
        pooled = fedavg(job.task, grid)
    assert pooled.params.sha256() == fedavg(job.task, InlineGrid(SimulatedClients.of(job.task, data))).params.sha256()

    with pytest.raises(ConfigError, match=r"cannot load the task \(.*fedloom_job_.*pass job_file=job.source"):
        ProcessGrid(SimulatedClients.of(job.task, data), workers=1)


def test_a_task_that_cannot_be_pickled_is_a_config_error(data: FederatedData) -> None:
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(ConfigError, match=r"cannot be sent to worker processes .*module-level function"):
        ProcessGrid(SimulatedClients.of(TorchTask(lambda: nn.Linear(64, 10)), data), workers=2)
    assert worker_processes(before) == set()


def test_a_task_that_raises_is_a_job_error_naming_the_client_and_stops_the_workers(data: FederatedData) -> None:
    victim = data.client_ids[3]
    task = FailingTask(float(data.clients[victim].train.x.sum()))
    messages = fit_round(data)
    before = set(psutil.Process().children(recursive=True))
    grid = ProcessGrid(SimulatedClients.of(task, data), workers=2)
    workers = worker_processes(before)
    with pytest.raises(JobError, match=rf"^client {victim} in fit raised RuntimeError: disk full$") as raised:
        grid.send_and_receive(messages)
    assert "disk full" in str(raised.value.__cause__)  # the worker's traceback comes along
    assert not any(p.is_running() for p in workers)
    with pytest.raises(Exception, match="closed"):
        grid.send_and_receive(messages)


def test_a_worker_that_dies_is_a_job_error_not_a_hang(data: FederatedData) -> None:
    victim = data.client_ids[5]
    task = FailingTask(float(data.clients[victim].train.x.sum()), kill=True)
    messages = fit_round(data)
    before = set(psutil.Process().children(recursive=True))
    with ProcessGrid(SimulatedClients.of(task, data), workers=2) as grid:
        workers = worker_processes(before)
        with pytest.raises(
            JobError, match=rf"^simulation worker \d \(pid \d+\) was killed by signal 9.* client {victim} in fit$"
        ):
            grid.send_and_receive(messages)
    assert not any(p.is_running() for p in workers)


def test_workers_stop_when_the_grid_is_garbage_collected(data: FederatedData) -> None:
    before = set(psutil.Process().children(recursive=True))
    grid = ProcessGrid(SimulatedClients.of(TASK, data), workers=1)
    workers = worker_processes(before)
    assert len(workers) == 1
    del grid
    assert not any(p.is_running() for p in workers)


def test_an_idle_worker_takes_the_last_queued_client_of_the_busiest_one() -> None:
    ids = [f"client-{i:03d}" for i in range(40)]
    at_zero = [cid for cid in ids if home_worker(cid, 3) == 0][:4]
    at_one = [cid for cid in ids if home_worker(cid, 3) == 1][:1]
    queues = RoundQueues(at_zero + at_one, workers=3)
    assert queues.next_for(2) == (at_zero[-1], False)  # nothing of its own: steals from the longest queue
    assert queues.next_for(1) == (at_one[0], True)
    assert queues.next_for(1) == (at_zero[-2], False)
    assert queues.next_for(0) == (at_zero[0], True)
    assert queues.next_for(0) == (at_zero[1], True)
    assert queues.next_for(0) is None
    assert home_worker("client-007", 3) == home_worker("client-007", 3)  # stable (not Python's salted hash)
