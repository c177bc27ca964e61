"""Where a client keeps its state between rounds: safetensors files in a folder of its own."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from fedloom.core.checkpoint import load_params, save_params
from fedloom.core.errors import ConfigError
from fedloom.core.params import Params

__all__ = ["DirectoryState", "client_folder", "client_state"]

_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DirectoryState:
    """A :class:`~fedloom.strategy.local.ClientState` as one safetensors file per key in ``folder``.

    The folder is created on the first save. Files are written atomically (a crash leaves the previous state),
    so a client that restarts finds what it saved after its last completed round. Keys are short lower-case
    names (``scaffold.control``); anything else is a :class:`ConfigError`. A file that cannot be read raises
    :class:`~fedloom.core.errors.RunStoreError` naming it.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ConfigError(f"client state key {key!r} must be 1 to 64 lower-case letters, digits, '.', '_' or '-'")
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> Params | None:
        path = self._path(key)
        return load_params(path) if path.is_file() else None

    def save(self, key: str, params: Params) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_params(path, params)


def client_folder(root: str | os.PathLike[str], client_id: str) -> Path:
    """``root/<client_id>``, or ``root/<sha256 of the id>`` for an id that is not a safe file name."""
    if _SAFE_ID.match(client_id):
        return Path(root) / client_id
    return Path(root) / hashlib.sha256(client_id.encode()).hexdigest()[:32]


def client_state(root: str | os.PathLike[str] | None, client_id: str) -> DirectoryState | None:
    """A simulated client's state in its folder under ``root`` (:func:`client_folder`); ``None`` without a root."""
    return DirectoryState(client_folder(root, client_id)) if root is not None else None
