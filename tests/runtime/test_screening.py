"""Screening a round's updates (issue 25): declared examples cap what a client reports, the update guard refuses
an update far larger than the round's others, ``max_share`` caps one client's share, and a model that becomes
non-finite stops the run naming the round and its clients. Toy tasks whose results can be computed by hand."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import pytest

from fedloom.app.run import run_recorded
from fedloom.core import ConfigError, Message, Params
from fedloom.core.errors import DivergedError
from fedloom.runtime import ClientStatus, InlineGrid, run_rounds
from fedloom.runtime.grid import Declaring, Exchange, Grid, Reply, ReplyHandler
from fedloom.runtime.records import RoundRecord
from fedloom.runtime.screening import change_norm, share_cap
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.strategy import FedAvg
from fedloom.strategy.optimizers import ServerSGD
from fedloom.tracking import RunRecorder, RunStore
from fedloom.tracking.views import client_detail, clients_view
from tests.runtime.test_loop import MeanTask, federation


class Lying:
    """A grid whose client ``liar`` rewrites its fit replies: its update scaled by ``scale`` and its
    ``num_examples`` replaced by ``claims`` (where given); ``declared`` are the examples each client declared
    when it joined (a deployment's hello), or nothing."""

    def __init__(
        self,
        grid: Grid,
        liar: str,
        *,
        scale: float = 1.0,
        claims: int | None = None,
        declared: Mapping[str, int] | None = None,
    ) -> None:
        self._grid = grid
        self._liar = liar
        self._scale = scale
        self._claims = claims
        self._declared = declared

    def client_ids(self):
        return self._grid.client_ids()

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        def lie(client_id: str, reply: Reply) -> Reply:
            if client_id == self._liar and reply.message.kind == "fit.result":
                sent = messages[client_id].params
                params = Params({n: sent[n] + self._scale * (a - sent[n]) for n, a in reply.message.params.items()})
                metadata = dict(reply.message.metadata)
                if self._claims is not None:
                    metadata["num_examples"] = self._claims
                reply = dataclasses.replace(reply, message=Message(reply.message.kind, params, metadata))
            return on_reply(client_id, reply) if on_reply is not None else reply

        return self._grid.send_and_receive(messages, timeout, lie)


class DeclaringLying(Lying):
    def declared_examples(self, client_id: str) -> int | None:
        return None if self._declared is None else self._declared.get(client_id)


SIZES = [1, 2, 5]  # client ci holds SIZES[i] copies of the value i: FedAvg's model is their weighted mean


def run(strategy: FedAvg, grid_of=lambda grid: grid, rounds: int = 1, observers=()):
    task = MeanTask()
    grid = grid_of(InlineGrid(SimulatedClients.of(task, federation(SIZES))))
    return run_rounds(
        strategy=strategy, grid=grid, initial_params=task.init_params(0), rounds=rounds, seed=0, observers=observers
    )


def fit_record(result, client_id: str):
    return next(c for c in result.history[-1].clients if c.client_id == client_id and c.phase == "fit")


# ------------------------------------------------------------------------------------------------ the maths


@pytest.mark.parametrize(
    ("weights", "share", "capped"),
    [
        ({"a": 10**12, "b": 600, "c": 500}, 0.5, {"a": 1100}),  # a may weigh as much as b and c together
        ({"a": 5, "b": 2, "c": 1}, 0.5, {"a": 3}),
        ({"a": 100, "b": 90, "c": 5, "d": 5}, 0.4, {"a": 20, "b": 20}),  # two lowered to one level: 20 / 50
        ({"a": 3, "b": 3, "c": 3}, 0.5, {}),  # the cap holds already
        ({"a": 10**12, "b": 1}, 0.5, {}),  # with two, only equal weights would meet it: left alone
        ({"a": 7, "b": 0, "c": 0}, 0.5, {}),  # nothing else weighs: the cap cannot be met
    ],
)
def test_share_cap_lowers_the_largest_weights_to_one_level(weights, share, capped):
    assert share_cap(weights, share) == capped
    if capped:
        after = {**weights, **capped}
        assert max(after.values()) <= share * sum(after.values())


def test_change_norm_is_the_l2_norm_of_the_difference_over_floating_arrays():
    rng = np.random.default_rng(0)
    sent = Params({"big": rng.normal(size=300_000).astype(np.float32), "b": np.zeros(3), "n": np.arange(4)})
    reply = Params({"big": rng.normal(size=300_000).astype(np.float32), "b": np.ones(3), "n": np.arange(4) * 9})
    expected = np.sqrt(np.sum((reply["big"].astype(np.float64) - sent["big"]) ** 2) + 3.0)  # ints are not a change
    assert change_norm(sent, reply) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"update_guard": 1.0}, "update_guard"), ({"max_share": 1.0}, "max_share")]
)
def test_screening_settings_out_of_range_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FedAvg(**kwargs)


# ------------------------------------------------------------------------------------------------ the loop


def test_the_guard_changes_nothing_when_no_update_is_far_out():
    guarded, unguarded = run(FedAvg(), rounds=2), run(FedAvg(update_guard=None), rounds=2)
    assert guarded.params["w"].tobytes() == unguarded.params["w"].tobytes()
    assert [c.status for c in guarded.history[-1].clients] == [c.status for c in unguarded.history[-1].clients]
    assert fit_record(guarded, "c2").metrics["update_norm"] == pytest.approx(2 - 1.5)  # round 2 moves from 1.5


def test_an_update_scaled_a_millionfold_is_refused_naming_the_client(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="fedloom.server"):
        result = run(FedAvg(), lambda grid: Lying(grid, "c2", scale=1e6))
    assert result.params["w"][0] == pytest.approx((0 * 1 + 1 * 2) / 3, rel=1e-15)  # c0 and c1 alone
    refused = fit_record(result, "c2")
    assert refused.status == ClientStatus.REFUSED
    assert "changes the model by 2e+06 (L2 norm), more than update_guard=10 times the round's median of 1" in (
        refused.detail or ""
    )
    assert any("client c2" in r.getMessage() and "update_guard" in r.getMessage() for r in caplog.records)


def test_without_the_guard_the_scaled_update_takes_over():
    result = run(FedAvg(update_guard=None), lambda grid: Lying(grid, "c2", scale=1e6))
    assert result.params["w"][0] > 1e5
    assert fit_record(result, "c2").status == ClientStatus.OK


def test_of_two_updates_the_smaller_is_the_median():
    task = MeanTask()
    grid = Lying(InlineGrid(SimulatedClients.of(task, federation([3, 3]))), "c1", scale=100.0)
    result = run_rounds(strategy=FedAvg(), grid=grid, initial_params=task.init_params(0), rounds=1, seed=0)
    # c0's update is 0 (its value is the initial model): no median to compare with, so nothing is refused.
    assert fit_record(result, "c1").status == ClientStatus.OK
    shifted = federation([3, 3])
    clients = {
        f"c{i}": dataclasses.replace(c, train=dataclasses.replace(c.train, x=c.train.x + 1))
        for i, c in enumerate(shifted.clients.values())
    }
    grid = Lying(
        InlineGrid(SimulatedClients.of(task, dataclasses.replace(shifted, clients=clients))), "c1", scale=100.0
    )
    result = run_rounds(strategy=FedAvg(), grid=grid, initial_params=task.init_params(0), rounds=1, seed=0)
    assert fit_record(result, "c1").status == ClientStatus.REFUSED  # 200 against 1: the pair's smaller is the median
    assert result.params["w"][0] == 1.0


def test_a_client_claiming_more_than_it_declared_counts_what_it_declared():
    declared = {"c0": 1, "c1": 2, "c2": 5}
    honest = run(FedAvg(), lambda grid: DeclaringLying(grid, "c2", declared=declared))
    lying = run(FedAvg(), lambda grid: DeclaringLying(grid, "c2", claims=10**12, declared=declared))
    assert isinstance(DeclaringLying(None, "c2"), Declaring)  # type: ignore[arg-type]
    assert lying.params["w"].tobytes() == honest.params["w"].tobytes()
    record = fit_record(lying, "c2")
    assert (record.status, record.num_examples) == (ClientStatus.OK, 5)
    assert record.metrics["claimed_examples"] == 1e12
    assert record.detail == "claimed 1000000000000 examples, counted 5: declared 5 when it joined"
    assert fit_record(honest, "c2").detail is None


def test_without_a_declaration_a_claim_is_bounded_only_by_max_share():
    lying = run(FedAvg(max_share=0.5), lambda grid: Lying(grid, "c2", claims=10**12))
    # c2 counts as much as c0 and c1 together (1 + 2 = 3): (0 * 1 + 1 * 2 + 2 * 3) / 6.
    assert lying.params["w"][0] == pytest.approx(8 / 6, rel=1e-15)
    record = fit_record(lying, "c2")
    assert record.num_examples == 3
    assert record.detail == "claimed 1000000000000 examples, counted 3: max_share=0.5 of the round's weight"


def test_max_share_caps_an_honest_majority_too():
    capped, plain = run(FedAvg(max_share=0.5)), run(FedAvg())
    assert capped.params["w"][0] == pytest.approx(8 / 6, rel=1e-15)
    assert plain.params["w"][0] == pytest.approx(12 / 8, rel=1e-15)  # FedAvg's own weights by default


def test_a_model_that_becomes_infinite_stops_the_run_naming_the_round_and_the_clients():
    recorded: list[RoundRecord] = []

    class Keep:
        def on_round(self, record: RoundRecord, params: Params) -> None:
            recorded.append(record)

    # A server step of 1e308 times the mean update: finite after round 1 (1.5e308), infinite after round 2.
    strategy = FedAvg(server_optimizer=ServerSGD(lr=1e308, momentum=0.0), fraction_evaluate=0.0)
    with pytest.raises(DivergedError) as raised, np.errstate(over="ignore"):
        run(strategy, rounds=3, observers=[Keep()])
    error = raised.value
    assert error.server_round == 2
    assert sorted(error.norms) == ["c0", "c1", "c2"]
    assert error.suspects == ()  # every update is as large: no client stood out
    assert str(error).startswith("round 2: the global model holds NaN or infinity after aggregating the updates of 3")
    assert "The run stops after round 1, its last good round" in str(error)
    assert [r.server_round for r in recorded] == [1]  # round 2 is not recorded: a resume starts after round 1


def test_a_diverged_error_names_the_updates_that_stood_out():
    error = DivergedError(4, {"a": 3e30, "b": 0.9, "c": 0.8})
    assert error.suspects == ("a",)
    assert "the updates of a stood out" in str(error)


def test_caps_and_refusals_are_in_the_run_store_and_its_clients_view(tmp_path):
    task = MeanTask()
    grid = DeclaringLying(
        InlineGrid(SimulatedClients.of(task, federation(SIZES))), "c2", claims=10**12, declared={"c2": 5}
    )
    recorder, _ = RunRecorder.open(tmp_path / "run", "screening", {"job": "screening"})
    run_recorded(recorder, strategy=FedAvg(), grid=grid, initial_params=task.init_params(0), rounds=2, seed=0)
    store = RunStore(tmp_path)
    rows = {row["client_id"]: row for row in clients_view(store, recorder.run_id)["clients"]}
    assert (rows["c2"]["capped"], rows["c2"]["trained"], rows["c0"]["capped"]) == (2, 2, 0)
    fits = [r for r in client_detail(store, recorder.run_id, "c2")["records"] if r["phase"] == "fit"]
    assert [r["detail"] for r in fits] == ["claimed 1000000000000 examples, counted 5: declared 5 when it joined"] * 2
    assert all(r["num_examples"] == 5 and r["metrics"]["claimed_examples"] == 1e12 for r in fits)
