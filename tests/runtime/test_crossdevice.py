"""SystemGrid: availability (probability or trace), client speeds and a deadline, on a simulated clock."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from fedloom.core import ConfigError, EvalResult, FitConfig, FitResult, Params, SystemConfig
from fedloom.core.message import Message
from fedloom.core.results import evaluate_message, fit_message
from fedloom.data.base import ArrayData, ClientData, FederatedData
from fedloom.data.lazy import LazyFederation
from fedloom.runtime import ClientStatus, InlineGrid, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.crossdevice import SystemGrid, SystemRound, local_steps
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.strategy import FedAvg


@dataclass
class RecordingTask:
    """Fit returns the mean of the client's x (its number) and records which client trained."""

    trained: list[int] = field(default_factory=list)

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(1)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        self.trained.append(int(data.x[0, 0]))
        return FitResult(Params({"w": np.array([float(data.x.mean())])}), len(data), {"loss": 0.0})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        return EvalResult(0.0, len(data), {"accuracy": 1.0})


def toy(sizes: list[int]) -> LazyFederation:
    """Client k holds sizes[k] training rows, each the value k, and one test row."""

    def make(k: int, rng: np.random.Generator) -> ClientData:
        n = sizes[k]
        return ClientData(ArrayData(np.full((n, 1), float(k)), np.zeros(n, int)), ArrayData(np.full((1, 1), k), [0]))

    return LazyFederation.from_generator("toy", len(sizes), make, num_classes=1)


def fits(server_round: int, clients, config: FitConfig) -> dict[str, Message]:
    params = Params({"w": np.zeros(1)})
    return {cid: fit_message(server_round, params, config) for cid in clients}


ONE_STEP = FitConfig(local_epochs=None, local_steps=1, batch_size=1, lr=0.1)


# -- availability -----------------------------------------------------------------------------------------------


def test_everyone_online_gives_the_inner_grids_clients_unchanged():
    data = toy([1] * 5)
    inner = InlineGrid(SimulatedClients.of(RecordingTask(), data))
    grid = SystemGrid(inner, data, SystemConfig(speed_sigma=0.5))
    assert grid.client_ids() is data.client_ids


def test_availability_p_puts_about_p_of_the_clients_online_each_round():
    data = toy([1] * 100_000)
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability=0.3), seed=1
    )
    first = grid.client_ids()
    assert abs(len(first) - 30_000) < 1_000  # binomial sd ~ 145
    assert grid.client_ids() is first  # the same round: the same draw
    grid.send_and_receive(fits(1, first[:3], ONE_STEP))
    second = grid.client_ids()
    assert abs(len(second) - 30_000) < 1_000
    overlap = len(set(first) & set(second))
    assert abs(overlap - 9_000) < 600  # independent draws per round: about p^2 of the clients in both
    again = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability=0.3), seed=1
    )
    assert list(again.client_ids()) == list(first)


def test_online_clients_are_a_lazy_sequence_in_registration_order():
    data = toy([1] * 1000)
    online = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability=0.5)
    ).client_ids()
    as_list = list(online)
    assert as_list == sorted(as_list)
    assert set(as_list) <= set(data.client_ids)
    assert online[0] == as_list[0]
    assert online[-1] == as_list[-1]
    assert online[np.int64(3)] == as_list[3]
    assert list(online[2:8:3]) == as_list[2:8:3]
    assert online.index(as_list[10]) == 10
    assert as_list[10] in online
    offline = next(cid for cid in data.client_ids if cid not in set(as_list))
    assert offline not in online
    assert "nobody" not in online
    assert 7 not in online
    with pytest.raises(ValueError, match="not online"):
        online.index(offline)
    with pytest.raises(IndexError):
        online[len(as_list)]


def write_trace(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_a_trace_decides_who_is_online_at_each_simulated_time(tmp_path):
    # Every round takes 2 simulated seconds (2 steps of 1 s, no deadline): rounds start at t = 0, 2, 4, 6.
    trace = write_trace(
        tmp_path / "trace.npz",
        client=np.array([0, 1, 1, 2, 3]),
        start=np.array([0.0, 0.0, 4.0, 1.0, 6.0]),
        end=np.array([10.0, 2.0, 5.0, 4.0, 6.0]),  # half-open: client 1 leaves at 2; client 3's interval is empty
    )
    data = toy([1, 1, 1, 1])
    task = RecordingTask()
    system = SystemConfig(availability_trace=trace, seconds_per_step=1.0)
    grid = SystemGrid(InlineGrid(SimulatedClients.of(task, data)), data, system)
    result = run_rounds(
        strategy=FedAvg(fraction=1.0, fraction_evaluate=0.0, fit=FitConfig(local_epochs=None, local_steps=2)),
        grid=grid,
        initial_params=task.init_params(0),
        rounds=3,
        seed=0,
    )
    asked = [sorted(c.client_id for c in record.clients if c.phase == "fit") for record in result.history]
    assert asked == [["client-000", "client-001"], ["client-000", "client-002"], ["client-000", "client-001"]]
    assert [(r.start, r.duration, r.online) for r in grid.history] == [(0.0, 2.0, 2), (2.0, 2.0, 2), (4.0, 2.0, 2)]
    assert grid.clock == 6.0
    assert list(grid.client_ids()) == ["client-000"]  # at t = 6 only client 0 is online


def test_when_nobody_is_online_the_clock_skips_to_the_next_client_coming_online(tmp_path):
    # Client 0 is online in [0, 1) and [5, 6); client 1 in [8, 9). Rounds take 1 simulated second.
    trace = write_trace(
        tmp_path / "gaps.npz", client=np.array([0, 0, 1]), start=np.array([0.0, 5.0, 8.0]), end=np.array([1, 6, 9.0])
    )
    data = toy([1, 1])
    task = RecordingTask()
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(task, data)), data, SystemConfig(availability_trace=trace, seconds_per_step=1.0)
    )
    result = run_rounds(
        strategy=FedAvg(fraction_evaluate=0.0, fit=FitConfig(local_epochs=None, local_steps=1)),
        grid=grid,
        initial_params=task.init_params(0),
        rounds=3,
        seed=0,
    )
    asked = [[c.client_id for c in record.clients] for record in result.history]
    assert asked == [["client-000"], ["client-000"], ["client-001"]]
    assert [(r.start, r.duration) for r in grid.history] == [(0.0, 1.0), (5.0, 1.0), (8.0, 1.0)]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"client": [0], "start": [0.0]}, "no array end"),
        ({"client": [0, 1], "start": [0.0], "end": [1.0]}, "equally long"),
        ({"client": [0.5], "start": [0.0], "end": [1.0]}, "integers"),
        ({"client": [4], "start": [0.0], "end": [1.0]}, r"in \[0, 4\)"),
        ({"client": [0], "start": [2.0], "end": [1.0]}, "start <= end"),
        ({"client": [0], "start": [np.nan], "end": [1.0]}, "finite"),
    ],
)
def test_a_malformed_trace_is_a_config_error(tmp_path, arrays, message):
    trace = write_trace(tmp_path / "trace.npz", **{k: np.array(v) for k, v in arrays.items()})
    data = toy([1, 1, 1, 1])
    with pytest.raises(ConfigError, match=message):
        SystemGrid(InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability_trace=trace))


def test_a_missing_or_unreadable_trace_is_a_config_error(tmp_path):
    data = toy([1])
    with pytest.raises(ConfigError, match="does not exist"):
        SystemGrid(
            InlineGrid(SimulatedClients.of(RecordingTask(), data)),
            data,
            SystemConfig(availability_trace=str(tmp_path / "no.npz")),
        )
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="not a readable"):
        SystemGrid(
            InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability_trace=str(garbage))
        )
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ConfigError, match="single array"):
        SystemGrid(
            InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability_trace=str(single))
        )


# -- stragglers -------------------------------------------------------------------------------------------------


def test_speeds_are_fixed_per_client_and_log_normal():
    data = toy([1] * 3000)
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(speed_sigma=0.5), seed=2
    )
    log_speeds = np.log([grid.speed(cid) for cid in data.client_ids])
    assert abs(log_speeds.mean()) < 0.05
    assert abs(log_speeds.std() - 0.5) < 0.03
    bigger = toy([1] * 5000)
    other = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), bigger)), bigger, SystemConfig(speed_sigma=0.5), seed=2
    )
    assert other.speed("client-0042") == grid.speed("client-0042")  # depends on seed and client only
    assert (
        SystemGrid(InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig()).speed("client-0042")
        == 1.0
    )


def test_local_steps_follow_the_fit_config():
    assert local_steps(33, FitConfig(local_epochs=2, batch_size=16)) == 2 * 3
    assert local_steps(32, FitConfig(local_epochs=1, batch_size=16)) == 2
    assert local_steps(33, FitConfig(local_epochs=None, local_steps=7)) == 7


def test_exactly_the_clients_slower_than_the_deadline_are_late_and_do_no_work():
    sizes = [1, 3, 5, 8, 13, 2, 4, 6, 9, 20, 1, 7]
    data = toy(sizes)
    task = RecordingTask()
    system = SystemConfig(speed_sigma=0.8, seconds_per_step=0.25, deadline=1.0)
    grid = SystemGrid(InlineGrid(SimulatedClients.of(task, data)), data, system, seed=5)
    config = FitConfig(local_epochs=2, batch_size=4, lr=0.1)
    # By hand: 2 epochs of ceil(n / 4) steps, 0.25 s a step, divided by the client's speed.
    seconds = {
        cid: 2 * math.ceil(n / 4) * 0.25 / grid.speed(cid) for cid, n in zip(data.client_ids, sizes, strict=True)
    }
    expected_late = sorted(cid for cid, s in seconds.items() if s > 1.0)
    assert 0 < len(expected_late) < len(sizes)

    exchange = grid.send_and_receive(fits(1, data.client_ids, config))
    assert sorted(exchange.late) == expected_late
    assert sorted(exchange.replies) == sorted(set(data.client_ids) - set(expected_late))
    assert sorted(task.trained) == sorted(data.client_ids.number(c) for c in exchange.replies)
    assert grid.clock == 1.0  # someone was late: the round lasted until the deadline
    assert grid.history == (SystemRound(1, 0.0, 1.0, len(sizes), len(sizes), len(expected_late), 0),)
    assert grid.fit_seconds("client-004", fits(1, ["client-004"], config)["client-004"]) == seconds["client-004"]


def test_the_clock_advances_by_the_slowest_reply_without_late_clients():
    data = toy([2, 6, 4])
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(seconds_per_step=0.5, deadline=100.0)
    )
    config = FitConfig(local_epochs=1, batch_size=2, lr=0.1)  # 1, 3 and 2 steps
    grid.send_and_receive(fits(1, ["client-000", "client-002"], config))
    assert grid.clock == 1.0  # client 2: 2 steps of 0.5 s
    grid.send_and_receive({"client-001": evaluate_message(1, Params({"w": np.zeros(1)}))})
    assert grid.clock == 1.0  # evaluation takes no simulated time
    grid.send_and_receive(fits(2, data.client_ids, config))
    assert grid.clock == 2.5
    assert [(r.server_round, r.start, r.duration) for r in grid.history] == [(1, 0.0, 1.0), (2, 1.0, 1.5)]
    grid.send_and_receive({})
    assert grid.clock == 2.5


def test_submitted_clients_come_back_in_the_order_they_finish_in_simulated_time():
    data = toy([6, 2, 4, 50])
    task = RecordingTask()
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(task, data)), data, SystemConfig(seconds_per_step=0.5, deadline=10.0)
    )
    config = FitConfig(local_epochs=1, batch_size=2, lr=0.1)  # 3, 1, 2 and 25 steps of 0.5 s
    for client_id, message in fits(1, data.client_ids, config).items():
        grid.submit(client_id, message)
    came = []
    for _ in range(4):
        client_id, reply = grid.next_reply()
        came.append((client_id, grid.clock, None if reply is None else reply.message.params["w"][0]))
    # Client 3 would need 12.5 s: at the 10 s deadline the server gives up on it, and it did no work.
    assert came == [
        ("client-001", 0.5, 1.0),
        ("client-002", 1.0, 2.0),
        ("client-000", 1.5, 0.0),
        ("client-003", 10.0, None),
    ]
    assert sorted(task.trained) == [0, 1, 2]
    assert grid.history == ()  # submissions are not rounds
    grid.submit("client-001", fits(2, ["client-001"], config)["client-001"])
    assert grid.next_reply()[0] == "client-001"
    assert grid.clock == 10.5
    with pytest.raises(RuntimeError, match="no client submitted"):
        grid.next_reply()


def test_speed_spread_draws_speeds_log_uniformly_over_the_spread():
    data = toy([1] * 4000)
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(speed_spread=10.0), seed=1
    )
    speeds = np.array([grid.speed(cid) for cid in data.client_ids])
    assert 0.1 <= speeds.min() < 0.101
    assert 0.99 < speeds.max() <= 1.0
    assert np.histogram(np.log10(speeds), bins=4, range=(-1, 0))[0] == pytest.approx([1000] * 4, rel=0.1)
    with pytest.raises(ConfigError, match="give one of them"):
        SystemConfig(speed_spread=10.0, speed_sigma=0.5)
    with pytest.raises(ConfigError, match="speed_spread must be >= 1"):
        SystemConfig(speed_spread=0.5)


def test_dropped_clients_do_not_set_the_rounds_duration():
    data = toy([1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    grid = SystemGrid(
        DropoutGrid(InlineGrid(SimulatedClients.of(RecordingTask(), data)), 0.5, seed=3),
        data,
        SystemConfig(speed_sigma=1.0),
        seed=3,
    )
    exchange = grid.send_and_receive(fits(1, data.client_ids, ONE_STEP))
    assert exchange.dropped
    assert exchange.replies
    assert not exchange.late
    assert grid.clock == pytest.approx(max(0.01 / grid.speed(cid) for cid in exchange.replies))
    assert grid.history[0].dropped == len(exchange.dropped)


def test_system_grid_works_over_an_in_memory_federation():
    clients = {
        name: ClientData(
            ArrayData(np.full((n, 1), float(n)), np.zeros(n, int)), ArrayData(np.zeros((0, 1)), np.zeros(0, int))
        )
        for name, n in (("ann", 1), ("bob", 40))
    }
    data = FederatedData(clients, None, num_classes=1)
    grid = SystemGrid(
        InlineGrid(SimulatedClients.of(RecordingTask(), data)), data, SystemConfig(availability=0.99, deadline=0.2)
    )
    assert set(grid.client_ids()) <= {"ann", "bob"}
    exchange = grid.send_and_receive(fits(1, ["ann", "bob"], FitConfig(local_epochs=1, batch_size=1)))
    assert exchange.late == ("bob",)
    assert list(exchange.replies) == ["ann"]


# -- the server loop over a SystemGrid ----------------------------------------------------------------------------


class Watched:
    """A grid that remembers the set of online clients each time the loop asks for them."""

    def __init__(self, grid: SystemGrid) -> None:
        self.grid = grid
        self.online: list[set[str]] = []

    def client_ids(self):
        online = self.grid.client_ids()
        self.online.append(set(online))
        return online

    def send_and_receive(self, messages, timeout=None, on_reply=None):
        return self.grid.send_and_receive(messages, timeout, on_reply)


def test_a_run_with_availability_and_stragglers_records_late_clients_and_asks_only_online_ones():
    sizes = np.random.default_rng(0).integers(1, 30, size=2000).tolist()
    data = toy(sizes)
    task = RecordingTask()
    system = SystemConfig(availability=0.4, speed_sigma=0.5, seconds_per_step=0.1, deadline=0.5)
    grid = SystemGrid(InlineGrid(SimulatedClients.of(task, data)), data, system, seed=7)
    watched = Watched(grid)
    config = FitConfig(local_epochs=1, batch_size=8)
    result = run_rounds(
        strategy=FedAvg(clients_per_round=50, fraction_evaluate=0.01, fit=config),
        grid=watched,
        initial_params=task.init_params(0),
        rounds=4,
        seed=0,
    )
    assert len(result.history) == 4
    for r, record in enumerate(result.history):
        fit_records = [c for c in record.clients if c.phase == "fit"]
        eval_records = [c for c in record.clients if c.phase == "evaluate"]
        assert len(fit_records) == 50
        assert {c.client_id for c in fit_records} <= watched.online[2 * r]  # only online clients are asked
        assert {c.client_id for c in eval_records} <= watched.online[2 * r + 1]
        assert eval_records
        assert all(c.status == ClientStatus.OK for c in eval_records)
        late = {c.client_id for c in fit_records if c.status == ClientStatus.LATE}
        ok = {c.client_id for c in fit_records if c.status == ClientStatus.OK}
        assert late | ok == {c.client_id for c in fit_records}
        seconds = {
            c.client_id: grid.fit_seconds(c.client_id, fits(r + 1, [c.client_id], config)[c.client_id])
            for c in fit_records
        }
        assert late == {cid for cid, s in seconds.items() if s > 0.5}
        facts = grid.history[r]
        assert (facts.server_round, facts.asked, facts.late) == (r + 1, 50, len(late))
        assert facts.online == len(watched.online[2 * r])
        assert abs(facts.online - 800) < 120
        assert facts.duration == (0.5 if late else max(seconds.values()))
    late_everywhere = {c.client_id for rec in result.history for c in rec.clients if c.status == ClientStatus.LATE}
    assert 0 < len(late_everywhere) < 100
    assert not {data.client_ids[k] for k in task.trained} & late_everywhere  # late clients never trained
    # The evaluation of round r is configured after its training: it sees round r + 1's online clients.
    assert watched.online[1] == watched.online[2] != watched.online[0]
    assert grid.clock == pytest.approx(sum(r.duration for r in grid.history))
