"""Every command that takes RUN finds a deployment's run by the id its server printed, though its run directory
(``fedloom server --run-dir``) is named otherwise. The runs are recorded as ``fedloom server`` records them
(``RunRecorder.open`` on the run directory), without a gRPC server."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import fedloom as fl
from fedloom.core.params import Params
from fedloom.runtime.records import ClientEvent, ClientRecord, LogLine, RoundRecord
from fedloom.tracking import RunRecorder, load_params

pytestmark = pytest.mark.integration

if TYPE_CHECKING:
    from conftest import Cli, CliResult

RUNS = "deployed_runs"
AT = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _record_deployment(run_dir: Path, seed: int) -> tuple[str, Params]:
    """A finished two-round deployment of the digits job with two sites in ``run_dir``; its id and last params."""
    config = {"job": "digits", "backend": "deployment", "rounds": 2, "seed": seed}
    recorder, _ = RunRecorder.open(run_dir, "digits", config)
    recorder.on_events([ClientEvent(AT, "site-a", "connected", detail="ipv4:127.0.0.1:5000")])
    params = fl.load_job("digits").task.init_params(seed)
    for server_round in (1, 2):
        clients = tuple(
            ClientRecord(
                site,
                "fit",
                "ok",
                num_examples=10,
                loss=0.5,
                update_sha256=f"{server_round}{i}".ljust(64, "0"),
                logs=(LogLine(AT, "INFO", "job.train", f"{site} trained in round {server_round}"),),
            )
            for i, site in enumerate(("site-a", "site-b"))
        )
        recorder.on_round(RoundRecord(server_round, {"fit_loss": 1.0 / server_round}, clients, 0.1), params)
    recorder.finish(params)
    return recorder.run_id, params


@pytest.fixture(scope="module")
def deployments(cli: Cli) -> dict[str, tuple[str, Params]]:
    """Two deployments in the runs folder ``deployed_runs``, in folders named by their operators."""
    return {name: _record_deployment(cli.cwd / RUNS / name, seed) for seed, name in enumerate(("site-run", "other"))}


@pytest.fixture(scope="module")
def results(cli: Cli, deployments: dict[str, tuple[str, Params]]) -> dict[str, CliResult]:
    """Each command that takes RUN, given the deployment's run id, run together."""
    run_id, other_id = deployments["site-run"][0], deployments["other"][0]
    in_runs = ("--runs", RUNS)
    return cli.run_all(
        {
            "show": ["runs", "show", run_id, *in_runs],
            "events": ["runs", "events", run_id, *in_runs],
            "logs": ["runs", "logs", run_id, "--grep", "round 2", *in_runs],
            "export_json": ["runs", "export", run_id, "--format", "json", *in_runs],
            "compare": ["runs", "compare", run_id, other_id, *in_runs],
            "report": ["report", run_id, "--out", "deployed.html", *in_runs],
            "model": [
                "export",
                run_id,
                "--format",
                "safetensors",
                "-o",
                "deployed.safetensors",
                "--input-shape",
                "64",
                *in_runs,
            ],
            "ledger": ["ledger", "verify", run_id, *in_runs],
            "spent": ["privacy", "spent", run_id, *in_runs],
        }
    )


def test_the_run_directory_is_not_named_by_the_run_id(cli: Cli, deployments: dict[str, tuple[str, Params]]) -> None:
    run_id = deployments["site-run"][0]
    assert run_id != "site-run"
    listing = cli.run("runs", "list", "--runs", RUNS).ok().stdout
    assert run_id in listing  # what `runs list` shows is what every command takes


def test_runs_show_events_logs_and_export_take_the_run_id(
    results: dict[str, CliResult], deployments: dict[str, tuple[str, Params]]
) -> None:
    run_id = deployments["site-run"][0]
    assert f"run {run_id} in {RUNS}/site-run" in results["show"].ok().stdout
    assert "connected" in results["events"].ok().stdout
    assert "site-b trained in round 2" in results["logs"].ok().stdout
    exported = json.loads(results["export_json"].ok().stdout)
    assert exported["run"]["run_id"] == run_id
    assert [row["round"] for row in exported["rounds"]] == [1, 2]


def test_runs_compare_takes_run_ids(results: dict[str, CliResult], deployments: dict[str, tuple[str, Params]]) -> None:
    compared = results["compare"].ok().stdout
    assert f"A  {deployments['site-run'][0]}" in compared
    assert f"B  {deployments['other'][0]}" in compared
    assert "seed" in compared  # the one setting on which they differ


def test_report_takes_the_run_id(cli: Cli, results: dict[str, CliResult], deployments) -> None:
    assert "wrote deployed.html" in results["report"].ok().stdout
    assert deployments["site-run"][0] in (cli.cwd / "deployed.html").read_text()


def test_export_takes_the_run_id(cli: Cli, results: dict[str, CliResult], deployments) -> None:
    run_id, params = deployments["site-run"]
    assert f"run {run_id} after round 2" in results["model"].ok().stdout
    assert load_params(cli.cwd / "deployed.safetensors") == params


def test_ledger_verify_and_privacy_spent_take_the_run_id(results: dict[str, CliResult], deployments) -> None:
    run_id = deployments["site-run"][0]
    assert f"ledger of run {run_id}: 4 updates over 2 rounds, intact" in results["ledger"].ok().stdout
    assert f"run {run_id} recorded no differential privacy" in results["spent"].ok().stdout
