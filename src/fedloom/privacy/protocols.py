"""The client's half of the aggregation protocols, for every client runtime: one object that answers their
instructions and keeps what they need between messages."""

from __future__ import annotations

from collections.abc import Callable

from fedloom.core.errors import DecodeError
from fedloom.core.message import Message
from fedloom.privacy.he import HE_KINDS, answer_he
from fedloom.privacy.paillier import KeyPair
from fedloom.privacy.secure import SECAGG_KINDS, SecAggSessions

__all__ = ["PROTOCOL_KINDS", "ClientProtocols"]

#: The instructions :class:`ClientProtocols` answers (every other is a plain fit or evaluate).
PROTOCOL_KINDS = SECAGG_KINDS | HE_KINDS


class ClientProtocols:
    """A client runtime's side of secure aggregation and Paillier aggregation: its open secure-aggregation
    rounds (:class:`~fedloom.privacy.SecAggSessions`, in memory only) and, where the federation aggregates under
    Paillier, the clients' shared key pair ``he_key`` (given to each site out of band). One object serves every
    client a runtime runs."""

    def __init__(self, he_key: KeyPair | None = None) -> None:
        self.secagg = SecAggSessions()
        self.he_key = he_key

    def answer(self, message: Message, train: Callable[[Message], Message]) -> Message:
        """The reply to a protocol instruction (``secagg.*`` or ``he.*``); ``train`` runs a fit instruction on
        this client's data and returns the fit reply."""
        if message.kind in SECAGG_KINDS:
            return self.secagg.answer(message, train)
        if message.kind in HE_KINDS:
            return answer_he(message, train, self.he_key)
        raise DecodeError(f"{message.kind!r} is not a protocol instruction")
