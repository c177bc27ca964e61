"""The wire format (version 2) of a message, for any named arrays: what :mod:`fedloom.core.codec` writes a
``Params`` or a ``Message`` in, and what :meth:`~fedloom.core.params.Params.sha256` hashes.

An encoded message is a fixed 16-byte prefix, a small protobuf header, then the arrays' raw bytes::

    b"FLWM" | format version (uint32, little-endian) | header length H (uint64, little-endian)
    | H bytes: an ``Envelope`` (see ``wire.proto``): version, kind, JSON metadata, and each array's name,
      dtype and shape, but none of its data
    | each array's bytes, C order and little-endian, in the header's order, back to back

Version 1 put the arrays' bytes inside the protobuf message, which protobuf cannot serialize or parse past
2 GiB, so a larger model could not be sent at all; it also copied every array into the message. In version 2
protobuf only ever sees the header, so nothing caps the size of a message, and :func:`parts` hands each
little-endian, C-contiguous array's own memory to the transport without copying it.

Nothing is ever unpickled: a reader accepts only the dtypes in :data:`ALLOWED_DTYPES`, checks that the arrays'
sizes (dtype times shape) add up to exactly the bytes after the header before it builds any array
(:func:`array_layout`), and refuses any other version with a clear error. The encoding is deterministic.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from fedloom.core.errors import DecodeError
from fedloom.core.wire_pb2 import Envelope, Tensor

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_HEADER_BYTES",
    "PARAMS_KIND",
    "WIRE_VERSION",
    "Buffer",
    "Part",
    "array_bytes",
    "array_layout",
    "data_offset",
    "header",
    "little_endian",
    "params_parts",
    "parts",
    "read_header",
]

WIRE_VERSION = 2

#: dtypes that may cross the wire, in their little-endian numpy spelling.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"})

#: The largest protobuf header a decoder accepts (names, dtypes, shapes and metadata; never array data), so a
#: hostile length field cannot make it allocate much.
MAX_HEADER_BYTES = 64 * 1024 * 1024

#: The kind of an encoding of params alone (no message around them).
PARAMS_KIND = "params"

_MAGIC = b"FLWM"
_PREFIX = struct.Struct("<4sIQ")  # magic, format version, header length
_MAX_DIMS = 64  # numpy's own limit (numpy 1 stops at 32 and refuses more when the array is built)
_MAX_ARRAY_BYTES = 2**63 - 1  # numpy refuses any shape whose nonzero dimensions times itemsize exceed this

#: What the decoders accept: any contiguous buffer of bytes.
Buffer: TypeAlias = bytes | bytearray | memoryview
#: One piece of an encoding: the prefix and header, or one array's bytes.
Part: TypeAlias = bytes | memoryview


def little_endian(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``array`` in little-endian byte order (itself where it already is); :class:`DecodeError` for a dtype
    that is not sent."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if little.dtype.str not in ALLOWED_DTYPES:
        raise DecodeError(f"array {name!r} has dtype {array.dtype}, which fedloom does not send")
    return little


def array_bytes(little: np.ndarray[Any, Any]) -> Part:
    """The C-order bytes of a little-endian array: its own memory where it is C-contiguous, else a copy."""
    if little.size == 0:
        return b""
    contiguous = np.ascontiguousarray(little)  # the same array when it already is
    return contiguous.data.cast("B")


def header(kind: str, arrays: list[tuple[str, np.ndarray[Any, Any]]], metadata_json: str) -> bytes:
    """The prefix and header of a message of ``kind`` holding ``arrays`` (little-endian) and metadata."""
    envelope = Envelope(
        version=WIRE_VERSION,
        kind=kind,
        tensors=[Tensor(name=name, dtype=a.dtype.str, shape=list(a.shape)) for name, a in arrays],
        metadata_json=metadata_json,
    )
    encoded: bytes = envelope.SerializeToString(deterministic=True)
    if len(encoded) > MAX_HEADER_BYTES:
        raise DecodeError(
            f"message header is {len(encoded)} bytes, over the {MAX_HEADER_BYTES} a decoder accepts "
            "(too much metadata, or too many arrays)"
        )
    return _PREFIX.pack(_MAGIC, WIRE_VERSION, len(encoded)) + encoded


def parts(kind: str, arrays: Mapping[str, np.ndarray[Any, Any]], metadata_json: str) -> tuple[Part, ...]:
    """A message of ``kind`` in pieces, without copying the arrays: the prefix and header, then one part per
    array (see :func:`fedloom.core.codec.message_parts`)."""
    little = [(name, little_endian(name, array)) for name, array in arrays.items()]
    return (header(kind, little, metadata_json), *(array_bytes(a) for _, a in little))


def params_parts(arrays: Mapping[str, np.ndarray[Any, Any]]) -> tuple[Part, ...]:
    """The canonical encoding of named arrays alone, in pieces: what ``Params.sha256`` hashes."""
    return parts(PARAMS_KIND, arrays, "")


def data_offset(head: Buffer) -> int | None:
    """Where the first array's bytes start in the message that begins with ``head`` (at least its 16-byte
    prefix), or ``None`` if ``head`` does not begin a message of this format. A receiver that places that offset
    on a 16-byte boundary of its buffer gets arrays that :func:`~fedloom.core.codec.decode_message` can use in
    place."""
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


def read_header(view: memoryview) -> tuple[Envelope, int]:
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
    envelope = Envelope()
    try:
        envelope.ParseFromString(view[_PREFIX.size : start])
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"not a fedloom message: its header does not parse: {exc}") from None
    if envelope.version != WIRE_VERSION:
        raise DecodeError(f"message header says wire format version {envelope.version}, its prefix {WIRE_VERSION}")
    return envelope, start


def array_layout(tensors: list[Tensor], available: int) -> list[tuple[str, np.dtype[Any], tuple[int, ...]]]:
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
