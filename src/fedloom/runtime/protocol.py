"""The thin driver that runs a strategy's fit protocol (secure aggregation) over any grid, one exchange per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedloom.core.errors import NotEnoughClientsError, RoundFailedError
from fedloom.core.message import Message
from fedloom.runtime import readings
from fedloom.runtime.grid import Grid
from fedloom.runtime.readings import Telemetry
from fedloom.runtime.records import ClientRecord, ClientStatus
from fedloom.strategy.base import FitProtocol, ProtocolResult, ProtocolStrategy

__all__ = ["ProtocolRound", "run_fit_protocol"]


@dataclass(frozen=True)
class ProtocolRound:
    """How a round's fit protocol went: its result, or why it failed (``failure``, when the protocol raised
    :class:`~fedloom.core.errors.RoundFailedError`), and one fit record per client asked."""

    result: ProtocolResult[Any] | None
    records: tuple[ClientRecord, ...]
    failure: str | None = None


@dataclass
class _Tally:
    """One client's part in a protocol so far: its compute seconds and bytes over every step, and the last step
    it answered."""

    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    answered: list[str] = field(default_factory=list)
    telemetry: Telemetry = field(default_factory=Telemetry)
    upload_seconds: float | None = None
    failed: str | None = None  # the error its task raised, which ends its part


def run_fit_protocol(
    strategy: ProtocolStrategy[Any],
    grid: Grid,
    server_round: int,
    state: Any,
    instructions: Mapping[str, Message],
    timeout: float | None,
) -> ProtocolRound:
    """Run ``strategy.fit_protocol`` for one round: each step's messages go out in one ``send_and_receive``
    (bounded by ``timeout``), and the replies that came back are the protocol's next input. Returns the
    protocol's result and one fit record per client asked: ``ok`` for those whose contribution is in the
    aggregate (with the digest of what they sent), ``dropped`` for the others (``detail`` names the last step
    they answered, or the error its task raised), each with its seconds and bytes summed over the steps, and its
    telemetry over the steps (:mod:`fedloom.runtime.telemetry`).

    A protocol that raises :class:`~fedloom.core.errors.RoundFailedError` (fewer than its threshold of clients
    left) gives a failed round: no result, the reason, and every client's record ``dropped`` with the reason in
    its ``detail``. Anything else it raises ends the run; fewer clients used than ``strategy.min_clients`` raises
    :class:`NotEnoughClientsError`.
    """
    steps = strategy.fit_protocol(server_round, state, instructions)
    tallies = {cid: _Tally() for cid in instructions}
    try:
        result = _drive(steps, grid, timeout, tallies)
    except RoundFailedError as failed:
        reason = str(failed)
        return ProtocolRound(None, _records(tallies, {}, f"the round failed: {reason}"), reason)
    if len(result.used) < strategy.min_clients:
        raise NotEnoughClientsError(
            f"round {server_round}: {len(result.used)} of {len(instructions)} clients' updates made it into the "
            f"secure aggregate, fewer than min_clients={strategy.min_clients}"
        )
    return ProtocolRound(result, _records(tallies, result.used))


def _drive(
    steps: FitProtocol[Any], grid: Grid, timeout: float | None, tallies: dict[str, _Tally]
) -> ProtocolResult[Any]:
    """Run the protocol's steps over ``grid``, tallying each client's part; its result."""
    messages = next(steps)
    while True:
        exchange = grid.send_and_receive(messages, timeout)
        answers = {}
        for cid, reply in exchange.replies.items():
            tally = tallies.setdefault(cid, _Tally())
            tally.seconds += reply.seconds
            tally.bytes_down += reply.bytes_down
            tally.bytes_up += reply.bytes_up
            tally.telemetry += readings.read(reply.message, cid)
            if reply.upload_seconds is not None:
                tally.upload_seconds = (tally.upload_seconds or 0.0) + reply.upload_seconds
            tally.failed = readings.failure(reply.message)
            if tally.failed is None:  # a client whose task failed has left the protocol
                tally.answered.append(messages[cid].kind)
                answers[cid] = reply.message
        try:
            messages = steps.send(answers)
        except StopIteration as done:
            result: ProtocolResult[Any] = done.value
            return result


def _records(
    tallies: dict[str, _Tally], used_by: Mapping[str, str], failure: str | None = None
) -> tuple[ClientRecord, ...]:
    """One fit record per client: ``ok`` for those in ``used_by`` (with the digest of what they sent), ``dropped``
    for the others, saying the last step each answered (or its task's error), after ``failure`` if the round
    failed."""
    records = []
    for cid, tally in tallies.items():
        used = cid in used_by
        last = tally.answered[-1] if tally.answered else None
        left = f"its task failed: {tally.failed}" if tally.failed else f"left the protocol after {last or 'no step'}"
        if failure is not None:
            left = f"{failure}; {left}" if tally.failed else f"{failure}; it answered up to {last or 'no step'}"
        records.append(
            ClientRecord(
                client_id=cid,
                phase="fit",
                status=ClientStatus.OK if used else ClientStatus.DROPPED,
                seconds=tally.seconds,
                bytes_down=tally.bytes_down,
                bytes_up=tally.bytes_up,
                metrics=readings.record_metrics({}, tally.telemetry, tally.upload_seconds),
                detail=None if used else left,
                update_sha256=used_by.get(cid),
                logs=tally.telemetry.logs,
            )
        )
    return tuple(records)
