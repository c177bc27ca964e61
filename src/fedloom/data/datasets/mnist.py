"""MNIST: 70,000 handwritten digits (60,000 train, 10,000 test), 28x28 grey levels, read from the IDX files."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import DataError
from fedloom.data.base import ArrayData, Dataset
from fedloom.data.datasets.download import obtain_files

__all__ = ["FILES", "MIRRORS", "load_mnist", "read_idx", "read_mnist_split"]

#: The four original files and their md5 digests.
FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: Public mirrors of the original files (the original site often refuses scripted downloads).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# IDX type codes (third byte of the magic number); all multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> npt.NDArray[np.generic]:
    """Read an IDX file (raw, or gzip-compressed: detected from its first bytes) into a native-endian array.

    Raises:
        DataError: the file cannot be read, is not valid gzip, or its header (magic number, type code, number
            of dimensions) or size does not describe the data that follows.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from exc
    return _parse_idx(raw, path)


def read_mnist_split(images: str | Path, labels: str | Path) -> ArrayData:
    """One MNIST split from its images and labels IDX files.

    Returns:
        ``x`` float32 of shape ``(n, 1, 28, 28)`` scaled to ``[0, 1]``, ``y`` int64 digits 0-9.

    Raises:
        DataError: a file is unreadable or corrupt, not MNIST-shaped, or the two files disagree on ``n``.
    """
    pixels = read_idx(images)
    digits = read_idx(labels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
        raise DataError(f"{images} holds {pixels.dtype} of shape {pixels.shape}, not 28x28 uint8 images")
    if digits.dtype != np.uint8 or digits.ndim != 1:
        raise DataError(f"{labels} holds {digits.dtype} of shape {digits.shape}, not uint8 labels")
    if len(pixels) != len(digits):
        raise DataError(f"{images} has {len(pixels)} images but {labels} has {len(digits)} labels")
    if len(digits) and digits.max() > 9:
        raise DataError(f"{labels} holds label {digits.max()}, outside 0-9")
    x = (pixels.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return ArrayData(x, digits.astype(np.int64))


def load_mnist(
    data_dir: str | Path | None = None, download: bool = True, cache_dir: str | Path | None = None
) -> Dataset:
    """MNIST as a :class:`Dataset` named ``"mnist"`` with 10 classes (no natural groups).

    Files come from ``data_dir`` (or ``$FEDLOOM_DATA``, with or without an ``mnist/`` subfolder), else from
    ``<cache_dir>/mnist/``, else from :data:`MIRRORS` when ``download`` is true; every file's md5 is checked.
    See :func:`fedloom.data.datasets.download.obtain_files` for the search order.

    Raises:
        DataError: a folder is missing, a file is missing (and ``download`` is false), fails its checksum,
            cannot be downloaded or is corrupt.
    """
    paths = obtain_files(
        FILES, dataset="mnist", data_dir=data_dir, cache_dir=cache_dir, mirrors=MIRRORS, download=download
    )
    train = read_mnist_split(paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"])
    test = read_mnist_split(paths["t10k-images-idx3-ubyte.gz"], paths["t10k-labels-idx1-ubyte.gz"])
    return Dataset(name="mnist", train=train, test=test, num_classes=10)


def _parse_idx(raw: bytes, source: Path) -> npt.NDArray[np.generic]:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{source} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{source} has unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{source} has an IDX header with no dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{source} has {len(raw) - header} data bytes, but its header {dims} promises {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # A native-endian copy: callers get a writable array that does not pin the file's bytes.
    return data.astype(dtype.newbyteorder("="))
