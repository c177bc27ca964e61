"""Fixed-point quantization of float updates into the ring of 32-bit integers, for secure aggregation.

Each value is clipped to ``[-clip, clip]`` and mapped to the nearest of ``2**bits`` evenly spaced levels,
``round((x + clip) / step)`` with ``step = 2 clip / (2**bits - 1)``. Summing ``clients`` such integers modulo
``2**32`` cannot wrap when ``clients * (2**bits - 1) < 2**32``, so the sum decodes exactly to the sum of the
levels. **Error bound**: for ``m`` summed clients, every coordinate of the decoded sum is within ``m * step / 2``
of the sum of the clipped values (each rounding is off by at most half a step); :meth:`Quantizer.bound` says it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError

__all__ = ["MODULUS", "Quantizer"]

MODULUS = 2**32


@dataclass(frozen=True)
class Quantizer:
    """Quantization for sums of up to ``clients`` vectors (see the module docstring); ``bits`` defaults to the
    most that cannot wrap."""

    clip: float
    clients: int
    bits: int | None = None

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"clip must be > 0, got {self.clip}")
        if not isinstance(self.clients, int) or self.clients < 1:
            raise ConfigError(f"clients must be >= 1, got {self.clients!r}")
        most = math.floor(math.log2((MODULUS - 1) / self.clients + 1))
        if self.bits is None:
            object.__setattr__(self, "bits", most)
        elif not 1 <= self.bits <= most:
            raise ConfigError(f"bits must be in 1..{most} for {self.clients} clients (the sum must not wrap)")

    @property
    def levels(self) -> int:
        assert self.bits is not None
        return int(2**self.bits - 1)

    @property
    def step(self) -> float:
        return 2.0 * self.clip / self.levels

    def bound(self, summed: int) -> float:
        """The most a coordinate of the decoded sum of ``summed`` vectors can be off the sum of the clipped
        values."""
        return summed * self.step / 2.0

    def encode(self, values: npt.NDArray[Any]) -> npt.NDArray[np.uint32]:
        clipped = np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip)
        return np.rint((clipped + self.clip) / self.step).astype(np.uint32)

    def decode_sum(self, total: npt.NDArray[np.uint32], summed: int) -> npt.NDArray[np.float64]:
        """The float sum of ``summed`` encoded vectors whose sum modulo 2**32 is ``total``."""
        if not 0 <= summed <= self.clients:
            raise ConfigError(f"cannot decode a sum of {summed} vectors with a quantizer for {self.clients}")
        return total.astype(np.float64) * self.step - summed * self.clip
