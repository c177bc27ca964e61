"""The wire encoding of ``Params`` and ``Message``, in the format of :mod:`fedloom.core.wireformat`.

Nothing is ever unpickled: the decoders accept only what :mod:`~fedloom.core.wireformat` lays out and checks
(known dtypes, arrays that fill exactly the bytes after the header, this format's version). The encoding is
deterministic, so :meth:`Params.sha256` of equal params is equal.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np

from fedloom.core.errors import DecodeError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.wireformat import (
    PARAMS_KIND,
    Buffer,
    Part,
    array_layout,
    header,
    little_endian,
    params_parts,
    parts,
    read_header,
)

__all__ = [
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "encoded_size",
    "message_parts",
]


def encode_params(params: Params) -> bytes:
    """Encode ``params`` alone; this is the canonical encoding that :meth:`Params.sha256` hashes."""
    return b"".join(params_parts(params))


def _metadata_json(message: Message) -> str:
    return json.dumps(dict(message.metadata), sort_keys=True, separators=(",", ":"), allow_nan=True)


def message_parts(message: Message) -> tuple[Part, ...]:
    """:func:`encode_message` in pieces, without copying the arrays: their concatenation is the encoding.

    The first part is the prefix and header (``bytes``); then comes one part per array, in order: a read-only
    byte ``memoryview`` of the array's own memory where it is little-endian and C-contiguous (always so for
    ``Params`` on a little-endian machine), else of a converted copy; ``b""`` for an empty array. A transport
    can write them one after another (or cut them into chunks) instead of building one big ``bytes``.
    """
    return parts(message.kind, message.params, _metadata_json(message))


def encode_message(message: Message) -> bytes:
    """Encode a ``Message``; metadata is written as compact JSON with sorted keys."""
    return b"".join(message_parts(message))


def encoded_size(message: Message) -> int:
    """``len(encode_message(message))``, without encoding or copying the arrays.

    The prefix and header are built (they are small); the arrays add exactly their ``nbytes``. A simulation
    backend that hands messages over in memory uses this to report the bytes a real deployment would move.
    """
    arrays = [(name, little_endian(name, array)) for name, array in message.params.items()]
    return len(header(message.kind, arrays, _metadata_json(message))) + sum(a.nbytes for _, a in arrays)


def _arrays(view: memoryview) -> tuple[str, Params, str]:
    envelope, offset = read_header(view)
    layout = array_layout(list(envelope.tensors), len(view) - offset)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    try:
        for name, dtype, shape in layout:
            count = math.prod(shape)
            arrays[name] = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += count * dtype.itemsize
        params = Params(arrays, copy=not view.readonly)
    except ValueError as exc:  # an empty name; a shape this numpy cannot build
        raise DecodeError(str(exc)) from None
    return envelope.kind, params, envelope.metadata_json


def _open(data: Buffer) -> tuple[str, Params, str]:
    try:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except TypeError as exc:
        raise DecodeError(f"not a fedloom message: {exc}") from None
    try:
        return _arrays(view)
    finally:
        with contextlib.suppress(BufferError):  # the arrays are views of a read-only buffer: they keep it
            view.release()  # so that a bytearray whose arrays were copied can be resized again at once


def decode_params(data: Buffer) -> Params:
    """Decode bytes made by :func:`encode_params` (views or copies as in :func:`decode_message`). Raises
    :class:`DecodeError` on anything else."""
    kind, params, _ = _open(data)
    if kind != PARAMS_KIND:
        raise DecodeError(f"expected encoded params, got a {kind!r} message")
    return params


def decode_message(data: Buffer) -> Message:
    """Decode bytes made by :func:`encode_message` (any contiguous buffer: ``bytes``, ``bytearray``,
    ``memoryview``). Raises :class:`DecodeError` on anything malformed.

    From a read-only buffer (``bytes``, a read-only ``memoryview``) the arrays are read-only views of it, not
    copies: they keep the buffer alive, and whoever holds the memory under a read-only view must not change
    it. From a writable one they are copies, and the buffer is free again when this returns."""
    kind, params, metadata_json = _open(data)
    if not kind:
        raise DecodeError("message has no kind")
    try:
        metadata = json.loads(metadata_json) if metadata_json else {}
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, nesting too deep
        raise DecodeError(f"message metadata is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, dict):
        raise DecodeError("message metadata must be a JSON object")
    return Message(kind=kind, params=params, metadata=metadata)
