"""Chunking and reassembly of encoded messages (``fedloom.runtime.net.frames``), and client-data files."""

from __future__ import annotations

import contextlib
import queue

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import DataError, DecodeError, FedloomError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.data.base import ArrayData, ClientData
from fedloom.data.clientfile import load_client_data, save_client_data
from fedloom.runtime.net import fleet_pb2
from fedloom.runtime.net.frames import (
    CLIENT_FRAMES,
    PROTOCOL_VERSION,
    SERVER_FRAMES,
    BufferPool,
    Chunk,
    Malformed,
    Reassembler,
    check_protocol_version,
    split_message,
    waiting,
)


def _message() -> Message:
    rng = np.random.default_rng(0)
    params = Params({"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.arange(3, dtype=np.int64)})
    return Message("fit", params, {"round": 2, "config": {"lr": 0.1}})


def _reassemble(chunks, limit=1 << 20):
    reassembler = Reassembler(limit)
    results = [reassembler.feed(c) for c in chunks]
    assert all(r is None for r in results[:-1])
    return results[-1]


def test_tiny_chunks_reassemble_exactly():
    data = encode_message(_message())
    chunks = list(split_message(42, data, chunk_size=7))
    assert len(chunks) == -(-len(data) // 7)
    assert all(len(c.data) <= 7 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    message_id, whole = _reassemble(chunks)
    assert (message_id, bytes(whole)) == (42, data)
    assert decode_message(whole).params.sha256() == _message().params.sha256()


def test_chunks_survive_the_wire_and_the_reassembler_is_reusable():
    reassembler = Reassembler(1 << 20)
    for message_id, payload in [(1, b"abc" * 10), (2, b""), (3, b"x")]:
        frames = [
            CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(c)) for c in split_message(message_id, payload, chunk_size=4)
        ]
        results = [reassembler.feed(f) for f in frames]
        assert results[-1] is not None
        assert (results[-1][0], bytes(results[-1][1])) == (message_id, payload)
        assert not reassembler.in_progress


def test_chunks_are_views_of_the_parts_not_copies():
    params = Params({"w": np.arange(40, dtype=np.float32)})
    parts = encode_message(Message("fit", params)), params["w"].data.cast("B")
    chunks = list(split_message(1, parts, chunk_size=32))
    assert b"".join(bytes(c.data) for c in chunks) == b"".join(bytes(p) for p in parts)
    in_place = [c for c in chunks if isinstance(c.data, memoryview) and c.data.obj is params["w"]]
    assert len(in_place) >= 3  # all but the chunk that straddles the two parts point into the array itself


@pytest.mark.parametrize(
    ("codec", "frame_type"), [(CLIENT_FRAMES, fleet_pb2.ClientFrame), (SERVER_FRAMES, fleet_pb2.ServerFrame)]
)
@pytest.mark.parametrize(
    "chunk",
    [
        Chunk(0, 0, False, b""),
        Chunk(1, 0, False, b"abc", 3),
        Chunk(2**64 - 1, 2**32 - 1, True, b"\0" * 300, 2**64 - 1),
        Chunk(300, 5, True, memoryview(b"xyz")[1:]),
    ],
)
def test_a_chunk_frame_is_byte_for_byte_what_protobuf_writes_and_reads_back(codec, frame_type, chunk):
    raw = codec.serialize(chunk)
    pb = fleet_pb2.Chunk(
        message_id=chunk.message_id,
        index=chunk.index,
        last=chunk.last,
        data=bytes(chunk.data),
        total_size=chunk.total_size,
    )
    assert raw == frame_type(chunk=pb).SerializeToString()
    assert codec.parse(raw) == chunk
    hello = fleet_pb2.ClientFrame(hello=fleet_pb2.Hello(protocol_version=1, token="t"))
    assert CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(hello)) == hello


def test_a_chunk_in_another_field_order_is_still_read_as_a_chunk():
    # total_size first, then data, index, message_id, last: valid protobuf that fedloom does not write itself
    inner = b"\x28\x05" + b"\x22\x02hi" + b"\x10\x00" + b"\x08\x07" + b"\x18\x01"
    raw = b"\x12" + bytes([len(inner)]) + inner
    assert CLIENT_FRAMES.parse(raw) == Chunk(7, 0, True, b"hi", 5)
    assert isinstance(CLIENT_FRAMES.parse(b"\xff\xff\xff"), Malformed)


_chunk_values = st.builds(
    Chunk,
    message_id=st.integers(0, 2**64 - 1),
    index=st.integers(0, 2**32 - 1),
    last=st.booleans(),
    data=st.binary(max_size=40),
    total_size=st.integers(0, 2**64 - 1),
)


@settings(max_examples=300, deadline=None)
@given(_chunk_values)
def test_any_chunk_round_trips_through_its_frame(chunk):
    assert CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(chunk)) == chunk
    assert SERVER_FRAMES.parse(SERVER_FRAMES.serialize(chunk)) == chunk


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=60), _chunk_values.map(CLIENT_FRAMES.serialize).map(lambda b: b[:-1] + b"\x01")))
def test_random_bytes_parse_as_protobuf_would_read_them(raw):
    parsed = CLIENT_FRAMES.parse(raw)
    try:
        reference = fleet_pb2.ClientFrame.FromString(raw)
    except Exception:  # protobuf refuses them: so do we
        assert isinstance(parsed, Malformed)
        return
    if reference.WhichOneof("frame") == "chunk":
        c = reference.chunk
        assert parsed == Chunk(c.message_id, c.index, c.last, c.data, c.total_size)
    else:
        assert parsed == reference


def test_reassembled_messages_decode_in_place_with_aligned_arrays():
    message = _message()
    data = encode_message(message)
    for chunk_size in (16, 100, 1 << 20):  # the 16-byte prefix comes whole in chunk 0: the arrays are aligned
        _, whole = _reassemble(list(split_message(1, data, chunk_size=chunk_size)))
        decoded = decode_message(whole)
        assert decoded.params == message.params
        for array in decoded.params.values():
            assert array.flags.aligned
            assert not array.flags.writeable
        assert not decoded.params["w"].flags.owndata  # a view of the received buffer, not a copy
        # "b" (int64) starts 60 bytes after "w" (15 float32 values), off an 8-byte boundary: it is copied
        assert decoded.params["b"].flags.owndata


def test_a_message_over_the_limit_is_refused_on_its_first_chunk():
    first = next(split_message(1, b"\0" * 100, chunk_size=10))
    with pytest.raises(DecodeError, match="100 bytes, over the limit of 99 bytes"):
        Reassembler(99).feed(first)


def test_a_peer_cannot_send_more_than_it_declared():
    lying = Chunk(message_id=1, index=0, last=False, data=b"12345", total_size=3)
    with pytest.raises(DecodeError, match="longer than the 3 bytes"):
        Reassembler(100).feed(lying)
    short = Chunk(message_id=1, index=0, last=True, data=b"12", total_size=3)
    with pytest.raises(DecodeError, match="ended after 2 of the 3 bytes"):
        Reassembler(100).feed(short)


@pytest.mark.parametrize(
    ("fed", "bad", "match"),
    [([], 1, "starts at chunk 1"), ([0], 0, "chunk 0 arrived where chunk 1 was due"), ([0], 2, "chunk 2 arrived")],
    ids=["out-of-order", "duplicate", "gap"],
)
def test_chunks_out_of_order_or_repeated_are_refused(fed, bad, match):
    chunks = list(split_message(9, b"abcdefghi", chunk_size=3))
    reassembler = Reassembler(100)
    for i in fed:
        assert reassembler.feed(chunks[i]) is None
    with pytest.raises(DecodeError, match=match):
        reassembler.feed(chunks[bad])
    assert not reassembler.in_progress  # a refused message is forgotten; the next one starts clean
    message_id, data = [reassembler.feed(c) for c in chunks][-1]
    assert (message_id, bytes(data)) == (9, b"abcdefghi")


def test_a_chunk_of_another_message_inside_one_is_refused():
    first = list(split_message(1, b"abcdef", chunk_size=3))
    other = list(split_message(2, b"xyz", chunk_size=3))
    reassembler = Reassembler(100)
    reassembler.feed(first[0])
    with pytest.raises(DecodeError, match="chunk of message 2 arrived inside message 1"):
        reassembler.feed(other[0])


def test_protocol_version_mismatch_is_a_clear_error():
    check_protocol_version(PROTOCOL_VERSION, "the server")
    with pytest.raises(DecodeError, match="the server speaks fleet protocol version 99, this fedloom speaks 4"):
        check_protocol_version(99, "the server")


def test_a_ping_and_its_pong_cross_as_protobuf_frames():
    ping = fleet_pb2.ServerFrame(ping=fleet_pb2.Ping(nonce=2**64 - 1))
    pong = fleet_pb2.ClientFrame(pong=fleet_pb2.Pong(nonce=2**64 - 1))
    assert SERVER_FRAMES.parse(SERVER_FRAMES.serialize(ping)) == ping
    assert CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(pong)) == pong
    hello = fleet_pb2.Hello(protocol_version=PROTOCOL_VERSION, token="t", train_examples=455)
    assert CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(fleet_pb2.ClientFrame(hello=hello))).hello.train_examples == 455


def test_the_hello_and_the_welcome_carry_the_job_digest():
    digest = "sha256:" + "0f" * 32
    greeting = fleet_pb2.Hello(protocol_version=PROTOCOL_VERSION, token="t", job_digest=digest)
    hello = fleet_pb2.ClientFrame(hello=greeting)
    welcome = fleet_pb2.ServerFrame(welcome=fleet_pb2.Welcome(protocol_version=PROTOCOL_VERSION, job_digest=digest))
    assert CLIENT_FRAMES.parse(CLIENT_FRAMES.serialize(hello)).hello.job_digest == digest
    assert SERVER_FRAMES.parse(SERVER_FRAMES.serialize(welcome)).welcome.job_digest == digest


def test_waiting_takes_what_is_queued_in_order_and_never_blocks():
    frames: queue.Queue[int] = queue.Queue()
    assert list(waiting(frames)) == []
    for frame in (1, 2, 3):
        frames.put(frame)
    assert list(waiting(frames)) == [1, 2, 3]
    assert frames.empty()


_chunks = st.builds(
    Chunk,
    message_id=st.integers(0, 3),
    index=st.integers(0, 4),
    last=st.booleans(),
    data=st.binary(max_size=40),
    total_size=st.one_of(st.just(0), st.integers(0, 200), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_chunks, max_size=30))
def test_random_frames_raise_only_fedloom_errors_and_never_buffer_past_the_limit(chunks):
    limit = 64
    reassembler = Reassembler(limit)
    for chunk in chunks:
        try:
            done = reassembler.feed(chunk)
        except FedloomError:
            continue
        assert reassembler.buffered <= limit
        if done is not None:
            assert len(done[1]) <= limit


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_as_a_frame_raise_only_fedloom_errors(raw):
    reassembler = Reassembler(64)
    frame = CLIENT_FRAMES.parse(raw)  # never raises: bytes that are no frame come back as Malformed
    if isinstance(frame, Chunk):
        try:
            done = reassembler.feed(frame)
        except FedloomError:
            return
        if done is not None:
            with contextlib.suppress(FedloomError):
                decode_message(done[1])


def test_pooled_buffers_are_used_again_only_once_nothing_refers_to_them():
    message = Message("fit", Params({"w": np.arange(1000, dtype=np.float32)}), {"round": 1})
    data = encode_message(message)
    pool = BufferPool(keep=2)
    reassembler = Reassembler(1 << 20, pool)

    def receive(message_id: int) -> Message:
        done = [reassembler.feed(c) for c in split_message(message_id, data, chunk_size=100)][-1]
        return decode_message(done[1])

    def address(decoded: Message) -> int:
        return int(decoded.params["w"].__array_interface__["data"][0])

    first = receive(1)
    held = address(first)
    second = receive(2)  # the first message's arrays are alive: its buffer is not handed out again
    assert address(second) != held
    assert first.params == message.params
    assert second.params == message.params
    del first
    assert pool.free == 1
    third = receive(3)
    assert address(third) == held  # the same memory, used again
    assert third.params == message.params
    del second, third
    assert pool.free == 2
    for message_id in range(4, 8):  # never more than `keep` buffers wait
        receive(message_id)
    assert pool.free <= 2
    small = Message("fit", Params({"w": np.arange(10, dtype=np.float32)}), {"round": 1})
    other = Reassembler(1 << 20, pool)  # a message of another size takes a buffer that fits, or a new one
    done = [other.feed(c) for c in split_message(8, encode_message(small), chunk_size=100)][-1]
    assert decode_message(done[1]).params == small.params
    del done
    assert pool.free <= 2
    with pytest.raises(DecodeError):  # a refused message gives its buffer back too
        reassembler.feed(Chunk(9, 0, False, b"\0" * 10, 5))
    assert pool.free <= 2


def test_a_pool_hands_out_the_smallest_free_buffer_that_fits():
    pool = BufferPool(keep=3)
    large, small = pool.take(200), pool.take(100)
    del large, small  # both wait now, the larger first
    piece = pool.take(50)
    assert piece.size == 50
    assert piece.base is not None
    assert piece.base.size == 100
    assert pool.free == 1


def test_client_data_files_round_trip(tmp_path):
    data = ClientData(
        ArrayData(np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 1, 0])),
        ArrayData(np.zeros((1, 3), np.float32), np.array([1])),
    )
    written = save_client_data(tmp_path / "c0", data)
    assert written.name == "c0.npz"
    loaded = load_client_data(written)
    for split in ("train", "test"):
        for part in ("x", "y"):
            original = getattr(getattr(data, split), part)
            again = getattr(getattr(loaded, split), part)
            assert again.dtype == original.dtype
            np.testing.assert_array_equal(again, original)


def test_client_data_files_refuse_what_they_cannot_use(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_client_data(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", train_x=np.zeros((2, 2)), train_y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="lacks test_x, test_y"):
        load_client_data(tmp_path / "partial.npz")
    objects = np.array([{"a": 1}], dtype=object)
    np.savez(tmp_path / "pickled.npz", train_x=objects, train_y=objects, test_x=objects, test_y=objects)
    with pytest.raises(DataError, match="holds object arrays") as objects_refused:
        load_client_data(tmp_path / "pickled.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DataError, match=r"text\.npz is not a client-data \.npz file") as text_refused:
        load_client_data(tmp_path / "text.npz")
    (tmp_path / "site.csv").write_text("age,label\n63,1\n")  # what a site might give as --data by mistake
    with pytest.raises(DataError, match="not a NumPy archive at all") as csv_refused:
        load_client_data(tmp_path / "site.csv")
    for refused in (objects_refused, text_refused, csv_refused):  # never the advice to load it unsafely
        assert "allow_pickle" not in str(refused.value)
    np.savez(
        tmp_path / "mismatch.npz",
        train_x=np.zeros((3, 2)),
        train_y=np.zeros(2),
        test_x=np.zeros((0, 2)),
        test_y=np.zeros(0),
    )
    with pytest.raises(DataError, match="x has 3 rows but y has 2"):
        load_client_data(tmp_path / "mismatch.npz")
