"""fedloom.runtime: the server loop, the Grid interface, the client app and its mods, and the simulation
backends."""

from fedloom.runtime.asynchronous import ThreadedGrid, run_async
from fedloom.runtime.client import ClientApp, Context, Mod, client_app, decline, handle_instruction
from fedloom.runtime.grid import AsyncGrid, Exchange, Grid, Reply
from fedloom.runtime.loop import LoopResult, run_rounds
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundObserver, RoundRecord
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.runtime.sim.inline import InlineGrid

__all__ = [
    "AsyncGrid",
    "ClientApp",
    "ClientRecord",
    "ClientStatus",
    "Context",
    "DropoutGrid",
    "Exchange",
    "Grid",
    "InlineGrid",
    "LoopResult",
    "Mod",
    "Reply",
    "RoundObserver",
    "RoundRecord",
    "SimulatedClients",
    "ThreadedGrid",
    "client_app",
    "decline",
    "handle_instruction",
    "run_async",
    "run_rounds",
]
