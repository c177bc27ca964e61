"""What every simulation backend shares: which clients drop out of a round."""

from __future__ import annotations

import zlib

import numpy as np

from fedloom.core.message import Message

__all__ = ["drops"]


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
