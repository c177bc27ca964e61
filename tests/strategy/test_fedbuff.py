"""FedBuff's server step, worked out by hand on one-number models."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.core import ConfigError, FitConfig, FitResult, NotEnoughClientsError, Params
from fedloom.core.results import parse_instruction
from fedloom.strategy import STRATEGIES, Adam, FedAvgState, FedBuff, Median
from fedloom.strategy.fedbuff import staleness_weight


def w(value: float) -> Params:
    return Params({"w": np.array([value])})


def fill(strategy: FedBuff, start: float = 1.0) -> tuple[FedAvgState, dict[str, float]]:
    """The buffer of round 5 on global w = ``start``, with two updates:

    - client a trained from w = 0 (3 updates ago: discount (1 + 3) ** -0.5 = 1/2) to w = 2, on 1 example;
    - client b trained from w = 1 (the newest model: discount 1) to w = 1.5, on 3 examples."""
    buffer = strategy.buffer(5, FedAvgState(w(start), 4))
    buffer.add("a", FitResult(w(2.0), 1, {"loss": 0.2}), w(0.0), 3)
    assert buffer.count == 1
    buffer.add("b", FitResult(w(1.5), 3, {"loss": 0.6}), w(1.0), 0)
    assert buffer.count == 2
    return buffer.finish()


def test_staleness_weights_are_the_papers():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5  # 1 / sqrt(1 + 3)
    assert staleness_weight(7, 1.0) == 0.125
    assert staleness_weight(9, 0.0) == 1.0


def test_the_buffered_step_weighs_updates_by_examples_and_staleness():
    state, metrics = fill(FedBuff(buffer_size=2))
    # Updates from each client's own start: a = 2 - 0 = 2, b = 1.5 - 1 = 0.5.
    # (1 * 1/2 * 2 + 3 * 1 * 0.5) / (1 + 3) = 2.5 / 4 = 0.625; w = 1 + 0.625.
    assert state.params["w"] == pytest.approx([1.625])
    assert state.server_round == 5
    assert metrics == {"fit_loss": pytest.approx((0.2 * 1 + 0.6 * 3) / 4)}


def test_server_lr_and_the_staleness_exponent_change_the_step_as_written():
    state, _ = fill(FedBuff(buffer_size=2, server_lr=2.0))
    assert state.params["w"] == pytest.approx([1.0 + 2 * 0.625])
    state, _ = fill(FedBuff(buffer_size=2, staleness_exponent=0.0))
    assert state.params["w"] == pytest.approx([1.0 + (1 * 2 + 3 * 0.5) / 4])


def test_clip_norm_bounds_each_update_before_the_discount():
    state, _ = fill(FedBuff(buffer_size=2, clip_norm=1.0))
    # a's update 2 is clipped to 1, then discounted to 1/2: (1 * 1/2 * 1 + 3 * 0.5) / 4 = 0.5.
    assert state.params["w"] == pytest.approx([1.5])


def test_a_robust_rule_aggregates_the_discounted_updates():
    state, _ = fill(FedBuff(buffer_size=2, aggregator=Median()))
    # The discounted updates are 1/2 * 2 = 1 and 0.5; their median is 0.75.
    assert state.params["w"] == pytest.approx([1.75])


def test_a_server_optimizer_takes_the_buffered_update_as_its_pseudo_gradient():
    optimizer = Adam(eta=0.1, beta1=0.0, beta2=0.0, tau=1e-9)
    strategy = FedBuff(buffer_size=2, server_optimizer=optimizer)
    buffer = strategy.buffer(1, strategy.init(w(1.0)))
    buffer.add("a", FitResult(w(2.0), 1, {}), w(1.0), 0)
    state, metrics = buffer.finish()
    # Adam with no memory and a tiny tau steps eta * sign(delta): 1 + 0.1.
    assert state.params["w"] == pytest.approx([1.1])
    assert metrics == {}


def test_the_model_keeps_its_dtype():
    strategy = FedBuff(buffer_size=1)
    start = Params({"w": np.array([1.0], np.float32)})
    buffer = strategy.buffer(1, strategy.init(start))
    buffer.add("a", FitResult(Params({"w": np.array([1.5], np.float32)}), 2, {}), start, 0)
    state, _ = buffer.finish()
    assert state.params["w"].dtype == np.float32
    assert state.params["w"] == pytest.approx([1.5])


def test_a_buffer_without_examples_cannot_step():
    strategy = FedBuff(buffer_size=1)
    buffer = strategy.buffer(3, strategy.init(w(0.0)))
    with pytest.raises(NotEnoughClientsError, match="round 3"):
        buffer.finish()
    buffer.add("a", FitResult(w(1.0), 0, {}), w(0.0), 0)
    with pytest.raises(NotEnoughClientsError, match="no update with training examples"):
        buffer.finish()


def test_instructions_train_the_newest_model_with_a_seed_of_their_own():
    strategy = FedBuff(fit=FitConfig(local_epochs=None, local_steps=3, lr=0.5), work_range=(1, 4))
    state = FedAvgState(w(7.0), 6)
    rng = np.random.default_rng(0)
    first, second = (strategy.instruct(6, state, cid, rng) for cid in ("a", "b"))
    for message in (first, second):
        kind, server_round, params, config = parse_instruction(message)
        assert (kind, server_round, params["w"][0]) == ("fit", 7, 7.0)
        assert config is not None
        assert config.lr == 0.5
        assert 1 <= (config.local_steps or 0) <= 4
    assert parse_instruction(first)[3] != parse_instruction(second)[3]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"buffer_size": 0}, "buffer_size must be an integer >= 1"),
        ({"concurrency": 1.5}, "concurrency must be an integer >= 1"),
        ({"server_lr": 0.0}, "server_lr must be > 0"),
        ({"staleness_exponent": -1.0}, "staleness_exponent must be >= 0"),
        ({"max_staleness": -1}, "max_staleness must be an integer >= 0"),
        ({"fraction": 0.5}, "fraction and clients_per_round do not apply"),
        ({"clients_per_round": 4}, "fraction and clients_per_round do not apply"),
        ({"server_lr": 0.5, "server_optimizer": Adam()}, "with a server_optimizer, set its lr"),
    ],
)
def test_bad_arguments_are_config_errors(arguments, message):
    with pytest.raises(ConfigError, match=message):
        FedBuff(**arguments)


def test_fedbuff_is_in_the_catalog():
    built = STRATEGIES["fedbuff"](buffer_size=3, concurrency=6)
    assert isinstance(built, FedBuff)
    assert (built.buffer_size, built.concurrency) == (3, 6)
