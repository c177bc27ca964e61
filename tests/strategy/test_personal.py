"""Personalization golden numbers, computed by hand, through the client code every runtime runs
(``handle_instruction``) with client state on disk: FedPer, FedRep, FedBN's layer choice, Ditto, and evaluation
after local fine-tuning; and FedPer over a simulated federation, where the server refuses a reply that carries
a personal layer."""

import numpy as np
import pytest
import torch
from toy_task import QuadraticTask, TwoPartTask, client_with_target

from fedloom.core import ConfigError, DecodeError, EvalResult, FitConfig, FitResult, Message, Params
from fedloom.core.errors import NotEnoughClientsError
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.runtime.client import handle_instruction
from fedloom.runtime.loop import run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.inline import InlineGrid
from fedloom.runtime.state import DirectoryState
from fedloom.strategy import FedAvg
from fedloom.strategy.catalog import build_strategy
from fedloom.strategy.ifca import IFCA, IFCAState
from fedloom.strategy.local import with_local
from fedloom.strategy.personal import Ditto, FedBN, FedPer, FedRep, personal_names
from fedloom.task import LogisticRegressionTask
from fedloom.task.torch_task import TorchTask

ONE_STEP = FitConfig(local_epochs=None, local_steps=1, lr=0.5)
ZEROS = Params({"body": np.zeros(1), "head": np.zeros(1)})


def fit_round(strategy, state, server_round, task, data, states):
    messages = strategy.configure_fit(server_round, state, sorted(data), np.random.default_rng(0))
    replies = {
        cid: FitResult.from_message(handle_instruction(task, data[cid], message, states[cid]))
        for cid, message in messages.items()
    }
    return messages, replies


def evaluate(strategy, state, task, client, client_state, server_round=1) -> EvalResult:
    message = strategy.configure_evaluate(server_round, state, ["a"], np.random.default_rng(0))["a"]
    return EvalResult.from_message(handle_instruction(task, client, message, client_state))


def test_personal_names_by_prefix_full_name_and_batch_norm():
    names = ["body.0.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "head.weight", "h"]
    assert personal_names(names, ["head"]) == ["head.weight"]
    assert personal_names(names, ["h"]) == ["h"]  # a full name; "head.weight" does not start with "h."
    assert personal_names(names, batch_norm=True) == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]
    # FedPer's default is the module of the last parameter; FedBN's is the batch-norm layers alone
    model = Params({"0.weight": np.zeros((2, 2)), "0.bias": np.zeros(2), "2.weight": np.zeros((1, 2))})
    assert FedPer().personal_names(model) == ["2.weight"]
    assert FedBN().personal_names(Params({n: np.zeros(1) for n in names})) == personal_names(names, batch_norm=True)


def test_fedper_keeps_the_head_on_each_client_and_averages_the_body(tmp_path):
    strategy = FedPer(personal=("head",), fit=ONE_STEP)
    task, data = TwoPartTask(), {"a": client_with_target(2.0), "b": client_with_target(-2.0)}
    states = {cid: DirectoryState(tmp_path / cid) for cid in data}
    state = strategy.init(ZEROS)

    # Round 1, client a (target 2): gradient 0 + 0 - 2 = -2, so body = head = 0 + 0.5 * 2 = 1; b: both -1.
    # The reply holds the body only; the head is on a's disk. The server averages the bodies: (1 - 1) / 2 = 0.
    messages, replies = fit_round(strategy, state, 1, task, data, states)
    assert list(messages["a"].params) == ["body", "head"]
    assert list(replies["a"].params) == ["body"]
    np.testing.assert_allclose(replies["a"].params["body"], [1.0])
    np.testing.assert_allclose(states["a"].at_round(1, "evaluate").load("personal.layers")["head"], [1.0])
    np.testing.assert_allclose(states["b"].at_round(1, "evaluate").load("personal.layers")["head"], [-1.0])
    state, _ = strategy.aggregate_fit(1, state, replies)
    np.testing.assert_allclose(state.params["body"], [0.0])
    np.testing.assert_allclose(state.params["head"], [0.0])  # the initial head: the server never sees another

    # Round 2, a starts from body 0 (server) and head 1 (its disk): gradient 1 - 2 = -1, so both move by 0.5.
    _, replies = fit_round(strategy, state, 2, task, data, states)
    np.testing.assert_allclose(replies["a"].params["body"], [0.5])
    np.testing.assert_allclose(states["a"].at_round(2, "evaluate").load("personal.layers")["head"], [1.5])
    # a's personalized evaluation: body 0 (global) + head 1.5 (own) against 2: 1/2 * 0.5^2 = 0.125; the global
    # model (head 0) would score 1/2 * 2^2 = 2.
    assert evaluate(strategy, state, task, data["a"], states["a"], server_round=2).loss == pytest.approx(0.125)
    assert strategy.fit_reply_layout(messages["a"]) == Params({"body": np.zeros(1)})


def test_fedrep_trains_the_head_first_then_the_body(tmp_path):
    strategy = FedRep(personal=("head",), head_epochs=1, fit=ONE_STEP)
    task, data = TwoPartTask(), {"a": client_with_target(2.0)}
    states = {"a": DirectoryState(tmp_path)}
    _, replies = fit_round(strategy, strategy.init(ZEROS), 1, task, data, states)
    # head with the body frozen: 0 + 0.5 * 2 = 1; then the body with the head frozen: gradient 0 + 1 - 2 = -1,
    # so body = 0.5 (FedPer, training both at once, gives body 1 and head 1)
    np.testing.assert_allclose(replies["a"].params["body"], [0.5])
    np.testing.assert_allclose(states["a"].at_round(1, "evaluate").load("personal.layers")["head"], [1.0])
    assert replies["a"].metrics["steps"] == 2.0


def test_ditto_trains_a_personal_model_toward_the_global_one(tmp_path):
    strategy = Ditto(lam=2.0, fit=ONE_STEP)
    task, client, state_a = QuadraticTask(), client_with_target(2.0), DirectoryState(tmp_path)
    state = strategy.init(Params({"w": np.zeros(1)}))
    # Before any training the personal model is the global one: 1/2 * (0 - 2)^2 = 2
    assert evaluate(strategy, state, task, client, state_a).loss == pytest.approx(2.0)

    # Round 1 from w = 0: the global update is 0 - 0.5 * (0 - 2) = 1, sent; v starts at w = 0 and the proximal
    # term is 0 there, so v = 1 too, kept.
    _, replies = fit_round(strategy, state, 1, task, {"a": client}, {"a": state_a})
    np.testing.assert_allclose(replies["a"].params["w"], [1.0])
    np.testing.assert_allclose(state_a.at_round(1, "evaluate").load("ditto.model")["w"], [1.0])

    # Round 2 from w = 0.5: global 0.5 - 0.5 * (0.5 - 2) = 1.25; v = 1 - 0.5 * ((1 - 2) + 2 * (1 - 0.5)) = 1
    state = strategy.init(Params({"w": np.array([0.5])}))
    _, replies = fit_round(strategy, state, 2, task, {"a": client}, {"a": state_a})
    np.testing.assert_allclose(replies["a"].params["w"], [1.25])
    np.testing.assert_allclose(state_a.at_round(2, "evaluate").load("ditto.model")["w"], [1.0])
    # evaluation measures v = 1, not the global 0.5: 1/2 * (1 - 2)^2 = 0.5
    assert evaluate(strategy, state, task, client, state_a, server_round=2).loss == pytest.approx(0.5)


def test_finetuning_reports_the_tuned_and_the_global_model():
    strategy = FedAvg(finetune=FitConfig(local_epochs=None, local_steps=1, lr=0.5))
    state = strategy.init(Params({"w": np.zeros(1)}))
    result = evaluate(strategy, state, QuadraticTask(), client_with_target(2.0), None)
    # global w = 0: 1/2 * 2^2 = 2; one step of lr 0.5 gives w = 1: 1/2 * 1^2 = 0.5
    assert result.loss == pytest.approx(0.5)
    assert result.metrics["global_loss"] == pytest.approx(2.0)
    # from JSON, as --strategy-arg finetune={...} gives it
    built = build_strategy("fedavg", finetune={"local_epochs": 2, "lr": 0.1})
    assert built.finetune == FitConfig(local_epochs=2, lr=0.1)
    with pytest.raises(ConfigError, match="finetune"):
        build_strategy("fedavg", finetune={"epochs": 2})
    with pytest.raises(ConfigError, match="finetune= does not apply"):
        Ditto(finetune=FitConfig())


def test_bad_personal_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="no parameter of the model is personal"):
        FedPer(personal=("tail",)).init(ZEROS)
    with pytest.raises(ConfigError, match="nothing to federate"):
        FedPer(personal=("body", "head")).init(ZEROS)
    with pytest.raises(ConfigError, match="head_epochs"):
        FedPer(head_epochs=-1)
    with pytest.raises(ConfigError, match="lam"):
        Ditto(lam=-1.0)
    message = with_local(
        FedAvg(fit=ONE_STEP).fit_instructions(1, ZEROS, ["a"], np.random.default_rng(0))["a"],
        "personal",
        layers=["tail"],
    )
    with pytest.raises(DecodeError, match="must list names"):
        handle_instruction(TwoPartTask(), client_with_target(1.0), message, DirectoryState("/nonexistent"))


def test_fedrep_needs_a_task_that_can_freeze(tmp_path):
    strategy = FedRep(personal=("w",), fit=ONE_STEP)
    params = Params({"w": np.zeros(1), "v": np.zeros(1)})
    message = strategy.configure_fit(1, strategy.init(params), ["a"], np.random.default_rng(0))["a"]

    class NoFreeze(QuadraticTask):
        def fit(self, params, data, config, *, anchor=None, correction=None):
            return FitResult(params, len(data), {"steps": 1.0})

    with pytest.raises(ConfigError, match="FedRep needs a task that can freeze"):
        handle_instruction(NoFreeze(), client_with_target(1.0), message, DirectoryState(tmp_path))


def test_torch_and_numpy_tasks_freeze_what_they_are_told():
    data = ArrayData(np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32), np.arange(16) % 2)
    config = FitConfig(local_epochs=1, batch_size=4, lr=0.5)
    task = TorchTask(model=lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
    start = task.init_params(0)
    out = task.fit(start, data, config, frozen=["0.weight", "0.bias"]).params
    np.testing.assert_array_equal(out["0.weight"], start["0.weight"])
    assert not np.array_equal(out["1.weight"], start["1.weight"])
    # the freeze is undone: the next fit trains every layer
    assert not np.array_equal(task.fit(start, data, config).params["0.weight"], start["0.weight"])
    with pytest.raises(ConfigError, match="cannot freeze"):
        task.fit(start, data, config, frozen=["2.weight"])

    numpy_task = LogisticRegressionTask(num_features=3, num_classes=2)
    zeros = numpy_task.init_params(0)
    tuned = numpy_task.fit(zeros, data, config, frozen=["bias"]).params
    np.testing.assert_array_equal(tuned["bias"], zeros["bias"])
    assert np.abs(tuned["weight"]).sum() > 0
    with pytest.raises(ConfigError, match="cannot freeze"):
        numpy_task.fit(zeros, data, config, frozen=["w"])


def _federation() -> FederatedData:
    """Two clients whose labels depend on the features in opposite ways: no single model fits both."""
    x = np.random.default_rng(1).normal(size=(80, 2)).astype(np.float32)
    clients = {}
    for cid, sign in (("a", 1), ("b", -1)):
        y = (sign * x[:, 0] > 0).astype(np.int64)
        clients[cid] = ClientData(ArrayData(x[:60], y[:60]), ArrayData(x[60:], y[60:]))
    return FederatedData(clients=clients, central_test=None, num_classes=2, name="opposite")


def test_fedper_in_simulation_personalizes_and_refuses_leaked_layers(tmp_path):
    task, data = LogisticRegressionTask(num_features=2, num_classes=2), _federation()
    fit = FitConfig(local_epochs=5, batch_size=10, lr=0.5)
    sent_up: list[set[str]] = []

    class Watched(InlineGrid):  # notes the names of the params each fit reply carries
        def send_and_receive(self, messages, timeout=None, on_reply=None):
            def note(cid, reply):
                if reply.message.kind == "fit.result":
                    sent_up.append(set(reply.message.params))
                return reply if on_reply is None else on_reply(cid, reply)

            return super().send_and_receive(messages, timeout, note)

    grid = Watched(SimulatedClients.of(task, data, state_dir=str(tmp_path)))
    # personal = the whole weight matrix, shared = the bias: each client's own weights separate its labels
    personal = run_rounds(
        strategy=FedPer(personal=("weight",), fit=fit), grid=grid, initial_params=task.init_params(0), rounds=3, seed=0
    )
    shared = run_rounds(
        strategy=FedAvg(fit=fit),
        grid=InlineGrid(SimulatedClients.of(task, data)),
        initial_params=task.init_params(0),
        rounds=3,
        seed=0,
    )
    assert personal.history[-1].metrics["client_mean_accuracy"] >= 0.9
    assert shared.history[-1].metrics["client_mean_accuracy"] <= 0.7  # one model for opposite clients
    fits = [c for c in personal.history[-1].clients if c.phase == "fit"]
    assert len(fits) == 2
    assert sent_up == [{"bias"}] * 6  # the weight matrix never goes up

    class Leaky(InlineGrid):  # clients that run plain training and send back the whole model
        def send_and_receive(self, messages, timeout=None, on_reply=None):
            plain = {
                cid: Message(m.kind, m.params, {k: v for k, v in m.metadata.items() if k != "local"})
                for cid, m in messages.items()
            }
            return super().send_and_receive(plain, timeout, on_reply)

    with pytest.raises(NotEnoughClientsError, match="0 of 2 clients replied with a valid update"):
        run_rounds(
            strategy=FedPer(personal=("weight",), fit=fit),
            grid=Leaky(SimulatedClients.of(task, data)),
            initial_params=task.init_params(0),
            rounds=1,
            seed=0,
        )


def test_ifca_clients_pick_the_closest_model_and_clusters_average_apart(tmp_path):
    strategy = IFCA(k=2, fit=ONE_STEP)
    task = QuadraticTask()
    data = {"a": client_with_target(4.0), "b": client_with_target(6.0), "c": client_with_target(-4.0)}
    state = IFCAState((Params({"w": np.array([1.0])}), Params({"w": np.array([-1.0])})), (0, 0))
    messages, replies = fit_round(strategy, state, 1, task, data, dict.fromkeys(data))
    assert list(messages["a"].params) == ["ifca.0/w", "ifca.1/w"]
    assert strategy.fit_reply_layout(messages["a"]) == Params({"w": np.array([1.0])})
    # a and b are nearer to model 0 (w = 1), c to model 1 (w = -1); one step of lr 0.5 halves the distance:
    # a: 1 + 0.5 * 3 = 2.5, b: 1 + 0.5 * 5 = 3.5, c: -1 - 0.5 * 3 = -2.5
    assert [replies[c].metrics["cluster"] for c in "abc"] == [0.0, 0.0, 1.0]
    np.testing.assert_allclose([replies[c].params["w"][0] for c in "abc"], [2.5, 3.5, -2.5])
    state, metrics = strategy.aggregate_fit(1, state, replies)
    np.testing.assert_allclose(state.models[0]["w"], [3.0])  # (2.5 + 3.5) / 2
    np.testing.assert_allclose(state.models[1]["w"], [-2.5])
    assert metrics["ifca_cluster_0_clients"] == 2.0
    assert state.sizes == (2, 1)
    assert strategy.params(state) is state.models[0]  # the cluster most clients chose
    # c evaluates the model it would choose (w = -2.5 against -4: 1/2 * 1.5^2 = 1.125)
    message = strategy.configure_evaluate(1, state, ["c"], np.random.default_rng(0))["c"]
    assert EvalResult.from_message(handle_instruction(task, data["c"], message)).loss == pytest.approx(1.125)


def test_ifca_starts_from_distinct_models_and_separates_opposite_clients():
    start = Params({"w": np.array([2.0, -2.0]), "n": np.array([3])})
    models = IFCA(k=3, init_noise=0.5, seed=1).init(start).models
    assert not np.array_equal(models[0]["w"], start["w"])
    assert not np.array_equal(models[1]["w"], models[2]["w"])
    assert IFCA(k=1).init(start).models == (start,)
    assert models[1]["n"] == 3  # integer buffers are not perturbed
    assert IFCA(k=3, seed=1).init(start).models[1] == IFCA(k=3, seed=1).init(start).models[1]

    task, data = LogisticRegressionTask(num_features=2, num_classes=2, init_scale=0.1), _federation()
    fit = FitConfig(local_epochs=5, batch_size=10, lr=0.5)
    clustered = run_rounds(
        strategy=IFCA(k=2, fit=fit, init_noise=1.0),
        grid=InlineGrid(SimulatedClients.of(task, data)),
        initial_params=task.init_params(0),
        rounds=5,
        seed=0,
    )
    last = clustered.history[-1]
    assert last.metrics["client_mean_accuracy"] >= 0.9  # FedAvg's one model: 0.5 (see the FedPer test)
    assert {c.metrics["cluster"] for c in last.clients if c.phase == "fit"} == {0.0, 1.0}
