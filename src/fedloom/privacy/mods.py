"""The client halves of the aggregation protocols, as client mods (see :mod:`fedloom.runtime.client`): each
answers its own instructions and hands every other one on. A mod is called as ``mod(message, context,
call_next)``; ``call_next(fit, context)`` runs a fit instruction through the rest of the chain (the task)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from fedloom.core.errors import DecodeError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.privacy.he import HE_KINDS, answer_he
from fedloom.privacy.paillier import KeyPair
from fedloom.privacy.secure import SECAGG_KINDS, SecAggSessions
from fedloom.privacy.updates import CLIENT_NOISE_KEY
from fedloom.strategy.aggregate import cast_like, f64
from fedloom.strategy.robust import clip_to_norm

__all__ = ["PROTOCOL_KINDS", "ClientNoise", "PaillierMod", "SecAggMod", "protocol_mods"]

#: The instructions the protocol mods answer (every other is a plain fit or evaluate).
PROTOCOL_KINDS = SECAGG_KINDS | HE_KINDS

Next = Callable[[Message, Any], Message]


class SecAggMod:
    """Secure aggregation's client half (:class:`~fedloom.privacy.SecAgg`): answers ``secagg.*`` with this
    runtime's open rounds (:class:`~fedloom.privacy.SecAggSessions`, in memory only), training through the rest
    of the chain when the masking step comes."""

    passes_plain = True

    def __init__(self) -> None:
        self.sessions = SecAggSessions()

    def __call__(self, message: Message, context: Any, call_next: Next) -> Message:
        if message.kind not in SECAGG_KINDS:
            return call_next(message, context)
        return self.sessions.answer(message, lambda fit: call_next(fit, context))


class PaillierMod:
    """Paillier aggregation's client half (:class:`~fedloom.privacy.PaillierAgg`) with the federation's shared
    ``key`` (given to each site out of band; ``None``: this client cannot take part, and says so when asked)."""

    passes_plain = True

    def __init__(self, key: KeyPair | None = None) -> None:
        self.key = key

    def __call__(self, message: Message, context: Any, call_next: Next) -> Message:
        if message.kind not in HE_KINDS:
            return call_next(message, context)
        return answer_he(message, lambda fit: call_next(fit, context), self.key)

    def __reduce__(self) -> tuple[Any, ...]:  # to worker processes: the key as its own encoding
        return (_paillier_mod, (self.key.to_bytes() if self.key is not None else None,))


def _paillier_mod(key: bytes | None) -> PaillierMod:
    return PaillierMod(KeyPair.from_bytes(key) if key is not None else None)


class ClientNoise:
    """The client's part of distributed DP: a fit instruction that carries ``client_noise`` (``clip_norm`` C and
    ``noise`` sigma, which secure aggregation's DP mode sends) is trained through the rest of the chain, then
    its update ``w_k - w`` is clipped to L2 norm C and Gaussian noise of standard deviation sigma, from the
    operating system's entropy, is added to each coordinate; the reply says it was (the server's side refuses
    an unnoised update). Any other instruction passes untouched."""

    passes_plain = True

    def __call__(self, message: Message, context: Any, call_next: Next) -> Message:
        settings = message.metadata.get(CLIENT_NOISE_KEY) if message.kind == MessageKind.FIT else None
        if settings is None:
            return call_next(message, context)
        try:
            clip, sigma = float(settings["clip_norm"]), float(settings["noise"])
        except (KeyError, TypeError, ValueError):
            raise DecodeError(f"a fit instruction with malformed {CLIENT_NOISE_KEY} settings") from None
        if not clip > 0 or not sigma >= 0:
            raise DecodeError(f"{CLIENT_NOISE_KEY} needs clip_norm > 0 and noise >= 0, got {clip} and {sigma}")
        metadata = {k: v for k, v in message.metadata.items() if k != CLIENT_NOISE_KEY}
        reply = call_next(Message(message.kind, message.params, metadata), context)
        result = FitResult.from_message(reply)
        sent = message.params
        update = clip_to_norm(Params({n: f64(result.params[n]) - f64(sent[n]) for n in sent}, copy=False), clip)
        noise = np.random.default_rng(secrets.randbits(128))
        noised = {n: f64(sent[n]) + f64(update[n]) + noise.normal(0.0, sigma, update[n].shape) for n in sent}
        return Message(reply.kind, cast_like(sent, noised), {**reply.metadata, CLIENT_NOISE_KEY: "applied"})


def protocol_mods(paillier_key: KeyPair | None = None) -> tuple[SecAggMod, PaillierMod, ClientNoise]:
    """The protocol mods every client chain ends with, in order: secure aggregation, Paillier aggregation (with
    ``paillier_key``, where the federation aggregates under Paillier) and distributed DP's clip and noise."""
    return SecAggMod(), PaillierMod(paillier_key), ClientNoise()
