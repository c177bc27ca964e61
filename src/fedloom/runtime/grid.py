"""The ``Grid``: the server's view of its clients, whatever runs them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from fedloom.core.message import Message

__all__ = ["AsyncGrid", "Binding", "Clocked", "Declaring", "Exchange", "Grid", "Reply", "ReplyHandler", "hand_over"]


@dataclass(frozen=True)
class Reply:
    """A client's answer, with what it cost: the client's compute seconds and the bytes each way, and where the
    transport measured it, the seconds the reply took to arrive once it started (``upload_seconds``)."""

    message: Message
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    upload_seconds: float | None = None


@dataclass(frozen=True)
class Exchange:
    """The outcome of one ``send_and_receive``: the replies that arrived in time, who did not reply at all
    (``dropped``), and who would have replied only after the deadline (``late``; their work is not used)."""

    replies: Mapping[str, Reply] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    late: tuple[str, ...] = ()


#: Called with each reply (client id, reply) as it is gathered; the grid keeps what it returns instead.
ReplyHandler = Callable[[str, Reply], Reply]


class Grid(Protocol):
    """Who the clients are, and a way to send each of them a message and gather their replies.

    ``send_and_receive`` returns when every addressed client has replied or is known to have dropped (for a
    networked grid: by ``timeout`` seconds at the latest). A client that fails to reply is listed in
    ``Exchange.dropped`` (or ``Exchange.late``); it never raises for that. ``client_ids`` are the clients
    available now, in a stable order; it may be a lazy sequence (a million simulated clients are not a
    million strings). Simulation and deployment are two implementations.

    ``on_reply``, where given, sees every reply that makes it into ``Exchange.replies``, one call at a time
    (never two at once), and the exchange holds what it returns. A networked grid calls it as each reply
    arrives, so the server loop can fold an update into the aggregate and let its arrays go before the other
    clients' replies are in; a grid that gathers all replies at once calls it in the order of ``messages``
    (see :func:`hand_over`). An exception from it ends ``send_and_receive``.
    """

    def client_ids(self) -> Sequence[str]: ...

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange: ...


@runtime_checkable
class AsyncGrid(Grid, Protocol):
    """A grid that also takes work one client at a time and hands the replies back as each client finishes,
    for asynchronous algorithms (FedBuff): the server never waits for a whole cohort.

    ``submit(client_id, message)`` starts the client on ``message`` and returns at once (a simulated grid may
    compute the reply then, and hold it back until its simulated time comes). ``next_reply()`` blocks until
    one submitted client is done and returns its id with its reply, or with ``None`` when it dropped, was
    late or its reply could not be read; each submission comes back exactly once. Calling it with nothing
    submitted is a programming error. A networked grid gets this from
    :class:`~fedloom.runtime.asynchronous.ThreadedGrid`.
    """

    def submit(self, client_id: str, message: Message) -> None: ...

    def next_reply(self) -> tuple[str, Reply | None]: ...


@runtime_checkable
class Clocked(Protocol):
    """A simulated grid with a clock: ``clock`` is the simulated seconds since the run started. The server
    loops record it with each round as the metric ``sim_seconds``."""

    @property
    def clock(self) -> float: ...


@runtime_checkable
class Declaring(Protocol):
    """A grid whose clients declared, when they joined, how many training examples they hold (a deployment's
    sites send it in their hello). The server loop caps every ``num_examples`` a client later reports at what
    it declared, so that no site weighs more in an average than the data it joined with."""

    def declared_examples(self, client_id: str) -> int | None:
        """What ``client_id`` declared when it joined, or ``None`` where it declared nothing."""
        ...


@runtime_checkable
class Binding(Protocol):
    """A grid whose replies are bound to what they answer: its clients' runtimes state in every reply the round,
    the instruction and the model it answers (:mod:`fedloom.runtime.binding`), as a deployment's client agents do.
    The server loops refuse a reply of such a grid (``binds_replies`` true) that states nothing; a reply that states
    something is held against what was sent on any grid."""

    @property
    def binds_replies(self) -> bool: ...


def hand_over(exchange: Exchange, on_reply: ReplyHandler | None) -> Exchange:
    """``exchange`` with each reply replaced by what ``on_reply`` makes of it, in order: how a grid that
    gathers all replies at once honours ``on_reply``."""
    if on_reply is None:
        return exchange
    return replace(exchange, replies={cid: on_reply(cid, reply) for cid, reply in exchange.replies.items()})
