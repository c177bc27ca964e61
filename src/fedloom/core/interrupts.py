"""Ctrl-C at a safe point: :func:`interrupts_held` keeps ``SIGINT`` from landing in the middle of work that must
finish or not happen at all, such as a run store's database transaction.

Python raises :class:`KeyboardInterrupt` between any two bytecodes of the main thread. Raised inside a database
driver's bookkeeping it can leave a transaction open on a pooled connection, and then the run's last act, marking
itself failed, finds its own database locked (a run left ``running`` although it was stopped). Held back until the
block ends, the same Ctrl-C arrives a moment later, where the code around it expects it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["interrupts_held"]


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Run the block with Ctrl-C held back: a first ``SIGINT`` received meanwhile is raised as
    :class:`KeyboardInterrupt` when the block is left (however it is left), and a second one at once, for a block
    that is stuck (a database server that does not answer).

    Does nothing outside the main thread (signals reach only it), nor where ``SIGINT`` is not Python's default
    handler: in a block already holding them, or where the application installed its own.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if received:  # asked twice: the user means it
            raise KeyboardInterrupt
        received.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if received:  # raised here, it carries the block's own exception, if any, as its context
            raise KeyboardInterrupt
