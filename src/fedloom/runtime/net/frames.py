"""Chunked transport of encoded fedloom messages over the fleet stream (see ``fleet.proto``).

A fedloom message (the bytes of :func:`fedloom.core.codec.encode_message`) crosses the stream as a run of
``Chunk`` frames, so no single gRPC frame is ever large and no message size is capped by gRPC's 2 GiB limit.
:func:`split_message` makes the chunks; a :class:`Reassembler` puts them back together and refuses, with a
:class:`~fedloom.core.errors.DecodeError` and before reading any of it, a message whose declared size is over
its limit, as well as chunks out of order, repeated, interleaved with another message, or without a size.

>>> chunks = list(split_message(7, b"hello world", chunk_size=4))
>>> reassembler = Reassembler(max_message_bytes=1024)
>>> [reassembler.feed(c) for c in chunks][-1]
(7, bytearray(b'hello world'))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


Buffer = bytes | bytearray | memoryview


def split_message(
    message_id: int, data: Buffer | Sequence[Buffer], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[fleet_pb2.Chunk]:
    """The chunks of one encoded message, made as they are asked for: at most ``chunk_size`` bytes each (an
    empty message is one empty chunk), numbered from 0, the first carrying the total size and the last
    flagged ``last``.

    ``data`` is the message's bytes, or its parts in order (:func:`fedloom.core.codec.message_parts`: a header
    and each array's own buffer), so a large model is sent without ever being copied whole. Raises
    ``ValueError`` for a ``chunk_size`` outside ``[1, MAX_CHUNK_SIZE]`` (a programming error; the command line
    checks the user's value first).
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {chunk_size}")
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(view.nbytes for view in views)
    count = max(1, -(-total // chunk_size))
    for index, piece in enumerate(_pieces(views, chunk_size, total)):
        yield fleet_pb2.Chunk(
            message_id=message_id,
            index=index,
            last=index == count - 1,
            data=piece,
            total_size=total if index == 0 else 0,
        )


def _pieces(views: Sequence[memoryview], size: int, total: int) -> Iterator[bytes]:
    """The concatenation of ``views`` in pieces of ``size`` bytes (the last one shorter; one empty piece for
    nothing at all), copying only one piece at a time."""
    piece = bytearray()
    for view in views:
        at = 0
        while at < view.nbytes:
            take = min(size - len(piece), view.nbytes - at)
            piece += view[at : at + take]
            at += take
            if len(piece) == size:
                yield bytes(piece)
                piece.clear()
    if piece or total == 0:
        yield bytes(piece)


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

    def feed(self, chunk: fleet_pb2.Chunk) -> tuple[int, bytearray] | None:
        try:
            return self._feed(chunk)
        except DecodeError:
            self._reset()
            raise

    def _feed(self, chunk: fleet_pb2.Chunk) -> tuple[int, bytearray] | None:
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
        done = (chunk.message_id, self._buffer)  # handed over, not copied: the next message starts a new buffer
        self._reset()
        return done

    def _reset(self) -> None:
        self._message_id = None
        self._next_index = 0
        self._declared = 0
        self._buffer = bytearray()
