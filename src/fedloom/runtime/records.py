"""What the server loop reports after each round: one ``RoundRecord`` with a ``ClientRecord`` per client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from fedloom.core.params import Params
from fedloom.strategy.snapshot import Snapshot

__all__ = ["ClientEvent", "ClientRecord", "ClientStatus", "LogLine", "RoundObserver", "RoundRecord"]


class ClientStatus:
    OK = "ok"
    DROPPED = "dropped"  # did not reply, or its task failed (``ClientRecord.detail`` says how)
    LATE = "late"  # would have replied after the round's deadline; its work was not used
    REFUSED = "refused"  # replied with something the server would not use (``ClientRecord.detail`` says why)


@dataclass(frozen=True)
class LogLine:
    """A log record a client sent with a reply (see :mod:`fedloom.runtime.telemetry`): when it was logged (UTC, by
    the client's clock), its level name, the logger's name and the formatted message (a traceback included)."""

    at: datetime
    level: str
    logger: str
    message: str


@dataclass(frozen=True)
class ClientRecord:
    """One client's part in one phase (``fit`` or ``evaluate``) of a round.

    ``seconds`` is the client's compute time; ``bytes_down`` is what the server sent it and ``bytes_up`` what
    it sent back, both as encoded on the wire. ``loss`` and ``accuracy`` are ``None`` where not reported.
    ``detail`` explains a refusal (or a failure). ``update_sha256`` is the digest of a fit update the server used
    (see :func:`fedloom.privacy.ledger.fit_digest`), for the run's privacy ledger. ``metrics`` holds what the
    task reported and what the client measured about itself (``sys_*``) or logged with
    ``fedloom.context.log_metric``; ``logs`` are the log lines it sent with its reply.
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
    update_sha256: str | None = None
    logs: tuple[LogLine, ...] = ()


@dataclass(frozen=True)
class RoundRecord:
    """A finished round: its global metrics (``fit_loss``, ``federated_loss``, ``federated_accuracy``,
    ``central_loss``, ``central_accuracy``, where computed), every client's record, and wall seconds.
    ``random_state`` is the server's random generators' state after the round (JSON values): what a resumed
    run needs to draw the same clients as an uninterrupted one. ``strategy_state`` is the strategy's state after
    the round (FedAdam's moments, SCAFFOLD's control variate...; :mod:`fedloom.strategy.snapshot`), where it
    can be saved: what a resumed run needs to go on exactly as the uninterrupted one would have. ``failure`` is
    why a round failed (its training protocol lost too many parties; the model stayed as it was, the metric
    ``round_failed`` is 1 and each fit record's ``detail`` starts with it), ``None`` for a round that did not."""

    server_round: int
    metrics: Mapping[str, float]
    clients: tuple[ClientRecord, ...]
    seconds: float
    random_state: Mapping[str, Any] = field(default_factory=dict)
    strategy_state: Snapshot | None = None
    failure: str | None = None


@dataclass(frozen=True)
class ClientEvent:
    """Something that happened to a deployed client, for its timeline in the run store.

    ``event`` is one of :data:`EVENTS`: ``connected``, ``disconnected``, ``refused`` (a connection or an update
    the server would not take; ``detail`` says why), ``training`` / ``evaluating`` (an instruction went out),
    ``reported`` (its whole reply arrived; ``nbytes`` is its size, as ``nbytes`` of an instruction is what
    was sent), ``late`` (a reply after its round's deadline) and ``dropped`` (no reply by the deadline). ``at``
    is a UTC time; ``server_round`` is ``None`` outside rounds.
    """

    at: datetime
    client_id: str
    event: str
    server_round: int | None = None
    nbytes: int = 0
    detail: str | None = None

    EVENTS = ("connected", "disconnected", "refused", "training", "evaluating", "reported", "late", "dropped")


class RoundObserver(Protocol):
    """Anything that wants to see each finished round and the global params after it (tracking, progress)."""

    def on_round(self, record: RoundRecord, params: Params) -> None: ...
