"""What simulated clients log and measure reaches the run store: ``fedloom simulate`` on a job whose task logs a line
and a custom metric in every fit, under the inline and the process backends, then ``fedloom runs logs``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from fedloom.tracking import RunStore, views

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py).
pytestmark = pytest.mark.integration

LOGGING_JOB = '''\
"""Logistic regression on digits; each fit logs what it trained on and counts it with log_metric."""

import logging

import fedloom as fl
from fedloom.data import load_digits

log = logging.getLogger("logging_job")
inner = fl.LogisticRegressionTask(num_features=64, num_classes=10)


class Talking:
    def __getattr__(self, name):
        return getattr(inner, name)

    def fit(self, params, data, config, **kwargs):
        result = inner.fit(params, data, config, **kwargs)
        log.info("trained on %d examples in round %d", result.num_examples, fl.context.server_round)
        log.debug("a debug line stays home")
        fl.context.log_metric("examples_seen", result.num_examples * config.local_epochs)
        return result


job = fl.Job(
    name="logging_job",
    task=Talking(),
    data=load_digits,
    strategy=fl.FedAvg(fraction=1.0, fit=fl.FitConfig(local_epochs=2, batch_size=16, lr=0.1)),
    simulation=fl.SimulationConfig(num_clients=4, rounds=2),
)
'''
TRAINED = re.compile(r"^trained on (\d+) examples in round (\d+)$")


@pytest.fixture(scope="module")
def simulated(cli: Cli) -> dict[str, CliResult]:
    (cli.cwd / "logging_job.py").write_text(LOGGING_JOB)
    return cli.run_all(
        {
            backend: ["simulate", "logging_job.py", "--backend", backend, "--out", f"runs-{backend}", *extra]
            for backend, extra in (
                ("inline", ["--tensorboard", "tb", "--mlflow-uri", f"sqlite:///{cli.cwd / 'mlflow.db'}"]),
                ("process", ["--workers", "2"]),
            )
        }
    )


def _lines(cli: Cli, backend: str) -> list[dict]:
    store = RunStore(cli.cwd / f"runs-{backend}")
    return views.logs_view(store, store.list_runs()[0].run_id, limit=5000)["lines"]


@pytest.mark.parametrize("backend", ["inline", "process"])
def test_each_fit_sends_its_line_its_metric_and_its_measurements(cli: Cli, simulated, backend):
    result = simulated[backend].ok()
    assert "trained on" not in result.stdout + result.stderr  # the console shows warnings only
    store = RunStore(cli.cwd / f"runs-{backend}")
    run_id = store.list_runs()[0].run_id
    fits = [r for r in store.client_metrics(run_id) if r["phase"] == "fit"]
    assert len(fits) == 4 * 2
    lines = _lines(cli, backend)
    assert len(lines) == len(fits)  # one line per fit: the debug line stayed home
    by_fit = {(x["round"], x["client_id"]): x for x in lines}
    for record in fits:
        line = by_fit[(record["round"], record["client_id"])]
        examples, server_round = map(int, TRAINED.match(line["message"]).groups())
        assert (examples, server_round) == (record["num_examples"], record["round"])
        assert (line["level"], line["logger"], line["phase"]) == ("INFO", "logging_job", "fit")
        metrics = record["metrics"]
        assert metrics["examples_seen"] == 2 * record["num_examples"]
        assert metrics["sys_compute_seconds"] > 0
        assert metrics["sys_cpu_seconds"] >= 0
        assert metrics["sys_peak_rss_mb"] > 10


def test_both_backends_log_the_same_lines_and_train_the_same_model(cli: Cli, simulated):
    inline, process = ({(x["round"], x["client_id"], x["message"]) for x in _lines(cli, b)} for b in simulated)
    assert inline == process
    assert simulated["inline"].params_sha256() == simulated["process"].params_sha256()


def test_runs_logs_searches_and_filters(cli: Cli, simulated):
    simulated["inline"].ok()
    run = ["--runs", "runs-inline"]
    store = RunStore(cli.cwd / "runs-inline")
    ref = store.list_runs()[0].run_id
    one = cli.run("runs", "logs", ref, *run, "--grep", "ROUND 2", "--client", "client-001").ok()
    lines = one.stdout.strip().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} round 2 client-001 fit INFO logging_job: trained on \d+ examples in round 2", lines[0]
    )
    last = cli.run("runs", "logs", ref, *run, "--last", "3").ok().stdout.strip().splitlines()
    assert last[-1] == "(8 lines match; the last 3 are shown: --last to see more)"
    assert [line.split(" ")[2:4] for line in last[:-1]] == [
        [str(x["round"]), x["client_id"]] for x in _lines(cli, "inline")[-3:]
    ]
    assert cli.run("runs", "logs", ref, *run, "--level", "error").ok().stdout.strip() == f"no lines match in run {ref}"
    assert cli.run("runs", "logs", ref, *run, "--level", "loud").error() == (
        "unknown log level 'loud'; choose one of INFO, WARNING, ERROR, CRITICAL"
    )


def test_the_flags_export_what_clients_logged_to_mlflow_and_tensorboard(cli: Cli, simulated):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    simulated["inline"].ok()
    store = RunStore(cli.cwd / "runs-inline")
    run_id = store.list_runs()[0].run_id
    seen = {
        (r["round"], r["client_id"]): r["metrics"]["examples_seen"]
        for r in store.client_metrics(run_id)
        if r["phase"] == "fit"
    }
    events = EventAccumulator(str(cli.cwd / "tb" / run_id))
    events.Reload()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{cli.cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("logging_job")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`fedloom.run_id` = '{run_id}'")
    children = {r.data.tags["fedloom.client"]: r.info.run_id for r in runs if "fedloom.client" in r.data.tags}
    for client_id in {c for _, c in seen}:
        board = [(s.step, s.value) for s in events.Scalars(f"fit_examples_seen/{client_id}")]
        logged = sorted((m.step, m.value) for m in client.get_metric_history(children[client_id], "fit_examples_seen"))
        expected = [(r, v) for (r, c), v in sorted(seen.items()) if c == client_id]
        assert board == expected
        assert logged == expected
