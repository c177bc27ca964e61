"""Additive homomorphic aggregation under Paillier (the ``phe`` package), with no network inside: clients
encrypt their quantized updates, the server adds ciphertexts without ever decrypting, and a holder of the
clients' shared key decrypts only the sum. Plain values go in and out; a driver carries them over any grid.

- **Key.** One client (or whoever sets up the job) makes :meth:`KeyPair.generate`; the key pair reaches the other
  clients out of band, like their credentials (:meth:`KeyPair.to_bytes`). The server gets :class:`PublicKey` only.
- **Client:** :func:`encrypt` turns an update into an :class:`EncryptedVector`, which
  :meth:`EncryptedVector.to_array` makes one ``uint8`` array that travels as a message's params.
- **Server:** :func:`add` multiplies ciphertexts modulo ``n**2`` (phe's ``EncryptedNumber`` addition).
- **Key holder:** :func:`decrypt_sum` decrypts the sum it is sent and decodes it to floats.

**Encoding.** A :class:`~fedloom.privacy.quantize.Quantizer` clips each value to ``[-clip, clip]`` and rounds
it to one of ``2**bits`` levels, a non-negative integer at most ``L = 2**bits - 1``.

**Packing.** A slot is ``w`` bits, the bit length of ``clients * L`` (at most ``bits + ceil(log2 clients)``;
32 with the quantizer's default ``bits``). The sum of up to ``clients`` levels in one slot is at most
``clients * L < 2**w``, so it never carries into the next slot. A key whose modulus ``n`` has ``K`` bits takes
plaintexts up to phe's ``max_int = n // 3 - 1 >= 2**(K - 3) - 1``, so one ciphertext packs ``s = (K - 3) // w``
coordinates: 63 for a 2048-bit key and 32-bit slots (2,016 of 2,045 bits), 31 for a 1024-bit key. Coordinate
``i`` is in ciphertext ``i // s``, bits ``[(i % s) * w, (i % s + 1) * w)``. 10,000 parameters take 159
ciphertexts instead of 10,000.

**Error bound.** The integer sum is exact; only the rounding errs. Every coordinate of the decoded sum of ``m``
updates is within ``m * step / 2`` of the sum of the clipped values, ``step = 2 clip / L``
(:meth:`Quantizer.bound`).

**Checks.** Each vector names its key (a fingerprint of ``n``), its slot width and how many updates it sums;
:func:`add` and :func:`decrypt_sum` refuse what does not fit their key and quantizer, and a sum of more than
``clients`` updates, which could carry. The key holder also refuses a plaintext that ``count`` updates cannot
produce (a slot above ``count * L``, bits above the last slot): what a ciphertext under another key, or a wrong
count, decrypts to. This catches mistakes, not attacks: Paillier is malleable and nothing here is authenticated.

**Threat model** (more in ``docs/privacy.md``). The server is honest but curious; it sees ciphertexts, which
are semantically secure under the decisional composite residuosity assumption, and whatever sum the key holder
hands back. Every client holds the private key, so any client that sees another's ciphertext can decrypt it:
ciphertexts must reach the server over channels clients cannot read, and a key holder must be sent only the sum
(it cannot tell a sum from a single update: the count is the server's word). A server colluding with any one
client reads every update. **No threshold decryption**: phe has none, and threshold Paillier needs a
distributed key generation (a shared RSA modulus nobody can factor) that no maintained Python library offers;
fedloom does not write its own. Where no client may be trusted with the key, use secure aggregation
(:mod:`fedloom.privacy.secagg`), which tolerates up to ``t - 1`` colluding clients.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from phe import paillier

from fedloom.core.errors import ConfigError, FedloomError, InvalidUpdateError
from fedloom.privacy.quantize import Quantizer

__all__ = ["EncryptedVector", "KeyPair", "PaillierError", "PublicKey", "add", "decrypt_sum", "encrypt"]

MIN_KEY_BITS = 1024
_HEADROOM_BITS = 3  # plaintexts stay below 2**(K - 3) <= phe's max_int (see the module docstring)
# magic, version, key fingerprint, updates summed, coordinates, key bits, slot bits
_HEADER = struct.Struct(">4sB8sIIHH")
_MAGIC = b"FLPH"
_VERSION = 1


class PaillierError(FedloomError):
    """Paillier ciphertexts do not fit: another key, another quantizer, a malformed array, or a sum of more
    updates than the packing can hold without carrying."""


@dataclass(frozen=True, repr=False)
class PublicKey:
    """A Paillier public key: the modulus ``n``. It encrypts and adds; it cannot decrypt."""

    n: int
    _phe: Any = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n.bit_length() < MIN_KEY_BITS or self.n % 2 == 0:
            raise ConfigError(f"a Paillier modulus must be an odd integer of at least {MIN_KEY_BITS} bits")
        object.__setattr__(self, "_phe", paillier.PaillierPublicKey(self.n))

    def __repr__(self) -> str:
        return f"PublicKey({self.bits} bits, {self.fingerprint.hex()})"

    @property
    def bits(self) -> int:
        return self.n.bit_length()

    @property
    def fingerprint(self) -> bytes:
        """8 bytes of SHA-256 over :meth:`to_bytes`, which name the key in every :class:`EncryptedVector`."""
        return hashlib.sha256(self.to_bytes()).digest()[:8]

    def to_bytes(self) -> bytes:
        """``n``, big-endian."""
        return self.n.to_bytes((self.bits + 7) // 8, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKey:
        """The key :meth:`to_bytes` wrote. Raises :class:`ConfigError` if it is not a valid modulus."""
        return cls(int.from_bytes(data, "big"))


@dataclass(frozen=True, repr=False)
class KeyPair:
    """The clients' shared Paillier key pair (primes ``p``, ``q``). Secret: never give it to the server."""

    p: int
    q: int
    public: PublicKey = field(init=False)
    _phe: Any = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.p, int) and isinstance(self.q, int)) or min(self.p, self.q) < 3 or self.p == self.q:
            raise ConfigError("a Paillier key pair needs two distinct odd primes")
        object.__setattr__(self, "public", PublicKey(self.p * self.q))
        object.__setattr__(self, "_phe", paillier.PaillierPrivateKey(self.public._phe, self.p, self.q))

    def __repr__(self) -> str:
        return f"KeyPair({self.public.bits} bits, {self.public.fingerprint.hex()})"

    @classmethod
    def generate(cls, bits: int = 2048) -> KeyPair:
        """A fresh key pair whose modulus has ``bits`` bits (even, >= 1024; 2048 is the usual choice, 3072 for
        long-lived secrets), from phe's generator (primes from the operating system's entropy)."""
        if not isinstance(bits, int) or bits < MIN_KEY_BITS or bits % 2:
            raise ConfigError(f"key bits must be an even number >= {MIN_KEY_BITS}, got {bits!r}")
        _, private = paillier.generate_paillier_keypair(n_length=bits)
        return cls(int(private.p), int(private.q))

    def to_bytes(self) -> bytes:
        """Both primes, each as a 2-byte length and big-endian bytes: the secret to hand to the other clients."""
        out = b""
        for prime in (self.p, self.q):
            raw = prime.to_bytes((prime.bit_length() + 7) // 8, "big")
            out += struct.pack(">H", len(raw)) + raw
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyPair:
        """The key pair :meth:`to_bytes` wrote. Raises :class:`ConfigError` if the bytes are not one. The primes
        are taken on trust (not tested for primality): load keys only from where they were made."""
        primes = []
        at = 0
        for _ in range(2):
            if len(data) < at + 2:
                raise ConfigError("truncated Paillier key pair")
            (size,) = struct.unpack_from(">H", data, at)
            if len(data) < at + 2 + size:
                raise ConfigError("truncated Paillier key pair")
            primes.append(int.from_bytes(data[at + 2 : at + 2 + size], "big"))
            at += 2 + size
        if at != len(data):
            raise ConfigError("trailing bytes after a Paillier key pair")
        return cls(primes[0], primes[1])


@dataclass(frozen=True, repr=False)
class EncryptedVector:
    """Packed Paillier ciphertexts of ``length`` coordinates summing ``count`` updates, under the key with
    fingerprint ``key`` (of ``key_bits`` bits), in ``slot_bits``-bit slots. Raises :class:`PaillierError` if
    the fields do not fit together."""

    key: bytes
    count: int
    length: int
    key_bits: int
    slot_bits: int
    ciphertexts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.key) != 8 or self.count < 1 or self.length < 0 or not 1 <= self.slot_bits <= 32:
            raise PaillierError(
                f"an encrypted vector with key {self.key.hex()}, count {self.count}, "
                f"length {self.length}, slot bits {self.slot_bits} does not fit"
            )
        if self.key_bits < MIN_KEY_BITS or len(self.ciphertexts) != math.ceil(self.length / self.slots):
            raise PaillierError(
                f"{len(self.ciphertexts)} ciphertexts for {self.length} coordinates in "
                f"{self.slots} slots each under a {self.key_bits}-bit key"
            )
        if any(not 0 < c < 1 << 2 * self.key_bits for c in self.ciphertexts):
            raise PaillierError(f"a ciphertext is out of range for a {self.key_bits}-bit key")

    def __repr__(self) -> str:
        return (
            f"EncryptedVector({self.length} coordinates, {self.count} updates, {len(self.ciphertexts)} "
            f"ciphertexts, key {self.key.hex()})"
        )

    @property
    def slots(self) -> int:
        """Coordinates per ciphertext."""
        return (self.key_bits - _HEADROOM_BITS) // self.slot_bits

    def to_array(self) -> npt.NDArray[np.uint8]:
        """A flat ``uint8`` array: a header, then each ciphertext as fixed-width big-endian bytes (the width of
        ``n**2``), for a message's params."""
        head = _HEADER.pack(_MAGIC, _VERSION, self.key, self.count, self.length, self.key_bits, self.slot_bits)
        width = _width(self.key_bits)
        body = b"".join(c.to_bytes(width, "big") for c in self.ciphertexts)
        return np.frombuffer(bytearray(head + body), dtype=np.uint8)

    @classmethod
    def from_array(cls, array: npt.NDArray[Any]) -> EncryptedVector:
        """The vector :meth:`to_array` wrote. Raises :class:`PaillierError` if the array is not one."""
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
            raise PaillierError("an encrypted vector travels as a flat uint8 array")
        data = array.tobytes()
        if len(data) < _HEADER.size:
            raise PaillierError("truncated encrypted vector")
        magic, version, key, count, length, key_bits, slot_bits = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise PaillierError(f"not an encrypted vector of version {_VERSION}")
        width = _width(key_bits)
        body = data[_HEADER.size :]
        if width == 0 or len(body) % width:
            raise PaillierError(f"{len(body)} ciphertext bytes are not whole {width}-byte ciphertexts")
        ciphertexts = tuple(int.from_bytes(body[i : i + width], "big") for i in range(0, len(body), width))
        return cls(key, count, length, key_bits, slot_bits, ciphertexts)


def encrypt(update: npt.ArrayLike, public: PublicKey, quantizer: Quantizer) -> EncryptedVector:
    """A client's ``update`` (any shape, read flat), quantized, packed and encrypted under ``public``; the
    vector counts one update. Raises :class:`ConfigError` for a key or quantizer of the wrong type and
    :class:`InvalidUpdateError` for NaN or infinity."""
    _check_settings(public, quantizer)
    flat = np.asarray(update, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise InvalidUpdateError("an update to encrypt holds NaN or infinity")
    levels = quantizer.encode(flat)
    slot_bits = _slot_bits(quantizer)
    slots = (public.bits - _HEADROOM_BITS) // slot_bits
    ciphertexts = tuple(
        int(public._phe.encrypt(_pack(levels[i : i + slots], slot_bits)).ciphertext())
        for i in range(0, flat.size, slots)
    )
    return EncryptedVector(public.fingerprint, 1, flat.size, public.bits, slot_bits, ciphertexts)


def add(vectors: Sequence[EncryptedVector], public: PublicKey, quantizer: Quantizer) -> EncryptedVector:
    """The server's step: the encrypted sum of ``vectors``, by phe's homomorphic addition (a product of
    ciphertexts modulo ``n**2``), with the public key only. Raises :class:`ConfigError` for no vectors or for a
    key that is not a :class:`PublicKey`, and :class:`PaillierError` for vectors under another key or
    quantizer, of different lengths, or summing more than ``quantizer.clients`` updates."""
    _check_settings(public, quantizer)
    if not vectors:
        raise ConfigError("add needs at least one encrypted vector")
    for vector in vectors:
        _check_vector(vector, public, quantizer)
    lengths = {v.length for v in vectors}
    if len(lengths) != 1:
        raise PaillierError(f"encrypted vectors of different lengths {sorted(lengths)} cannot be added")
    count = sum(v.count for v in vectors)
    _check_count(count, quantizer)
    totals = []
    for column in zip(*(v.ciphertexts for v in vectors), strict=True):
        total = paillier.EncryptedNumber(public._phe, column[0])
        for c in column[1:]:
            total = total + paillier.EncryptedNumber(public._phe, c)
        # The clients' ciphertexts are already randomized, and so is their product: no fresh obfuscation.
        totals.append(int(total.ciphertext(be_secure=False)))
    first = vectors[0]
    return EncryptedVector(first.key, count, first.length, first.key_bits, first.slot_bits, tuple(totals))


def decrypt_sum(total: EncryptedVector, keys: KeyPair, quantizer: Quantizer) -> npt.NDArray[np.float64]:
    """The key holder's step: the float64 sum of the ``total.count`` updates in ``total`` (flat, ``length``
    coordinates), within ``quantizer.bound(total.count)`` of the sum of the clipped updates. Raises
    :class:`ConfigError` for a key or quantizer of the wrong type, and :class:`PaillierError` for a vector under
    another key or quantizer, a count above ``quantizer.clients``, or a plaintext that ``count`` updates cannot
    produce."""
    if not isinstance(keys, KeyPair):
        raise ConfigError(f"decrypt_sum needs the KeyPair, got {type(keys).__name__}")
    _check_settings(keys.public, quantizer)
    _check_vector(total, keys.public, quantizer)
    _check_count(total.count, quantizer)
    most = total.count * quantizer.levels
    sums = np.zeros(len(total.ciphertexts) * total.slots, dtype=np.uint32)
    for index, c in enumerate(total.ciphertexts):
        plain = int(keys._phe.raw_decrypt(c))
        slots = _unpack(plain, total.slot_bits, total.slots)
        if plain >> (total.slots * total.slot_bits) or max(slots) > most:
            raise PaillierError(
                f"ciphertext {index} does not decrypt to a sum of {total.count} packed updates "
                "(encrypted under another key, or a wrong count)"
            )
        sums[index * total.slots : (index + 1) * total.slots] = slots
    if np.any(sums[total.length :]):
        raise PaillierError("the padding after the last coordinate does not decrypt to zero")
    return quantizer.decode_sum(sums[: total.length], total.count)


def _slot_bits(quantizer: Quantizer) -> int:
    return int(quantizer.clients * quantizer.levels).bit_length()


def _width(key_bits: int) -> int:
    return (2 * key_bits + 7) // 8


def _pack(levels: npt.NDArray[np.uint32], slot_bits: int) -> int:
    plain = 0
    for level in reversed(levels.tolist()):
        plain = (plain << slot_bits) | level
    return plain


def _unpack(plain: int, slot_bits: int, slots: int) -> list[int]:
    mask = (1 << slot_bits) - 1
    return [(plain >> (j * slot_bits)) & mask for j in range(slots)]


def _check_settings(public: PublicKey, quantizer: Quantizer) -> None:
    if not isinstance(public, PublicKey):
        raise ConfigError(f"expected a PublicKey (the server holds nothing else), got {type(public).__name__}")
    if not isinstance(quantizer, Quantizer):
        raise ConfigError(f"expected a Quantizer, got {type(quantizer).__name__}")


def _check_vector(vector: EncryptedVector, public: PublicKey, quantizer: Quantizer) -> None:
    if not isinstance(vector, EncryptedVector):
        raise ConfigError(f"expected an EncryptedVector, got {type(vector).__name__}")
    if vector.key != public.fingerprint or vector.key_bits != public.bits:
        raise PaillierError(f"a vector encrypted under key {vector.key.hex()}, not {public.fingerprint.hex()}")
    if vector.slot_bits != _slot_bits(quantizer):
        raise PaillierError(
            f"a vector packed in {vector.slot_bits}-bit slots, not the quantizer's {_slot_bits(quantizer)}"
        )
    nsquare = public.n * public.n
    if any(c >= nsquare for c in vector.ciphertexts):
        raise PaillierError("a ciphertext is not below n**2 of its key")


def _check_count(count: int, quantizer: Quantizer) -> None:
    if count > quantizer.clients:
        raise PaillierError(
            f"a sum of {count} updates could carry between slots packed for at most {quantizer.clients}"
        )
