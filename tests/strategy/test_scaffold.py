"""SCAFFOLD golden numbers on two clients of the quadratic toy task, computed by hand, through the same
client code every runtime runs (``handle_instruction``) and a client state on disk."""

import numpy as np
import pytest
from toy_task import QuadraticTask, client_with_target

from fedloom.core import ConfigError, FitConfig, FitResult, Params
from fedloom.core.results import parse_instruction
from fedloom.runtime.client import handle_instruction
from fedloom.runtime.state import DirectoryState
from fedloom.strategy import Scaffold

FIT = FitConfig(local_epochs=None, local_steps=2, lr=0.5)


def run_round(strategy, state, server_round, states):
    messages = strategy.configure_fit(server_round, state, ["a", "b"], np.random.default_rng(0))
    data = {"a": client_with_target(2.0), "b": client_with_target(-2.0)}
    replies = {}
    for cid, message in messages.items():
        reply = handle_instruction(QuadraticTask(), data[cid], message, states[cid])
        replies[cid] = FitResult.from_message(reply)
    return messages, replies, strategy.aggregate_fit(server_round, state, replies)


def test_two_rounds_by_hand(tmp_path):
    strategy = Scaffold(fit=FIT)
    states = {cid: DirectoryState(tmp_path / cid) for cid in ("a", "b")}
    state = strategy.init(Params({"w": np.zeros(1)}))

    # Round 1, c = c_i = 0: client a (target 2) from 0 with lr 0.5: w = 0.5 * 2 = 1, then 1 + 0.5 * 1 = 1.5.
    # c_a+ = c_a - c + (x - y) / (K lr) = 0 - 0 + (0 - 1.5) / (2 * 0.5) = -1.5, and by symmetry c_b+ = 1.5.
    messages, replies, (state, _) = run_round(strategy, state, 1, states)
    assert list(messages["a"].params) == ["w", "scaffold.c/w"]
    np.testing.assert_allclose(replies["a"].params["w"], [1.5])
    np.testing.assert_allclose(replies["a"].params["scaffold.c/w"], [-1.5])  # c_a+ - c_a
    np.testing.assert_allclose(states["a"].at_round(1, "evaluate").load("scaffold.control")["w"], [-1.5])
    np.testing.assert_allclose(states["b"].at_round(1, "evaluate").load("scaffold.control")["w"], [1.5])
    # x = 0 + 1 * mean(1.5, -1.5) = 0; c = 0 + (|S|/N = 1) * mean(-1.5, 1.5) = 0
    np.testing.assert_allclose(state.params["w"], [0.0])
    np.testing.assert_allclose(state.control["w"], [0.0])

    # Round 2: client a corrects by c - c_a = 1.5: g = (0 - 2) + 1.5 = -0.5, w = 0.25; g = -1.75 + 1.5 = -0.25,
    # w = 0.375. c_a+ = -1.5 - 0 + (0 - 0.375) / 1 = -1.875, a change of -0.375. The drift is 0.375, not 1.5.
    _, replies, (state, _) = run_round(strategy, state, 2, states)
    np.testing.assert_allclose(replies["a"].params["w"], [0.375])
    np.testing.assert_allclose(replies["a"].params["scaffold.c/w"], [-0.375])
    np.testing.assert_allclose(replies["b"].params["w"], [-0.375])
    np.testing.assert_allclose(states["a"].at_round(2, "evaluate").load("scaffold.control")["w"], [-1.875])
    assert state.server_round == 2


def test_server_step_weights_models_by_examples_and_controls_by_share():
    # x = 1 + 0.5 * (1/4 * (3 - 1) + 3/4 * (-1 - 1)) = 1 + 0.5 * (0.5 - 1.5) = 0.5
    # c = 0.2 + 0.5 (fraction) * mean(1, 3) = 0.2 + 1 = 1.2
    strategy = Scaffold(fraction=0.5, server_lr=0.5)
    state = strategy.init(Params({"w": np.ones(1)}))
    state = type(state)(state.params, Params({"w": np.array([0.2])}))
    results = {
        "a": FitResult(Params({"w": np.array([3.0]), "scaffold.c/w": np.array([1.0])}), 1),
        "b": FitResult(Params({"w": np.array([-1.0]), "scaffold.c/w": np.array([3.0])}), 3),
    }
    new, _ = strategy.aggregate_fit(1, state, results)
    np.testing.assert_allclose(new.params["w"], [0.5])
    np.testing.assert_allclose(new.control["w"], [1.2])


def test_population_replaces_the_fraction_and_is_needed_with_clients_per_round():
    with pytest.raises(ConfigError, match="population"):
        Scaffold(clients_per_round=5)
    strategy = Scaffold(clients_per_round=2, population=8)
    state = strategy.init(Params({"w": np.zeros(1)}))
    results = {cid: FitResult(Params({"w": np.zeros(1), "scaffold.c/w": np.array([4.0])}), 1) for cid in "ab"}
    new, _ = strategy.aggregate_fit(1, state, results)
    np.testing.assert_allclose(new.control["w"], [1.0])  # 0 + 2/8 * 4


def test_integer_params_get_no_control_variate(tmp_path):
    strategy = Scaffold()
    state = strategy.init(Params({"w": np.zeros(2, np.float32), "count": np.array(3, np.int64)}))
    assert list(state.control) == ["w"]
    message = strategy.configure_fit(1, state, ["a"], np.random.default_rng(0))["a"]
    assert list(message.params) == ["w", "count", "scaffold.c/w"]
    assert message.params["scaffold.c/w"].dtype == np.float32
    _, _, _, config = parse_instruction(message)
    assert config.seed >= 0


def test_a_round_run_again_after_a_server_crash_finds_the_control_variate_of_before_it(tmp_path):
    """The server crashes in round 2 after client a replied; it resumes from round 1's checkpoint and sends a
    round 2 again. Client a must train it from its round 1 control variate, not from the one its first round 2
    left behind, or the resumed run ends elsewhere than an uninterrupted one."""
    strategy = Scaffold(fit=FIT)
    states = {cid: DirectoryState(tmp_path / cid) for cid in ("a", "b")}
    state = strategy.init(Params({"w": np.zeros(1)}))
    _, _, (after_one, _) = run_round(strategy, state, 1, states)
    _, first_try, _ = run_round(strategy, after_one, 2, states)  # the server dies before it records round 2
    _, again, _ = run_round(strategy, after_one, 2, states)  # resumed: round 2 once more
    for cid in ("a", "b"):
        assert again[cid].params.sha256() == first_try[cid].params.sha256()
    np.testing.assert_allclose(again["a"].params["scaffold.c/w"], [-0.375])  # as in test_two_rounds_by_hand
