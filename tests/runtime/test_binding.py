"""Replies bound to what they answer (issue 31): what a reply states, how the server loop holds it against what it
sent, and the replays it refuses where replies are bound (a deployment; here an inline grid whose replies are
stated as a deployed site's agent states them)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedloom.core import EvalResult, FitConfig, FitResult, Message, Params
from fedloom.core.results import evaluate_message, fit_message
from fedloom.data.base import ArrayData
from fedloom.privacy.ledger import LEDGER_FILE, update_digest, used_updates
from fedloom.runtime import ClientStatus, Exchange, InlineGrid, run_rounds
from fedloom.runtime.binding import ANSWERS, ModelDigests, SentUpdates, misstated, stated, statement
from fedloom.runtime.grid import Binding, hand_over
from fedloom.runtime.loop import Resume
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.strategy import FedAvg
from tests.runtime.test_loop import MeanTask, federation

W = Params({"w": np.array([1.0, 2.0])})


class StepTask:
    """Fit moves the model halfway to the client's mean: an update that differs by client and by round."""

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(1)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(Params({"w": params["w"] / 2 + data.x.mean()}), len(data), {"loss": 0.0})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        return EvalResult(0.0, len(data), {})


class IdleTask(StepTask):
    """Fit returns the model it was given (a free-rider)."""

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(params, len(data), {"loss": 0.0})


#: Rewrites one reply: (client id, the instruction, the stated reply, what that client sent before) -> reply.
Tamper = Callable[[str, Message, Message, Mapping[int, Message]], Message]


class BoundGrid:
    """An inline grid whose replies state what they answer, as a deployed site's agent states them; ``tamper``
    rewrites the replies it is given (a dishonest site)."""

    binds_replies = True

    def __init__(self, task: object, data: object, tamper: Tamper | None = None) -> None:
        self._inner = InlineGrid(SimulatedClients.of(task, data))  # type: ignore[arg-type]
        self._tamper = tamper
        self.sent: dict[str, dict[int, Message]] = {}  # client -> round -> its stated fit reply

    def client_ids(self):
        return self._inner.client_ids()

    def send_and_receive(self, messages, timeout=None, on_reply=None) -> Exchange:
        exchange = self._inner.send_and_receive(messages, timeout)
        replies = {}
        for cid, reply in exchange.replies.items():
            instruction = messages[cid]
            message = stated(reply.message, statement(instruction))
            before = self.sent.setdefault(cid, {})
            if self._tamper is not None:
                message = self._tamper(cid, instruction, message, before)
            if instruction.kind == "fit":
                before[instruction.metadata["round"]] = message
            replies[cid] = replace(reply, message=message)
        return hand_over(replace(exchange, replies=replies), on_reply)


def _run(grid, task, rounds: int = 3, resume: Resume | None = None, **strategy):
    """``rounds`` rounds of FedAvg (no evaluation unless ``strategy`` says) over ``grid``."""
    return run_rounds(
        strategy=FedAvg(**{"fraction_evaluate": 0.0, **strategy}),
        grid=grid,
        initial_params=task.init_params(0),
        rounds=rounds,
        seed=0,
        resume=resume,
    )


def _fits(result, client_id: str) -> list[tuple[str, str | None]]:
    return [
        (c.status, c.detail) for r in result.history for c in r.clients if c.client_id == client_id and c.phase == "fit"
    ]


# -- what a reply states, and how it is held against its instruction -----------------------------------------------


def test_a_statement_names_the_round_the_kind_and_the_model_and_replaces_what_the_task_said():
    instruction = fit_message(4, W, FitConfig())
    said = statement(instruction)
    assert said == {"round": 4, "kind": "fit", "model_sha256": update_digest(W)}
    forged = Message("fit.result", W, {ANSWERS: {"round": 9}, "num_examples": 1})
    reply = stated(forged, said)
    assert reply.metadata[ANSWERS] == said
    assert reply.metadata["num_examples"] == 1
    assert misstated(reply, instruction, ModelDigests(), required=True) is None


@pytest.mark.parametrize(
    ("said", "why"),
    [
        ({"round": 3, "kind": "fit"}, "out of turn: it answers round 3, not round 4"),
        ({"round": 4, "kind": "evaluate"}, "it answers an instruction of kind 'evaluate', not the 'fit' it was sent"),
        (
            {"round": 4, "kind": "fit", "model_sha256": "ab" * 32},
            "it was built on another model than the one sent for round 4 (SHA-256 abababababababab..., not ",
        ),
        ("fit of round 4", "what it says it answers is not a statement: 'fit of round 4'"),
        (None, "it does not say which instruction it answers (is the site's fedloom older than the server's?)"),
    ],
)
def test_a_reply_stating_another_instruction_or_nothing_is_misstated(said, why):
    instruction = fit_message(4, W, FitConfig())
    reply = Message("fit.result", W, {} if said is None else {ANSWERS: said})
    assert misstated(reply, instruction, ModelDigests(), required=True).startswith(why)
    if said is None:
        assert misstated(reply, instruction, ModelDigests(), required=False) is None  # a simulation's reply


def test_the_model_sent_is_hashed_once_per_params_object(monkeypatch):
    hashed = []
    monkeypatch.setattr("fedloom.runtime.binding.update_digest", lambda p: hashed.append(p) or "d")
    digests = ModelDigests()
    other = Params({"w": np.array([1.0, 2.0])})
    assert [digests(W), digests(W), digests(other), digests(W)] == ["d"] * 4
    assert len(hashed) == 2


def test_an_update_sent_again_is_a_replay_naming_its_first_round_unless_it_is_the_model_it_was_sent():
    sent = SentUpdates({"a": {"d0": 1}})
    assert sent.replayed("a", "d1", 2, lambda: "m2") is None
    assert sent.replayed("b", "d1", 2, lambda: "m2") is None  # another client's: its own
    assert sent.replayed("a", "d1", 3, lambda: "m3") == "a replay: byte for byte the update it sent in round 2"
    assert sent.replayed("a", "d0", 3, lambda: "m3") == "a replay: byte for byte the update it sent in round 1"
    assert sent.replayed("a", "d1", 4, lambda: "d1") is None  # it sent back the model it was given


def test_a_resume_knows_the_updates_the_ledger_lists_for_the_rounds_done(tmp_path: Path):
    lines = [(1, "a", "d1"), (1, "b", "e1"), (2, "a", "d2"), (2, "a", "d1"), (3, "a", "d3")]
    records = [{"round": r, "client": c, "update_sha256": d} for r, c, d in lines]
    (tmp_path / LEDGER_FILE).write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    assert used_updates(tmp_path / LEDGER_FILE, 2) == {"a": {"d1": 1, "d2": 2}, "b": {"e1": 1}}
    assert used_updates(tmp_path / "missing.jsonl", 2) == {}


# -- the loop ---------------------------------------------------------------------------------------------------


def test_bound_honest_replies_give_the_simulations_model():
    data, task = federation([1, 2, 3]), StepTask()
    grid = BoundGrid(task, data)
    assert isinstance(grid, Binding)
    bound = _run(grid, task)
    free = _run(InlineGrid(SimulatedClients.of(task, data)), task)
    assert bound.params.sha256() == free.params.sha256()
    assert all(c.status == ClientStatus.OK for r in bound.history for c in r.clients)


def test_a_replayed_update_is_refused_in_each_round_naming_the_round_it_first_came_in(caplog):
    def replay(cid: str, instruction: Message, reply: Message, before: Mapping[int, Message]) -> Message:
        return before[1] if cid == "c1" and instruction.metadata["round"] > 1 else reply

    data, task = federation([1, 2, 3]), StepTask()
    with caplog.at_level("WARNING", logger="fedloom.server"):
        result = _run(BoundGrid(task, data, replay), task)
    why = "a replay: byte for byte the update it sent in round 1"
    assert _fits(result, "c1") == [("ok", None), ("refused", why), ("refused", why)]
    assert f"round 3: refused the fit reply of client c1: {why}" in caplog.text
    assert [c.update_sha256 is None for c in result.history[1].clients] == [False, True, False]


def test_a_replay_across_a_resume_is_refused_as_within_the_run():
    data, task = federation([1, 2, 3]), StepTask()
    grid = BoundGrid(task, data)
    first = _run(grid, task, rounds=1)
    replayed = grid.sent["c1"][1]

    def replay(cid: str, instruction: Message, reply: Message, before: Mapping[int, Message]) -> Message:
        return replayed if cid == "c1" else reply

    cut = first.history[-1]
    done = {c.client_id: {c.update_sha256: 1} for c in cut.clients if c.update_sha256}
    resume = Resume(1, first.params, cut.random_state, updates=done)
    rest = _run(BoundGrid(task, data, replay), task, rounds=2, resume=resume)
    assert _fits(rest, "c1") == [("refused", "a replay: byte for byte the update it sent in round 1")]


def test_a_reply_stating_another_round_or_model_or_nothing_is_refused_saying_which():
    def misstate(cid: str, instruction: Message, reply: Message, before: Mapping[int, Message]) -> Message:
        server_round = instruction.metadata["round"]
        said = statement(instruction)
        if server_round == 2 and cid == "c0":
            return stated(reply, {**said, "round": 1})
        if server_round == 2 and cid == "c1":
            return stated(reply, {**said, "model_sha256": update_digest(Params({"w": np.zeros(1)}))})
        if server_round == 3 and cid == "c2":
            return replace(reply, metadata={k: v for k, v in reply.metadata.items() if k != ANSWERS})
        return reply

    data, task = federation([1, 2, 3]), StepTask()
    result = _run(BoundGrid(task, data, misstate), task, min_clients=1)
    assert _fits(result, "c0")[1] == ("refused", "out of turn: it answers round 1, not round 2")
    status, detail = _fits(result, "c1")[1]
    assert (status, detail.split(" (")[0]) == ("refused", "it was built on another model than the one sent for round 2")
    assert _fits(result, "c2")[2] == (
        "refused",
        "it does not say which instruction it answers (is the site's fedloom older than the server's?)",
    )
    assert [s for cid in ("c0", "c1", "c2") for s, _ in _fits(result, cid)].count("refused") == 3


def test_an_evaluate_reply_answering_another_round_is_refused():
    def misstate(cid: str, instruction: Message, reply: Message, before: Mapping[int, Message]) -> Message:
        if instruction.kind == "evaluate" and cid == "c0":
            return stated(reply, statement(evaluate_message(1, instruction.params)))
        return reply

    data, task = federation([1, 2, 3]), StepTask()
    result = _run(BoundGrid(task, data, misstate), task, rounds=2, fraction_evaluate=1.0)
    evaluated = [(r.server_round, c.status, c.detail) for r in result.history for c in r.clients if c.client_id == "c0"]
    assert [e for e in evaluated if e[1] == "refused"] == [
        (2, "refused", "out of turn: it answers round 1, not round 2")
    ]


def test_a_free_rider_sending_back_the_model_it_was_given_is_no_replay_while_the_model_stands_still():
    data, task = federation([1, 2, 3]), IdleTask()
    result = _run(BoundGrid(task, data), task)
    assert all(c.status == ClientStatus.OK for r in result.history for c in r.clients)
    assert result.params.sha256() == task.init_params(0).sha256()


def test_a_simulation_takes_the_same_update_every_round_from_a_task_that_ignores_the_model():
    data, task = federation([1, 2, 3]), MeanTask()
    result = _run(InlineGrid(SimulatedClients.of(task, data)), task)
    digests = {c.update_sha256 for r in result.history for c in r.clients if c.client_id == "c1"}
    assert len(digests) == 1  # the same bytes each round: taken, as nothing in a simulation can replay
    assert all(c.status == ClientStatus.OK for r in result.history for c in r.clients)
