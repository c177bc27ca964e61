"""Checks that every inbound update passes before it can touch an aggregate."""

from __future__ import annotations

import re

import numpy as np

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.params import Params

__all__ = ["all_finite", "check_client_name", "check_update"]

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_client_name(name: str) -> str:
    """``name`` if it can name a deployed client (1 to 64 letters, digits, ``.``, ``_`` or ``-``, starting with
    a letter or digit: safe in a file name, a certificate and a log line), else :class:`ConfigError`."""
    if not _CLIENT_NAME.match(name):
        raise ConfigError(
            f"client name {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


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
        if np.issubdtype(got.dtype, np.inexact) and not _all_finite(got):
            raise InvalidUpdateError(f"parameter {name!r} holds NaN or infinite values")


_BLOCK = 1 << 20


def all_finite(params: Params) -> bool:
    """Whether every floating-point value of ``params`` is finite (no NaN, no infinity)."""
    return all(_all_finite(a) for a in params.values() if np.issubdtype(a.dtype, np.inexact))


def _all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite, a block at a time: no boolean temporary the size of a large model."""
    flat = array.reshape(-1)
    return all(bool(np.isfinite(flat[start : start + _BLOCK]).all()) for start in range(0, flat.size, _BLOCK))
