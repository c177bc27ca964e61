"""The ``Grid``: the server's view of its clients, whatever runs them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedloom.core.message import Message

__all__ = ["Exchange", "Grid", "Reply"]


@dataclass(frozen=True)
class Reply:
    """A client's answer, with what it cost: the client's compute seconds and the bytes each way."""

    message: Message
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass(frozen=True)
class Exchange:
    """The outcome of one ``send_and_receive``: the replies that arrived in time, who did not reply at all
    (``dropped``), and who would have replied only after the deadline (``late``; their work is not used)."""

    replies: Mapping[str, Reply] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    late: tuple[str, ...] = ()


class Grid(Protocol):
    """Who the clients are, and a way to send each of them a message and gather their replies.

    ``send_and_receive`` returns when every addressed client has replied or is known to have dropped (for a
    networked grid: by ``timeout`` seconds at the latest). A client that fails to reply is listed in
    ``Exchange.dropped`` (or ``Exchange.late``); it never raises for that. ``client_ids`` are the clients
    available now, in a stable order; it may be a lazy sequence (a million simulated clients are not a
    million strings). Simulation and deployment are two implementations.
    """

    def client_ids(self) -> Sequence[str]: ...

    def send_and_receive(self, messages: Mapping[str, Message], timeout: float | None = None) -> Exchange: ...
