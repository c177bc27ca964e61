"""``RunRecorder``: writes one run (its rounds, client records, checkpoints and summary) to a run directory.

It is a :class:`~fedloom.runtime.records.RoundObserver`: the server loop calls :meth:`RunRecorder.on_round`
after every round, and the caller calls :meth:`RunRecorder.finish` once at the end, also when the run
crashed (``status="failed"``). Layout of the run directory::

    <root>/<run_id>/run.db                                  rounds, metrics, client records (SQLite)
    <root>/<run_id>/checkpoints/round_00001.safetensors     global params after each round, and the
                                                            server's random state (for resuming)
    <root>/<run_id>/checkpoints/round_00003.state.safetensors  the strategy's state after the last round
                                                            (server optimizer moments, control variates...)
    <root>/<run_id>/summary.json                            written by finish()

A deployment names its run directory itself (:meth:`RunRecorder.open`): there ``run.db`` also holds the client
tokens (:mod:`fedloom.tracking.tokens`) and the clients' event timeline (:meth:`RunRecorder.on_events`), and
the same command resumes the run after its last recorded round.

>>> recorder = RunRecorder.create("runs", "digits", {"rounds": 3})   # doctest: +SKIP
>>> recorder.on_round(record, params)                              # from the loop, each round  # doctest: +SKIP
>>> recorder.finish(params)                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from fedloom.core.checkpoint import checkpoint_metadata, load_params, save_params, write_atomic
from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.params import Params
from fedloom.core.strictjson import finite_float, jsonable, strict_dumps
from fedloom.privacy import ledger
from fedloom.privacy.ledger import LEDGER_FILE
from fedloom.runtime.loop import Resume
from fedloom.runtime.records import ClientEvent, ClientRecord, ClientStatus, RoundRecord
from fedloom.strategy.snapshot import Snapshot
from fedloom.tracking.exporters import Exporter
from fedloom.tracking.failures import store_error
from fedloom.tracking.schema import (
    client_events,
    client_logs,
    client_metrics,
    metadata,
    round_metrics,
    rounds,
    runs,
    shared_engine,
    shown_url,
    sqlite_engine,
    transaction,
)
from fedloom.tracking.store import DB_NAME, ROUND_COLUMNS, RUN_ID_FILE, final_metrics, read_rounds, utc

__all__ = ["CHECKPOINT_DIR", "SUMMARY_NAME", "RunRecorder", "checkpoint_path"]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
SUMMARY_NAME = "summary.json"
_FIT_PHASE = "fit"
_FINAL_STATUSES = ("finished", "failed")
_NAME_MAX = 64
_ATTEMPTS = 5
_RANDOM_STATE_KEY = "random_state"  # checkpoint metadata: the server's random state after the round (JSON)
LEDGER_HEAD_KEY = "ledger_head"  # checkpoint metadata: the privacy ledger's head hash after the round
_HELD_KEY = "held"  # strategy state metadata: the state field that is the global model, kept in the checkpoint


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """Where the global params after ``server_round`` are stored in ``run_dir``."""
    return run_dir / CHECKPOINT_DIR / f"round_{server_round:05d}.safetensors"


def _sanitize(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-")[:_NAME_MAX].strip("-")
    return slug or "run"


def _finite(value: float | None) -> float | None:
    """A nullable number column's value: NULL for ``None`` and for a number that is not finite."""
    return None if value is None else finite_float(float(value))


def _new_run_id(name: str) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{_sanitize(name)}-{secrets.token_hex(2)}"


def _check_same_config(stored: dict[str, Any], given: dict[str, Any], folder: Path) -> None:
    differ = sorted(k for k in stored.keys() | given.keys() if stored.get(k) != given.get(k))
    if differ:
        shown = "; ".join(f"{k}: {json.dumps(stored.get(k))} there, {json.dumps(given.get(k))} now" for k in differ)
        raise ConfigError(
            f"the run in {folder} was started with other settings ({shown}); resume it with the same command, "
            "or give a new run directory"
        )


def strategy_state_path(run_dir: Path, server_round: int) -> Path:
    """Where the strategy's state after ``server_round`` is kept, beside that round's checkpoint."""
    return run_dir / CHECKPOINT_DIR / f"round_{server_round:05d}.state.safetensors"


def _resume_point(folder: Path, last: int) -> Resume:
    path = checkpoint_path(folder, last)
    params = load_params(path)
    try:
        random_state = json.loads(checkpoint_metadata(path)[_RANDOM_STATE_KEY])
    except (KeyError, json.JSONDecodeError):
        raise RunStoreError(f"checkpoint {path} holds no random state to resume from") from None
    state_path = strategy_state_path(folder, last)
    saved = None
    if state_path.is_file():
        held = checkpoint_metadata(state_path).get(_HELD_KEY) or None
        saved = Snapshot(load_params(state_path), held)
    return Resume(last, params, random_state, saved)


def _engine(run_dir: Path, url: str | None) -> Engine:
    """Where a run's rows go: the shared database at ``url`` (not to be disposed), else ``run_dir``'s own SQLite file
    (the caller disposes it)."""
    return shared_engine(url) if url is not None else sqlite_engine(run_dir / DB_NAME)


def _db_place(run_dir: Path, url: str | None) -> str:
    """Where a run's rows are written, for an error's message: the shared database, or the run's SQLite file."""
    return shown_url(url) if url is not None else str(run_dir / DB_NAME)


def _counts(clients: tuple[ClientRecord, ...]) -> tuple[int, int, int]:
    """(selected, ok, dropped) for a round: over its ``fit`` records, or all its records if it had none."""
    chosen = [c for c in clients if c.phase == _FIT_PHASE] or list(clients)
    selected = len({c.client_id for c in chosen})
    ok = sum(1 for c in chosen if c.status == ClientStatus.OK)
    dropped = sum(1 for c in chosen if c.status == ClientStatus.DROPPED)
    return selected, ok, dropped


class RunRecorder:
    """Records one run into its run directory. Create it with :meth:`create`.

    Not thread-safe: one recorder belongs to one server loop. Every method raises
    :class:`RunStoreError` when the database cannot be written.
    """

    def __init__(self, run_dir: Path, run_id: str, name: str, engine: Engine, *, shared: bool = False) -> None:
        """Use :meth:`create`; this wraps an already initialised run directory. ``shared``: ``engine`` is a
        database that many runs share (:func:`~fedloom.tracking.schema.shared_engine`), not this run's own."""
        self._run_dir = run_dir
        self._run_id = run_id
        self._name = name
        self._engine: Engine | None = engine
        self._shared = shared
        self._exporters: list[Exporter] = []
        self._last_round = 0
        self._ledger_head: str | None = None  # the privacy ledger's last hash, read from the file at first use

    @classmethod
    def create(
        cls,
        root: str | Path,
        name: str,
        config: Mapping[str, Any],
        exporters: Sequence[Exporter] = (),
        url: str | None = None,
    ) -> RunRecorder:
        """Start a new run under ``root`` (created if missing) and record it as ``running``; ``exporters``
        (:mod:`fedloom.tracking.exporters`) mirror it elsewhere. If one cannot start, its error is raised and
        the fresh run directory removed. With ``url`` the run's rows go to that shared database (see
        :class:`~fedloom.tracking.RunStore`), and its run directory holds its checkpoints and summary.

        The run id is ``<UTC yyyymmdd-HHMMSS>-<name>-<4 hex>``, with ``name`` reduced to ``[a-z0-9_-]``.
        ``config`` must be JSON-like (dataclasses, paths, enums and NumPy values are converted; non-finite
        floats are stored as null); anything else raises :class:`ConfigError`.
        """
        config_json = strict_dumps(jsonable(dict(config)))
        root_dir = Path(root)
        root_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            run_id = _new_run_id(name)
            run_dir = root_dir / run_id
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            break
        else:
            raise RunStoreError(f"could not create a fresh run directory under {root_dir}")
        try:
            recorder = cls._start(run_dir, run_id, name, config_json, url)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        try:
            recorder._start_exporters(exporters, config_json)
        except BaseException:
            recorder._forget()
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was recorded in it
            raise
        return recorder

    @classmethod
    def _start(cls, run_dir: Path, run_id: str, name: str, config_json: str, url: str | None) -> RunRecorder:
        """Record a new run ``run_id`` in ``run_dir`` (which exists; its database may hold tokens already), or
        in the shared database at ``url``."""
        try:
            (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise store_error(f"cannot create run {run_id} in {run_dir}", exc, run_dir / CHECKPOINT_DIR) from None
        engine = _engine(run_dir, url)
        try:
            if url is None:
                metadata.create_all(engine)
            with transaction(engine) as conn:
                conn.execute(
                    insert(runs).values(
                        run_id=run_id,
                        name=name,
                        status="running",
                        created_at=datetime.now(timezone.utc),
                        config_json=config_json,
                    )
                )
        except SQLAlchemyError as exc:
            if url is None:
                engine.dispose()
            where = f"at {shown_url(url)}" if url is not None else f"in {run_dir}"
            doing = f"cannot create run {run_id} in the run database {where}"
            raise store_error(doing, exc, _db_place(run_dir, url)) from None
        return cls(run_dir, run_id, name, engine, shared=url is not None)

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        name: str,
        config: Mapping[str, Any],
        exporters: Sequence[Exporter] = (),
        url: str | None = None,
    ) -> tuple[RunRecorder, Resume | None]:
        """Record into the run directory ``run_dir`` itself (a deployment's ``--run-dir``): start its run if it
        has none yet, or resume the one it has, and say where to resume from. ``exporters`` mirror the run
        elsewhere (a resumed run goes on where it is mirrored); one that cannot start raises its error. With
        ``url`` the run's rows live in that shared database, and ``run_dir`` names its run in the file ``run_id``
        (the client tokens stay in the folder's own ``run.db``).

        Resuming needs the same ``config`` as the run was started with (else :class:`ConfigError`, naming what
        differs) and a run that has not finished (else :class:`RunStoreError`). It returns a
        :class:`~fedloom.runtime.loop.Resume` holding the last recorded round's checkpoint and random state,
        or ``None`` when no round was recorded yet; the run is marked ``running`` again.
        """
        folder = Path(run_dir)
        config_json = strict_dumps(jsonable(dict(config)))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(f"cannot create the run directory {folder}", exc, folder) from None
        marker = folder / RUN_ID_FILE
        named = marker.read_text().strip() if url is not None and marker.is_file() else None
        engine = _engine(folder, url)
        try:
            if url is None:
                metadata.create_all(engine)
            with transaction(engine) as conn:
                query = runs.select() if url is None else runs.select().where(runs.c.run_id == named)
                row = conn.execute(query).first() if url is None or named else None
                last = None
                if row is not None:
                    last = conn.execute(select(func.max(rounds.c.round)).where(rounds.c.run_id == row.run_id)).scalar()
        except SQLAlchemyError as exc:
            raise store_error(f"cannot open the run database of {folder}", exc, _db_place(folder, url)) from None
        finally:
            if url is None:
                engine.dispose()
        if named and row is None:
            raise RunStoreError(f"{folder} names run {named}, which the run database at {shown_url(str(url))} lacks")
        if row is None:
            recorder = cls._start(folder, _new_run_id(name), name, config_json, url)
            if url is not None:
                write_atomic(marker, recorder.run_id.encode())
            resume = None
        else:
            recorder, resume = cls._resume(folder, row, last, config_json, url)
        try:
            recorder._start_exporters(exporters, config_json)
        except BaseException:
            recorder.close()
            raise
        return recorder, resume

    @classmethod
    def _resume(
        cls, folder: Path, row: Any, last: int | None, config_json: str, url: str | None
    ) -> tuple[RunRecorder, Resume | None]:
        if row.status == "finished":
            raise RunStoreError(
                f"run {row.run_id} in {folder} has finished already; start another with a new run directory"
            )
        _check_same_config(json.loads(row.config_json), json.loads(config_json), folder)
        resume = None if not last else _resume_point(folder, int(last))
        engine = _engine(folder, url)
        recorder = cls(folder, row.run_id, row.name, engine, shared=url is not None)
        recorder._last_round = int(last or 0)
        try:
            with transaction(recorder._live_engine()) as conn:
                conn.execute(
                    update(runs)
                    .where(runs.c.run_id == row.run_id)
                    .values(status="running", finished_at=None, error=None)
                )
        except SQLAlchemyError as exc:
            recorder.close()
            raise store_error(f"cannot resume run {row.run_id} in {folder}", exc, _db_place(folder, url)) from None
        return recorder, resume

    def _start_exporters(self, exporters: Sequence[Exporter], config_json: str) -> None:
        config = json.loads(config_json)
        for exporter in exporters:
            exporter.start(self._run_id, self._name, config)
            self._exporters.append(exporter)

    def _export(self, what: str, call: Callable[[Exporter], None]) -> None:
        """``call`` each exporter; one that fails is logged and left out from then on (the run store has it all)."""
        for exporter in list(self._exporters):
            try:
                call(exporter)
            except Exception as exc:  # an exporter's failure must not end the run
                log.warning(
                    "run %s: %s failed on %s (%s: %s); the run goes on without it",
                    self._run_id, type(exporter).__name__, what, type(exc).__name__, exc,
                )  # fmt: skip
                self._exporters.remove(exporter)

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    def _rows_place(self) -> str:
        """Where this run's rows are written, for an error's message."""
        return _db_place(self._run_dir, shown_url(str(self._engine.url)) if self._shared and self._engine else None)

    def _live_engine(self) -> Engine:
        if self._engine is None:
            raise RunStoreError(f"run {self._run_id} is already finished; it records nothing more")
        return self._engine

    def on_round(self, record: RoundRecord, params: Params) -> None:
        """Record a finished round and checkpoint ``params`` (the global params after it).

        The round, its metrics and its client records are inserted in one transaction; the checkpoint is
        written (atomically) before that transaction commits, so every round in the database has its
        checkpoint. Rounds must arrive in increasing order. Raises :class:`RunStoreError` if the round is
        out of order or cannot be stored, :class:`ConfigError` for a metric named like a round column.
        """
        engine = self._live_engine()
        server_round = record.server_round
        if server_round <= self._last_round:
            raise RunStoreError(f"round {server_round} arrived after round {self._last_round} in run {self._run_id}")
        clashing = sorted(set(record.metrics) & set(ROUND_COLUMNS))
        if clashing:
            raise ConfigError(f"round metrics may not be named {', '.join(clashing)}: those are round columns")
        selected, ok, dropped = _counts(record.clients)
        rid = self._run_id
        try:
            with transaction(engine) as conn:
                conn.execute(
                    insert(rounds).values(
                        run_id=rid,
                        round=server_round,
                        seconds=float(record.seconds),
                        num_selected=selected,
                        num_ok=ok,
                        num_dropped=dropped,
                    )
                )
                if record.metrics:
                    conn.execute(
                        insert(round_metrics),
                        [
                            {"run_id": rid, "round": server_round, "name": name, "value": _finite(value)}
                            for name, value in record.metrics.items()
                        ],
                    )
                if record.clients:
                    conn.execute(insert(client_metrics), [self._client_row(server_round, c) for c in record.clients])
                lines = self._log_rows(conn, server_round, record.clients)
                if lines:
                    conn.execute(insert(client_logs), lines)
                if record.strategy_state is not None:  # first: a checkpoint never lacks its strategy state
                    save_params(
                        strategy_state_path(self._run_dir, server_round),
                        record.strategy_state.arrays,
                        {"run_id": rid, "round": str(server_round), _HELD_KEY: record.strategy_state.held or ""},
                    )
                ledger_head = self._append_ledger(record)  # before the checkpoint that records its head
                save_params(
                    checkpoint_path(self._run_dir, server_round),
                    params,
                    {
                        "run_id": rid,
                        "round": str(server_round),
                        _RANDOM_STATE_KEY: json.dumps(dict(record.random_state)),
                        LEDGER_HEAD_KEY: ledger_head,
                    },
                )
        except SQLAlchemyError as exc:
            raise store_error(f"cannot record round {server_round} of run {rid}", exc, self._rows_place()) from None
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write in its own error
            doing = f"cannot write the checkpoint of round {server_round} of run {rid}"
            raise store_error(doing, exc, self._run_dir) from None
        # Only the last round's strategy state is kept (resuming needs no other); the one before goes once this
        # round is committed, so a crash at any point leaves the last recorded round with its state.
        if record.strategy_state is not None and self._last_round > 0:
            strategy_state_path(self._run_dir, self._last_round).unlink(missing_ok=True)
        self._last_round = server_round
        self._export(f"round {server_round}", lambda exporter: exporter.on_round(record))

    def _append_ledger(self, record: RoundRecord) -> str:
        """Append the round's used updates to the run's privacy ledger (:mod:`fedloom.privacy.ledger`) and
        return its head hash after them."""
        path = self._run_dir / LEDGER_FILE
        if self._ledger_head is None:
            self._ledger_head = ledger.head(path, self._run_id)
        metrics = record.metrics
        # What protected an update on the wire beyond TLS. Under secure aggregation (Paillier) the digest is of
        # the masked input (the ciphertexts), the only form of the update that left the client, and its example
        # count stays secret (0).
        protection = "secagg" if "secagg_survivors" in metrics else "paillier" if "he_clients" in metrics else "none"
        entries = [
            {
                "round": record.server_round,
                "client": client.client_id,
                "update_sha256": digest,
                "num_examples": int(client.num_examples),
                "clip_norm": _finite(metrics.get("dp_clip")),
                "noise_multiplier": _finite(metrics.get("dp_noise_multiplier")),
                "protection": protection,
                "epsilon": _finite(metrics.get("epsilon")),
                "delta": _finite(metrics.get("dp_delta")),
            }
            for client in record.clients
            if client.phase == "fit" and client.status == ClientStatus.OK and client.update_sha256
            for digest in client.update_sha256.split(",")
        ]
        if entries:
            lines, self._ledger_head = ledger.chain(self._ledger_head, entries)
            ledger.append(path, lines)
        return self._ledger_head

    def _client_row(self, server_round: int, client: ClientRecord) -> dict[str, Any]:
        return {
            "run_id": self._run_id,
            "round": server_round,
            "client_id": client.client_id,
            "phase": client.phase,
            "status": client.status,
            "num_examples": int(client.num_examples),
            "loss": _finite(client.loss),
            "accuracy": _finite(client.accuracy),
            "seconds": float(client.seconds),
            "bytes_down": int(client.bytes_down),
            "bytes_up": int(client.bytes_up),
            "extra_json": strict_dumps(jsonable(dict(client.metrics))),
            "detail": client.detail,
        }

    def _log_rows(self, conn: Connection, server_round: int, clients: Sequence[ClientRecord]) -> list[dict[str, Any]]:
        """The rows of the lines ``clients`` sent in ``server_round``, numbered on from the run's last line."""
        if not any(c.logs for c in clients):
            return []
        rid = self._run_id
        seq = conn.execute(
            select(func.coalesce(func.max(client_logs.c.seq), 0)).where(client_logs.c.run_id == rid)
        ).scalar_one()
        rows = []
        for client in clients:
            for line in client.logs:
                seq += 1
                rows.append(
                    {
                        "run_id": rid,
                        "seq": seq,
                        "round": server_round,
                        "client_id": client.client_id,
                        "phase": client.phase,
                        "at": line.at,
                        "level": line.level,
                        "logger": line.logger,
                        "message": line.message,
                    }
                )
        return rows

    def on_events(self, events: Sequence[ClientEvent]) -> None:
        """Append ``events`` to the run's client timeline (``client_events``), after those already there."""
        if not events:
            return
        engine = self._live_engine()
        rid = self._run_id
        try:
            with transaction(engine) as conn:
                seq = conn.execute(
                    select(func.coalesce(func.max(client_events.c.seq), 0)).where(client_events.c.run_id == rid)
                ).scalar_one()
                conn.execute(
                    insert(client_events),
                    [
                        {
                            "run_id": rid,
                            "seq": seq + i,
                            "at": e.at,
                            "round": e.server_round,
                            "client_id": e.client_id,
                            "event": e.event,
                            "bytes": e.nbytes,
                            "detail": e.detail,
                        }
                        for i, e in enumerate(events, start=1)
                    ],
                )
        except SQLAlchemyError as exc:
            raise store_error(f"cannot record client events of run {rid}", exc, self._rows_place()) from None

    def finish(self, params: Params, status: str = "finished", error: str | None = None) -> None:
        """Close the run: store its status, end time and ``params.sha256()``, and write ``summary.json``.

        ``status`` is ``"finished"`` or ``"failed"`` (then ``params`` are the last global params and
        ``error`` says what went wrong). The recorder records nothing after this. Raises
        :class:`ConfigError` for another status and :class:`RunStoreError` if the run cannot be updated.
        """
        if status not in _FINAL_STATUSES:
            raise ConfigError(f"a run finishes as one of {', '.join(_FINAL_STATUSES)}, not {status!r}")
        engine = self._live_engine()
        finished_at = datetime.now(timezone.utc)
        sha256 = params.sha256()
        rid = self._run_id
        try:
            with transaction(engine) as conn:
                conn.execute(
                    update(runs)
                    .where(runs.c.run_id == rid)
                    .values(status=status, finished_at=finished_at, error=error, params_sha256=sha256)
                )
                row = conn.execute(runs.select().where(runs.c.run_id == rid)).one()
                round_list = read_rounds(conn, rid)
            summary = {
                "run_id": rid,
                "name": row.name,
                "status": status,
                "error": error,
                "created_at": utc(row.created_at),
                "finished_at": finished_at,
                "config": json.loads(row.config_json),
                "rounds": round_list,
                "final": final_metrics(round_list),
                "params_sha256": sha256,
                "last_checkpoint": (str(checkpoint_path(Path(), round_list[-1]["round"])) if round_list else None),
            }
            write_atomic(self._run_dir / SUMMARY_NAME, (strict_dumps(jsonable(summary), indent=2) + "\n").encode())
        except SQLAlchemyError as exc:
            raise store_error(f"cannot finish run {rid}", exc, self._rows_place()) from None
        except OSError as exc:
            raise store_error(f"cannot write the summary of run {rid}", exc, self._run_dir / SUMMARY_NAME) from None
        finally:
            self._export("finishing the run", lambda exporter: exporter.finish(status))
            self.close()

    def close(self) -> None:
        """Release the database connections without finishing the run (it stays ``running``)."""
        if self._engine is not None:
            if not self._shared:  # a shared database's connections serve other runs of this process
                self._engine.dispose()
            self._engine = None

    def _forget(self) -> None:
        """Remove this run's row (it recorded nothing yet) and close: an exporter could not start."""
        if self._shared and self._engine is not None:
            try:
                with transaction(self._engine) as conn:
                    conn.execute(delete(runs).where(runs.c.run_id == self._run_id))
            except SQLAlchemyError as exc:
                log.warning("run %s stays in the run database, as running: %s", self._run_id, exc)
        self.close()
