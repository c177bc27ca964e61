"""Choosing and opening the simulation backend that runs a job's clients.

Every backend is a :class:`~fedloom.runtime.grid.Grid`, so the server loop never knows which one runs. The
backend modules are imported only when chosen: the vectorized one needs torch, the Ray one needs ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

from fedloom.core.config import AttackConfig, BackendConfig, SimulationConfig
from fedloom.core.errors import ConfigError, user_code
from fedloom.data.base import Federation
from fedloom.runtime.grid import Grid
from fedloom.runtime.sim.attacks import AttackGrid, choose_attackers, describe_attackers, poison_federation
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.runtime.sim.inline import InlineGrid
from fedloom.task.base import Task

__all__ = ["Backend", "open_backend"]

log = logging.getLogger("fedloom.run")  # what runs and why: the CLI prints it

_HAS_MODS = "the job has client mods of its own, which run per client"

# A client's work must cost at least this much for worker processes to pay for shipping it there and back. A
# digits MLP client (~1 ms) is well below it: there the process backend is 1.5-4x slower than inline on 2
# cores (benchmarks/RESULTS.md, "Simulation speed").
_PROCESS_WORTH_SECONDS = 0.005


@dataclass(frozen=True)
class Backend:
    """The backend a simulation runs on: its grid, its name, and why it was chosen."""

    grid: Grid
    name: str
    reason: str


@contextmanager
def open_backend(
    clients: SimulatedClients, config: SimulationConfig, *, asynchronous: bool = False
) -> Iterator[Backend]:
    """Open the backend ``config.backend`` asks for (``auto``: the fastest that supports the clients' task) over
    ``clients``, decorated as ``config`` says, and close it on exit. Every decoration happens here, innermost
    first: dropouts (:class:`~fedloom.runtime.sim.dropout.DropoutGrid`, ``config.dropout``), attacks
    (:class:`~fedloom.runtime.sim.attacks.AttackGrid`: the attackers' training data is poisoned before the
    backend opens, and their ``fit`` replies are rewritten), and the cross-device system model
    (:class:`~fedloom.runtime.sim.crossdevice.SystemGrid`) when ``config.system`` models availability or
    stragglers, or when the run is ``asynchronous`` (FedBuff runs on its simulated clock). An attacker's reply
    is what arrives, if it arrives in time. What clients keep between rounds lives in a temporary folder for
    the simulation only, unless ``clients.state_dir`` names one.
    """
    settings = config.backend
    data = clients.data
    attackers: dict[str, AttackConfig] = {}
    if config.attacks:
        attackers = choose_attackers(config.attacks, data.client_ids, config.seed)
        data = poison_federation(data, attackers, data.num_classes, config.seed)
    app = dataclasses.replace(clients.app, task=_on_device(clients.app.task, settings.device))
    clients = dataclasses.replace(clients, app=app, data=data)
    name, reason, probed = _choose(clients, settings)
    with ExitStack() as stack:
        if clients.state_dir is None:  # SCAFFOLD's control variates... live for the simulation only
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedloom-clients-"))
            clients = dataclasses.replace(clients, state_dir=state_dir)
        grid: Grid = _open(name, clients, settings, probed)
        if hasattr(grid, "close"):
            stack.callback(grid.close)
        if config.dropout:
            grid = DropoutGrid(grid, config.dropout, seed=config.seed)
        if attackers:
            grid = AttackGrid(grid, attackers, seed=config.seed)
        if asynchronous or not config.system.is_default:
            from fedloom.runtime.sim.crossdevice import SystemGrid

            grid = SystemGrid(grid, data, config.system, seed=config.seed)
        # One line says which backend runs and why; a warning when it is not the one asked for.
        fell_back = settings.name not in ("auto", name)
        log.log(logging.WARNING if fell_back else logging.INFO, "backend %s: %s", name, reason)
        if attackers:
            log.info("%s", describe_attackers(attackers, len(data.client_ids)))
        yield Backend(grid, name, reason)


def _choose(clients: SimulatedClients, settings: BackendConfig) -> tuple[str, str, Any]:
    """The backend to run, a one-line reason (falling back from ``vectorized`` with the cause), and the model
    the vectorized backend probed (handed to it, so the probe is not run twice)."""
    task, data = clients.app.task, clients.data
    asked = settings.name
    if asked in ("inline", "process", "ray"):
        return asked, "as asked", None
    if settings.ray_address is not None:
        return "ray", f"a Ray cluster at {settings.ray_address} was given", None
    probed, cannot = _probe_vectorized(task, data) if clients.app.lockstep_safe else (None, _HAS_MODS)
    if cannot is None:
        why = "as asked" if asked == "vectorized" else "the task's model trains in lockstep with vmap"
        return "vectorized", why, probed
    if settings.device is not None and settings.device.startswith("cuda"):
        raise ConfigError(
            f"--device {settings.device} needs the vectorized backend, which cannot run this task: {cannot}"
        )
    fallback, why = _cpu_backend(task, data, settings)
    return fallback, f"vectorized cannot run this task ({cannot}); {why}", None


def _is_torch_task(task: Task) -> bool:
    # A TorchTask exists only once its module was imported: a NumPy-only job never loads torch for this check.
    torch_task = sys.modules.get("fedloom.task.torch_task")
    return torch_task is not None and isinstance(task, torch_task.TorchTask)


def _probe_vectorized(task: Task, data: Federation) -> tuple[Any, str | None]:
    """The vectorized backend's probed model, or why it cannot run ``task``."""
    if not _is_torch_task(task):
        return None, f"it needs a TorchTask, this is a {type(task).__name__}"
    from fedloom.runtime.sim.vmap_model import inspect_model

    with user_code("probing the model for the vectorized backend"):
        return inspect_model(task, data)


def _cpu_backend(task: Task, data: Federation, settings: BackendConfig) -> tuple[str, str]:
    """``process`` when there are several cores and a client's work is big enough to ship, else ``inline``."""
    cores = settings.workers or os.cpu_count() or 1
    if cores < 2:
        return "inline", "one core, so worker processes would not help"
    seconds = _client_work_seconds(task, data)
    if seconds < _PROCESS_WORTH_SECONDS:
        return "inline", f"a client's work is too small ({seconds * 1e3:.1f} ms) to pay for worker processes"
    return "process", f"a client's work ({seconds * 1e3:.0f} ms) is worth spreading over {cores} processes"


def _client_work_seconds(task: Task, data: Federation) -> float:
    """A proxy for one client's work: evaluating the initial model on the first client's training data (a
    forward pass over it, about a third of one local epoch)."""
    ids = data.client_ids
    if not len(ids):
        return 0.0
    train = data.clients[ids[0]].train
    with user_code("probing a client's work (init_params, evaluate)"):
        params = task.init_params(0)
        start = time.perf_counter()
        task.evaluate(params, train)
    return time.perf_counter() - start


def _open(name: str, clients: SimulatedClients, settings: BackendConfig, probed: Any) -> Any:
    if name == "inline":
        return InlineGrid(clients)
    if name == "vectorized":
        from fedloom.runtime.sim.vectorized import VectorizedGrid

        return VectorizedGrid(
            clients, device=settings.device, memory_budget_mb=settings.memory_budget_mb, probed=probed
        )
    if name == "process":
        from fedloom.runtime.sim.process import ProcessGrid

        return ProcessGrid(clients, workers=settings.workers)
    from fedloom.runtime.sim.raygrid import RayGrid

    return RayGrid(clients, workers=settings.workers, address=settings.ray_address)


def _on_device(task: Task, device: str | None) -> Task:
    """``task`` moved to ``device`` (a TorchTask's ``device``); other tasks run on the CPU only."""
    if device is None:
        return task
    if not _is_torch_task(task):
        if device != "cpu":
            raise ConfigError(f"--device {device} applies to a TorchTask; this job's task is {type(task).__name__}")
        return task
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for, but torch sees no CUDA GPU on this machine")
    try:
        torch.empty(0, device=device)  # a device torch can name but not use (mps here, cuda:7 on one GPU)
    except (RuntimeError, AssertionError) as exc:
        first = str(exc).splitlines()[0].split(". ")[0][:200]
        raise ConfigError(f"--device {device} cannot be used here: {first}") from None
    moved: Task = dataclasses.replace(cast(Any, task), device=device)
    return moved
