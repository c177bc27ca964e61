"""Checks that every inbound update passes before it can touch an aggregate."""

from __future__ import annotations

import numpy as np

from fedloom.core.errors import InvalidUpdateError
from fedloom.core.params import Params

__all__ = ["check_update"]


def check_update(reference: Params, update: Params) -> None:
    """Raise :class:`InvalidUpdateError` unless ``update`` has exactly the names, shapes and dtypes of
    ``reference`` (the global params it was trained from), in the same order, and only finite values.

    Shapes and dtypes fixed, the update's size is fixed too: a client cannot make the server allocate more
    than the model's own size.
    """
    if list(update) != list(reference):
        missing = [k for k in reference if k not in update]
        extra = [k for k in update if k not in reference]
        if missing or extra:
            raise InvalidUpdateError(f"update has the wrong parameters (missing {missing}, unexpected {extra})")
        raise InvalidUpdateError("update lists the parameters in another order than the global model")
    for name, expected in reference.items():
        got = update[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise InvalidUpdateError(
                f"parameter {name!r} is {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}"
            )
        if np.issubdtype(got.dtype, np.inexact) and not np.isfinite(got).all():
            raise InvalidUpdateError(f"parameter {name!r} holds NaN or infinite values")
