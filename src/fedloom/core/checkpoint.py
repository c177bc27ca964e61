"""Checkpoints: ``Params`` as safetensors files, written atomically.

A checkpoint is a plain safetensors file (no pickle), so any safetensors reader can open it. safetensors
stores its tensors sorted by name, so the ``Params`` order, which :meth:`Params.sha256` depends on, is kept
in the file's metadata under :data:`ORDER_KEY` as a JSON list of names.

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed and fsynced, the file is
renamed over the target with :func:`os.replace`, and the folder itself is fsynced so the rename survives a
power cut. A reader therefore sees either the old complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.params import Params

__all__ = ["ORDER_KEY", "checkpoint_metadata", "load_params", "save_params", "write_atomic"]

#: safetensors metadata key holding the ``Params`` order as a JSON list of names.
ORDER_KEY = "fedloom.order"


def _fsync_dir(folder: Path) -> None:
    # Directories cannot be opened for fsync on Windows; there the rename is as durable as the OS makes it.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a fresh temporary file next to ``path``, make it durable, rename it to ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    folder = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    _replace_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def save_params(path: str | os.PathLike[str], params: Params, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``params`` to the safetensors file ``path`` atomically.

    ``metadata`` is extra text stored in the file's header; its keys must not start with ``fedloom.``,
    which is reserved. Raises :class:`ConfigError` for such a key or a non-string value; ``OSError`` if
    the file cannot be written (in which case an existing file at ``path`` is left untouched).
    """
    header: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"checkpoint metadata must map strings to strings, got {key!r}: {value!r}")
        if key.startswith("fedloom."):
            raise ConfigError(f"checkpoint metadata key {key!r} is reserved (prefix 'fedloom.')")
        header[key] = value
    header[ORDER_KEY] = json.dumps(list(params))
    tensors = dict(params.items())  # Params arrays are C-contiguous copies, as safetensors needs
    _replace_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def _order(header: Mapping[str, str] | None, names: list[str], path: Path) -> list[str]:
    if header is None or ORDER_KEY not in header:
        return names  # not written by fedloom: keep the file's own (sorted) order
    try:
        order: Any = json.loads(header[ORDER_KEY])
    except json.JSONDecodeError:
        order = None
    if not isinstance(order, list) or sorted(order) != sorted(names):
        raise RunStoreError(f"checkpoint {path} is corrupt: its {ORDER_KEY!r} does not list its arrays")
    return order


def load_params(path: str | os.PathLike[str]) -> Params:
    """Read a checkpoint written by :func:`save_params`, in the order it was saved.

    Raises :class:`RunStoreError` if the file is missing, unreadable or not a valid safetensors file.
    """
    file = Path(path)
    if not file.is_file():
        raise RunStoreError(f"checkpoint {file} does not exist")
    try:
        with safe_open(file, framework="numpy") as f:
            names = list(f.keys())
            arrays: dict[str, npt.NDArray[Any]] = {name: f.get_tensor(name) for name in names}
            header = f.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunStoreError(f"checkpoint {file} cannot be read: {exc}") from None
    return Params({name: arrays[name] for name in _order(header, names, file)})


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text stored in a checkpoint's header by :func:`save_params` (its ``metadata``, without fedloom's own
    keys). Raises :class:`RunStoreError` if the file is missing or not a valid safetensors file."""
    file = Path(path)
    if not file.is_file():
        raise RunStoreError(f"checkpoint {file} does not exist")
    try:
        with safe_open(file, framework="numpy") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunStoreError(f"checkpoint {file} cannot be read: {exc}") from None
    return {k: v for k, v in header.items() if not k.startswith("fedloom.")}
