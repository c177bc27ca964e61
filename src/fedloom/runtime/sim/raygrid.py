"""The Ray simulation grid: clients run in Ray actors, on this machine or on a Ray cluster.

Ray is an optional extra (``pip install 'fedloom[ray]'``) and is imported only when a ``RayGrid`` is made.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import traceback
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import ConfigError, FedloomError, JobError
from fedloom.core.message import Message
from fedloom.data.base import ClientData, FederatedData
from fedloom.runtime.client import ClientApp
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler, hand_over
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.workers import (
    Header,
    RoundQueues,
    check_workers,
    decode_client_data,
    encode_client_data,
    prepare_worker,
    remote_error,
    run_client,
    stays_home,
)

__all__ = ["RayGrid"]

# How long the actors may take to be placed and to load the task (a busy or autoscaling cluster is slow).
_START_SECONDS = 120.0
# ray.init waits minutes for an address where nothing listens; a plain TCP connection tells at once.
_CONNECT_SECONDS = 5.0


class _RayWorker:
    """A Ray actor: the client app, the data of the clients it has been given to keep, and the inline client code."""

    def __init__(self, app_blob: bytes, sys_path: list[str], state_root: str | None) -> None:
        # Modules importable in the driver (a test module, a package under development) are then importable
        # here too when this actor runs on the driver's machine; elsewhere, missing folders are skipped.
        sys.path.extend(folder for folder in sys_path if folder not in sys.path)
        self._cache: dict[str, ClientData] = {}
        self._state_root = state_root
        self._failure: Header | None = None
        try:
            self._app: ClientApp = pickle.loads(app_blob)
        except Exception as exc:
            self._failure = {
                "type": "ConfigError",
                "message": f"a Ray worker cannot load the task ({type(exc).__name__}: {exc})",
                "traceback": traceback.format_exc(),
            }
        prepare_worker()

    def ready(self) -> Header | None:
        """``None`` once the task is loaded, else why it could not be (for :func:`remote_error`)."""
        return self._failure

    def run(self, client_id: str, kind: str, down: bytes, data: list[Any], keep: bool) -> tuple[Header, bytes]:
        """Run one client. ``data`` is ``[ObjectRef]`` of the client's encoded data; being nested in a list,
        Ray does not fetch it unless this actor does not hold the client's data already."""
        client = self._cache.get(client_id)
        if client is None:
            import ray

            client = decode_client_data(ray.get(data[0]))
            if keep:
                self._cache[client_id] = client
        return run_client(self._app, client, client_id, kind, down, self._state_root)


class RayGrid:
    """Simulated clients run in ``workers`` Ray actors of one CPU each (default: one per CPU of the cluster).

    Each client runs the same code as under :class:`~fedloom.runtime.sim.inline.InlineGrid`, as in
    :class:`~fedloom.runtime.sim.process.ProcessGrid`, so results are bit-identical to an inline run made with
    one torch thread; the dropout rule, the work stealing between workers and the errors are also the same.

    - ``address=None`` starts a Ray on this machine with ``workers`` CPUs (or one per core) and stops it on
      :meth:`close`; an ``address`` (``host:port`` of a cluster's head) connects to that cluster and only
      disconnects on close. A Ray that this process has already initialised is used as it is, and left running.
      An unreachable cluster raises :class:`ConfigError` with the address and the reason.
    - The client app (the task and its mods) is pickled once, with Ray's cloudpickle, and loaded by every
      actor. Modules of job files (loaded by :func:`fedloom.load_job`) are pickled by value, so the cluster's
      machines need fedloom and the task's libraries installed, but not the job file (``clients.job_file`` is
      not used); actors also search this process's ``sys.path``, so that a task from, say, a test module
      loads in a Ray on this machine. Messages, replies and client data are fedloom's own
      encoding; each client's data is put in Ray's object store once and kept by the actor it belongs to.
    - Client state (``state_dir``) is a folder of the machine an actor runs on: on a cluster of several
      machines, a stateful algorithm needs ``state_dir`` on a file system they share.
    - A task that raises ends the run with the same :class:`JobError` as inline; an actor that dies raises a
      :class:`JobError` naming the client. Either way the grid is closed.
    """

    def __init__(self, clients: SimulatedClients, *, workers: int | None = None, address: str | None = None) -> None:
        check_workers(workers)
        ray = _import_ray()
        self._state_dir = clients.state_dir
        self._ray = ray
        self._data = clients.data
        self._data_refs: dict[str, Any] = {}
        self._keep_data = isinstance(clients.data, FederatedData)  # a lazy federation's data is sent per call, not kept
        owns = _connect(ray, address, workers)
        self._actors: list[Any] = []
        self._finalizer = weakref.finalize(self, _release, ray, self._actors, owns)
        try:
            self._start(clients.app, workers)
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        """How many Ray actors run the clients."""
        return len(self._actors)

    def client_ids(self) -> Sequence[str]:
        return self._data.client_ids

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        if not self._finalizer.alive:
            raise FedloomError("this RayGrid is closed")
        ray = self._ray
        work = list(messages)
        queues = RoundQueues(work, self.workers, steal=not stays_home(messages))
        pending: dict[Any, tuple[int, str, str, int]] = {}  # result ref -> (worker, client, kind, bytes down)
        replies: dict[str, Reply] = {}

        def dispatch(worker: int) -> None:
            nxt = queues.next_for(worker)
            if nxt is None:
                return
            client_id, own = nxt
            message = messages[client_id]
            down = encode_message(message)
            own = own and self._keep_data
            data_ref = self._data_ref(client_id, own)
            ref = self._actors[worker].run.remote(client_id, message.kind, down, [data_ref], own)
            pending[ref] = (worker, client_id, message.kind, len(down))

        try:
            for worker in range(self.workers):
                dispatch(worker)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    worker, client_id, kind, down = pending.pop(ref)
                    try:
                        header, up = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise JobError(
                            f"Ray worker {worker} failed while running client {client_id} in {kind}: "
                            f"{type(exc).__name__}: {_first_line(exc)}"
                        ) from exc
                    if header["status"] != "ok":
                        raise remote_error(header)
                    replies[client_id] = Reply(decode_message(up), float(header["seconds"]), down, len(up))
                    dispatch(worker)
        except BaseException:
            self.close()
            raise
        # In the order asked, as inline replies: aggregation sums in this order, so it must not depend on timing.
        return hand_over(Exchange({client_id: replies[client_id] for client_id in work}), on_reply)

    def close(self) -> None:
        """Stop the actors, and the Ray this grid started (a connected cluster keeps running). Idempotent."""
        self._data_refs.clear()
        self._finalizer()

    def __enter__(self) -> RayGrid:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self, app: ClientApp, workers: int | None) -> None:
        ray = self._ray
        for name, module in list(sys.modules.items()):
            if name.startswith("fedloom_job_") and module is not None:
                ray.cloudpickle.register_pickle_by_value(module)
        try:
            app_blob = ray.cloudpickle.dumps(app)
        except Exception as exc:
            raise ConfigError(f"the task cannot be sent to Ray workers ({type(exc).__name__}: {exc})") from None
        cpus = int(ray.cluster_resources().get("CPU", 0))
        count = min(workers or cpus or 1, max(1, len(self._data.client_ids)))
        actor_class = ray.remote(num_cpus=1, max_restarts=0)(_RayWorker)
        app_ref = ray.put(app_blob)  # stored once, however many actors load it
        self._actors.extend(actor_class.remote(app_ref, list(sys.path), self._state_dir) for _ in range(count))
        try:
            failures = ray.get([actor.ready.remote() for actor in self._actors], timeout=_START_SECONDS)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"the Ray cluster did not start {count} workers of one CPU each within {_START_SECONDS:.0f} s "
                f"(it has {cpus} CPUs)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise JobError(f"Ray workers failed to start: {type(exc).__name__}: {_first_line(exc)}") from None
        for failure in failures:
            if failure is not None:
                raise remote_error(failure)

    def _data_ref(self, client_id: str, keep: bool) -> Any:
        """The object-store reference of a client's encoded data: put there the first time it is needed and
        kept if ``keep``, else put for this one call (Ray frees it once nothing refers to it)."""
        ref = self._data_refs.get(client_id)
        if ref is None:
            ref = self._ray.put(encode_client_data(client_id, self._data.clients[client_id]))
            if keep:
                self._data_refs[client_id] = ref
        return ref


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs the ray extra: pip install 'fedloom[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Start or join Ray unless this process already has; return whether closing the grid should shut it down."""
    if ray.is_initialized():
        return False
    if address is None:
        # Ray waits 30 s for its GCS to write its port; on a loaded machine (a CI runner beside other work) that
        # start has taken longer, so wait up to 120 s unless the operator set the wait.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        try:
            # "local" always starts a new Ray; None would join the last one `ray start` left on this machine.
            ray.init(
                address="local",
                num_cpus=workers or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
            )
        except Exception as exc:
            ray.shutdown()  # stop what the failed start left running (its GCS, raylet), not leave it to the GC
            raise ConfigError(f"cannot start a local Ray: {type(exc).__name__}: {_first_line(exc)}") from None
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address}: {type(exc).__name__}: {_first_line(exc)} (a cluster "
            "with token authentication also needs RAY_AUTH_MODE=token and its token here)"
        ) from None
    return True


def _check_reachable(address: str) -> None:
    """Fail fast when nothing listens at a ``host:port`` address (other forms are left to Ray)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=_CONNECT_SECONDS).close()
    except OSError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}") from None


def _release(ray: Any, actors: list[Any], owns: bool) -> None:
    for actor in actors:
        with contextlib.suppress(Exception):  # Ray is already down, or the actor is already gone
            ray.kill(actor)
    actors.clear()
    if owns and ray.is_initialized():
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
