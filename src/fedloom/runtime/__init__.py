"""fedloom.runtime: the server loop, the Grid interface, the client app and its mods, and the simulation
backends.

Each name is imported on first use, so that a module of the package (the certificates of :mod:`.net.tls`, the
records of :mod:`.records`) can be imported without the loop and the backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedloom.core.exports import lazy_exports

if TYPE_CHECKING:
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

_HOMES = {
    "ThreadedGrid": "asynchronous",
    "run_async": "asynchronous",
    **dict.fromkeys(("ClientApp", "Context", "Mod", "client_app", "decline", "handle_instruction"), "client"),
    **dict.fromkeys(("AsyncGrid", "Exchange", "Grid", "Reply"), "grid"),
    "LoopResult": "loop",
    "run_rounds": "loop",
    **dict.fromkeys(("ClientRecord", "ClientStatus", "RoundObserver", "RoundRecord"), "records"),
    "SimulatedClients": "sim.common",
    "DropoutGrid": "sim.dropout",
    "InlineGrid": "sim.inline",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
