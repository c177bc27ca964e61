"""``fedloom.simulate`` end to end on real data, through the Python API."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from functools import partial
from types import MappingProxyType

import numpy as np
import pytest

import fedloom as fl
from fedloom.data import load_synthetic
from fedloom.tracking import load_params


def synthetic_job(rounds: int = 3, dropout: float = 0.0, min_clients: int = 1) -> fl.Job:
    """A numpy job. On its synthetic data the ``auto`` backend may spread clients over worker processes (it does on
    a busy machine), so the tests that simulate it as it is are marked ``integration``."""
    return fl.Job(
        name="synthetic-test",
        task=fl.LogisticRegressionTask(num_features=60, num_classes=10),
        data=partial(load_synthetic, alpha=1.0, beta=1.0, num_clients=10, seed=3),
        strategy=fl.FedAvg(
            fraction=0.5, min_clients=min_clients, fit=fl.FitConfig(local_epochs=1, batch_size=10, lr=0.01)
        ),
        simulation=fl.SimulationConfig(
            num_clients=10, rounds=rounds, dropout=dropout, partition=fl.PartitionConfig(scheme="natural")
        ),
    )


@pytest.mark.integration
def test_same_seed_same_params_and_different_seed_different_params(tmp_path):
    job = synthetic_job()
    a = fl.simulate(job, runs_dir=tmp_path)
    b = fl.simulate(job, runs_dir=tmp_path)
    c = fl.simulate(job, simulation=dataclasses.replace(job.simulation, seed=1), runs_dir=tmp_path)
    assert a.run_id != b.run_id
    assert a.params_sha256 == b.params_sha256
    assert a.params_sha256 != c.params_sha256


@pytest.mark.integration
def test_run_directory_holds_database_checkpoints_and_summary(tmp_path):
    run = fl.simulate(synthetic_job(rounds=3), runs_dir=tmp_path)
    assert (run.run_dir / "run.db").is_file()
    for r in (1, 2, 3):
        assert (run.run_dir / "checkpoints" / f"round_{r:05d}.safetensors").is_file()
    assert load_params(run.run_dir / "checkpoints" / "round_00003.safetensors") == run.params
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["run_id"] == run.run_id
    assert summary["status"] == "finished"
    assert summary["params_sha256"] == run.params_sha256
    assert len(summary["rounds"]) == 3
    assert summary["config"]["simulation"]["num_clients"] == 10
    assert summary["final"]["federated_accuracy"] == pytest.approx(run.final_metrics["federated_accuracy"])
    rows = fl.RunStore(tmp_path).client_metrics(run.run_id)
    fit_rows = [r for r in rows if r["phase"] == "fit"]
    assert len(fit_rows) == 3 * 5  # fraction 0.5 of 10 clients, 3 rounds
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["num_examples"] > 0 for r in fit_rows)


@pytest.mark.integration
def test_training_improves_the_model(tmp_path):
    run = fl.simulate(synthetic_job(rounds=15), runs_dir=tmp_path)
    losses = [r.metrics["federated_loss"] for r in run.history]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.integration
def test_dropouts_are_recorded_and_a_starved_round_fails_the_run_cleanly(tmp_path):
    run = fl.simulate(synthetic_job(rounds=4, dropout=0.3), runs_dir=tmp_path)
    statuses = [c.status for r in run.history for c in r.clients if c.phase == "fit"]
    assert "dropped" in statuses
    assert "ok" in statuses

    with pytest.raises(fl.NotEnoughClientsError, match="fewer than min_clients=5"):
        fl.simulate(synthetic_job(rounds=4, dropout=0.9, min_clients=5), runs_dir=tmp_path / "starved")
    (failed,) = fl.RunStore(tmp_path / "starved").list_runs()
    assert failed.status == "failed"
    assert "NotEnoughClientsError" in (failed.error or "")


@pytest.mark.integration
def test_a_numpy_job_never_imports_torch(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from functools import partial
        import fedloom as fl
        from fedloom.data import load_synthetic
        job = fl.Job(
            task=fl.LogisticRegressionTask(num_features=60, num_classes=10),
            data=partial(load_synthetic, num_clients=5),
            simulation=fl.SimulationConfig(num_clients=5, rounds=2, partition=fl.PartitionConfig(scheme="natural")),
        )
        run = fl.simulate(job, runs_dir={str(tmp_path)!r})
        assert run.history[-1].metrics["federated_accuracy"] >= 0.0
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", ["digits", "heart_disease", "mnist", "mnist_2nn", "synthetic"])
def test_builtin_examples_load(name):
    job = fl.load_job(name)
    assert isinstance(job, fl.Job)
    params = job.task.init_params(0)
    assert params.num_values > 0
    assert params == job.task.init_params(0)


def test_mnist_cnn_matches_the_paper_size():
    # McMahan et al. 2017 give 1,663,370 parameters for the CNN and 199,210 for the 2NN.
    assert fl.load_job("mnist").task.init_params(0).num_values == 1_663_370
    assert fl.load_job("mnist_2nn").task.init_params(0).num_values == 199_210


@pytest.mark.integration  # trains on real data to an accuracy
def test_mnist_2nn_trains_on_the_shared_test_images(shared_data, tmp_path):
    """The 10k MNIST test images, split over 5 clients, stand in for the absent 60k training images."""
    from fedloom.data.datasets.mnist import read_mnist_split

    split = read_mnist_split(
        shared_data / "mnist" / "t10k-images-idx3-ubyte.gz", shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz"
    )
    rng = np.random.default_rng(0)
    order = rng.permutation(len(split))
    train, test = split.subset(order[:1000]), split.subset(order[1000:1500])
    dataset = fl.data.Dataset("mnist-small", train, test, num_classes=10)
    example = fl.load_job("mnist_2nn")
    job = dataclasses.replace(
        example,
        data=lambda: dataset,
        strategy=fl.FedAvg(fit=fl.FitConfig(local_epochs=2, batch_size=10, lr=0.1)),
        simulation=fl.SimulationConfig(num_clients=5, rounds=5, partition=fl.PartitionConfig("iid")),
    )
    run = fl.simulate(job, runs_dir=tmp_path)
    assert run.final_metrics["central_accuracy"] > 0.8


def _toy_population(num_clients: int, seed: int) -> fl.data.LazyFederation:
    def make(k: int, rng: np.random.Generator) -> fl.data.ClientData:
        x = rng.normal(size=(4, 60))
        return fl.data.ClientData(fl.data.ArrayData(x, np.arange(4) % 10), fl.data.ArrayData(x[:1], np.zeros(1, int)))

    return fl.data.LazyFederation.from_generator("toy", num_clients, make, num_classes=10, seed=seed)


def test_only_keyword_only_data_arguments_get_the_simulations_clients_and_seed():
    calls = []

    def opted_in(*, num_clients: int = 3, seed: int = 0):
        calls.append(("opted_in", num_clients, seed))
        return _toy_population(num_clients, seed)

    def positional(num_clients: int = 3, seed: int = 0):  # like a loader's own split seed: left alone
        calls.append(("positional", num_clients, seed))
        return _toy_population(num_clients, seed)

    for data in (opted_in, positional, partial(opted_in, num_clients=4)):
        job = dataclasses.replace(synthetic_job(), data=data)
        job.load_data(None, num_clients=7, seed=5)
    assert calls == [("opted_in", 7, 5), ("positional", 3, 0), ("opted_in", 4, 5)]


def test_a_job_may_bring_its_own_federation_which_runs_as_it_is(tmp_path):
    job = dataclasses.replace(
        synthetic_job(rounds=2),
        data=lambda *, num_clients=50, seed=0: _toy_population(num_clients, seed),
        strategy=fl.FedAvg(clients_per_round=6, fraction_evaluate=0.0, fit=fl.FitConfig(batch_size=4, lr=0.01)),
        simulation=fl.SimulationConfig(num_clients=200, rounds=2),
    )
    run = fl.simulate(job, runs_dir=tmp_path)
    trained = {c.client_id for record in run.history for c in record.clients}
    assert len(trained) <= 12
    assert all(int(cid.removeprefix("client-")) < 200 for cid in trained)
    assert any(int(cid.removeprefix("client-")) >= 50 for cid in trained)  # 200 clients, not the default 50


def test_a_data_function_returning_something_else_is_a_one_line_job_error(tmp_path):
    class NotQuiteAFederation:  # no name
        clients = MappingProxyType({})
        client_ids = ()
        central_test = None
        num_classes = 2

    job = dataclasses.replace(synthetic_job(), data=NotQuiteAFederation)
    with pytest.raises(fl.JobError, match="returned NotQuiteAFederation, not a Dataset"):
        fl.simulate(job, runs_dir=tmp_path)
