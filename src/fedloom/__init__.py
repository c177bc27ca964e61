"""fedloom: federated learning that runs the same job as a fast simulation and as a real deployment.

The public API is the names in ``__all__``; everything else is internal. Each name is imported when it is first
used, so ``import fedloom`` is cheap: a NumPy-only job never loads torch, a simulation never loads gRPC, and the
command line starts without either.

    import fedloom as fl
    run = fl.simulate(fl.load_job("digits"))
    print(run.final_metrics["central_accuracy"])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedloom.core.exports import lazy_exports

if TYPE_CHECKING:
    from fedloom import data
    from fedloom.app.deployment import ClientTLS, ServerTLS, connect, serve
    from fedloom.app.gossip import simulate_gossip
    from fedloom.app.job import Job, load_job
    from fedloom.app.protection import DPSettings, PrivacySettings
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
    from fedloom.task.torch_task import TorchTask
    from fedloom.tracking import RunStore

__version__ = "0.1.0"

__all__ = [
    "AttackConfig",
    "BackendConfig",
    "ClientTLS",
    "ConfigError",
    "DPSettings",
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
    "PrivacySettings",
    "Run",
    "RunStore",
    "RunStoreError",
    "ServerTLS",
    "SimulationConfig",
    "Strategy",
    "SystemConfig",
    "Task",
    "TorchTask",
    "__version__",
    "connect",
    "context",
    "data",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "load_job",
    "serve",
    "simulate",
    "simulate_gossip",
]

# The module each public name is imported from, on first use.
_HOMES = {
    **dict.fromkeys(("ClientTLS", "ServerTLS", "connect", "serve"), "fedloom.app.deployment"),
    "simulate_gossip": "fedloom.app.gossip",
    "Job": "fedloom.app.job",
    "load_job": "fedloom.app.job",
    "DPSettings": "fedloom.app.protection",
    "PrivacySettings": "fedloom.app.protection",
    "Run": "fedloom.app.run",
    "simulate": "fedloom.app.simulation",
    **dict.fromkeys(
        (
            "AttackConfig",
            "BackendConfig",
            "ConfigError",
            "DataError",
            "DecodeError",
            "EvalResult",
            "FedloomError",
            "FitConfig",
            "FitResult",
            "JobError",
            "Message",
            "NotEnoughClientsError",
            "Params",
            "PartitionConfig",
            "RunStoreError",
            "SimulationConfig",
            "SystemConfig",
            "decode_message",
            "decode_params",
            "encode_message",
            "encode_params",
        ),
        "fedloom.core",
    ),
    "context": "fedloom.runtime.telemetry",
    "FedAvg": "fedloom.strategy",
    "Strategy": "fedloom.strategy",
    "LogisticRegressionTask": "fedloom.task",
    "Task": "fedloom.task",
    "TorchTask": "fedloom.task.torch_task",
    "RunStore": "fedloom.tracking",
}


_lookup, __dir__ = lazy_exports(__name__, _HOMES, __all__)


def __getattr__(name: str) -> Any:
    if name == "data":
        return importlib.import_module("fedloom.data")  # importing it sets the attribute for next time
    return _lookup(name)
