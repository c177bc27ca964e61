"""Secure aggregation in runs (fedloom.privacy.SecAgg): the server learns only the sum, and the sum is FedAvg's
within the quantization bound, with dropouts at every step, with SecAgg+, with distributed DP and on every
simulation backend that runs clients one at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedloom.core import ConfigError, FitConfig, FitResult, Message, Params
from fedloom.core.errors import DecodeError, NotEnoughClientsError, RoundFailedError
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.privacy import DPFedAvg, SecAgg, SecAggMod, epsilon
from fedloom.runtime import ClientApp, Context, InlineGrid, handle_instruction, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.runtime.sim.process import ProcessGrid
from fedloom.strategy import FedAvg, FedBuff, Median
from fedloom.task.numpy_task import LogisticRegressionTask


class ShiftTask:
    """Training adds the mean of the client's rows to ``w``: a client's update is known exactly."""

    def __init__(self, dim: int = 3) -> None:
        self.dim = dim

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(self.dim)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(Params({"w": params["w"] + data.x.mean(axis=0)}), len(data), {"loss": 0.0})

    def evaluate(self, params: Params, data: ArrayData):  # pragma: no cover - the runs below skip evaluation
        raise AssertionError("not evaluated")


def federation(updates: list[list[float]], rows: list[int]) -> FederatedData:
    clients = {}
    for k, (update, n) in enumerate(zip(updates, rows, strict=True)):
        data = ArrayData(np.tile(np.asarray(update, np.float64), (n, 1)), np.zeros(n, np.int64))
        clients[f"c{k}"] = ClientData(data, data)
    return FederatedData(clients=clients, central_test=None, num_classes=1, name="toy")


FIT_ALL = FedAvg(fraction=1.0, fraction_evaluate=0.0, fit=FitConfig(batch_size=4))


def one_round(strategy, data: FederatedData, *, dropout: float = 0.0, seed: int = 0, task=None):
    task = task or ShiftTask(len(data.clients["c0"].train.x[0]))
    grid = DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), dropout, seed=seed)
    return run_rounds(strategy=strategy, grid=grid, initial_params=task.init_params(0), rounds=1, seed=seed)


def test_the_secure_mean_is_fedavgs_example_weighted_mean_within_the_bound():
    updates = [[0.3, -0.2, 0.1], [-0.5, 0.4, 0.25], [0.05, 0.0, -0.7], [0.2, 0.2, 0.2]]
    rows = [1, 2, 3, 4]
    data = federation(updates, rows)
    secure = one_round(SecAgg(FIT_ALL), data)
    # By hand: sum n_k u_k / sum n_k = (0.3 - 1.0 + 0.15 + 0.8, -0.2 + 0.8 + 0 + 0.8, 0.1 + 0.5 - 2.1 + 0.8) / 10
    expected = np.array([0.025, 0.14, -0.07])
    metrics = secure.history[0].metrics
    assert 0 < metrics["secagg_bound"] < 1e-6  # 4 * step / 2 over the summed weight 10 / 1000
    assert np.abs(secure.params["w"] - expected).max() <= metrics["secagg_bound"]
    np.testing.assert_allclose(one_round(FIT_ALL, data).params["w"], expected, atol=1e-15)
    assert (metrics["secagg_clients"], metrics["secagg_survivors"], metrics["secagg_threshold"]) == (4, 4, 3)
    records = [c for c in secure.history[0].clients if c.phase == "fit"]
    assert [(c.status, c.num_examples) for c in records] == [("ok", 0)] * 4  # no example count is revealed
    assert all(c.bytes_up > 0 and c.bytes_down > 0 and len(c.update_sha256 or "") == 64 for c in records)


def test_a_client_with_more_examples_than_the_weight_cap_counts_as_the_cap():
    data = federation([[1.0], [0.0]], [30, 10])
    w = one_round(SecAgg(FIT_ALL, weight_cap=10), data).params["w"]
    assert w[0] == pytest.approx(0.5, abs=1e-8)  # weights 10 and 10, not 30 and 10 (which gives 0.75)
    w = one_round(SecAgg(FIT_ALL, weight_cap=30), data).params["w"]
    assert w[0] == pytest.approx(0.75, abs=1e-8)


def test_values_outside_the_range_are_clipped_and_clip_norm_is_applied_by_each_client():
    data = federation([[3.0, 4.0], [0.0, 0.0]], [1, 1])
    # weight_cap=1: every client weighs 1, so the mean is precise to the step (4 / 2^31) of the sum
    assert one_round(SecAgg(FIT_ALL, value_range=2.0, weight_cap=1), data).params["w"] == pytest.approx(
        [1.0, 1.0], abs=1e-8
    )
    bounded = FedAvg(fraction=1.0, fraction_evaluate=0.0, clip_norm=1.0)  # (3, 4) -> (0.6, 0.8), as FedAvg does
    w = one_round(SecAgg(bounded, weight_cap=1), data).params["w"]
    np.testing.assert_allclose(w, one_round(bounded, data).params["w"], atol=1e-8)
    np.testing.assert_allclose(w, [0.3, 0.4], atol=1e-8)


@pytest.mark.parametrize("degree", [None, 12], ids=["secagg", "secagg+"])
def test_dropouts_at_every_step_leave_the_mean_of_the_survivors(degree):
    rng = np.random.default_rng(4)
    updates = rng.uniform(-0.5, 0.5, (30, 5)).tolist()
    rows = rng.integers(1, 20, 30).tolist()
    data = federation(updates, rows)
    # Each client fails each step (advertise, share, mask, unmask) with probability 0.08, independently.
    run = one_round(SecAgg(FIT_ALL, degree=degree), data, dropout=0.08, seed=11)
    metrics = run.history[0].metrics
    fits = {c.client_id: c for c in run.history[0].clients}
    used = [k for k in range(30) if fits[f"c{k}"].status == "ok"]
    assert 20 <= len(used) < 30 == metrics["secagg_clients"]
    assert metrics["secagg_survivors"] >= len(used)  # a survivor that dropped at the unmasking is still summed
    survivors = [
        k for k in range(30) if fits[f"c{k}"].status == "ok" or "after secagg.mask" in (fits[f"c{k}"].detail or "")
    ]
    assert len(survivors) == metrics["secagg_survivors"]
    weights = np.array([rows[k] for k in survivors], np.float64)
    expected = (np.array([updates[k] for k in survivors]) * weights[:, None]).sum(axis=0) / weights.sum()
    assert np.abs(run.params["w"] - expected).max() <= metrics["secagg_bound"]
    if degree is not None:
        assert metrics["secagg_threshold"] == math.floor(0.5 * 13) + 1


def test_fewer_survivors_than_the_threshold_end_the_round_cleanly():
    data = federation([[0.1]] * 6, [1] * 6)
    with pytest.raises(RoundFailedError, match=r"1 rounds in a row failed; round 1: .*below the threshold"):
        one_round(SecAgg(FIT_ALL, threshold=0.9, max_failed_rounds=1), data, dropout=0.3, seed=2)
    with pytest.raises(NotEnoughClientsError, match="at least 2 clients"):
        one_round(SecAgg(FedAvg(clients_per_round=1, fraction_evaluate=0.0)), data)


def test_a_round_that_loses_too_many_parties_fails_alone_and_the_run_goes_on():
    # The case: SecAgg+ of degree 4 over 10 clients with 20% dropping at each step. Some rounds keep
    # fewer parties than the threshold; each of those fails with its reason, the model stays as it was, and the
    # rounds after it train as usual.
    rng = np.random.default_rng(0)
    data = federation(rng.uniform(-0.5, 0.5, (10, 3)).tolist(), [1] * 10)
    task = ShiftTask(3)
    grid = DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), 0.2, seed=5)
    strategy = SecAgg(FIT_ALL, degree=4, max_failed_rounds=10)
    models = _Models()
    run = run_rounds(
        strategy=strategy, grid=grid, initial_params=task.init_params(0), rounds=8, seed=5, observers=[models]
    )
    failed = [r for r in run.history if r.failure is not None]
    trained = [r for r in run.history if r.failure is None]
    assert len(run.history) == 8
    assert failed  # the seed makes this test see both outcomes
    assert trained
    for record in failed:
        assert record.metrics["round_failed"] == 1.0
        assert "secure aggregation lost too many parties" in record.failure
        fits = [c for c in record.clients if c.phase == "fit"]
        assert {c.status for c in fits} == {"dropped"}
        assert all(c.detail.startswith(f"the round failed: {record.failure}") for c in fits)
        assert all(c.update_sha256 is None for c in fits)  # nothing of it reached the model or the ledger
    # a failed round leaves the model as the round before left it; a trained one moves it
    previous = np.zeros(3)
    for record, params in zip(run.history, models.seen, strict=True):
        if record.failure is not None:
            np.testing.assert_array_equal(params, previous)
        else:
            assert np.abs(params - previous).max() > 1e-3
        previous = params
    # the run fails only as the job says: here after 1 failed round in a row
    strict = SecAgg(FIT_ALL, degree=4, max_failed_rounds=1)
    with pytest.raises(RoundFailedError, match=r"1 rounds in a row failed; round \d+: secure aggregation lost"):
        run_rounds(strategy=strict, grid=grid, initial_params=task.init_params(0), rounds=8, seed=5)


class _Models:
    """Keeps the global model after each round."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def on_round(self, record, params) -> None:
        self.seen.append(np.array(params["w"]))


def test_distributed_dp_noise_has_at_least_dp_fedavgs_scale():
    # 8 clients whose updates are 0: what reaches the model is the clients' noise alone, divided by q n = 8.
    dim, n = 20_000, 8
    data = federation([[0.0] * dim] * n, [1] * n)
    dp = DPFedAvg(
        FedAvg(fraction=1.0, fraction_evaluate=0.0), num_clients=n, clip_norm=0.5, noise_multiplier=1.2, delta=1e-3
    )
    run = one_round(SecAgg(dp), data, seed=3)
    metrics = run.history[0].metrics
    t = math.floor(0.5 * n) + 1
    # Each client adds std z C / sqrt(t); the sum of n of them has std z C sqrt(n / t) >= z C.
    expected = 1.2 * 0.5 * math.sqrt(n / t) / n
    assert np.std(run.params["w"]) == pytest.approx(expected, rel=0.03)
    assert abs(np.mean(run.params["w"])) < 4 * expected / math.sqrt(dim)
    assert metrics["epsilon"] == pytest.approx(epsilon(noise_multiplier=1.2, sample_rate=1.0, rounds=1, delta=1e-3))
    assert (metrics["dp_clip"], metrics["dp_clients"], metrics["secagg_survivors"]) == (0.5, 8.0, 8.0)


def test_distributed_dp_clips_each_update_on_its_client():
    data = federation([[3.0, 4.0]] * 6, [1] * 6)  # each update has norm 5; clipped to 1: (0.6, 0.8)
    dp = DPFedAvg(
        FedAvg(fraction=1.0, fraction_evaluate=0.0), num_clients=6, clip_norm=1.0, noise_multiplier=1e-6, delta=1e-2
    )
    w = one_round(SecAgg(dp), data).params["w"]
    np.testing.assert_allclose(w, [0.6, 0.8], atol=1e-4)  # sum 6 * (0.6, 0.8) / (q n = 6)


@pytest.mark.integration
def test_process_workers_give_the_inline_result_bit_for_bit(one_torch_thread: None):
    task = LogisticRegressionTask(num_features=4, num_classes=3)
    rng = np.random.default_rng(0)
    clients = {}
    for k in range(8):
        x = rng.normal(size=(12, 4))
        clients[f"c{k}"] = ClientData(ArrayData(x, rng.integers(0, 3, 12)), ArrayData(x, rng.integers(0, 3, 12)))
    data = FederatedData(clients=clients, central_test=None, num_classes=3, name="toy")
    strategy = SecAgg(FedAvg(fraction=1.0, fit=FitConfig(batch_size=4, lr=0.1)))
    inline = run_rounds(
        strategy=strategy,
        grid=DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), 0.1, seed=4),
        initial_params=task.init_params(0),
        rounds=2,
        seed=4,
    )
    with DropoutGrid(ProcessGrid(SimulatedClients.of(task, data), workers=2), 0.1, seed=4) as grid:
        pooled = run_rounds(strategy=strategy, grid=grid, initial_params=task.init_params(0), rounds=2, seed=4)
    # The masks are random, yet they cancel exactly: the decoded sum depends only on the quantized updates.
    assert pooled.params.sha256() == inline.params.sha256()
    survivors = [r.metrics["secagg_survivors"] for r in pooled.history]
    assert survivors == [r.metrics["secagg_survivors"] for r in inline.history] == [8, 6]


def test_a_client_answers_the_unmasking_once_and_keeps_one_round_open():
    data = federation([[0.1]] * 3, [1] * 3)
    task = ShiftTask(1)
    strategy = SecAgg(FIT_ALL)
    state = strategy.init(task.init_params(0))
    instructions = strategy.configure_fit(1, state, data.client_ids, np.random.default_rng(0))
    sessions = {cid: SecAggMod() for cid in data.client_ids}

    def answer(cid: str, message: Message) -> Message:
        return ClientApp(task, (sessions[cid],))(message, Context(cid, data.clients[cid]))

    steps = strategy.fit_protocol(1, state, instructions)
    messages = next(steps)
    for _ in range(3):
        messages = steps.send({cid: answer(cid, m) for cid, m in messages.items()})
    unmask = dict(messages)
    assert {m.kind for m in unmask.values()} == {"secagg.unmask"}
    with pytest.raises(StopIteration):
        steps.send({cid: answer(cid, m) for cid, m in unmask.items()})
    assert all(len(s.sessions) == 0 for s in sessions.values())
    with pytest.raises(Exception, match="no open secure aggregation round"):
        answer("c0", unmask["c0"])  # asked again (to learn the other share): refused
    with pytest.raises(DecodeError, match=r"unknown instruction kind 'secagg\.unmask'"):
        handle_instruction(task, data.clients["c0"], unmask["c0"])  # a client without the mod cannot take part


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        (lambda: FedAvg(aggregator=Median()), "robust aggregator"),
        (lambda: FedBuff(), "cannot wrap FedBuff: FedBuff is asynchronous"),
        (
            lambda: DPFedAvg(FedAvg(fraction=0.5), num_clients=10, target_quantile=0.5, count_stddev=5.0, delta=1e-3),
            "adaptive clipping",
        ),
    ],
)
def test_what_secure_aggregation_cannot_wrap_is_refused(strategy, match):
    with pytest.raises(ConfigError, match=match):
        SecAgg(strategy())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.0}, "threshold"),
        ({"degree": 1}, "degree"),
        ({"value_range": 0.0}, "value_range"),
        ({"weight_cap": 0}, "weight_cap"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SecAgg(FIT_ALL, **kwargs)


def test_a_client_that_refuses_a_step_answers_refused_and_the_round_goes_on_without_it():
    data = federation([[0.1], [0.2], [0.3], [0.4]], [1] * 4)
    task = ShiftTask(1)
    strategy = SecAgg(FIT_ALL)  # t = 3 of 4
    state = strategy.init(task.init_params(0))
    instructions = strategy.configure_fit(1, state, data.client_ids, np.random.default_rng(0))
    sessions = {cid: SecAggMod() for cid in data.client_ids}
    steps = strategy.fit_protocol(1, state, instructions)
    messages = next(steps)
    for _ in range(3):
        messages = steps.send(
            {cid: ClientApp(task, (sessions[cid],))(m, Context(cid, data.clients[cid])) for cid, m in messages.items()}
        )
    # The server (misbehaving) tells c0 that only two parties survived: below t, so c0 refuses to unmask.
    lying = Message("secagg.unmask", metadata={**messages["c0"].metadata, "survivors": [1, 2]})
    refused = ClientApp(task, (sessions["c0"],))(lying, Context("c0", data.clients["c0"]))
    assert refused.kind == "secagg.refused"
    assert "refuses to unmask" in refused.metadata["reason"]
    assert len(sessions["c0"].sessions) == 0  # its round is closed: asking again with the true list gets nothing
    answers = {
        cid: ClientApp(task, (sessions[cid],))(m, Context(cid, data.clients[cid]))
        for cid, m in messages.items()
        if cid != "c0"
    }
    with pytest.raises(StopIteration) as done:
        steps.send({"c0": refused, **answers})
    w = done.value.value.state.params["w"]
    assert w[0] == pytest.approx(0.25, abs=1e-6)  # c0's masked input is in the sum: the three others unmask it
