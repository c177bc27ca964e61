"""MLflow and TensorBoard exporters, checked by reading back what each stored: rounds are steps, clients are tags
(MLflow child runs, TensorBoard scalar names), and the values are the run store's."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest

import fedloom as fl
from fedloom.data import load_synthetic
from fedloom.tracking import MlflowExporter, RunStore, TensorBoardExporter

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# Each test simulates a numpy job whose ``auto`` backend may start worker processes (it does on a busy machine).
pytestmark = pytest.mark.integration

ROUNDS, CLIENTS = 3, 3


def job() -> fl.Job:
    return fl.Job(
        name="exported",
        task=fl.LogisticRegressionTask(num_features=60, num_classes=10),
        data=partial(load_synthetic, alpha=1.0, beta=1.0, num_clients=CLIENTS, seed=3),
        strategy=fl.FedAvg(fraction=1.0, fit=fl.FitConfig(local_epochs=1, batch_size=10, lr=0.01)),
        simulation=fl.SimulationConfig(
            num_clients=CLIENTS, rounds=ROUNDS, partition=fl.PartitionConfig(scheme="natural")
        ),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, fl.Run]:
    root = tmp_path_factory.mktemp("exported")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = fl.simulate(job(), runs_dir=root / "runs", exporters=[MlflowExporter(uri), TensorBoardExporter(root / "tb")])
    return root, uri, run


def _store(root: Path) -> RunStore:
    return RunStore(root / "runs")


def test_mlflow_holds_the_rounds_as_steps_and_a_child_run_per_client(exported):
    root, uri, run = exported
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("exported")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`fedloom.run_id` = '{run.run_id}'")
    parents = [r for r in found if "fedloom.client" not in r.data.tags]
    children = {r.data.tags["fedloom.client"]: r for r in found if "fedloom.client" in r.data.tags}
    (parent,) = parents
    assert parent.info.run_name == run.run_id
    assert parent.info.status == "FINISHED"
    rounds = _store(root).rounds(run.run_id)
    for metric in ("central_accuracy", "federated_loss", "fit_loss"):
        history = client.get_metric_history(parent.info.run_id, metric)
        assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r[metric])) for r in rounds]
    assert parent.data.params["simulation.seed"] == "0"
    assert parent.data.params["strategy.fit.lr"] == "0.01"
    (config,) = (root / "mlflow-artifacts").rglob("fedloom_config.json")  # beside the database, not in ./mlruns
    assert json.loads(config.read_text())["simulation"]["num_clients"] == CLIENTS
    records = _store(root).client_metrics(run.run_id)
    assert sorted(children) == sorted({r["client_id"] for r in records})
    assert len(children) == CLIENTS
    for client_id, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        mine = [r for r in records if r["client_id"] == client_id]
        for phase, column in (("fit", "loss"), ("evaluate", "accuracy"), ("fit", "bytes_up")):
            history = client.get_metric_history(child.info.run_id, f"{phase}_{column}")
            expected = [(r["round"], pytest.approx(r[column])) for r in mine if r["phase"] == phase]
            assert sorted((m.step, m.value) for m in history) == expected
        peak = client.get_metric_history(child.info.run_id, "fit_sys_peak_rss_mb")
        assert [m.step for m in sorted(peak, key=lambda m: m.step)] == list(range(1, ROUNDS + 1))


def test_tensorboard_holds_global_scalars_and_a_tag_per_client(exported):
    root, _uri, run = exported
    events = EventAccumulator(str(root / "tb" / run.run_id))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rounds = _store(root).rounds(run.run_id)
    for metric in ("central_accuracy", "fit_loss"):
        scalars = events.Scalars(f"global/{metric}")
        assert [(s.step, s.value) for s in scalars] == [
            (r["round"], pytest.approx(r[metric], rel=1e-6)) for r in rounds
        ]
    records = _store(root).client_metrics(run.run_id)
    for client_id in {r["client_id"] for r in records}:
        assert {f"fit_loss/{client_id}", f"evaluate_accuracy/{client_id}", f"fit_ok/{client_id}"} <= tags
        scalars = events.Scalars(f"evaluate_accuracy/{client_id}")
        expected = [
            (r["round"], pytest.approx(r["accuracy"], rel=1e-6))
            for r in records
            if r["client_id"] == client_id and r["phase"] == "evaluate"
        ]
        assert [(s.step, s.value) for s in scalars] == expected
    assert '"num_clients": 3' in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


class Breaking:
    """An exporter that starts, then fails on round 2."""

    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.finished: str | None = None

    def start(self, run_id, name, config):
        self.run_id = run_id

    def on_round(self, record):
        if record.server_round == 2:
            raise ConnectionError("the tracking server went away")
        self.rounds.append(record.server_round)

    def finish(self, status):
        self.finished = status


def test_an_exporter_that_fails_mid_run_is_left_out_and_the_run_goes_on(tmp_path, caplog):
    breaking = Breaking()
    with caplog.at_level(logging.WARNING, "fedloom.tracking.recorder"):
        run = fl.simulate(job(), runs_dir=tmp_path, exporters=[breaking])
    assert breaking.rounds == [1]
    assert breaking.finished is None  # left out after its failure
    assert len(RunStore(tmp_path).rounds(run.run_id)) == ROUNDS
    assert (
        f"run {run.run_id}: Breaking failed on round 2 (ConnectionError: the tracking server went away); "
        "the run goes on without it"
    ) in caplog.text


def test_an_exporter_that_cannot_start_stops_the_run_before_it_trains(tmp_path):
    (tmp_path / "taken").write_text("a file where the event files would go")
    with pytest.raises(fl.ConfigError, match="cannot write TensorBoard files in"):
        fl.simulate(job(), runs_dir=tmp_path / "runs", exporters=[TensorBoardExporter(tmp_path / "taken")])
    assert list((tmp_path / "runs").iterdir()) == []  # the fresh run directory went with it
    with pytest.raises(fl.ConfigError, match="cannot use the MLflow tracking store at nosuch://x: "):
        fl.simulate(job(), runs_dir=tmp_path / "runs", exporters=[MlflowExporter("nosuch://x")])
