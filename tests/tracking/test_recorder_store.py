"""RunRecorder writes a run directory; RunStore reads it back (list, resolve, rounds, clients, export).

The same contract holds for both run store backends: each test taking ``db_url`` runs once with a SQLite file per
run and once with a fresh PostgreSQL database shared by the test's runs (``db_url`` in ``tests/conftest.py``)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, func, select

import fedloom.tracking
from fedloom.core.config import SimulationConfig
from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.params import Params
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundRecord
from fedloom.tracking import RunInfo, RunRecorder, RunStore, load_params
from fedloom.tracking.schema import client_metrics, open_engine, round_metrics, rounds, runs, shared_engine

# Golden metrics: federated_accuracy is missing in round 3 and central_loss only appears in round 2, so the
# merged "final" metrics take values from different rounds.
METRICS: dict[int, dict[str, float]] = {
    1: {"fit_loss": 2.0, "federated_accuracy": 0.5},
    2: {"fit_loss": 1.5, "federated_accuracy": 0.625, "central_loss": 1.25},
    3: {"fit_loss": 1.0},
}
FINAL = {"central_loss": 1.25, "federated_accuracy": 0.625, "fit_loss": 1.0}
SECONDS = {1: 0.5, 2: 0.75, 3: 1.25}
CONFIG = {"rounds": 3, "lr": 0.1, "strategy": {"name": "fedavg", "min_clients": 2}}


def params_at(server_round: int) -> Params:
    return Params(
        {
            "w": np.full((2, 3), server_round, dtype=np.float32),
            "steps": np.array([server_round * 10], dtype=np.int64),
        }
    )


def record_at(server_round: int) -> RoundRecord:
    # Two clients train each round; in round 2 client c1 drops out and is not evaluated.
    dropped = server_round == 2
    clients = [
        ClientRecord("c0", "fit", ClientStatus.OK, 30, loss=0.25 * server_round, seconds=0.125,
                     bytes_down=1000, bytes_up=900, metrics={"lr": 0.1}),
        ClientRecord("c1", "fit", ClientStatus.DROPPED if dropped else ClientStatus.OK,
                     0 if dropped else 20, loss=None if dropped else 0.5, seconds=0.0 if dropped else 0.25,
                     bytes_down=1000, bytes_up=0 if dropped else 900),
        ClientRecord("c0", "evaluate", ClientStatus.OK, 10, loss=0.75, accuracy=0.5, seconds=0.0625,
                     bytes_down=1000, bytes_up=50),
    ]  # fmt: skip
    if not dropped:
        clients.append(
            ClientRecord("c1", "evaluate", ClientStatus.OK, 8, loss=1.0, accuracy=0.75, bytes_down=1000, bytes_up=50)
        )
    return RoundRecord(server_round, METRICS[server_round], tuple(clients), SECONDS[server_round])


def record_run(root: Path, name: str = "digits", num_rounds: int = 3, url: str | None = None) -> RunRecorder:
    recorder = RunRecorder.create(root, name, CONFIG, url=url)
    for server_round in range(1, num_rounds + 1):
        recorder.on_round(record_at(server_round), params_at(server_round))
    return recorder


@contextmanager
def database(recorder: RunRecorder, url: str | None) -> Iterator[Connection]:
    """A connection to the database ``recorder`` wrote to: its run's SQLite file, or the shared one."""
    if url is not None:
        with shared_engine(url).connect() as conn:
            yield conn
        return
    with open_engine(recorder.run_dir / "run.db") as engine, engine.connect() as conn:
        yield conn


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_exported_names() -> None:
    assert sorted(fedloom.tracking.__all__) == [
        "Exporter",
        "MlflowExporter",
        "RunInfo",
        "RunRecorder",
        "RunStore",
        "TensorBoardExporter",
        "load_params",
        "save_params",
    ]


# ---------------------------------------------------------------------------------------------- recorder


def test_create_makes_run_dir_and_running_row(tmp_path: Path, db_url: str | None) -> None:
    recorder = RunRecorder.create(tmp_path / "runs", "My Model: v2 (test)!", CONFIG, url=db_url)
    try:
        assert re.fullmatch(r"\d{8}-\d{6}-my-model-v2-test-[0-9a-f]{4}", recorder.run_id)
        assert recorder.run_dir == tmp_path / "runs" / recorder.run_id
        assert (recorder.run_dir / "run.db").is_file() == (db_url is None)  # else the rows are in the shared one
        with database(recorder, db_url) as conn:
            row = conn.execute(select(runs)).one()
        assert row.run_id == recorder.run_id
        assert row.status == "running"
        assert row.finished_at is None
        assert json.loads(row.config_json) == CONFIG
    finally:
        recorder.close()


def test_rounds_clients_and_checkpoints_are_recorded(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, url=db_url)
    recorder.close()
    with database(recorder, db_url) as conn:
        round_rows = conn.execute(select(rounds).order_by(rounds.c.round)).all()
        metric_rows = conn.execute(select(round_metrics)).all()
        num_clients = conn.execute(select(func.count()).select_from(client_metrics)).scalar_one()
        dropped = conn.execute(select(client_metrics).where(client_metrics.c.status == "dropped")).one()

    assert [(r.round, r.seconds, r.num_selected, r.num_ok, r.num_dropped) for r in round_rows] == [
        (1, 0.5, 2, 2, 0),
        (2, 0.75, 2, 1, 1),
        (3, 1.25, 2, 2, 0),
    ]
    assert {(r.round, r.name): r.value for r in metric_rows} == {
        (n, name): value for n, metrics in METRICS.items() for name, value in metrics.items()
    }
    assert num_clients == 4 + 3 + 4
    assert (dropped.round, dropped.client_id, dropped.phase, dropped.loss) == (2, "c1", "fit", None)

    checkpoints = sorted(p.name for p in (recorder.run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"round_0000{n}.safetensors" for n in (1, 2, 3)]
    for n in (1, 2, 3):
        assert load_params(recorder.run_dir / "checkpoints" / f"round_0000{n}.safetensors") == params_at(n)


def test_finish_writes_summary(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, url=db_url)
    final_params = params_at(3)
    recorder.finish(final_params)

    summary = strict_json((recorder.run_dir / "summary.json").read_text())
    assert summary["run_id"] == recorder.run_id
    assert summary["name"] == "digits"
    assert summary["status"] == "finished"
    assert summary["error"] is None
    assert summary["config"] == CONFIG
    assert summary["final"] == FINAL
    assert summary["params_sha256"] == final_params.sha256()
    assert summary["created_at"] < summary["finished_at"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][1] == {
        "round": 2,
        "seconds": 0.75,
        "num_selected": 2,
        "num_ok": 1,
        "num_dropped": 1,
        "metrics": METRICS[2],
    }
    assert [p.name for p in recorder.run_dir.iterdir() if p.name.endswith(".tmp")] == []

    with database(recorder, db_url) as conn:
        row = conn.execute(select(runs)).one()
    assert (row.status, row.params_sha256) == ("finished", final_params.sha256())
    assert row.finished_at is not None

    with pytest.raises(RunStoreError, match="already finished"):
        recorder.on_round(record_at(3), params_at(3))


def test_failed_run_records_status_and_error(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, num_rounds=2, url=db_url)
    recorder.finish(params_at(2), status="failed", error="ValueError: loss exploded")

    summary = strict_json((recorder.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "ValueError: loss exploded"
    assert summary["params_sha256"] == params_at(2).sha256()
    assert summary["final"] == {"central_loss": 1.25, "federated_accuracy": 0.625, "fit_loss": 1.5}

    (info,) = RunStore(tmp_path, db_url).list_runs()
    assert (info.status, info.error, info.rounds) == ("failed", "ValueError: loss exploded", 2)


def test_non_finite_values_are_null(tmp_path: Path, db_url: str | None) -> None:
    recorder = RunRecorder.create(tmp_path, "nan", {"clip": math.inf}, url=db_url)
    record = RoundRecord(
        1,
        {"fit_loss": math.nan, "federated_accuracy": 0.5},
        (ClientRecord("c0", "fit", ClientStatus.OK, 5, loss=math.inf, metrics={"grad_norm": math.nan}),),
        0.1,
    )
    recorder.on_round(record, params_at(1))
    recorder.finish(params_at(1))

    summary = strict_json((recorder.run_dir / "summary.json").read_text())
    assert summary["config"] == {"clip": None}
    assert summary["final"] == {"federated_accuracy": 0.5, "fit_loss": None}
    store = RunStore(tmp_path, db_url)
    (client,) = store.client_metrics(recorder.run_id)
    assert client["loss"] is None
    assert client["metrics"] == {"grad_norm": None}
    strict_json(store.export(recorder.run_id, "json"))


def test_rejects_bad_status_and_out_of_order_rounds(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, num_rounds=2, url=db_url)
    with pytest.raises(RunStoreError, match="round 2 arrived after round 2"):
        recorder.on_round(record_at(2), params_at(2))
    with pytest.raises(ConfigError, match="finishes as one of"):
        recorder.finish(params_at(2), status="running")
    recorder.finish(params_at(2))


def test_failed_checkpoint_write_leaves_round_out_of_db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str | None
) -> None:
    recorder = record_run(tmp_path, num_rounds=1, url=db_url)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(RunStoreError, match="disk full"):
        recorder.on_round(record_at(2), params_at(2))
    monkeypatch.undo()
    recorder.close()

    with database(recorder, db_url) as conn:
        assert conn.execute(select(rounds.c.round)).scalars().all() == [1]
        assert conn.execute(select(func.max(client_metrics.c.round))).scalar_one() == 1
    assert [p.name for p in (recorder.run_dir / "checkpoints").iterdir()] == ["round_00001.safetensors"]


def test_config_dataclasses_are_stored_as_json(tmp_path: Path, db_url: str | None) -> None:
    recorder = RunRecorder.create(
        tmp_path, "cfg", {"sim": SimulationConfig(num_clients=4), "out": tmp_path}, url=db_url
    )
    recorder.finish(Params({}))
    config = RunStore(tmp_path, db_url).config(recorder.run_id)
    assert config["sim"]["num_clients"] == 4
    assert config["sim"]["partition"]["scheme"] == "iid"
    assert config["out"] == str(tmp_path)
    with pytest.raises(ConfigError, match="cannot store"):
        RunRecorder.create(tmp_path, "bad", {"thing": object()}, url=db_url)


# ---------------------------------------------------------------------------------------------- store


def test_list_runs_newest_first_and_skips_other_folders(tmp_path: Path, db_url: str | None) -> None:
    first = record_run(tmp_path, "alpha", url=db_url)
    first.finish(params_at(3))
    second = record_run(tmp_path, "beta", num_rounds=1, url=db_url)
    second.close()  # still running
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "notes.txt").write_text("hello")

    infos = RunStore(tmp_path, db_url).list_runs()
    assert [info.run_id for info in infos] == [second.run_id, first.run_id]
    newest, oldest = infos
    assert isinstance(oldest, RunInfo)
    assert (oldest.name, oldest.status, oldest.rounds) == ("alpha", "finished", 3)
    assert oldest.final_metrics == FINAL
    assert oldest.params_sha256 == params_at(3).sha256()
    assert oldest.path == first.run_dir
    assert oldest.created_at.tzinfo is not None
    assert (newest.status, newest.rounds, newest.params_sha256) == ("running", 1, None)


def test_missing_root(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "nowhere")
    assert store.list_runs() == []
    with pytest.raises(RunStoreError, match="does not exist"):
        store.resolve("anything")


def test_resolve_exact_prefix_path_ambiguous_unknown(tmp_path: Path, db_url: str | None) -> None:
    alpha = record_run(tmp_path, "alpha", num_rounds=1, url=db_url)
    beta = record_run(tmp_path, "beta", num_rounds=1, url=db_url)
    alpha.close()
    beta.close()
    store = RunStore(tmp_path, db_url)

    assert store.resolve(alpha.run_id) == alpha.run_dir
    assert store.resolve(alpha.run_id[: alpha.run_id.index("alpha") + 3]) == alpha.run_dir
    assert store.resolve(str(beta.run_dir)) == beta.run_dir

    # Both ids start with a timestamp; the digits they share (at least the century) prefix both.
    common = next(alpha.run_id[:i] for i in range(len(alpha.run_id), 0, -1) if beta.run_id.startswith(alpha.run_id[:i]))
    with pytest.raises(RunStoreError, match="ambiguous") as ambiguous:
        store.resolve(common)
    assert alpha.run_id in str(ambiguous.value)
    assert beta.run_id in str(ambiguous.value)

    with pytest.raises(RunStoreError, match="no run matches 'gamma'") as unknown:
        store.resolve("gamma")
    assert alpha.run_id in str(unknown.value)
    with pytest.raises(RunStoreError):
        store.resolve("")


def test_rounds_table_and_client_metrics(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, url=db_url)
    recorder.finish(params_at(3))
    store = RunStore(tmp_path, db_url)

    table = store.rounds(recorder.run_id)
    assert list(table[0]) == [
        "round",
        "seconds",
        "num_selected",
        "num_ok",
        "num_dropped",
        "central_loss",
        "federated_accuracy",
        "fit_loss",
    ]
    assert table[2] == {
        "round": 3,
        "seconds": 1.25,
        "num_selected": 2,
        "num_ok": 2,
        "num_dropped": 0,
        "central_loss": None,
        "federated_accuracy": None,
        "fit_loss": 1.0,
    }

    clients = store.client_metrics(recorder.run_id)
    assert len(clients) == 11
    assert clients[0] == {
        "round": 1,
        "client_id": "c0",
        "phase": "evaluate",
        "status": "ok",
        "num_examples": 10,
        "loss": 0.75,
        "accuracy": 0.5,
        "seconds": 0.0625,
        "bytes_down": 1000,
        "bytes_up": 50,
        "metrics": {},
        "detail": None,
    }
    assert store.config(recorder.run_id) == CONFIG


def test_export_csv_parses_back(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, url=db_url)
    recorder.finish(params_at(3))

    text = RunStore(tmp_path, db_url).export(recorder.run_id, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "round",
        "seconds",
        "num_selected",
        "num_ok",
        "num_dropped",
        "central_loss",
        "federated_accuracy",
        "fit_loss",
    ]
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert [float(r["seconds"]) for r in rows] == [SECONDS[n] for n in (1, 2, 3)]
    assert [int(r["num_dropped"]) for r in rows] == [0, 1, 0]
    for n, row in zip((1, 2, 3), rows, strict=True):
        for name in ("central_loss", "federated_accuracy", "fit_loss"):
            expected = METRICS[n].get(name)
            assert (float(row[name]) if row[name] else None) == expected, (n, name)


def test_export_json(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, url=db_url)
    recorder.finish(params_at(3))
    store = RunStore(tmp_path, db_url)

    document = strict_json(store.export(recorder.run_id, "json"))
    assert set(document) == {"run", "config", "rounds", "clients", "events"}
    assert document["run"]["run_id"] == recorder.run_id
    assert document["events"] == []  # only deployments record a client timeline
    assert document["run"]["status"] == "finished"
    assert document["run"]["final_metrics"] == FINAL
    assert document["run"]["params_sha256"] == params_at(3).sha256()
    assert document["config"] == CONFIG
    assert document["rounds"] == store.rounds(recorder.run_id)
    assert document["clients"] == store.client_metrics(recorder.run_id)


def test_export_unknown_format(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, num_rounds=1, url=db_url)
    recorder.close()
    with pytest.raises(ConfigError, match="unknown export format 'xml'"):
        RunStore(tmp_path, db_url).export(recorder.run_id, "xml")
