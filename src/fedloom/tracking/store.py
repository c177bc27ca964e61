"""``RunStore``: read the runs under a root folder (list, resolve a reference, rounds, clients, export).

Each run is a folder ``<root>/<run_id>/`` holding ``run.db`` (see :mod:`fedloom.tracking.schema`),
``checkpoints/`` and ``summary.json``. The store only reads; :class:`~fedloom.tracking.RunRecorder` writes.

>>> store = RunStore("runs")                                # doctest: +SKIP
>>> [info.run_id for info in store.list_runs()]             # newest first  # doctest: +SKIP
>>> store.export("20250101-120000-digits", "csv")           # a unique prefix also works  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.tracking.schema import (
    client_events,
    client_metrics,
    connection,
    open_engine,
    round_metrics,
    rounds,
    runs,
    shared_engine,
    shown_url,
)

__all__ = ["DB_NAME", "ROUND_COLUMNS", "RunInfo", "RunStore", "finite_number"]

DB_NAME = "run.db"
RUN_ID_FILE = "run_id"  # a deployment's run directory, its rows in a shared database: which run it is
#: The fixed columns of a round, in table order; metric columns follow, sorted by name.
ROUND_COLUMNS = ("round", "seconds", "num_selected", "num_ok", "num_dropped")
EXPORT_FORMATS = ("csv", "json")
_MAX_LISTED = 10


@dataclass(frozen=True)
class RunInfo:
    """One run as listed by :meth:`RunStore.list_runs`.

    ``rounds`` is the number of rounds recorded; ``final_metrics`` holds, per metric name, its value at
    the last round that reported it (``None`` where that value was not finite). Times are UTC.
    """

    run_id: str
    name: str
    status: str
    created_at: datetime
    rounds: int
    final_metrics: dict[str, float | None]
    params_sha256: str | None
    path: Path
    finished_at: datetime | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO 8601 strings, the path as a string)."""
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "rounds": self.rounds,
            "final_metrics": dict(self.final_metrics),
            "params_sha256": self.params_sha256,
            "error": self.error,
            "path": str(self.path),
        }


# ---------------------------------------------------------------------------------------------- JSON helpers


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats become ``None``; dataclasses, paths, enums, dates and
    NumPy values are converted. Raises :class:`ConfigError` for anything else that JSON cannot hold."""
    import numpy as np  # here, not at the top: listing runs (fedloom runs list) needs no numpy

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise ConfigError(f"JSON object keys must be strings, got {key!r}")
            out[str(key)] = jsonable(item)
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise ConfigError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool, not ``None``): a metric worth drawing or exporting."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dumps_json(value: Any, *, indent: int | None = None) -> str:
    """Serialize ``value`` with :func:`jsonable` first, so the output is strict JSON (no NaN, no Infinity)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------- DB readers


def utc(moment: datetime | None) -> datetime | None:
    """``moment`` as a UTC-aware datetime (SQLite hands back naive ones, which fedloom writes in UTC)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def read_rounds(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    """The rounds of ``run_id`` in order: the :data:`ROUND_COLUMNS` plus ``metrics`` (a name -> value dict)."""
    out: list[dict[str, Any]] = []
    by_round: dict[int, dict[str, Any]] = {}
    for row in conn.execute(select(rounds).where(rounds.c.run_id == run_id).order_by(rounds.c.round)):
        item: dict[str, Any] = {column: row._mapping[column] for column in ROUND_COLUMNS}
        item["metrics"] = {}
        out.append(item)
        by_round[row.round] = item
    query = (
        select(round_metrics)
        .where(round_metrics.c.run_id == run_id)
        .order_by(round_metrics.c.round, round_metrics.c.name)
    )
    for row in conn.execute(query):
        if row.round in by_round:
            by_round[row.round]["metrics"][row.name] = row.value
    return out


def final_metrics(round_list: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per metric name, its value at the last round that recorded it (rounds as from :func:`read_rounds`)."""
    merged: dict[str, float | None] = {}
    for item in round_list:
        merged.update(item["metrics"])
    return dict(sorted(merged.items()))


def read_config(conn: Connection, run_id: str) -> dict[str, Any]:
    """The config ``run_id`` was created with. Raises :class:`RunStoreError` if it is not a JSON object."""
    return _parse_config(conn.execute(select(runs.c.config_json).where(runs.c.run_id == run_id)).scalar_one(), run_id)


def _parse_config(text: str, run_id: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunStoreError(f"run {run_id} has a corrupt config: {exc}") from None
    if not isinstance(config, dict):
        raise RunStoreError(f"run {run_id} has a corrupt config: a JSON {type(config).__name__}, not an object")
    return config


def shared_run_id(run_dir: Path) -> str:
    """The id of the run whose checkpoints are in ``run_dir``, where its rows are in a shared database: the
    folder's name, or for a deployment's run directory (named by its operator) what its ``run_id`` file says."""
    marker = run_dir / RUN_ID_FILE
    return marker.read_text().strip() if marker.is_file() else run_dir.name


def _read_run_row(conn: Connection, run_dir: Path, shared: bool = False) -> Any:
    """The run of ``run_dir``: in a database that many runs share, the one :func:`shared_run_id` names."""
    if shared:
        run_id = shared_run_id(run_dir)
        row = conn.execute(select(runs).where(runs.c.run_id == run_id)).first()
        if row is None:
            raise RunStoreError(f"the run database holds no run {run_id!r}")
        return row
    rows = list(conn.execute(select(runs)))
    if not rows:
        raise RunStoreError(f"run directory {run_dir} has an empty run database")
    if len(rows) == 1:
        return rows[0]
    for row in rows:
        if row.run_id == run_dir.name:
            return row
    raise RunStoreError(f"run database in {run_dir} holds several runs and none is named {run_dir.name!r}")


def _info_from(row: Any, round_list: list[dict[str, Any]], run_dir: Path) -> RunInfo:
    created_at = utc(row.created_at)
    assert created_at is not None  # the column is NOT NULL
    return RunInfo(
        run_id=row.run_id,
        name=row.name,
        status=row.status,
        created_at=created_at,
        rounds=len(round_list),
        final_metrics=final_metrics(round_list),
        params_sha256=row.params_sha256,
        path=run_dir,
        finished_at=utc(row.finished_at),
        error=row.error,
    )


@dataclass(frozen=True)
class _Run:
    info: RunInfo
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    config: dict[str, Any]
    events: list[dict[str, Any]]


def _load(conn: Connection, row: Any, run_dir: Path, *, details: bool) -> _Run:
    """A run's rows (``row`` is its ``runs`` row); ``details`` also reads its client records and config."""
    round_list = read_rounds(conn, row.run_id)
    clients = _read_clients(conn, row.run_id) if details else []
    events = _read_events(conn, row.run_id) if details else []
    config = _parse_config(row.config_json, row.run_id) if details else {}
    return _Run(_info_from(row, round_list, run_dir), round_list, clients, config, events)


# ---------------------------------------------------------------------------------------------- the store


class RunStore:
    """Read access to the runs under ``root`` (a folder of run directories; it need not exist yet).

    With ``url`` (a SQLAlchemy database URL: ``postgresql+psycopg://user@host/fedloom`` for a shared server) the
    runs' rows live in that one database, which many runs (and machines) share, and ``root`` holds what is not
    rows: each run's checkpoints and summary in ``root/<run_id>/``. Without it, each run directory holds its own
    SQLite ``run.db``.
    """

    def __init__(self, root: str | Path, url: str | None = None) -> None:
        self._root = Path(root)
        self._url = url

    @property
    def root(self) -> Path:
        return self._root

    @property
    def url(self) -> str | None:
        """The shared run database's URL, or ``None`` for a SQLite file per run."""
        return self._url

    def _run_dirs(self) -> list[Path]:
        if self._url is not None:
            with self._shared() as conn:
                return sorted(self._root / run_id for run_id in conn.execute(select(runs.c.run_id)).scalars())
        if not self._root.is_dir():
            return []
        return sorted(p for p in self._root.iterdir() if p.is_dir() and (p / DB_NAME).is_file())

    @contextmanager
    def _shared(self) -> Iterator[Connection]:
        assert self._url is not None
        try:
            with connection(shared_engine(self._url)) as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise RunStoreError(f"cannot read the run database at {shown_url(self._url)}: {exc}") from None

    @contextmanager
    def _open(self, run_dir: Path) -> Iterator[tuple[Connection, Any]]:
        """A connection to the database of ``run_dir``'s run, and that run's row."""
        if self._url is not None:
            with self._shared() as conn:
                yield conn, _read_run_row(conn, run_dir, shared=True)
            return
        try:
            with open_engine(run_dir / DB_NAME) as engine, connection(engine) as conn:
                yield conn, _read_run_row(conn, run_dir)
        except SQLAlchemyError as exc:
            raise RunStoreError(f"cannot read the run database in {run_dir}: {exc}") from None

    def _load(self, run_dir: Path, *, details: bool) -> _Run:
        with self._open(run_dir) as (conn, row):
            return _load(conn, row, run_dir, details=details)

    def _is_run(self, path: Path, run_dirs: list[Path]) -> bool:
        """Whether ``path`` is the folder of a run (one of ``run_dirs``, the listing, in a shared database)."""
        if self._url is None:
            return (path / DB_NAME).is_file()
        return path.is_dir() and shared_run_id(path) in {run_dir.name for run_dir in run_dirs}

    def _where(self) -> str:
        return f"the run database at {shown_url(self._url)}" if self._url is not None else str(self._root)

    def list_runs(self) -> list[RunInfo]:
        """Every readable run under the root, newest first. Folders without ``run.db`` are skipped, and so
        are databases that cannot be read (for example one still being created by another process)."""
        infos: list[RunInfo] = []
        for run_dir in self._run_dirs():
            try:
                infos.append(self._load(run_dir, details=False).info)
            except RunStoreError:
                continue
        return sorted(infos, key=lambda info: (info.created_at, info.run_id), reverse=True)

    def resolve(self, ref: str) -> Path:
        """The run directory that ``ref`` names: an exact run id, a unique prefix of one, or a path to a
        run directory. Raises :class:`RunStoreError` if nothing or more than one run matches."""
        if not ref:
            raise RunStoreError("empty run reference")
        candidates = self._run_dirs()
        for run_dir in candidates:
            if run_dir.name == ref:
                return run_dir
        as_path = Path(ref).expanduser()
        if self._is_run(as_path, candidates):
            return as_path
        matches = [run_dir for run_dir in candidates if run_dir.name.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise RunStoreError(
                f"run reference {ref!r} is ambiguous; it matches {_listing(matches)}. Give more of the run id"
            )
        if self._url is None and not self._root.is_dir():
            raise RunStoreError(f"no run matches {ref!r}: the run store {self._root} does not exist")
        known = f"known runs: {_listing(candidates)}" if candidates else "it holds no runs"
        raise RunStoreError(f"no run matches {ref!r} in {self._where()}; {known}")

    def signature(self, run_dir: Path) -> tuple[Any, ...]:
        """Something cheap to read that changes whenever the run in ``run_dir`` records anything (a round, a
        client event, its end), for caches of what was computed from it: its SQLite files' sizes and times, or
        in a shared database its status, end, last round and last event."""
        if self._url is None:
            out: list[int] = []
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-journal"):
                try:
                    stat = (run_dir / name).stat()
                except FileNotFoundError:
                    out += [-1, -1]
                else:
                    out += [stat.st_size, stat.st_mtime_ns]
            return tuple(out)
        run_id = shared_run_id(run_dir)
        last_round = select(func.max(rounds.c.round)).where(rounds.c.run_id == run_id).scalar_subquery()
        last_event = select(func.max(client_events.c.seq)).where(client_events.c.run_id == run_id).scalar_subquery()
        query = select(runs.c.status, runs.c.finished_at, last_round, last_event).where(runs.c.run_id == run_id)
        with self._shared() as conn:
            row = conn.execute(query).first()
        return tuple(row) if row is not None else ()

    def info(self, ref: str) -> RunInfo:
        """The :class:`RunInfo` of the run that ``ref`` names (see :meth:`resolve`)."""
        return self._load(self.resolve(ref), details=False).info

    def rounds(self, ref: str) -> list[dict[str, Any]]:
        """One flat dict per round: the :data:`ROUND_COLUMNS`, then every metric of the run, sorted by
        name (``None`` where a round did not record that metric or its value was not finite)."""
        return _flatten(self._load(self.resolve(ref), details=False).rounds)

    def client_metrics(self, ref: str) -> list[dict[str, Any]]:
        """One dict per client and phase of each round, ordered by round, phase and client id: round,
        client_id, phase, status, num_examples, loss, accuracy, seconds, bytes_down, bytes_up, metrics."""
        return self._load(self.resolve(ref), details=True).clients

    def client_events(self, ref: str) -> list[dict[str, Any]]:
        """A deployment's client timeline, in the order things happened: seq, at (UTC), round (``None`` outside
        rounds), client_id, event (connected, disconnected, refused, training, evaluating, reported, late,
        dropped), bytes, detail. Empty for a simulation."""
        return self._load(self.resolve(ref), details=True).events

    @contextmanager
    def connect(self, ref: str) -> Iterator[tuple[Connection, str]]:
        """A read connection to the database of the run ``ref`` names, with that run's id, for queries the
        methods above do not cover (:mod:`fedloom.tracking.views` aggregates in SQL through it). Database errors
        inside become :class:`RunStoreError`."""
        with self._open(self.resolve(ref)) as (conn, row):
            yield conn, row.run_id

    def config(self, ref: str) -> dict[str, Any]:
        """The configuration the run was created with (as stored: JSON values, non-finite floats as None)."""
        with self.connect(ref) as (conn, run_id):
            return read_config(conn, run_id)

    def export(self, ref: str, fmt: str) -> str:
        """The run as text. ``csv``: the rounds table (see :meth:`rounds`) with a header row, empty cells
        for missing values. ``json``: ``{"run", "config", "rounds", "clients"}``. Raises
        :class:`ConfigError` for another format and :class:`RunStoreError` for an unknown run. ``json``
        also holds ``events``, a deployment's client timeline (see :meth:`client_events`)."""
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        run = self._load(self.resolve(ref), details=True)
        round_list = run.rounds
        table = _flatten(round_list)
        if fmt == "json":
            document = {
                "run": run.info.to_dict(),
                "config": run.config,
                "rounds": table,
                "clients": run.clients,
                "events": run.events,
            }
            return dumps_json(document, indent=2) + "\n"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_columns(round_list), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in table)
        return buffer.getvalue()


def _listing(run_dirs: list[Path]) -> str:
    names = [run_dir.name for run_dir in run_dirs]
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _columns(round_list: list[dict[str, Any]]) -> list[str]:
    names = sorted({name for item in round_list for name in item["metrics"]})
    return [*ROUND_COLUMNS, *names]


def _flatten(round_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    columns = _columns(round_list)
    flat: list[dict[str, Any]] = []
    for item in round_list:
        row = {column: item["metrics"].get(column) for column in columns[len(ROUND_COLUMNS) :]}
        flat.append({**{column: item[column] for column in ROUND_COLUMNS}, **row})
    return flat


def _read_clients(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    query = (
        select(client_metrics)
        .where(client_metrics.c.run_id == run_id)
        .order_by(client_metrics.c.round, client_metrics.c.phase, client_metrics.c.client_id)
    )
    out: list[dict[str, Any]] = []
    for row in conn.execute(query):
        item = dict(row._mapping)
        del item["run_id"]
        try:
            item["metrics"] = json.loads(item.pop("extra_json"))
        except json.JSONDecodeError as exc:
            raise RunStoreError(f"run {run_id} has corrupt client metrics: {exc}") from None
        out.append(item)
    return out


def _read_events(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    if not inspect(conn).has_table(client_events.name):  # a run recorded before timelines existed
        return []
    query = select(client_events).where(client_events.c.run_id == run_id).order_by(client_events.c.seq)
    out: list[dict[str, Any]] = []
    for row in conn.execute(query):
        item = dict(row._mapping)
        del item["run_id"]
        item["at"] = utc(item["at"])
        out.append(item)
    return out
