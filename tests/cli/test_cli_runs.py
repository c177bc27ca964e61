"""``fedloom runs list|show|export`` through the real console script, on the digits run of ``conftest.py``."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py); the modules that read
# the session's digits runs share an xdist group, so those runs are made once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("digits_runs")]


@pytest.fixture(scope="module")
def summary(cli: Cli, digits_run: CliResult) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((digits_run.run_dir(cli.cwd) / "summary.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def results(cli: Cli, summary: dict[str, Any]) -> dict[str, CliResult]:
    """The ``runs`` commands on the digits run (and on an empty folder), run together."""
    run_id = summary["run_id"]
    (cli.cwd / "empty_runs").mkdir()
    in_runs = ("--runs", "runs")
    started = {
        name: cli.start(*args)
        for name, args in {
            "list": ["runs", "list", *in_runs],
            "show_prefix": ["runs", "show", run_id[:-3], *in_runs],
            "csv": ["runs", "export", run_id, "--format", "csv", *in_runs],
            "json_to_file": ["runs", "export", run_id, "--format", "json", "-o", "export.json", *in_runs],
            "xml": ["runs", "export", run_id, "--format", "xml", *in_runs],
            "show_unknown": ["runs", "show", "nope", *in_runs],
            "list_empty": ["runs", "list", "--runs", "empty_runs"],
        }.items()
    }
    started["list_80_columns"] = cli.start("runs", "list", *in_runs, env={"COLUMNS": "80"})
    return {name: future.result() for name, future in started.items()}


def test_list_shows_the_run(results: dict[str, CliResult], summary: dict[str, Any]) -> None:
    listing = results["list"].ok().stdout
    assert summary["run_id"] in listing
    row = next(line for line in listing.splitlines() if summary["run_id"] in line)
    assert "digits" in row
    assert "finished" in row
    assert f"{summary['final']['central_accuracy']:.4f}" in row


def test_show_by_prefix_prints_the_rounds_table(results: dict[str, CliResult], summary: dict[str, Any]) -> None:
    shown = results["show_prefix"].ok().stdout
    assert f"run {summary['run_id']} in " in shown
    header = next(line for line in shown.splitlines() if "round" in line and "central_accuracy" in line)
    assert "num_dropped" in header
    for record in summary["rounds"]:
        row = next(line for line in shown.splitlines() if line.strip("│┃ ").startswith(f"{record['round']} "))
        assert f"{record['metrics']['central_accuracy']:.4f}" in row


def test_export_csv_matches_the_summary(results: dict[str, CliResult], summary: dict[str, Any]) -> None:
    rows = list(csv.DictReader(io.StringIO(results["csv"].ok().stdout)))
    assert len(rows) == 2
    assert list(rows[0])[:5] == ["round", "seconds", "num_selected", "num_ok", "num_dropped"]
    for row, record in zip(rows, summary["rounds"], strict=True):
        assert int(row["round"]) == record["round"]
        assert (int(row["num_selected"]), int(row["num_ok"]), int(row["num_dropped"])) == (5, 5, 0)
        for name, value in record["metrics"].items():
            assert float(row[name]) == pytest.approx(value, abs=1e-9), name


def test_export_json_to_a_file(cli: Cli, results: dict[str, CliResult], summary: dict[str, Any]) -> None:
    result = results["json_to_file"].ok()
    assert result.stdout == ""
    document = json.loads((cli.cwd / "export.json").read_text())
    assert set(document) == {"run", "config", "rounds", "clients", "events"}
    assert document["run"]["run_id"] == summary["run_id"]
    assert document["run"]["params_sha256"] == summary["params_sha256"]
    assert document["config"]["simulation"]["num_clients"] == 5
    assert [r["central_accuracy"] for r in document["rounds"]] == [
        r["metrics"]["central_accuracy"] for r in summary["rounds"]
    ]
    assert len([c for c in document["clients"] if c["phase"] == "fit"]) == 10  # 5 clients, 2 rounds


def test_export_unknown_format_is_an_error(results: dict[str, CliResult]) -> None:
    assert results["xml"].error() == "unknown export format 'xml'; choose one of csv, json"


def test_show_unknown_run_is_an_error(results: dict[str, CliResult], summary: dict[str, Any]) -> None:
    message = results["show_unknown"].error()
    assert message.startswith("no run matches 'nope' in runs")
    assert summary["run_id"] in message  # it lists the runs it knows


def test_list_without_runs(results: dict[str, CliResult]) -> None:
    assert results["list_empty"].ok().stdout.strip() == "no runs in empty_runs"


def test_list_shows_full_run_ids_at_80_columns(results: dict[str, CliResult], summary: dict[str, Any]) -> None:
    assert summary["run_id"] in results["list_80_columns"].ok().stdout


def test_version(cli: Cli) -> None:
    import fedloom

    assert cli.run("--version").ok().stdout.strip() == f"fedloom {fedloom.__version__}"


def test_compare_diffs_the_configs_and_lines_up_the_curves(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    plain, secure = (digits_runs[name].ok().run_dir(cli.cwd) for name in ("happy", "secagg"))
    done = cli.run("runs", "compare", str(plain), str(secure), "--metric", "central_accuracy").ok()
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["A", plain.name]
    assert lines[1].split() == ["B", secure.name]
    assert ["strategy.type", "FedAvg", "SecAgg"] in [line.split() for line in lines]
    assert ["strategy.strategy.type", "(absent)", "FedAvg"] in [line.split() for line in lines]
    found = re.search(r"config: (\d+) settings the same, (\d+) differ", done.stdout)
    assert found is not None
    assert int(found.group(1)) > 10
    rows = [line.split() for line in lines[lines.index("central_accuracy") :] if re.match(r"\s+\d+\s", line)]
    expected = [
        [
            json.loads((run / "summary.json").read_text())["rounds"][r]["metrics"]["central_accuracy"]
            for run in (plain, secure)
        ]
        for r in (0, 1)
    ]
    assert [[float(v) for v in row[1:]] for row in rows] == [pytest.approx(e, abs=5e-5) for e in expected]
    assert [row[0] for row in rows] == ["1", "2"]


def test_compare_needs_two_runs_and_shared_metrics(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    plain = str(digits_runs["happy"].ok().run_dir(cli.cwd))
    assert cli.run("runs", "compare", plain).error() == "compare needs two runs or more"
    error = cli.run("runs", "compare", plain, plain, "--metric", "nope").error()
    assert error.startswith("not recorded by every run: nope; shared metrics: central_accuracy, central_loss")
