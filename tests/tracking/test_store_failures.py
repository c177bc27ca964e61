"""A run store that cannot be written says why in one line: "no space left on device" and the path for a full
disk or database, "not writable" for a read-only one, and never the SQL statement or its parameters."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from safetensors import SafetensorError
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from fedloom.core.errors import NoSpaceError, RunStoreError
from fedloom.tracking import RunRecorder
from fedloom.tracking.failures import no_space, store_error

STATEMENT = "INSERT INTO rounds (run_id, round, seconds) VALUES (?, ?, ?)"


def _sql_error(message: str, name: str) -> OperationalError:
    orig = sqlite3.OperationalError(message)
    orig.sqlite_errorname = name  # type: ignore[attr-defined]  # as sqlite3 sets it (Python 3.11+)
    return OperationalError(STATEMENT, ("20261208-digits-ab12", 3, 0.5), orig)


def test_a_full_sqlite_database_is_no_space_with_its_path_and_no_sql():
    full = _sql_error("database or disk is full", "SQLITE_FULL")
    error = store_error("cannot record round 3 of run R", full, "runs/x/run.db")
    assert isinstance(error, NoSpaceError)
    assert str(error) == "cannot record round 3 of run R: no space left on device at runs/x/run.db"


def test_system_and_safetensors_errors_for_a_full_disk_name_the_file_written():
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/.round_00003.tmp")
    assert str(store_error("cannot write", full, "runs/x")) == (
        "cannot write: no space left on device at runs/x/checkpoints/.round_00003.tmp"
    )
    wrapped = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    assert no_space(wrapped)
    assert str(store_error("cannot write", wrapped, "runs/x")) == "cannot write: no space left on device at runs/x"


def test_other_failures_keep_the_drivers_words_without_sql():
    locked = store_error("cannot record round 3 of run R", _sql_error("database is locked", "SQLITE_BUSY"), "run.db")
    assert type(locked) is RunStoreError
    assert str(locked) == "cannot record round 3 of run R: database is locked"
    refused = _sql_error("attempt to write a readonly database", "SQLITE_READONLY")
    read_only = store_error("cannot resume", refused, "r/run.db")
    assert str(read_only) == "cannot resume: r/run.db is not writable (attempt to write a readonly database)"
    frozen = OSError(errno.EROFS, "Read-only file system", "r/checkpoints")
    assert str(store_error("cannot create run R in r", frozen, "r")) == (
        "cannot create run R in r: r/checkpoints is not writable (Read-only file system)"
    )


@contextmanager
def databases_full() -> Iterator[None]:
    """Every SQLite connection opened meanwhile may not grow its database (``PRAGMA max_page_count``): SQLite's
    own "database or disk is full", without filling a disk."""

    def cap(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
        cursor.close()

    event.listen(Engine, "connect", cap)
    try:
        yield
    finally:
        event.remove(Engine, "connect", cap)


def test_a_run_that_cannot_grow_its_database_says_no_space_with_the_database_path(tmp_path: Path):
    with databases_full(), pytest.raises(NoSpaceError) as raised:
        RunRecorder.open(tmp_path / "run", "digits", {"rounds": 3})
    message = str(raised.value)
    assert message.startswith(f"cannot open the run database of {tmp_path / 'run'}: no space left on device at ")
    assert message.endswith(str(tmp_path / "run" / "run.db"))
    for words in ("\n", "CREATE", "SQL"):
        assert words not in message
