"""The fleet stream's frames (see ``fleet.proto``), and the chunked transport of encoded fedloom messages.

A fedloom message (the bytes of :func:`fedloom.core.codec.encode_message`) crosses the stream as a run of
``Chunk`` frames, so no single gRPC frame is ever large and no message size is capped by gRPC's 2 GiB limit.
:func:`split_message` cuts a message into :class:`Chunk` s; a :class:`Reassembler` puts them back together and
refuses, with a :class:`~fedloom.core.errors.DecodeError` and before reading any of it, a message whose
declared size is over its limit, as well as chunks out of order, repeated, interleaved with another message,
or without a size.

:data:`CLIENT_FRAMES` and :data:`SERVER_FRAMES` turn frames into bytes and back, for gRPC (its serializer and
deserializer). Control frames (``Hello``, ``Welcome``, ``Notice``...) go through protobuf as usual. A chunk
frame is written here, as the exact bytes protobuf would write for it, but in one copy of the chunk's data
straight from the model's memory, and it is read here without protobuf copying the data twice more: a model
crosses the stream in 1 MiB chunks, and every pass over its bytes costs time (see ``benchmarks/RESULTS.md``).
Anything that is not a chunk in the layout written here (other field order, unknown fields...) is parsed by
protobuf, so any conforming protobuf writer can talk to fedloom.

>>> chunks = list(split_message(7, b"hello world", chunk_size=4))
>>> reassembler = Reassembler(max_message_bytes=1024)
>>> message_id, data = [reassembler.feed(c) for c in chunks][-1]
>>> message_id, bytes(data)
(7, b'hello world')
>>> CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(chunks[0])) == chunks[0]
True
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError as _ProtobufDecodeError
from google.protobuf.message import Message as _ProtobufMessage

from fedloom.core.errors import DecodeError
from fedloom.core.wireformat import data_offset
from fedloom.runtime.net import fleet_pb2

__all__ = [
    "CLIENT_FRAMES",
    "BufferPool",
    "CONNECT_METHOD",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GRPC_FRAME_LIMIT",
    "MAX_CHUNK_SIZE",
    "PROTOCOL_VERSION",
    "SERVER_FRAMES",
    "SERVICE",
    "Chunk",
    "FrameCodec",
    "Malformed",
    "Reassembler",
    "check_protocol_version",
    "split_message",
    "waiting",
]

#: The service and the full name of its one method (``fleet.proto``), as gRPC addresses them.
SERVICE = "fedloom.fleet.v1.Fleet"
CONNECT_METHOD = f"/{SERVICE}/Connect"

#: The fleet protocol version this fedloom speaks (``Hello.protocol_version``, ``Welcome.protocol_version``).
#: Both ends must speak the same one. 3 added ``Ping``/``Pong`` and ``Hello.train_examples``: a version 2 client
#: would end its session on the server's first ``Ping``, so it is refused at its ``Hello`` instead. 4 added
#: ``Hello.job_digest`` and ``Welcome.job_digest``: a version 3 client names no job, and would join unchecked.
PROTOCOL_VERSION = 4

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: small enough to interleave streams, large enough to cost little per byte
MAX_CHUNK_SIZE = 4 << 20
#: What gRPC may receive in one frame: the largest chunk plus the frame's own fields.
GRPC_FRAME_LIMIT = MAX_CHUNK_SIZE + (64 << 10)
DEFAULT_MAX_MESSAGE_BYTES = 4 << 30  # 4 GiB; a deployment sets its own limit

Buffer = bytes | bytearray | memoryview
_ALIGN = 16  # what malloc guarantees for the buffer's start, and enough for any dtype fedloom sends
_F = TypeVar("_F")


def check_protocol_version(version: int, peer: str) -> None:
    """Raise :class:`DecodeError` unless ``version`` (what ``peer`` says it speaks) is :data:`PROTOCOL_VERSION`."""
    if version != PROTOCOL_VERSION:
        raise DecodeError(
            f"{peer} speaks fleet protocol version {version}, this fedloom speaks {PROTOCOL_VERSION}; "
            "run the same fedloom version on the server and its clients"
        )


@dataclass(frozen=True)
class Chunk:
    """One ``Chunk`` frame: a slice of message ``message_id`` (see ``fleet.proto``). ``data`` may be a view of
    the message's or the received frame's memory; it is read, never kept, by the :class:`Reassembler`."""

    message_id: int
    index: int
    last: bool
    data: Buffer
    total_size: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        return (self.message_id, self.index, self.last, self.total_size, bytes(self.data)) == (
            other.message_id,
            other.index,
            other.last,
            other.total_size,
            bytes(other.data),
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Malformed:
    """Bytes received as a frame that are not one; the stream's reader refuses them with ``reason``."""

    reason: str


def waiting(frames: queue.Queue[_F]) -> Iterator[_F]:
    """The frames in ``frames`` now, taken out in order, without waiting for more.

    A stream sends a ``Ping`` or ``Pong`` from such a queue between the chunks of a message and whenever it is
    idle: an answer must come within seconds, and a model may take minutes to cross the stream."""
    while True:
        try:
            yield frames.get_nowait()
        except queue.Empty:
            return


def split_message(
    message_id: int, data: Buffer | Sequence[Buffer], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[Chunk]:
    """The chunks of one encoded message, made as they are asked for: at most ``chunk_size`` bytes each (an
    empty message is one empty chunk), numbered from 0, the first carrying the total size and the last
    flagged ``last``.

    ``data`` is the message's bytes, or its parts in order (:func:`fedloom.core.codec.message_parts`: a header
    and each array's own buffer). A chunk's data is a view of that memory, not a copy, except for a chunk that
    straddles two parts (at most one per part). Raises ``ValueError`` for a ``chunk_size`` outside
    ``[1, MAX_CHUNK_SIZE]`` (a programming error; the command line checks the user's value first).
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {chunk_size}")
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(view.nbytes for view in views)
    count = max(1, -(-total // chunk_size))
    for index, piece in enumerate(_pieces(views, chunk_size, total)):
        yield Chunk(message_id, index, index == count - 1, piece, total if index == 0 else 0)


def _pieces(views: Sequence[memoryview], size: int, total: int) -> Iterator[Buffer]:
    """The concatenation of ``views`` in pieces of ``size`` bytes (the last one shorter; one empty piece for
    nothing at all): slices of the views, joined only where a piece spans two of them."""
    pending: list[memoryview] = []  # the start of a piece, from the end of earlier views
    pending_size = 0
    for view in views:
        at = 0
        if pending:
            take = min(size - pending_size, view.nbytes)
            pending.append(view[:take])
            pending_size += take
            at = take
            if pending_size < size:
                continue
            yield b"".join(pending)
            pending, pending_size = [], 0
        while view.nbytes - at >= size:
            yield view[at : at + size]
            at += size
        if at < view.nbytes:
            pending, pending_size = [view[at:]], view.nbytes - at
    if pending or total == 0:
        yield b"".join(pending)


# -- the protobuf encoding of a chunk frame, by hand ----------------------------------------------------------
# A frame is a message with one field set: the chunk (field ``chunk_field``, length-delimited) whose fields are
# message_id (1, varint), index (2, varint), last (3, varint), data (4, length-delimited) and total_size
# (5, varint). Protobuf writes fields in number order and leaves out those at their default (0, false, empty).

_VARINT, _LENGTH_DELIMITED = 0, 2
_CHUNK_FIELDS = {1: "message_id", 2: "index", 3: "last", 4: "data", 5: "total_size"}
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """The varint at ``raw[at:]`` and the offset after it; ``ValueError`` if it is cut off or over 10 bytes."""
    value = shift = 0
    for end in range(at, min(at + 10, len(raw))):
        byte = raw[end]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, end + 1
        shift += 7
    raise ValueError("bad varint")


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


_T = TypeVar("_T", bound=_ProtobufMessage)


class FrameCodec(Generic[_T]):
    """Frames of one direction (``frame_type``: ``ClientFrame`` or ``ServerFrame``, whose ``chunk`` field is
    number ``chunk_field``) to bytes and back, as gRPC's serializer and deserializer."""

    def __init__(self, frame_type: type[_T], chunk_field: int) -> None:
        self._type = frame_type
        self._frame_tag = _tag(chunk_field, _LENGTH_DELIMITED)

    def serialize(self, frame: _T | Chunk) -> bytes:
        """The bytes of ``frame`` on the wire: those protobuf would write, for a :class:`Chunk` as for the rest."""
        if not isinstance(frame, Chunk):
            data: bytes = frame.SerializeToString()
            return data
        head = bytearray()
        if frame.message_id:
            head += b"\x08" + _varint(frame.message_id)
        if frame.index:
            head += b"\x10" + _varint(frame.index)
        if frame.last:
            head += b"\x18\x01"
        size = memoryview(frame.data).nbytes
        if size:
            head += b"\x22" + _varint(size)
        tail = b"\x28" + _varint(frame.total_size) if frame.total_size else b""
        inner = len(head) + size + len(tail)
        return b"".join((self._frame_tag, _varint(inner), head, frame.data, tail))

    def parse(self, raw: bytes) -> _T | Chunk | Malformed:
        """A received frame: a :class:`Chunk` (its data a view of ``raw``) for a chunk frame, the protobuf
        message for any other frame, :class:`Malformed` for bytes that are not a frame."""
        chunk = self._chunk(raw)
        if chunk is not None:
            return chunk
        frame: _T = self._type()
        try:
            frame.ParseFromString(raw)
        except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
            return Malformed(f"a frame that does not parse ({len(raw)} bytes): {exc}")
        if frame.WhichOneof("frame") == "chunk":  # a chunk written in another layout than ours: still a chunk
            c: fleet_pb2.Chunk = getattr(frame, "chunk")  # noqa: B009 (the frame type is generic here)
            return Chunk(c.message_id, c.index, c.last, c.data, c.total_size)
        return frame

    def _chunk(self, raw: bytes) -> Chunk | None:
        """``raw`` read as a chunk frame if it is one with each field at most once and no other field, else
        ``None`` (then protobuf reads it). What it returns is exactly what protobuf would read."""
        tag = self._frame_tag
        if raw[: len(tag)] != tag:
            return None
        try:
            inner, at = _read_varint(raw, len(tag))
            if at + inner != len(raw):
                return None
            fields: dict[str, int | memoryview] = {}
            while at < len(raw):
                key, at = _read_varint(raw, at)
                name = _CHUNK_FIELDS.get(key >> 3)
                wire_type = key & 7
                if name is None or name in fields or wire_type != (_LENGTH_DELIMITED if name == "data" else _VARINT):
                    return None
                value, at = _read_varint(raw, at)
                if name == "data":
                    if at + value > len(raw):
                        return None
                    fields[name] = memoryview(raw)[at : at + value]
                    at += value
                else:
                    fields[name] = value
        except ValueError:
            return None
        number = {k: v for k, v in fields.items() if isinstance(v, int)}
        if number.get("message_id", 0) > _UINT64_MAX or number.get("total_size", 0) > _UINT64_MAX:
            return None
        if number.get("index", 0) > _UINT32_MAX or number.get("last", 0) > 1:
            return None  # protobuf truncates or coerces these; leave such odd frames to it
        data = fields.get("data", memoryview(b""))
        assert isinstance(data, memoryview)
        return Chunk(
            number.get("message_id", 0),
            number.get("index", 0),
            bool(number.get("last")),
            data,
            number.get("total_size", 0),
        )


#: Frames from a client to the server.
CLIENT_FRAMES = FrameCodec(fleet_pb2.ClientFrame, chunk_field=2)
#: Frames from the server to a client.
SERVER_FRAMES = FrameCodec(fleet_pb2.ServerFrame, chunk_field=3)


class BufferPool:
    """Receive buffers that are used again once nothing refers to them, shared by a server's streams.

    Memory the process has not touched before is expensive to fill (the kernel zeroes every new page; measured
    here, landing 100 MB in a fresh buffer took 65-300 ms, in one used before 11-15 ms), and a server receives a
    model-sized message from every client every round. :meth:`take` returns a ``uint8`` array of exactly the
    size asked for, cut from a buffer that a message before used, or a new one. When that array and every view
    of it (the decoded message's arrays) are gone, its buffer comes back here; at most ``keep`` buffers wait
    for their next use, so the pool holds at most ``keep`` times the largest message between rounds.
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        """How many buffers wait for their next use."""
        with self._lock:
            return len(self._free)

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.size >= size]
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].size)) if fitting else None
        if buffer is None:
            buffer = np.empty(size, np.uint8)
        view = buffer[:size]
        weakref.finalize(view, self._give_back, buffer)
        return view

    def _give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self._keep:  # (arrays compare element-wise: find the smallest by position)
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].size))


class Reassembler:
    """Rebuilds whole messages from the chunks of one stream, one message at a time.

    :meth:`feed` returns ``(message_id, data)`` when a chunk completes a message and ``None`` otherwise;
    ``data`` is a read-only view of a buffer that only it refers to, in which a fedloom message's arrays start on
    a 16-byte boundary, so :func:`fedloom.core.codec.decode_message` can use them without copying. It raises
    :class:`DecodeError` (and forgets the partial message) when chunk 0 declares more than
    ``max_message_bytes`` (checked before anything is buffered), when the chunks would exceed the declared size
    or end short of it, or when a chunk is out of order, repeated, or belongs to another message while one is
    still open. The buffer grows with the bytes actually received, never with what a peer declares; with
    ``buffers`` (a :class:`BufferPool`) it is taken from the pool at the declared size instead, for a receiver
    that has checked that size already (the server, which asks for a reply after its sender offered it at that
    size).
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, buffers: BufferPool | None = None) -> None:
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        self._max = max_message_bytes
        self._pool = buffers
        self._pooled: np.ndarray | None = None  # the pool's buffer for the message in progress
        self._filled = 0
        self._message_id: int | None = None
        self._next_index = 0
        self._declared = 0
        self._pad = 0  # bytes before the message in the buffer, to align its arrays
        self._buffer = bytearray()

    @property
    def in_progress(self) -> bool:
        """Whether a message has started and not yet ended."""
        return self._message_id is not None

    @property
    def buffered(self) -> int:
        """The bytes of the message in progress held so far."""
        return self._filled if self._pooled is not None else len(self._buffer) - self._pad

    def feed(self, chunk: Chunk) -> tuple[int, memoryview] | None:
        try:
            return self._feed(chunk)
        except DecodeError:
            self._reset()
            raise

    def _feed(self, chunk: Chunk) -> tuple[int, memoryview] | None:
        if self._message_id is None:
            if chunk.index != 0:
                raise DecodeError(f"message {chunk.message_id} starts at chunk {chunk.index}, not 0")
            if chunk.total_size > self._max:
                raise DecodeError(
                    f"message {chunk.message_id} is {chunk.total_size} bytes, over the limit of {self._max} bytes"
                )
            self._message_id = chunk.message_id
            self._declared = chunk.total_size
            offset = data_offset(chunk.data)  # from the message's prefix, which chunk 0 begins with
            self._pad = 0 if offset is None else -offset % _ALIGN
            if self._pool is not None:
                self._pooled = self._pool.take(self._pad + self._declared)
                self._filled = 0
            else:
                self._buffer = bytearray(self._pad)
        elif chunk.message_id != self._message_id:
            raise DecodeError(f"chunk of message {chunk.message_id} arrived inside message {self._message_id}")
        elif chunk.index != self._next_index:
            raise DecodeError(
                f"message {chunk.message_id}: chunk {chunk.index} arrived where chunk {self._next_index} was due"
            )
        elif chunk.total_size:
            raise DecodeError(f"message {chunk.message_id}: chunk {chunk.index} declares a size again")
        size = memoryview(chunk.data).nbytes
        if self.buffered + size > self._declared:
            raise DecodeError(f"message {chunk.message_id} is longer than the {self._declared} bytes it declared")
        if self._pooled is not None:
            start = self._pad + self._filled
            self._pooled[start : start + size] = np.frombuffer(chunk.data, np.uint8)
            self._filled += size
        else:
            self._buffer += chunk.data
        self._next_index += 1
        if not chunk.last:
            return None
        if self.buffered != self._declared:
            raise DecodeError(
                f"message {chunk.message_id} ended after {self.buffered} of the {self._declared} bytes it declared"
            )
        whole = memoryview(self._buffer) if self._pooled is None else self._pooled.data
        done = (chunk.message_id, whole[self._pad :].toreadonly())  # the next message: a new buffer
        del whole
        self._reset()
        return done

    def _reset(self) -> None:
        self._message_id = None
        self._next_index = 0
        self._declared = 0
        self._pad = 0
        self._buffer = bytearray()
        self._pooled = None
        self._filled = 0
