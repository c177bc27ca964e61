"""A strategy's state as named arrays, so that a checkpoint holds all of it and a resumed run goes on exactly.

FedAvg's state is its global model, but FedAdam's also holds the server optimizer's moments, SCAFFOLD's the
server control variate, IFCA's k models. :func:`snapshot` flattens a state (a dataclass whose fields are
``Params``, tuples of ``Params``, numbers or tuples of numbers) into one :class:`Snapshot`; :func:`restore`
puts it back into a state built by ``strategy.init``. The field that holds the global model itself (what the
round's checkpoint holds already) is not stored twice.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fedloom.core.errors import RunStoreError
from fedloom.core.params import Params

__all__ = ["Snapshot", "restore", "snapshot"]

S = TypeVar("S")

_ITEM = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)(?:\.(?P<index>\d+))?(?:/(?P<name>.+))?$")


@dataclass(frozen=True)
class Snapshot:
    """A strategy state's arrays (``field/name`` for a ``Params`` field, ``field.i/name`` for the ``i``-th of a
    tuple of them, ``field`` for a number or a tuple of numbers), and which field is the global model, kept in
    the round's checkpoint instead (``held``)."""

    arrays: Params
    held: str | None = None


def snapshot(state: Any, global_params: Params) -> Snapshot | None:
    """``state`` as arrays, leaving out the field that *is* ``global_params``; ``None`` for a state this cannot
    flatten (not a dataclass, or a field of another kind), whose run resumes from ``strategy.init`` alone."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return None
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    held = None
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if value is global_params and held is None:
            held = f.name
        elif isinstance(value, Params):
            arrays.update({f"{f.name}/{n}": a for n, a in value.items()})
        elif _numbers(value):
            arrays[f.name] = np.asarray(value)
        elif isinstance(value, tuple) and all(isinstance(v, Params) for v in value):
            for i, params in enumerate(value):
                arrays.update({f"{f.name}.{i}/{n}": a for n, a in params.items()})
                arrays[f"{f.name}.{i}"] = np.zeros(0)  # marks the i-th entry, which may be empty
        else:
            return None
    return Snapshot(Params(arrays, copy=False), held)


def restore(template: S, saved: Snapshot, global_params: Params) -> S:
    """``template`` (``strategy.init(global_params)``) with every field as ``saved`` holds it. Raises
    :class:`RunStoreError` when ``saved`` does not fit the template (another strategy made it)."""
    if not dataclasses.is_dataclass(template) or isinstance(template, type):
        raise RunStoreError(f"a saved strategy state cannot be restored into a {type(template).__name__}")
    groups: dict[str, dict[int | None, dict[str, np.ndarray[Any, Any]]]] = {}
    for key, array in saved.arrays.items():
        match = _ITEM.match(key)
        if match is None:
            raise RunStoreError(f"the saved strategy state has an array named {key!r}, which no state field makes")
        index = match["index"]
        entry = groups.setdefault(match["field"], {}).setdefault(int(index) if index is not None else None, {})
        if match["name"] is not None:
            entry[match["name"]] = array
        elif index is None:
            entry[""] = array
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(template):
        current = getattr(template, f.name)
        found = groups.pop(f.name, {})
        if f.name == saved.held:
            changes[f.name] = global_params
        elif isinstance(current, Params):
            changes[f.name] = Params(found.get(None, {}), copy=False)
        elif _numbers(current):
            if "" not in found.get(None, {}):
                raise RunStoreError(f"the saved strategy state has no value for {f.name!r}")
            changes[f.name] = _as_numbers(found[None][""], current)
        elif isinstance(current, tuple) and all(isinstance(v, Params) for v in current):
            changes[f.name] = tuple(Params(found[i], copy=False) for i in sorted(i for i in found if i is not None))
        else:
            raise RunStoreError(f"the strategy state's field {f.name!r} cannot be restored")
    if groups:
        raise RunStoreError(f"the saved strategy state has fields this strategy does not: {', '.join(sorted(groups))}")
    return dataclasses.replace(template, **changes)


def _numbers(value: Any) -> bool:
    number = (int, float, np.integer, np.floating)
    if isinstance(value, bool):
        return False
    if isinstance(value, tuple):
        return all(isinstance(v, number) and not isinstance(v, bool) for v in value)
    return isinstance(value, number)


def _as_numbers(array: np.ndarray[Any, Any], like: Any) -> Any:
    if isinstance(like, tuple):
        return tuple(int(v) if np.issubdtype(array.dtype, np.integer) else float(v) for v in array.reshape(-1))
    return int(array) if isinstance(like, (int, np.integer)) else float(array)
