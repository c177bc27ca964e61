"""FedAvg golden numbers, computed by hand on two and three toy clients."""

import numpy as np
import pytest

from fedloom.core import ConfigError, EvalResult, FitConfig, FitResult, NotEnoughClientsError, Params
from fedloom.core.results import parse_instruction
from fedloom.strategy import FedAvg, sample_clients, weighted_mean


def p(w, b) -> Params:
    return Params({"w": np.array(w, dtype=np.float32), "b": np.array(b, dtype=np.float32)})


def test_two_clients_weighted_by_examples():
    # n = 1 + 3 = 4: w = 1/4 * [1, 2] + 3/4 * [5, 6] = [4, 5]; b = 1/4 * 0 + 3/4 * 4 = 3
    strategy = FedAvg()
    state = strategy.init(p([0, 0], 0))
    results = {"a": FitResult(p([1, 2], 0), 1, {"loss": 2.0}), "b": FitResult(p([5, 6], 4), 3, {"loss": 1.0})}
    new_state, metrics = strategy.aggregate_fit(1, state, results)
    np.testing.assert_allclose(new_state.params["w"], [4.0, 5.0])
    np.testing.assert_allclose(new_state.params["b"], 3.0)
    assert new_state.params["w"].dtype == np.float32
    assert metrics["fit_loss"] == pytest.approx(0.25 * 2.0 + 0.75 * 1.0)
    assert new_state.server_round == 1
    assert list(new_state.params) == ["w", "b"]


def test_three_clients_golden_numbers():
    # n = 2 + 2 + 4 = 8: w = (2*[1] + 2*[3] + 4*[-1]) / 8 = 0.5
    results = {
        "a": FitResult(Params({"w": np.array([1.0])}), 2),
        "b": FitResult(Params({"w": np.array([3.0])}), 2),
        "c": FitResult(Params({"w": np.array([-1.0])}), 4),
    }
    strategy = FedAvg()
    state, metrics = strategy.aggregate_fit(2, strategy.init(Params({"w": np.array([9.0])})), results)
    assert state.params["w"][0] == pytest.approx(0.5)
    assert metrics == {}


def test_aggregation_does_not_mutate_inputs_or_previous_state():
    strategy = FedAvg()
    old = strategy.init(p([0, 0], 0))
    updates = [p([1, 2], 0), p([5, 6], 4)]
    copies = [Params(dict(u)) for u in updates]
    strategy.aggregate_fit(1, old, {"a": FitResult(updates[0], 1), "b": FitResult(updates[1], 3)})
    assert updates == copies
    assert old.params == p([0, 0], 0)


def test_federated_evaluation_is_weighted_and_skips_empty_clients():
    strategy = FedAvg()
    state = strategy.init(p([0], 0))
    results = {
        "a": EvalResult(1.0, 1, {"accuracy": 0.0}),
        "b": EvalResult(3.0, 3, {"accuracy": 1.0}),
        "c": EvalResult(0.0, 0, {}),
    }
    metrics = strategy.aggregate_evaluate(1, state, results)
    # loss (1*1 + 3*3) / 4 = 2.5; accuracy (1*0 + 3*1) / 4 = 0.75; each client once: (0 + 1) / 2 = 0.5
    assert metrics == {
        "federated_loss": pytest.approx(2.5),
        "federated_accuracy": pytest.approx(0.75),
        "client_mean_accuracy": pytest.approx(0.5),
    }


def test_federated_evaluation_averages_every_metric_all_clients_report():
    strategy = FedAvg()
    state = strategy.init(p([0], 0))
    results = {
        "a": EvalResult(1.0, 1, {"accuracy": 0.5, "global_accuracy": 0.25, "only_a": 9.0}),
        "b": EvalResult(1.0, 3, {"accuracy": 1.0, "global_accuracy": 0.5}),
    }
    metrics = strategy.aggregate_evaluate(1, state, results)
    # global_accuracy (0.25 + 3 * 0.5) / 4 = 0.4375; "only_a" is not reported by b, so it is not averaged
    assert metrics["federated_global_accuracy"] == pytest.approx(0.4375)
    assert metrics["client_mean_accuracy"] == pytest.approx(0.75)
    assert "federated_only_a" not in metrics


def test_weighted_mean_rounds_integer_buffers_and_checks_shapes():
    out = weighted_mean([Params({"n": np.array(1)}), Params({"n": np.array(2)})], [1, 3])
    assert out["n"] == 2
    assert out["n"].dtype == np.array(1).dtype
    with pytest.raises(ConfigError, match="do not match"):
        weighted_mean([Params({"n": np.zeros(2)}), Params({"n": np.zeros(3)})], [1, 1])
    with pytest.raises(ConfigError, match="sum to > 0"):
        weighted_mean([Params({"n": np.zeros(2)})], [0])


def test_client_fraction_and_minimum():
    clients = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    assert len(sample_clients(clients, 0.3, 1, rng)) == 3
    assert len(sample_clients(clients, 0.01, 1, rng)) == 1  # max(C * K, 1)
    assert len(sample_clients(clients, 0.1, 4, rng)) == 4  # never fewer than min_clients
    assert sample_clients(clients, 1.0, 1, rng) == clients
    with pytest.raises(NotEnoughClientsError, match="10 clients are available but at least 11"):
        sample_clients(clients, 1.0, 11, rng)


def test_clients_per_round_samples_that_many_for_training_and_at_most_that_many_for_evaluation():
    strategy = FedAvg(fraction=0.1, fraction_evaluate=0.5, clients_per_round=7)
    state = strategy.init(p([1, 2], 3))
    clients = [f"c{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    assert len(strategy.configure_fit(1, state, clients, rng)) == 7  # not floor(0.1 * 40) = 4
    assert len(strategy.configure_evaluate(1, state, clients, rng)) == 7  # min(7, floor(0.5 * 40) = 20)
    assert len(strategy.configure_evaluate(1, state, clients[:10], rng)) == 5  # min(7, floor(0.5 * 10) = 5)
    assert len(strategy.configure_fit(1, state, clients[:5], rng)) == 5  # all of them when fewer are available


def test_sampling_is_seeded():
    clients = [f"c{i}" for i in range(100)]
    a = sample_clients(clients, 0.1, 1, np.random.default_rng(5))
    b = sample_clients(clients, 0.1, 1, np.random.default_rng(5))
    c = sample_clients(clients, 0.1, 1, np.random.default_rng(6))
    assert a == b
    assert a != c


def test_configure_fit_sends_global_params_and_distinct_seeds():
    strategy = FedAvg(fraction=0.5, fit=FitConfig(local_epochs=2, batch_size=8, lr=0.3))
    state = strategy.init(p([1, 2], 3))
    messages = strategy.configure_fit(4, state, ["a", "b", "c", "d"], np.random.default_rng(0))
    assert len(messages) == 2
    seeds = set()
    for message in messages.values():
        kind, server_round, params, config = parse_instruction(message)
        assert (kind, server_round) == ("fit", 4)
        assert params == state.params
        assert (config.local_epochs, config.batch_size, config.lr) == (2, 8, 0.3)
        seeds.add(config.seed)
    assert len(seeds) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, "fraction must be in"),
        ({"min_clients": 0}, "min_clients must be >= 1"),
        ({"min_clients": 3, "clients_per_round": 2}, "clients_per_round must be >= min_clients=3, got 2"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FedAvg(**kwargs)


def test_fraction_is_not_lost_to_floating_point():
    clients = [f"c{i}" for i in range(100)]
    for fraction, expected in ((0.29, 29), (0.57, 57), (0.58, 58)):
        assert len(sample_clients(clients, fraction, 1, np.random.default_rng(0))) == expected
