"""What the dashboard (``fedloom ui``) shows, as JSON-ready data: reads over a :class:`RunStore`, kept apart from the
web app so that the HTML report and the tests use them without FastAPI.

The per-client views of a long run are large (1,000 rounds x 100 clients is 200,000 client records), so they read
only the columns they need and aggregate in SQL where they can: the system profile sums and maxima are computed
by the database, JSON fields included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any
from typing import cast as cast_type

from sqlalchemy import JSON, ColumnElement, Connection, Float, cast, distinct, func, inspect, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB

from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.strictjson import finite_number, jsonable
from fedloom.tracking.compare import config_diff, shared_metrics
from fedloom.tracking.schema import client_events, client_logs, client_metrics, rounds
from fedloom.tracking.store import (
    ROUND_COLUMNS,
    RunInfo,
    RunStore,
    read_config,
    read_rounds,
    utc,
)

__all__ = [
    "HEATMAP_METRICS",
    "LOG_LEVELS",
    "PARTICIPATION",
    "SYSTEM_METRICS",
    "best_metric",
    "client_detail",
    "clients_view",
    "compare_view",
    "heatmap",
    "logs_view",
    "overview",
    "profile",
    "run_detail",
]

#: What a client did in a round's fit, by record status, and its one-letter code in :func:`clients_view`'s
#: participation strings ('.' where the client was not asked).
PARTICIPATION = {
    "ok": ("trained", "t"),
    "dropped": ("dropped", "d"),
    "late": ("late", "l"),
    "refused": ("refused", "r"),
}

#: The per-client values a heat map can show: name -> (phase, column of the client records).
HEATMAP_METRICS = {
    "accuracy": ("evaluate", client_metrics.c.accuracy),
    "loss": ("evaluate", client_metrics.c.loss),
    "fit_loss": ("fit", client_metrics.c.loss),
    "fit_seconds": ("fit", client_metrics.c.seconds),
}

#: System metrics a client reports with each fit (names in its record's metrics), and how the profile sums each
#: up over the run's rounds.
SYSTEM_METRICS = (
    ("sys_compute_seconds", "mean"),
    ("sys_peak_rss_mb", "max"),
    ("sys_cpu_seconds", "mean"),
    ("sys_gpu_util", "mean"),
    ("sys_gpu_peak_mb", "max"),
    ("sys_download_seconds", "mean"),
    ("sys_upload_seconds", "mean"),
)

#: The levels of the lines clients send (:mod:`fedloom.runtime.telemetry`), lowest first.
LOG_LEVELS = ("INFO", "WARNING", "ERROR", "CRITICAL")
MAX_LOG_LINES = 5000

# The metrics that say how well a run did, in the order the run list looks for one, and which way is better.
_BEST = (
    ("central_accuracy", max),
    ("federated_accuracy", max),
    ("client_mean_accuracy", max),
    ("central_loss", min),
    ("federated_loss", min),
    ("fit_loss", min),
)
_PRIVACY_PREFIXES = ("dp_", "secagg_", "he_")


def best_metric(round_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The run's best value of the first headline metric it recorded (accuracies: highest; losses: lowest), with
    the round that reached it; ``None`` if it recorded none. ``round_rows`` are flat rows as
    :meth:`RunStore.rounds` gives them, or rows with a ``metrics`` dict as :func:`read_rounds` gives them."""
    for name, pick in _BEST:
        points = [(row["round"], value) for row in round_rows if finite_number(value := _metric(row, name))]
        if points:
            best_round, value = pick(points, key=lambda point: point[1])
            return {"name": name, "value": value, "round": best_round}
    return None


def overview(store: RunStore, info: RunInfo) -> dict[str, Any]:
    """One line of the run list: the run's :class:`RunInfo`, its strategy, how many clients took part, its
    best headline metric and the epsilon it spent (``None`` without differential privacy)."""
    with store.connect(str(info.path)) as (conn, run_id):
        round_list = read_rounds(conn, run_id)
        config = read_config(conn, run_id)
        count = _client_count(conn, run_id)
    return _object(_overview(info, round_list, config, count))


def _overview(
    info: RunInfo, round_rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any], count: int
) -> dict[str, Any]:
    """:func:`overview` from what was read: rows flat or with a ``metrics`` dict (see :func:`best_metric`)."""
    spent = [value for row in round_rows if finite_number(value := _metric(row, "epsilon"))]
    return {
        **info.to_dict(),
        "ref": info.path.name,  # what names the run in its store (a deployment's folder may differ from its id)
        "strategy": _strategy(config),
        "clients": count,
        "best": best_metric(round_rows),
        "epsilon": spent[-1] if spent else None,
    }


def run_detail(store: RunStore, ref: str) -> dict[str, Any]:
    """A run's page: its :func:`overview`, its rounds (flat rows), the metrics it recorded (headline first, the
    privacy bookkeeping apart), its config, and its privacy (epsilon per round, delta, what protected updates)."""
    info = store.info(ref)
    table = store.rounds(ref)
    with store.connect(ref) as (conn, run_id):
        config = read_config(conn, run_id)
        count = _client_count(conn, run_id)
    recorded = shared_metrics([table], ROUND_COLUMNS)
    epsilon = [[row["round"], row["epsilon"]] for row in table if finite_number(row.get("epsilon"))]
    delta = next((row["dp_delta"] for row in reversed(table) if finite_number(row.get("dp_delta"))), None)
    protection = next(
        (label for name, label in (("secagg_survivors", "secagg"), ("he_clients", "paillier")) if name in recorded),
        None,
    )
    return _object(
        {
            "run": _overview(info, table, config, count),
            "rounds": table,
            "metrics": [m for m in recorded if m != "epsilon" and not m.startswith(_PRIVACY_PREFIXES)],
            "config": config,
            "privacy": {"epsilon": epsilon, "delta": delta, "protection": protection},
        }
    )


def clients_view(store: RunStore, ref: str) -> dict[str, Any]:
    """Who did what: the run's client ids (sorted), its rounds, and per client a participation string with one
    letter per round (see :data:`PARTICIPATION`), how many rounds of each kind it had, and in how many of the
    rounds it trained its weight was ``capped`` (it reported more examples than it declared when it joined, or
    more than ``max_share`` of the round: its record's detail says which)."""
    c = client_metrics.c
    with store.connect(ref) as (conn, run_id):
        round_numbers = _round_numbers(conn, run_id)
        clients = _client_ids(conn, run_id)
        fits = conn.execute(
            select(c.round, c.client_id, c.status, c.detail).where(c.run_id == run_id, c.phase == "fit")
        ).all()
    column = {r: i for i, r in enumerate(round_numbers)}
    letters = {cid: ["."] * len(round_numbers) for cid in clients}
    capped = dict.fromkeys(clients, 0)
    for server_round, cid, status, detail in fits:
        if server_round in column and cid in letters:  # else recorded after the rounds were read (a live run)
            letters[cid][column[server_round]] = PARTICIPATION.get(status, ("?", "?"))[1]
            capped[cid] += status == "ok" and detail is not None  # a used update's detail is its cap
    rows = []
    for cid in clients:
        text = "".join(letters[cid])
        counts = {label: text.count(letter) for label, letter in PARTICIPATION.values()}
        rows.append({"client_id": cid, "participation": text, **counts, "capped": capped[cid]})
    return {"rounds": round_numbers, "clients": rows, "legend": {v[1]: v[0] for v in PARTICIPATION.values()}}


def heatmap(store: RunStore, ref: str, metric: str) -> dict[str, Any]:
    """``metric`` (a key of :data:`HEATMAP_METRICS`) per client and round: ``values[i][j]`` is client ``i``'s value
    in round ``rounds[j]`` (``None`` where it has none), clients sorted by id. Raises :class:`ConfigError` for
    an unknown metric."""
    if metric not in HEATMAP_METRICS:
        raise ConfigError(f"unknown heat map metric {metric!r}; choose one of {', '.join(HEATMAP_METRICS)}")
    phase, column = HEATMAP_METRICS[metric]
    with store.connect(ref) as (conn, run_id):
        round_numbers = _round_numbers(conn, run_id)
        clients = _client_ids(conn, run_id)
        cells = conn.execute(
            select(client_metrics.c.round, client_metrics.c.client_id, column).where(
                client_metrics.c.run_id == run_id, client_metrics.c.phase == phase, column.is_not(None)
            )
        ).all()
    column_of = {r: i for i, r in enumerate(round_numbers)}
    row_of = {cid: i for i, cid in enumerate(clients)}
    values: list[list[float | None]] = [[None] * len(round_numbers) for _ in clients]
    for server_round, cid, value in cells:
        # A live run may record a round between the reads: its cells wait for the next answer.
        if math.isfinite(value) and server_round in column_of and cid in row_of:
            values[row_of[cid]][column_of[server_round]] = value
    return {"metric": metric, "rounds": round_numbers, "clients": clients, "values": values}


def profile(store: RunStore, ref: str) -> list[dict[str, Any]]:
    """The system profile, one row per client, over its completed fits and evaluations: fits, mean seconds per
    fit and per evaluation, bytes received and sent in all, and the :data:`SYSTEM_METRICS` the client reported
    (``None`` where it reported none)."""
    c = client_metrics.c
    with store.connect(ref) as (conn, run_id):
        system = [_json_number(conn, name) for name, _ in SYSTEM_METRICS]
        summed = [
            func.max(expr) if how == "max" else func.avg(expr)
            for expr, (_, how) in zip(system, SYSTEM_METRICS, strict=True)
        ]
        query = (
            select(
                c.client_id, c.phase, func.count(), func.avg(c.seconds), func.sum(c.bytes_down), func.sum(c.bytes_up)
            )
            .add_columns(*summed)
            .where(c.run_id == run_id, c.status == "ok")
            .group_by(c.client_id, c.phase)
        )
        grouped = conn.execute(query).all()
        clients = _client_ids(conn, run_id)
    rows: dict[str, dict[str, Any]] = {
        cid: {
            "client_id": cid,
            "fits": 0,
            "fit_seconds": None,
            "evaluate_seconds": None,
            "bytes_down": 0,
            "bytes_up": 0,
            **{name.removeprefix("sys_"): None for name, _ in SYSTEM_METRICS},
        }
        for cid in clients
    }
    for cid, phase, count, seconds, down, up, *measured in grouped:
        row = rows[cid]
        row["bytes_down"] += int(down or 0)
        row["bytes_up"] += int(up or 0)
        row[f"{phase}_seconds"] = float(seconds) if seconds is not None else None
        if phase == "fit":
            row["fits"] = int(count)
            for (name, _), value in zip(SYSTEM_METRICS, measured, strict=True):
                row[name.removeprefix("sys_")] = float(value) if value is not None else None
    return list(rows.values())


def client_detail(store: RunStore, ref: str, client_id: str) -> dict[str, Any]:
    """One client's records in the run, round by round (both phases, with the metrics it reported), and its
    deployment events. Raises :class:`RunStoreError` if the run has no such client."""
    c = client_metrics.c
    with store.connect(ref) as (conn, run_id):
        records = conn.execute(
            select(client_metrics).where(c.run_id == run_id, c.client_id == client_id).order_by(c.round, c.phase)
        ).all()
        events = (
            conn.execute(
                select(client_events)
                .where(client_events.c.run_id == run_id, client_events.c.client_id == client_id)
                .order_by(client_events.c.seq)
            ).all()
            if inspect(conn).has_table(client_events.name)  # runs recorded before timelines existed lack it
            else []
        )
    if not records and not events:
        raise RunStoreError(f"run {run_id} has no client {client_id!r}")
    out = []
    for row in records:
        item = dict(row._mapping)
        del item["run_id"]
        item["metrics"] = json.loads(item.pop("extra_json"))
        out.append(item)
    timeline = [{k: v for k, v in row._mapping.items() if k != "run_id"} for row in events]
    return _object({"client_id": client_id, "records": out, "events": timeline})


def logs_view(
    store: RunStore,
    ref: str,
    *,
    text: str | None = None,
    client: str | None = None,
    level: str | None = None,
    server_round: int | None = None,
    limit: int = 200,
) -> dict[str, Any]:
    """The lines clients logged in the run that match every filter given: ``text`` in the message or the
    logger's name (any case), from ``client``, at ``level`` or above, in ``server_round``. Returns the last
    ``limit`` matches in the order they arrived (``lines``: seq, round, client_id, phase, at, level, logger,
    message), how many matched in all (``matched``) and every client that logged anything (``clients``).
    Raises :class:`ConfigError` for an unknown level or a limit outside 1 to 5,000."""
    if level is not None and level.upper() not in LOG_LEVELS:
        raise ConfigError(f"unknown log level {level!r}; choose one of {', '.join(LOG_LEVELS)}")
    if not 1 <= limit <= MAX_LOG_LINES:
        raise ConfigError(f"the number of lines must be between 1 and {MAX_LOG_LINES}, got {limit}")
    c = client_logs.c
    with store.connect(ref) as (conn, run_id):
        if not inspect(conn).has_table(client_logs.name):  # a run recorded before clients sent their logs
            return {"lines": [], "matched": 0, "clients": []}
        where = [c.run_id == run_id]
        if text:
            needle = text.lower()
            where.append(
                func.lower(c.message).contains(needle, autoescape=True)
                | func.lower(c.logger).contains(needle, autoescape=True)
            )
        if client is not None:
            where.append(c.client_id == client)
        if level is not None:
            where.append(c.level.in_(LOG_LEVELS[LOG_LEVELS.index(level.upper()) :]))
        if server_round is not None:
            where.append(c.round == server_round)
        matched = conn.execute(select(func.count()).select_from(client_logs).where(*where)).scalar_one()
        query = select(client_logs).where(*where).order_by(c.seq.desc()).limit(limit)
        lines = [{k: v for k, v in row._mapping.items() if k != "run_id"} for row in conn.execute(query)]
        clients = conn.execute(select(c.client_id).where(c.run_id == run_id).distinct()).scalars()
        logged = sorted(clients)
    for line in lines:
        line["at"] = utc(line["at"])
    return _object({"lines": lines[::-1], "matched": int(matched), "clients": logged})


def compare_view(store: RunStore, refs: Sequence[str]) -> dict[str, Any]:
    """Several runs side by side: each run's :func:`overview`, the settings on which their configs differ (and
    how many they share), and every metric they all recorded as one series of ``[round, value]`` per run."""
    if len(refs) < 2:
        raise ConfigError("compare needs at least two runs")
    infos = [store.info(ref) for ref in refs]
    tables = [store.rounds(ref) for ref in refs]
    differ, same = config_diff([store.config(ref) for ref in refs])
    metrics = shared_metrics(tables, ROUND_COLUMNS)
    series = {
        metric: [[[row["round"], row[metric]] for row in table if finite_number(row.get(metric))] for table in tables]
        for metric in metrics
    }
    return _object(
        {
            "runs": [overview(store, info) for info in infos],
            "differ": [{"name": name, "values": values} for name, values in differ],
            "same": same,
            "metrics": metrics,
            "series": series,
        }
    )


def _object(value: dict[str, Any]) -> dict[str, Any]:
    return cast_type(dict[str, Any], jsonable(value))


def _json_number(conn: Connection, name: str) -> ColumnElement[Any]:
    """The number under ``name`` in a client record's metrics JSON, read by the database itself (SQLite's
    json_extract, PostgreSQL's ->> on the text cast to JSONB)."""
    holder = client_metrics.c.extra_json
    as_json = cast(holder, JSONB) if conn.dialect.name == "postgresql" else type_coerce(holder, JSON)
    return cast(as_json[name].as_string(), Float)


def _strategy(config: Mapping[str, Any]) -> str | None:
    strategy = config.get("strategy")
    if isinstance(strategy, Mapping):
        return str(strategy.get("type")) if strategy.get("type") is not None else None
    return str(strategy) if strategy is not None else None


def _round_numbers(conn: Connection, run_id: str) -> list[int]:
    return list(
        conn.execute(select(rounds.c.round).where(rounds.c.run_id == run_id).order_by(rounds.c.round)).scalars()
    )


def _client_count(conn: Connection, run_id: str) -> int:
    query = select(func.count(distinct(client_metrics.c.client_id))).where(client_metrics.c.run_id == run_id)
    return int(conn.execute(query).scalar_one())


def _client_ids(conn: Connection, run_id: str) -> list[str]:
    query = select(client_metrics.c.client_id).where(client_metrics.c.run_id == run_id).distinct()
    return sorted(conn.execute(query).scalars())


def _metric(row: Mapping[str, Any], name: str) -> Any:
    nested = row.get("metrics")
    return nested.get(name) if isinstance(nested, Mapping) else row.get(name)
