"""What the server's stream handlers and its grid share: who is connected, the replies awaited, the client events.

:class:`Hub` is that state, under one condition variable. The stream handlers of :mod:`fedloom.runtime.net.server`
add and remove connections and hand replies over; :class:`~fedloom.runtime.net.grid.NetGrid` sends messages down
the connections and waits on the replies.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fedloom.core.codec import decode_message
from fedloom.core.errors import DecodeError
from fedloom.runtime.grid import Reply, ReplyHandler
from fedloom.runtime.net import fleet_pb2
from fedloom.runtime.net.frames import BufferPool
from fedloom.runtime.records import ClientEvent

__all__ = ["LATE", "Authenticator", "Awaited", "Connection", "Hub", "Outgoing", "Past", "refusal_frame"]

log = logging.getLogger("fedloom.server")

#: A token's client name, or ``None`` for a token that admits nobody.
Authenticator = Callable[[str], "str | None"]

#: Why a reply to an instruction whose exchange ended before any reply came is declined.
LATE = "it came after its round's deadline"


@dataclass
class Connection:
    """One connected client: its name, its token (checked again each round, so a revoked one is shut out),
    and what waits to be sent down its stream: frames, messages to chunk, or ``None`` to end it. ``peer`` is
    its address as gRPC gives it (``ipv4:HOST:PORT``) and ``examples`` the training examples it declared in its
    hello (0: none). ``urgent`` holds the pings that go down the stream before anything else in the outbox, and
    ``pings`` the pings awaiting their pong, by nonce (under the hub's lock)."""

    name: str
    token: str
    outbox: queue.Queue[fleet_pb2.ServerFrame | Outgoing | None]  # None: end the stream
    peer: str = ""
    examples: int = 0
    open: bool = True
    urgent: queue.Queue[fleet_pb2.ServerFrame] = field(default_factory=queue.Queue)
    pings: dict[int, threading.Event] = field(default_factory=dict)


@dataclass(frozen=True)
class Outgoing:
    """A message to send: its id and its encoded parts, cut into chunks only as the stream sends them."""

    message_id: int
    parts: tuple[bytes | memoryview, ...]


@dataclass
class Awaited:
    """A message sent, whose reply is awaited: to whom, when, its size, and what to do with the reply."""

    connection: Connection
    server_round: int | None
    sent_at: float
    bytes_down: int
    on_reply: ReplyHandler | None
    reply: Reply | None = None  # set once the reply has arrived and been handed over
    busy: bool = False  # the reply is being decoded and handed over
    refused: str | None = None  # why the reply was refused: too large, or malformed

    @property
    def answered(self) -> bool:
        """Whether a reply came: taken, or refused (over the size limit, malformed)."""
        return self.reply is not None or self.refused is not None


@dataclass(frozen=True)
class Past:
    """A message whose exchange is over: the client it went to, its round, and whether a reply to it came (taken,
    or refused once read or offered)."""

    client: str
    server_round: int | None
    answered: bool


class Hub:
    """What the stream handlers and :class:`~fedloom.runtime.net.grid.NetGrid` share, under one condition
    variable: who is connected, the messages whose replies are awaited (by message id), the messages whose
    exchange is over (``past``, the latest ones: to whom, which round, answered or not), the client events
    not yet collected, and what each client declared in its hello when it last connected (``declared``: its
    training examples, kept after it disconnects). Message ids count up from 1 (``last_id``: the latest)."""

    def __init__(self, authenticate: Authenticator, max_uploads: int) -> None:
        self.cond = threading.Condition()
        self.authenticate = authenticate
        self.connections: dict[str, Connection] = {}
        self.declared: dict[str, int] = {}
        self.awaiting: dict[int, Awaited] = {}
        self.past: dict[int, Past] = {}  # message id -> the exchange it was part of, oldest first
        self.last_id = 0
        self.closing = False
        self.events: list[ClientEvent] = []
        self.uploads = threading.BoundedSemaphore(max_uploads)
        self.buffers = BufferPool(max_uploads)  # the granted replies' receive buffers, used again
        self.handing_over = threading.Lock()  # on_reply is called one reply at a time

    def event(
        self, client_id: str, event: str, server_round: int | None = None, nbytes: int = 0, detail: str | None = None
    ) -> None:
        with self.cond:
            self.events.append(ClientEvent(datetime.now(timezone.utc), client_id, event, server_round, nbytes, detail))

    def _awaited(self, connection: Connection, message_id: int) -> Awaited | None:
        """The message whose reply ``message_id`` from ``connection`` would be, if that reply is still awaited
        (called under the lock)."""
        awaited = self.awaiting.get(message_id)
        if awaited is None or awaited.connection is not connection or awaited.reply is not None:
            return None
        return awaited

    def expects(self, connection: Connection, message_id: int) -> bool:
        with self.cond:
            return self._awaited(connection, message_id) is not None

    def deliver(self, connection: Connection, box: list[tuple[int, memoryview] | None], started: float) -> None:
        """Decode a whole reply (its message id and bytes, the one item in ``box``, taken out so that nothing
        else holds the bytes) and hand it over (folding it into the round's aggregate, for FedAvg) at once, in
        this stream's thread, so its bytes go before other replies come in: the decoded arrays are views of the
        buffer, which goes when the handler lets the reply's params go. ``started`` is when its first chunk came
        (``time.perf_counter``), for its upload seconds."""
        done = box.pop()
        assert done is not None
        message_id, data = done
        del done
        with self.cond:
            awaited = self._awaited(connection, message_id)
            if awaited is not None:
                awaited.busy = True
        if awaited is None:
            self.turn_away(connection, message_id, len(data))
            return
        arrived = time.perf_counter()
        size = len(data)
        try:
            reply = Reply(decode_message(data), arrived - awaited.sent_at, awaited.bytes_down, size, arrived - started)
            del data
            if awaited.on_reply is not None:
                with self.handing_over:
                    reply = awaited.on_reply(connection.name, reply)
        except DecodeError as exc:
            reply, awaited.refused = None, f"malformed reply: {exc}"
        finally:
            with self.cond:
                awaited.busy = False
                awaited.reply = reply
                self.events.append(
                    ClientEvent(
                        datetime.now(timezone.utc),
                        connection.name,
                        "reported" if reply is not None else "refused",
                        awaited.server_round,
                        size,
                        awaited.refused,
                    )
                )
                self.cond.notify_all()

    def turn_away(self, connection: Connection, message_id: int, nbytes: int = 0) -> str:
        """Log and record a reply of ``nbytes`` under ``message_id`` that nobody awaits (any more), and return why
        it is not taken: it came after its round's deadline (recorded as ``late``), or the instruction was answered
        already: a duplicate of that reply, or out of turn where the site is asked for another round now; or no
        such instruction went to this site (the last three recorded as ``refused``). Each is recorded with the round
        of the instruction it answers, where the server still knows it."""
        with self.cond:
            event, server_round, reason = self._unexpected(connection, message_id)
        log.warning("client %s: declined its reply %d: %s", connection.name, message_id, reason)
        self.event(connection.name, event, server_round, nbytes, f"reply {message_id}: {reason}")
        return reason

    def _unexpected(self, connection: Connection, message_id: int) -> tuple[str, int | None, str]:
        """What a reply under ``message_id`` that is not awaited from ``connection`` is: its event, the round of the
        instruction it answers and why it is turned away (called under the lock)."""
        name = connection.name
        awaited = self.awaiting.get(message_id)
        if awaited is not None and awaited.connection.name == name:
            if awaited.connection is not connection:
                return "refused", awaited.server_round, "it answers an instruction sent to an earlier session"
            return "refused", awaited.server_round, f"a duplicate of its reply to {_round(awaited.server_round)}"
        past = self.past.get(message_id)
        if past is not None and past.client == name:
            if not past.answered:
                return "late", past.server_round, LATE
            now = [a.server_round for a in self.awaiting.values() if a.connection is connection and a.reply is None]
            if now and now[0] != past.server_round:
                return (
                    "refused",
                    past.server_round,
                    f"out of turn: it answers {_round(past.server_round)}, not {_round(now[0])}",
                )
            return "refused", past.server_round, f"a duplicate of its reply to {_round(past.server_round)}"
        if awaited is not None or past is not None or not 0 < message_id <= self.last_id:
            return "refused", None, "no such instruction was sent to this site"
        return "late", None, LATE  # an instruction too old for the server to remember

    def refuse(self, connection: Connection, message_id: int, reason: str) -> bool:
        """Record that the reply to ``message_id`` was refused before it was read (it is too large): its round
        need not wait for it. Whether a round awaited it (that round's account then logs the refusal)."""
        with self.cond:
            awaited = self._awaited(connection, message_id)
            if awaited is not None:
                awaited.refused = reason
                self.cond.notify_all()
            server_round = None if awaited is None else awaited.server_round
        self.event(connection.name, "refused", server_round, detail=reason)
        return awaited is not None

    def answers(self, connection: Connection, timeout: float) -> bool:
        """Whether ``connection``'s client answers a ``Ping`` within ``timeout`` seconds: whether it still reads
        its stream and writes to it. ``False`` at once for a connection that is closed, or as soon as it closes.

        It waits without the hub's lock, so the other streams and the grid go on meanwhile. The client answers
        from the thread that reads its stream, not the one that trains, and the ping goes down the stream
        between the chunks of whatever is being sent (see :func:`~fedloom.runtime.net.frames.waiting`), so a
        site that is training, or receiving a large model, answers within a round trip or two."""
        nonce = secrets.randbits(64)
        answered = threading.Event()
        with self.cond:
            if not connection.open:
                return False
            connection.pings[nonce] = answered
        connection.urgent.put(fleet_pb2.ServerFrame(ping=fleet_pb2.Ping(nonce=nonce)))
        answered.wait(timeout)  # set by the pong, or by disconnect
        with self.cond:
            connection.pings.pop(nonce, None)
            return answered.is_set() and connection.open

    def pong(self, connection: Connection, nonce: int) -> None:
        """Take ``connection``'s answer to the ping ``nonce``; one that comes after its prober gave up (or that
        nobody asked for) changes nothing."""
        with self.cond:
            answered = connection.pings.get(nonce)
        if answered is not None:
            answered.set()

    def disconnect(self, connection: Connection, detail: str | None = None) -> None:
        with self.cond:
            if not connection.open:
                return
            connection.open = False
            if self.connections.get(connection.name) is connection:
                del self.connections[connection.name]
            for waiting in connection.pings.values():  # its probers need wait no longer: it does not answer
                waiting.set()
            self.events.append(ClientEvent(datetime.now(timezone.utc), connection.name, "disconnected", detail=detail))
            self.cond.notify_all()
        connection.outbox.put(None)
        log.info("client %s disconnected%s", connection.name, f" ({detail})" if detail else "")


def _round(server_round: int | None) -> str:
    return "an instruction without a round" if server_round is None else f"round {server_round}"


def refusal_frame(reason: str) -> fleet_pb2.ServerFrame:
    """The frame that tells a client why its session ends."""
    return fleet_pb2.ServerFrame(refusal=fleet_pb2.Refusal(reason=reason))
