"""One client's data in a file: how a deployed client gets the same data that a simulated one had.

A fedloom client-data file is a NumPy ``.npz`` archive with exactly the arrays ``train_x``, ``train_y``,
``test_x`` and ``test_y``. It is read with ``allow_pickle=False``, so a file from elsewhere cannot run code.
``fedloom partition`` writes one per client; ``fedloom client --data FILE`` reads it.

>>> save_client_data("client-000.npz", federation.clients["client-000"])   # doctest: +SKIP
>>> load_client_data("client-000.npz").train.x.shape                       # doctest: +SKIP
(143, 64)
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedloom.core.errors import DataError
from fedloom.data.base import ArrayData, ClientData

__all__ = ["ARRAY_NAMES", "load_client_data", "save_client_data"]

ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive
_NPY_MAGIC = b"\x93NUMPY"  # a single .npy array


def save_client_data(path: str | Path, data: ClientData) -> Path:
    """Write ``data`` to ``path`` (``.npz`` is appended if missing) and return the path written.

    The file is written next to its final name and renamed into place, so a reader never sees half a file.
    Raises :class:`DataError` when it cannot be written.
    """
    target = Path(path)
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    partial = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as out:
            np.savez(out, train_x=data.train.x, train_y=data.train.y, test_x=data.test.x, test_y=data.test.y)
        partial.replace(target)
    except OSError as exc:
        raise DataError(f"cannot write client data to {target}: {exc.strerror or exc}") from None
    return target


def load_client_data(path: str | Path) -> ClientData:
    """Read a client-data file written by :func:`save_client_data` (or by hand with the same four arrays).

    Raises :class:`DataError` when the file is missing, is not an ``.npz`` archive, holds object arrays
    (pickle), lacks one of :data:`ARRAY_NAMES`, or holds arrays that do not form a client's data.
    """
    source = Path(path)
    if not source.is_file():
        raise DataError(f"client data file {source} does not exist")
    with open(source, "rb") as head:
        magic = head.read(6)
    if magic[:4] != _ZIP_MAGIC and magic != _NPY_MAGIC:
        # numpy would take it for a pickle and suggest allow_pickle, which nobody should do with a file from elsewhere
        raise DataError(
            f"{source} is not a client-data .npz file (as `fedloom partition` writes, or numpy.savez with arrays "
            f"{', '.join(ARRAY_NAMES)}): it is not a NumPy archive at all"
        )
    try:
        loaded = np.load(source, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{source} is a single array, not a fedloom client-data .npz archive")
        with loaded as archive:
            missing = [name for name in ARRAY_NAMES if name not in archive.files]
            if missing:
                raise DataError(
                    f"{source} is not a fedloom client-data file: it lacks {', '.join(missing)} "
                    f"(expected arrays {', '.join(ARRAY_NAMES)})"
                )
            arrays = {name: archive[name] for name in ARRAY_NAMES}
    except DataError:
        raise
    except ValueError:  # object arrays need pickle, which is refused: say so without suggesting it
        raise DataError(
            f"{source} holds object arrays, which a client-data file never does (they would need pickle, which "
            "fedloom never loads): save plain numeric arrays"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{source} is not a readable .npz file: {exc}") from None
    try:
        return ClientData(
            train=ArrayData(arrays["train_x"], arrays["train_y"]), test=ArrayData(arrays["test_x"], arrays["test_y"])
        )
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
