"""Client mods: a mod of the user's own runs on every instruction, in simulation and over gRPC alike, and can
answer it itself (decline it), change what goes in and what comes out, or pass it on."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from typing import Any

import numpy as np
import pytest

import fedloom as fl
from fedloom.core import ConfigError, FitConfig, FitResult, Message, Params
from fedloom.core.results import EvalResult
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.runtime import ClientApp, Context, InlineGrid, SimulatedClients, client_app, decline, run_rounds
from fedloom.strategy import FedAvg

log = logging.getLogger("tests.mods")


def no_evaluation(message: Message, context: Context, call_next: Any) -> Message:
    """A site's policy as a mod: it trains, but never evaluates."""
    if message.kind == "evaluate":
        return decline(f"{context.client_id} does not evaluate")
    return call_next(message, context)


def halve_updates(message: Message, context: Context, call_next: Any) -> Message:
    """Changes what comes out: the update ``w_k - w`` of every fit is halved before it is sent."""
    reply = call_next(message, context)
    if message.kind != "fit":
        return reply
    sent = message.params["w"]
    return Message(reply.kind, Params({"w": sent + (reply.params["w"] - sent) / 2}), reply.metadata)


def noted(message: Message, context: Context, call_next: Any) -> Message:
    """Logs each instruction: its lines travel with the reply, as the task's would."""
    log.info("mod saw %s for %s", message.kind, context.client_id)
    return call_next(message, context)


class ShiftTask:
    """Training adds the mean of the client's rows to ``w``; evaluation reports the loss |w|."""

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(2)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(Params({"w": params["w"] + data.x.mean(axis=0)}), len(data), {"loss": 0.0})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        return EvalResult(float(np.abs(params["w"]).sum()), len(data), {})


SHIFTS = {"a": [1.0, 0.0], "b": [0.0, 2.0]}


def federation() -> FederatedData:
    clients = {}
    for cid, shift in SHIFTS.items():
        data = ArrayData(np.tile(np.asarray(shift), (2, 1)), np.zeros(2, np.int64))
        clients[cid] = ClientData(data, data)
    return FederatedData(clients=clients, central_test=None, num_classes=1, name="toy")


STRATEGY = FedAvg(fraction=1.0, fraction_evaluate=1.0)


def check_run(history: Any, params: Params) -> None:
    """Both clients trained, with their updates halved, and declined every evaluation, saying so."""
    np.testing.assert_allclose(params["w"], [0.25, 0.5])  # the mean of the halved shifts (0.5, 0) and (0, 1)
    for record in history:
        evaluated = [c for c in record.clients if c.phase == "evaluate"]
        assert sorted(c.client_id for c in evaluated) == ["a", "b"]
        assert {c.status for c in evaluated} == {"dropped"}
        assert sorted(c.detail for c in evaluated) == [
            "its task failed: declined: a does not evaluate",
            "its task failed: declined: b does not evaluate",
        ]
        fits = [c for c in record.clients if c.phase == "fit"]
        assert {c.status for c in fits} == {"ok"}
        assert all(any("mod saw fit for" in line.message for line in c.logs) for c in fits)


@pytest.fixture(autouse=True)
def info_level(caplog: pytest.LogCaptureFixture) -> None:
    """Loggers make INFO records here, as under the fedloom command (telemetry sends INFO lines and up)."""
    caplog.set_level(logging.INFO)


def test_a_users_mods_run_in_simulation() -> None:
    task = ShiftTask()
    grid = InlineGrid(SimulatedClients.of(task, federation(), mods=(noted, no_evaluation, halve_updates)))
    result = run_rounds(strategy=STRATEGY, grid=grid, initial_params=task.init_params(0), rounds=1, seed=0)
    check_run(result.history, result.params)


@pytest.mark.integration  # a gRPC server and its sites on loopback
def test_a_users_mods_run_over_grpc() -> None:
    from fedloom.runtime.net.client import run_client
    from fedloom.runtime.net.server import FleetServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    task, data = ShiftTask(), federation()
    app = client_app(task, (noted, no_evaluation, halve_updates), deployed=True)
    answered: dict[str, int] = {}

    def site(cid: str) -> None:
        answered[cid] = run_client(app, data.clients[cid], server=address, token=cid, retry_for=30)

    with FleetServer(address, authenticate=lambda token: token) as server:
        sites = [threading.Thread(target=site, args=(cid,), daemon=True) for cid in SHIFTS]
        for thread in sites:
            thread.start()
        server.wait_for_clients(2, timeout=30)
        result = run_rounds(
            strategy=STRATEGY, grid=server.grid, initial_params=task.init_params(0), rounds=1, seed=0, timeout=30
        )
        server.say_bye()
        for thread in sites:
            thread.join(timeout=30)
    assert answered == {"a": 2, "b": 2}  # a fit and a declined evaluation each
    check_run(result.history, result.params)


def test_a_jobs_mods_reach_its_simulated_clients_and_keep_it_off_the_vectorized_backend(tmp_path: Any) -> None:
    job = fl.load_job("digits")
    settings = dataclasses.replace(
        job.simulation, num_clients=4, rounds=1, backend=fl.BackendConfig(name="vectorized", workers=1)
    )
    job = dataclasses.replace(job, mods=(no_evaluation,), simulation=settings)
    run = fl.simulate(job, runs_dir=tmp_path)
    assert run.backend == "inline"  # vectorized trains past the mods: it falls back, with a warning
    evaluated = [c for c in run.history[0].clients if c.phase == "evaluate"]
    assert evaluated
    assert all(c.status == "dropped" and "does not evaluate" in (c.detail or "") for c in evaluated)
    from fedloom.runtime.sim.vectorized import VectorizedGrid

    clients = SimulatedClients.of(job.task, federation(), mods=(no_evaluation,))
    with pytest.raises(ConfigError, match="this job has mods of its own"):
        VectorizedGrid(clients)


def test_a_mod_that_is_not_callable_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be callable"):
        ClientApp(ShiftTask(), ("not a mod",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Job\.mods"):
        dataclasses.replace(fl.load_job("digits"), mods=(42,))
