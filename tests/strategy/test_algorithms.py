"""Golden numbers, computed by hand, for the strategies built on FedAvg's round (server optimizers, robust rules,
norm bounding), FedNova and q-FFL; and the client side that every runtime shares."""

import numpy as np
import pytest
import torch
from toy_task import QuadraticTask, client_with_target

from fedloom.core import ConfigError, DecodeError, FitConfig, FitResult, Message, Params
from fedloom.core.results import fit_message
from fedloom.data import ArrayData
from fedloom.runtime.client import handle_instruction
from fedloom.strategy import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedNova,
    FedProx,
    Krum,
    Median,
    QFedAvg,
    TrimmedMean,
)
from fedloom.strategy.catalog import build_strategy, strategy_arguments
from fedloom.strategy.local import with_local
from fedloom.task.torch_task import TorchTask


def w(*values: float) -> Params:
    return Params({"w": np.array(values, dtype=np.float32)})


def fit(params: Params, n: int = 1, **metrics: float) -> FitResult:
    return FitResult(params, n, metrics)


def aggregate(strategy, state, results, server_round=1):
    """``aggregate_fit``, and the same through the fold where the strategy folds: both must agree."""
    new, metrics = strategy.aggregate_fit(server_round, state, results)
    fold = strategy.fold_fit(server_round, state) if hasattr(strategy, "fold_fit") else None
    if fold is not None:
        for cid, result in results.items():
            fold.add(cid, result)
        folded, folded_metrics = fold.finish()
        assert folded.params == new.params
        assert folded_metrics == metrics
    return new, metrics


def test_fedavgm_carries_momentum_across_rounds():
    # round 1: mean of 1 and 3 is 2, delta 2: v = 2, x = 0 + 2 = 2.
    # round 2: both return 2, delta 0: v = 0.9 * 2 + 0 = 1.8, x = 2 + 1.8 = 3.8 (FedAvg would stay at 2).
    strategy = FedAvgM(server_lr=1.0, momentum=0.9)
    state, _ = aggregate(strategy, strategy.init(w(0)), {"a": fit(w(1)), "b": fit(w(3))})
    np.testing.assert_allclose(state.params["w"], [2.0])
    state, _ = aggregate(strategy, state, {"a": fit(w(2)), "b": fit(w(2))}, 2)
    np.testing.assert_allclose(state.params["w"], [3.8], rtol=1e-6)
    assert state.params["w"].dtype == np.float32


def test_fedadam_steps_from_the_mean_update():
    # delta = 2: m = 0.1 * 2 = 0.2; v = 0.99 * 1e-6 + 0.01 * 4 = 0.04000099;
    # x = 0 + 0.01 * 0.2 / (sqrt(0.04000099) + 0.001) = 0.002 / 0.2010025 = 0.0099501...
    strategy = FedAdam(eta=0.01, tau=1e-3)
    state, _ = aggregate(strategy, strategy.init(w(0)), {"a": fit(w(1)), "b": fit(w(3))})
    np.testing.assert_allclose(state.params["w"], [0.002 / 0.2010025], rtol=1e-5)
    np.testing.assert_allclose(state.optimizer["m/w"], [0.2])


def test_robust_rules_replace_the_weighted_mean():
    # deltas from x = 1: 0, 1, 99 (the third weighs 100 examples). Median: 1, so x = 2; the mean would follow
    # the heavy client to 1 + (0 + 1 + 9900) / 102 = 98.07.
    results = {"a": fit(w(1)), "b": fit(w(2)), "c": fit(w(100), n=100)}
    strategy = FedAvg(aggregator=Median())
    assert strategy.fold_fit(1, strategy.init(w(1))) is None  # a robust rule needs every update at once
    state, _ = strategy.aggregate_fit(1, strategy.init(w(1)), results)
    np.testing.assert_allclose(state.params["w"], [2.0])
    # trimmed mean with beta 1/3 over 3: drop one each side, keep 1: x = 2. Krum f=0 over 3 updates: distances
    # squared 0-1: 1, 0-99: 9801, 1-99: 9604; n - f - 2 = 1 neighbour: scores 1, 1, 9604: the first, x = 1.
    state, _ = FedAvg(aggregator=TrimmedMean(beta=1 / 3)).aggregate_fit(1, strategy.init(w(1)), results)
    np.testing.assert_allclose(state.params["w"], [2.0])
    state, _ = FedAvg(aggregator=Krum(f=0)).aggregate_fit(1, strategy.init(w(1)), results)
    np.testing.assert_allclose(state.params["w"], [1.0])


def test_norm_bounding_clips_each_update_before_the_mean():
    # x = 0; updates (3, 4) (norm 5, clipped to (0.6, 0.8)) and (0, 0.5) (inside): mean (0.3, 0.65).
    strategy = FedAvg(clip_norm=1.0)
    state, _ = aggregate(strategy, strategy.init(w(0, 0)), {"a": fit(w(3, 4)), "b": fit(w(0, 0.5))})
    np.testing.assert_allclose(state.params["w"], [0.3, 0.65], rtol=1e-6)


def test_fednova_normalizes_by_local_steps():
    # x = 0. a: n 1, tau 1, y 1: d = 1. b: n 3, tau 4, y 2: d = 0.5. p = (1/4, 3/4).
    # tau_eff = 1/4 + 3 = 3.25; mean d = 0.25 + 0.375 = 0.625; x = 3.25 * 0.625 = 2.03125 (FedAvg: 1.75).
    strategy = FedNova()
    results = {"a": fit(w(1), 1, steps=1.0, loss=1.0), "b": fit(w(2), 3, steps=4.0, loss=2.0)}
    state, metrics = strategy.aggregate_fit(1, strategy.init(w(0)), results)
    np.testing.assert_allclose(state.params["w"], [2.03125])
    assert metrics["tau_eff"] == pytest.approx(3.25)
    assert metrics["fit_loss"] == pytest.approx(0.25 * 1 + 0.75 * 2)


def test_fednova_leaves_out_a_reply_without_steps(caplog):
    state, _ = FedNova().aggregate_fit(1, FedNova().init(w(0)), {"a": fit(w(1), steps=1.0), "b": fit(w(9))})
    np.testing.assert_allclose(state.params["w"], [1.0])
    assert "client b" in caplog.text


def test_qffl_weighs_clients_by_their_loss():
    # w = 0, lr 0.5 so L = 2, q = 1. a: F = 2, y = 1: dw = 2 (0 - 1) = -2, D = 2 * -2 = -4, h = 1 * 4 + 2 * 2 = 8.
    # b: F = 1, y = -1: dw = 2, D = 2, h = 4 + 2 = 6. w = 0 - (-4 + 2) / 14 = 1/7: toward a, the worse-off client.
    strategy = QFedAvg(q=1.0, fit=FitConfig(lr=0.5))
    results = {"a": fit(w(1), **{"qffl.loss": 2.0}), "b": fit(w(-1), **{"qffl.loss": 1.0})}
    state, _ = strategy.aggregate_fit(1, strategy.init(w(0)), results)
    np.testing.assert_allclose(state.params["w"], [1 / 7], rtol=1e-6)
    # q = 0: D = dw, h = L: w = -(-2 + 2) / 4 = 0, the plain average.
    state, _ = QFedAvg(q=0.0, fit=FitConfig(lr=0.5)).aggregate_fit(1, strategy.init(w(0)), results)
    np.testing.assert_allclose(state.params["w"], [0.0], atol=1e-12)


def test_qffl_clients_report_their_loss_at_the_global_model():
    # target 2, w = 0: loss 1/2 * 4 = 2, measured before training.
    message = QFedAvg(fit=FitConfig(local_epochs=None, local_steps=1, lr=0.5)).configure_fit(
        1, QFedAvg().init(Params({"w": np.zeros(1)})), ["a"], np.random.default_rng(0)
    )["a"]
    reply = FitResult.from_message(handle_instruction(QuadraticTask(), client_with_target(2.0), message))
    assert reply.metrics["qffl.loss"] == pytest.approx(2.0)
    np.testing.assert_allclose(reply.params["w"], [1.0])


def test_fedprox_pulls_local_training_toward_the_global_model():
    # target 2 from w = 0, lr 0.5, mu 1: g = (0 - 2) + 1 * 0 = -2, w = 1; g = (1 - 2) + 1 * (1 - 0) = 0, w = 1.
    # Without the term: w = 1, then 1.5.
    message = FedProx(mu=1.0, fit=FitConfig(local_epochs=None, local_steps=2, lr=0.5)).configure_fit(
        1, FedAvg().init(Params({"w": np.zeros(1)})), ["a"], np.random.default_rng(0)
    )["a"]
    reply = FitResult.from_message(handle_instruction(QuadraticTask(), client_with_target(2.0), message))
    np.testing.assert_allclose(reply.params["w"], [1.0])


def test_work_range_gives_each_client_its_own_epochs_or_steps():
    clients = [f"c{i}" for i in range(30)]
    strategy = FedAvg(work_range=(1, 20))  # fit counts epochs
    messages = strategy.configure_fit(1, strategy.init(w(0)), clients, np.random.default_rng(0))
    epochs = {m.metadata["fit"]["local_epochs"] for m in messages.values()}
    assert len(epochs) > 5
    assert min(epochs) >= 1
    assert max(epochs) <= 20
    assert all(m.metadata["fit"]["local_steps"] is None for m in messages.values())
    strategy = FedAvg(work_range=(3, 4), fit=FitConfig(local_epochs=None, local_steps=1))
    messages = strategy.configure_fit(1, strategy.init(w(0)), clients, np.random.default_rng(0))
    assert {m.metadata["fit"]["local_steps"] for m in messages.values()} == {3, 4}
    with pytest.raises(ConfigError, match="work_range"):
        FedAvg(work_range=(5, 2))


def _line_task(**kwargs) -> TorchTask:
    """w * x with loss (w x - y)^2 / 2, w starting at 0."""

    def model():
        layer = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(layer.weight)
        return layer

    return TorchTask(model, loss=lambda logits, y: ((logits.reshape(-1) - y) ** 2).mean() / 2, **kwargs)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_torch_task_adds_the_proximal_term_and_the_correction(optimizer):
    task = _line_task() if optimizer == "sgd" else _line_task(optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))
    data = ArrayData(np.ones((1, 1), np.float32), np.full(1, 2.0, np.float32))
    start = task.init_params(0)
    config = FitConfig(local_epochs=None, local_steps=2, lr=0.5, batch_size=1)
    # plain: g = w - 2: w = 1, then 1.5
    assert task.fit(start, data, config).params["weight"].item() == pytest.approx(1.5)
    # mu = 1 toward 0: w = 1, then 1 (as the toy task by hand above)
    prox = FitConfig(local_epochs=None, local_steps=2, lr=0.5, batch_size=1, proximal_mu=1.0)
    assert task.fit(start, data, prox).params["weight"].item() == pytest.approx(1.0)
    # mu = 1 toward an anchor of 2: g = (w - 2) + (w - 2): w = 2 after one step, and stays.
    anchor = Params({"weight": np.full((1, 1), 2.0, np.float32)})
    assert task.fit(start, data, prox, anchor=anchor).params["weight"].item() == pytest.approx(2.0)
    # correction 1: g = (0 - 2) + 1 = -1, w = 0.5; g = -1.5 + 1 = -0.5, w = 0.75
    correction = Params({"weight": np.ones((1, 1), np.float32)})
    assert task.fit(start, data, config, correction=correction).params["weight"].item() == pytest.approx(0.75)


def test_an_unknown_local_algorithm_is_refused_by_the_client():
    message = with_local(fit_message(1, w(0), FitConfig()), "fedsomething")
    with pytest.raises(DecodeError, match="fedsomething"):
        handle_instruction(QuadraticTask(), client_with_target(1.0), message)
    bad = Message("fit", w(0), {"round": 1, "fit": FitConfig().to_metadata(), "local": "scaffold"})
    with pytest.raises(DecodeError, match="'local' must be an object"):
        handle_instruction(QuadraticTask(), client_with_target(1.0), bad)


def test_a_stateful_algorithm_needs_a_client_state():
    from fedloom.strategy import Scaffold

    strategy = Scaffold()
    message = strategy.configure_fit(1, strategy.init(Params({"w": np.zeros(1)})), ["a"], np.random.default_rng(0))
    with pytest.raises(ConfigError, match="no state folder"):
        handle_instruction(QuadraticTask(), client_with_target(1.0), message["a"])


def test_every_named_strategy_builds_with_its_defaults_and_refuses_unknown_arguments():
    for name in STRATEGIES:
        if "fraction" not in strategy_arguments(name):  # FedBuff: concurrency instead
            with pytest.raises(ConfigError, match=f"strategy {name!r} has no argument 'fraction'"):
                build_strategy(name, fraction=0.5)
            continue
        strategy = build_strategy(name, fraction=0.5)
        assert strategy.fraction == 0.5
    assert build_strategy("krum", f=2, m=3).aggregator == Krum(f=2, m=3)
    assert build_strategy("fedprox", mu=0.5).fit.proximal_mu == 0.5
    assert build_strategy("fedprox").fit.proximal_mu == 0.01
    assert FedProx(fit=FitConfig(proximal_mu=0.3)).fit.proximal_mu == 0.3  # a job's own mu is kept
    with pytest.raises(ConfigError, match="unknown strategy 'fedfoo'"):
        build_strategy("fedfoo")
    with pytest.raises(ConfigError, match="strategy 'fedadam' has no argument 'mu'; it takes eta, beta1"):
        build_strategy("fedadam", mu=1)
