"""What the server reads of a reply's telemetry: :func:`read` takes apart and checks what a client's
:mod:`fedloom.runtime.telemetry` put into the reply's metadata, :func:`failure` what a failed client says went
wrong, and :func:`record_metrics` the metrics of the client's record for the round.

A client is not trusted: a malformed telemetry is logged and ignored, and never costs the client its update.
The server loop puts the metrics into the client's record beside what the task reported (the task's own names
win) and the lines into its ``logs``; the strategy never sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fedloom.core.message import Message, MessageKind
from fedloom.core.strictjson import finite_float, finite_number
from fedloom.runtime.records import LogLine
from fedloom.runtime.telemetry import MAX_LINES, MAX_METRICS, MAX_NAME_CHARS, METRIC_NAME, TELEMETRY_KEY, cut_text

__all__ = ["Telemetry", "failure", "read", "record_metrics"]

log = logging.getLogger(__name__)

_LEVELS = frozenset({"INFO", "WARNING", "ERROR", "CRITICAL"})


@dataclass(frozen=True)
class Telemetry:
    """What one reply carried: metrics by name (``sys_*`` and custom) and log lines, in the order logged."""

    metrics: Mapping[str, float] = field(default_factory=dict)
    logs: tuple[LogLine, ...] = ()

    def __add__(self, later: Telemetry) -> Telemetry:
        """Two replies' telemetry as one (the steps of one client's secure aggregation round): seconds add up,
        peaks keep the larger, anything else keeps ``later``'s value; lines follow one another."""
        merged = dict(self.metrics)
        for name, value in later.metrics.items():
            if name in merged and name.endswith("_seconds"):
                merged[name] += value
            elif name in merged and "_peak_" in name:
                merged[name] = max(merged[name], value)
            else:
                merged[name] = value
        return Telemetry(merged, self.logs + later.logs)


def read(message: Message, client_id: str) -> Telemetry:
    """The telemetry in a reply from ``client_id`` (empty if it sent none). What does not hold up (metrics
    that are not finite numbers by name, lines that are not ``[time, level, logger, text]``, more than allowed)
    is logged as a warning and dropped: telemetry never costs a client its update."""
    raw = message.metadata.get(TELEMETRY_KEY)
    if raw is None:
        return Telemetry()
    try:
        return _parse(raw)
    except ValueError as exc:
        log.warning("client %s sent malformed telemetry, ignored: %s", client_id, exc)
        return Telemetry()


def failure(message: Message) -> str | None:
    """What a :data:`~fedloom.core.message.MessageKind.FAILURE` reply says went wrong; ``None`` for another."""
    if message.kind != MessageKind.FAILURE:
        return None
    error = message.metadata.get("error")
    return cut_text(error) if isinstance(error, str) and error else "the client gave no reason"


def record_metrics(
    reported: Mapping[str, float], sent: Telemetry, upload_seconds: float | None = None
) -> dict[str, float]:
    """A client record's metrics: its telemetry's, what the transport measured (``sys_upload_seconds``), and what
    the task ``reported``, which wins on a name they share."""
    metrics = dict(sent.metrics)
    if upload_seconds is not None:
        metrics["sys_upload_seconds"] = upload_seconds
    metrics.update(reported)
    return metrics


def _parse(raw: Any) -> Telemetry:
    if not isinstance(raw, Mapping):
        raise ValueError("not a JSON object")
    metrics_raw = raw.get("metrics", {})
    if not isinstance(metrics_raw, Mapping) or len(metrics_raw) > MAX_METRICS + 16:
        raise ValueError("metrics must be an object of at most 80 numbers")
    metrics: dict[str, float] = {}
    for name, value in metrics_raw.items():
        number = finite_float(value) if isinstance(value, (int, float)) else None
        if not METRIC_NAME.fullmatch(name) or number is None:
            raise ValueError(f"metric {name[:MAX_NAME_CHARS]!r} is not a named finite number")
        metrics[name] = number
    lines_raw = raw.get("logs", [])
    if not isinstance(lines_raw, list) or len(lines_raw) > MAX_LINES:
        raise ValueError(f"logs must be a list of at most {MAX_LINES} lines")
    lines = []
    for item in lines_raw:
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError("a log line must be [time, level, logger, text]")
        at, level, logger, text = item
        if not finite_number(at) or not 0 <= at < 1e11:
            raise ValueError(f"a log line's time must be seconds since 1970, got {at!r}")
        if level not in _LEVELS or not isinstance(logger, str) or not isinstance(text, str):
            raise ValueError("a log line needs a level name (INFO and up), a logger name and a text")
        moment = datetime.fromtimestamp(at, timezone.utc)
        lines.append(LogLine(moment, level, logger[:MAX_NAME_CHARS], cut_text(text)))
    return Telemetry(metrics, tuple(lines))
