"""fedloom.app: what a user runs, as library calls. A job (:class:`Job`, :func:`load_job`), run as a simulated
federation (:func:`simulate`, :func:`simulate_gossip`) or deployed: the server side with :func:`serve`, a site
with :func:`connect`, secured by :class:`ServerTLS` and :class:`ClientTLS`; either protected by
:class:`PrivacySettings` (:func:`with_protection`). The command line is a thin shell over these; a notebook can
do whatever a command does.

Each name is imported on first use: a simulation does not load gRPC, and a deployment does not load the
simulation backends."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedloom.app.deployment import ClientTLS, ServerTLS, connect, serve
    from fedloom.app.gossip import simulate_gossip
    from fedloom.app.job import Job, load_job
    from fedloom.app.protection import DPSettings, PrivacySettings, with_protection
    from fedloom.app.run import Run
    from fedloom.app.simulation import simulate

__all__ = [
    "ClientTLS",
    "DPSettings",
    "Job",
    "PrivacySettings",
    "Run",
    "ServerTLS",
    "connect",
    "load_job",
    "serve",
    "simulate",
    "simulate_gossip",
    "with_protection",
]

_HOMES = {
    **dict.fromkeys(("ClientTLS", "ServerTLS", "connect", "serve"), "deployment"),
    "simulate_gossip": "gossip",
    "Job": "job",
    "load_job": "job",
    **dict.fromkeys(("DPSettings", "PrivacySettings", "with_protection"), "protection"),
    "Run": "run",
    "simulate": "simulation",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedloom.app' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedloom.app.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
