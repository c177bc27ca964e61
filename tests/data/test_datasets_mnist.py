"""MNIST: IDX parsing on the real 10k test files, and the loader's file handling (no 60k training images needed)."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import DataError
from fedloom.data.datasets import load_mnist, mnist
from fedloom.data.datasets.download import file_digest
from fedloom.data.datasets.mnist import FILES, read_idx, read_mnist_split

T10K_IMAGES = "t10k-images-idx3-ubyte.gz"
T10K_LABELS = "t10k-labels-idx1-ubyte.gz"
# How many of each digit the 10k test set holds (a published property of MNIST).
T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def mnist_dir(shared_data: Path) -> Path:
    return shared_data / "mnist"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLOOM_DATA", raising=False)
    monkeypatch.delenv("FEDLOOM_CACHE", raising=False)


def test_shared_files_match_their_checksums(mnist_dir: Path) -> None:
    for name in (T10K_IMAGES, T10K_LABELS, "train-labels-idx1-ubyte.gz"):
        assert file_digest(mnist_dir / name, "md5") == FILES[name]


def test_read_idx_on_the_test_set(mnist_dir: Path) -> None:
    images = read_idx(mnist_dir / T10K_IMAGES)
    labels = read_idx(mnist_dir / T10K_LABELS)
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == T10K_COUNTS
    assert images.flags.writeable


def test_read_idx_reads_uncompressed_files_too(mnist_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((mnist_dir / T10K_LABELS).read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), read_idx(mnist_dir / T10K_LABELS))


def test_read_idx_big_endian_ints(tmp_path: Path) -> None:
    values = np.array([[1, -2, 3], [70000, 5, -6]], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes())
    result = read_idx(path)
    assert result.dtype == np.int32
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, values)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        (b"\x00\x00\x08\x00", "no dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", "promises 5"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "promises 1"),
    ],
)
def test_read_idx_rejects_corrupt_headers(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(mnist_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes((mnist_dir / T10K_LABELS).read_bytes()[:2000])  # truncated stream
    with pytest.raises(DataError, match=r"bad\.gz"):
        read_idx(path)
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "absent.gz")


def test_read_mnist_split(mnist_dir: Path) -> None:
    split = read_mnist_split(mnist_dir / T10K_IMAGES, mnist_dir / T10K_LABELS)
    assert split.x.shape == (10000, 1, 28, 28)
    assert split.x.dtype == np.float32
    assert split.y.dtype == np.int64
    assert split.x.min() == 0.0
    assert split.x.max() == 1.0
    assert np.bincount(split.y).tolist() == T10K_COUNTS


def test_read_mnist_split_rejects_mismatched_files(mnist_dir: Path) -> None:
    with pytest.raises(DataError, match="images"):
        read_mnist_split(mnist_dir / T10K_LABELS, mnist_dir / T10K_LABELS)
    with pytest.raises(DataError, match="10000 images but"):
        read_mnist_split(mnist_dir / T10K_IMAGES, mnist_dir / "train-labels-idx1-ubyte.gz")


def test_load_mnist_without_download_names_the_missing_training_images(mnist_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz") as info:
        load_mnist(data_dir=mnist_dir, download=False, cache_dir=tmp_path)
    assert "t10k" not in str(info.value)


def test_load_mnist_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(data_dir=tmp_path / "nope", download=False, cache_dir=tmp_path)


def test_load_mnist_rejects_a_tampered_local_file(mnist_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "mnist"
    shutil.copytree(mnist_dir, local)
    (local / T10K_LABELS).chmod(0o644)
    with (local / T10K_LABELS).open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match=FILES[T10K_LABELS]):
        load_mnist(data_dir=tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_load_mnist_assembles_a_dataset(monkeypatch: pytest.MonkeyPatch, mnist_dir: Path, tmp_path: Path) -> None:
    # Stand-in for the absent 60k training images: the 10k test files under the training names.
    local = tmp_path / "data"
    local.mkdir()
    stand_in = {"train-images-idx3-ubyte.gz": T10K_IMAGES, "train-labels-idx1-ubyte.gz": T10K_LABELS}
    for name, source in {**stand_in, T10K_IMAGES: T10K_IMAGES, T10K_LABELS: T10K_LABELS}.items():
        shutil.copy(mnist_dir / source, local / name)
    monkeypatch.setattr(mnist, "FILES", {name: FILES[stand_in.get(name, name)] for name in FILES})
    monkeypatch.setenv("FEDLOOM_DATA", str(local))

    dataset = load_mnist(download=False, cache_dir=tmp_path / "cache")
    assert dataset.name == "mnist"
    assert dataset.num_classes == 10
    assert not dataset.has_groups
    assert len(dataset.train) == len(dataset.test) == 10000
    assert dataset.train.x.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(dataset.train.y, dataset.test.y)
