import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core import (
    DecodeError,
    Message,
    Params,
    decode_message,
    decode_params,
    encode_message,
    encode_params,
    wire_pb2,
    wireformat,
)
from fedloom.core.codec import encoded_size, message_parts
from fedloom.core.wireformat import ALLOWED_DTYPES, MAX_HEADER_BYTES, WIRE_VERSION, data_offset, params_parts

PREFIX = struct.Struct("<4sIQ")


def sample_params() -> Params:
    return Params(
        {
            "layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
            "layer.bias": np.array([1.5, -2.0, np.inf], dtype=np.float64),
            "counter": np.array(7, dtype=np.int64),
            "mask": np.array([True, False]),
            "empty": np.zeros((0, 5), dtype=np.float16),
        }
    )


def header(**fields) -> bytes:
    base = {"version": WIRE_VERSION, "kind": "fit", "metadata_json": "{}"}
    base.update(fields)
    return wire_pb2.Envelope(**base).SerializeToString()


def framed(head: bytes, body: bytes = b"", *, version: int = WIRE_VERSION, length: int | None = None) -> bytes:
    """A version 2 message by hand: prefix, header, array bytes."""
    return PREFIX.pack(b"FLWM", version, len(head) if length is None else length) + head + body


def envelope(body: bytes = b"", **fields) -> bytes:
    return framed(header(**fields), body)


def test_params_round_trip_keeps_order_dtypes_shapes_and_values():
    params = sample_params()
    decoded = decode_params(encode_params(params))
    assert list(decoded) == list(params)
    for name in params:
        assert decoded[name].dtype == params[name].dtype
        assert decoded[name].shape == params[name].shape
        np.testing.assert_array_equal(decoded[name], params[name])


def test_message_round_trip_with_metadata():
    message = Message("fit", sample_params(), {"round": 3, "fit": {"lr": 0.1, "steps": None}, "tags": ["a", 1]})
    decoded = decode_message(encode_message(message))
    assert decoded.kind == "fit"
    assert decoded.params == message.params
    assert dict(decoded.metadata) == {"round": 3, "fit": {"lr": 0.1, "steps": None}, "tags": ["a", 1]}


def test_layout_is_prefix_header_then_raw_arrays():
    params = sample_params()
    message = Message("fit", params, {"round": 3})
    data = encode_message(message)
    magic, version, length = PREFIX.unpack_from(data)
    assert (magic, version) == (b"FLWM", 2) == (b"FLWM", WIRE_VERSION)
    head = wire_pb2.Envelope()
    head.ParseFromString(data[PREFIX.size : PREFIX.size + length])
    assert (head.version, head.kind, head.metadata_json) == (2, "fit", '{"round":3}')
    assert [(t.name, t.dtype, list(t.shape)) for t in head.tensors] == [
        (name, a.dtype.str, list(a.shape)) for name, a in params.items()
    ]
    assert data[PREFIX.size + length :] == b"".join(a.tobytes() for a in params.values())


def test_parts_concatenate_to_the_encoding():
    message = Message("fit", sample_params(), {"round": 1})
    parts = message_parts(message)
    assert len(parts) == 1 + len(message.params)
    assert isinstance(parts[0], bytes)
    assert b"".join(parts) == encode_message(message)
    assert b"".join(params_parts(message.params)) == encode_params(message.params)


def test_parts_share_the_arrays_memory():
    params = sample_params()
    parts = message_parts(Message("fit", params))
    for part, array in zip(parts[1:], params.values(), strict=True):
        if array.size == 0:
            assert part == b""
            continue
        assert isinstance(part, memoryview)
        assert part.format == "B"
        assert part.nbytes == array.nbytes
        assert part.readonly
        assert np.shares_memory(np.frombuffer(part, dtype=np.uint8), array)


def test_big_endian_arrays_are_sent_little_endian():
    big = np.arange(5, dtype=">i4")
    params = Params({"x": big})
    assert params["x"].dtype == np.dtype(">i4")
    part = params_parts(params)[1]
    assert bytes(part) == np.arange(5, dtype="<i4").tobytes()
    assert not np.shares_memory(np.frombuffer(part, dtype=np.uint8), params["x"])  # a converted copy
    decoded = decode_params(encode_params(params))
    assert decoded["x"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(decoded["x"], np.arange(5))


def test_non_contiguous_arrays_are_sent_in_c_order():
    source = np.arange(24, dtype=np.float64).reshape(4, 6)
    for view in (source.T, source[:, ::2], np.asfortranarray(source)):
        decoded = decode_params(encode_params(Params({"x": view})))
        np.testing.assert_array_equal(decoded["x"], view)
        # Params stores C-contiguous copies; the codec's own conversion handles any layout too.
        little = wireformat.little_endian("x", view)
        assert bytes(wireformat.array_bytes(little)) == np.ascontiguousarray(view).tobytes()
    swapped = source.astype(">f8")[:, ::3]
    assert (
        bytes(wireformat.array_bytes(wireformat.little_endian("x", swapped)))
        == np.ascontiguousarray(swapped, dtype="<f8").tobytes()
    )


def test_encoding_is_deterministic_and_sha256_tracks_content():
    a, b = sample_params(), sample_params()
    assert encode_params(a) == encode_params(b)
    assert a.sha256() == b.sha256()
    changed = Params({**a, "counter": np.array(8, dtype=np.int64)})
    assert changed.sha256() != a.sha256()
    reordered = Params({k: a[k] for k in reversed(list(a))})
    assert reordered.sha256() != a.sha256()


def test_object_and_complex_dtypes_are_refused():
    with pytest.raises(ValueError, match="dtype object"):
        Params({"x": np.array([{}, []], dtype=object)})
    with pytest.raises(DecodeError, match="complex128"):
        encode_params(Params({"z": np.zeros(2, dtype=np.complex128)}))


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def version_1_message() -> bytes:
    """A message as fedloom wrote it before format 2: a bare Envelope, array bytes in Tensor.data (field 4)."""
    tensor = field(1, b"w") + field(2, b"<f4") + field(3, varint(2)) + field(4, np.ones(2, "<f4").tobytes())
    return b"\x08\x01" + field(2, b"fit") + field(3, tensor) + field(4, b"{}")


def test_version_1_message_is_a_clear_error():
    with pytest.raises(DecodeError, match=r"wire format version 1 is not supported \(this fedloom speaks 2\); upgrade"):
        decode_message(version_1_message())
    with pytest.raises(DecodeError, match="version 1 is not supported"):
        decode_message(header(version=1))  # no arrays: still the old layout


@pytest.mark.parametrize("version", [0, 1, 3, 2**32 - 1])
def test_other_prefix_version_is_a_clear_error(version):
    with pytest.raises(DecodeError, match=f"version {version} is not supported .* upgrade the older side"):
        decode_message(framed(header(version=version), version=version))


def test_header_must_agree_with_prefix_version():
    with pytest.raises(DecodeError, match="header says wire format version 3"):
        decode_message(framed(header(version=3)))


def test_not_a_fedloom_message():
    for data in (b"", b"FLW", b"hello world, this is not it", json.dumps({"kind": "fit"}).encode()):
        with pytest.raises(DecodeError, match="not a fedloom message"):
            decode_message(data)
    with pytest.raises(DecodeError, match="shorter than the 16-byte prefix"):
        decode_message(encode_message(Message("fit"))[:10])


def test_header_length_past_the_end_is_refused():
    head = header()
    with pytest.raises(DecodeError, match="points past the end"):
        decode_message(framed(head, length=len(head) + 1))
    with pytest.raises(DecodeError, match=f"over the {MAX_HEADER_BYTES} bytes"):
        decode_message(framed(head, length=2**64 - 1))
    with pytest.raises(DecodeError, match="does not parse"):
        decode_message(framed(head, length=len(head) - 1))


def test_byte_count_must_match_shapes():
    bad = wire_pb2.Tensor(name="w", dtype="<f4", shape=[2, 2])
    with pytest.raises(DecodeError, match="need 16 bytes after the header, but the message has 12"):
        decode_message(envelope(b"\x00" * 12, tensors=[bad]))
    with pytest.raises(DecodeError, match="need 16 bytes after the header, but the message has 17"):
        decode_message(envelope(b"\x00" * 17, tensors=[bad]))
    with pytest.raises(DecodeError, match="need 0 bytes"):
        decode_message(encode_message(Message("fit")) + b"\x00")


def test_huge_declared_shapes_are_refused_before_any_allocation():
    tracemalloc.start()
    try:
        for shape, match in [
            ([2**30, 2**30], "need 4611686018427387904 bytes after the header, but the message has 64"),
            ([2**30, 2**30, 2**30], "impossible shape"),
            ([2**63, 2**63], "impossible shape"),
            ([0, 2**62, 4], "impossible shape"),
            ([2**64 - 1], "impossible shape"),
            ([1] * 65, "65 dimensions"),
        ]:
            bad = wire_pb2.Tensor(name="w", dtype="<f4", shape=shape)
            with pytest.raises(DecodeError, match=match):
                decode_message(envelope(b"\x00" * 64, tensors=[bad]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_empty_arrays_with_large_dimensions_decode():
    params = Params({"w": np.zeros((0, 2**20), np.float32), "b": np.zeros((3, 0, 7), np.int8)})
    assert decode_params(encode_params(params)) == params


def test_pickle_dtype_is_refused():
    bad = wire_pb2.Tensor(name="w", dtype="|O", shape=[1])
    with pytest.raises(DecodeError, match="unsupported dtype"):
        decode_message(envelope(b"\x00" * 8, tensors=[bad]))


def test_bad_metadata_and_duplicate_and_empty_names_are_refused():
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode_message(envelope(metadata_json="{nope"))
    with pytest.raises(DecodeError, match="JSON object"):
        decode_message(envelope(metadata_json="[1, 2]"))
    t = wire_pb2.Tensor(name="w", dtype="<f4", shape=[1])
    with pytest.raises(DecodeError, match="repeats"):
        decode_message(envelope(b"\x00" * 8, tensors=[t, t]))
    with pytest.raises(DecodeError, match="non-empty"):
        decode_message(envelope(b"\x00" * 4, tensors=[wire_pb2.Tensor(name="", dtype="<f4", shape=[1])]))
    with pytest.raises(DecodeError, match="no kind"):
        decode_message(envelope(kind=""))


def test_params_and_message_encodings_are_not_interchangeable():
    with pytest.raises(DecodeError, match="expected encoded params"):
        decode_params(encode_message(Message("fit")))


def test_message_metadata_must_be_json():
    with pytest.raises(ValueError, match="only JSON values"):
        Message("fit", metadata={"x": object()})
    with pytest.raises(ValueError, match="must be a string"):
        Message("fit", metadata={1: "x"})


def test_params_are_read_only_copies():
    source = np.zeros(3, dtype=np.float32)
    params = Params({"w": source})
    source[0] = 5
    assert params["w"][0] == 0
    with pytest.raises(ValueError, match="read-only"):
        params["w"][0] = 1


def test_decode_accepts_bytearray_and_memoryview_and_keeps_nothing_of_them():
    message = Message("fit", sample_params(), {"round": 2})
    data = encode_message(message)
    buffer = bytearray(b"xx" + data + b"yy")
    for source in (bytearray(data), memoryview(data), memoryview(buffer)[2:-2], np.frombuffer(data, np.uint8).data):
        decoded = decode_message(source)
        assert decoded.params == message.params
        assert dict(decoded.metadata) == {"round": 2}
    decoded = decode_message(memoryview(buffer)[2:-2])
    buffer[:] = bytes(len(buffer))  # the decoded arrays are copies
    buffer.extend(b"more")  # and no export of the buffer is left behind
    assert decoded.params == message.params


def test_decode_from_read_only_buffers_uses_their_memory_where_arrays_are_aligned():
    params = Params({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(2, dtype=np.int64)})
    data = encode_message(Message("fit", params))
    start = data_offset(data)
    assert start == len(data) - params.nbytes
    storage = np.zeros(len(data) + 16, np.uint8)
    pad = -(storage.ctypes.data + start) % 16  # place the arrays on a 16-byte boundary
    storage[pad : pad + len(data)] = np.frombuffer(data, np.uint8)
    storage.flags.writeable = False
    decoded = decode_message(storage[pad : pad + len(data)].data)
    assert decoded.params == params
    assert all(np.shares_memory(a, storage) for a in decoded.params.values())  # "w" 24 bytes, then "b": aligned
    shifted = np.zeros(len(data) + 32, np.uint8)
    at = (-(shifted.ctypes.data + start) % 16) + 1  # one byte off a boundary: float32 and int64 misaligned
    shifted[at : at + len(data)] = np.frombuffer(data, np.uint8)
    shifted.flags.writeable = False
    copied = decode_message(shifted[at : at + len(data)].data)
    assert copied.params == params
    assert not any(np.shares_memory(a, shifted) for a in copied.params.values())
    assert all(a.flags.aligned for a in copied.params.values())


def test_params_without_copy_freeze_a_view_and_leave_the_caller_array_alone():
    source = np.arange(4, dtype=np.float32)
    params = Params({"w": source, "t": source[::2]}, copy=False)
    assert np.shares_memory(params["w"], source)
    assert not params["w"].flags.writeable
    assert source.flags.writeable  # the caller's own array is not frozen
    assert not np.shares_memory(params["t"], source)  # not C-contiguous: copied all the same


class _Recording:
    """Stands in for ``wire_pb2.Envelope`` in the reader: records how many bytes protobuf is asked to parse."""

    def __init__(self) -> None:
        self.parsed: list[int] = []

    def Envelope(self):  # noqa: N802 - mimics the generated class; the decoder makes an empty one
        recording = self

        class Proxy:
            def __init__(self) -> None:
                self._envelope = wire_pb2.Envelope()

            def ParseFromString(self, data):  # noqa: N802
                recording.parsed.append(len(data))
                return self._envelope.ParseFromString(data)

            def __getattr__(self, name):
                return getattr(self._envelope, name)

        return Proxy()


def test_large_array_round_trips_without_protobuf_seeing_its_bytes(monkeypatch):
    big = np.arange(50_000_000 // 4, dtype=np.float32)
    message = Message("fit", Params({"big": big, "small": np.ones(3, np.int8)}), {"round": 1})
    parts = message_parts(message)
    assert len(parts[0]) < 200
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), message.params["big"])
    data = b"".join(parts)
    assert len(data) == encoded_size(message) == len(parts[0]) + 50_000_000 + 3
    recording = _Recording()
    monkeypatch.setattr(wireformat, "Envelope", recording.Envelope)
    decoded = decode_message(memoryview(data))
    assert recording.parsed == [len(parts[0]) - PREFIX.size]
    assert decoded.params == message.params


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_crashes_on_arbitrary_bytes(data):
    check_decoder(data)


def check_decoder(data: bytes) -> None:
    try:
        message = decode_message(data)
    except DecodeError:
        return
    assert isinstance(message, Message)
    for array in message.params.values():
        assert array.nbytes <= len(data)


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([WIRE_VERSION, WIRE_VERSION, 1, 3]),
    length=st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1)),
    rest=st.binary(max_size=512),
)
def test_decoder_never_crashes_on_arbitrary_bytes_after_a_prefix(version, length, rest):
    check_decoder(PREFIX.pack(b"FLWM", version, length) + rest)


def small_message() -> bytes:
    return encode_message(Message("fit", sample_params(), {"round": 3, "lr": 0.5}))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_decoder_never_crashes_on_damaged_messages(data):
    valid = small_message()
    damage = data.draw(st.sampled_from(["truncate", "flip", "length", "append"]))
    if damage == "truncate":
        mangled = valid[: data.draw(st.integers(0, len(valid) - 1))]
    elif damage == "flip":
        at = data.draw(st.integers(0, len(valid) - 1))
        mangled = valid[:at] + bytes([data.draw(st.integers(0, 255))]) + valid[at + 1 :]
    elif damage == "length":
        new = data.draw(st.one_of(st.integers(0, len(valid)), st.integers(0, 2**64 - 1)))
        mangled = valid[:8] + struct.pack("<Q", new) + valid[16:]
    else:
        mangled = valid + data.draw(st.binary(min_size=1, max_size=16))
    check_decoder(mangled)
    if damage in ("truncate", "append"):
        with pytest.raises(DecodeError):
            decode_message(mangled)


@settings(max_examples=200, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(
            st.text(max_size=3),
            st.sampled_from([*sorted(ALLOWED_DTYPES), "|O", "<c16", ">f4", "nope"]),
            st.lists(st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1)), max_size=4),
        ),
        max_size=4,
    ),
    body=st.binary(max_size=256),
)
def test_decoder_never_crashes_on_hostile_headers(tensors, body):
    tracemalloc.start()
    try:
        check_decoder(envelope(body, tensors=[wire_pb2.Tensor(name=n, dtype=d, shape=s) for n, d, s in tensors]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=8),
            st.sampled_from(sorted(ALLOWED_DTYPES)),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-10, 10), st.text(max_size=5), st.none())),
)
def test_any_valid_message_round_trips(arrays, metadata):
    rng = np.random.default_rng(0)
    params = Params({name: rng.integers(0, 2, size=shape).astype(np.dtype(dtype)) for name, dtype, shape in arrays})
    message = Message("k", params, metadata)
    data = encode_message(message)
    assert b"".join(message_parts(message)) == data
    assert encoded_size(message) == len(data)
    decoded = decode_message(data)
    assert decoded.params == params
    assert json.dumps(dict(decoded.metadata), sort_keys=True) == json.dumps(metadata, sort_keys=True)


@pytest.mark.parametrize("metadata_json", ["[" * 100_000, '{"a": ' + "1" * 5000 + "}"])
def test_pathological_metadata_is_a_decode_error(metadata_json):
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode_message(envelope(metadata_json=metadata_json))


def test_oversized_header_is_refused_when_encoding():
    with pytest.raises(DecodeError, match=r"message header is \d+ bytes, over the"):
        encode_message(Message("fit", metadata={"blob": "x" * MAX_HEADER_BYTES}))


@given(
    metadata=st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=300), st.booleans(), st.none()),
        max_size=12,
    ),
    rows=st.integers(0, 40),
    dtype=st.sampled_from(["<f4", ">f8", "|b1", ">i2"]),
)
@settings(max_examples=60, deadline=None)
def test_encoded_size_is_the_length_of_the_encoding(metadata: dict, rows: int, dtype: str) -> None:
    params = Params({"w": np.ones((rows, 3), np.dtype(dtype)), "b": np.arange(rows), "s": np.array(1.5)})
    message = Message("fit.result", params, metadata)
    assert encoded_size(message) == len(encode_message(message))
