"""Checkpoints: safetensors round trip in Params order, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedloom.core.checkpoint import ORDER_KEY, write_atomic
from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.params import Params
from fedloom.tracking import load_params, save_params


def _params(scale: float = 1.0) -> Params:
    # Names deliberately not sorted: safetensors sorts them, the checkpoint must not.
    return Params(
        {
            "z.weight": np.arange(6, dtype=np.float32).reshape(2, 3) * scale,
            "a.count": np.array([1, 2**40, -3], dtype=np.int64),
            "m.half": np.array([[0.5], [1.5]], dtype=np.float16),
            "b.flag": np.array(True),
            "c.bytes": np.arange(4, dtype=np.uint8),
            "e.empty": np.zeros((0, 3), dtype=np.float64),
        }
    )


def test_round_trip_keeps_order_dtypes_shapes(tmp_path: Path) -> None:
    params = _params()
    path = tmp_path / "p.safetensors"
    save_params(path, params)
    loaded = load_params(path)
    assert list(loaded) == list(params)
    for name in params:
        assert loaded[name].dtype == params[name].dtype, name
        assert loaded[name].shape == params[name].shape, name
        np.testing.assert_array_equal(loaded[name], params[name])
    assert loaded == params
    assert loaded.sha256() == params.sha256()


def test_round_trip_empty_params(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    save_params(path, Params({}))
    assert load_params(path) == Params({})


def test_big_endian_arrays_are_stored_little_endian(tmp_path: Path) -> None:
    params = Params({"w": np.arange(3, dtype=">f4"), "i": np.arange(3, dtype=">i8")})
    path = tmp_path / "be.safetensors"
    save_params(path, params)
    loaded = load_params(path)
    assert loaded["w"].dtype == np.dtype("<f4")
    assert loaded["i"].dtype == np.dtype("<i8")
    np.testing.assert_array_equal(loaded["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(loaded["i"], [0, 1, 2])


def test_metadata_is_stored_and_order_key_reserved(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    save_params(path, _params(), {"round": "3"})
    with safe_open(path, framework="numpy") as f:
        header = f.metadata()
    assert header["round"] == "3"
    assert json.loads(header[ORDER_KEY]) == list(_params())
    with pytest.raises(ConfigError, match="reserved"):
        save_params(path, _params(), {ORDER_KEY: "[]"})
    not_text: Any = {"round": 3}
    with pytest.raises(ConfigError, match="strings"):
        save_params(path, _params(), not_text)


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_params(path, _params())
    save_params(path, _params(2.0))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]
    np.testing.assert_array_equal(load_params(path)["z.weight"], _params(2.0)["z.weight"])


def test_crash_during_replace_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.safetensors"
    save_params(path, _params(1.0))

    def crash(src: object, dst: object) -> None:
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk unplugged"):
        save_params(path, _params(5.0))
    monkeypatch.undo()

    assert load_params(path) == _params(1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_write_atomic_replaces_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_missing_checkpoint_is_a_run_store_error(tmp_path: Path) -> None:
    with pytest.raises(RunStoreError, match="does not exist"):
        load_params(tmp_path / "nope.safetensors")


def test_garbage_checkpoint_is_a_run_store_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(RunStoreError, match="cannot be read"):
        load_params(path)


def test_truncated_checkpoint_is_a_run_store_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_params(path, _params())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])
    with pytest.raises(RunStoreError, match="cannot be read"):
        load_params(path)


def test_corrupt_order_metadata_is_a_run_store_error(tmp_path: Path) -> None:
    path = tmp_path / "order.safetensors"
    save_file({"a": np.zeros(1, np.float32)}, path, metadata={ORDER_KEY: '["a", "b"]'})
    with pytest.raises(RunStoreError, match="corrupt"):
        load_params(path)


def test_foreign_safetensors_file_loads_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"b": np.ones(2, np.float32), "a": np.zeros(1, np.int64)}, path)
    loaded = load_params(path)
    assert list(loaded) == ["a", "b"]
    assert loaded["a"].dtype == np.int64
