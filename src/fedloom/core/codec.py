"""The wire encoding of ``Params`` and ``Message`` (format version 2).

An encoded message is a fixed 16-byte prefix, a small protobuf header, then the arrays' raw bytes::

    b"FLWM" | format version (uint32, little-endian) | header length H (uint64, little-endian)
    | H bytes: an ``Envelope`` (see ``wire.proto``): version, kind, JSON metadata, and each array's name,
      dtype and shape, but none of its data
    | each array's bytes, C order and little-endian, in the header's order, back to back

Version 1 put the arrays' bytes inside the protobuf message, which protobuf cannot serialize or parse past
2 GiB, so a larger model could not be sent at all; it also copied every array into the message. In version 2
protobuf only ever sees the header, so nothing caps the size of a message, and :func:`message_parts` hands
each little-endian, C-contiguous array's own memory to the transport without copying it.

Nothing is ever unpickled: the decoder accepts only the dtypes in :data:`ALLOWED_DTYPES`, checks that the
arrays' sizes (dtype times shape) add up to exactly the bytes after the header before it builds any array,
and refuses any other version with a clear error. The encoding is deterministic, so :meth:`Params.sha256` of
equal params is equal.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from typing import Any, TypeAlias

import numpy as np
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from fedloom.core import wire_pb2
from fedloom.core.errors import DecodeError
from fedloom.core.message import Message
from fedloom.core.params import Params

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_HEADER_BYTES",
    "WIRE_VERSION",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "data_offset",
    "encoded_size",
    "message_parts",
    "params_parts",
]

WIRE_VERSION = 2

#: dtypes that may cross the wire, in their little-endian numpy spelling.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"})

#: The largest protobuf header a decoder accepts (names, dtypes, shapes and metadata; never array data), so a
#: hostile length field cannot make it allocate much.
MAX_HEADER_BYTES = 64 * 1024 * 1024

_MAGIC = b"FLWM"
_PREFIX = struct.Struct("<4sIQ")  # magic, format version, header length
_PARAMS_KIND = "params"
_MAX_DIMS = 64  # numpy's own limit (numpy 1 stops at 32 and refuses more when the array is built)
_MAX_ARRAY_BYTES = 2**63 - 1  # numpy refuses any shape whose nonzero dimensions times itemsize exceed this

#: What the decoders accept: any contiguous buffer of bytes.
Buffer: TypeAlias = bytes | bytearray | memoryview
#: One piece of an encoding: the prefix and header, or one array's bytes.
Part: TypeAlias = bytes | memoryview


def _little_endian(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if little.dtype.str not in ALLOWED_DTYPES:
        raise DecodeError(f"array {name!r} has dtype {array.dtype}, which fedloom does not send")
    return little


def _array_bytes(little: np.ndarray[Any, Any]) -> Part:
    """The C-order bytes of a little-endian array: its own memory where it is C-contiguous, else a copy."""
    if little.size == 0:
        return b""
    contiguous = np.ascontiguousarray(little)  # the same array when it already is
    return contiguous.data.cast("B")


def _header(kind: str, arrays: list[tuple[str, np.ndarray[Any, Any]]], metadata_json: str) -> bytes:
    envelope = wire_pb2.Envelope(
        version=WIRE_VERSION,
        kind=kind,
        tensors=[wire_pb2.Tensor(name=name, dtype=a.dtype.str, shape=list(a.shape)) for name, a in arrays],
        metadata_json=metadata_json,
    )
    header: bytes = envelope.SerializeToString(deterministic=True)
    if len(header) > MAX_HEADER_BYTES:
        raise DecodeError(
            f"message header is {len(header)} bytes, over the {MAX_HEADER_BYTES} a decoder accepts "
            "(too much metadata, or too many arrays)"
        )
    return _PREFIX.pack(_MAGIC, WIRE_VERSION, len(header)) + header


def _parts(kind: str, params: Params, metadata_json: str) -> tuple[Part, ...]:
    arrays = [(name, _little_endian(name, array)) for name, array in params.items()]
    return (_header(kind, arrays, metadata_json), *(_array_bytes(a) for _, a in arrays))


def params_parts(params: Params) -> tuple[Part, ...]:
    """:func:`encode_params` in pieces, as :func:`message_parts` cuts a message."""
    return _parts(_PARAMS_KIND, params, "")


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
    return _parts(message.kind, message.params, _metadata_json(message))


def encode_message(message: Message) -> bytes:
    """Encode a ``Message``; metadata is written as compact JSON with sorted keys."""
    return b"".join(message_parts(message))


def encoded_size(message: Message) -> int:
    """``len(encode_message(message))``, without encoding or copying the arrays.

    The prefix and header are built (they are small); the arrays add exactly their ``nbytes``. A simulation
    backend that hands messages over in memory uses this to report the bytes a real deployment would move.
    """
    arrays = [(name, _little_endian(name, array)) for name, array in message.params.items()]
    return len(_header(message.kind, arrays, _metadata_json(message))) + sum(a.nbytes for _, a in arrays)


def data_offset(head: Buffer) -> int | None:
    """Where the first array's bytes start in the message that begins with ``head`` (at least its 16-byte
    prefix), or ``None`` if ``head`` does not begin a message of this format. A receiver that places that offset
    on a 16-byte boundary of its buffer gets arrays that :func:`decode_message` can use in place."""
    view = memoryview(head).cast("B")
    if view.nbytes < _PREFIX.size:
        return None
    magic, version, header_length = _PREFIX.unpack_from(view)
    if magic != _MAGIC or version != WIRE_VERSION or header_length > MAX_HEADER_BYTES:
        return None
    return int(_PREFIX.size + header_length)


def _version_error(version: int) -> DecodeError:
    return DecodeError(
        f"wire format version {version} is not supported (this fedloom speaks {WIRE_VERSION}); upgrade the older side"
    )


def _read_header(view: memoryview) -> tuple[wire_pb2.Envelope, int]:
    """Check the prefix and parse the header; returns it and the offset of the first array's bytes."""
    magic = view[:4].tobytes()
    if len(view) < _PREFIX.size or magic != _MAGIC:
        if magic[:2] == b"\x08\x01":  # how a version 1 message (a bare Envelope, version field first) begins
            raise _version_error(1)
        if magic == _MAGIC:
            raise DecodeError(f"not a fedloom message: {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
        raise DecodeError("not a fedloom message (it does not start with b'FLWM')")
    _, version, header_length = _PREFIX.unpack_from(view)
    if version != WIRE_VERSION:
        raise _version_error(version)
    if header_length > MAX_HEADER_BYTES:
        raise DecodeError(f"message header length {header_length} is over the {MAX_HEADER_BYTES} bytes fedloom accepts")
    start = _PREFIX.size + header_length
    if start > len(view):
        raise DecodeError(
            f"message header length {header_length} points past the end of the message ({len(view)} bytes)"
        )
    envelope = wire_pb2.Envelope()
    try:
        envelope.ParseFromString(view[_PREFIX.size : start])
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"not a fedloom message: its header does not parse: {exc}") from None
    if envelope.version != WIRE_VERSION:
        raise DecodeError(f"message header says wire format version {envelope.version}, its prefix {WIRE_VERSION}")
    return envelope, start


def _layout(tensors: list[wire_pb2.Tensor], available: int) -> list[tuple[str, np.dtype[Any], tuple[int, ...]]]:
    """Check every array's name, dtype and shape, and that their sizes add up to exactly ``available``."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise DecodeError("message repeats an array name")
    layout: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []
    total = 0
    for tensor in tensors:
        if tensor.dtype not in ALLOWED_DTYPES:
            raise DecodeError(f"array {tensor.name!r} has unsupported dtype {tensor.dtype!r}")
        dtype = np.dtype(tensor.dtype)
        shape = tuple(tensor.shape)  # protobuf uint64: never negative
        if len(shape) > _MAX_DIMS:
            raise DecodeError(f"array {tensor.name!r} has {len(shape)} dimensions, more than {_MAX_DIMS}")
        # Exact integer arithmetic (Python ints do not overflow), on at most _MAX_DIMS factors.
        if math.prod(max(d, 1) for d in shape) * dtype.itemsize > _MAX_ARRAY_BYTES:
            raise DecodeError(f"array {tensor.name!r} has an impossible shape {list(shape)}")
        total += math.prod(shape) * dtype.itemsize
        layout.append((tensor.name, dtype, shape))
    if total != available:
        raise DecodeError(
            f"the arrays' shapes and dtypes need {total} bytes after the header, but the message has {available}"
        )
    return layout


def _arrays(view: memoryview) -> tuple[str, Params, str]:
    envelope, offset = _read_header(view)
    layout = _layout(list(envelope.tensors), len(view) - offset)
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
    if kind != _PARAMS_KIND:
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
