"""``--db`` (or ``$FEDLOOM_DB``): runs recorded in a PostgreSQL database that several runs share, through the real
console script: a simulation records its rows there and its checkpoints in the runs folder, and ``fedloom runs``
and ``fedloom report`` read it back as from a SQLite run directory."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from fedloom.tracking import RunStore

if TYPE_CHECKING:
    from conftest import Cli

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py).
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_simulation_recorded_in_postgresql_reads_back_like_one_in_sqlite(cli: Cli, db_url: str) -> None:
    simulate = ["simulate", "digits", "--clients", "4", "--rounds", "2", "--backend", "inline", "--quiet"]
    done = cli.run_all(
        {
            "postgresql": [*simulate, "--out", "pg-runs", "--db", db_url],
            "sqlite": [*simulate, "--out", "lite-runs"],
        }
    )
    assert done["postgresql"].ok().params_sha256() == done["sqlite"].ok().params_sha256()
    (run,) = RunStore(cli.cwd / "pg-runs", db_url).list_runs()
    assert run.path == cli.cwd / "pg-runs" / run.run_id
    held = {p.name for p in run.path.iterdir()}
    assert {"checkpoints", "summary.json"} <= held
    assert "run.db" not in held  # the rows are in PostgreSQL

    env = {"FEDLOOM_DB": db_url}
    listed = cli.run("runs", "list", "--runs", "pg-runs", env=env).ok()
    assert run.run_id in listed.stdout
    lite = RunStore(cli.cwd / "lite-runs").list_runs()[0].run_id
    exports = {
        "postgresql": cli.run("runs", "export", run.run_id, "--format", "json", "--runs", "pg-runs", env=env).ok(),
        "sqlite": cli.run("runs", "export", lite, "--format", "json", "--runs", "lite-runs").ok(),
    }
    documents = {name: json.loads(result.stdout) for name, result in exports.items()}
    for document in documents.values():
        for client in document["clients"]:  # measurements differ from run to run
            client["seconds"] = 0
            client["bytes_up"] = 0
            client["metrics"] = {k: v for k, v in client["metrics"].items() if not k.startswith("sys_")}
        for row in document["rounds"]:
            row["seconds"] = 0
    assert documents["postgresql"]["clients"] == documents["sqlite"]["clients"]
    assert documents["postgresql"]["rounds"] == documents["sqlite"]["rounds"]
    report = cli.run("report", run.run_id, "--out", "pg-report.html", "--runs", "pg-runs", "--db", db_url).ok()
    assert (cli.cwd / "pg-report.html").stat().st_size > 1000, report


def test_an_unreachable_database_is_one_line(cli: Cli) -> None:
    closed = "postgresql+psycopg://fedloom:secret@127.0.0.1:9/nothing"
    message = cli.run("runs", "list", "--db", closed).error()
    assert message.startswith("cannot open the run database at postgresql+psycopg://fedloom:***@127.0.0.1:9/nothing: ")
    assert "secret" not in message
    assert cli.run("runs", "list", "--db", "not a url").error().startswith("the run database URL is malformed")
