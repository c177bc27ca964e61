"""DP-FedAvg's round, worked out by hand with a known noise seed, and its privacy budget."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from fedloom.core import ConfigError, FitConfig, FitResult, Params
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.privacy import DPFedAvg, epsilon
from fedloom.runtime import InlineGrid, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.strategy import FedAvg

X = Params({"w": np.array([1.0, 1.0])})


def result(*update: float, n: int = 5) -> FitResult:
    return FitResult(Params({"w": X["w"] + np.array(update)}), n, {"loss": 1.0})


def noise_draws(seed: int, server_round: int, sigma: float, count_sigma: float | None = None) -> tuple:
    """The draws DPFedAvg makes from its seeded noise: the update's noise, then the count's."""
    rng = np.random.default_rng([seed, server_round])
    update = rng.normal(0.0, sigma, (2,))
    return update, (rng.normal(0.0, count_sigma) if count_sigma is not None else None)


def test_fixed_clipping_by_hand():
    dp = DPFedAvg(FedAvg(fraction=0.5), num_clients=4, clip_norm=1.0, noise_multiplier=0.5, noise_seed=7)
    state = dp.init(X)
    # a's update (3, 4) has norm 5: clipped to (0.6, 0.8). b's (0.3, 0) is within the clip. The sum (0.9, 0.8)
    # gets noise of std z C = 0.5 and is divided by the expected number of clients q n = 0.5 * 4 = 2.
    state, metrics = dp.aggregate_fit(1, state, {"a": result(3.0, 4.0), "b": result(0.3, 0.0)})
    noise, _ = noise_draws(7, 1, 0.5)
    np.testing.assert_allclose(state.params["w"], X["w"] + (np.array([0.9, 0.8]) + noise) / 2)
    assert metrics["epsilon"] == pytest.approx(epsilon(noise_multiplier=0.5, sample_rate=0.5, rounds=1, delta=1e-5))
    assert (metrics["dp_clip"], metrics["dp_clients"], state.clip, state.rounds_spent) == (1.0, 2.0, 1.0, 1)


def test_adaptive_clipping_by_hand():
    dp = DPFedAvg(
        FedAvg(fraction=0.5), num_clients=4, clip_norm=1.0, noise_multiplier=0.5, noise_seed=3,
        target_quantile=0.5, clip_lr=0.2, count_stddev=1.0,
    )  # fmt: skip
    # The update's multiplier leaves room for the count's noise: (0.5^-2 - (2 * 1)^-2)^-1/2 = (4 - 0.25)^-1/2.
    z_update = (4 - 0.25) ** -0.5
    assert dp.update_noise_multiplier(2.0) == pytest.approx(z_update)
    state, _ = dp.aggregate_fit(1, dp.init(X), {"a": result(3.0, 4.0), "b": result(0.3, 0.0)})
    noise, count_noise = noise_draws(3, 1, z_update * 1.0, 1.0)
    np.testing.assert_allclose(state.params["w"], X["w"] + (np.array([0.9, 0.8]) + noise) / 2)
    # One of the two updates was within the clip: the noised share (1 + noise) / 2 against the target 0.5.
    assert state.clip == pytest.approx(math.exp(-0.2 * ((1 + count_noise) / 2 - 0.5)))


def test_the_noise_has_the_stated_scale_and_changes_from_round_to_round():
    dp = DPFedAvg(FedAvg(fraction=0.1), num_clients=100, clip_norm=2.0, noise_multiplier=1.5)
    zeros = Params({"w": np.zeros(200_000)})
    state, metrics = dp.aggregate_fit(1, dp.init(zeros), {})  # nobody sampled: the round is noise alone
    # std of the noised mean: z C / (q n) = 1.5 * 2 / 10
    assert np.std(state.params["w"]) == pytest.approx(0.3, rel=0.01)
    again, _ = dp.aggregate_fit(1, dp.init(zeros), {})
    assert not np.array_equal(again.params["w"], state.params["w"])  # operating-system entropy, not a seed
    assert metrics["dp_clients"] == 0.0


def test_each_client_is_sampled_independently_with_probability_q():
    dp = DPFedAvg(FedAvg(fraction=0.2), num_clients=1000, noise_multiplier=1.0)
    clients = [f"c{k}" for k in range(1000)]
    rng = np.random.default_rng(0)
    counts = [len(dp.configure_fit(r, dp.init(X), clients, rng)) for r in range(1, 51)]
    assert np.mean(counts) == pytest.approx(200, rel=0.03)
    assert len(set(counts)) > 5  # Poisson sampling: the cohort's size varies


def _federation(n: int) -> FederatedData:
    rng = np.random.default_rng(0)
    clients = {}
    for k in range(n):
        x = rng.normal(size=(4, 2))
        data = ArrayData(x, np.zeros(4, np.int64))
        clients[f"c{k}"] = ClientData(data, data)
    return FederatedData(clients=clients, central_test=None, num_classes=1, name="toy")


class MeanTask:
    """The model is the mean of the data: one step moves w to the client's mean."""

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(2)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(Params({"w": data.x.mean(axis=0)}), len(data), {"loss": 0.0})

    def evaluate(self, params, data):
        from fedloom.core import EvalResult

        return EvalResult(float(np.sum((params["w"] - data.x.mean(axis=0)) ** 2)), len(data), {})


def test_a_run_stops_before_the_round_that_would_exceed_its_budget(caplog):
    budget = epsilon(noise_multiplier=1.0, sample_rate=0.5, rounds=3, delta=1e-3) + 1e-6
    dp = DPFedAvg(FedAvg(fraction=0.5), num_clients=20, noise_multiplier=1.0, delta=1e-3, target_epsilon=budget)
    task = MeanTask()
    with caplog.at_level(logging.WARNING, logger="fedloom.server"):
        done = run_rounds(
            strategy=dp,
            grid=InlineGrid(SimulatedClients.of(task, _federation(20))),
            initial_params=task.init_params(0),
            rounds=10,
            seed=0,
        )
    assert [r.server_round for r in done.history] == [1, 2, 3]
    assert done.history[-1].metrics["epsilon"] <= budget
    assert "the run ends before round 4: round 4 would bring epsilon to" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_clients": 0}, "needs num_clients"),
        ({"delta": 0.2}, "must be below 1/10"),
        ({"noise_multiplier": 0.0}, "no noise is no privacy"),
        ({"clip_norm": -1.0}, "clip_norm must be > 0"),
        ({"target_quantile": 1.0}, "target_quantile must be in"),
        ({"target_quantile": 0.5, "count_stddev": 0.1, "noise_multiplier": 1.0}, "count_stddev is too small"),
        ({"strategy": FedAvg(clip_norm=1.0)}, "no aggregator and no clip_norm"),
        ({"strategy": FedAvg(clients_per_round=3)}, "clients_per_round does not apply"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_settings_are_config_errors(arguments, message):
    with pytest.raises(ConfigError, match=message):
        DPFedAvg(**{"num_clients": 10, **arguments})


def test_only_a_strategy_whose_aggregate_is_a_weighted_sum_is_wrapped():
    from fedloom.strategy import FedBuff, FedPer, FedProx

    DPFedAvg(FedProx(mu=0.1), num_clients=10, delta=1e-3)  # FedProx is FedAvg with a proximal term
    for other in (FedBuff(), FedPer()):
        with pytest.raises(ConfigError, match=f"cannot wrap {type(other).__name__}: "):
            DPFedAvg(other, num_clients=10, delta=1e-3)
