"""fedloom.core: params, messages, their wire encoding, results, configuration and errors. Imports no torch."""

from fedloom.core.codec import decode_message, decode_params, encode_message, encode_params
from fedloom.core.config import (
    AttackConfig,
    BackendConfig,
    FitConfig,
    PartitionConfig,
    SimulationConfig,
    SystemConfig,
)
from fedloom.core.errors import (
    ConfigError,
    DataError,
    DecodeError,
    FedloomError,
    InvalidUpdateError,
    JobError,
    NotEnoughClientsError,
    RoundFailedError,
    RunStoreError,
    StopRunError,
    TransportError,
)
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.core.validation import check_update

__all__ = [
    "AttackConfig",
    "BackendConfig",
    "ConfigError",
    "DataError",
    "DecodeError",
    "EvalResult",
    "FedloomError",
    "FitConfig",
    "FitResult",
    "InvalidUpdateError",
    "JobError",
    "Message",
    "MessageKind",
    "NotEnoughClientsError",
    "RoundFailedError",
    "Params",
    "PartitionConfig",
    "RunStoreError",
    "StopRunError",
    "SimulationConfig",
    "SystemConfig",
    "TransportError",
    "check_update",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
]
