"""``Params``: a model's state as an ordered mapping from name to NumPy array."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError
from fedloom.core.wireformat import params_parts

__all__ = ["Params"]


class Params(Mapping[str, npt.NDArray[np.generic]]):
    """An immutable, ordered mapping from parameter name to NumPy array.

    The arrays are copied on construction and marked read-only, so a ``Params`` can be shared between the
    server loop, a strategy's state and a checkpoint without anyone changing it behind another's back.
    Order matters: it is the order of the wire encoding and therefore of :meth:`sha256`.

    ``copy=False`` takes NumPy arrays that are already C-contiguous and aligned as read-only views instead of
    copying them (anything else is still copied): for code that owns arrays nobody else will change, such as the decoder
    reading a received message, where copying a large model costs time and memory. The caller promises that
    the memory under them does not change afterwards.

    >>> p = Params({"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)})
    >>> list(p), p.num_values
    (['w', 'b'], 6)
    """

    __slots__ = ("_arrays",)

    def __init__(self, arrays: Mapping[str, npt.ArrayLike], *, copy: bool = True) -> None:
        frozen: dict[str, npt.NDArray[np.generic]] = {}
        for name, value in arrays.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"parameter names must be non-empty strings, got {name!r}")
            if not copy and isinstance(value, np.ndarray) and value.flags.c_contiguous and value.flags.aligned:
                array = value.view()  # a view of its own, so that freezing it leaves the caller's array alone
            else:
                array = np.array(value, copy=True, order="C")
            if array.dtype == object:
                raise ConfigError(f"parameter {name!r} has dtype object; only numeric arrays are allowed")
            array.flags.writeable = False
            frozen[name] = array
        self._arrays = frozen

    def __getitem__(self, name: str) -> npt.NDArray[np.generic]:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._arrays.items())
        return f"Params({{{inner}}})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        return list(self) == list(other) and all(
            self[k].dtype == other[k].dtype and np.array_equal(self[k], other[k]) for k in self
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def num_values(self) -> int:
        """Total number of scalar values over all arrays."""
        return int(sum(a.size for a in self._arrays.values()))

    @property
    def nbytes(self) -> int:
        """Total size of the arrays' data in bytes."""
        return int(sum(a.nbytes for a in self._arrays.values()))

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical encoding (see :func:`fedloom.core.codec.encode_params`), hashed part by
        part, without joining the arrays' bytes into one copy."""
        digest = hashlib.sha256()
        for part in params_parts(self):
            digest.update(part)
        return digest.hexdigest()
