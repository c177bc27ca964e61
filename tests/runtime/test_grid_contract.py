"""The ``Grid`` contract, run against every simulation backend and against a real deployment on loopback (the
gRPC server's ``NetGrid`` with client agents dialling in): what the server loop relies on, whichever grid runs
the clients."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from torch import nn

from fedloom.core import EvalResult, FitConfig, FitResult, Message, PartitionConfig, SystemConfig
from fedloom.core.results import evaluate_message, fit_message
from fedloom.data import federate, load_digits
from fedloom.data.base import FederatedData
from fedloom.runtime import Exchange, InlineGrid, client_app
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid, drops
from fedloom.task.torch_task import TorchTask

DROPOUT = 0.3
SEED = 11


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


TASK = TorchTask(model=mlp)


@pytest.fixture(scope="module")
def data() -> FederatedData:
    digits = load_digits()
    return federate(digits, 6, PartitionConfig(scheme="dirichlet", alpha=0.5), seed=3, holdout=0.2)


def _inline(data: FederatedData) -> Any:
    return DropoutGrid(InlineGrid(SimulatedClients.of(TASK, data)), DROPOUT, seed=SEED)


def _vectorized(data: FederatedData) -> Any:
    from fedloom.runtime.sim.vectorized import VectorizedGrid

    return DropoutGrid(VectorizedGrid(SimulatedClients.of(TASK, data)), DROPOUT, seed=SEED)


def _process(data: FederatedData) -> Any:
    from fedloom.runtime.sim.process import ProcessGrid

    return DropoutGrid(ProcessGrid(SimulatedClients.of(TASK, data), workers=2), DROPOUT, seed=SEED)


def _ray(data: FederatedData) -> Any:
    pytest.importorskip("ray")
    from fedloom.runtime.sim.raygrid import RayGrid

    return DropoutGrid(RayGrid(SimulatedClients.of(TASK, data), workers=2), DROPOUT, seed=SEED)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _system(data: FederatedData) -> Any:
    from fedloom.runtime.sim.crossdevice import SystemGrid

    # The cross-device wrapper with a deadline nobody misses: it must be invisible.
    return SystemGrid(_inline(data), data, SystemConfig(speed_sigma=0.5, deadline=1e9), seed=SEED)


class _Deployment:
    """A real deployment on loopback: a gRPC server on a free port, and one client agent per client of the
    federation, each in a thread of this process, dialling in. Nobody drops out of it on purpose."""

    dropout = 0.0

    def __init__(self, data: FederatedData) -> None:
        from fedloom.runtime.net.client import run_client
        from fedloom.runtime.net.server import FleetServer

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{probe.getsockname()[1]}"
        self._server = FleetServer(address, authenticate=lambda token: token)
        self._server.__enter__()
        self._agents = [
            threading.Thread(
                target=run_client,
                args=(client_app(TASK, deployed=True), data.clients[cid]),
                kwargs={"server": address, "token": cid, "retry_for": 60},
                daemon=True,
            )
            for cid in data.client_ids
        ]
        for agent in self._agents:
            agent.start()
        self._server.wait_for_clients(len(self._agents), timeout=60)
        self.grid = self._server.grid

    def client_ids(self) -> Any:
        return self.grid.client_ids()

    def send_and_receive(self, messages: Any, timeout: float | None = 60.0, on_reply: Any = None) -> Exchange:
        return self.grid.send_and_receive(messages, timeout, on_reply)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._server.say_bye()
        for agent in self._agents:
            agent.join(timeout=30)
        self._server.__exit__(None, None, None)


def _deployed(data: FederatedData) -> Any:
    return _Deployment(data)


BACKENDS: dict[str, Callable[[FederatedData], Any]] = {
    "inline": _inline,
    "system": _system,
    "vectorized": _vectorized,
    "process": _process,
    "ray": _ray,
    "deployment": _deployed,
}
# Inline (bare or wrapped in the cross-device system model), process and Ray run the same client code, so their
# results are bit-identical; the vectorized backend batches the same arithmetic differently, so it agrees to
# float tolerance.
EXACT = {"inline", "system", "process", "ray", "deployment"}


# Worker processes, Ray and a gRPC server are integration tests (Ray's in the Ray tests' xdist group); the
# in-process grids are unit tests.
INTEGRATION = {"process": [], "ray": [pytest.mark.xdist_group("ray")], "deployment": []}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=[pytest.mark.integration, *INTEGRATION[name]]) if name in INTEGRATION else name
        for name in BACKENDS
    ],
)
def grid(request: pytest.FixtureRequest, data: FederatedData) -> Iterator[Any]:
    opened = BACKENDS[request.param](data)
    opened.name = request.param
    if not hasattr(opened, "dropout"):
        opened.dropout = DROPOUT
    try:
        yield opened
    finally:
        if hasattr(opened, "close"):
            opened.close()


@pytest.fixture
def reference(grid: Any, data: FederatedData) -> Any:
    """The inline grid with the same simulated dropouts as ``grid`` (none for a deployment)."""
    return DropoutGrid(InlineGrid(SimulatedClients.of(TASK, data)), grid.dropout, seed=SEED)


def _fit_round(data: FederatedData, server_round: int) -> dict[str, Message]:
    params = TASK.init_params(0)
    ids = data.client_ids
    return {
        cid: fit_message(server_round, params, FitConfig(local_epochs=2, batch_size=8, lr=0.05, seed=100 + i))
        for i, cid in enumerate(ids[:5])
    }


def test_client_ids_are_the_federations(grid: Any, data: FederatedData) -> None:
    assert list(grid.client_ids()) == data.client_ids


def test_nothing_asked_nothing_returned(grid: Any) -> None:
    exchange = grid.send_and_receive({})
    assert exchange == Exchange()


def test_every_addressed_client_replies_or_drops_as_the_shared_rule_says(grid: Any, data: FederatedData) -> None:
    messages = _fit_round(data, server_round=2)
    exchange = grid.send_and_receive(messages)
    expected_dropped = {cid for cid, m in messages.items() if drops(SEED, grid.dropout, cid, m)}
    if grid.dropout:
        assert 0 < len(expected_dropped) < len(messages)  # the seed makes this test exercise both outcomes
    assert set(exchange.dropped) == expected_dropped
    assert set(exchange.replies) == set(messages) - expected_dropped
    assert exchange.late == ()


def test_fit_replies_are_results_equal_to_the_inline_backend(grid: Any, reference: Any, data: FederatedData) -> None:
    messages = _fit_round(data, server_round=3)
    got = grid.send_and_receive(messages)
    want = reference.send_and_receive(messages)
    assert set(got.replies) == set(want.replies)
    for cid, reply in got.replies.items():
        result = FitResult.from_message(reply.message)
        expected = FitResult.from_message(want.replies[cid].message)
        assert result.num_examples == len(data.clients[cid].train)
        assert list(result.params) == list(expected.params)
        for name, array in result.params.items():
            assert array.dtype == expected.params[name].dtype
            if grid.name in EXACT:
                np.testing.assert_array_equal(array, expected.params[name])
            else:
                scale = max(float(np.abs(expected.params[name]).max()), 1e-12)
                assert float(np.abs(array - expected.params[name]).max()) / scale < 1e-5
        assert result.metrics["steps"] == expected.metrics["steps"]
        assert result.metrics["loss"] == pytest.approx(expected.metrics["loss"], rel=1e-5)
        assert reply.bytes_down > 0
        assert reply.bytes_up > 0
        assert reply.seconds >= 0.0


def test_evaluate_replies_match_the_inline_backend(grid: Any, reference: Any, data: FederatedData) -> None:
    params = TASK.init_params(5)
    messages = {cid: evaluate_message(4, params) for cid in data.client_ids}
    got = grid.send_and_receive(messages)
    want = reference.send_and_receive(messages)
    assert set(got.dropped) == set(want.dropped)
    for cid, reply in got.replies.items():
        result = EvalResult.from_message(reply.message)
        expected = EvalResult.from_message(want.replies[cid].message)
        assert result.num_examples == len(data.clients[cid].test)
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        assert result.metrics["accuracy"] == pytest.approx(expected.metrics["accuracy"], abs=1e-12)


# -- the asynchronous grids ----------------------------------------------------------------------------------
# An AsyncGrid takes work one client at a time (submit) and hands each reply back once (next_reply): the
# simulated clock of the cross-device model, and any grid run in threads (how a deployment serves FedBuff).


def _async_system(data: FederatedData) -> Any:
    from fedloom.runtime.sim.crossdevice import SystemGrid

    return SystemGrid(_inline(data), data, SystemConfig(speed_sigma=0.5), seed=SEED)


def _async_threads(data: FederatedData) -> Any:
    from fedloom.runtime import ThreadedGrid

    return ThreadedGrid(_inline(data))


class _AsyncDeployment(_Deployment):
    def __init__(self, data: FederatedData) -> None:
        from fedloom.runtime import ThreadedGrid

        super().__init__(data)
        self.threaded = ThreadedGrid(self.grid, timeout=60.0)

    def submit(self, client_id: str, message: Message) -> None:
        self.threaded.submit(client_id, message)

    def next_reply(self) -> Any:
        return self.threaded.next_reply()


ASYNC_BACKENDS: dict[str, Callable[[FederatedData], Any]] = {
    "system": _async_system,
    "threads": _async_threads,
    "deployment": _AsyncDeployment,
}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=pytest.mark.integration) if name == "deployment" else name for name in ASYNC_BACKENDS
    ],
)
def async_grid(request: pytest.FixtureRequest, data: FederatedData) -> Iterator[Any]:
    from fedloom.runtime import AsyncGrid

    opened = ASYNC_BACKENDS[request.param](data)
    assert isinstance(opened, AsyncGrid)
    opened.dropout = 0.0 if request.param == "deployment" else DROPOUT
    try:
        yield opened
    finally:
        if hasattr(opened, "close"):
            opened.close()


def test_each_submission_comes_back_once_with_the_inline_result(async_grid: Any, data: FederatedData) -> None:
    messages = _fit_round(data, server_round=6)
    want = DropoutGrid(InlineGrid(SimulatedClients.of(TASK, data)), async_grid.dropout, seed=SEED)
    expected = want.send_and_receive(messages)
    for cid, message in messages.items():
        async_grid.submit(cid, message)
    returned = [async_grid.next_reply() for _ in messages]
    assert sorted(cid for cid, _ in returned) == sorted(messages)  # each submission exactly once
    back = dict(returned)
    assert {cid for cid, reply in back.items() if reply is None} == set(expected.dropped)
    for cid, reply in back.items():
        if reply is None:
            continue
        result = FitResult.from_message(reply.message)
        for name, array in result.params.items():
            np.testing.assert_array_equal(array, FitResult.from_message(expected.replies[cid].message).params[name])
