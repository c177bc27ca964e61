import json

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
)
from fedloom.core.codec import ALLOWED_DTYPES, WIRE_VERSION, encoded_size


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


def test_big_endian_arrays_are_sent_little_endian():
    big = np.arange(5, dtype=">i4")
    decoded = decode_params(encode_params(Params({"x": big})))
    assert decoded["x"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(decoded["x"], np.arange(5))


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


def envelope(**fields) -> bytes:
    base = {"version": WIRE_VERSION, "kind": "fit", "metadata_json": "{}"}
    base.update(fields)
    return wire_pb2.Envelope(**base).SerializeToString()


def test_other_version_is_a_clear_error():
    with pytest.raises(DecodeError, match="version 2 is not supported"):
        decode_message(envelope(version=2))


def test_byte_count_must_match_shape():
    bad = wire_pb2.Tensor(name="w", dtype="<f4", shape=[2, 2], data=b"\x00" * 12)
    with pytest.raises(DecodeError, match="needs 16 bytes, got 12"):
        decode_message(envelope(tensors=[bad]))


def test_pickle_dtype_is_refused():
    bad = wire_pb2.Tensor(name="w", dtype="|O", shape=[1], data=b"\x00" * 8)
    with pytest.raises(DecodeError, match="unsupported dtype"):
        decode_message(envelope(tensors=[bad]))


def test_bad_metadata_and_duplicate_names_are_refused():
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode_message(envelope(metadata_json="{nope"))
    with pytest.raises(DecodeError, match="JSON object"):
        decode_message(envelope(metadata_json="[1, 2]"))
    t = wire_pb2.Tensor(name="w", dtype="<f4", shape=[1], data=b"\x00" * 4)
    with pytest.raises(DecodeError, match="repeats"):
        decode_message(envelope(tensors=[t, t]))


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


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_crashes_on_arbitrary_bytes(data):
    try:
        message = decode_message(data)
    except DecodeError:
        return
    assert isinstance(message, Message)
    for array in message.params.values():
        assert array.nbytes <= len(data)


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
    decoded = decode_message(encode_message(message))
    assert decoded.params == params
    assert json.dumps(dict(decoded.metadata), sort_keys=True) == json.dumps(metadata, sort_keys=True)


@pytest.mark.parametrize("metadata_json", ["[" * 100_000, '{"a": ' + "1" * 5000 + "}"])
def test_pathological_metadata_is_a_decode_error(metadata_json):
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode_message(envelope(metadata_json=metadata_json))


@given(
    metadata=st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=300), st.booleans(), st.none()),
        max_size=12,
    ),
    rows=st.integers(0, 40),
)
@settings(max_examples=60, deadline=None)
def test_encoded_size_is_the_length_of_the_encoding(metadata: dict, rows: int) -> None:
    message = Message("fit.result", Params({"w": np.ones((rows, 3), np.float32), "b": np.arange(rows)}), metadata)
    assert encoded_size(message) == len(encode_message(message))
