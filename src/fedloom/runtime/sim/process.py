"""The process-pool simulation grid: clients run in worker processes, one core each."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import time
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import (
    ConfigError,
    FedloomError,
    JobError,
)
from fedloom.core.message import Message
from fedloom.data.base import ClientData, FederatedData
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler, hand_over
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.workers import (
    Header,
    RoundQueues,
    check_workers,
    decode_client_data,
    encode_client_data,
    error_header,
    prepare_worker,
    remote_error,
    run_client,
    stays_home,
)

__all__ = ["ProcessGrid"]

# -- the worker process ------------------------------------------------------------------------------------


def _send(conn: Connection, header: Header, *payloads: bytes) -> None:
    conn.send_bytes(json.dumps(header).encode())
    for payload in payloads:
        conn.send_bytes(payload)


def _worker_main(conn: Connection, app_blob: bytes, job_file: str | None, state_root: str | None) -> None:
    """A worker: load the client app, then answer ``run`` requests one at a time until ``stop`` or the parent goes.

    Request: a JSON header ``{"op": "run", "client", "kind", "data": bool, "keep": bool}``, then the client's
    encoded data if ``data``, then the encoded instruction. Answer: the header of :func:`run_client`, then the
    encoded reply.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    try:
        if job_file is not None:
            from fedloom.core.jobfile import import_job_file

            import_job_file(Path(job_file))
        try:
            app = pickle.loads(app_blob)
        except Exception as exc:
            hint = "" if job_file is not None else "; if the task comes from a job file, pass job_file=job.source"
            raise ConfigError(f"a worker process cannot load the task ({type(exc).__name__}: {exc}){hint}") from exc
        prepare_worker()
    except Exception as exc:
        _send(conn, error_header(exc))
        return
    _send(conn, {"status": "ready"})
    cache: dict[str, ClientData] = {}
    try:
        while True:
            header = json.loads(conn.recv_bytes())
            if header["op"] == "stop":
                return
            client_id = header["client"]
            data = decode_client_data(conn.recv_bytes()) if header["data"] else cache[client_id]
            if header["keep"]:
                cache[client_id] = data
            answer, up = run_client(app, data, client_id, header["kind"], conn.recv_bytes(), state_root)
            _send(conn, answer, up)
    except (EOFError, OSError):
        return  # the parent closed the pipe or died: nobody is left to answer


# -- the parent side ----------------------------------------------------------------------------------------


class _Workers:
    """The worker processes and their pipes; kept apart from the grid so that a finalizer can stop them."""

    def __init__(self, count: int, app_blob: bytes, job_file: str | None, state_root: str | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.closed = False
        try:
            for index in range(count):
                here, there = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main,
                    args=(there, app_blob, job_file, state_root),
                    name=f"fedloom-worker-{index}",
                    daemon=True,
                )
                process.start()
                there.close()
                self.processes.append(process)
                self.conns.append(here)
        except BaseException:
            self.shutdown(graceful=False)
            raise

    def send(self, worker: int, header: Header, *payloads: bytes) -> None:
        try:
            _send(self.conns[worker], header, *payloads)
        except OSError:
            raise self.died(worker, f"while receiving client {header.get('client')}") from None

    def receive(self, doing: Mapping[int, str]) -> list[tuple[int, Header, bytes]]:
        """Wait until at least one of the workers in ``doing`` (worker -> what it is doing, for errors) answers;
        return every answer ready by then.

        Raises :class:`JobError` as soon as any worker process has stopped, instead of waiting forever.
        """
        conns = {self.conns[worker]: worker for worker in doing}
        sentinels = {process.sentinel: worker for worker, process in enumerate(self.processes)}
        ready = wait([*conns, *sentinels])
        answers: list[tuple[int, Header, bytes]] = []
        for item in ready:
            if isinstance(item, Connection):
                worker = conns[item]
                try:
                    header = json.loads(item.recv_bytes())
                    payload = item.recv_bytes() if header.get("status") == "ok" else b""
                except (EOFError, OSError):
                    raise self.died(worker, doing[worker]) from None
                answers.append((worker, header, payload))
        answered = {worker for worker, _, _ in answers}
        for item in ready:
            if isinstance(item, int) and sentinels[item] not in answered:
                raise self.died(sentinels[item], doing.get(sentinels[item], "while idle"))
        return answers

    def died(self, worker: int, doing: str) -> JobError:
        process = self.processes[worker]
        process.join(1)
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        if code == -signal.SIGKILL:
            how += " (out of memory?)"
        return JobError(f"simulation worker {worker} (pid {process.pid}) {how} {doing}")

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker: ask politely (if ``graceful``), then terminate, then kill. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if graceful:
            for conn in self.conns:
                with contextlib.suppress(OSError):  # that worker is gone already
                    _send(conn, {"op": "stop"})
            deadline = time.monotonic() + 5.0
            for process in self.processes:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()


class ProcessGrid:
    """Simulated clients run in a pool of ``workers`` processes (default: one per CPU core).

    Each client runs the same code as under :class:`~fedloom.runtime.sim.inline.InlineGrid` (the same app,
    same encoding, same task calls, replies in the order asked), so a run gives bit-identical results on
    either backend; only the wall time differs. Workers give torch one thread each, and torch's CPU kernels
    may sum in a different order with more threads, so the inline run to compare with is one made with
    ``torch.set_num_threads(1)``. ``Reply.seconds`` is the worker's compute time for the client.

    - The client app (the task and its mods) is pickled once and unpickled in every worker at start. Parent
      and workers are the same user on the same machine, so this crosses no trust boundary; messages, replies
      and client data cross as fedloom's own encoding. An app that cannot be pickled raises
      :class:`ConfigError` here. A task defined in a job file needs ``clients.job_file`` (``job.source``):
      workers import that file first.
    - A client belongs to one worker (a hash of its id), which receives its data the first time and keeps
      it; an idle worker takes queued clients from a busy one (see :class:`RoundQueues`). The data of a lazy
      federation (not a :class:`FederatedData`) goes with every instruction and is not kept, so memory stays
      bounded however many distinct clients are sampled over a run.
    - A task that raises ends the run with the same error as inline (a :class:`JobError` naming the client
      and the exception); a worker process that dies raises a :class:`JobError` at once. Either way the grid
      is closed.
    - Workers are started processes (``spawn``), so a script that creates a ``ProcessGrid`` needs an
      ``if __name__ == "__main__":`` guard. They are daemonic (a task cannot start processes of its own) and
      stop on :meth:`close`, when the grid is garbage-collected, when this process exits, or when it dies.
    - ``timeout`` is ignored, as inline ignores it: simulated lateness comes from the simulation's system
      model, never from this machine's speed.

    >>> with ProcessGrid(SimulatedClients.of(task, federation), workers=4) as grid:  # doctest: +SKIP
    ...     result = run_rounds(strategy=FedAvg(), grid=grid, initial_params=..., rounds=5, seed=0)
    """

    def __init__(self, clients: SimulatedClients, *, workers: int | None = None) -> None:
        check_workers(workers)
        data = clients.data
        self._data = data
        try:
            app_blob = pickle.dumps(clients.app, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ConfigError(
                f"the task cannot be sent to worker processes ({type(exc).__name__}: {exc}); define the model "
                "factory (and any client mod) as a module-level function in the job file, not a lambda or a nested "
                "function"
            ) from None
        count = min(workers or os.cpu_count() or 1, max(1, len(data.client_ids)))
        self._workers = _Workers(count, app_blob, clients.job_file, clients.state_dir)
        self._finalizer = weakref.finalize(self, self._workers.shutdown)
        self._has_data: list[set[str]] = [set() for _ in range(count)]
        # An in-memory federation is shipped once and kept by the workers; a lazy one (a million clients, each
        # made when sampled) is shipped with every instruction, so that no process holds every client ever seen.
        self._keep_data = isinstance(data, FederatedData)
        try:
            self._await_start()
        except BaseException:
            self._abort()
            raise

    @property
    def workers(self) -> int:
        """How many worker processes run the clients."""
        return len(self._workers.processes)

    def client_ids(self) -> Sequence[str]:
        return self._data.client_ids

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        if self._workers.closed:
            raise FedloomError("this ProcessGrid is closed")
        work = list(messages)
        queues = RoundQueues(work, self.workers, steal=not stays_home(messages))
        busy: dict[int, tuple[str, str, int]] = {}  # worker -> (client, kind, bytes down)
        replies: dict[str, Reply] = {}
        try:
            for worker in range(self.workers):
                self._dispatch(worker, queues, messages, busy)
            while busy:
                doing = {worker: f"while running client {cid} in {kind}" for worker, (cid, kind, _) in busy.items()}
                for worker, header, up in self._workers.receive(doing):
                    client_id, _, down = busy.pop(worker)
                    if header["status"] != "ok":
                        raise remote_error(header)
                    replies[client_id] = Reply(decode_message(up), float(header["seconds"]), down, len(up))
                    self._dispatch(worker, queues, messages, busy)
        except BaseException:
            self._abort()
            raise
        # In the order asked, as inline replies: aggregation sums in this order, so it must not depend on timing.
        return hand_over(Exchange({client_id: replies[client_id] for client_id in work}), on_reply)

    def close(self) -> None:
        """Stop the worker processes (waiting a few seconds for a client that is still running). Idempotent."""
        self._finalizer()

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _dispatch(
        self,
        worker: int,
        queues: RoundQueues,
        messages: Mapping[str, Message],
        busy: dict[int, tuple[str, str, int]],
    ) -> None:
        """Send ``worker`` its next client, with the client's data unless the worker already holds it."""
        nxt = queues.next_for(worker)
        if nxt is None:
            return
        client_id, own = nxt
        message = messages[client_id]
        down = encode_message(message)
        payloads = [down]
        own = own and self._keep_data
        needs_data = not own or client_id not in self._has_data[worker]
        if needs_data:
            payloads.insert(0, encode_client_data(client_id, self._data.clients[client_id]))
            if own:
                self._has_data[worker].add(client_id)
        header = {"op": "run", "client": client_id, "kind": message.kind, "data": needs_data, "keep": own}
        self._workers.send(worker, header, *payloads)
        busy[worker] = (client_id, message.kind, len(down))

    def _await_start(self) -> None:
        waiting = set(range(self.workers))
        while waiting:
            try:
                answers = self._workers.receive(dict.fromkeys(waiting, "while starting"))
            except JobError as exc:
                raise JobError(
                    f'{exc}; a script that uses worker processes needs `if __name__ == "__main__":`'
                ) from None
            for worker, header, _ in answers:
                if header["status"] != "ready":
                    raise remote_error(header)
                waiting.discard(worker)

    def _abort(self) -> None:
        """After a failure: stop the workers at once, without waiting for clients still running."""
        self._workers.shutdown(graceful=False)
        self._finalizer.detach()
