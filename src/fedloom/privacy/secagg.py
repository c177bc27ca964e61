"""Secure aggregation after Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (the honest-but-curious variant: no signatures, no consistency round), as two state machines with
no network inside: :class:`SecAggClient` and :class:`SecAggServer` take and return plain values (bytes and
arrays), and a driver carries them over any grid.

The rounds, with ``n`` parties numbered 1..n and threshold ``t``:

0. **Advertise keys.** Each client makes two X25519 key pairs, ``c`` (to encrypt its shares) and ``s`` (to
   agree pairwise masks), and sends both public keys. The server needs ``t`` of them (U1).
1. **Share keys.** Each client draws a self-mask seed ``b_u``, splits ``b_u`` and its private ``s`` key t-of-|U1|
   (Shamir, :mod:`fedloom.privacy.shamir`), and encrypts party v's two shares with AES-GCM under
   ``HKDF(X25519(c_u, c_v))``. The server routes the ciphertexts, which it cannot read (U2: the senders).
2. **Masked input.** Each client quantizes its update into 32-bit integers (:mod:`fedloom.privacy.quantize`)
   and adds, modulo 2**32, ``PRG(b_u)`` and ``+-PRG(s_uv)`` for every other v in U2, where ``s_uv`` is the
   agreed ``X25519(s_u, s_v)``: ``+`` when ``u < v``, ``-`` otherwise, so each pair's masks cancel in the sum.
   The PRG is AES-256 in counter mode keyed by HKDF of the seed. The server sees only masked vectors (U3).
3. **Unmask.** Each surviving client sends, for every v in U2, its share of ``b_v`` if v sent its masked input,
   else its share of v's private ``s`` key. With ``t`` answers the server rebuilds the self masks of U3 and
   the pairwise masks between U3 and the clients that dropped after sharing keys, removes them, and decodes
   the sum. Never both shares of one client are asked for, so no individual update is ever unmasked.

Fewer than ``t`` parties at any step ends the round with :class:`SecAggError`. Everything a client receives is
checked (who it is from, the AES-GCM tag), and it refuses what does not fit.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedloom.core.errors import FedloomError
from fedloom.core.graphs import random_regular
from fedloom.privacy import shamir
from fedloom.privacy.quantize import Quantizer

__all__ = ["SecAggClient", "SecAggError", "SecAggServer", "mask_vector", "neighbourhoods"]

_RAW = serialization.Encoding.Raw
_SHARE_BYTES = 66  # a Shamir share's y, big-endian (below 2**521)


class SecAggError(FedloomError):
    """A secure aggregation round cannot go on: fewer than the threshold of parties are left, or a party sent
    something that does not fit the protocol."""


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def mask_vector(seed: bytes, length: int) -> npt.NDArray[np.uint32]:
    """``length`` pseudo-random 32-bit words from ``seed``: AES-256-CTR keystream under ``HKDF(seed)``."""
    encryptor = Cipher(algorithms.AES(_kdf(seed, b"fedloom secagg prg")), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def _private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise SecAggError(f"a public key is not a valid X25519 key: {exc}") from None


def _pair_mask(seed: bytes, me: int, other: int, length: int) -> npt.NDArray[np.uint32]:
    """What party ``me`` adds for the pair (me, other): ``+PRG`` if me < other, else ``-PRG`` (mod 2**32)."""
    words = mask_vector(seed, length)
    return words if me < other else (np.uint32(0) - words).astype(np.uint32)


def neighbourhoods(parties: Sequence[int], degree: int, rng: np.random.Generator) -> dict[int, frozenset[int]]:
    """SecAgg+'s neighbourhoods: a random connected ``degree``-regular graph over ``parties``
    (:func:`fedloom.core.graphs.random_regular`), as party -> its neighbours."""
    adjacency = random_regular(len(parties), degree, rng)
    return {p: frozenset(parties[int(j)] for j in np.flatnonzero(adjacency[i])) for i, p in enumerate(parties)}


@dataclass
class SecAggClient:
    """One party's side of a round. ``party`` is its number (1..n), ``threshold`` t, ``quantizer`` how its
    update becomes integers. Call :meth:`advertise`, :meth:`share_keys`, :meth:`masked_input`, :meth:`unmask`
    in that order, each with what the server sent."""

    party: int
    threshold: int
    quantizer: Quantizer
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _held: dict[int, tuple[shamir.Share, shamir.Share]] = field(default_factory=dict, repr=False)
    _sharers: set[int] = field(default_factory=set, repr=False)

    def advertise(self) -> tuple[bytes, bytes]:
        """Round 0: this party's two public keys (encryption, masking)."""
        return _public(self._c), _public(self._s)

    def share_keys(self, roster: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Round 1: given every party's public keys (U1), the encrypted shares for each other party."""
        if self.party not in roster or len(roster) < self.threshold:
            raise SecAggError(f"party {self.party}: a roster of {len(roster)} parties without it or below t")
        self._roster = dict(roster)
        parties = sorted(roster)
        s_shares = shamir.split(_private(self._s), threshold=self.threshold, parties=len(parties))
        b_shares = shamir.split(self._b, threshold=self.threshold, parties=len(parties))
        out = {}
        for index, v in enumerate(parties):
            plain = struct.pack(">II", self.party, v) + _pack(s_shares[index]) + _pack(b_shares[index])
            if v == self.party:
                self._held[v] = (s_shares[index], b_shares[index])
                continue
            out[v] = _seal(self._c, roster[v][0], self.party, v, plain)
        return out

    def masked_input(self, ciphertexts: Mapping[int, bytes], update: npt.NDArray[Any]) -> npt.NDArray[np.uint32]:
        """Round 2: given the ciphertexts others sent this party (U2 is their senders and this party), the
        masked, quantized ``update`` (a flat vector)."""
        for u, sealed in ciphertexts.items():
            if u not in self._roster or u == self.party:
                raise SecAggError(f"party {self.party}: shares from {u}, who is not on the roster")
            plain = _open(self._c, self._roster[u][0], u, self.party, sealed)
            sender, receiver = struct.unpack(">II", plain[:8])
            if (sender, receiver) != (u, self.party):
                raise SecAggError(f"party {self.party}: a share addressed {sender}->{receiver} came from {u}")
            self._held[u] = (_unpack(plain[8 : 8 + 4 + _SHARE_BYTES]), _unpack(plain[8 + 4 + _SHARE_BYTES :]))
        self._sharers = {*ciphertexts, self.party}
        if len(self._sharers) < self.threshold:
            raise SecAggError(f"party {self.party}: only {len(self._sharers)} parties shared keys, below t")
        flat = np.asarray(update, dtype=np.float64).reshape(-1)
        masked = self.quantizer.encode(flat) + mask_vector(self._b, flat.size)
        for v in self._sharers - {self.party}:
            masked = masked + _pair_mask(_agree(self._s, self._roster[v][1]), self.party, v, flat.size)
        return masked.astype(np.uint32)

    def unmask(self, survivors: Sequence[int]) -> dict[int, tuple[str, shamir.Share]]:
        """Round 3: for each party that shared keys, its ``b`` share if it is among ``survivors`` (it sent its
        masked input), else its ``s`` key share. Refuses a survivor list below t or with strangers."""
        alive = set(survivors)
        if self.party not in alive or len(alive) < self.threshold or not alive <= self._sharers:
            raise SecAggError(f"party {self.party}: refuses to unmask for survivors {sorted(alive)}")
        return {
            u: ("b", shares[1]) if u in alive else ("s", shares[0])
            for u, shares in self._held.items()
            if u in self._sharers
        }


@dataclass
class SecAggServer:
    """The server's side: it routes and counts, and at the end unmasks the sum (never one update).

    With ``neighbours`` (party -> the parties it deals with) this is SecAgg+ (Bell et al. 2020): each client
    shares keys and agrees masks only within its neighbourhood, a random k-regular graph, so its work and
    messages grow with k (of order log n), not n; ``threshold`` is then per neighbourhood (t of k + 1). The
    server hands each client only its neighbourhood's keys (:meth:`roster_for`) and survivors
    (:meth:`survivors_for`). Without it, every client deals with every other (Bonawitz et al.)."""

    threshold: int
    quantizer: Quantizer
    length: int
    neighbours: Mapping[int, frozenset[int]] | None = None
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    sharers: set[int] = field(default_factory=set)
    masked: dict[int, npt.NDArray[np.uint32]] = field(default_factory=dict)

    def collect_keys(self, adverts: Mapping[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        self._enough(len(adverts), "advertised keys")
        self.roster = dict(adverts)
        return self.roster

    def roster_for(self, party: int) -> dict[int, tuple[bytes, bytes]]:
        """The public keys ``party`` gets: its neighbourhood's (everyone's, without neighbourhoods)."""
        return {v: keys for v, keys in self.roster.items() if v == party or v in self._near(party)}

    def survivors_for(self, party: int) -> list[int]:
        """The survivors ``party`` is told of, for the unmasking: those in its neighbourhood, and itself."""
        return [v for v in sorted(self.masked) if v == party or v in self._near(party)]

    def _near(self, party: int) -> frozenset[int] | set[int]:
        return self.roster.keys() - {party} if self.neighbours is None else self.neighbours.get(party, frozenset())

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """The ciphertexts each party gets, from the parties that sent theirs (U2)."""
        self._enough(len(sent), "shared keys")
        self.sharers = set(sent)
        return {v: {u: box[v] for u, box in sent.items() if v in box} for v in self.sharers}

    def collect_masked(self, masked: Mapping[int, npt.NDArray[np.uint32]]) -> list[int]:
        """The survivors (U3), whose masked inputs are in."""
        self._enough(len(masked), "sent masked input")
        for u, vector in masked.items():
            if u not in self.sharers or vector.shape != (self.length,) or vector.dtype != np.uint32:
                raise SecAggError(f"party {u}'s masked input does not fit the round")
        self.masked = dict(masked)
        return sorted(masked)

    def unmask(self, answers: Mapping[int, Mapping[int, tuple[str, shamir.Share]]]) -> npt.NDArray[np.float64]:
        """The float sum of the survivors' updates, from the shares of at least t survivors."""
        self._enough(len(answers), "answered the unmasking")
        survivors = set(self.masked)
        total = np.zeros(self.length, np.uint32)
        for vector in self.masked.values():
            total = total + vector
        for u in sorted(self.sharers):
            kind = "b" if u in survivors else "s"
            shares = sorted(a[u][1] for a in answers.values() if u in a and a[u][0] == kind)
            if len(shares) < self.threshold:
                raise SecAggError(f"only {len(shares)} shares of party {u}'s {kind}, below t={self.threshold}")
            shares = shares[: self.threshold]  # t are enough; the same parties' for every secret, where they can be
            if kind == "b":
                total = total - mask_vector(shamir.combine(shares, length=32), self.length)
                continue
            dropped = X25519PrivateKey.from_private_bytes(shamir.combine(shares, length=32))
            for v in survivors & self._near(u):  # v added the pair mask for (v, u); take it back out
                total = total - _pair_mask(_agree(dropped, self.roster[v][1]), v, u, self.length)
        return self.quantizer.decode_sum(total.astype(np.uint32), len(survivors))

    def _enough(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecAggError(f"only {count} parties {what}, below the threshold t={self.threshold}")


def _pack(share: shamir.Share) -> bytes:
    return struct.pack(">I", share[0]) + share[1].to_bytes(_SHARE_BYTES, "big")


def _unpack(data: bytes) -> shamir.Share:
    return struct.unpack(">I", data[:4])[0], int.from_bytes(data[4:], "big")


def _seal(mine: X25519PrivateKey, their_public: bytes, sender: int, receiver: int, plain: bytes) -> bytes:
    key = _kdf(_agree(mine, their_public), b"fedloom secagg shares")
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, struct.pack(">II", sender, receiver))


def _open(mine: X25519PrivateKey, their_public: bytes, sender: int, receiver: int, sealed: bytes) -> bytes:
    key = _kdf(_agree(mine, their_public), b"fedloom secagg shares")
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], struct.pack(">II", sender, receiver))
    except InvalidTag:
        raise SecAggError(f"party {receiver}: the shares from party {sender} do not decrypt (tampered?)") from None
