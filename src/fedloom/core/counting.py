"""Counting a share of a whole, written once because floating point makes it easy to get wrong."""

from __future__ import annotations

import math

__all__ = ["share_of"]


def share_of(fraction: float, total: int) -> int:
    """``floor(fraction * total)``, without losing one to rounding: ``0.29 * 100`` is ``28.999999999999996``
    in floating point, and that is 29 here, not 28."""
    return math.floor(fraction * total + 1e-9)
