"""The server loop, written once: drive a ``Strategy`` over a ``Grid`` for a number of rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from fedloom.core.errors import DecodeError, InvalidUpdateError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.core.validation import check_update
from fedloom.runtime.grid import Exchange, Grid, Reply
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundObserver, RoundRecord
from fedloom.strategy.base import Strategy

__all__ = ["LoopResult", "run_rounds"]

log = logging.getLogger("fedloom.server")

CentralEvaluator = Callable[[Params], EvalResult]


@dataclass(frozen=True)
class LoopResult:
    """The global params after the last round, and every round's record."""

    params: Params
    history: tuple[RoundRecord, ...]


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
) -> LoopResult:
    """Run ``rounds`` rounds of federated training and return the final global params and the history.

    Each round: the strategy picks clients and instructions; the grid delivers them and gathers replies;
    every update is checked against the global params (names, shapes, dtypes, finite values) and a bad one
    is refused, logged and recorded, never aggregated; if fewer than ``strategy.min_clients`` valid updates
    remain, :class:`NotEnoughClientsError` ends the run; otherwise the strategy aggregates. Then federated
    evaluation (if the strategy asks for it), central evaluation on the server (if ``evaluate_central`` is
    given), and every observer sees the round. Client sampling draws from generators seeded by ``seed``, so
    the same seed selects the same clients; training and evaluation draw from separate ones, so how clients
    are evaluated never changes how the model is trained.
    """
    fit_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0x5A3]).spawn(2))
    state = strategy.init(initial_params)
    history: list[RoundRecord] = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()

        global_params = strategy.params(state)
        fit = grid.send_and_receive(strategy.configure_fit(server_round, state, grid.client_ids(), fit_rng), timeout)
        fit_results, fit_refused = _accept(server_round, "fit", fit.replies, _valid_update(global_params))
        if len(fit_results) < strategy.min_clients:
            asked = len(fit.replies) + len(fit.dropped) + len(fit.late)
            raise NotEnoughClientsError(
                f"round {server_round}: {len(fit_results)} of {asked} clients "
                f"replied with a valid update, fewer than min_clients={strategy.min_clients}"
            )
        state, metrics = strategy.aggregate_fit(server_round, state, fit_results)
        params = strategy.params(state)

        evaluation = grid.send_and_receive(
            strategy.configure_evaluate(server_round, state, grid.client_ids(), eval_rng), timeout
        )
        eval_results, eval_refused = _accept(server_round, "evaluate", evaluation.replies, EvalResult.from_message)
        metrics.update(strategy.aggregate_evaluate(server_round, state, eval_results))

        if evaluate_central is not None:
            central = evaluate_central(params)
            metrics["central_loss"] = central.loss
            metrics.update({f"central_{k}": v for k, v in central.metrics.items()})

        record = RoundRecord(
            server_round=server_round,
            metrics=metrics,
            clients=_client_records("fit", fit, fit_results, fit_refused)
            + _client_records("evaluate", evaluation, eval_results, eval_refused),
            seconds=time.perf_counter() - started,
        )
        history.append(record)
        for observer in observers:
            observer.on_round(record, params)
    return LoopResult(strategy.params(state), tuple(history))


R = TypeVar("R", FitResult, EvalResult)


def _accept(
    server_round: int, phase: str, replies: Mapping[str, Reply], parse: Callable[[Message], R]
) -> tuple[dict[str, R], dict[str, str]]:
    """Split replies into the results ``parse`` accepts and refusals (client id -> reason), logging each."""
    accepted: dict[str, R] = {}
    refused: dict[str, str] = {}
    for cid, reply in replies.items():
        try:
            accepted[cid] = parse(reply.message)
        except (DecodeError, InvalidUpdateError) as exc:
            log.warning("round %d: refused the %s reply of client %s: %s", server_round, phase, cid, exc)
            refused[cid] = str(exc)
    return accepted, refused


def _valid_update(global_params: Params) -> Callable[[Message], FitResult]:
    def parse(message: Message) -> FitResult:
        result = FitResult.from_message(message)
        check_update(global_params, result.params)
        return result

    return parse


def _client_records(
    phase: str,
    exchange: Exchange,
    results: Mapping[str, FitResult | EvalResult],
    refused: Mapping[str, str],
) -> tuple[ClientRecord, ...]:
    records = []
    for cid, reply in exchange.replies.items():
        replied = ClientRecord(
            client_id=cid,
            phase=phase,
            status=ClientStatus.REFUSED if cid in refused else ClientStatus.OK,
            seconds=reply.seconds,
            bytes_down=reply.bytes_down,
            bytes_up=reply.bytes_up,
            detail=refused.get(cid),
        )
        if cid in refused:
            records.append(replied)
            continue
        result = results[cid]
        records.append(
            replace(
                replied,
                num_examples=result.num_examples,
                loss=result.loss if isinstance(result, EvalResult) else result.metrics.get("loss"),
                accuracy=result.metrics.get("accuracy"),
                metrics=dict(result.metrics),
            )
        )
    records.extend(ClientRecord(client_id=cid, phase=phase, status=ClientStatus.DROPPED) for cid in exchange.dropped)
    records.extend(ClientRecord(client_id=cid, phase=phase, status=ClientStatus.LATE) for cid in exchange.late)
    return tuple(records)
