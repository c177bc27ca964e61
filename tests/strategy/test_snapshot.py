"""A strategy's whole state goes into the run directory, and a resumed run goes on as the uninterrupted one:
FedAdam's moments, IFCA's k models, SCAFFOLD's control variate."""

import shutil

import numpy as np
import pytest
from toy_task import QuadraticTask

from fedloom.core import FitConfig, Params
from fedloom.core.errors import RunStoreError
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.runtime import InlineGrid, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.strategy import FedAdam, FedAvg, FedAvgState, Scaffold
from fedloom.strategy.ifca import IFCA, IFCAState
from fedloom.strategy.snapshot import restore, snapshot
from fedloom.tracking import RunRecorder
from fedloom.tracking.recorder import strategy_state_path

FIT = FitConfig(local_epochs=None, local_steps=2, lr=0.3)


def test_a_state_round_trips_without_storing_the_global_model_twice():
    params = Params({"w": np.array([1.0, 2.0], np.float32)})
    state = FedAvgState(params, 7, Params({"m/w": np.array([0.5, 0.25])}))
    saved = snapshot(state, params)
    assert saved is not None
    assert saved.held == "params"
    assert sorted(saved.arrays) == ["optimizer/m/w", "server_round"]
    back = restore(FedAdam().init(params), saved, params)
    assert back.server_round == 7
    assert back.params is params
    np.testing.assert_array_equal(back.optimizer["m/w"], [0.5, 0.25])

    models = (Params({"w": np.zeros(1)}), Params({"w": np.ones(1)}))
    ifca = IFCAState(models, (3, 1), 2)
    again = restore(IFCA(k=2).init(models[0]), snapshot(ifca, models[0]), models[0])
    assert again.sizes == (3, 1)
    assert [m["w"][0] for m in again.models] == [0.0, 1.0]
    assert snapshot(object(), params) is None  # not a dataclass: resumes from init alone
    with pytest.raises(RunStoreError, match="fields this strategy does not"):
        restore(FedAvg().init(params), snapshot(ifca, models[0]), params)


def _federation() -> FederatedData:
    clients = {}
    for i, target in enumerate([3.0, -1.0, 2.0, 5.0]):
        x = np.full((4, 1), target)
        clients[f"c{i}"] = ClientData(ArrayData(x, np.zeros(4)), ArrayData(x[:1], np.zeros(1)))
    return FederatedData(clients, None, num_classes=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAdam(eta=0.1, fraction=0.5, fit=FIT),
        lambda: IFCA(k=2, fraction=0.5, fit=FIT, init_noise=1.0),
        lambda: Scaffold(fraction=0.5, fit=FIT),
    ],
    ids=["fedadam", "ifca", "scaffold"],
)
def test_a_run_resumed_from_its_run_directory_ends_as_the_uninterrupted_one(tmp_path, make):
    task, data = QuadraticTask(), _federation()
    start = Params({"w": np.array([0.5])})

    def run(rounds, recorder=None, resume=None, state_dir=None):
        grid = InlineGrid(SimulatedClients.of(task, data, state_dir=str(state_dir or tmp_path / "whole-clients")))
        observers = [recorder] if recorder is not None else []
        return run_rounds(
            strategy=make(), grid=grid, initial_params=start, rounds=rounds, seed=1, observers=observers, resume=resume
        )

    whole = run(5)
    recorder, resume = RunRecorder.open(tmp_path / "run", "toy", {"rounds": 5})
    run(2, recorder, state_dir=tmp_path / "cut-clients")
    recorder.close()  # the server dies after round 2
    assert not strategy_state_path(tmp_path / "run", 1).exists()  # only the last round's state is kept
    recorder, resume = RunRecorder.open(tmp_path / "run", "toy", {"rounds": 5})
    assert resume is not None
    assert resume.strategy_state is not None
    if (tmp_path / "cut-clients").exists():  # SCAFFOLD's clients, as they were when the server died
        shutil.copytree(tmp_path / "cut-clients", tmp_path / "cut-clients-2")
    rest = run(5, recorder, resume, state_dir=tmp_path / "cut-clients")
    assert rest.params.sha256() == whole.params.sha256()
    # without the strategy's state (a checkpoint from before it was saved) the run goes elsewhere
    blind = run(5, resume=type(resume)(2, resume.params, resume.random_state), state_dir=tmp_path / "cut-clients-2")
    assert blind.params.sha256() != whole.params.sha256()
