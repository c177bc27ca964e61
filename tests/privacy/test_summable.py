"""The privacy wrappers stand in for the aggregation of any strategy whose aggregate is a weighted sum (the
``SummableStrategy`` capability), not of one class: secure aggregation around FedAdam, DP-FedAvg around FedProx,
Paillier around FedAvgM, and a strategy of the user's own that is no FedAvg at all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from fedloom.core import ConfigError, FitConfig, FitResult, Message, Params
from fedloom.core.results import EvalResult, fit_message
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.privacy import DPFedAvg, KeyPair, PaillierAgg, SecAgg
from fedloom.runtime import InlineGrid, SimulatedClients, run_rounds
from fedloom.strategy import FedAdam, FedAvg, FedAvgM, FedBuff, FedNova, FedPer, FedProx, Median
from fedloom.strategy.base import SummableStrategy
from fedloom.strategy.fedavg import FedAvgState
from fedloom.strategy.personal import Ditto

UPDATES = [[0.3, -0.2, 0.1], [-0.5, 0.4, 0.25], [0.05, 0.0, -0.7], [0.2, 0.2, 0.2]]
ROWS = [1, 2, 3, 4]
MEAN = np.array([0.025, 0.14, -0.07])  # sum n_k u_k / sum n_k, worked out by hand (as in test_secure_runs)
ALL = {"fraction": 1.0, "fraction_evaluate": 0.0}


class ShiftTask:
    """Training adds the mean of the client's rows to ``w`` and notes the proximal term it was asked for."""

    def __init__(self) -> None:
        self.mus: list[float] = []

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(3)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        self.mus.append(config.proximal_mu)
        return FitResult(Params({"w": params["w"] + data.x.mean(axis=0)}), len(data), {"loss": 0.0})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:  # pragma: no cover - not evaluated
        raise AssertionError("not evaluated")


def federation() -> FederatedData:
    clients = {}
    for k, (update, n) in enumerate(zip(UPDATES, ROWS, strict=True)):
        data = ArrayData(np.tile(np.asarray(update, np.float64), (n, 1)), np.zeros(n, np.int64))
        clients[f"c{k}"] = ClientData(data, data)
    return FederatedData(clients=clients, central_test=None, num_classes=1, name="toy")


def run(strategy: Any, task: ShiftTask | None = None, paillier: KeyPair | None = None, rounds: int = 1) -> Any:
    task = task or ShiftTask()
    grid = InlineGrid(SimulatedClients.of(task, federation(), paillier_key=paillier))
    return run_rounds(strategy=strategy, grid=grid, initial_params=task.init_params(0), rounds=rounds, seed=0)


def test_secure_aggregation_around_fedadam_is_fedadam_within_the_quantization_bound() -> None:
    fedadam = FedAdam(eta=0.01, beta1=0.9, tau=1e-3, **ALL)
    secure, plain = run(SecAgg(fedadam)), run(fedadam)
    bound = secure.history[0].metrics["secagg_bound"]
    # One Adam step from m = 0, v = tau^2 moves w by eta (1 - beta1) d / (sqrt(v') + tau): a function of the mean
    # update d whose slope is at most eta (1 - beta1) / tau = 1, so w is off by at most what d is off by.
    assert 0 < bound < 1e-6
    assert np.abs(secure.params["w"] - plain.params["w"]).max() <= bound * 0.01 * 0.1 / 1e-3
    assert np.abs(plain.params["w"] - MEAN).max() > 1e-3  # the server optimizer did step: this is not FedAvg's mean
    # the server optimizer's moments are in the state secure aggregation kept, as FedAdam's own
    assert np.abs(secure.history[0].strategy_state.arrays["optimizer/m/w"] - 0.1 * MEAN).max() < 1e-7


def test_dp_fedavg_around_fedprox_clips_noises_and_keeps_the_proximal_term() -> None:
    task = ShiftTask()
    dp = DPFedAvg(FedProx(mu=0.5, **ALL), num_clients=4, clip_norm=0.5, noise_multiplier=0.8, delta=1e-3, noise_seed=3)
    result = run(dp, task)
    assert task.mus == [0.5] * 4  # every sampled client trained FedProx's objective
    # By hand: each update clipped to L2 norm 0.5, summed, Gaussian noise of sd z C = 0.4 from the seed of the
    # round, divided by the expected number of clients q n = 4 (Poisson sampling at q = 1 takes everyone).
    clipped = [np.asarray(u) * min(1.0, 0.5 / np.linalg.norm(u)) for u in UPDATES]
    noise = np.random.default_rng([3, 1]).normal(0.0, 0.4, (3,))
    np.testing.assert_allclose(result.params["w"], (np.sum(clipped, axis=0) + noise) / 4, atol=1e-12)
    metrics = result.history[0].metrics
    assert (metrics["dp_clip"], metrics["dp_clients"]) == (0.5, 4)


def test_paillier_around_fedavgm_is_fedavgm_within_the_quantization_bound() -> None:
    keys = KeyPair.generate(1024)
    fedavgm = FedAvgM(server_lr=1.0, momentum=0.9, **ALL)
    encrypted, plain = (
        run(PaillierAgg(fedavgm, public_key=keys.public), paillier=keys, rounds=2),
        run(fedavgm, rounds=2),
    )
    bounds = [record.metrics["he_bound"] for record in encrypted.history]
    # momentum is linear: after round 2, w = (1 + 0.9) d1 + d2 (moving d1 by the model of round 2), so each
    # round's error counts at most 1.9 and 1 times
    np.testing.assert_allclose(plain.params["w"], 1.9 * MEAN + MEAN, atol=1e-12)  # the clients' shift is fixed
    assert np.abs(encrypted.params["w"] - plain.params["w"]).max() <= 1.9 * bounds[0] + bounds[1]
    assert 0 < max(bounds) < 1e-6


class PlainMean:
    """A strategy of the user's own, no FedAvg: every client trains, the model moves by the weighted mean update.
    It declares the capability by having its methods, and the wrappers take it."""

    min_clients = 1
    clip_norm = None
    fraction = 1.0

    def summable(self) -> str | None:
        return None

    def init(self, params: Params) -> FedAvgState:
        return FedAvgState(params)

    def params(self, state: FedAvgState) -> Params:
        return state.params

    def server_init(self, params: Params) -> Params:
        return Params({})

    def server_step(self, params: Params, delta: Params, optimizer_state: Params) -> tuple[Params, Params]:
        return Params({n: params[n] + delta[n] for n in params}), optimizer_state

    def apply_update(self, server_round: int, state: FedAvgState, delta: Params) -> FedAvgState:
        return FedAvgState(self.server_step(state.params, delta, state.optimizer)[0], server_round)

    def fit_configs(self, count: int, rng: np.random.Generator) -> list[FitConfig]:
        return [FitConfig(seed=int(s)) for s in rng.integers(0, 2**31 - 1, count)]

    def configure_fit(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        configs = self.fit_configs(len(clients), rng)
        return {cid: fit_message(server_round, state.params, c) for cid, c in zip(clients, configs, strict=True)}

    def aggregate_fit(
        self, server_round: int, state: FedAvgState, results: Mapping[str, FitResult]
    ) -> tuple[FedAvgState, dict[str, float]]:
        raise AssertionError("a wrapper stands in for this")

    def configure_evaluate(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        return {}

    def aggregate_evaluate(
        self, server_round: int, state: FedAvgState, results: Mapping[str, EvalResult]
    ) -> dict[str, float]:
        return {}


def test_a_strategy_with_the_capability_is_wrapped_whatever_its_class() -> None:
    assert isinstance(PlainMean(), SummableStrategy)
    assert not isinstance(PlainMean(), FedAvg)
    secure = run(SecAgg(PlainMean()))
    assert np.abs(secure.params["w"] - MEAN).max() <= secure.history[0].metrics["secagg_bound"]


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [
        (lambda: FedAvg(aggregator=Median()), "FedAvg: a robust aggregator needs every update"),
        (lambda: FedBuff(), "FedBuff: FedBuff is asynchronous"),
        (lambda: FedPer(), "FedPer: FedPer's clients send back only the shared layers"),
        (lambda: Ditto(), "Ditto: Ditto's clients run a local algorithm"),
        (lambda: FedNova(), "weighted sum of its clients' updates .*FedNova is not one"),
    ],
    ids=["median", "fedbuff", "fedper", "ditto", "fednova"],
)
@pytest.mark.parametrize("wrapper", ["SecAgg", "PaillierAgg", "DPFedAvg"])
def test_what_has_no_weighted_sum_is_refused_with_the_reason(strategy: Any, reason: str, wrapper: str) -> None:
    wrap = {
        "SecAgg": lambda s: SecAgg(s),
        "PaillierAgg": lambda s: PaillierAgg(s),
        "DPFedAvg": lambda s: DPFedAvg(s, num_clients=10, delta=1e-3),
    }[wrapper]
    with pytest.raises(ConfigError, match=reason):
        wrap(strategy())
