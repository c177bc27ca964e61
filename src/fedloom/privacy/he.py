"""Homomorphic aggregation in a run: :class:`PaillierAgg` wraps a FedAvg so that each round's training is two
exchanges over any grid, with the Paillier core of :mod:`fedloom.privacy.paillier`:

1. ``he.fit`` (the fit instruction): each client trains, encodes its update as secure aggregation's mean does
   (:mod:`fedloom.privacy.updates`: weighted update, then its weight), encrypts it under the clients' shared key
   and answers ``he.encrypted`` (the packed ciphertexts).
2. The server adds the ciphertexts with the public key only, and sends the encrypted sum to one client that
   replied (the key holder of the round) as ``he.decrypt``; it answers ``he.sum``: the decrypted, decoded sum.
   If that client does not answer, the next one is asked.

The server never holds the private key and never sees an update; the key holder sees only the sum, which it
refuses to decrypt unless it sums at least two updates. Every client holds the private key (given to it out of
band: ``fedloom he keygen``, then ``fedloom client --he-key``), so a client that could read another's ciphertext
could decrypt it: the clients' channels to the server must be private (TLS), and a server colluding with one
client reads every update. Secure aggregation (:class:`~fedloom.privacy.SecAgg`) has no such single point.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.core.errors import ConfigError, DecodeError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.privacy import paillier
from fedloom.privacy.paillier import EncryptedVector, KeyPair, PaillierError, PublicKey
from fedloom.privacy.updates import (
    ProtocolWrapper,
    check_summable,
    check_whole,
    fit_vector,
    layout_of,
    mean_encoding,
    mean_release,
    quantizer_of,
    vector_length,
)
from fedloom.strategy.base import FitProtocol, ProtocolResult, SummableStrategy
from fedloom.strategy.fedavg import FedAvg

__all__ = ["HE_KINDS", "PaillierAgg", "answer_he"]

log = logging.getLogger("fedloom.he")

FIT, ENCRYPTED = "he.fit", "he.encrypted"
DECRYPT, SUM = "he.decrypt", "he.sum"
#: The instructions a client answers with :func:`answer_he`.
HE_KINDS = frozenset({FIT, DECRYPT})
_KEY_HOLDERS_TRIED = 3


@dataclass(frozen=True)
class PaillierAgg(ProtocolWrapper):
    """Paillier aggregation (see the module docstring) around ``strategy``, a
    :class:`~fedloom.strategy.base.SummableStrategy` such as FedAvg, FedProx or FedAvgM (any server optimizer
    and ``clip_norm``, applied by each client; no robust aggregator, which needs each update).

    - ``public_key``: the public half of the clients' key pair. ``None`` in a simulation: the run makes a key
      pair for its simulated clients (``key_bits`` bits) and gives the strategy its public half.
    - ``value_range``, ``weight_cap``: as :class:`~fedloom.privacy.SecAgg`'s (the quantizer's clip per
      coordinate; the examples at which a client's weight stops growing).

    Each round records ``he_clients`` (whose ciphertexts were added) and ``he_bound`` (the most a coordinate of
    the model's update can be off FedAvg's from quantization).
    """

    strategy: SummableStrategy[Any] = field(default_factory=FedAvg)
    public_key: PublicKey | None = None
    key_bits: int = 2048
    value_range: float = 1.0
    weight_cap: int = 1000
    max_failed_rounds: int = 3

    def __post_init__(self) -> None:
        check_whole("max_failed_rounds", self.max_failed_rounds)
        check_summable(self.strategy, wrapper="PaillierAgg", value_range=self.value_range, weight_cap=self.weight_cap)
        if self.public_key is not None and not isinstance(self.public_key, PublicKey):
            raise ConfigError(f"public_key must be a fedloom.privacy.PublicKey, got {type(self.public_key).__name__}")
        if isinstance(self.key_bits, bool) or self.key_bits < paillier.MIN_KEY_BITS or self.key_bits % 2:
            raise ConfigError(f"key_bits must be an even number >= {paillier.MIN_KEY_BITS}, got {self.key_bits!r}")

    def fit_protocol(self, server_round: int, state: Any, instructions: Mapping[str, Message]) -> FitProtocol[Any]:
        """The round's exchanges (module docstring). Raises :class:`NotEnoughClientsError` when fewer than
        ``min_clients`` encrypted updates arrive or no key holder answers, :class:`ConfigError` without a key."""
        public = self.public_key
        if public is None:
            raise ConfigError("PaillierAgg has no public key: give it the clients' (fedloom server --he KEY.pub)")
        layout = layout_of(instructions)
        encoding = {
            **mean_encoding(self.strategy, self.value_range, len(instructions), self.weight_cap),
            "key": public.fingerprint.hex(),
        }
        quantizer = quantizer_of(encoding)
        length = vector_length(layout, encoding)
        replies = yield {
            cid: Message(FIT, m.params, {"round": server_round, "instruction": dict(m.metadata), "encoding": encoding})
            for cid, m in instructions.items()
        }
        vectors: dict[str, EncryptedVector] = {}
        used: dict[str, str] = {}  # client -> SHA-256 of the ciphertexts it sent, for the ledger
        for cid, reply in replies.items():
            try:
                if cid not in instructions or reply.kind != ENCRYPTED or list(reply.params) != ["ciphertexts"]:
                    raise PaillierError(f"expected {ENCRYPTED} with one array of ciphertexts, got {reply.kind}")
                vector = EncryptedVector.from_array(reply.params["ciphertexts"])
                if vector.count != 1 or vector.length != length:
                    raise PaillierError(f"an encrypted update of {vector.count} x {vector.length}, not 1 x {length}")
                vectors[cid] = vector
                used[cid] = hashlib.sha256(reply.params["ciphertexts"].tobytes()).hexdigest()
            except PaillierError as exc:
                log.warning("round %d: ignored client %s's encrypted update: %s", server_round, cid, exc)
        if len(vectors) < self.min_clients:
            raise NotEnoughClientsError(
                f"round {server_round}: {len(vectors)} of {len(instructions)} clients sent an encrypted update, "
                f"fewer than min_clients={self.min_clients}"
            )
        total = paillier.add(list(vectors.values()), public, quantizer).to_array()
        for holder in list(vectors)[:_KEY_HOLDERS_TRIED]:
            decrypt = Message(DECRYPT, Params({"sum": total}), {"round": server_round, "encoding": encoding})
            replies = yield {holder: decrypt}
            answer = replies.get(holder)
            if answer is not None and answer.kind == SUM and list(answer.params) == ["sum"]:
                summed = answer.params["sum"]
                if summed.dtype == np.float64 and summed.shape == (length,) and bool(np.all(np.isfinite(summed))):
                    break
            log.warning("round %d: client %s did not decrypt the sum; asking another", server_round, holder)
        else:
            raise NotEnoughClientsError(f"round {server_round}: no client decrypted the sum")
        after, weight = mean_release(self.strategy, server_round, state, summed.astype(np.float64), layout)
        metrics = {"he_clients": float(len(vectors)), "he_bound": quantizer.bound(len(vectors)) / weight}
        return ProtocolResult(after, metrics, used)


def answer_he(message: Message, train: Callable[[Message], Message], key: KeyPair | None) -> Message:
    """A client's reply to an ``he.*`` instruction, with the clients' shared ``key``: ``he.fit`` trains (through
    ``train``) and encrypts; ``he.decrypt`` decrypts a sum of at least two updates. Raises :class:`ConfigError`
    when this client has no key and :class:`DecodeError` for what does not fit the protocol or the key."""
    if key is None:
        raise ConfigError(f"this client has no Paillier key (fedloom client --he-key), and was sent {message.kind}")
    server_round = message.metadata.get("round")
    try:
        encoding = message.metadata["encoding"]
        if not isinstance(encoding, Mapping) or encoding.get("key") != key.public.fingerprint.hex():
            raise DecodeError("the round is encrypted under another key than this client's")
        if message.kind == FIT:
            instruction = message.metadata["instruction"]
            if not isinstance(instruction, Mapping):
                raise DecodeError("a he.fit without its fit instruction")
            vector = fit_vector(message.params, instruction, encoding, train)
            encrypted = paillier.encrypt(vector, key.public, quantizer_of(encoding))
            return Message(ENCRYPTED, Params({"ciphertexts": encrypted.to_array()}), {"round": server_round})
        if message.kind == DECRYPT:
            total = EncryptedVector.from_array(message.params["sum"])
            if total.count < 2:
                raise DecodeError(f"asked to decrypt {total.count} update: a key holder decrypts only sums")
            plain = paillier.decrypt_sum(total, key, quantizer_of(encoding))
            return Message(SUM, Params({"sum": plain}), {"round": server_round})
    except (KeyError, TypeError, ValueError, ConfigError, PaillierError) as exc:
        raise DecodeError(f"a {message.kind} instruction this client cannot use: {exc}") from None
    raise DecodeError(f"unknown homomorphic aggregation step {message.kind!r}")
