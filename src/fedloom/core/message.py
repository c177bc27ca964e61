"""``Message``: what the server and a client say to each other."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params

__all__ = ["Message", "MessageKind"]


class MessageKind:
    """The message kinds fedloom itself sends. Protocols may add their own (``secagg.*``, ...)."""

    FIT = "fit"
    FIT_RESULT = "fit.result"
    EVALUATE = "evaluate"
    EVALUATE_RESULT = "evaluate.result"
    FAILURE = "failure"  # a deployed client's task raised; metadata ``error`` says what (the client stays on)


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"metadata key {where}.{key!r} must be a string")
            _check_json(item, f"{where}.{key}")
        return
    raise ConfigError(f"metadata {where} has type {type(value).__name__}; only JSON values are allowed")


@dataclass(frozen=True)
class Message:
    """One message: a ``kind``, a ``Params`` payload (possibly empty) and JSON-valued ``metadata``.

    Metadata may hold only JSON values (``None``, bool, int, float, str, lists and string-keyed mappings);
    that is what lets every message cross a trust boundary without pickle.
    """

    kind: str
    params: Params = field(default_factory=lambda: Params({}))
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ConfigError(f"message kind must be a non-empty string, got {self.kind!r}")
        if not isinstance(self.params, Params):
            raise ConfigError(f"message params must be a Params, got {type(self.params).__name__}")
        _check_json(self.metadata, "metadata")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
