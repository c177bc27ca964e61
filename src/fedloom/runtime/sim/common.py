"""What every simulation backend shares: the value that describes the simulated clients."""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.data.base import ClientData, Federation
from fedloom.privacy.paillier import KeyPair
from fedloom.runtime.client import ClientApp, Context, Mod, client_app
from fedloom.runtime.state import client_state
from fedloom.task.base import Task

__all__ = ["SimulatedClients"]


@dataclass(frozen=True)
class SimulatedClients:
    """The clients a simulation backend runs: what each runs (``app``: the task inside its mods), each one's
    data (``data``), where each keeps its state between rounds (a folder per client under ``state_dir``;
    ``None``: stateful algorithms cannot run) and, for backends that start worker processes, the job file those
    import before they load the app (``job_file``, a job's ``source``).

    >>> clients = SimulatedClients.of(task, federation)  # doctest: +SKIP
    >>> grid = InlineGrid(clients)  # doctest: +SKIP
    """

    app: ClientApp
    data: Federation
    state_dir: str | None = None
    job_file: str | None = None

    @staticmethod
    def of(
        task: Task,
        data: Federation,
        *,
        mods: tuple[Mod, ...] = (),
        paillier_key: KeyPair | None = None,
        state_dir: str | None = None,
        job_file: str | None = None,
    ) -> SimulatedClients:
        """``task``'s clients over ``data``, each running :func:`~fedloom.runtime.client.client_app` (with the
        user's ``mods`` and the simulated clients' shared ``paillier_key``)."""
        return SimulatedClients(client_app(task, mods, paillier_key=paillier_key), data, state_dir, job_file)

    def context(self, client_id: str, data: ClientData | None = None) -> Context:
        """The context ``client_id`` answers in: its data (``data``, or the federation's) and its state."""
        own = data if data is not None else self.data.clients[client_id]
        return Context(client_id, own, client_state(self.state_dir, client_id))
