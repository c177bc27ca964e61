"""Why a write to the run store failed, in one line: what a person can act on, never SQL.

SQLAlchemy's errors carry the statement and its parameters, and safetensors wraps the system's error in its own
words, so a full disk used to end a server with a page of SQL. :func:`store_error` turns any of them into a
:class:`~fedloom.core.errors.RunStoreError` that says what could not be done and why: "no space left on device"
with the path written to (a :class:`~fedloom.core.errors.NoSpaceError`) for a full disk, a full SQLite file or
a PostgreSQL server out of disk; "not writable" for a read-only file or file system; else the driver's or the
system's own first line.

>>> store_error("cannot record round 3 of run R", OSError(28, "No space left on device"), "runs/fed/run.db")
NoSpaceError('cannot record round 3 of run R: no space left on device at runs/fed/run.db')
"""

from __future__ import annotations

import errno
import os

from fedloom.core.errors import NoSpaceError, RunStoreError

__all__ = ["no_space", "store_error"]

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_NO_SPACE_WORDS = ("no space left on device", "database or disk is full", "storagefull", "disk quota exceeded")
_POSTGRES_DISK_FULL = "53100"  # SQLSTATE disk_full


def _cause(exc: BaseException) -> BaseException:
    """The error that says what happened: the driver's own under SQLAlchemy's (``orig``: SQLAlchemy's words hold
    the statement and its parameters, which may hold any text), else ``exc``."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says that there was no room to write: ``ENOSPC`` (or a full quota), SQLite's "database or
    disk is full", PostgreSQL's ``disk_full``, or safetensors' account of an ``ENOSPC``."""
    cause = _cause(exc)
    if isinstance(cause, NoSpaceError):
        return True
    if isinstance(cause, OSError) and cause.errno in _NO_SPACE_ERRNOS:
        return True
    if getattr(cause, "sqlite_errorname", None) == "SQLITE_FULL":
        return True
    if _POSTGRES_DISK_FULL in (getattr(cause, "sqlstate", None), getattr(cause, "pgcode", None)):
        return True
    return any(words in str(cause).lower() for words in _NO_SPACE_WORDS)


def _read_only(exc: BaseException) -> bool:
    cause = _cause(exc)
    if isinstance(cause, OSError):
        return cause.errno in _READ_ONLY_ERRNOS
    return str(getattr(cause, "sqlite_errorname", "")).startswith("SQLITE_READONLY")


def _words(exc: BaseException) -> str:
    """The first line of what went wrong, in the system's or the driver's words (never SQLAlchemy's statement)."""
    cause = _cause(exc)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror + (f": {cause.filename}" if cause.filename else "")
    lines = str(cause).strip().splitlines()
    return lines[0].split(" [SQL:")[0].strip() if lines else type(cause).__name__


def store_error(doing: str, exc: BaseException, where: str | os.PathLike[str]) -> RunStoreError:
    """The error to raise for ``exc``, raised while ``doing`` (the start of a sentence: "cannot record round 3 of
    run R") wrote to ``where`` (the file, folder or database written; an ``OSError`` that names its own file
    names that one instead): a :class:`NoSpaceError` "DOING: no space left on device at WHERE" when
    :func:`no_space`; "DOING: WHERE is not writable (WHY)" for a read-only file, folder or file system; else
    "DOING: WHY" in the driver's or the system's own first line. Never the SQL."""
    named = exc.filename if isinstance(exc, OSError) and exc.filename else None
    place = os.fspath(named if isinstance(named, (str, os.PathLike)) else where)
    if no_space(exc):
        return NoSpaceError(f"{doing}: no space left on device at {place}")
    if _read_only(exc):
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _words(exc)
        return RunStoreError(f"{doing}: {place} is not writable ({why})")
    return RunStoreError(f"{doing}: {_words(exc)}")
