"""Backend choice: ``auto`` picks the fastest backend that supports the task and says why; a backend that cannot
run the task falls back with one line."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import pytest
from torch import nn

from fedloom.core import (
    BackendConfig,
    EvalResult,
    FitConfig,
    FitResult,
    Params,
    PartitionConfig,
    SimulationConfig,
    SystemConfig,
)
from fedloom.data import federate, load_digits
from fedloom.data.base import ArrayData, FederatedData
from fedloom.runtime.sim.backends import open_backend
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.crossdevice import SystemGrid
from fedloom.task import LogisticRegressionTask
from fedloom.task.torch_task import TorchTask


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))


@dataclass(frozen=True)
class SlowTask:
    """A task whose every call takes 30 ms: enough work per client for worker processes to pay off."""

    def init_params(self, seed: int) -> Params:
        return LogisticRegressionTask(64, 10).init_params(seed)

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        time.sleep(0.03)
        return FitResult(params, len(data), {})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        time.sleep(0.03)
        return EvalResult(0.0, len(data), {})


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    return federate(load_digits(), 4, PartitionConfig(scheme="iid"), seed=0)


def chosen(task: object, data: FederatedData, **settings: object) -> tuple[str, str, object]:
    config = SimulationConfig(backend=BackendConfig(**settings))  # type: ignore[arg-type]
    with open_backend(SimulatedClients.of(task, data), config) as backend:  # type: ignore[arg-type]
        return backend.name, backend.reason, backend.grid


def test_auto_runs_a_vmap_able_torch_model_vectorized(digits: FederatedData) -> None:
    name, reason, _ = chosen(TorchTask(mlp), digits)
    assert (name, reason) == ("vectorized", "the task's model trains in lockstep with vmap")


def test_auto_runs_a_small_numpy_task_inline_and_says_why(digits: FederatedData) -> None:
    name, reason, _ = chosen(LogisticRegressionTask(64, 10), digits)
    assert name == "inline"
    assert reason.startswith("vectorized cannot run this task (it needs a TorchTask, this is a LogisticRegressionTask)")
    assert "too small" in reason


@pytest.mark.integration
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_auto_spreads_clients_with_real_work_over_worker_processes(digits: FederatedData) -> None:
    name, reason, _ = chosen(SlowTask(), digits)
    assert name == "process"
    assert "worth spreading" in reason


def test_one_worker_means_inline(digits: FederatedData) -> None:
    name, reason, _ = chosen(SlowTask(), digits, workers=1)
    assert name == "inline"
    assert reason.endswith("one core, so worker processes would not help")


def test_an_explicit_vectorized_backend_falls_back_with_one_warning(
    digits: FederatedData, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedloom.run"):
        name, _, _ = chosen(LogisticRegressionTask(64, 10), digits, name="vectorized")
    assert name == "inline"
    lines = [r for r in caplog.records if r.name == "fedloom.run"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert lines[0].getMessage().startswith("backend inline: vectorized cannot run this task")


def test_a_system_model_wraps_whatever_backend_runs(digits: FederatedData) -> None:
    config = SimulationConfig(backend=BackendConfig(name="inline"), system=SystemConfig(availability=0.5))
    with open_backend(SimulatedClients.of(LogisticRegressionTask(64, 10), digits), config) as backend:
        assert isinstance(backend.grid, SystemGrid)
        assert backend.name == "inline"
