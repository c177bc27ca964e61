"""Strict JSON, the kind fedloom keeps and shows (run store, summaries, the privacy ledger, the dashboard), and
the finite-number tests it rests on: JSON has no NaN and no infinity, and a metric that is not a finite number
is one that nobody can draw, compare or export.

The wire is the exception: a message's metadata may carry a NaN (a client's loss can be one, and the server
decides what to make of it), so :mod:`fedloom.core.codec` writes it with Python's own ``json``.

>>> strict_dumps({"b": 1.5, "a": [1, 2]}, sort_keys=True, compact=True)
'{"a":[1,2],"b":1.5}'
>>> strict_dumps(jsonable({"loss": float("nan")}))
'{"loss": null}'
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

from fedloom.core.errors import ConfigError

__all__ = ["finite_float", "finite_number", "jsonable", "strict_dumps"]

_COMPACT = (",", ":")


def finite_float(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (NumPy's included; not a bool, not a string), else
    ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a bool, not ``None``): what a row of the run store
    or a JSON document holds that is worth drawing or exporting. Unlike :func:`finite_float`, a NumPy scalar
    counts only where it is a ``float`` (``float64``)."""
    return isinstance(value, (int, float)) and finite_float(value) is not None


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats become ``None``; dataclasses, paths, enums, dates and
    NumPy values are converted. Raises :class:`ConfigError` for anything else that JSON cannot hold."""
    import numpy as np  # here, not at the top: listing runs (fedloom runs list) needs no numpy

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise ConfigError(f"JSON object keys must be strings, got {key!r}")
            out[str(key)] = jsonable(item)
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise ConfigError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def strict_dumps(value: Any, *, indent: int | None = None, sort_keys: bool = False, compact: bool = False) -> str:
    """``value`` (plain JSON data: see :func:`jsonable`) as strict JSON text; raises :class:`ValueError` for a
    NaN or an infinity in it. ``compact`` leaves out the spaces after ``,`` and ``:``; ``indent`` and
    ``sort_keys`` are :func:`json.dumps`'s."""
    return json.dumps(
        value, indent=indent, sort_keys=sort_keys, separators=_COMPACT if compact else None, allow_nan=False
    )
