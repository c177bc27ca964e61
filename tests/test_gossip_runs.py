"""A decentralized run in the run store: ``fl.simulate_gossip`` records its rounds, every client's records, a
checkpoint of the clients' average model after each round and its summary, as every run is recorded; and what
reads the store (``runs show``, ``report``, the dashboard's views) shows it. The recording tests run once per run
store backend (``db_url`` in ``tests/conftest.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom as fl
from fedloom.app.simulation import load_federation
from fedloom.core import FitConfig, FitResult, InvalidUpdateError, Params, PartitionConfig
from fedloom.core.checkpoint import load_params
from fedloom.data import ArrayData, Dataset
from fedloom.task import LogisticRegressionTask
from fedloom.tracking import views
from fedloom.tracking.recorder import checkpoint_path
from fedloom.tracking.report import render_report

FIT = FitConfig(local_epochs=1, batch_size=16, lr=0.1)
TASK = LogisticRegressionTask(num_features=4, num_classes=3, init_scale=1.0)
CLIENTS, ROUNDS = 4, 3
IDS = [f"client-{i:03d}" for i in range(CLIENTS)]


def blobs(seed: int = 0) -> Dataset:
    """Three Gaussian classes in 4 features: 480 training points, 120 central test points."""
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])

    def split(count: int) -> ArrayData:
        y = rng.integers(0, 3, size=count)
        return ArrayData((centres[y] + rng.normal(size=(count, 4))).astype(np.float32), y)

    return Dataset("blobs", split(480), split(120), num_classes=3)


class Watching:
    """The task, keeping the model each client starts each fit from: in round r + 1, the client's model after
    round r's mixing. ``nan_from`` makes every fit from that call on (counted from 0) return NaN."""

    def __init__(self, nan_from: int | None = None) -> None:
        self.starts: list[Params] = []
        self.nan_from = nan_from

    def init_params(self, seed: int) -> Params:
        return TASK.init_params(seed)

    def fit(self, params: Params, data: ArrayData, config: FitConfig, **kwargs: Any) -> FitResult:
        self.starts.append(Params({name: array.copy() for name, array in params.items()}))
        result = TASK.fit(params, data, config, **kwargs)
        if self.nan_from is not None and len(self.starts) > self.nan_from:
            return FitResult(Params({k: np.full_like(v, np.nan) for k, v in result.params.items()}), 1, {})
        return result

    def evaluate(self, params: Params, data: ArrayData) -> fl.EvalResult:
        return TASK.evaluate(params, data)


def gossip_job(task: Any) -> fl.Job:
    simulation = fl.SimulationConfig(num_clients=CLIENTS, rounds=ROUNDS, partition=PartitionConfig("iid"), seed=1)
    return fl.Job(name="blobs", task=task, data=blobs, strategy=fl.FedAvg(fit=FIT), simulation=simulation)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[fl.RunStore, Any]:
    """One gossip run on a 4-ring, recorded in a SQLite run store, for the tests that read it."""
    runs = tmp_path_factory.mktemp("runs")
    return fl.RunStore(runs), fl.simulate_gossip(gossip_job(TASK), topology="ring", runs_dir=runs)


def test_a_gossip_run_is_recorded_round_by_round(tmp_path: Path, db_url: str | None) -> None:
    watching = Watching()
    run = fl.simulate_gossip(gossip_job(watching), topology="ring", runs_dir=tmp_path, db_url=db_url)
    store = fl.RunStore(tmp_path, db_url)
    info = store.info(run.run_id)
    assert (info.status, info.rounds, info.params_sha256) == ("finished", ROUNDS, run.average.sha256())
    assert run.run_dir == tmp_path / run.run_id
    assert run.params_sha256 == run.average.sha256()

    # Each round's metrics are the gossip round's; the 4-ring's spectral gap is 1 - 1/3 = 2/3 (W = (I + A) / 3
    # has eigenvalues 1, 1/3, 1/3, -1/3).
    rows = store.rounds(run.run_id)
    assert [row["round"] for row in rows] == [1, 2, 3]
    for row, gossip in zip(rows, run.history, strict=True):
        assert (row["num_selected"], row["num_ok"], row["num_dropped"]) == (CLIENTS, CLIENTS, 0)
        assert row["fit_loss"] == gossip.fit_loss
        assert row["client_mean_loss"] == gossip.client_loss
        assert row["client_mean_accuracy"] == gossip.client_accuracy
        assert row["central_loss"] == gossip.central_loss
        assert row["central_accuracy"] == gossip.central_accuracy
        assert row["consensus_distance"] == gossip.consensus_distance
        assert row["spectral_gap"] == pytest.approx(2 / 3, abs=1e-12)
        assert row["seconds"] == pytest.approx(gossip.seconds)

    # Every client has a fit record and an evaluate record in every round, and the round's means are theirs.
    data, _ = load_federation(gossip_job(TASK), gossip_job(TASK).simulation)
    size = len(fl.encode_params(TASK.init_params(1)))
    clients = store.client_metrics(run.run_id)
    for phase in ("fit", "evaluate"):
        mine = [c for c in clients if c["phase"] == phase]
        assert [(c["round"], c["client_id"]) for c in mine] == [(r, cid) for r in (1, 2, 3) for cid in IDS]
        assert all(c["status"] == "ok" for c in mine)
    for server_round, row in enumerate(rows, start=1):
        fits = [c for c in clients if c["round"] == server_round and c["phase"] == "fit"]
        tests = [c for c in clients if c["round"] == server_round and c["phase"] == "evaluate"]
        assert [c["num_examples"] for c in fits] == [len(data.clients[cid].train) for cid in IDS]
        assert [c["num_examples"] for c in tests] == [len(data.clients[cid].test) for cid in IDS]
        assert row["fit_loss"] == pytest.approx(math.fsum(c["loss"] for c in fits) / CLIENTS, abs=1e-12)
        assert row["client_mean_loss"] == pytest.approx(math.fsum(c["loss"] for c in tests) / CLIENTS, abs=1e-12)
        assert row["client_mean_accuracy"] == pytest.approx(np.mean([c["accuracy"] for c in tests]), abs=1e-12)
        # On a ring each client sends its model to its 2 neighbours and gets theirs: twice the encoded model.
        assert all(c["bytes_up"] == c["bytes_down"] == 2 * size for c in fits)
        assert all(c["seconds"] > 0 for c in fits + tests)

    # The checkpoint of round r is the plain mean of the clients' models after its mixing: the models they start
    # round r + 1 from, and for the last round the models the run returned.
    assert len(watching.starts) == ROUNDS * CLIENTS
    after = [watching.starts[4:8], watching.starts[8:12], list(run.models.values())]
    for server_round, models in enumerate(after, start=1):
        saved = load_params(checkpoint_path(run.run_dir, server_round))
        assert list(saved) == ["weight", "bias"]
        for name, array in saved.items():
            assert array.dtype == np.float32
            expected = np.mean([m[name].astype(np.float64) for m in models], axis=0)
            np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-7)
        assert not all(m == models[0] for m in models)  # a ring leaves them apart: the mean is no client's model
    assert load_params(checkpoint_path(run.run_dir, ROUNDS)) == run.average

    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert (summary["status"], summary["params_sha256"]) == ("finished", run.average.sha256())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["final"]["consensus_distance"] == run.final.consensus_distance
    assert summary["last_checkpoint"] == "checkpoints/round_00003.safetensors"

    # The config says it was gossip, on which graph, and how the clients trained.
    config = store.config(run.run_id)
    strategy = config["strategy"]
    assert {k: strategy[k] for k in ("type", "topology", "degree", "mixing")} == {
        "type": "Gossip",
        "topology": "ring",
        "degree": None,
        "mixing": "metropolis-hastings",
    }
    assert strategy["fit"]["lr"] == 0.1
    assert (config["job"], config["simulation"]["num_clients"], config["simulation"]["seed"]) == ("blobs", 4, 1)


def test_a_failing_gossip_run_is_recorded_as_failed(tmp_path: Path) -> None:
    # Fits 0-3 are round 1; client-000's fit in round 2 (the fifth) returns NaN.
    with pytest.raises(InvalidUpdateError, match="round 2: client client-000's trained model"):
        fl.simulate_gossip(gossip_job(Watching(nan_from=4)), topology="full", runs_dir=tmp_path)
    store = fl.RunStore(tmp_path)
    [info] = store.list_runs()
    assert info.status == "failed"
    assert info.error is not None
    assert info.error.startswith("InvalidUpdateError: round 2: client client-000's trained model")
    assert info.rounds == 1
    # Recorded with the last good model: round 1's average, as its checkpoint holds it.
    assert info.params_sha256 == load_params(checkpoint_path(info.path, 1)).sha256()
    summary = json.loads((info.path / "summary.json").read_text())
    assert (summary["status"], len(summary["rounds"])) == ("failed", 1)


def test_the_dashboard_and_the_report_show_a_gossip_run(recorded: tuple[fl.RunStore, Any]) -> None:
    store, run = recorded
    [info] = store.list_runs()
    assert info.run_id == run.run_id
    line = views.overview(store, info)
    assert (line["strategy"], line["clients"], line["rounds"]) == ("Gossip", CLIENTS, ROUNDS)
    best = max(range(ROUNDS), key=lambda i: (run.history[i].central_accuracy, -i))
    assert line["best"] == {"name": "central_accuracy", "value": run.history[best].central_accuracy, "round": best + 1}

    detail = views.run_detail(store, run.run_id)
    assert {"consensus_distance", "spectral_gap", "client_mean_accuracy"} <= set(detail["metrics"])
    # The heat map holds each client's own model's accuracy on its own test split, every round.
    heat = views.heatmap(store, run.run_id, "accuracy")
    assert (heat["clients"], heat["rounds"]) == (IDS, [1, 2, 3])
    for server_round in (1, 2, 3):
        column = [values[server_round - 1] for values in heat["values"]]
        assert np.mean(column) == pytest.approx(run.history[server_round - 1].client_accuracy, abs=1e-12)
    participation = views.clients_view(store, run.run_id)["clients"]
    assert [(c["client_id"], c["participation"]) for c in participation] == [(cid, "ttt") for cid in IDS]

    page = render_report(store, run.run_id)
    assert f"<h1>Run {run.run_id}</h1>" in page
    assert "<td>strategy</td><td>Gossip</td>" in page
    assert "<figcaption>consensus_distance</figcaption>" in page
    for cid in IDS:
        assert f"<tr><td>{cid}</td><td>3</td><td>0</td><td>0</td><td>0</td>" in page  # 3 fits, all ok
