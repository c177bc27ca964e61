"""The recorded run that simulations and deployments share: :class:`Run`, what a run produced, and
:func:`run_recorded`, the server loop with every round written to the run store as it ends."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from fedloom.core.errors import ConfigError, FedloomError, NoSpaceError
from fedloom.core.params import Params
from fedloom.privacy.ledger import LEDGER_FILE, used_updates
from fedloom.runtime.asynchronous import run_async
from fedloom.runtime.grid import Grid
from fedloom.runtime.loop import CentralEvaluator, LoopResult, Resume, run_rounds
from fedloom.runtime.records import RoundObserver, RoundRecord
from fedloom.strategy.base import AsyncStrategy, Strategy
from fedloom.tracking import RunRecorder

__all__ = ["Run", "record_run", "run_recorded"]

log = logging.getLogger("fedloom")

R = TypeVar("R")


@dataclass(frozen=True)
class Run:
    """What a finished run produced: its id and directory, the final global params and every round's record."""

    run_id: str
    run_dir: Path
    params: Params
    history: tuple[RoundRecord, ...]
    backend: str = "inline"

    @property
    def final_metrics(self) -> dict[str, float]:
        """Each global metric's last recorded value (as ``final`` in ``summary.json``)."""
        final: dict[str, float] = {}
        for record in self.history:
            final.update(record.metrics)
        return final

    @property
    def params_sha256(self) -> str:
        return self.params.sha256()


def run_recorded(
    recorder: RunRecorder,
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
    on_close: Callable[[BaseException | None], None] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> LoopResult:
    """:func:`~fedloom.runtime.loop.run_rounds` (:func:`~fedloom.runtime.asynchronous.run_async` for an
    asynchronous strategy) with the run recorded by ``recorder``: every round as it ends,
    then the run as finished with its final params, or as failed with its error and the last good params
    (and the error raised again). Simulations and deployments record their runs through this one path;
    ``resume`` (from :meth:`RunRecorder.open`) continues a deployment's run after its last recorded round, knowing
    the updates its privacy ledger lists for the rounds done (so that one replayed after the restart is refused).
    ``on_close`` is called just before the run is closed, while ``recorder`` still records, with ``None`` after
    the last round or with the error on failure: a deployment says bye to its clients when the run is over and
    records the client events that came after the last round. ``exclude`` names clients never asked (see
    :func:`~fedloom.runtime.loop.run_rounds`)."""

    if resume is not None and not resume.updates:
        resume = replace(resume, updates=used_updates(recorder.run_dir / LEDGER_FILE, resume.completed_rounds))

    def loop(recording: Sequence[RoundObserver]) -> tuple[LoopResult, Params]:
        arguments: dict[str, Any] = {
            "grid": grid,
            "initial_params": initial_params,
            "rounds": rounds,
            "seed": seed,
            "evaluate_central": evaluate_central,
            "observers": [*recording, *observers],
            "timeout": timeout,
            "resume": resume,
        }
        if isinstance(strategy, AsyncStrategy):
            if exclude:
                raise ConfigError("excluding clients is for synchronous strategies; an asynchronous one asks anyone")
            result = run_async(strategy=strategy, **arguments)
        else:
            result = run_rounds(strategy=strategy, exclude=exclude, **arguments)
        return result, result.params

    return record_run(recorder, initial_params if resume is None else resume.params, loop, on_close=on_close)


def record_run(
    recorder: RunRecorder,
    initial_params: Params,
    run: Callable[[Sequence[RoundObserver]], tuple[R, Params]],
    *,
    on_close: Callable[[BaseException | None], None] | None = None,
) -> R:
    """Call ``run`` with the observers that record it (``recorder`` and a keeper of the latest params, to pass to
    its rounds), which returns its result and its final params; then record the run as finished with those
    params, or, if ``run`` raises, as failed with its error and the last good params (``initial_params`` before
    the first round), and raise the error again. ``on_close`` is as :func:`run_recorded` describes. Every kind of
    run (the server loop's, a decentralized one's) ends on record through here."""
    latest = _Latest(initial_params)
    try:
        result, params = run([recorder, latest])
    except BaseException as exc:
        try:
            if on_close is not None:
                on_close(exc)
            recorder.finish(latest.params, status="failed", error=f"{type(exc).__name__}: {exc}")
        except FedloomError as unrecorded:  # the run's own error matters more; say why it is not on record
            recorder.close()  # the run stays "running": the same command resumes it after its last round
            if not (isinstance(exc, NoSpaceError) and isinstance(unrecorded, NoSpaceError)):  # else: said already
                log.error("run %s: could not record its failure: %s", recorder.run_id, unrecorded)
        raise
    if on_close is not None:
        on_close(None)
    recorder.finish(params)
    return result


class _Latest:
    """Keeps the latest global params, so a failed run's record still holds the last good model."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def on_round(self, record: RoundRecord, params: Params) -> None:
        self.params = params
