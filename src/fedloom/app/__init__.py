"""fedloom.app: what a user runs, as library calls. A job (:class:`Job`, :func:`load_job`), run as a simulated
federation (:func:`simulate`, :func:`simulate_gossip`) or deployed: the server side with :func:`serve`, a site
with :func:`connect`, secured by :class:`ServerTLS` and :class:`ClientTLS`; either protected by
:class:`PrivacySettings` (:func:`with_protection`). The command line is a thin shell over these; a notebook can
do whatever a command does.

Each name is imported on first use: a simulation does not load gRPC, and a deployment does not load the
simulation backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedloom.core.exports import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
