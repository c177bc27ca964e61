"""Where a client keeps its state between rounds: safetensors files in a folder of its own."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from fedloom.core.checkpoint import load_params, save_params
from fedloom.core.errors import ConfigError
from fedloom.core.message import MessageKind
from fedloom.core.params import Params

__all__ = ["DirectoryState", "RoundState", "client_folder", "client_state"]

_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STAGED = "staged"  # staged/round_NNNNN/<key>.safetensors: what a round wrote, until the server is past it
_ROUND = re.compile(r"^round_(\d+)$")


class DirectoryState:
    """A :class:`~fedloom.strategy.local.ClientState` as one safetensors file per key in ``folder``.

    The folder is created on the first save. Files are written atomically (a crash leaves the previous state),
    so a client that restarts finds what it saved after its last completed round. Keys are short lower-case
    names (``scaffold.control``); anything else is a :class:`ConfigError`. A file that cannot be read raises
    :class:`~fedloom.core.errors.RunStoreError` naming it.

    The client runtimes use it a round at a time, through :meth:`at_round`, so that what a round writes counts
    only once the server is past that round (see :class:`RoundState`).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def _path(self, key: str, folder: Path | None = None) -> Path:
        if not _KEY.match(key):
            raise ConfigError(f"client state key {key!r} must be 1 to 64 lower-case letters, digits, '.', '_' or '-'")
        return (folder or self.folder) / f"{key}.safetensors"

    def load(self, key: str) -> Params | None:
        path = self._path(key)
        return load_params(path) if path.is_file() else None

    def save(self, key: str, params: Params) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_params(path, params)

    def commit(self) -> None:
        """Commit every staged round: the run is over (the server said bye), so each round is complete."""
        for _staged_round, folder in self._staged_rounds():
            _commit(folder, self.folder)

    def at_round(self, server_round: int, kind: str) -> RoundState:
        """This state as the ``kind`` instruction (fit or evaluate) of ``server_round`` sees it."""
        return RoundState(self, server_round, kind)

    def _staged_rounds(self) -> list[tuple[int, Path]]:
        """The rounds with staged state, oldest first, and their folders."""
        root = self.folder / _STAGED
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ROUND.match(p.name)) and p.is_dir()]
        return sorted(found)


class RoundState:
    """A client's state as one instruction of round ``r`` sees it, so that a server that crashes in the middle
    of round ``r`` and runs it again after it resumes finds its clients as they were before round ``r``:

    - What round ``r``'s instructions save is staged (``staged/round_r/``), not written over the state.
    - An instruction of a later round means the server is past round ``r`` (it records a round before it sends
      the next one's instructions): the staged state of every earlier round is committed first, in order.
    - A ``fit`` instruction of round ``r`` finds the state as of the rounds before it: a staged round ``r``
      (or later) is what a run cut short left behind, and is thrown away. An ``evaluate`` instruction of round
      ``r`` sees what that round's training staged (Ditto evaluates the personal model it has just trained).

    Commits and discards are file renames and removals, each atomic, so a client killed at any moment finds a
    consistent state when it restarts. A client that trained in a round the server ran again, and was not
    asked again (it dropped), commits the update the server never used; it cannot know.
    """

    def __init__(self, base: DirectoryState, server_round: int, kind: str) -> None:
        self._base = base
        self._round = server_round
        self._kind = kind
        self._settle()

    def _staging(self, server_round: int) -> Path:
        return self._base.folder / _STAGED / f"round_{server_round:05d}"

    def _settle(self) -> None:
        keep = self._round if self._kind == MessageKind.EVALUATE else self._round - 1
        for staged_round, folder in self._base._staged_rounds():  # oldest first, so the newest commit wins
            if staged_round < self._round:  # the server is past it
                _commit(folder, self._base.folder)
            elif staged_round > keep:
                shutil.rmtree(folder, ignore_errors=True)

    def load(self, key: str) -> Params | None:
        staged = self._base._path(key, self._staging(self._round))
        if staged.is_file():  # only an evaluation finds one: a fit threw its round's away
            return load_params(staged)
        return self._base.load(key)

    def save(self, key: str, params: Params) -> None:
        path = self._base._path(key, self._staging(self._round))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_params(path, params)


def _commit(staged: Path, folder: Path) -> None:
    """Move one round's staged files over the state in ``folder`` (each atomically), then drop the round."""
    for path in sorted(staged.glob("*.safetensors")):
        os.replace(path, folder / path.name)
    shutil.rmtree(staged, ignore_errors=True)


def client_folder(root: str | os.PathLike[str], client_id: str) -> Path:
    """``root/<client_id>``, or ``root/<sha256 of the id>`` for an id that is not a safe file name."""
    if _SAFE_ID.match(client_id):
        return Path(root) / client_id
    return Path(root) / hashlib.sha256(client_id.encode()).hexdigest()[:32]


def client_state(root: str | os.PathLike[str] | None, client_id: str) -> DirectoryState | None:
    """A simulated client's state in its folder under ``root`` (:func:`client_folder`); ``None`` without a root."""
    return DirectoryState(client_folder(root, client_id)) if root is not None else None
