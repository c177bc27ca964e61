"""The wire encoding of ``Params`` and ``Message`` (format version 1).

A protobuf ``Envelope`` (see ``wire.proto``) holds the message kind, the arrays as raw little-endian bytes
with an explicit dtype and shape, and the metadata as JSON. Nothing is ever unpickled: the decoder accepts
only the dtypes in :data:`ALLOWED_DTYPES`, checks that every array's byte count matches its shape, and
refuses any other version. The encoding is deterministic, so :meth:`Params.sha256` of equal params is equal.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from fedloom.core import wire_pb2
from fedloom.core.errors import DecodeError
from fedloom.core.message import Message
from fedloom.core.params import Params

__all__ = [
    "ALLOWED_DTYPES",
    "WIRE_VERSION",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "encoded_size",
]

WIRE_VERSION = 1

#: dtypes that may cross the wire, in their little-endian numpy spelling.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"})

_PARAMS_KIND = "params"


def _tensor(name: str, array: np.ndarray[Any, Any]) -> wire_pb2.Tensor:
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    dtype = little.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise DecodeError(f"array {name!r} has dtype {array.dtype}, which fedloom does not send")
    return wire_pb2.Tensor(name=name, dtype=dtype, shape=list(little.shape), data=little.tobytes(order="C"))


def _array(tensor: wire_pb2.Tensor) -> np.ndarray[Any, Any]:
    if tensor.dtype not in ALLOWED_DTYPES:
        raise DecodeError(f"array {tensor.name!r} has unsupported dtype {tensor.dtype!r}")
    dtype = np.dtype(tensor.dtype)
    count = math.prod(tensor.shape)
    if count * dtype.itemsize != len(tensor.data):
        raise DecodeError(
            f"array {tensor.name!r}: shape {list(tensor.shape)} of {tensor.dtype} needs "
            f"{count * dtype.itemsize} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def _envelope(kind: str, params: Params, metadata_json: str) -> bytes:
    envelope = wire_pb2.Envelope(
        version=WIRE_VERSION,
        kind=kind,
        tensors=[_tensor(name, array) for name, array in params.items()],
        metadata_json=metadata_json,
    )
    encoded: bytes = envelope.SerializeToString(deterministic=True)
    return encoded


def _open(data: bytes) -> tuple[str, Params, str]:
    envelope = wire_pb2.Envelope()
    try:
        envelope.ParseFromString(data)
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"not a fedloom message: {exc}") from None
    if envelope.version != WIRE_VERSION:
        raise DecodeError(
            f"wire format version {envelope.version} is not supported (this fedloom speaks {WIRE_VERSION}); "
            "upgrade the older side"
        )
    names = [t.name for t in envelope.tensors]
    if len(set(names)) != len(names):
        raise DecodeError("message repeats an array name")
    try:
        params = Params({t.name: _array(t) for t in envelope.tensors})
    except ValueError as exc:  # e.g. an empty name
        raise DecodeError(str(exc)) from None
    return envelope.kind, params, envelope.metadata_json


def encode_params(params: Params) -> bytes:
    """Encode ``params`` alone; this is the canonical encoding that :meth:`Params.sha256` hashes."""
    return _envelope(_PARAMS_KIND, params, "")


def decode_params(data: bytes) -> Params:
    """Decode bytes made by :func:`encode_params`. Raises :class:`DecodeError` on anything else."""
    kind, params, _ = _open(data)
    if kind != _PARAMS_KIND:
        raise DecodeError(f"expected encoded params, got a {kind!r} message")
    return params


def _metadata_json(message: Message) -> str:
    return json.dumps(dict(message.metadata), sort_keys=True, separators=(",", ":"), allow_nan=True)


def encode_message(message: Message) -> bytes:
    """Encode a ``Message``; metadata is written as compact JSON with sorted keys."""
    return _envelope(message.kind, message.params, _metadata_json(message))


# Encoded sizes of messages with empty metadata, by kind and array layout (names, dtypes, shapes).
_BARE_SIZES: dict[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], int] = {}
_BARE_SIZES_KEPT = 64


def encoded_size(message: Message) -> int:
    """``len(encode_message(message))``, without encoding the arrays of every message.

    The envelope is a sequence of independent protobuf fields, so a message's size is that of the same message
    with metadata ``{}`` plus how much longer its metadata's JSON text is (a length-delimited field: the text
    and its varint length). The first part depends only on the kind and the arrays' names, dtypes and shapes,
    so it is encoded once per model layout. A simulation backend that hands messages over in memory uses this
    to report the bytes a real deployment would move.
    """
    layout = tuple((name, array.dtype.str, array.shape) for name, array in message.params.items())
    key = (message.kind, layout)
    bare = _BARE_SIZES.get(key)
    if bare is None:
        bare = len(encode_message(Message(message.kind, message.params)))
        if len(_BARE_SIZES) < _BARE_SIZES_KEPT:
            _BARE_SIZES[key] = bare
    text = len(_metadata_json(message))  # ASCII only (ensure_ascii), so characters are bytes
    return bare + _varint_size(text) + text - (_varint_size(2) + 2)  # "{}" is 2 bytes long


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def decode_message(data: bytes) -> Message:
    """Decode bytes made by :func:`encode_message`. Raises :class:`DecodeError` on anything malformed."""
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
