"""FedBuff run by the asynchronous loop: on the simulated clock of client speeds, over threads, and resumed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from toy_task import QuadraticTask, client_with_target

from fedloom.core import ConfigError, FitConfig, NotEnoughClientsError, Params, SystemConfig
from fedloom.core.message import Message
from fedloom.core.results import fit_message, parse_instruction
from fedloom.data import FederatedData
from fedloom.runtime import ClientStatus, InlineGrid, run_rounds
from fedloom.runtime.asynchronous import ThreadedGrid, run_async
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler
from fedloom.runtime.loop import LoopResult, Resume
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.crossdevice import SystemGrid
from fedloom.strategy import FedAvg, FedBuff

ONE_STEP = FitConfig(local_epochs=1, batch_size=1, lr=0.5)  # the task takes one step; the clock counts epochs


def federation(rows: Mapping[str, int]) -> FederatedData:
    """Clients whose targets are 1, 2, 3, ...; client ``c`` has ``rows[c]`` training rows, so with batch size
    1 an epoch takes it ``rows[c]`` steps of simulated time."""
    clients = {cid: client_with_target(float(k + 1), n) for k, (cid, n) in enumerate(rows.items())}
    return FederatedData(clients=clients, central_test=None, num_classes=1, name="targets")


def system_grid(data: FederatedData, **system: float) -> SystemGrid:
    return SystemGrid(InlineGrid(SimulatedClients.of(QuadraticTask(), data)), data, SystemConfig(**system))


def fedbuff(grid: Any, rounds: int, seed: int = 0, resume: Resume | None = None, **arguments: Any) -> LoopResult:
    """FedBuff (one local step, no federated evaluation unless ``arguments`` say otherwise) from w = 0."""
    strategy = FedBuff(**{"fit": ONE_STEP, "fraction_evaluate": 0.0, **arguments})
    return run_async(
        strategy=strategy, grid=grid, initial_params=Params({"w": np.zeros(1)}), rounds=rounds, seed=seed,
        resume=resume,
    )  # fmt: skip


def test_each_update_steps_from_the_model_its_client_started_on_discounted_by_staleness():
    """Two equally fast clients (targets 1 and 2), both training at all times, an update after every reply.
    Worked out by hand: a step of the task moves w half way to the client's target."""
    data = federation({"a": 1, "b": 1})
    result = fedbuff(system_grid(data), 3, buffer_size=1, concurrency=2)
    target = {"a": 1.0, "b": 2.0}
    order = [r.clients[0].client_id for r in result.history]
    x, y = order[0], order[1]
    assert order == [x, y, x]
    assert x != y
    # t = 0.01: x and y, both sent w0 = 0, are done. x's update needs no discount: w1 = x's model.
    w1 = target[x] / 2
    # x starts again on w1. y's update was made on w0, one update old: discounted by 1/sqrt(2).
    w2 = w1 + (target[y] / 2 - 0.0) / math.sqrt(2)
    # t = 0.02: x is done with w1, one update old.
    w3 = w2 + ((w1 + target[x]) / 2 - w1) / math.sqrt(2)
    assert result.params["w"] == pytest.approx([w3])
    assert [r.metrics["staleness_max"] for r in result.history] == [0.0, 1.0, 1.0]
    assert [r.metrics["sim_seconds"] for r in result.history] == pytest.approx([0.01, 0.01, 0.02])


def test_fast_clients_do_not_wait_for_a_slow_one_whose_update_arrives_stale():
    """Three clients take 1 simulated step, one takes 10. FedBuff updates every 2 replies: the fast clients
    make updates while the slow one trains, and its update, when it comes, is discounted for its staleness."""
    data = federation({"fast0": 1, "fast1": 1, "fast2": 1, "slow": 10})
    result = fedbuff(system_grid(data), 20, buffer_size=2, concurrency=4)
    clock = [r.metrics["sim_seconds"] for r in result.history]
    assert clock == sorted(clock)
    for record in result.history:  # one record per client, however many of its updates a server step used
        ids = [c.client_id for c in record.clients if c.phase == "fit"]
        assert len(ids) == len(set(ids))
        assert sum(c.metrics["updates"] for c in record.clients if c.phase == "fit") == 2
    assert clock[0] == pytest.approx(0.01)  # two fast clients, one step each: no waiting for the slow one
    slow = [(r.server_round, c) for r in result.history for c in r.clients if c.client_id == "slow"]
    assert slow, "the slow client's update never came"
    first_round, record = slow[0]
    assert record.status == ClientStatus.OK
    assert record.metrics["staleness"] >= 1  # it trained on a model that others have moved on from since
    assert clock[first_round - 2] < 0.1  # updates happened before its 10 steps (0.1 s) were over
    synchronous = run_rounds(
        strategy=FedAvg(fit=ONE_STEP, fraction_evaluate=0.0),
        grid=system_grid(data),
        initial_params=Params({"w": np.zeros(1)}),
        rounds=2,
        seed=0,
    )
    assert [r.metrics["sim_seconds"] for r in synchronous.history] == pytest.approx([0.1, 0.2])  # the slow one


def test_a_client_that_reports_twice_within_one_update_has_one_record():
    data = federation({"fast": 1, "slow": 10})
    result = fedbuff(system_grid(data), 1, buffer_size=2, concurrency=2)
    (record,) = result.history[0].clients  # the slow client is still training
    assert (record.client_id, record.status, record.metrics["updates"], record.num_examples) == ("fast", "ok", 2, 2)


def test_updates_staler_than_max_staleness_are_refused_and_recorded():
    data = federation({"fast0": 1, "fast1": 1, "fast2": 1, "slow": 10})
    result = fedbuff(system_grid(data), 20, buffer_size=2, concurrency=4, max_staleness=0)
    refused = [c for r in result.history for c in r.clients if c.status == ClientStatus.REFUSED]
    assert refused
    assert all((c.detail or "").startswith("stale:") for c in refused)
    assert all(r.metrics["staleness_max"] == 0 for r in result.history)


def test_the_same_seed_gives_the_same_asynchronous_run():
    data = federation({f"c{k}": k % 4 + 1 for k in range(10)})

    def run() -> tuple[str, list[float]]:
        result = fedbuff(
            system_grid(data, speed_spread=10.0), 6, 4, buffer_size=3, concurrency=5, work_range=(1, 3),
            fraction_evaluate=1.0,
        )  # fmt: skip
        return result.params.sha256(), [r.metrics["sim_seconds"] for r in result.history]

    assert run() == run()


def test_resume_goes_on_from_the_saved_model_and_version():
    data = federation({"a": 1, "b": 2, "c": 3})
    first = fedbuff(system_grid(data), 3, 1, buffer_size=2, concurrency=2)
    saved = first.history[-1]
    resume = Resume(3, first.params, saved.random_state, saved.strategy_state)
    rest = fedbuff(system_grid(data), 5, 1, resume, buffer_size=2, concurrency=2)
    assert [r.server_round for r in rest.history] == [4, 5]
    assert rest.history[-1].strategy_state is not None
    assert rest.history[-1].strategy_state.arrays["server_round"] == 5


def test_the_synchronous_loop_refuses_an_asynchronous_strategy():
    data = federation({"a": 1})
    with pytest.raises(ConfigError, match="FedBuff is asynchronous"):
        run_rounds(
            strategy=FedBuff(),
            grid=InlineGrid(SimulatedClients.of(QuadraticTask(), data)),
            initial_params=Params({"w": np.zeros(1)}),
            rounds=1,
            seed=0,
        )


class SleepyGrid:
    """A grid whose clients take the given wall seconds to reply (``None``: they drop; an exception: it
    raises), from several threads at once."""

    def __init__(self, seconds: Mapping[str, float | Exception | None]) -> None:
        self.seconds = dict(seconds)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def client_ids(self) -> list[str]:
        return list(self.seconds)

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        if not messages:
            return Exchange()
        (client_id, message), *_ = messages.items()
        with self.lock:
            self.calls.append(client_id)
        wait = self.seconds[client_id]
        if isinstance(wait, Exception):
            raise wait
        if wait is None:
            return Exchange(dropped=(client_id,))
        time.sleep(wait)
        _kind, _round, params, config = parse_instruction(message)
        assert config is not None  # a fit instruction
        result = QuadraticTask().fit(params, client_with_target(1.0).train, config)
        return Exchange({client_id: Reply(result.to_message(), wait)})


def test_a_threaded_grid_hands_replies_back_as_each_client_finishes():
    inner = SleepyGrid({"slow": 0.5, "quick": 0.01, "broken": RuntimeError("lost"), "gone": None})
    grid = ThreadedGrid(inner)
    message = fit_message(1, Params({"w": np.zeros(1)}), ONE_STEP)
    for client_id in ("slow", "quick", "broken", "gone"):
        grid.submit(client_id, message)
    order = [grid.next_reply() for _ in range(4)]
    assert order[-1][0] == "slow"  # submitted first, back last
    assert dict(order)["quick"] is not None
    assert dict(order)["broken"] is None
    assert dict(order)["gone"] is None


def test_fedbuff_runs_over_a_threaded_grid_without_waiting_for_the_slowest_client():
    inner = SleepyGrid({"slow": 1.5, "a": 0.01, "b": 0.01})
    started = time.monotonic()
    result = fedbuff(inner, 3, buffer_size=2, concurrency=3)
    assert time.monotonic() - started < 1.2  # three updates from a and b while slow is still training
    assert "slow" not in {c.client_id for r in result.history for c in r.clients}
    assert result.params["w"][0] > 0


def test_a_run_whose_clients_all_drop_ends_with_a_clear_error():
    inner = SleepyGrid({"a": None, "b": None})
    with pytest.raises(NotEnoughClientsError, match="replies were dropped, late or refused"):
        fedbuff(inner, 2, buffer_size=1, concurrency=2, fraction_evaluate=1.0)
    assert len(inner.calls) == 21  # MISSES_PER_SLOT * concurrency replies read (and one still out), then it gave up
