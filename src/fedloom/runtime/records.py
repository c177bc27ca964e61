"""What the server loop reports after each round: one ``RoundRecord`` with a ``ClientRecord`` per client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fedloom.core.params import Params

__all__ = ["ClientRecord", "ClientStatus", "RoundObserver", "RoundRecord"]


class ClientStatus:
    OK = "ok"
    DROPPED = "dropped"  # did not reply
    LATE = "late"  # would have replied after the round's deadline; its work was not used
    REFUSED = "refused"  # replied with something the server would not use (``ClientRecord.detail`` says why)


@dataclass(frozen=True)
class ClientRecord:
    """One client's part in one phase (``fit`` or ``evaluate``) of a round.

    ``seconds`` is the client's compute time; ``bytes_down`` is what the server sent it and ``bytes_up`` what
    it sent back, both as encoded on the wire. ``loss`` and ``accuracy`` are ``None`` where not reported.
    ``detail`` explains a refusal.
    """

    client_id: str
    phase: str
    status: str
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    detail: str | None = None


@dataclass(frozen=True)
class RoundRecord:
    """A finished round: its global metrics (``fit_loss``, ``federated_loss``, ``federated_accuracy``,
    ``central_loss``, ``central_accuracy``, where computed), every client's record, and wall seconds."""

    server_round: int
    metrics: Mapping[str, float]
    clients: tuple[ClientRecord, ...]
    seconds: float


class RoundObserver(Protocol):
    """Anything that wants to see each finished round and the global params after it (tracking, progress)."""

    def on_round(self, record: RoundRecord, params: Params) -> None: ...
