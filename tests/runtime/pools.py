"""What the process-pool and Ray backend tests share: a model and tasks that worker processes can unpickle (this
module is importable by name in them), a job file, and one FedAvg run to compare with the inline backend."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from torch import nn

from fedloom.core import FitConfig, Params, PartitionConfig
from fedloom.core.results import EvalResult, FitResult
from fedloom.data import federate, load_digits
from fedloom.data.base import ArrayData, FederatedData
from fedloom.runtime import Grid, LoopResult, run_rounds
from fedloom.strategy import FedAvg
from fedloom.task.base import Task
from fedloom.task.torch_task import TorchTask


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


TASK = TorchTask(mlp)


@dataclass(frozen=True)
class FailingTask:
    """A TorchTask that fails for the one client whose training features sum to ``checksum``: by raising, or
    by killing its own process (as the out-of-memory killer would)."""

    checksum: float
    kill: bool = False

    def init_params(self, seed: int) -> Params:
        return TASK.init_params(seed)

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        if float(data.x.sum()) == self.checksum:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("disk full")
        return TASK.fit(params, data, config)

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        return TASK.evaluate(params, data)


# A job file whose model is a class defined in the file: workers can build it only by importing the file.
JOB_FILE = """
import fedloom
from torch import nn
from fedloom.data import load_digits


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))

    def forward(self, x):
        return self.body(x)


def make_model():
    return Net()


job = fedloom.Job(task=fedloom.TorchTask(make_model), data=load_digits, name="pooled")
"""


def digits_federation() -> FederatedData:
    return federate(load_digits(), 20, PartitionConfig(scheme="dirichlet", alpha=0.5), seed=2)


def fedavg(task: Task, grid: Grid) -> LoopResult:
    return run_rounds(
        strategy=FedAvg(fraction=0.5, fraction_evaluate=0.5, fit=FitConfig(batch_size=8, lr=0.05)),
        grid=grid,
        initial_params=task.init_params(0),
        rounds=3,
        seed=4,
    )


def client_rows(result: LoopResult) -> list[tuple[object, ...]]:
    """What must agree between backends in each client record (bytes up: see :func:`bytes_up_agree`)."""
    return [
        (
            r.server_round,
            c.client_id,
            c.phase,
            c.status,
            c.num_examples,
            c.bytes_down,
            c.loss,
            c.accuracy,
            sorted(k for k in c.metrics if k.startswith("sys_")),
        )
        for r in result.history
        for c in r.clients
    ]


def bytes_up_agree(a: LoopResult, b: LoopResult) -> bool:
    """Whether every reply was the same size in two runs but for its telemetry, whose measurements (seconds,
    memory) differ from run to run in their digits: within 64 bytes."""
    sizes = [[c.bytes_up for r in result.history for c in r.clients] for result in (a, b)]
    return len(sizes[0]) == len(sizes[1]) and all(abs(x - y) < 64 for x, y in zip(*sizes, strict=True))
