"""fedloom: federated learning that runs the same job as a fast simulation and as a real deployment.

The public API is the names in ``__all__``; everything else is internal. ``TorchTask`` is imported lazily,
so ``import fedloom`` does not import torch (a NumPy-only job never loads it).

    import fedloom as fl
    run = fl.simulate(fl.load_job("digits"))
    print(run.final_metrics["central_accuracy"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedloom import data
from fedloom.app.gossip import simulate_gossip
from fedloom.app.job import Job, load_job
from fedloom.app.run import Run
from fedloom.app.simulation import simulate
from fedloom.core import (
    AttackConfig,
    BackendConfig,
    ConfigError,
    DataError,
    DecodeError,
    EvalResult,
    FedloomError,
    FitConfig,
    FitResult,
    JobError,
    Message,
    NotEnoughClientsError,
    Params,
    PartitionConfig,
    RunStoreError,
    SimulationConfig,
    SystemConfig,
    decode_message,
    decode_params,
    encode_message,
    encode_params,
)
from fedloom.runtime.telemetry import context
from fedloom.strategy import FedAvg, Strategy
from fedloom.task import LogisticRegressionTask, Task
from fedloom.tracking import RunStore

if TYPE_CHECKING:
    from fedloom.task.torch_task import TorchTask

__version__ = "0.1.0"

__all__ = [
    "AttackConfig",
    "BackendConfig",
    "ConfigError",
    "DataError",
    "DecodeError",
    "EvalResult",
    "FedAvg",
    "FedloomError",
    "FitConfig",
    "FitResult",
    "Job",
    "JobError",
    "LogisticRegressionTask",
    "Message",
    "NotEnoughClientsError",
    "Params",
    "PartitionConfig",
    "Run",
    "RunStore",
    "RunStoreError",
    "SimulationConfig",
    "Strategy",
    "SystemConfig",
    "Task",
    "TorchTask",
    "__version__",
    "context",
    "data",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "load_job",
    "simulate",
    "simulate_gossip",
]


def __getattr__(name: str) -> Any:
    if name == "TorchTask":
        from fedloom.task.torch_task import TorchTask

        return TorchTask
    raise AttributeError(f"module 'fedloom' has no attribute {name!r}")
