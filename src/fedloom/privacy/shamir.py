"""Shamir's t-of-n secret sharing over a prime field: the one primitive fedloom writes itself (the
``cryptography`` package has none), for secure aggregation's key and seed shares.

A secret of up to 64 bytes is an integer below the Mersenne prime ``P = 2**521 - 1``. ``split`` draws a random
polynomial of degree ``t - 1`` whose constant term is the secret (coefficients from :mod:`secrets`) and gives
party ``i`` (1-based) the point ``(i, f(i))``. Any ``t`` points give back the secret by Lagrange interpolation
at 0; fewer are consistent with every secret alike (information-theoretic).

>>> shares = split(b"seed", threshold=2, parties=3)
>>> combine(shares[:2], length=4)
b'seed'
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

from fedloom.core.errors import ConfigError

__all__ = ["PRIME", "Share", "combine", "split"]

PRIME = 2**521 - 1
SECRET_BYTES = 64  # the largest secret below PRIME, in bytes
Share = tuple[int, int]  # (x, f(x)), x in 1..n


def split(secret: bytes, *, threshold: int, parties: int) -> list[Share]:
    """``parties`` shares of ``secret``, any ``threshold`` of which rebuild it."""
    if not 1 <= threshold <= parties:
        raise ConfigError(f"need 1 <= threshold <= parties, got threshold={threshold}, parties={parties}")
    if len(secret) > SECRET_BYTES:
        raise ConfigError(f"a secret may have at most {SECRET_BYTES} bytes, got {len(secret)}")
    coefficients = [int.from_bytes(secret, "big"), *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    shares = []
    for x in range(1, parties + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Sequence[Share], *, length: int) -> bytes:
    """The secret (``length`` bytes) that ``shares`` (at least the threshold, distinct x) were split from.
    Fewer shares than the threshold give a wrong value, not an error: nothing tells them apart."""
    xs = tuple(x for x, _ in shares)
    if len(set(xs)) != len(xs) or not shares:
        raise ConfigError("need at least one share, each with its own x")
    secret = sum(y * c for (_, y), c in zip(shares, _lagrange_at_zero(xs), strict=True)) % PRIME
    if secret >= 256**length:
        return secret.to_bytes(SECRET_BYTES + 2, "big")[-length:]  # too few shares: some value, not the secret
    return secret.to_bytes(length, "big")


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights ``c_i = prod_{j != i} x_j / (x_j - x_i)`` (mod P) that rebuild ``f(0)`` from ``f(x_i)``. A
    server unmasking a round rebuilds hundreds of secrets from the same parties' shares: it works these out once
    (the O(t^2) part), and each secret is then a weighted sum."""
    weights = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)
