"""The server loop over the inline grid, with a toy task whose result can be computed by hand."""

from dataclasses import dataclass

import numpy as np
import pytest

from fedloom.core import EvalResult, FitConfig, FitResult, JobError, Message, NotEnoughClientsError, Params
from fedloom.data.base import ArrayData, ClientData, FederatedData
from fedloom.runtime import ClientStatus, Exchange, InlineGrid, Reply, run_rounds
from fedloom.runtime.grid import hand_over
from fedloom.runtime.loop import Resume
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.strategy import FedAvg


@dataclass(frozen=True)
class MeanTask:
    """Fit replaces the model with the mean of the client's x; evaluate reports the squared error."""

    fail_on: str | None = None

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(1)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        if self.fail_on is not None and float(data.x[0]) == float(self.fail_on):
            raise RuntimeError("disk full")
        return FitResult(Params({"w": np.array([data.x.mean()])}), len(data), {"loss": float(data.x.var())})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        if len(data) == 0:
            return EvalResult(0.0, 0)
        error = float(((data.x - params["w"][0]) ** 2).mean())
        return EvalResult(error, len(data), {"accuracy": float(error < 1)})


def federation(sizes: list[int]) -> FederatedData:
    clients = {}
    for i, n in enumerate(sizes):
        x = np.full(n, float(i), dtype=np.float64)
        clients[f"c{i}"] = ClientData(ArrayData(x, np.zeros(n)), ArrayData(x[:1], np.zeros(1)))
    test = ArrayData(np.array([0.0, 2.0]), np.zeros(2))
    return FederatedData(clients, test, num_classes=1)


def test_fedavg_of_client_means_is_the_global_mean():
    data = federation([1, 2, 5])  # client i holds n_i copies of the value i
    task = MeanTask()
    result = run_rounds(
        strategy=FedAvg(),
        grid=InlineGrid(SimulatedClients.of(task, data)),
        initial_params=task.init_params(0),
        rounds=2,
        seed=0,
        evaluate_central=lambda p: task.evaluate(p, data.central_test),
    )
    expected = (0 * 1 + 1 * 2 + 2 * 5) / 8  # = 1.5
    assert result.params["w"][0] == pytest.approx(expected)
    last = result.history[-1]
    # federated evaluation: client i's test value is i, weighted by 1 each: ((1.5)^2 + 0.5^2 + 0.5^2) / 3
    assert last.metrics["federated_loss"] == pytest.approx((2.25 + 0.25 + 0.25) / 3)
    assert last.metrics["central_loss"] == pytest.approx((1.5**2 + 0.5**2) / 2)
    assert last.metrics["central_accuracy"] == 0.0
    fit_records = [c for c in last.clients if c.phase == "fit"]
    assert [c.num_examples for c in fit_records] == [1, 2, 5]
    assert all(c.bytes_down > 0 and c.bytes_up > 0 for c in last.clients)


def test_dropouts_do_not_break_rounds_while_enough_clients_reply():
    data = federation([3] * 20)
    task = MeanTask()
    result = run_rounds(
        strategy=FedAvg(min_clients=2, fraction_evaluate=0.0),
        grid=DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), 0.5, seed=1),
        initial_params=task.init_params(0),
        rounds=5,
        seed=1,
    )
    assert len(result.history) == 5
    dropped = [c for r in result.history for c in r.clients if c.status == ClientStatus.DROPPED]
    ok = [c for r in result.history for c in r.clients if c.status == ClientStatus.OK]
    assert 20 < len(dropped) < 80  # about half of 100
    assert len(ok) + len(dropped) == 100
    # each round's model is the mean over the clients that replied
    final_round = result.history[-1]
    replied = [int(c.client_id[1:]) for c in final_round.clients if c.status == ClientStatus.OK]
    assert result.params["w"][0] == pytest.approx(np.mean(replied))


def test_too_few_replies_is_a_clear_error_not_a_hang():
    data = federation([3] * 10)
    task = MeanTask()
    with pytest.raises(
        NotEnoughClientsError, match=r"round 1: \d of 10 clients replied with a valid update, fewer than min_clients=8"
    ):
        run_rounds(
            strategy=FedAvg(min_clients=8),
            grid=DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), 0.9, seed=0),
            initial_params=task.init_params(0),
            rounds=3,
            seed=0,
        )


def test_same_seed_same_dropouts_and_sampling():
    data = federation([2] * 30)
    task = MeanTask()

    def run(seed):
        result = run_rounds(
            strategy=FedAvg(fraction=0.3),
            grid=DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), 0.2, seed=seed),
            initial_params=task.init_params(0),
            rounds=3,
            seed=seed,
        )
        return [(c.client_id, c.status) for r in result.history for c in r.clients]

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_a_failing_client_names_itself():
    data = federation([2, 2, 2])
    task = MeanTask(fail_on="1")
    with pytest.raises(JobError, match="client c1 in fit raised RuntimeError: disk full"):
        run_rounds(
            strategy=FedAvg(),
            grid=InlineGrid(SimulatedClients.of(task, data)),
            initial_params=task.init_params(0),
            rounds=1,
            seed=0,
        )


@dataclass(frozen=True)
class BrokenTask(MeanTask):
    """Client 1 diverges (NaN); client 2 sends a parameter the model does not have."""

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        result = super().fit(params, data, config)
        which = int(data.x[0])
        if which == 1:
            return FitResult(Params({"w": np.array([np.nan])}), result.num_examples)
        if which == 2:
            return FitResult(Params({"w": result.params["w"], "extra": np.zeros(3)}), result.num_examples)
        if which == 3:
            return FitResult(Params({"w": result.params["w"].astype(np.float32)}), result.num_examples)
        return result


def test_invalid_updates_are_refused_recorded_and_never_aggregated(caplog):
    data = federation([2, 2, 2, 2, 4])
    task = BrokenTask()
    with caplog.at_level("WARNING", logger="fedloom.server"):
        result = run_rounds(
            strategy=FedAvg(fraction_evaluate=0.0),
            grid=InlineGrid(SimulatedClients.of(task, data)),
            initial_params=task.init_params(0),
            rounds=1,
            seed=0,
        )
    # only clients 0 and 4 are valid: (0 * 2 + 4 * 4) / 6
    assert result.params["w"][0] == pytest.approx(16 / 6)
    records = {c.client_id: c for c in result.history[0].clients}
    assert records["c0"].status == records["c4"].status == ClientStatus.OK
    assert records["c1"].status == ClientStatus.REFUSED
    assert "NaN or infinite" in records["c1"].detail
    assert "unexpected ['extra']" in records["c2"].detail
    assert "float32[1], expected float64[1]" in records["c3"].detail
    assert sum("refused the fit reply of client" in r.message for r in caplog.records) == 3


def test_refused_updates_do_not_count_towards_min_clients():
    data = federation([2, 2, 2])
    task = BrokenTask()
    with pytest.raises(NotEnoughClientsError, match="1 of 3 clients replied with a valid update"):
        run_rounds(
            strategy=FedAvg(min_clients=2),
            grid=InlineGrid(SimulatedClients.of(task, data)),
            initial_params=task.init_params(0),
            rounds=1,
            seed=0,
        )


def test_evaluation_settings_do_not_change_training():
    data = federation([2] * 20)
    task = MeanTask()

    def trained(fraction_evaluate):
        return run_rounds(
            strategy=FedAvg(fraction=0.5, fraction_evaluate=fraction_evaluate),
            grid=DropoutGrid(InlineGrid(SimulatedClients.of(task, data)), 0.2, seed=3),
            initial_params=task.init_params(0),
            rounds=4,
            seed=3,
        ).params

    assert trained(1.0) == trained(0.5) == trained(0.0)


class CorruptingGrid:
    """Passes everything through an inline grid, but client c0's evaluate reply is malformed."""

    def __init__(self, inner):
        self._inner = inner

    def client_ids(self):
        return self._inner.client_ids()

    def send_and_receive(self, messages, timeout=None, on_reply=None):
        exchange = self._inner.send_and_receive(messages, timeout)
        replies = dict(exchange.replies)
        if "c0" in replies and replies["c0"].message.kind == "evaluate.result":
            replies["c0"] = Reply(Message("evaluate.result", metadata={"loss": "high", "num_examples": 1}))
        return hand_over(Exchange(replies, exchange.dropped), on_reply)


def test_a_malformed_evaluate_reply_is_refused_not_fatal():
    data = federation([2, 2, 2])
    task = MeanTask()
    result = run_rounds(
        strategy=FedAvg(),
        grid=CorruptingGrid(InlineGrid(SimulatedClients.of(task, data))),
        initial_params=task.init_params(0),
        rounds=1,
        seed=0,
    )
    records = {(c.client_id, c.phase): c for c in result.history[0].clients}
    assert records["c0", "evaluate"].status == ClientStatus.REFUSED
    assert "loss must be a number" in records["c0", "evaluate"].detail
    assert records["c0", "fit"].status == ClientStatus.OK
    # federated evaluation over c1 and c2 only: the mean model is 1.0, their values are 1 and 2
    assert result.history[0].metrics["federated_loss"] == pytest.approx((0.0 + 1.0) / 2)


def test_a_resumed_run_runs_the_rounds_an_uninterrupted_one_would():
    # Sampling half the clients each round makes the random state matter: resuming with a fresh generator
    # would pick other clients.
    data = federation([1, 2, 3, 4, 5, 6])
    task = MeanTask()
    strategy = FedAvg(fraction=0.5, fraction_evaluate=0.5)
    common = {
        "strategy": strategy,
        "grid": InlineGrid(SimulatedClients.of(task, data)),
        "initial_params": task.init_params(0),
        "seed": 3,
    }
    whole = run_rounds(rounds=5, **common)
    first = run_rounds(rounds=2, **common)
    cut = first.history[-1]
    resume = Resume(completed_rounds=2, params=first.params, random_state=cut.random_state)
    rest = run_rounds(rounds=5, resume=resume, **common)
    assert [r.server_round for r in rest.history] == [3, 4, 5]
    assert rest.params.sha256() == whole.params.sha256()
    for resumed, uninterrupted in zip(rest.history, whole.history[2:], strict=True):
        assert [c.client_id for c in resumed.clients] == [c.client_id for c in uninterrupted.clients]
        assert resumed.metrics == uninterrupted.metrics
    chosen = [{c.client_id for c in r.clients if c.phase == "fit"} for r in whole.history]
    assert len({frozenset(c) for c in chosen}) > 1  # the sampling did vary


def test_fedavg_folds_updates_as_they_arrive_and_keeps_no_arrays():
    data = federation([1, 2, 5])
    task = MeanTask()
    kept: list[Reply] = []

    class Recording:
        def client_ids(self):
            return data.client_ids

        def send_and_receive(self, messages, timeout=None, on_reply=None):
            exchange = InlineGrid(SimulatedClients.of(task, data)).send_and_receive(messages, timeout)
            replies = {cid: on_reply(cid, reply) for cid, reply in reversed(list(exchange.replies.items()))}
            kept.extend(replies.values())
            return Exchange(replies, exchange.dropped)

    folded = run_rounds(strategy=FedAvg(), grid=Recording(), initial_params=task.init_params(0), rounds=1, seed=0)
    assert folded.params["w"][0] == pytest.approx((0 * 1 + 1 * 2 + 2 * 5) / 8, rel=1e-15)
    fits = [reply for reply in kept if reply.message.kind == "fit.result"]
    assert len(fits) == 3
    assert all(len(reply.message.params) == 0 for reply in fits)  # folded in, then let go
    assert all(reply.bytes_up > 0 for reply in fits)
