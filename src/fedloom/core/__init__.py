"""fedloom.core: params, messages, their wire encoding, results, configuration and errors. Imports no torch.

The names below are imported on first use, so that a module needing only :mod:`fedloom.core.errors` or
:mod:`fedloom.core.config` (the command line's start-up) loads neither numpy nor protobuf."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedloom.core.exports import lazy_exports

if TYPE_CHECKING:
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
    "Params",
    "PartitionConfig",
    "RoundFailedError",
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

_HOMES = {
    **dict.fromkeys(("decode_message", "decode_params", "encode_message", "encode_params"), "codec"),
    **dict.fromkeys(
        ("AttackConfig", "BackendConfig", "FitConfig", "PartitionConfig", "SimulationConfig", "SystemConfig"), "config"
    ),
    **dict.fromkeys(
        (
            "ConfigError",
            "DataError",
            "DecodeError",
            "FedloomError",
            "InvalidUpdateError",
            "JobError",
            "NotEnoughClientsError",
            "RoundFailedError",
            "RunStoreError",
            "StopRunError",
            "TransportError",
        ),
        "errors",
    ),
    "Message": "message",
    "MessageKind": "message",
    "Params": "params",
    "EvalResult": "results",
    "FitResult": "results",
    "check_update": "validation",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
