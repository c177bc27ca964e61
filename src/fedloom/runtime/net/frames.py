"""Chunked transport of encoded fedloom messages over the fleet stream (see ``fleet.proto``).

A fedloom message (the bytes of :func:`fedloom.core.codec.encode_message`) crosses the stream as a run of
``Chunk`` frames, so no single gRPC frame is ever large and no message size is capped by gRPC's 2 GiB limit.
:func:`split_message` makes the chunks; a :class:`Reassembler` puts them back together and refuses, with a
:class:`~fedloom.core.errors.DecodeError` and before reading any of it, a message whose declared size is over
its limit, as well as chunks out of order, repeated, interleaved with another message, or without a size.

>>> chunks = list(split_message(7, b"hello world", chunk_size=4))
>>> reassembler = Reassembler(max_message_bytes=1024)
>>> [reassembler.feed(c) for c in chunks][-1]
(7, b'hello world')
"""

from __future__ import annotations

from collections.abc import Iterator

from fedloom.core.errors import DecodeError
from fedloom.runtime.net import fleet_pb2

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GRPC_FRAME_LIMIT",
    "MAX_CHUNK_SIZE",
    "PROTOCOL_VERSION",
    "Reassembler",
    "check_protocol_version",
    "split_message",
]

#: The fleet protocol version this fedloom speaks (``Hello.protocol_version``, ``Welcome.protocol_version``).
PROTOCOL_VERSION = 1

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: small enough to interleave streams, large enough to cost little per byte
MAX_CHUNK_SIZE = 4 << 20
#: What gRPC may receive in one frame: the largest chunk plus the frame's own fields.
GRPC_FRAME_LIMIT = MAX_CHUNK_SIZE + (64 << 10)
DEFAULT_MAX_MESSAGE_BYTES = 4 << 30  # 4 GiB; a deployment sets its own limit


def check_protocol_version(version: int, peer: str) -> None:
    """Raise :class:`DecodeError` unless ``version`` (what ``peer`` says it speaks) is :data:`PROTOCOL_VERSION`."""
    if version != PROTOCOL_VERSION:
        raise DecodeError(
            f"{peer} speaks fleet protocol version {version}, this fedloom speaks {PROTOCOL_VERSION}; "
            "run the same fedloom version on the server and its clients"
        )


def split_message(message_id: int, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[fleet_pb2.Chunk]:
    """The chunks of one encoded message, in order: at most ``chunk_size`` bytes each (an empty message is one
    empty chunk), numbered from 0, the first carrying the total size and the last flagged ``last``.

    Raises ``ValueError`` for a ``chunk_size`` outside ``[1, MAX_CHUNK_SIZE]`` (a programming error; the
    command line checks the user's value first).
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {chunk_size}")
    view = memoryview(data)
    count = max(1, -(-len(data) // chunk_size))
    for index in range(count):
        yield fleet_pb2.Chunk(
            message_id=message_id,
            index=index,
            last=index == count - 1,
            data=bytes(view[index * chunk_size : (index + 1) * chunk_size]),
            total_size=len(data) if index == 0 else 0,
        )


class Reassembler:
    """Rebuilds whole messages from the chunks of one stream, one message at a time.

    :meth:`feed` returns ``(message_id, data)`` when a chunk completes a message and ``None`` otherwise. It
    raises :class:`DecodeError` (and forgets the partial message) when chunk 0 declares more than
    ``max_message_bytes`` (checked before anything is buffered), when the chunks would exceed the declared
    size or end short of it, or when a chunk is out of order, repeated, or belongs to another message while
    one is still open. The buffer grows with the bytes actually received, never with what a peer declares.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        self._max = max_message_bytes
        self._message_id: int | None = None
        self._next_index = 0
        self._declared = 0
        self._buffer = bytearray()

    @property
    def in_progress(self) -> bool:
        """Whether a message has started and not yet ended."""
        return self._message_id is not None

    def feed(self, chunk: fleet_pb2.Chunk) -> tuple[int, bytes] | None:
        try:
            return self._feed(chunk)
        except DecodeError:
            self._reset()
            raise

    def _feed(self, chunk: fleet_pb2.Chunk) -> tuple[int, bytes] | None:
        if self._message_id is None:
            if chunk.index != 0:
                raise DecodeError(f"message {chunk.message_id} starts at chunk {chunk.index}, not 0")
            if chunk.total_size > self._max:
                raise DecodeError(
                    f"message {chunk.message_id} is {chunk.total_size} bytes, over the limit of {self._max} bytes"
                )
            self._message_id = chunk.message_id
            self._declared = chunk.total_size
        elif chunk.message_id != self._message_id:
            raise DecodeError(f"chunk of message {chunk.message_id} arrived inside message {self._message_id}")
        elif chunk.index != self._next_index:
            raise DecodeError(
                f"message {chunk.message_id}: chunk {chunk.index} arrived where chunk {self._next_index} was due"
            )
        elif chunk.total_size:
            raise DecodeError(f"message {chunk.message_id}: chunk {chunk.index} declares a size again")
        if len(self._buffer) + len(chunk.data) > self._declared:
            raise DecodeError(f"message {chunk.message_id} is longer than the {self._declared} bytes it declared")
        self._buffer += chunk.data
        self._next_index += 1
        if not chunk.last:
            return None
        if len(self._buffer) != self._declared:
            raise DecodeError(
                f"message {chunk.message_id} ended after {len(self._buffer)} of the {self._declared} bytes it declared"
            )
        done = (chunk.message_id, bytes(self._buffer))
        self._reset()
        return done

    def _reset(self) -> None:
        self._message_id = None
        self._next_index = 0
        self._declared = 0
        self._buffer = bytearray()
