"""What the process and Ray backends share: how a client's data, an instruction and a task's failure cross to
and from a worker, and how a round's clients are spread over workers."""

from __future__ import annotations

import logging
import sys
import time
import traceback
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedloom.core.codec import decode_message, decode_params, encode_message, encode_params
from fedloom.core.errors import (
    ConfigError,
    DataError,
    DecodeError,
    FedloomError,
    JobError,
    user_code,
)
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.data.base import ArrayData, ClientData
from fedloom.privacy.mods import PROTOCOL_KINDS
from fedloom.runtime.client import ClientApp, Context
from fedloom.runtime.state import client_state

__all__ = [
    "Header",
    "RemoteTracebackError",
    "RoundQueues",
    "check_workers",
    "decode_client_data",
    "encode_client_data",
    "error_header",
    "home_worker",
    "remote_error",
    "run_client",
    "stays_home",
    "prepare_worker",
]

Header = dict[str, Any]


def encode_client_data(client_id: str, data: ClientData) -> bytes:
    """A client's train and test arrays in fedloom's params encoding (no pickle), to ship to a worker."""
    arrays = {"train.x": data.train.x, "train.y": data.train.y, "test.x": data.test.x, "test.y": data.test.y}
    try:
        return encode_params(Params(arrays))
    except (DecodeError, ConfigError) as exc:
        raise DataError(f"the data of client {client_id} cannot be sent to a worker: {exc}") from None


def decode_client_data(blob: bytes) -> ClientData:
    """Inverse of :func:`encode_client_data`. The arrays are copied, so that they are writable and aligned
    exactly as the inline backend's are."""
    params = decode_params(blob)
    train = ArrayData(np.array(params["train.x"]), np.array(params["train.y"]))
    test = ArrayData(np.array(params["test.x"]), np.array(params["test.y"]))
    return ClientData(train, test)


def run_client(
    app: ClientApp, data: ClientData, client_id: str, kind: str, down: bytes, state_root: str | None = None
) -> tuple[Header, bytes]:
    """Handle one encoded instruction in a worker through the worker's copy of the client ``app``, as the inline
    backend does in-process, with the client's state in its folder under ``state_root`` (where given).

    Returns ``({"status": "ok", "seconds": s}, encoded reply)`` or, when anything raised,
    ``({"status": "error", "type": ..., "message": ..., "traceback": ...}, b"")`` for :func:`remote_error`.
    """
    try:
        start = time.perf_counter()
        with user_code(f"client {client_id} in {kind}"):
            reply = app(decode_message(down), Context(client_id, data, client_state(state_root, client_id)))
        seconds = time.perf_counter() - start
        up = encode_message(reply)
    except Exception as exc:
        return error_header(exc), b""
    return {"status": "ok", "seconds": seconds}, up


class RemoteTracebackError(Exception):
    """The formatted traceback of an exception raised in a worker, attached as the ``__cause__`` of the error
    re-raised here, so that a debugging user still sees where their code failed."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}" if self.args else ""


# fedloom's own errors by name (the hierarchy is one level deep), so a worker's error is raised here as itself.
_KNOWN: list[type[FedloomError]] = [FedloomError, *FedloomError.__subclasses__()]
_ERRORS: Mapping[str, type[FedloomError]] = {cls.__name__: cls for cls in _KNOWN}


def remote_error(header: Header) -> FedloomError:
    """The error a worker reported, as the same fedloom exception type (anything else becomes a JobError)."""
    cls = _ERRORS.get(str(header.get("type")))
    message = str(header.get("message"))
    error = cls(message) if cls is not None else JobError(f"a simulation worker raised {header.get('type')}: {message}")
    error.__cause__ = RemoteTracebackError(str(header.get("traceback", "")))
    return error


def check_workers(workers: object) -> None:
    """Refuse a worker count that is not ``None`` (one per core) or a whole number >= 1."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a whole number >= 1, got {workers!r}")


def home_worker(client_id: str, workers: int) -> int:
    """The worker that holds ``client_id``'s data: a stable hash, so it needs neither the list of client ids
    (which may be lazy) nor any state, and is the same in every round."""
    return zlib.crc32(client_id.encode()) % workers


class RoundQueues:
    """A round's clients, queued at their home workers, handed out one at a time.

    A worker takes the next client of its own queue; once that is empty, it takes the last client of the
    longest other queue rather than stand idle (work stealing), so a round that happens to sample many clients
    of one worker does not wait on that worker alone. A stolen client's data is sent along but not kept, so
    the workers together hold one copy of the federation. With ``steal=False`` every client runs at its home
    worker: the steps of secure aggregation must reach the worker that holds the client's open round.
    """

    def __init__(self, client_ids: Iterable[str], workers: int, *, steal: bool = True) -> None:
        self._steal = steal
        self._queues: list[deque[str]] = [deque() for _ in range(workers)]
        for client_id in client_ids:
            self._queues[home_worker(client_id, workers)].append(client_id)

    def next_for(self, worker: int) -> tuple[str, bool] | None:
        """The next client for ``worker`` and whether it is that worker's own; ``None`` when none is left."""
        own = self._queues[worker]
        if own:
            return own.popleft(), True
        if not self._steal:
            return None
        longest = max(self._queues, key=len)
        return (longest.pop(), False) if longest else None


def stays_home(messages: Mapping[str, Message]) -> bool:
    """Whether a round's clients must each run at their home worker (see :class:`RoundQueues`)."""
    return any(message.kind in PROTOCOL_KINDS for message in messages.values())


def error_header(exc: BaseException) -> Header:
    return {"status": "error", "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}


def prepare_worker() -> None:
    """Set up a worker process: its loggers make records from ``INFO`` up, as in the ``fedloom`` command, for the
    clients' telemetry (:mod:`fedloom.runtime.telemetry`; Python's last resort still prints only warnings); and
    torch (if the task uses it) gets one thread: each worker is one core, and more threads would only compete
    with the other workers (on a busy machine, many times slower)."""
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
