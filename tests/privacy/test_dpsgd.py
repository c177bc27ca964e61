"""Local DP-SGD through Opacus: per-example clipping and the noise worked out by hand on tiny linear models, the
accountant against dp-accounting itself, the Task contract, and a small simulated federation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
import torch
from torch import nn

import fedloom as fl
from fedloom.core import ConfigError, DataError, FitConfig, Params
from fedloom.data import ArrayData, load_digits
from fedloom.privacy import DPSGDTask, epsilon
from fedloom.privacy.accounting import composed_epsilon
from fedloom.tracking import RunStore

ONE_STEP = FitConfig(local_epochs=None, local_steps=1, lr=1.0, seed=0)


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of (w.x - y)^2 / 2: example i's gradient with respect to w is (w.x_i - y_i) x_i."""
    return 0.5 * ((out.reshape(target.shape) - target) ** 2).mean()


def linear(d_in: int, d_out: int = 1, bias: bool = False) -> fl.TorchTask:
    return fl.TorchTask(lambda: nn.Linear(d_in, d_out, bias=bias), loss=half_squared_error)


def zeros(d_in: int, d_out: int = 1) -> Params:
    return Params({"weight": np.zeros((d_out, d_in), np.float32)})


def test_each_example_is_clipped_by_hand():
    # From w = 0, example 1 (x = e1, y = 100) has gradient (-100, 0): clipped to norm C = 1. Example 2 (x = e2,
    # y = 0.05) has gradient (0, -0.05), within the clip. B = n = 2 samples both (q = 1); the clipped sum
    # (-1, -0.05) is divided by the expected batch size 2, and lr = 1 steps against it. Clipping the mean instead
    # would give about (0.5, 0.00025) after rescaling, and no clipping (50, 0.025).
    task = DPSGDTask(linear(2), noise_multiplier=1e-6, max_grad_norm=1.0, reproducible=True)
    data = ArrayData(np.eye(2, dtype=np.float32), np.array([100.0, 0.05], np.float32))
    result = task.fit(zeros(2), data, replace(ONE_STEP, batch_size=2))
    np.testing.assert_allclose(result.params["weight"], [[0.5, 0.025]], atol=1e-5)


def test_no_step_is_longer_than_the_clip_allows():
    # With q = 1 (B = n) every step sums n clipped gradients and divides by n: it is at most lr * C long, however
    # large the gradients (here around 1e3 each); the plain task's step is thousands of times longer.
    rng = np.random.default_rng(1)
    data = ArrayData(rng.normal(0, 30, (16, 8)).astype(np.float32), rng.normal(0, 30, 16).astype(np.float32))
    task = DPSGDTask(linear(8), noise_multiplier=1e-6, max_grad_norm=0.3)
    for lr in (0.5, 2.0):
        config = replace(ONE_STEP, batch_size=16, lr=lr)
        assert np.linalg.norm(task.fit(zeros(8), data, config).params["weight"]) <= lr * 0.3 * (1 + 1e-4)
        assert np.linalg.norm(task.task.fit(zeros(8), data, config).params["weight"]) > 1000 * lr * 0.3


def test_the_noise_is_z_c_over_the_expected_batch_size():
    # All gradients are zero (y = 0 at w = 0), so one step moves w by the noise alone: N(0, (z C / (q n))^2) per
    # coordinate, divided by the *expected* batch size q n = B = 10 whatever the Poisson batch's size was.
    # Over N = 12,000 coordinates sum(w^2) / sigma^2 is chi-square with N degrees of freedom: mean N, std sqrt(2N).
    n = 12_000
    data = ArrayData(np.ones((20, n), np.float32), np.zeros(20, np.float32))
    task = DPSGDTask(linear(n), noise_multiplier=1.5, max_grad_norm=2.0)
    for lr in (1.0, 0.5):
        w = task.fit(zeros(n), data, replace(ONE_STEP, batch_size=10, lr=lr)).params["weight"].astype(np.float64)
        sigma = lr * 1.5 * 2.0 / 10
        assert abs(float(np.sum(w**2)) / sigma**2 - n) < 5 * math.sqrt(2 * n)
        assert abs(float(w.mean())) < 5 * sigma / math.sqrt(n)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_dp_accountings_for_the_fits_steps(accountant):
    # 40 examples, B = 8: q = 0.2 and 2 epochs of ceil(40 / 8) = 5 steps, 10 sampled Gaussian mechanisms.
    rng = np.random.default_rng(0)
    data = ArrayData(rng.normal(size=(40, 3)).astype(np.float32), rng.normal(size=40).astype(np.float32))
    task = DPSGDTask(linear(3), noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-4, accountant=accountant)
    result = task.fit(zeros(3), data, FitConfig(local_epochs=2, batch_size=8, lr=0.1))
    counter = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    step = dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.1))
    counter.compose(dp_accounting.SelfComposedDpEvent(step, 10))
    assert result.metrics["dp_sgd_epsilon_round"] == pytest.approx(counter.get_epsilon(1e-4), rel=1e-9)
    assert result.metrics["dp_sgd_epsilon_round"] == epsilon(
        noise_multiplier=1.1, sample_rate=0.2, rounds=10, delta=1e-4, accountant=accountant
    )
    assert result.metrics == {
        "steps": 10.0,
        "dp_sgd_epsilon_round": result.metrics["dp_sgd_epsilon_round"],
        "dp_sgd_sample_rate": 0.2,
        "dp_sgd_noise_multiplier": 1.1,
        "dp_sgd_clip": 1.0,
        "dp_sgd_delta": 1e-4,
    }
    assert all(type(v) is float for v in result.metrics.values())


def test_reproducible_only_when_asked_and_the_input_is_not_mutated():
    rng = np.random.default_rng(2)
    data = ArrayData(rng.normal(size=(30, 5)).astype(np.float32), rng.integers(0, 3, 30))
    base = fl.TorchTask(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    params = base.init_params(seed=0)
    before = {name: array.copy() for name, array in params.items()}
    config = FitConfig(local_epochs=2, batch_size=6, lr=0.2, seed=5)

    seeded = DPSGDTask(base, noise_multiplier=1.0, max_grad_norm=1.0, reproducible=True)
    a, b = seeded.fit(params, data, config), seeded.fit(params, data, config)
    other = seeded.fit(params, data, replace(config, seed=6))
    assert list(a.params) == list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert a.params.sha256() == b.params.sha256() != other.params.sha256()

    secret = DPSGDTask(base, noise_multiplier=1.0, max_grad_norm=1.0)  # OS entropy: the seed does not fix it
    assert secret.fit(params, data, config).params.sha256() != secret.fit(params, data, config).params.sha256()
    for name, array in params.items():
        np.testing.assert_array_equal(array, before[name])


def test_frozen_parameters_and_the_scaffold_and_prox_terms_apply_after_the_noise():
    # Zero gradients and almost no noise: the step is the data-independent terms alone.
    data = ArrayData(np.ones((4, 2), np.float32), np.zeros(4, np.float32))
    task = DPSGDTask(linear(2, bias=True), noise_multiplier=1e-6, max_grad_norm=1.0)
    start = Params({"weight": np.zeros((1, 2), np.float32), "bias": np.zeros(1, np.float32)})
    correction = Params({"weight": np.array([[1.0, -2.0]]), "bias": np.array([3.0])})
    config = replace(ONE_STEP, batch_size=4, lr=0.5)
    result = task.fit(start, data, config, correction=correction, frozen=("bias",))
    np.testing.assert_allclose(result.params["weight"], [[-0.5, 1.0]], atol=1e-5)
    assert result.params["bias"].tolist() == [0.0]
    anchor = Params({"weight": np.array([[2.0, 4.0]], np.float32), "bias": np.zeros(1, np.float32)})
    prox = task.fit(start, data, replace(config, proximal_mu=0.1), anchor=anchor)  # -lr * mu * (w - anchor)
    np.testing.assert_allclose(prox.params["weight"], [[0.1, 0.2]], atol=1e-5)


def test_empty_poisson_batches_still_take_a_finite_noisy_step():
    # q = 1 / 50: most of the 20 batches are empty; each step still adds noise, and no loss is NaN-poisoned.
    rng = np.random.default_rng(3)
    data = ArrayData(rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 2, 50))
    task = DPSGDTask(fl.TorchTask(lambda: nn.Linear(4, 2)), noise_multiplier=1.0, max_grad_norm=1.0)
    params = task.init_params(0)
    result = task.fit(params, data, FitConfig(local_epochs=None, local_steps=20, batch_size=1, lr=0.1))
    assert all(np.isfinite(a).all() for a in result.params.values())
    assert result.params.sha256() != params.sha256()


def test_what_dp_sgd_cannot_do_is_refused():
    with pytest.raises(ConfigError, match="DP-SGD cannot train this model: BatchNorm cannot support"):
        DPSGDTask(fl.TorchTask(lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))), 1.0, 1.0)
    task = fl.TorchTask(lambda: nn.Linear(4, 2))
    for kwargs, message in [
        ({"noise_multiplier": 0.0, "max_grad_norm": 1.0}, "noise_multiplier must be > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0.0}, "delta must be in"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "moments"}, "accountant must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DPSGDTask(task, **kwargs)
    with pytest.raises(ConfigError, match="wraps a TorchTask"):
        DPSGDTask(fl.LogisticRegressionTask(num_features=4, num_classes=2), 1.0, 1.0)
    dp = DPSGDTask(task, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(DataError, match="empty"):
        dp.fit(dp.init_params(0), ArrayData(np.zeros((0, 4)), np.zeros(0, np.int64)), FitConfig())
    with pytest.raises(ConfigError, match="params do not match"):
        dp.fit(Params({"w": np.zeros(2)}), ArrayData(np.zeros((2, 4)), np.zeros(2, np.int64)), FitConfig())


def test_digits_still_learns_under_modest_noise():
    digits = load_digits()
    base = fl.TorchTask(lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    task = DPSGDTask(base, noise_multiplier=1.0, max_grad_norm=1.0, reproducible=True)
    params = task.init_params(0)
    before = task.evaluate(params, digits.test)
    result = task.fit(params, digits.train, FitConfig(local_epochs=2, batch_size=64, lr=0.5))
    after = task.evaluate(result.params, digits.test)
    assert after.loss < before.loss / 2
    assert after.metrics["accuracy"] > 0.75
    assert result.metrics["dp_sgd_epsilon_round"] < 10


def test_a_simulated_federation_records_each_clients_epsilon(tmp_path):
    job = fl.load_job("digits")
    task = DPSGDTask(job.task, noise_multiplier=1.0, max_grad_norm=1.0)
    simulation = replace(
        job.simulation, num_clients=3, rounds=2, partition=fl.PartitionConfig(scheme="iid"),
        backend=fl.BackendConfig(name="inline"),
    )  # fmt: skip
    spent = {}
    for steps in (2, 8):
        strategy = replace(job.strategy, fit=FitConfig(local_epochs=None, local_steps=steps, batch_size=16, lr=0.1))
        run = fl.simulate(replace(job, task=task, strategy=strategy), simulation=simulation, runs_dir=tmp_path)
        by_round = sorted((r.server_round, c.client_id, c) for r in run.history for c in r.clients if c.phase == "fit")
        fits = [c for _, _, c in by_round]
        assert len(fits) == 6
        assert all(c.metrics["steps"] == steps for c in fits)
        assert "loss" not in fits[0].metrics  # the raw training loss would leak what DP-SGD protects
        stored = [row for row in RunStore(tmp_path).client_metrics(run.run_id) if row["phase"] == "fit"]
        assert [row["metrics"]["dp_sgd_epsilon_round"] for row in stored] == pytest.approx(
            [c.metrics["dp_sgd_epsilon_round"] for c in fits]
        )
        spent[steps] = max(c.metrics["dp_sgd_epsilon_round"] for c in fits)
    assert 0 < spent[2] < spent[8] < math.inf


@pytest.mark.integration
def test_fedloom_privacy_spent_composes_each_clients_fits(tmp_path):
    job = fl.load_job("digits")
    task = DPSGDTask(job.task, noise_multiplier=1.2, max_grad_norm=1.0)
    simulation = replace(
        job.simulation, num_clients=3, rounds=3, partition=fl.PartitionConfig(scheme="iid"),
        backend=fl.BackendConfig(name="inline"),
    )  # fmt: skip
    strategy = replace(job.strategy, fit=FitConfig(local_epochs=None, local_steps=4, batch_size=16, lr=0.1))
    run = fl.simulate(replace(job, task=task, strategy=strategy), simulation=simulation, runs_dir=tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", "from fedloom.cli.main import main; main()", "privacy", "spent", run.run_id],
        cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Every client trained in all 3 rounds, 4 steps each at the same q: 12 steps of one mechanism.
    fits = [c for r in run.history for c in r.clients if c.phase == "fit"]
    q = fits[0].metrics["dp_sgd_sample_rate"]
    expected = epsilon(noise_multiplier=1.2, sample_rate=q, rounds=12, delta=1e-5)
    lines = [line for line in done.stdout.splitlines() if "3 fits  12 steps" in line]
    assert len(lines) == 3, done.stdout
    for line in lines:
        assert float(line.rsplit("epsilon ", 1)[1]) == pytest.approx(expected, abs=1e-4)
    assert f"most spent: {expected:.4f}" in done.stdout
    # Composing the fits one by one is composing the steps: the same number as one self-composed mechanism.
    assert composed_epsilon([(1.2, q, 4)] * 3, delta=1e-5) == pytest.approx(expected)
    assert composed_epsilon([(1.2, q, 4), (0.0, q, 1)], delta=1e-5) == math.inf
