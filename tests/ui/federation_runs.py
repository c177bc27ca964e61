"""Runs of a small hand-made federation, recorded through the real ``RunRecorder``, with values the dashboard's
tests compute by hand: every client trains and evaluates every round, except for one drop, one late reply and
one refused update."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.params import Params
from fedloom.runtime.records import ClientRecord, LogLine, RoundRecord
from fedloom.tracking.recorder import RunRecorder

# The hand-made federation: what went wrong where.
DROPPED = ("client-001", 2)
LATE = ("client-002", 3)
REFUSED = ("client-003", 1)


def fit_status(client: str, server_round: int) -> str:
    for (who, when), status in ((DROPPED, "dropped"), (LATE, "late"), (REFUSED, "refused")):
        if (client, server_round) == (who, when):
            return status
    return "ok"


def accuracy_of(index: int, server_round: int) -> float:
    return (index + server_round) / 100


def rss_of(index: int, server_round: int) -> float:
    return 100.0 + 10 * index + server_round


def lines_of(client: str, server_round: int) -> tuple[LogLine, ...]:
    """What a client logged with its fit: a line when it trained, a warning in round 1, an error when refused."""
    at = datetime(2026, 1, 1, 12, server_round, tzinfo=timezone.utc)
    status = fit_status(client, server_round)
    lines = [LogLine(at, "INFO", "job.train", f"{client} trained in round {server_round}")] if status == "ok" else []
    if server_round == 1:
        lines.append(LogLine(at, "WARNING", "job.data", f"{client}: 3 rows without a label skipped"))
    if status == "refused":
        lines.append(
            LogLine(at, "ERROR", "job.train", "Traceback (most recent call last):\nValueError: exploding_100%_grad")
        )
    return tuple(lines)


def round_record(server_round: int, clients: int, *, epsilon: bool = False) -> RoundRecord:
    """Round ``server_round`` of the hand-made federation of ``clients`` clients (see the module's constants)."""
    records = []
    for i in range(clients):
        cid = f"client-{i:03d}"
        status = fit_status(cid, server_round)
        ok = status == "ok"
        records.append(
            ClientRecord(
                cid,
                "fit",
                status,
                num_examples=10 + i,
                loss=1.0 / server_round if ok else None,
                seconds=0.1 * (i + 1),
                bytes_down=1000,
                bytes_up=500 if ok else 0,
                metrics={"sys_peak_rss_mb": rss_of(i, server_round), "sys_cpu_seconds": 0.5} if ok else {},
                detail="update norm too large" if status == "refused" else None,
                logs=lines_of(cid, server_round) if status != "dropped" else (),
            )
        )
        records.append(
            ClientRecord(
                cid,
                "evaluate",
                "ok",
                num_examples=5,
                loss=1.0 / (server_round + i + 1),
                accuracy=accuracy_of(i, server_round),
                seconds=0.01,
                bytes_down=1000,
                bytes_up=100,
            )
        )
    metrics: dict[str, float] = {"central_accuracy": server_round / 10, "fit_loss": 1.0 / server_round}
    if epsilon:
        metrics.update(epsilon=0.5 * server_round, dp_delta=1e-5, dp_clip=1.0, dp_noise_multiplier=1.1)
    return RoundRecord(server_round, metrics, tuple(records), seconds=0.25)


PARAMS = Params({"w": np.zeros(3, np.float32)})


def record_run(
    root: Path,
    name: str,
    *,
    rounds: int,
    clients: int,
    config: Mapping[str, Any] | None = None,
    finish: bool = True,
    epsilon: bool = False,
    url: str | None = None,
) -> RunRecorder:
    """A run of the hand-made federation under ``root`` (its rows in the shared database at ``url``, if given);
    ``finish=False`` leaves it running (the recorder is returned to record more rounds)."""
    base = {"strategy": {"type": "FedAvg", "fraction": 1.0}, "simulation": {"num_clients": clients, "seed": 0}}
    recorder = RunRecorder.create(root, name, {**base, **(config or {})}, url=url)
    for r in range(1, rounds + 1):
        recorder.on_round(round_record(r, clients, epsilon=epsilon), PARAMS)
    if finish:
        recorder.finish(PARAMS)
    return recorder
