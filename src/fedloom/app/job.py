"""``Job``: the one description of a federated job (task, data, strategy, defaults), and how to load one.

A job file is a Python file that defines a module-level ``job = fedloom.Job(...)``. The same file runs under
``fedloom simulate``; the command line only overrides the defaults in ``job.simulation`` and the strategy.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from fedloom.core.config import SimulationConfig
from fedloom.core.errors import ConfigError, JobError, user_code
from fedloom.core.jobfile import import_job_file, is_job_module
from fedloom.data.base import Dataset, Federation
from fedloom.runtime.client import Mod
from fedloom.strategy.base import Strategy
from fedloom.strategy.fedavg import FedAvg
from fedloom.task.base import Task

__all__ = ["Job", "builtin_examples", "load_job"]

JOB_FILE_MODULE = "<job file>"  # how describe() names the module of a job file


@dataclass(frozen=True)
class Job:
    """A federated job.

    - ``task``: what each client computes (a :class:`fedloom.TorchTask`, :class:`fedloom.LogisticRegressionTask`
      or your own :class:`fedloom.task.Task`).
    - ``data``: a function returning the centralized :class:`fedloom.data.Dataset`, which the simulation
      partitions over its clients; or a ready federation (:class:`fedloom.data.LazyFederation`: a million
      clients whose data is made when sampled). It is called with ``data_dir=`` (the ``--data`` folder, or
      ``None``) where it takes that argument, and with ``num_clients=`` and ``seed=`` where it takes them as
      keyword-only arguments (see :meth:`load_data`). It runs only when the job runs, so defining a job is
      cheap.
    - ``strategy``: the federated algorithm (default: FedAvg).
    - ``simulation``: default simulation settings (clients, rounds, partition...), which flags override.
    - ``mods``: client mods of your own (see :mod:`fedloom.runtime.client`), each called as
      ``mod(message, context, call_next)`` on every instruction a client answers, in simulation and deployment
      alike; outermost first, inside the telemetry and outside the protocol mods. A job with mods of its own
      does not run on the vectorized backend, which trains many clients in one batched call.
    - ``name``: a short name for run directories and listings.
    - ``source``: where the job was loaded from (a job file's path or an example's name); :func:`load_job` sets
      it, and backends that start worker processes import it there before they unpickle the task.
    """

    task: Task
    data: Callable[..., Dataset]
    strategy: Strategy[Any] = field(default_factory=FedAvg)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    name: str = "job"
    mods: tuple[Mod, ...] = ()
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.task, Task):
            raise ConfigError(f"Job.task must implement init_params, fit and evaluate; got {type(self.task).__name__}")
        if not callable(self.data):
            raise ConfigError("Job.data must be a function that returns a fedloom.data.Dataset")
        for name in ("init", "params", "configure_fit", "aggregate_fit", "configure_evaluate", "aggregate_evaluate"):
            if not callable(getattr(self.strategy, name, None)):
                raise ConfigError(f"Job.strategy must be a strategy such as fedloom.FedAvg(); got {self.strategy!r}")
        if not isinstance(self.simulation, SimulationConfig):
            raise ConfigError(
                f"Job.simulation must be a fedloom.SimulationConfig; got {type(self.simulation).__name__}"
            )
        if not isinstance(self.mods, (tuple, list)) or not all(callable(mod) for mod in self.mods):
            raise ConfigError(
                "Job.mods must be a tuple of client mods, each callable as mod(message, context, call_next)"
            )
        object.__setattr__(self, "mods", tuple(self.mods))
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Job.name must be a non-empty string; got {self.name!r}")

    def load_data(
        self, data_dir: str | None, *, num_clients: int | None = None, seed: int | None = None
    ) -> Dataset | Federation:
        """Call ``data`` and check what it returned: a :class:`Dataset` to partition, or a ready
        :class:`~fedloom.data.base.Federation` (such as a lazy cross-device population) to use as it is.

        ``data_dir`` is passed where ``data`` takes an argument of that name; a ``data_dir`` that it does not
        take is an error. ``num_clients`` and ``seed`` are passed only to keyword-only arguments of those names
        (``def population(*, num_clients=1_000_000, seed=0)``) that a ``functools.partial`` has not bound: a
        loader's own ``seed`` (its train/test split) or a partial's ``num_clients=30`` stays as the job wrote it.
        """
        try:
            parameters = inspect.signature(self.data).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]
        bound = self.data.keywords if isinstance(self.data, functools.partial) else {}
        if data_dir is not None and "data_dir" not in parameters:
            raise ConfigError(f"job {self.name!r} does not read a data folder, but --data {data_dir} was given")
        kwargs: dict[str, Any] = {"data_dir": data_dir} if "data_dir" in parameters else {}
        for name, value in (("num_clients", num_clients), ("seed", seed)):
            parameter = parameters.get(name)
            opted_in = parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY
            if opted_in and name not in bound and value is not None:
                kwargs[name] = value
        with user_code(f"loading the data of job {self.name!r}"):
            loaded = self.data(**kwargs)
        if isinstance(loaded, Dataset) or _is_federation(loaded):
            return loaded
        raise JobError(
            f"the data function of job {self.name!r} returned {type(loaded).__name__}, "
            "not a Dataset (or a Federation such as fedloom.data.LazyFederation)"
        )


def _is_federation(value: object) -> bool:
    return all(hasattr(value, name) for name in ("clients", "client_ids", "central_test", "num_classes", "name"))


def describe(value: Any) -> Any:
    """A JSON description of a config value: dataclasses field by field, functions by qualified name (a job
    file's own as ``<job file>.NAME``, wherever the file lies)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        # Private fields (caches) are not configuration, and their reprs hold memory addresses.
        public = [f for f in fields(value) if f.repr and not f.name.startswith("_")]
        return {"type": type(value).__name__, **{f.name: describe(getattr(value, f.name)) for f in public}}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    default_repr: Any = object.__repr__
    if type(value).__repr__ is default_repr and hasattr(value, "__dict__"):
        # A plain object (a user's task wrapper): its public attributes, never its address, which changes
        # from run to run (a resumed deployment compares descriptions).
        attributes = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        return {"type": type(value).__qualname__, **{k: describe(v) for k, v in attributes.items()}}
    if callable(value):
        module = getattr(value, "__module__", None) or "?"
        # A job file's module is named after its path (import_job_file): the same job elsewhere is the same job.
        shown = JOB_FILE_MODULE if is_job_module(module) else module
        return f"{shown}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def builtin_examples() -> list[str]:
    """Names of the example jobs shipped with fedloom (``fedloom simulate NAME``)."""
    examples = importlib.import_module("fedloom.examples")
    return sorted(m.name for m in pkgutil.iter_modules(examples.__path__) if not m.name.startswith("_"))


def load_job(ref: str) -> Job:
    """Load a job from a job file path (``path/to/job.py``) or a built-in example name (``digits``).

    Raises :class:`JobError` with a one-line reason when the file is missing, raises while loading, or
    defines no ``job``; and when the name is neither a file nor a built-in example.
    """
    path = Path(ref)
    if path.suffix == ".py" or path.is_file():
        if not path.is_file():
            raise JobError(f"job file {ref} does not exist")
        module = import_job_file(path)
        where = str(path)
    else:
        if ref not in builtin_examples():
            raise JobError(
                f"unknown example {ref!r}: give a job file (path/to/job.py) or one of {', '.join(builtin_examples())}"
            )
        module = importlib.import_module(f"fedloom.examples.{ref}")
        where = f"example {ref!r}"
    job = getattr(module, "job", None)
    if not isinstance(job, Job):
        raise JobError(f"{where} must define `job = fedloom.Job(...)` at module level")
    return dataclasses.replace(job, source=str(path.resolve()) if where == str(path) else ref)
