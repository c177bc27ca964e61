"""The run store's tables, in SQLAlchemy Core, and how to open a run's database.

The schema uses only portable types (strings with a length, integers, doubles, text, timezone-aware
timestamps) so the same tables live in SQLite (one ``run.db`` per run directory, the default) or in one database
that many runs share, at a URL (:func:`shared_engine`; PostgreSQL for a shared server).
Non-finite metric values are stored as NULL: SQLite cannot hold NaN, and JSON cannot either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Double,
    Engine,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import QueuePool

from fedloom.core.errors import RunStoreError
from fedloom.core.interrupts import interrupts_held

__all__ = [
    "RUN_STATUSES",
    "client_events",
    "client_logs",
    "client_metrics",
    "connection",
    "credentials",
    "metadata",
    "open_engine",
    "round_metrics",
    "release_engines",
    "rounds",
    "runs",
    "transaction",
    "shared_engine",
    "shown_url",
    "sqlite_engine",
]

RUN_STATUSES = ("running", "finished", "failed")

_RUN_ID = 128
_NAME = 255
_SHORT = 32

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(_RUN_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("status", String(_SHORT), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("config_json", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("params_sha256", String(64), nullable=True),
    CheckConstraint(f"status IN ({', '.join(repr(s) for s in RUN_STATUSES)})", name="ck_runs_status"),
)

rounds = Table(
    "rounds",
    metadata,
    Column("run_id", String(_RUN_ID), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("seconds", Double, nullable=False),
    Column("num_selected", Integer, nullable=False),
    Column("num_ok", Integer, nullable=False),
    Column("num_dropped", Integer, nullable=False),
    ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_rounds_run"),
)

round_metrics = Table(
    "round_metrics",
    metadata,
    Column("run_id", String(_RUN_ID), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("name", String(_NAME), primary_key=True),
    Column("value", Double, nullable=True),
    ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"], name="fk_round_metrics_round"),
)

client_metrics = Table(
    "client_metrics",
    metadata,
    Column("run_id", String(_RUN_ID), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("client_id", String(_NAME), primary_key=True),
    Column("phase", String(_SHORT), primary_key=True),
    Column("status", String(_SHORT), nullable=False),
    Column("num_examples", Integer, nullable=False),
    Column("loss", Double, nullable=True),
    Column("accuracy", Double, nullable=True),
    Column("seconds", Double, nullable=False),
    Column("bytes_down", Integer, nullable=False),
    Column("bytes_up", Integer, nullable=False),
    Column("extra_json", Text, nullable=False),
    Column("detail", Text, nullable=True),  # why an update was refused
    ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"], name="fk_client_metrics_round"),
)


client_events = Table(
    "client_events",
    metadata,
    Column("run_id", String(_RUN_ID), primary_key=True),
    Column("seq", Integer, primary_key=True),  # the order events happened in, from 1
    Column("at", DateTime(timezone=True), nullable=False),
    Column("round", Integer, nullable=True),  # None outside a round (connections, disconnections)
    Column("client_id", String(_NAME), nullable=False),
    Column("event", String(_SHORT), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("detail", Text, nullable=True),
    ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_client_events_run"),
)

# The lines clients logged while they answered instructions (see fedloom.runtime.telemetry), in the order they
# arrived; ``at`` is by the client's clock.
client_logs = Table(
    "client_logs",
    metadata,
    Column("run_id", String(_RUN_ID), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("round", Integer, nullable=False),
    Column("client_id", String(_NAME), nullable=False),
    Column("phase", String(_SHORT), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("level", String(_SHORT), nullable=False),
    Column("logger", String(_NAME), nullable=False),
    Column("message", Text, nullable=False),
    ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"], name="fk_client_logs_round"),
)

# A deployment's client tokens. Only a SHA-256 of each token is kept: tokens are 256 random bits, so a fast hash
# is as safe as a slow one here, and checking one costs nothing. A revoked token keeps its row (with its time).
credentials = Table(
    "credentials",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("client_name", String(_NAME), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)


def _enable_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores foreign keys unless asked, per connection; PostgreSQL always enforces them.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


_shared: dict[str, Engine] = {}
_shared_lock = threading.Lock()


def shown_url(url: str) -> str:
    """``url`` as it may be printed: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the database URL given"


def shared_engine(url: str) -> Engine:
    """The engine of the run database that several runs share at ``url`` (a SQLAlchemy URL such as
    ``postgresql+psycopg://user@host/fedloom``, or ``sqlite:///runs.db``), made once per process with its tables
    created. Raises :class:`RunStoreError` with a one-line reason when the URL is malformed, its driver is not
    installed, or the database cannot be reached."""
    with _shared_lock:
        engine = _shared.get(url)
        if engine is not None:
            return engine
        shown = shown_url(url)
        try:
            parsed = make_url(url)
            engine = create_engine(parsed, pool_pre_ping=True)
        except (ArgumentError, ValueError) as exc:
            raise RunStoreError(
                f"the run database URL is malformed ({exc}); give one such as postgresql+psycopg://user@host/db"
            ) from None
        except (ImportError, NoSuchModuleError) as exc:
            hint = " (pip install 'fedloom[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
            raise RunStoreError(f"no database driver for {shown}{hint}: {exc}") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _enable_foreign_keys)
        try:
            metadata.create_all(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            cause = getattr(exc, "orig", None)  # the driver's own error says it best
            reason = str(cause if cause is not None else exc).strip().splitlines()
            raise RunStoreError(f"cannot open the run database at {shown}: {reason[0] if reason else exc}") from None
        _shared[url] = engine
        return engine


def release_engines() -> int:
    """Close the connections of every shared run database this process opened (they open again when asked).
    Returns how many were in use at that moment: SQLAlchemy leaves those open to whoever holds them, so a caller
    about to drop the database or stop its server stops that user first."""
    with _shared_lock:
        in_use = 0
        for engine in _shared.values():
            in_use += engine.pool.checkedout() if isinstance(engine.pool, QueuePool) else 0
            engine.dispose()
        _shared.clear()
        return in_use


def sqlite_engine(db_path: Path) -> Engine:
    """An engine for the SQLite file ``db_path`` with foreign keys enforced. The caller disposes it."""
    engine = create_engine(URL.create("sqlite", database=str(db_path)))
    event.listen(engine, "connect", _enable_foreign_keys)
    return engine


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()``, with Ctrl-C held back until the transaction has committed or rolled back and its
    connection is back in the pool (:func:`~fedloom.core.interrupts.interrupts_held`): an interrupt never leaves a
    run's database locked by a transaction it cut short."""
    with interrupts_held(), engine.begin() as conn:
        yield conn


@contextmanager
def connection(engine: Engine) -> Iterator[Connection]:
    """``engine.connect()``, with Ctrl-C held back until the connection is back in the pool."""
    with interrupts_held(), engine.connect() as conn:
        yield conn


@contextmanager
def open_engine(db_path: Path) -> Iterator[Engine]:
    """Yield :func:`sqlite_engine` for ``db_path`` and dispose of it (closing its connections) afterwards."""
    engine = sqlite_engine(db_path)
    try:
        yield engine
    finally:
        engine.dispose()
