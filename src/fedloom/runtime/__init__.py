"""fedloom.runtime: the server loop, the Grid interface and its simulation backends."""

from fedloom.runtime.asynchronous import ThreadedGrid, run_async
from fedloom.runtime.client import handle_instruction
from fedloom.runtime.grid import AsyncGrid, Exchange, Grid, Reply
from fedloom.runtime.loop import LoopResult, run_rounds
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundObserver, RoundRecord
from fedloom.runtime.sim.inline import InlineGrid

__all__ = [
    "AsyncGrid",
    "ClientRecord",
    "ClientStatus",
    "Exchange",
    "Grid",
    "InlineGrid",
    "LoopResult",
    "Reply",
    "RoundObserver",
    "RoundRecord",
    "ThreadedGrid",
    "handle_instruction",
    "run_async",
    "run_rounds",
]
