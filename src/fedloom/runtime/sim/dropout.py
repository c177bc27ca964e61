"""Simulated dropouts as a grid decorator: any grid's clients fail to reply with a given probability."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedloom.core.errors import ConfigError
from fedloom.core.message import Message
from fedloom.runtime.grid import Exchange, Grid, ReplyHandler

__all__ = ["DropoutGrid", "drops"]


def drops(seed: int, dropout: float, client_id: str, message: Message) -> bool:
    """Whether ``client_id`` fails to reply to ``message``, with probability ``dropout``.

    The draw depends on ``seed``, the round, the client and the message kind alone, so a client's fate does not
    depend on which other clients were asked, nor on which backend runs the simulation.
    """
    if dropout == 0.0:
        return False
    server_round = message.metadata.get("round", 0)
    key = [seed, 0xD20B, int(server_round), zlib.crc32(client_id.encode()), zlib.crc32(message.kind.encode())]
    return bool(np.random.default_rng(key).random() < dropout)


class DropoutGrid:
    """``inner`` whose addressed clients each fail to reply with probability ``dropout`` (:func:`drops`): a
    dropped client is not sent its message at all, so it does no work, and is listed in ``Exchange.dropped``
    (before any the inner grid lost). Replies keep the inner grid's order. :meth:`close` (and leaving a
    ``with`` block) closes the inner grid, where it has a ``close``."""

    def __init__(self, inner: Grid, dropout: float, *, seed: int = 0) -> None:
        if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        self.inner = inner
        self.dropout = dropout
        self._seed = seed

    def client_ids(self) -> Sequence[str]:
        return self.inner.client_ids()

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        lost = [cid for cid, message in messages.items() if drops(self._seed, self.dropout, cid, message)]
        if not lost:
            return self.inner.send_and_receive(messages, timeout, on_reply)
        gone = set(lost)
        kept = {cid: message for cid, message in messages.items() if cid not in gone}
        exchange = self.inner.send_and_receive(kept, timeout, on_reply) if kept else Exchange()
        return Exchange(exchange.replies, (*lost, *exchange.dropped), exchange.late)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DropoutGrid:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
