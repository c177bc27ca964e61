"""The vectorized backend: every client's result equals TorchTask's alone (to float tolerance), and models or
settings it cannot run exactly are refused with a reason."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedloom.core import ConfigError, DataError, FitConfig, JobError, PartitionConfig
from fedloom.core.codec import encode_message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult, evaluate_message, fit_message
from fedloom.data import federate, load_digits
from fedloom.data.base import ArrayData, ClientData, FederatedData
from fedloom.runtime import ClientStatus, InlineGrid, LoopResult, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.runtime.sim.vectorized import VectorizedGrid, unsupported_reason
from fedloom.strategy import FedAvg, FedProx, Scaffold
from fedloom.task.torch_task import TorchTask

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and intra-op threads crawl on a busy CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    """Eight clients of very unequal sizes (Dirichlet label skew), each with a held-out split."""
    return federate(load_digits(), 8, PartitionConfig(scheme="dirichlet", alpha=0.5), seed=3, holdout=0.2)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def binary_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1))


def relative_error(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> float:
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)


def assert_params_close(got: Params, want: Params, tolerance: float = TOLERANCE) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype
        assert relative_error(got[name], array) < tolerance, name


def compare_runs(
    task: TorchTask,
    data: FederatedData,
    strategy: Any,
    *,
    rounds: int = 3,
    dropout: float = 0.2,
    seed: int = 7,
    tolerance: float = TOLERANCE,
    accuracy_tolerance: float = 0.0,
    **options: Any,
) -> tuple[LoopResult, LoopResult]:
    """Run FedAvg on the inline and the vectorized grid; assert that the models and every round's client
    records agree, and return (vectorized, inline)."""
    initial = task.init_params(0)
    want = run_rounds(
        strategy=strategy,
        grid=DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), dropout, seed=seed),
        initial_params=initial,
        rounds=rounds,
        seed=seed,
    )
    got = run_rounds(
        strategy=strategy,
        grid=DropoutGrid(VectorizedGrid(SimulatedClients.of(task, data)), dropout, seed=seed),
        initial_params=initial,
        rounds=rounds,
        seed=seed,
    )
    assert_params_close(got.params, want.params, tolerance)
    for got_round, want_round in zip(got.history, want.history, strict=True):
        key = [(c.client_id, c.phase, c.status, c.num_examples, c.bytes_down) for c in got_round.clients]
        assert key == [(c.client_id, c.phase, c.status, c.num_examples, c.bytes_down) for c in want_round.clients]
        for mine, theirs in zip(got_round.clients, want_round.clients, strict=True):
            assert (mine.loss is None) == (theirs.loss is None)
            if theirs.loss is not None:
                assert mine.loss == pytest.approx(theirs.loss, rel=tolerance, abs=1e-7)
            assert mine.accuracy == pytest.approx(theirs.accuracy, abs=accuracy_tolerance)
            assert mine.metrics.get("steps") == theirs.metrics.get("steps")
            # the JSON digits of the loss and of the telemetry's measurements may differ in length
            assert abs(mine.bytes_up - theirs.bytes_up) < 64
        assert got_round.metrics == pytest.approx(want_round.metrics, rel=tolerance)
    return got, want


def statuses(result: LoopResult, phase: str) -> list[str]:
    return [c.status for r in result.history for c in r.clients if c.phase == phase]


# -- equivalence with the inline backend ---------------------------------------------------------------------


def test_fedavg_on_an_mlp_matches_inline_with_sampling_dropouts_and_several_epochs(digits: FederatedData) -> None:
    strategy = FedAvg(fraction=0.75, fit=FitConfig(local_epochs=3, batch_size=16, lr=0.1))
    got, _ = compare_runs(TorchTask(mlp), digits, strategy)
    fit = statuses(got, "fit")
    assert fit.count(ClientStatus.OK) < 3 * len(digits.client_ids)  # sampling left clients out
    assert ClientStatus.DROPPED in fit
    sizes = {len(digits.clients[cid].train) for cid in digits.client_ids}
    assert min(sizes) * 3 < max(sizes)  # unequal clients, so they run different numbers of steps


def test_fedavg_on_a_cnn_matches_inline(digits: FederatedData) -> None:
    strategy = FedAvg(fraction=0.5, fit=FitConfig(local_epochs=2, batch_size=10, lr=0.05))
    got, _ = compare_runs(TorchTask(cnn), digits, strategy, rounds=2)
    assert ClientStatus.DROPPED in statuses(got, "fit") + statuses(got, "evaluate")


def test_local_steps_match_inline(digits: FederatedData) -> None:
    strategy = FedAvg(fit=FitConfig(local_epochs=None, local_steps=7, batch_size=32, lr=0.1))
    got, _ = compare_runs(TorchTask(mlp), digits, strategy, rounds=2, dropout=0.0)
    steps = {c.metrics["steps"] for r in got.history for c in r.clients if c.phase == "fit"}
    assert steps == {7.0}


def test_fedprox_with_unequal_local_steps_matches_inline(digits: FederatedData) -> None:
    strategy = FedProx(
        mu=0.5, work_range=(1, 9), fit=FitConfig(local_epochs=None, local_steps=1, batch_size=16, lr=0.1)
    )
    got, _ = compare_runs(TorchTask(mlp), digits, strategy, rounds=2, dropout=0.0)
    steps = {c.metrics["steps"] for r in got.history for c in r.clients if c.phase == "fit"}
    assert len(steps) > 2  # the clients took different numbers of steps


def test_an_algorithms_own_client_half_runs_as_inline_does(digits: FederatedData, tmp_path: Path) -> None:
    strategy = Scaffold(fraction=0.5, fit=FitConfig(local_epochs=1, batch_size=16, lr=0.1))
    task = TorchTask(mlp)
    results = [
        run_rounds(strategy=strategy, grid=grid, initial_params=task.init_params(0), rounds=2, seed=3)
        for grid in (
            InlineGrid(SimulatedClients.of(task, digits, state_dir=str(tmp_path / "inline"))),
            VectorizedGrid(SimulatedClients.of(task, digits, state_dir=str(tmp_path / "vectorized"))),
        )
    ]
    assert results[0].params == results[1].params  # the same code on the same thread: bit for bit
    assert sorted(p.name for p in (tmp_path / "vectorized").iterdir()) == sorted(
        p.name for p in (tmp_path / "inline").iterdir()
    )


def test_bce_on_a_binary_task_matches_inline(digits: FederatedData) -> None:
    def odd(split: ArrayData) -> ArrayData:
        return ArrayData(split.x, split.y % 2)

    binary = FederatedData(
        {cid: ClientData(odd(c.train), odd(c.test)) for cid, c in digits.clients.items()}, None, num_classes=2
    )
    strategy = FedAvg(fit=FitConfig(local_epochs=2, batch_size=8, lr=0.1))
    got, _ = compare_runs(TorchTask(binary_net, loss="bce"), binary, strategy, rounds=2)
    assert 0.5 < got.history[-1].metrics["federated_accuracy"] <= 1.0


def test_clients_with_their_own_params_and_settings_match_inline(digits: FederatedData) -> None:
    """Per-client params, learning rates, batch sizes, epochs and steps in one exchange; byte counts exact."""
    task = TorchTask(mlp)
    configs = [
        FitConfig(local_epochs=1, batch_size=4, lr=0.2, seed=1),
        FitConfig(local_epochs=3, batch_size=64, lr=0.01, seed=2),
        FitConfig(local_epochs=None, local_steps=11, batch_size=5, lr=0.05, seed=3),
        FitConfig(local_epochs=2, batch_size=1000, lr=0.1, seed=4),
        FitConfig(local_epochs=None, local_steps=1, batch_size=3, lr=0.3, seed=5),
    ]
    ids = digits.client_ids
    fits = {
        cid: fit_message(1, task.init_params(i % 2), c) for i, (cid, c) in enumerate(zip(ids[:5], configs, strict=True))
    }
    evaluations = {cid: evaluate_message(1, task.init_params(i % 3)) for i, cid in enumerate(ids)}
    for messages, parse in ((fits, FitResult.from_message), (evaluations, EvalResult.from_message)):
        got = VectorizedGrid(SimulatedClients.of(task, digits)).send_and_receive(messages)
        want = InlineGrid(SimulatedClients.of(task, digits)).send_and_receive(messages)
        assert list(got.replies) == list(want.replies) == list(messages)
        for cid, reply in got.replies.items():
            mine: Any = parse(reply.message)
            theirs: Any = parse(want.replies[cid].message)
            assert mine.num_examples == theirs.num_examples
            assert mine.metrics == pytest.approx(theirs.metrics, rel=TOLERANCE)
            if isinstance(mine, FitResult):
                assert_params_close(mine.params, theirs.params)
            else:
                assert mine.loss == pytest.approx(theirs.loss, rel=TOLERANCE)
            assert reply.bytes_down == want.replies[cid].bytes_down == len(encode_message(messages[cid]))
            assert reply.bytes_up == len(encode_message(reply.message))
            assert reply.seconds >= 0.0


class Frozen(nn.Module):
    """A frozen first layer and a constant buffer: both pass through training unchanged, as in TorchTask."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(64, 16).requires_grad_(False)
        self.head = nn.Linear(16, 10)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)) * self.scale)


def test_frozen_params_and_buffers_match_inline(digits: FederatedData) -> None:
    strategy = FedAvg(fit=FitConfig(local_epochs=2, batch_size=16, lr=0.1))
    got, _ = compare_runs(TorchTask(Frozen), digits, strategy, rounds=2, dropout=0.0)
    initial = TorchTask(Frozen).init_params(0)
    for name in ("features.weight", "features.bias", "scale"):
        np.testing.assert_array_equal(got.params[name], initial[name])
    assert not np.array_equal(got.params["head.weight"], initial["head.weight"])


def test_training_leaves_the_input_params_and_the_global_random_state_alone(digits: FederatedData) -> None:
    task = TorchTask(mlp)
    params = task.init_params(0)
    before = {name: array.copy() for name, array in params.items()}
    grid = VectorizedGrid(SimulatedClients.of(task, digits))
    state = torch.get_rng_state()
    grid.send_and_receive({cid: fit_message(1, params, FitConfig(lr=0.5)) for cid in digits.client_ids})
    assert torch.equal(torch.get_rng_state(), state)
    assert all(np.array_equal(params[name], array) for name, array in before.items())


def test_an_empty_test_split_gives_an_empty_evaluation_and_an_empty_train_split_cannot_fit() -> None:
    rng = np.random.default_rng(0)
    full = ArrayData(rng.standard_normal((5, 64)).astype(np.float32), np.arange(5))
    empty = ArrayData(np.zeros((0, 64), np.float32), np.zeros(0, np.int64))
    data = FederatedData({"a": ClientData(full, empty), "b": ClientData(empty, full)}, None, num_classes=10)
    task = TorchTask(mlp)
    grid = VectorizedGrid(SimulatedClients.of(task, data))
    params = task.init_params(0)
    replies = grid.send_and_receive({cid: evaluate_message(1, params) for cid in ("a", "b")}).replies
    assert EvalResult.from_message(replies["a"].message) == EvalResult(0.0, 0, {})
    assert EvalResult.from_message(replies["b"].message).num_examples == 5
    with pytest.raises(DataError, match="empty dataset"):
        grid.send_and_receive({"b": fit_message(1, params, FitConfig())})


def test_params_that_do_not_fit_the_model_are_a_config_error(digits: FederatedData) -> None:
    grid = VectorizedGrid(SimulatedClients.of(TorchTask(mlp), digits))
    wrong = TorchTask(wide_mlp).init_params(0)
    with pytest.raises(ConfigError, match="shape"):
        grid.send_and_receive({digits.client_ids[0]: fit_message(1, wrong, FitConfig())})


# -- what it refuses, and why ----------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class Item(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) / float(x.abs().max().item())


class FailsOnWideBatches(nn.Module):
    """Runs on the probe's batches of 3 and 4 examples, and raises during training with batch size 8."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise ValueError("batch too wide")
        return self.linear(x)


def _bad_factory() -> nn.Module:
    raise RuntimeError("no such layer")


REFUSED: dict[str, tuple[TorchTask, str]] = {
    "batch norm": (
        TorchTask(lambda: nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))),
        "batch-norm running statistics",
    ),
    "batch statistics without buffers": (
        TorchTask(
            lambda: nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 10))
        ),
        "gradients differ",
    ),
    "dropout": (TorchTask(lambda: nn.Sequential(nn.Linear(64, 8), nn.Dropout(0.5), nn.Linear(8, 10))), "random"),
    "data-dependent control flow": (TorchTask(Branchy), "vmap cannot run the model: .*control flow"),
    "item": (TorchTask(Item), r"vmap cannot run the model: .*\.item\(\)"),
    "adam": (TorchTask(mlp, optimizer="adam"), "'adam'"),
    "momentum": (TorchTask(mlp, optimizer_kwargs={"momentum": 0.9}), "optimizer_kwargs.*momentum"),
    "callable optimizer": (TorchTask(mlp, optimizer=lambda ps, lr: torch.optim.SGD(ps, lr)), "optimizer is a callable"),
    "callable loss": (TorchTask(mlp, loss=lambda logits, y: logits.sum()), "loss is a callable"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_it_cannot_run_exactly_is_refused_with_the_cause(case: str, digits: FederatedData) -> None:
    task, cause = REFUSED[case]
    reason = unsupported_reason(task, digits)
    assert reason is not None
    assert re.search(cause, reason), reason
    assert "\n" not in reason
    assert len(reason) < 300
    with pytest.raises(ConfigError, match=re.escape(reason)):
        VectorizedGrid(SimulatedClients.of(task, digits))


def test_what_it_can_run_has_no_reason(digits: FederatedData) -> None:
    assert unsupported_reason(TorchTask(mlp), digits) is None
    assert unsupported_reason(TorchTask(cnn), digits) is None
    assert unsupported_reason(TorchTask(binary_net, loss="bce"), digits) is None


def test_a_task_that_is_not_a_torch_task_is_refused(digits: FederatedData) -> None:
    reason = unsupported_reason(object(), digits)
    assert reason is not None
    assert "TorchTask" in reason


def test_user_code_that_raises_is_a_job_error(digits: FederatedData) -> None:
    with pytest.raises(JobError, match="no such layer"):
        unsupported_reason(TorchTask(_bad_factory), digits)
    task = TorchTask(FailsOnWideBatches)
    grid = VectorizedGrid(SimulatedClients.of(task, digits))
    messages = {cid: fit_message(1, task.init_params(0), FitConfig(batch_size=8)) for cid in digits.client_ids}
    with pytest.raises(JobError, match="batch too wide"):
        grid.send_and_receive(messages)


# -- memory, devices ---------------------------------------------------------------------------------------------


def test_a_small_memory_budget_trains_in_several_chunks_with_the_same_result(
    digits: FederatedData, caplog: pytest.LogCaptureFixture
) -> None:
    task = TorchTask(wide_mlp)
    messages = {
        cid: fit_message(1, task.init_params(0), FitConfig(local_epochs=2, batch_size=8, lr=0.1, seed=i))
        for i, cid in enumerate(digits.client_ids)
    }

    def chunks(grid: VectorizedGrid) -> tuple[dict[str, FitResult], int]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="fedloom.runtime.vectorized"):
            replies = grid.send_and_receive(messages).replies
        found = re.search(r"vectorized fit: (\d+) clients in (\d+) chunk", caplog.text)
        assert found is not None, caplog.text
        assert int(found[1]) == len(messages)
        return {cid: FitResult.from_message(r.message) for cid, r in replies.items()}, int(found[2])

    whole, count = chunks(VectorizedGrid(SimulatedClients.of(task, digits)))
    assert count == 1
    pieces, count = chunks(VectorizedGrid(SimulatedClients.of(task, digits), memory_budget_mb=1))
    assert 1 < count < len(messages)
    want = InlineGrid(SimulatedClients.of(task, digits)).send_and_receive(messages).replies
    for cid, result in pieces.items():
        assert_params_close(result.params, whole[cid].params, 1e-6)
        assert_params_close(result.params, FitResult.from_message(want[cid].message).params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_config_error(digits: FederatedData) -> None:
    with pytest.raises(ConfigError, match="CUDA was asked for"):
        VectorizedGrid(SimulatedClients.of(TorchTask(mlp), digits), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_it_matches_inline_on_the_cpu(digits: FederatedData) -> None:
    strategy = FedAvg(fraction=0.75, fit=FitConfig(local_epochs=2, batch_size=16, lr=0.1))
    for factory in (mlp, cnn):
        # GPU kernels round differently; an example whose top two logits nearly tie may flip its prediction.
        compare_runs(
            TorchTask(factory), digits, strategy, rounds=2, tolerance=1e-4, accuracy_tolerance=0.05, device="cuda"
        )


def test_client_ids_are_the_federations(digits: FederatedData) -> None:
    assert list(VectorizedGrid(SimulatedClients.of(TorchTask(mlp), digits)).client_ids()) == digits.client_ids
