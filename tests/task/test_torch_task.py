"""TorchTask: determinism, the params contract, losses, optimizers, and a cross-check with the NumPy task."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from fedloom.core import ConfigError, DataError, FitConfig, Params
from fedloom.data.base import ArrayData
from fedloom.task import LogisticRegressionTask, Task, TorchTask


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and intra-op threads crawl on a busy CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def linear() -> nn.Module:
    return nn.Linear(2, 3)


def _blobs(n: int = 60, seed: int = 0) -> ArrayData:
    """Three well-separated Gaussian blobs in 4-D."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0, 0, 0], [-4.0, 0, 0, 0], [0, 4.0, 0, 0]])
    y = rng.integers(0, 3, n)
    return ArrayData((centres[y] + rng.standard_normal((n, 4))).astype(np.float32), y)


def _linear_params(weight: list[list[float]], bias: list[float]) -> Params:
    return Params({"weight": np.array(weight, np.float32), "bias": np.array(bias, np.float32)})


# -- init_params -------------------------------------------------------------------------------------------


def test_init_params_is_seeded_ordered_and_leaves_global_rng_alone() -> None:
    task = TorchTask(bn_net)
    assert isinstance(task, Task)
    state = torch.get_rng_state()
    first = task.init_params(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == task.init_params(seed=1)
    assert first != task.init_params(seed=2)
    assert list(first) == list(bn_net().state_dict())  # buffers included, in state-dict order
    assert first["1.num_batches_tracked"].dtype == np.int64
    assert first["0.weight"].dtype == np.float32


# -- fit -----------------------------------------------------------------------------------------------------


def test_fit_is_bit_deterministic_with_dropout_and_does_not_mutate_params() -> None:
    task = TorchTask(mlp)
    params = task.init_params(0)
    before = {k: v.copy() for k, v in params.items()}
    data = _blobs()
    config = FitConfig(local_epochs=2, batch_size=8, lr=0.1, seed=5)
    state = torch.get_rng_state()
    first, second = task.fit(params, data, config), task.fit(params, data, config)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.params.sha256() == second.params.sha256()
    assert first.metrics == second.metrics
    assert task.fit(params, data, dataclasses.replace(config, seed=6)).params != first.params
    assert all(np.array_equal(params[k], before[k]) for k in before)
    assert first.num_examples == len(data)


def test_step_counts() -> None:
    task = TorchTask(mlp)
    data = _blobs(10)
    params = task.init_params(0)
    assert task.fit(params, data, FitConfig(local_epochs=2, batch_size=4)).metrics["steps"] == 6
    steps = task.fit(params, data, FitConfig(local_epochs=None, local_steps=5, batch_size=4))
    assert steps.metrics["steps"] == 5


def test_training_separates_blobs_and_updates_buffers() -> None:
    task = TorchTask(bn_net)
    data = _blobs(90)
    params = task.init_params(0)
    before = task.evaluate(params, data)
    fitted = task.fit(params, data, FitConfig(local_epochs=10, batch_size=10, lr=0.1)).params
    after = task.evaluate(fitted, data)
    assert after.loss < before.loss / 4
    assert after.metrics["accuracy"] >= 0.95
    assert fitted["1.num_batches_tracked"] == 90


def test_fast_sgd_matches_torch_optim_sgd_bit_for_bit() -> None:
    data = _blobs()
    config = FitConfig(local_epochs=2, batch_size=7, lr=0.05, seed=1)
    fast = TorchTask(mlp)
    reference = TorchTask(mlp, optimizer=lambda parameters, lr: torch.optim.SGD(parameters, lr=lr))
    params = fast.init_params(0)
    assert fast.fit(params, data, config).params.sha256() == reference.fit(params, data, config).params.sha256()


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [("sgd", {"momentum": 0.9, "weight_decay": 1e-4}), ("adam", {}), ("adam", {"betas": (0.8, 0.99)})],
)
def test_named_optimizers_train_deterministically(optimizer: str, kwargs: dict[str, object]) -> None:
    task = TorchTask(mlp, optimizer=optimizer, optimizer_kwargs=kwargs)
    data = _blobs()
    params = task.init_params(0)
    config = FitConfig(local_epochs=3, batch_size=8, lr=0.01)
    first = task.fit(params, data, config)
    assert first.params.sha256() == task.fit(params, data, config).params.sha256()
    assert task.evaluate(first.params, data).loss < task.evaluate(params, data).loss


def test_numpy_task_matches_an_equivalent_torch_linear() -> None:
    data = _blobs(20)
    data = ArrayData(data.x[:, :2], data.y)
    torch_task = TorchTask(linear)
    numpy_task = LogisticRegressionTask(num_features=2, num_classes=3)
    params = torch_task.init_params(3)
    config = FitConfig(local_epochs=None, local_steps=4, batch_size=6, lr=0.3, seed=2)
    from_torch, from_numpy = torch_task.fit(params, data, config), numpy_task.fit(params, data, config)
    for name in params:
        np.testing.assert_allclose(from_torch.params[name], from_numpy.params[name], atol=1e-5)
    assert from_torch.metrics["loss"] == pytest.approx(from_numpy.metrics["loss"], abs=1e-5)
    torch_eval, numpy_eval = torch_task.evaluate(params, data), numpy_task.evaluate(params, data)
    assert torch_eval.loss == pytest.approx(numpy_eval.loss, abs=1e-5)
    assert torch_eval.metrics == numpy_eval.metrics


# -- evaluate ------------------------------------------------------------------------------------------------


def test_evaluate_cross_entropy_matches_hand_computation() -> None:
    task = TorchTask(linear, eval_batch_size=2)  # batches of 2 over 3 examples: the mean is over examples
    params = _linear_params([[1, 0], [0, 1], [0, 0]], [0, 0, 1])
    x = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # float64 is accepted
    y = np.array([0, 2, 2])
    logits = x @ np.array([[1, 0], [0, 1], [0, 0]]).T + np.array([0, 0, 1])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    result = task.evaluate(params, ArrayData(x, y))
    assert result.loss == pytest.approx(-np.mean(log_softmax[np.arange(3), y]), rel=1e-6)
    assert result.num_examples == 3
    assert result.metrics == {"accuracy": pytest.approx(2 / 3)}


def test_bce_single_logit_model() -> None:
    task = TorchTask(lambda: nn.Linear(2, 1), loss="bce")
    params = Params({"weight": np.array([[2.0, -1.0]], np.float32), "bias": np.array([0.5], np.float32)})
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [-1.0, 0.0]], np.float32)
    y = np.array([1, 0, 1, 0])
    z = x @ np.array([2.0, -1.0]) + 0.5  # [2.5, -0.5, -2.5, -1.5]: predictions 1, 0, 0, 0
    expected = np.mean(np.logaddexp(0, z) - y * z)
    result = task.evaluate(params, ArrayData(x, y))
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.metrics == {"accuracy": 0.75}
    fitted = task.fit(params, ArrayData(x, y), FitConfig(local_epochs=50, batch_size=4, lr=0.5)).params
    assert task.evaluate(fitted, ArrayData(x, y)).loss < expected


def test_callable_loss() -> None:
    def mse(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((logits.squeeze(1) - targets) ** 2).mean()

    task = TorchTask(lambda: nn.Linear(1, 1), loss=mse)
    params = Params({"weight": np.array([[2.0]], np.float32), "bias": np.array([0.0], np.float32)})
    data = ArrayData(np.array([[1.0], [2.0]], np.float32), np.array([1.0, 1.0], np.float32))
    result = task.evaluate(params, data)
    assert result.loss == pytest.approx((1.0 + 9.0) / 2)
    assert result.metrics == {}  # float targets: no accuracy
    fitted = task.fit(params, data, FitConfig(local_epochs=20, batch_size=2, lr=0.1)).params
    assert task.evaluate(fitted, data).loss < 0.5


def test_read_only_inputs_and_image_shaped_features() -> None:
    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))

    task = TorchTask(conv)
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    x.flags.writeable = False
    y.flags.writeable = False
    result = task.fit(task.init_params(0), ArrayData(x, y), FitConfig(local_epochs=1, batch_size=4))
    assert result.metrics["steps"] == 2
    assert task.evaluate(result.params, ArrayData(x, y)).num_examples == 6


# -- errors and plumbing ---------------------------------------------------------------------------------------


def test_errors() -> None:
    task = TorchTask(linear)
    params = task.init_params(0)
    data = ArrayData(np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match="missing"):
        task.fit(Params({"weight": params["weight"]}), data, FitConfig())
    with pytest.raises(ConfigError, match="shape"):
        task.evaluate(_linear_params([[0, 0, 0]] * 3, [0, 0, 0]), data)
    with pytest.raises(DataError, match="empty"):
        task.fit(params, ArrayData(np.zeros((0, 2)), np.zeros(0, np.int64)), FitConfig())
    empty = task.evaluate(params, ArrayData(np.zeros((0, 2)), np.zeros(0, np.int64)))
    assert (empty.loss, empty.num_examples, dict(empty.metrics)) == (0.0, 0, {})
    with pytest.raises(ConfigError, match="loss"):
        TorchTask(linear, loss="hinge")
    with pytest.raises(ConfigError, match="optimizer"):
        TorchTask(linear, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="optimizer_kwargs"):
        TorchTask(linear, optimizer=torch.optim.SGD, optimizer_kwargs={"momentum": 0.9})
    with pytest.raises(ConfigError, match="factory"):
        TorchTask(linear())


def test_pickles_without_its_module_cache() -> None:
    task = TorchTask(mlp, optimizer="adam", optimizer_kwargs={"eps": 1e-7})
    params = task.init_params(0)
    copy = pickle.loads(pickle.dumps(task))
    assert copy == task
    data = _blobs(12)
    config = FitConfig(local_epochs=1, batch_size=5)
    assert copy.fit(params, data, config).params == task.fit(params, data, config).params
