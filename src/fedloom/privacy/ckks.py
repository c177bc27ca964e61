"""Additive aggregation under CKKS (Cheon, Kim, Kim, Song 2017) through TenSEAL: the optional alternative to
Paillier (:mod:`fedloom.privacy.paillier`), with the same roles and no network inside. Install it with
``pip install 'fedloom[ckks]'``; TenSEAL is imported only when this module is used.

- **Keys.** :meth:`CKKSKeys.generate` makes a TenSEAL context with a secret key (the clients', shared out of
  band); :attr:`CKKSKeys.public` is the same context without the secret key, all the server gets.
- **Client:** :func:`encrypt` packs a float update into CKKS vectors of :data:`SLOTS` values each and returns
  them as one ``uint8`` array (for a message's params).
- **Server:** :func:`add` adds the encrypted vectors with the public context only.
- **Key holder:** :func:`decrypt_sum` decrypts the sum it is sent.

**Approximate, not exact.** CKKS encrypts real numbers at a fixed scale (2**40 here) and its results carry a
small error that grows with the additions: about 1e-8 per coordinate for ten 10,000-value updates of magnitude
0.01 (measured by ``benchmarks/ckks.py``). There is no quantization clip and no wrap-around, but there
is no stated bound either: Paillier's fixed-point sum is exact to its quantization.

**Threat model.** As Paillier's (every client holds the secret key; the server holds the public context and
never decrypts), plus one risk of its own: a CKKS decryption leaks a little about the secret key through its
approximation error (Li and Micciancio 2021), so sending exact decryptions back to the server can let it recover
the key. :func:`decrypt_sum` rounds the sum to ``round_to`` (1e-6 by default) before it leaves the key holder,
which removes the low-order error bits that attack reads; this is a mitigation, not a proof. Where that matters,
use Paillier.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError, FedloomError, InvalidUpdateError

__all__ = ["SLOTS", "CKKSError", "CKKSKeys", "CKKSPublic", "add", "decrypt_sum", "encrypt"]

POLY_MODULUS_DEGREE = 8192
SLOTS = POLY_MODULUS_DEGREE // 2  # values per CKKS vector
_SCALE_BITS = 40
_COEFF_MOD_BITS = [60, 40, 40, 60]  # 200 bits: 128-bit security for degree 8192 (HE standard)
_MAGIC = b"FLCK"


class CKKSError(FedloomError):
    """CKKS ciphertexts do not fit: another context, a malformed array, or TenSEAL missing."""


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:
        raise CKKSError("CKKS needs TenSEAL: pip install 'fedloom[ckks]'") from None
    return tenseal


@dataclass(frozen=True, repr=False)
class CKKSPublic:
    """A CKKS context without its secret key: it encrypts and adds; it cannot decrypt."""

    context: bytes

    def __repr__(self) -> str:
        return f"CKKSPublic({self.fingerprint.hex()})"

    @property
    def fingerprint(self) -> bytes:
        """8 bytes of SHA-256 over the serialized public context, which name it in every encrypted array."""
        return hashlib.sha256(self.context).digest()[:8]

    def load(self) -> Any:
        context = _tenseal().context_from(self.context)
        if context.is_private():
            raise ConfigError("a CKKS public context must not hold the secret key")
        return context


@dataclass(frozen=True, repr=False)
class CKKSKeys:
    """The clients' CKKS context with its secret key (``context``), and its public half as made once with it
    (``public_context``: serializing a context twice need not give the same bytes, and the fingerprint is of
    these). Secret: never give ``context`` to the server."""

    context: bytes
    public_context: bytes

    def __repr__(self) -> str:
        return f"CKKSKeys({self.public.fingerprint.hex()})"

    @classmethod
    def generate(cls) -> CKKSKeys:
        """A fresh context: degree 8192, 200-bit coefficient modulus, scale 2**40 (128-bit security)."""
        ts = _tenseal()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=_COEFF_MOD_BITS
        )
        context.global_scale = 2**_SCALE_BITS
        secret = context.serialize(save_secret_key=True)
        context.make_context_public()
        return cls(secret, context.serialize())

    @property
    def public(self) -> CKKSPublic:
        return CKKSPublic(self.public_context)

    def load(self) -> Any:
        context = _tenseal().context_from(self.context)
        if not context.is_private():
            raise ConfigError("CKKS keys must hold the secret key")
        return context


def encrypt(update: npt.ArrayLike, public: CKKSPublic) -> npt.NDArray[np.uint8]:
    """``update`` (any shape, read flat) encrypted under ``public`` as one ``uint8`` array: a header (magic,
    context fingerprint, how many updates it sums, length), then each CKKS vector of up to :data:`SLOTS`
    values with its byte length. Raises :class:`InvalidUpdateError` for NaN or infinity."""
    flat = np.asarray(update, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise InvalidUpdateError("an update to encrypt holds NaN or infinity")
    ts, context = _tenseal(), public.load()
    chunks = [ts.ckks_vector(context, flat[i : i + SLOTS].tolist()).serialize() for i in range(0, flat.size, SLOTS)]
    return _pack(public.fingerprint, 1, flat.size, chunks)


def add(arrays: Sequence[npt.NDArray[Any]], public: CKKSPublic) -> npt.NDArray[np.uint8]:
    """The server's step: the encrypted sum of ``arrays`` (from :func:`encrypt`, or sums), with the public context
    only. Raises :class:`CKKSError` for arrays under another context or of other lengths."""
    if not arrays:
        raise ConfigError("nothing to add")
    ts, context = _tenseal(), public.load()
    count, length, total = 0, None, None
    for array in arrays:
        key, many, size, chunks = _unpack(array)
        if key != public.fingerprint or (length is not None and size != length):
            raise CKKSError("an encrypted update under another context, or of another length")
        vectors = [ts.ckks_vector_from(context, chunk) for chunk in chunks]
        total = vectors if total is None else [a + b for a, b in zip(total, vectors, strict=True)]
        count, length = count + many, size
    assert total is not None
    assert length is not None
    return _pack(public.fingerprint, count, length, [v.serialize() for v in total])


def decrypt_sum(array: npt.NDArray[Any], keys: CKKSKeys, *, round_to: float = 1e-6) -> npt.NDArray[np.float64]:
    """The key holder's step: the float64 sum in ``array``, rounded to a multiple of ``round_to`` (see the module
    docstring). Raises :class:`CKKSError` for an array under another context."""
    key, _count, length, chunks = _unpack(array)
    if key != keys.public.fingerprint:
        raise CKKSError("the sum is encrypted under another context than these keys'")
    ts, context = _tenseal(), keys.load()
    values = np.concatenate([np.asarray(ts.ckks_vector_from(context, c).decrypt(), np.float64) for c in chunks])
    if values.size != length:
        raise CKKSError(f"decrypted {values.size} values for a sum of {length}")
    return np.round(values / round_to) * round_to


def count_of(array: npt.NDArray[Any]) -> int:
    """How many updates an encrypted array says it sums."""
    return _unpack(array)[1]


def _pack(key: bytes, count: int, length: int, chunks: Sequence[bytes]) -> npt.NDArray[np.uint8]:
    head = _MAGIC + key + struct.pack(">II", count, length)
    body = b"".join(struct.pack(">I", len(c)) + c for c in chunks)
    return np.frombuffer(bytearray(head + body), dtype=np.uint8)


def _unpack(array: npt.NDArray[Any]) -> tuple[bytes, int, int, list[bytes]]:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise CKKSError("an encrypted CKKS update travels as a flat uint8 array")
    data = array.tobytes()
    if len(data) < 20 or data[:4] != _MAGIC:
        raise CKKSError("not an encrypted CKKS update")
    key, (count, length) = data[4:12], struct.unpack(">II", data[12:20])
    chunks, at = [], 20
    while at < len(data):
        if at + 4 > len(data):
            raise CKKSError("truncated encrypted CKKS update")
        (size,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    if at != len(data) or len(chunks) != -(-length // SLOTS):
        raise CKKSError(f"{len(chunks)} CKKS vectors for {length} values")
    return key, count, length, chunks
