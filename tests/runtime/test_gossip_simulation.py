"""Decentralized FL in simulation: ``run_gossip`` and ``fedloom.simulate_gossip`` on a small, easy federation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedloom as fl
from fedloom.core import ConfigError, FitConfig, FitResult, InvalidUpdateError, JobError, Params, PartitionConfig
from fedloom.data import ArrayData, Dataset, FederatedData, federate
from fedloom.runtime.sim.gossip import GossipResult, run_gossip
from fedloom.task import LogisticRegressionTask

FIT = FitConfig(local_epochs=1, batch_size=16, lr=0.1)
# Random initial weights, so the first rounds start well below what the problem allows.
TASK = LogisticRegressionTask(num_features=4, num_classes=3, init_scale=1.0)


def blobs(seed: int = 0, train: int = 480, test: int = 120) -> Dataset:
    """Three Gaussian classes in 4 features, centred 3 apart on the first three axes: easy for a linear model."""
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])

    def split(count: int) -> ArrayData:
        y = rng.integers(0, 3, size=count)
        return ArrayData((centres[y] + rng.normal(size=(count, 4))).astype(np.float32), y)

    return Dataset("blobs", split(train), split(test), num_classes=3)


@pytest.fixture(scope="module")
def federation() -> FederatedData:
    """6 clients with Dirichlet(0.5) label skew (sizes 23 to 134), a quarter of each held out."""
    return federate(blobs(), 6, PartitionConfig("dirichlet", alpha=0.5), seed=0, holdout=0.25)


def gossip(federation: FederatedData, topology: str = "ring", **kwargs: Any) -> GossipResult:
    task = kwargs.pop("task", TASK)
    settings: dict[str, Any] = {"degree": None, "rounds": 3, "fit": FIT, "seed": 0, **kwargs}
    return run_gossip(task, federation, topology=topology, **settings)


class Recording:
    """The task, remembering every model its ``fit`` returned."""

    def __init__(self) -> None:
        self.trained: list[Params] = []

    def init_params(self, seed: int) -> Params:
        return TASK.init_params(seed)

    def fit(self, params: Params, data: ArrayData, config: FitConfig, **kwargs: Any) -> FitResult:
        result = TASK.fit(params, data, config, **kwargs)
        self.trained.append(result.params)
        return result

    def evaluate(self, params: Params, data: ArrayData) -> fl.EvalResult:
        return TASK.evaluate(params, data)


def without_seconds(result: GossipResult) -> list[Any]:
    return [dataclasses.replace(r, seconds=0.0) for r in result.history]


def test_the_same_seed_gives_the_same_run(federation: FederatedData) -> None:
    first, again, other = (gossip(federation, "regular", degree=2, seed=s) for s in (4, 4, 5))
    assert list(first.models) == list(federation.client_ids)
    assert all(first.models[c] == again.models[c] for c in first.models)
    assert first.average == again.average
    assert without_seconds(first) == without_seconds(again)
    assert first.average != other.average  # another seed shuffles (and wires the graph) differently


def test_full_gossip_gives_every_client_the_unweighted_mean_of_the_trained_models(federation: FederatedData) -> None:
    recording = Recording()
    result = gossip(federation, "full", rounds=1, task=recording)
    assert len(recording.trained) == 6
    # The clients hold 23 to 134 training examples, yet gossip weighs every client's model 1/6.
    mean = {k: np.mean([p[k].astype(np.float64) for p in recording.trained], axis=0) for k in ("weight", "bias")}
    models = list(result.models.values())
    assert all(m == models[0] for m in models)  # bit for bit the same model everywhere
    for name, expected in mean.items():
        assert models[0][name].dtype == np.float32
        np.testing.assert_allclose(models[0][name], expected, rtol=1e-6, atol=1e-7)
    assert result.average == models[0]
    assert result.spectral_gap == pytest.approx(1.0)
    assert result.final.consensus_distance == 0.0


def test_a_ring_leaves_the_clients_apart_and_learning_improves(federation: FederatedData) -> None:
    result = gossip(federation, "ring", rounds=10)
    # The 6-ring's gap: 1 - (1/3 + 2/3 cos(pi/3)) = 1/3.
    assert result.spectral_gap == pytest.approx(1 / 3)
    assert all(r.consensus_distance > 0 for r in result.history)
    first, last = result.history[0], result.final
    # About 0.61 after the first round, about 0.95 after the tenth (both means over the 6 clients).
    assert first.client_accuracy is not None
    assert last.client_accuracy is not None
    assert last.client_accuracy > first.client_accuracy + 0.2
    assert last.client_accuracy > 0.9
    assert last.central_accuracy is not None
    assert last.central_accuracy > 0.9
    assert last.client_loss is not None
    assert first.client_loss is not None
    assert last.client_loss < first.client_loss
    assert [r.round for r in result.history] == list(range(1, 11))


def test_evaluation_every_other_round_and_after_the_last(federation: FederatedData) -> None:
    seen: list[int] = []
    result = gossip(federation, rounds=3, evaluate_every=2, progress=lambda r: seen.append(r.round))
    assert seen == [1, 2, 3]
    assert [r.client_accuracy is not None for r in result.history] == [False, True, True]
    assert [r.central_accuracy is not None for r in result.history] == [False, True, True]
    assert all(r.fit_loss is not None and r.seconds > 0 for r in result.history)


def test_bad_settings_are_config_errors(federation: FederatedData) -> None:
    with pytest.raises(ConfigError, match="rounds must be a whole number >= 1"):
        gossip(federation, rounds=0)
    with pytest.raises(ConfigError, match="unknown topology 'star'"):
        gossip(federation, "star")
    with pytest.raises(ConfigError, match="needs a degree"):
        gossip(federation, "regular")
    with pytest.raises(ConfigError, match=r"degree in \[1, 5\], got 6"):
        gossip(federation, "regular", degree=6)


def test_a_client_that_returns_nan_stops_the_run_with_its_name(federation: FederatedData) -> None:
    class Diverging(Recording):
        def fit(self, params: Params, data: ArrayData, config: FitConfig, **kwargs: Any) -> FitResult:
            result = super().fit(params, data, config, **kwargs)
            return FitResult(Params({k: np.full_like(v, np.nan) for k, v in result.params.items()}), 1, {})

    with pytest.raises(InvalidUpdateError, match="round 1: client client-000's trained model"):
        gossip(federation, task=Diverging())


# ------------------------------------------------------------------------------------------ fl.simulate_gossip


def tiny_job(**changes: Any) -> fl.Job:
    job = fl.Job(
        name="blobs",
        task=TASK,
        data=blobs,
        strategy=fl.FedAvg(fit=FIT),
        simulation=fl.SimulationConfig(num_clients=4, rounds=2, partition=PartitionConfig("iid"), seed=1),
    )
    return dataclasses.replace(job, **changes)


def test_simulate_gossip_runs_a_job_and_logs_a_line_per_round(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with caplog.at_level(logging.INFO, logger="fedloom.run"):
        result = fl.simulate_gossip(tiny_job(), topology="regular", degree=2, runs_dir=tmp_path)
    assert len(result.models) == 4
    assert len(result.history) == 2
    assert result.topology == "regular"
    lines = [r.getMessage() for r in caplog.records if r.name == "fedloom.run"]
    assert lines[0] == (
        "fedloom: job blobs, 4 clients, 2 rounds, partition iid, seed 1, gossip on a regular (degree 2) topology "
        "(no server)"
    )
    assert [line.split("  ")[0] for line in lines[1:3]] == ["round 1/2", "round 2/2"]
    assert "client_acc" in lines[2]
    assert "consensus" in lines[2]
    # The simulation settings are the job's, or the ones given.
    again = fl.simulate_gossip(tiny_job(), topology="regular", degree=2, runs_dir=tmp_path)
    assert again.average == result.average
    longer = fl.simulate_gossip(
        tiny_job(), simulation=dataclasses.replace(tiny_job().simulation, rounds=3), runs_dir=tmp_path
    )
    assert len(longer.history) == 3
    # Each is a run of its own in the run store (tests/test_gossip_runs.py looks inside).
    recorded = sorted(info.run_id for info in fl.RunStore(tmp_path).list_runs())
    assert recorded == sorted([result.run_id, again.run_id, longer.run_id])
    assert result.run_dir == tmp_path / result.run_id


class NoFit:
    """A strategy of the job contract with no ``fit`` to train clients with."""

    def init(self, params: Params) -> Any: ...
    def params(self, state: Any) -> Any: ...
    def configure_fit(self, *args: Any) -> Any: ...
    def aggregate_fit(self, *args: Any) -> Any: ...
    def configure_evaluate(self, *args: Any) -> Any: ...
    def aggregate_evaluate(self, *args: Any) -> Any: ...


@pytest.mark.parametrize(
    ("job", "kwargs", "words"),
    [
        (tiny_job(strategy=NoFit()), {}, "uses NoFit, which has none"),
        (tiny_job(), {"topology": "star"}, "unknown topology 'star'; choose one of ring, regular, full"),
        (tiny_job(), {"topology": "full", "degree": 3}, "regular topology only"),
        (
            tiny_job(simulation=fl.SimulationConfig(num_clients=4, attacks=(fl.AttackConfig("scale", 0.5),))),
            {},
            "do not simulate attacks",
        ),
        (tiny_job(simulation=fl.SimulationConfig(num_clients=4, dropout=0.2)), {}, "do not simulate dropout"),
        (tiny_job(simulation=fl.SimulationConfig(num_clients=5)), {"topology": "regular", "degree": 3}, "even"),
    ],
    ids=["no_fit", "unknown_topology", "degree_for_full", "attacks", "dropout", "odd_regular"],
)
def test_simulate_gossip_refuses_bad_input_clearly(
    job: fl.Job, kwargs: dict[str, Any], words: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as error:
        fl.simulate_gossip(job, runs_dir=tmp_path, **kwargs)
    assert words in str(error.value)
    assert list(tmp_path.iterdir()) == []  # refused before a run was started


def test_a_failing_model_is_a_job_error(tmp_path: Path) -> None:
    class Broken(Recording):
        def init_params(self, seed: int) -> Params:
            raise RuntimeError("no such layer")

    with pytest.raises(JobError, match=r"init_params.*RuntimeError: no such layer"):
        fl.simulate_gossip(tiny_job(task=Broken()), runs_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # as fl.simulate: no model, no run
