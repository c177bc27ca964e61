"""The inline simulation grid: every client runs in this process, one after another."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import user_code
from fedloom.core.message import Message
from fedloom.data.base import Federation
from fedloom.privacy.paillier import KeyPair
from fedloom.privacy.protocols import ClientProtocols
from fedloom.runtime.client import handle_instruction
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler, hand_over
from fedloom.runtime.sim.common import drops
from fedloom.runtime.state import client_state
from fedloom.task.base import Task

__all__ = ["InlineGrid"]


class InlineGrid:
    """Simulated clients run sequentially in this process.

    Every message goes through fedloom's wire encoding both ways, as it would over a network, so the
    simulation exercises the same code and reports real byte counts. Each addressed client fails to reply
    with probability ``dropout`` (a dropped client does no work). Whether it does is drawn from ``seed``, the
    round, the client and the message kind alone, so it does not depend on which other clients were asked.
    An exception raised by the task is user code failing, not a dropout: it ends the run as a
    :class:`JobError` that names the client. What a client keeps between rounds (SCAFFOLD's control variate,
    personal layers) goes to its own folder under ``state_dir``; without one, stateful algorithms cannot run.
    ``he_key`` is the simulated clients' shared Paillier key, for :class:`~fedloom.privacy.PaillierAgg`.
    """

    def __init__(
        self,
        task: Task,
        data: Federation,
        *,
        dropout: float = 0.0,
        seed: int = 0,
        state_dir: str | None = None,
        he_key: KeyPair | None = None,
    ) -> None:
        self._task = task
        self._state_dir = state_dir
        self._data = data
        self._dropout = dropout
        self._seed = seed
        self._protocols = ClientProtocols(he_key)  # secure aggregation's open rounds; the Paillier key

    def client_ids(self) -> Sequence[str]:
        return self._data.client_ids

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        replies: dict[str, Reply] = {}
        dropped: list[str] = []
        for client_id, message in messages.items():
            if drops(self._seed, self._dropout, client_id, message):
                dropped.append(client_id)
                continue
            client_data = self._data.clients[client_id]
            down = encode_message(message)
            start = time.perf_counter()
            with user_code(f"client {client_id} in {message.kind}"):
                state = client_state(self._state_dir, client_id)
                reply = handle_instruction(self._task, client_data, decode_message(down), state, self._protocols)
            seconds = time.perf_counter() - start
            up = encode_message(reply)
            replies[client_id] = Reply(decode_message(up), seconds, len(down), len(up))
        return hand_over(Exchange(replies, tuple(dropped)), on_reply)
