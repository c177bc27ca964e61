"""The inline simulation grid: every client runs in this process, one after another."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import user_code
from fedloom.core.message import Message
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler, hand_over
from fedloom.runtime.sim.common import SimulatedClients

__all__ = ["InlineGrid"]


class InlineGrid:
    """Simulated clients run sequentially in this process, each through its client app.

    Every message goes through fedloom's wire encoding both ways, as it would over a network, so the
    simulation exercises the same code and reports real byte counts. An exception raised by the task (or a
    mod) is user code failing, not a dropout: it ends the run as a :class:`JobError` that names the client.
    Dropouts, attacks and client systems are grid decorators around this one (:mod:`fedloom.runtime.sim`).
    """

    def __init__(self, clients: SimulatedClients) -> None:
        self._clients = clients

    def client_ids(self) -> Sequence[str]:
        return self._clients.data.client_ids

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        replies: dict[str, Reply] = {}
        app = self._clients.app
        for client_id, message in messages.items():
            down = encode_message(message)
            start = time.perf_counter()
            with user_code(f"client {client_id} in {message.kind}"):
                reply = app(decode_message(down), self._clients.context(client_id))
            seconds = time.perf_counter() - start
            up = encode_message(reply)
            replies[client_id] = Reply(decode_message(up), seconds, len(down), len(up))
        return hand_over(Exchange(replies), on_reply)
