"""Ctrl-C held back over a block (``fedloom.core.interrupts``), with real SIGINTs sent to this process, and the
run store's transactions that use it (``fedloom.tracking.schema.transaction``)."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from fedloom.core.interrupts import interrupts_held
from fedloom.tracking.schema import metadata, runs, sqlite_engine, transaction


def _ctrl_c() -> None:
    """Send SIGINT to this process and give Python the moment it needs to run the handler (main thread only)."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)


def _held(*steps: Callable[[], object]) -> None:
    with interrupts_held():
        for step in steps:
            step()


def test_a_ctrl_c_inside_the_block_is_raised_when_the_block_ends() -> None:
    reached: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _held(_ctrl_c, lambda: reached.append("after the signal"))
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_held():  # nothing is left pending from the last block
        reached.append("a quiet block")
    assert reached[-1] == "a quiet block"


def test_a_second_ctrl_c_interrupts_at_once() -> None:
    reached: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _held(_ctrl_c, lambda: reached.append("after the first"), _ctrl_c, lambda: reached.append("after the second"))
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_blocks_own_error_is_kept_as_the_interrupts_context() -> None:
    def fail() -> None:
        raise ValueError("the block failed too")

    with pytest.raises(KeyboardInterrupt) as raised:
        _held(_ctrl_c, fail)
    assert isinstance(raised.value.__context__, ValueError)


def test_nested_blocks_and_other_threads_leave_the_handler_alone() -> None:
    seen: list[object] = []
    with interrupts_held():
        holding = signal.getsignal(signal.SIGINT)
        assert holding is not signal.default_int_handler
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))
        seen.append(signal.getsignal(signal.SIGINT))

        def elsewhere() -> None:
            with interrupts_held():  # signal.signal would raise ValueError outside the main thread
                seen.append("ran in a thread")

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(5)
    assert seen == [holding, holding, "ran in a thread"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_transaction_cut_by_ctrl_c_still_commits_and_leaves_the_database_unlocked(tmp_path: Path) -> None:
    engine = sqlite_engine(tmp_path / "run.db")
    try:
        metadata.create_all(engine)
        row = {"name": "r", "status": "running", "created_at": datetime.now(timezone.utc), "config_json": "{}"}

        def write() -> None:
            with transaction(engine) as conn:
                _ctrl_c()  # lands inside the transaction, before its statement
                conn.execute(insert(runs).values(run_id="first", **row))

        with pytest.raises(KeyboardInterrupt):
            write()
        # A second writer, as the interrupted run's "failed" status is, finds the database free at once.
        with closing(sqlite3.connect(tmp_path / "run.db", timeout=0)) as other, other:
            other.execute("UPDATE runs SET status = 'failed' WHERE run_id = 'first'")
        with engine.connect() as conn:
            assert conn.execute(select(runs.c.run_id, runs.c.status)).all() == [("first", "failed")]
    finally:
        engine.dispose()
