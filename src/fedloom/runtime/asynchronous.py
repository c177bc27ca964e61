"""The asynchronous server loop, written once: keep clients training, update the model every few replies.

:func:`run_async` drives an :class:`~fedloom.strategy.base.AsyncStrategy` (FedBuff) over any grid: an
:class:`~fedloom.runtime.grid.AsyncGrid` hands replies back as each client finishes (a simulated grid on its
simulated clock), and any other grid becomes one through :class:`ThreadedGrid` (a deployment: each client's
exchange waits in a thread of its own).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedloom.core.errors import DecodeError, InvalidUpdateError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.privacy.ledger import fit_digest
from fedloom.runtime import readings
from fedloom.runtime.binding import ReplyCheck, Vetting
from fedloom.runtime.grid import AsyncGrid, Clocked, Exchange, Grid, Reply, ReplyHandler
from fedloom.runtime.loop import (
    CentralEvaluator,
    LoopResult,
    Resume,
    evaluate_round,
    server_generators,
    start_state,
    valid_update,
)
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundObserver, RoundRecord
from fedloom.strategy.base import AsyncStrategy, UpdateBuffer
from fedloom.strategy.snapshot import snapshot

__all__ = ["ThreadedGrid", "run_async"]

log = logging.getLogger("fedloom.server")

#: Replies in a row that bring nothing (dropped, late, refused) before the run gives up, per client training.
MISSES_PER_SLOT = 10
_STALE = "stale:"


@dataclass(frozen=True)
class _Started:
    """A client at work: the server version it started from and what it was sent."""

    version: int
    instruction: Message


def run_async(
    *,
    strategy: AsyncStrategy[Any],
    grid: Grid,
    initial_params: Params,
    rounds: int,
    seed: int,
    evaluate_central: CentralEvaluator | None = None,
    observers: Sequence[RoundObserver] = (),
    timeout: float | None = None,
    resume: Resume | None = None,
) -> LoopResult:
    """Run ``rounds`` server updates of an asynchronous strategy and return the final params and the history.

    ``strategy.concurrency`` clients train at all times, each started (by ``strategy.instruct``) on the newest
    model, drawn uniformly from the clients not training. Each reply is checked as
    :func:`~fedloom.runtime.loop.run_rounds` checks one (names, shapes, dtypes, finite values, against what
    that client was sent; a reply that states it answers another instruction is refused, and in a deployment a replay
    of an update the client sent before); a valid one goes into the strategy's buffer with its staleness (server updates
    since its client started), unless it is staler than ``strategy.max_staleness``; then an idle client
    starts in its place. Every ``strategy.buffer_size`` valid updates the server updates the model: that is
    one round of the history, with its training clients' records, ``staleness_mean`` and ``staleness_max``,
    ``sim_seconds`` on a :class:`~fedloom.runtime.grid.Clocked` grid (a client that sent several replies
    within one update has one record: see ``_merged``), then federated evaluation (of clients
    not training) and central evaluation as in ``run_rounds``. Clients still training when the last update is
    made are not waited for.

    ``timeout`` bounds each client's exchange on a grid that is not asynchronous itself (see
    :class:`ThreadedGrid`). The run ends with :class:`NotEnoughClientsError` when no client is left to train,
    or when ``MISSES_PER_SLOT * concurrency`` replies in a row bring no update. With ``resume``, the run goes
    on after ``resume.completed_rounds`` updates from the saved model and strategy state; the clients that
    were training then are not waited for.
    """
    fit_rng, eval_rng = server_generators(seed)
    state, first = start_state(strategy, initial_params, resume, fit_rng, eval_rng)
    vetting = Vetting.of(grid, resume.updates if resume is not None else None)
    workers = grid if isinstance(grid, AsyncGrid) else ThreadedGrid(grid, timeout)
    running: dict[str, _Started] = {}
    history: list[RoundRecord] = []
    misses = 0
    for server_round in range(first, rounds + 1):
        started = time.perf_counter()
        version = server_round - 1
        buffer: UpdateBuffer[Any] = strategy.buffer(server_round, state)
        fit_records: dict[str, ClientRecord] = {}
        staleness: list[int] = []
        clients = workers.client_ids()  # once a step: a deployment checks every client's token when asked
        check = vetting.check(server_round)
        while buffer.count < strategy.buffer_size:
            _keep_busy(strategy, workers, clients, version, state, running, fit_rng)
            if not running:
                clients = workers.client_ids()  # who is there now
                _keep_busy(strategy, workers, clients, version, state, running, fit_rng)
            if not running:
                raise NotEnoughClientsError(f"round {server_round}: no client is available to train")
            client_id, reply = workers.next_reply()
            start = running.pop(client_id)
            lag = version - start.version
            outcome, result = _take(strategy, client_id, start, reply, lag, server_round, check)
            fit_records[client_id] = _merged(fit_records.get(client_id), outcome)
            if result is None:
                if not (outcome.detail or "").startswith(_STALE):  # a stale update is no fault of the client's
                    misses += 1
                if misses >= MISSES_PER_SLOT * strategy.concurrency:
                    raise NotEnoughClientsError(
                        f"round {server_round}: the last {misses} replies were dropped, late or refused"
                    )
                continue
            misses = 0
            buffer.add(client_id, result, start.instruction.params, lag)
            staleness.append(lag)
        state, metrics = buffer.finish()
        metrics["staleness_mean"] = float(np.mean(staleness))
        metrics["staleness_max"] = float(max(staleness))
        if isinstance(workers, Clocked):
            metrics["sim_seconds"] = workers.clock
        idle = [cid for cid in clients if cid not in running] if running else clients
        evaluated = evaluate_round(
            strategy, workers, server_round, state, idle, eval_rng, timeout, evaluate_central, metrics, vetting
        )
        params = strategy.params(state)
        record = RoundRecord(
            server_round=server_round,
            metrics=metrics,
            clients=(*fit_records.values(), *evaluated),
            seconds=time.perf_counter() - started,
            random_state={"fit": fit_rng.bit_generator.state, "evaluate": eval_rng.bit_generator.state},
            strategy_state=snapshot(state, params),
        )
        history.append(record)
        for observer in observers:
            observer.on_round(record, params)
    return LoopResult(strategy.params(state), tuple(history))


def _keep_busy(
    strategy: AsyncStrategy[Any],
    workers: AsyncGrid,
    clients: Sequence[str],
    version: int,
    state: Any,
    running: dict[str, _Started],
    rng: np.random.Generator,
) -> None:
    """Start idle ``clients``, each on the model after ``version`` updates, until ``strategy.concurrency`` train."""
    while len(running) < strategy.concurrency:
        client_id = _idle_client(clients, running, rng)
        if client_id is None:
            return
        instruction = strategy.instruct(version, state, client_id, rng)
        running[client_id] = _Started(version, instruction)
        workers.submit(client_id, instruction)


def _idle_client(clients: Sequence[str], running: Mapping[str, Any], rng: np.random.Generator) -> str | None:
    """A client drawn uniformly from ``clients`` that is not in ``running``; ``None`` when all are. Draws at
    random first (a large population has few clients training), then from the list of idle ones."""
    if not clients:
        return None
    for _ in range(16):
        client_id = clients[int(rng.integers(len(clients)))]
        if client_id not in running:
            return client_id
    idle = [cid for cid in clients if cid not in running]
    return idle[int(rng.integers(len(idle)))] if idle else None


def _take(
    strategy: AsyncStrategy[Any],
    client_id: str,
    start: _Started,
    reply: Reply | None,
    staleness: int,
    server_round: int,
    check: ReplyCheck,
) -> tuple[ClientRecord, FitResult | None]:
    """The record of one training reply and the update to buffer (``None``: dropped, refused or too stale);
    ``check`` holds it against its instruction and the client's earlier updates."""
    if reply is None:
        return ClientRecord(client_id=client_id, phase="fit", status=ClientStatus.DROPPED), None
    sent = readings.read(reply.message, client_id)
    record = ClientRecord(
        client_id=client_id,
        phase="fit",
        status=ClientStatus.OK,
        seconds=reply.seconds,
        bytes_down=reply.bytes_down,
        bytes_up=reply.bytes_up,
        metrics=readings.record_metrics({}, sent, reply.upload_seconds),
        logs=sent.logs,
    )
    failure = readings.failure(reply.message)
    if failure is not None:
        log.warning("round %d: the fit of client %s failed: %s", server_round, client_id, failure)
        return replace(record, status=ClientStatus.DROPPED, detail=f"its task failed: {failure}"), None
    try:  # checked as the synchronous loop checks a reply: against what this client was sent
        result = valid_update(strategy, {client_id: start.instruction})(client_id, reply.message)
    except (DecodeError, InvalidUpdateError) as exc:
        log.warning("round %d: refused the fit reply of client %s: %s", server_round, client_id, exc)
        return _refused(record, str(exc)), None
    digest = fit_digest(result)
    why = check.refusal(client_id, reply.message, start.instruction, digest)
    if why is not None:
        log.warning("round %d: refused the fit reply of client %s: %s", server_round, client_id, why)
        return _refused(record, why), None
    max_staleness = strategy.max_staleness
    if max_staleness is not None and staleness > max_staleness:
        why = f"{_STALE} trained on a model {staleness} updates old, over max_staleness={max_staleness}"
        return _refused(record, why), None
    ok = replace(
        record,
        num_examples=result.num_examples,
        loss=result.metrics.get("loss"),
        accuracy=result.metrics.get("accuracy"),
        metrics={**readings.record_metrics(result.metrics, sent, reply.upload_seconds), "staleness": float(staleness)},
        update_sha256=digest,
    )
    return ok, result


def _merged(earlier: ClientRecord | None, later: ClientRecord) -> ClientRecord:
    """One record of a client's training replies within one server update (a fast client may send several):
    ``later``'s numbers, with the examples, seconds and bytes of both added up, ``updates`` in its metrics
    counting the updates used, and OK where either was."""
    if earlier is None:
        return replace(later, metrics={**later.metrics, "updates": float(later.status == ClientStatus.OK)})
    used = earlier.metrics.get("updates", 0.0) + float(later.status == ClientStatus.OK)
    ok = ClientStatus.OK in (earlier.status, later.status)
    base = later if later.status == ClientStatus.OK or not ok else earlier
    return replace(
        base,
        status=ClientStatus.OK if ok else later.status,
        num_examples=earlier.num_examples + later.num_examples,
        seconds=earlier.seconds + later.seconds,
        bytes_down=earlier.bytes_down + later.bytes_down,
        bytes_up=earlier.bytes_up + later.bytes_up,
        metrics={**base.metrics, "updates": used},
        detail=later.detail or earlier.detail,
        update_sha256=",".join(d for d in (earlier.update_sha256, later.update_sha256) if d) or None,
        logs=earlier.logs + later.logs,
    )


def _refused(record: ClientRecord, why: str) -> ClientRecord:
    return replace(record, status=ClientStatus.REFUSED, detail=why)


class ThreadedGrid:
    """Any grid as an :class:`~fedloom.runtime.grid.AsyncGrid`: :meth:`submit` runs the client's exchange
    (``send_and_receive`` of that one client, bounded by ``timeout``) in a thread of its own, and
    :meth:`next_reply` returns the exchanges as they end. The wrapped grid must allow exchanges from several
    threads at once, as the deployment's :class:`~fedloom.runtime.net.grid.NetGrid` does. An exchange that
    raises counts as a dropped client (and is logged)."""

    def __init__(self, grid: Grid, timeout: float | None = None) -> None:
        self._grid = grid
        self._timeout = timeout
        self._done: queue.Queue[tuple[str, Reply | None]] = queue.Queue()

    def client_ids(self) -> Sequence[str]:
        return self._grid.client_ids()

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        return self._grid.send_and_receive(messages, timeout, on_reply)

    def submit(self, client_id: str, message: Message) -> None:
        threading.Thread(
            target=self._exchange, args=(client_id, message), name=f"fedloom-async-{client_id}", daemon=True
        ).start()

    def next_reply(self) -> tuple[str, Reply | None]:
        return self._done.get()

    def _exchange(self, client_id: str, message: Message) -> None:
        reply: Reply | None = None
        try:
            reply = self._grid.send_and_receive({client_id: message}, self._timeout).replies.get(client_id)
        except Exception:
            log.exception("client %s: its exchange failed", client_id)
        finally:
            self._done.put((client_id, reply))
