"""What a deployment's server checks before it admits a site: that its model can travel, and that its run
directory can take the next round.

Either would otherwise be found only after the sites had joined and trained: a model larger than
``--max-message-mb`` when every reply of round 1 had been declined, a run directory without room when the
round's checkpoint could not be written. :func:`serve <fedloom.app.deployment.serve>` calls both before it
binds its address: a server that binds and then fails closes the connections of sites already dialling, which
they cannot tell from a TLS mismatch.

>>> check_model_size(params, max_message_bytes=5 * 2**20)   # doctest: +SKIP
ConfigError: the model is 9.37 MiB (9,821,204 bytes) encoded, over --max-message-mb 5 (5,242,880 bytes): ...
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fedloom.core.codec import encoded_size
from fedloom.core.errors import ConfigError, NoSpaceError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.runtime.net.frames import DEFAULT_MAX_MESSAGE_BYTES
from fedloom.tracking.failures import store_error

__all__ = ["DATABASE_MARGIN", "check_model_size", "check_room", "checkpoint_bytes"]

#: The room a round's rows need in the run database beyond its checkpoint: its client records and events, the
#: log lines the sites sent (up to 200 lines of 4,000 characters each), and SQLite's journal while it commits.
DATABASE_MARGIN = 4 * 2**20
_HEADER_BYTES = 4096  # a checkpoint's header beyond the arrays' names and shapes: its metadata
_ARRAY_HEADER_BYTES = 128  # per array: its name, dtype, shape and offsets in the header's JSON


def _mib(size: int) -> str:
    return f"{size / 2**20:.3g} MiB ({size:,} bytes)"


def check_model_size(params: Params, max_message_bytes: int) -> None:
    """Raise :class:`ConfigError`, with both sizes, when ``params`` cannot travel: when a reply that carries them
    (a fit update is as large as the model) is over ``max_message_bytes`` (the server's ``--max-message-mb``;
    every such reply would be declined), or an instruction that carries them is over what a site accepts
    (:data:`~fedloom.runtime.net.frames.DEFAULT_MAX_MESSAGE_BYTES`). A reply's metrics and log lines add a few
    KiB to the model's size."""
    reply = encoded_size(Message(MessageKind.FIT_RESULT, params))
    if reply > max_message_bytes:
        raise ConfigError(
            f"the model is {_mib(reply)} encoded, over --max-message-mb {round(max_message_bytes / 2**20, 4):g} "
            f"({max_message_bytes:,} bytes): every site's update would be declined; raise --max-message-mb above "
            f"{reply / 2**20:.3g}"
        )
    instruction = encoded_size(Message(MessageKind.FIT, params))
    if instruction > DEFAULT_MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"the model is {_mib(instruction)} encoded, over the {_mib(DEFAULT_MAX_MESSAGE_BYTES)} that a site "
            "accepts in one message: no site could receive it"
        )


def checkpoint_bytes(params: Params) -> int:
    """About the size of the safetensors checkpoint of ``params``: the arrays' bytes and their header."""
    return sum(array.nbytes for array in params.values()) + _HEADER_BYTES + _ARRAY_HEADER_BYTES * len(params)


def check_room(run_dir: str | os.PathLike[str], params: Params) -> None:
    """Raise unless the run directory ``run_dir`` (which exists: its tokens are there) can take a round of a
    model like ``params``: :class:`~fedloom.core.errors.RunStoreError` when a file cannot be made in it (a
    read-only file system, a folder without write permission), :class:`NoSpaceError` when its file system has
    less free space than a checkpoint and :data:`DATABASE_MARGIN` for the database."""
    folder = Path(run_dir)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".room.", suffix=".tmp"):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as exc:  # named by the folder, not by the file that tried it
        raise store_error("the server cannot use its run directory", OSError(exc.errno, exc.strerror), folder) from None
    needed = checkpoint_bytes(params) + DATABASE_MARGIN
    if free < needed:
        raise NoSpaceError(
            f"too little space left on device for the run directory {folder}: {_mib(free)} free, and a round needs "
            f"about {_mib(needed)} (a checkpoint of the model and {DATABASE_MARGIN // 2**20} MiB for the database); "
            "free space there, or give another --run-dir"
        )
