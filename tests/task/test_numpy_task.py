"""LogisticRegressionTask and the shared minibatch schedule: golden numbers, determinism, contracts."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from fedloom.core import ConfigError, DataError, FitConfig, Params
from fedloom.data.base import ArrayData
from fedloom.task import LogisticRegressionTask, Task
from fedloom.task.batching import minibatches


def _steps(n: int, **kwargs: int | None) -> list[list[int]]:
    return [batch.tolist() for batch in minibatches(n, FitConfig(**kwargs))]


def _blobs(n: int = 60, seed: int = 0) -> ArrayData:
    """Three well-separated Gaussian blobs in 2-D."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = rng.integers(0, 3, n)
    return ArrayData((centres[y] + rng.standard_normal((n, 2))).astype(np.float32), y)


# -- the schedule ------------------------------------------------------------------------------------------


def test_minibatches_counts_epochs_and_steps() -> None:
    assert [len(b) for b in _steps(10, local_epochs=2, batch_size=4)] == [4, 4, 2, 4, 4, 2]
    assert [len(b) for b in _steps(10, local_epochs=None, local_steps=5, batch_size=4)] == [4, 4, 2, 4, 4]
    assert len(_steps(3, local_epochs=1, batch_size=32)) == 1


def test_minibatches_uses_one_generator_one_permutation_per_epoch() -> None:
    rng = np.random.default_rng(7)
    expected = np.concatenate([rng.permutation(5), rng.permutation(5), rng.permutation(5)]).tolist()
    batches = _steps(5, local_epochs=None, local_steps=7, batch_size=2, seed=7)
    assert [i for b in batches for i in b] == expected[:12]
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1, 2]


def test_minibatches_rejects_empty_data() -> None:
    with pytest.raises(DataError):
        _steps(0, local_epochs=1, batch_size=4)


# -- golden numbers ----------------------------------------------------------------------------------------


def test_one_sgd_step_golden() -> None:
    # W = 0, so every class has probability 1/3 and the loss is ln 3. d(mean loss)/d(logits) is
    # (1/3 - onehot) / 2 per example: [-1/3, 1/6, 1/6] for x=(1, 2), y=0 and [1/6, 1/6, -1/3] for x=(3, -1), y=2.
    # grad W = sum of outer products = [[1/6, -5/6], [2/3, 1/6], [-5/6, 2/3]], grad b = [-1/6, 1/3, -1/6].
    task = LogisticRegressionTask(num_features=2, num_classes=3)
    data = ArrayData(np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([0, 2]))
    result = task.fit(task.init_params(0), data, FitConfig(local_epochs=1, batch_size=2, lr=0.5))
    expected_w = -0.5 * np.array([[1 / 6, -5 / 6], [2 / 3, 1 / 6], [-5 / 6, 2 / 3]])
    expected_b = -0.5 * np.array([-1 / 6, 1 / 3, -1 / 6])
    np.testing.assert_allclose(result.params["weight"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(result.params["bias"], expected_b, rtol=1e-6)
    assert result.params["weight"].dtype == np.float32
    assert result.metrics == {"loss": pytest.approx(math.log(3)), "steps": 1.0}
    assert result.num_examples == 2


def test_l2_adds_lr_times_l2_times_weight() -> None:
    data = ArrayData(np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([0, 1]))
    start = Params({"weight": np.array([[1.0, -2.0], [0.5, 0.0]], np.float32), "bias": np.zeros(2, np.float32)})
    config = FitConfig(local_epochs=1, batch_size=2, lr=0.1)
    plain = LogisticRegressionTask(2, 2).fit(start, data, config).params["weight"]
    ridge = LogisticRegressionTask(2, 2, l2=0.5).fit(start, data, config).params["weight"]
    np.testing.assert_allclose(ridge - plain, -0.1 * 0.5 * start["weight"], atol=1e-6)


def test_evaluate_matches_hand_computation() -> None:
    task = LogisticRegressionTask(num_features=2, num_classes=2)
    weight = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    params = Params({"weight": weight, "bias": np.array([0.0, 0.5], np.float32)})
    x = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    y = np.array([0, 0, 1])
    logits = x @ weight.T + np.array([0.0, 0.5])  # [[2, .5], [0, 1.5], [1, 1.5]]
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(log_softmax[np.arange(3), y])
    result = task.evaluate(params, ArrayData(x, y))
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.num_examples == 3
    assert result.metrics == {"accuracy": pytest.approx(2 / 3)}


# -- the Task contract -------------------------------------------------------------------------------------


def test_is_a_task_and_init_is_seeded() -> None:
    task = LogisticRegressionTask(num_features=3, num_classes=4, init_scale=0.1)
    assert isinstance(task, Task)
    assert task.init_params(1) == task.init_params(1)
    assert task.init_params(1) != task.init_params(2)
    zeros = LogisticRegressionTask(num_features=3, num_classes=4).init_params(5)
    assert [(k, v.shape, v.dtype) for k, v in zeros.items()] == [
        ("weight", (4, 3), np.float32),
        ("bias", (4,), np.float32),
    ]
    assert not np.any(zeros["weight"])


def test_fit_is_deterministic_and_does_not_mutate_params() -> None:
    task = LogisticRegressionTask(num_features=2, num_classes=3, init_scale=0.1)
    data = _blobs()
    params = task.init_params(0)
    before = {k: v.copy() for k, v in params.items()}
    config = FitConfig(local_epochs=2, batch_size=8, lr=0.1, seed=3)
    first, second = task.fit(params, data, config), task.fit(params, data, config)
    assert first.params.sha256() == second.params.sha256()
    assert first.metrics == second.metrics
    other = task.fit(params, data, FitConfig(local_epochs=2, batch_size=8, lr=0.1, seed=4))
    assert other.params != first.params
    assert all(np.array_equal(params[k], before[k]) for k in before)


def test_step_counts() -> None:
    task = LogisticRegressionTask(num_features=2, num_classes=3)
    data = _blobs(10)
    epochs = task.fit(task.init_params(0), data, FitConfig(local_epochs=2, batch_size=4))
    steps = task.fit(task.init_params(0), data, FitConfig(local_epochs=None, local_steps=5, batch_size=4))
    assert epochs.metrics["steps"] == 6
    assert steps.metrics["steps"] == 5
    assert epochs.num_examples == steps.num_examples == 10


def test_training_separates_blobs() -> None:
    task = LogisticRegressionTask(num_features=2, num_classes=3)
    data = _blobs(90)
    params = task.init_params(0)
    before = task.evaluate(params, data)
    after = task.evaluate(task.fit(params, data, FitConfig(local_epochs=5, batch_size=10, lr=0.2)).params, data)
    assert after.loss < before.loss / 4
    assert after.metrics["accuracy"] >= 0.95


def test_binary_and_image_shaped_features() -> None:
    task = LogisticRegressionTask(num_features=4, num_classes=2)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    x = (rng.standard_normal((40, 2, 2)) + 3.0 * (2 * y - 1)[:, None, None]).astype(np.float64)
    fitted = task.fit(task.init_params(0), ArrayData(x, y), FitConfig(local_epochs=3, batch_size=8, lr=0.1))
    assert task.evaluate(fitted.params, ArrayData(x, y)).metrics["accuracy"] == 1.0


def test_errors() -> None:
    task = LogisticRegressionTask(num_features=2, num_classes=3)
    params = task.init_params(0)
    config = FitConfig()
    with pytest.raises(ConfigError, match="expects params"):
        task.fit(LogisticRegressionTask(3, 3).init_params(0), _blobs(), config)
    with pytest.raises(DataError, match="features"):
        task.fit(params, ArrayData(np.zeros((4, 3)), np.zeros(4, np.int64)), config)
    with pytest.raises(DataError, match="labels"):
        task.fit(params, ArrayData(np.zeros((4, 2)), np.array([0, 1, 2, 3])), config)
    with pytest.raises(DataError, match="empty"):
        task.fit(params, ArrayData(np.zeros((0, 2)), np.zeros(0, np.int64)), config)
    with pytest.raises(ConfigError):
        LogisticRegressionTask(num_features=2, num_classes=1)
    empty = task.evaluate(params, ArrayData(np.zeros((0, 2)), np.zeros(0, np.int64)))
    assert (empty.loss, empty.num_examples, dict(empty.metrics)) == (0.0, 0, {})


@pytest.mark.integration
def test_importing_tasks_does_not_import_torch() -> None:
    code = (
        "import fedloom.task, fedloom.task.numpy_task, fedloom.core; import sys; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
