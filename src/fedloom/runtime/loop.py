"""The server loop, written once: drive a ``Strategy`` over a ``Grid`` for a number of rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np

from fedloom.core.errors import (
    ConfigError,
    DecodeError,
    DivergedError,
    InvalidUpdateError,
    NotEnoughClientsError,
    RoundFailedError,
    StopRunError,
)
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.core.validation import all_finite, check_update
from fedloom.privacy.ledger import fit_digest
from fedloom.runtime import readings
from fedloom.runtime.binding import ReplyCheck, Vetting
from fedloom.runtime.grid import Clocked, Declaring, Exchange, Grid, Reply
from fedloom.runtime.protocol import run_fit_protocol
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundObserver, RoundRecord
from fedloom.runtime.screening import RoundScreen
from fedloom.strategy.base import (
    AsyncStrategy,
    FitFold,
    FoldingStrategy,
    ProtocolStrategy,
    ReshapingStrategy,
    ScreenedStrategy,
    Strategy,
)
from fedloom.strategy.snapshot import Snapshot, restore, snapshot

__all__ = ["LoopResult", "Resume", "run_rounds"]

log = logging.getLogger("fedloom.server")

CentralEvaluator = Callable[[Params], EvalResult]


@dataclass(frozen=True)
class LoopResult:
    """The global params after the last round, and every round's record."""

    params: Params
    history: tuple[RoundRecord, ...]


@dataclass(frozen=True)
class Resume:
    """Where a run that was cut short picks up: the rounds it completed, the global params after the last of
    them, the server's random state then (``RoundRecord.random_state`` of that round) and the strategy's state
    (``RoundRecord.strategy_state``; ``None`` where none was saved: the strategy then starts again from
    ``init(params)``). ``updates`` are the digests of the fit updates each client sent in the rounds done, with
    the round each first came in (client -> digest -> round; what the privacy ledger lists), so that an update
    replayed across the restart is refused as one within the run is."""

    completed_rounds: int
    params: Params
    random_state: Mapping[str, Any]
    strategy_state: Snapshot | None = None
    updates: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def run_rounds(
    *,
    strategy: Strategy[Any],
    grid: Grid,
    initial_params: Params,
    rounds: int,
    seed: int,
    evaluate_central: CentralEvaluator | None = None,
    observers: Sequence[RoundObserver] = (),
    timeout: float | None = None,
    resume: Resume | None = None,
    exclude: frozenset[str] = frozenset(),
) -> LoopResult:
    """Run ``rounds`` rounds of federated training and return the final global params and the history.

    Each round: the strategy picks clients and instructions; the grid delivers them and gathers replies;
    every update is checked against the params its client was sent (names, shapes, dtypes, finite values:
    the global model, plus whatever else the algorithm sends, such as SCAFFOLD's control variates; or the
    layout a :class:`~fedloom.strategy.base.ReshapingStrategy` expects back) and a bad one is refused, logged
    and recorded, never aggregated; so is a reply that states it answers another round or instruction, or was built
    on another model, than what its client was sent, and, on a :class:`~fedloom.runtime.grid.Binding` grid (a
    deployment), a reply that states nothing and a fit update byte-identical to one the same client sent before in
    the run (a replay, named with the round it first came in; an update equal to the params it was sent is none):
    see :mod:`fedloom.runtime.binding`; if fewer than ``strategy.min_clients`` valid updates
    remain, :class:`NotEnoughClientsError` ends the run; otherwise the strategy aggregates. A
    :class:`~fedloom.strategy.base.FoldingStrategy` (FedAvg) aggregates each update as it arrives, so only
    the updates in flight are held, not all of them. Then federated evaluation (if the strategy asks for
    it), central evaluation on the server (if ``evaluate_central`` is given), and every observer sees the
    round (with ``sim_seconds``, the simulated clock, where the grid is :class:`~fedloom.runtime.grid.Clocked`).
    Client sampling draws from generators seeded by ``seed``, so the same seed selects the same
    clients; training and evaluation draw from separate ones, so how clients are evaluated never changes how
    the model is trained.

    A :class:`~fedloom.strategy.base.ProtocolStrategy` (secure aggregation) trains differently: its
    ``fit_protocol`` runs over the grid, several exchanges long (:func:`~fedloom.runtime.protocol.run_fit_protocol`),
    and gives the new state; the server sees only the aggregate. A protocol round that fails (too few parties left:
    :class:`~fedloom.core.errors.RoundFailedError`) keeps the model as it was and is recorded with the metric
    ``round_failed`` and its ``failure``; the run goes on, and fails once ``strategy.max_failed_rounds`` rounds
    in a row have failed.

    A strategy with an ``update_guard`` or a ``max_share`` (:class:`~fedloom.strategy.base.ScreenedStrategy`)
    has each round's updates screened before they are aggregated (:mod:`fedloom.runtime.screening`): every
    ``num_examples`` is capped at what its client declared when it joined (where the grid is
    :class:`~fedloom.runtime.grid.Declaring`), an update far larger than the round's others is refused, and no
    client weighs more than ``max_share`` of the round. A global model that still holds NaN or infinity after a
    round raises :class:`~fedloom.core.errors.DivergedError` naming the round and the clients whose updates made
    it, with the norms of their updates; the round is not recorded, so a resume starts from the one before.
    ``exclude`` names clients that are never asked to train or evaluate (a resume without the sites that made the
    model diverge).

    A strategy can end the run early, as planned, by raising :class:`~fedloom.core.errors.StopRunError` from
    ``configure_fit`` (DP-FedAvg when the next round would exceed its privacy budget): the loop logs why and
    returns the rounds done.

    With ``resume``, rounds ``1..resume.completed_rounds`` are taken as done: the loop starts from the saved
    params, random state and strategy state, so the remaining rounds are the ones an uninterrupted run would
    have run, and the history holds only them.
    """
    if isinstance(strategy, AsyncStrategy):
        raise ConfigError(
            f"{type(strategy).__name__} is asynchronous: run it with fedloom.runtime.asynchronous.run_async"
        )
    fit_rng, eval_rng = server_generators(seed)
    state, first = start_state(strategy, initial_params, resume, fit_rng, eval_rng)
    vetting = Vetting.of(grid, resume.updates if resume is not None else None)
    history: list[RoundRecord] = []
    failed_in_a_row = 0
    for server_round in range(first, rounds + 1):
        started = time.perf_counter()

        try:
            instructions = strategy.configure_fit(server_round, state, _asked(grid, exclude), fit_rng)
        except StopRunError as stop:
            log.warning("the run ends before round %d: %s", server_round, stop)
            break
        failure = None
        if isinstance(strategy, ProtocolStrategy):  # secure aggregation: several exchanges, only the sum
            protocol = run_fit_protocol(strategy, grid, server_round, state, instructions, timeout)
            fit_records, failure = protocol.records, protocol.failure
            if protocol.result is not None:
                failed_in_a_row = 0
                state, metrics = protocol.result.state, protocol.result.metrics
            else:  # the model stays as it was; the round is recorded as failed
                failed_in_a_row += 1
                log.warning("round %d failed: %s", server_round, failure)
                if failed_in_a_row >= strategy.max_failed_rounds:
                    raise RoundFailedError(f"{failed_in_a_row} rounds in a row failed; round {server_round}: {failure}")
                metrics = {"round_failed": 1.0}
            took_part = {r.client_id: None for r in fit_records if r.status == ClientStatus.OK}
            check_finite(server_round, strategy.params(state), took_part)
        else:
            state, metrics, fit_records = fit_round(strategy, grid, server_round, state, instructions, timeout, vetting)
        params = strategy.params(state)

        if isinstance(grid, Clocked):
            metrics["sim_seconds"] = grid.clock
        asked = _asked(grid, exclude)
        evaluated = evaluate_round(
            strategy, grid, server_round, state, asked, eval_rng, timeout, evaluate_central, metrics, vetting
        )
        record = RoundRecord(
            server_round=server_round,
            metrics=metrics,
            clients=fit_records + evaluated,
            seconds=time.perf_counter() - started,
            random_state={"fit": fit_rng.bit_generator.state, "evaluate": eval_rng.bit_generator.state},
            strategy_state=snapshot(state, params),
            failure=failure,
        )
        history.append(record)
        for observer in observers:
            observer.on_round(record, params)
    return LoopResult(strategy.params(state), tuple(history))


def fit_round(
    strategy: Strategy[Any],
    grid: Grid,
    server_round: int,
    state: Any,
    instructions: Mapping[str, Message],
    timeout: float | None,
    vetting: Vetting | None = None,
) -> tuple[Any, dict[str, float], tuple[ClientRecord, ...]]:
    """A round's training: send the instructions, check each update as it arrives (folding it in, for a
    :class:`FoldingStrategy`), and aggregate. Returns the new state, the round's metrics and the fit records;
    raises :class:`NotEnoughClientsError` when fewer than ``strategy.min_clients`` valid updates came back.
    ``vetting`` holds the run's updates so far, against replays (none: this round's replies are checked alone)."""
    fold = strategy.fold_fit(server_round, state) if isinstance(strategy, FoldingStrategy) else None
    screen = round_screen(strategy, grid)
    check = (vetting or Vetting.of(grid)).check(server_round)
    parse = valid_update(strategy, instructions)
    fit_replies = Gathered(server_round, "fit", parse, fold, screen, instructions, check)
    fit = grid.send_and_receive(instructions, timeout, fit_replies.take)
    fit_replies.release()
    if len(fit_replies.accepted) < strategy.min_clients:
        asked = len(fit.replies) + len(fit.dropped) + len(fit.late)
        raise NotEnoughClientsError(
            f"round {server_round}: {len(fit_replies.accepted)} of {asked} clients "
            f"replied with a valid update, fewer than min_clients={strategy.min_clients}"
        )
    if fold is not None:
        state, metrics = fold.finish()
    else:  # in the order asked, so that the result does not depend on who answered first
        ordered = {cid: fit_replies.accepted[cid] for cid in instructions if cid in fit_replies.accepted}
        state, metrics = strategy.aggregate_fit(server_round, state, ordered)
    check_finite(server_round, strategy.params(state), {cid: screen.norms.get(cid) for cid in fit_replies.accepted})
    return state, metrics, client_records("fit", fit, fit_replies)


def round_screen(strategy: Strategy[Any], grid: Grid) -> RoundScreen:
    """The round's screening of fit updates, as the strategy and the grid say: the strategy's guard and share cap
    (none for a strategy without them; no guard where replies are reshaped, as their change cannot be measured
    against what was sent), and the examples the grid's clients declared."""
    measured = not isinstance(strategy, ReshapingStrategy)
    guard = share = None
    if isinstance(strategy, ScreenedStrategy):
        guard, share = strategy.update_guard if measured else None, strategy.max_share
    return RoundScreen(
        update_guard=guard,
        max_share=share,
        declared=grid.declared_examples if isinstance(grid, Declaring) else None,
        measured=measured,
    )


def check_finite(server_round: int, params: Params, norms: Mapping[str, float | None]) -> None:
    """Raise :class:`DivergedError` if ``params`` (the global model after ``server_round``) hold NaN or infinity,
    naming the clients aggregated in that round (``norms``: each one's norm of change, ``None`` where unknown)."""
    if all_finite(params):
        return
    raise DivergedError(server_round, norms)


def _asked(grid: Grid, exclude: frozenset[str]) -> Sequence[str]:
    """The grid's clients, less those excluded from the run."""
    clients = grid.client_ids()
    return clients if not exclude else [cid for cid in clients if cid not in exclude]


def server_generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The server's two generators from ``seed``: one for training (who trains, with which seeds), one for
    evaluation, so how clients are evaluated never changes how the model is trained."""
    fit_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0x5A3]).spawn(2))
    return fit_rng, eval_rng


def start_state(
    strategy: Strategy[Any],
    initial_params: Params,
    resume: Resume | None,
    fit_rng: np.random.Generator,
    eval_rng: np.random.Generator,
) -> tuple[Any, int]:
    """The strategy's state to start from and the first round to run: ``init(initial_params)`` and round 1, or
    where ``resume`` left off (its params, strategy state and the generators' state, set on ``fit_rng`` and
    ``eval_rng``)."""
    if resume is None:
        return strategy.init(initial_params), 1
    state = strategy.init(resume.params)
    if resume.strategy_state is not None:
        state = restore(state, resume.strategy_state, resume.params)
    fit_rng.bit_generator.state = dict(resume.random_state["fit"])
    eval_rng.bit_generator.state = dict(resume.random_state["evaluate"])
    return state, resume.completed_rounds + 1


def evaluate_round(
    strategy: Strategy[Any],
    grid: Grid,
    server_round: int,
    state: Any,
    clients: Sequence[str],
    eval_rng: np.random.Generator,
    timeout: float | None,
    evaluate_central: CentralEvaluator | None,
    metrics: dict[str, float],
    vetting: Vetting | None = None,
) -> tuple[ClientRecord, ...]:
    """A round's evaluation: federated (on those of ``clients`` the strategy picks, if it asks for it) and
    central (with ``evaluate_central``, if given). Adds the metrics to ``metrics``; returns the clients'
    evaluation records. Each reply is held against its instruction as ``vetting`` says
    (:class:`~fedloom.runtime.binding.Vetting`; ``None``: as the grid binds replies)."""
    instructions = strategy.configure_evaluate(server_round, state, clients, eval_rng)
    check = (vetting or Vetting.of(grid)).check(server_round)
    replies = Gathered(server_round, "evaluate", _evaluation, instructions=instructions, check=check)
    evaluation = grid.send_and_receive(instructions, timeout, replies.take)
    metrics.update(strategy.aggregate_evaluate(server_round, state, replies.accepted))
    if evaluate_central is not None:
        central = evaluate_central(strategy.params(state))
        metrics["central_loss"] = central.loss
        metrics.update({f"central_{k}": v for k, v in central.metrics.items()})
    return client_records("evaluate", evaluation, replies)


R = TypeVar("R", FitResult, EvalResult)


class Gathered(Generic[R]):
    """One phase's replies as the grid hands them over (:meth:`take`): each one's telemetry kept, a failure
    (the client's task raised) noted, the rest parsed and held against their ``instructions`` by ``check``, a bad
    one refused and logged, a good fit update folded into ``fold`` (and its arrays let go) where there is one."""

    def __init__(
        self,
        server_round: int,
        phase: str,
        parse: Callable[[str, Message], R],
        fold: FitFold[Any] | None = None,
        screen: RoundScreen | None = None,
        instructions: Mapping[str, Message] | None = None,
        check: ReplyCheck | None = None,
    ) -> None:
        self._round = server_round
        self._phase = phase
        self._parse: Callable[[str, Message], R] = parse
        self._fold = fold
        self.screen = screen
        self._sent = instructions
        self._check = check
        self.accepted: dict[str, R] = {}
        self.refused: dict[str, str] = {}  # client id -> reason
        self.digests: dict[str, str] = {}  # client id -> its fit update's SHA-256, for the ledger and against replays
        self.failed: dict[str, str] = {}  # client id -> the error its task raised
        self.telemetry: dict[str, readings.Telemetry] = {}

    def take(self, client_id: str, reply: Reply) -> Reply:
        self.telemetry[client_id] = readings.read(reply.message, client_id)
        failure = readings.failure(reply.message)
        if failure is not None:
            log.warning("round %d: the %s of client %s failed: %s", self._round, self._phase, client_id, failure)
            self.failed[client_id] = failure
            return replace(reply, message=Message(reply.message.kind))
        try:
            result = self._parse(client_id, reply.message)
        except (DecodeError, InvalidUpdateError) as exc:
            return self._refuse(client_id, reply, str(exc))
        if isinstance(result, FitResult):
            self.digests[client_id] = fit_digest(result)
        instruction = None if self._sent is None else self._sent.get(client_id)
        if self._check is not None and instruction is not None:
            why = self._check.refusal(client_id, reply.message, instruction, self.digests.get(client_id))
            if why is not None:
                return self._refuse(client_id, reply, why)
        if isinstance(result, FitResult) and self.screen is not None:
            result = self.screen.claim(client_id, result)
            if instruction is not None and self.screen.measured:
                self.screen.measure(client_id, instruction.params, result)
            if self.screen.holds:  # kept whole until the round's last update is in: see release
                self.screen.hold(client_id, result)
                return replace(reply, message=Message(reply.message.kind))
        if self._fold is not None and isinstance(result, FitResult):
            self._fold.add(client_id, result)
            result = replace(result, params=Params({}))
            reply = replace(reply, message=Message(reply.message.kind))
        self.accepted[client_id] = result
        return reply

    def _refuse(self, client_id: str, reply: Reply, why: str) -> Reply:
        """Refuse ``client_id``'s reply, saying ``why`` in the log and its record; the grid keeps it without arrays."""
        log.warning("round %d: refused the %s reply of client %s: %s", self._round, self._phase, client_id, why)
        self.refused[client_id] = why
        return replace(reply, message=Message(reply.message.kind))

    def release(self) -> None:
        """Screen the held fit updates (once the round's last is in): refuse those the guard refuses, and fold
        the others into the aggregate (or accept them whole, for a strategy that aggregates them all at once) in
        the order their clients were asked, so that the aggregate does not depend on who answered first (a
        deployment gives the same bits whatever the network did)."""
        if self.screen is None or not self.screen.holds:
            return
        passed = self.screen.release()
        if self._sent is not None:
            asked = {client_id: i for i, client_id in enumerate(self._sent)}
            passed.sort(key=lambda item: asked.get(item[0], len(asked)))
        for client_id, reason in self.screen.refused.items():
            log.warning("round %d: refused the fit update of client %s: %s", self._round, client_id, reason)
            self.refused[client_id] = reason
        for client_id, result in passed:
            if self._fold is not None:
                self._fold.add(client_id, result)
                result = replace(result, params=Params({}))
            self.accepted[client_id] = result  # type: ignore[assignment]  # the fit phase gathers FitResults


def _evaluation(_client_id: str, message: Message) -> EvalResult:
    return EvalResult.from_message(message)


def valid_update(strategy: Strategy[Any], instructions: Mapping[str, Message]) -> Callable[[str, Message], FitResult]:
    """A parser that accepts a client's fit reply only if its params match what that client was sent (or, for
    a :class:`ReshapingStrategy`, the layout it expects back)."""
    layout = strategy.fit_reply_layout if isinstance(strategy, ReshapingStrategy) else (lambda m: m.params)

    def parse(client_id: str, message: Message) -> FitResult:
        result = FitResult.from_message(message)
        sent = instructions.get(client_id)
        if sent is None:
            raise InvalidUpdateError(f"client {client_id} was not asked to train this round")
        check_update(layout(sent), result.params)
        return result

    return parse


def _status(client_id: str, failed: Mapping[str, str], refused: Mapping[str, str]) -> str:
    """A reply's record status: a failed task is a drop (no update came), a refused update a refusal."""
    if client_id in failed:
        return ClientStatus.DROPPED
    return ClientStatus.REFUSED if client_id in refused else ClientStatus.OK


def _screened(metrics: Mapping[str, float], gathered: Gathered[Any], client_id: str) -> Mapping[str, float]:
    """A fit reply's metrics with what screening measured: ``update_norm`` (its norm of change) and, for a capped
    client, ``claimed_examples`` (what it reported before the cap)."""
    screen = gathered.screen
    if screen is None or (client_id not in screen.norms and client_id not in screen.capped):
        return metrics
    out = dict(metrics)
    if client_id in screen.norms:
        out["update_norm"] = screen.norms[client_id]
    if client_id in screen.capped:
        out["claimed_examples"] = float(screen.capped[client_id][0])
    return out


def client_records(phase: str, exchange: Exchange, gathered: Gathered[Any]) -> tuple[ClientRecord, ...]:
    results, refused, failed = gathered.accepted, gathered.refused, gathered.failed
    records = []
    for cid, reply in exchange.replies.items():
        sent = gathered.telemetry.get(cid, readings.Telemetry())
        replied = ClientRecord(
            client_id=cid,
            phase=phase,
            status=_status(cid, failed, refused),
            seconds=reply.seconds,
            bytes_down=reply.bytes_down,
            bytes_up=reply.bytes_up,
            metrics=readings.record_metrics({}, sent, reply.upload_seconds),
            detail=f"its task failed: {failed[cid]}" if cid in failed else refused.get(cid),
            logs=sent.logs,
        )
        if cid in refused or cid in failed:
            records.append(replied)
            continue
        result = results[cid]
        records.append(
            replace(
                replied,
                num_examples=result.num_examples,
                loss=result.loss if isinstance(result, EvalResult) else result.metrics.get("loss"),
                accuracy=result.metrics.get("accuracy"),
                metrics=readings.record_metrics(_screened(result.metrics, gathered, cid), sent, reply.upload_seconds),
                update_sha256=gathered.digests.get(cid),
                detail=gathered.screen.cap_detail(cid) if gathered.screen is not None else None,
            )
        )
    records.extend(ClientRecord(client_id=cid, phase=phase, status=ClientStatus.DROPPED) for cid in exchange.dropped)
    records.extend(ClientRecord(client_id=cid, phase=phase, status=ClientStatus.LATE) for cid in exchange.late)
    return tuple(records)
