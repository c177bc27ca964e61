"""What a client sends back: ``FitResult`` and ``EvalResult``, and their mapping to and from ``Message``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedloom.core.config import FitConfig
from fedloom.core.errors import DecodeError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params

__all__ = ["EvalResult", "FitResult", "evaluate_message", "fit_message", "parse_instruction"]


def _metrics(metadata: Mapping[str, Any]) -> dict[str, float]:
    raw = metadata.get("metrics", {})
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) for v in raw.values()):
        raise DecodeError("metrics must be a JSON object of numbers")
    return {str(k): float(v) for k, v in raw.items()}


def _num_examples(metadata: Mapping[str, Any]) -> int:
    n = metadata.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DecodeError(f"num_examples must be a non-negative integer, got {n!r}")
    return n


@dataclass(frozen=True)
class FitResult:
    """A client's locally trained params, how many examples it trained on, and its training metrics."""

    params: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_message(self) -> Message:
        return Message(
            MessageKind.FIT_RESULT,
            self.params,
            {"num_examples": self.num_examples, "metrics": dict(self.metrics)},
        )

    @classmethod
    def from_message(cls, message: Message) -> FitResult:
        if message.kind != MessageKind.FIT_RESULT:
            raise DecodeError(f"expected a {MessageKind.FIT_RESULT!r} message, got {message.kind!r}")
        return cls(message.params, _num_examples(message.metadata), _metrics(message.metadata))


@dataclass(frozen=True)
class EvalResult:
    """A client's loss on its held-out data, how many examples that was, and other metrics (accuracy...)."""

    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_message(self) -> Message:
        return Message(
            MessageKind.EVALUATE_RESULT,
            metadata={"loss": self.loss, "num_examples": self.num_examples, "metrics": dict(self.metrics)},
        )

    @classmethod
    def from_message(cls, message: Message) -> EvalResult:
        if message.kind != MessageKind.EVALUATE_RESULT:
            raise DecodeError(f"expected a {MessageKind.EVALUATE_RESULT!r} message, got {message.kind!r}")
        loss = message.metadata.get("loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise DecodeError(f"loss must be a number, got {loss!r}")
        return cls(float(loss), _num_examples(message.metadata), _metrics(message.metadata))


def fit_message(server_round: int, params: Params, config: FitConfig) -> Message:
    """The instruction to train ``params`` locally with ``config`` in round ``server_round``."""
    return Message(MessageKind.FIT, params, {"round": server_round, "fit": config.to_metadata()})


def evaluate_message(server_round: int, params: Params) -> Message:
    """The instruction to evaluate ``params`` on the client's held-out data."""
    return Message(MessageKind.EVALUATE, params, {"round": server_round})


def parse_instruction(message: Message) -> tuple[str, int, Params, FitConfig | None]:
    """Split a ``fit`` or ``evaluate`` instruction into (kind, round, params, fit config or None)."""
    server_round = message.metadata.get("round")
    if not isinstance(server_round, int) or isinstance(server_round, bool):
        raise DecodeError(f"instruction has no valid round number: {server_round!r}")
    if message.kind == MessageKind.FIT:
        return message.kind, server_round, message.params, FitConfig.from_metadata(message.metadata.get("fit"))
    if message.kind == MessageKind.EVALUATE:
        return message.kind, server_round, message.params, None
    raise DecodeError(f"unknown instruction kind {message.kind!r}")
