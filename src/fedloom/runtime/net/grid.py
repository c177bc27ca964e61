"""The server's view of a deployment's clients: :class:`NetGrid`."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence

from fedloom.core.codec import message_parts
from fedloom.core.errors import FedloomError
from fedloom.core.message import Message, MessageKind
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler
from fedloom.runtime.net.hub import Awaited, Hub, Outgoing, Past, refusal_frame

__all__ = ["NetGrid"]

log = logging.getLogger("fedloom.server")

#: Messages whose exchange is over that the hub remembers (to whom, their round, answered or not), so that a late,
#: duplicated or out-of-turn reply is named as such with its round: a few rounds of a large federation.
_PAST_KEPT = 1 << 16
_SENT_EVENT = {MessageKind.FIT: "training", MessageKind.EVALUATE: "evaluating"}


class NetGrid:
    """The :class:`~fedloom.runtime.grid.Grid` of a deployment: the clients connected to a
    :class:`~fedloom.runtime.net.server.FleetServer`.

    ``client_ids()`` are the connected clients' names, sorted; a client whose token was revoked since it
    connected is disconnected first. ``send_and_receive`` sends each message down its client's stream (cut
    into chunks as the stream sends them, without copying the model per client) and waits, at most
    ``timeout`` seconds, for the replies, handing each to ``on_reply`` as it arrives. A client that is not
    connected, disconnects, does not reply in time, or replies with bytes that do not decode is in
    ``Exchange.dropped`` (the last two are logged). Replies are listed in the order of ``messages``.
    ``Reply.seconds`` is the wall time from sending to the whole reply's arrival; ``bytes_down``/``bytes_up``
    are the encoded messages' sizes.

    It is :class:`~fedloom.runtime.grid.Declaring`: ``declared_examples`` is what a site declared in the hello of
    its latest connection (the size of its training data, filled in by the client agent, not the task); and
    :class:`~fedloom.runtime.grid.Binding`: every site's client agent states in each reply what it answers, so the
    server loops refuse a reply that does not (:mod:`fedloom.runtime.binding`).
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    @property
    def binds_replies(self) -> bool:
        return True

    def client_ids(self) -> Sequence[str]:
        hub = self._hub
        with hub.cond:
            connections = list(hub.connections.values())
        for connection in connections:
            try:
                valid = hub.authenticate(connection.token) == connection.name
            except FedloomError as exc:  # cannot tell: keep the client rather than end the run
                log.error("cannot check the token of client %s: %s", connection.name, exc)
                valid = True
            if not valid:
                log.warning("client %s: its token was revoked; disconnecting it", connection.name)
                connection.outbox.put(refusal_frame("this client's token was revoked"))
                hub.disconnect(connection, "token revoked")
        with hub.cond:
            return sorted(hub.connections)

    def declared_examples(self, client_id: str) -> int | None:
        """The training examples ``client_id`` declared when it last connected (it may have disconnected
        since), or ``None`` where it never connected or declared none (0)."""
        with self._hub.cond:
            declared = self._hub.declared.get(client_id, 0)
        return declared or None

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        hub = self._hub
        deadline = None if timeout is None else time.perf_counter() + timeout
        sent: dict[str, int] = {}  # client -> message id
        for client_id, message in messages.items():
            parts = message_parts(message)
            size = sum(memoryview(part).nbytes for part in parts)
            server_round = message.metadata.get("round")
            server_round = server_round if isinstance(server_round, int) else None
            with hub.cond:
                connection = hub.connections.get(client_id)
                if connection is None:
                    continue
                hub.last_id += 1
                message_id = hub.last_id
                hub.awaiting[message_id] = Awaited(connection, server_round, time.perf_counter(), size, on_reply)
            sent[client_id] = message_id
            connection.outbox.put(Outgoing(message_id, parts))
            hub.event(client_id, _SENT_EVENT.get(message.kind, "training"), server_round, size)
        with hub.cond:
            hub.cond.wait_for(lambda: self._settled(sent), None if deadline is None else deadline - time.perf_counter())
            hub.cond.wait_for(lambda: not any(hub.awaiting[m].busy for m in sent.values()))  # on time: let it finish
            awaited = {cid: hub.awaiting.pop(message_id) for cid, message_id in sent.items()}
            hub.past.update((m, Past(c, awaited[c].server_round, awaited[c].answered)) for c, m in sent.items())
            for old in list(itertools.islice(hub.past, max(0, len(hub.past) - _PAST_KEPT))):
                del hub.past[old]  # the oldest first: dicts keep insertion order
        replies: dict[str, Reply] = {}
        dropped: list[str] = []
        for client_id, message in messages.items():
            entry = awaited.get(client_id)
            if entry is not None and entry.reply is not None:
                replies[client_id] = entry.reply
                continue
            dropped.append(client_id)
            if entry is None:
                why = "not connected"
            elif entry.refused is not None:
                why = "refused reply"
                log.warning("client %s: its reply was refused: %s", client_id, entry.refused)
            elif not entry.connection.open:
                why = "disconnected"
            else:
                why = "no reply by the deadline"
            if entry is not None and entry.refused is None:
                log.warning("client %s did not reply to its %s instruction (%s)", client_id, message.kind, why)
            hub.event(client_id, "dropped", None if entry is None else entry.server_round, detail=why)
        return Exchange(replies, tuple(dropped))

    def _settled(self, sent: Mapping[str, int]) -> bool:
        """Whether every addressed client has replied or is gone (called under the hub's lock)."""
        awaiting = self._hub.awaiting
        return all(
            awaiting[m].reply is not None or awaiting[m].refused is not None or not awaiting[m].connection.open
            for m in sent.values()
        )
