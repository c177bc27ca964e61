"""Paillier aggregation in runs (fedloom.privacy.PaillierAgg): the server adds ciphertexts and one client
decrypts only the sum, which is FedAvg's within the quantization bound."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.core import ConfigError, FitConfig, FitResult, Message, Params
from fedloom.core.errors import DecodeError, NotEnoughClientsError
from fedloom.data import ArrayData, ClientData, FederatedData
from fedloom.privacy import KeyPair, PaillierAgg, PaillierMod
from fedloom.privacy.he import answer_he
from fedloom.runtime import ClientApp, Context, InlineGrid, handle_instruction, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.strategy import FedAvg, Median


@pytest.fixture(scope="module")
def keys() -> KeyPair:
    return KeyPair.generate(1024)


class ShiftTask:
    """Training adds the mean of the client's rows to ``w``: a client's update is known exactly."""

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(3)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(Params({"w": params["w"] + data.x.mean(axis=0)}), len(data), {})

    def evaluate(self, params, data):  # pragma: no cover - the runs below skip evaluation
        raise AssertionError("not evaluated")


UPDATES = [[0.3, -0.2, 0.1], [-0.5, 0.4, 0.25], [0.05, 0.0, -0.7], [0.2, 0.2, 0.2]]
ROWS = [1, 2, 3, 4]
FIT_ALL = FedAvg(fraction=1.0, fraction_evaluate=0.0)


def federation() -> FederatedData:
    clients = {}
    for k, (update, n) in enumerate(zip(UPDATES, ROWS, strict=True)):
        data = ArrayData(np.tile(np.asarray(update), (n, 1)), np.zeros(n, np.int64))
        clients[f"c{k}"] = ClientData(data, data)
    return FederatedData(clients=clients, central_test=None, num_classes=1, name="toy")


def test_the_decrypted_sum_is_fedavgs_example_weighted_mean_within_the_bound(keys):
    task, data = ShiftTask(), federation()
    strategy = PaillierAgg(FIT_ALL, public_key=keys.public, weight_cap=10)
    run = run_rounds(
        strategy=strategy,
        grid=InlineGrid(SimulatedClients.of(task, data, paillier_key=keys)),
        initial_params=task.init_params(0),
        rounds=1,
        seed=0,
    )
    metrics = run.history[0].metrics
    # sum n_k u_k / sum n_k, worked out by hand: (0.25, 1.4, -0.7) / 10
    assert np.abs(run.params["w"] - np.array([0.025, 0.14, -0.07])).max() <= metrics["he_bound"] < 1e-8
    assert metrics["he_clients"] == 4
    fits = [c for c in run.history[0].clients if c.phase == "fit"]
    assert [(c.status, c.num_examples) for c in fits] == [("ok", 0)] * 4
    assert all(c.bytes_up > 0 and len(c.update_sha256 or "") == 64 for c in fits)


def run_protocol_by_hand(keys: KeyPair, silent: set[str]):
    """Drive one round's protocol, each client answering through its own PaillierMod; the clients in
    ``silent`` never answer a decryption request. Returns the result and who was asked to decrypt."""
    task, data = ShiftTask(), federation()
    strategy = PaillierAgg(FIT_ALL, public_key=keys.public, weight_cap=10)
    state = strategy.init(task.init_params(0))
    instructions = strategy.configure_fit(1, state, data.client_ids, np.random.default_rng(0))
    protocols = {cid: PaillierMod(keys) for cid in data.client_ids}
    steps = strategy.fit_protocol(1, state, instructions)
    messages, asked = next(steps), []
    try:
        while True:
            if {m.kind for m in messages.values()} == {"he.decrypt"}:
                asked.extend(messages)
            replies = {
                cid: ClientApp(task, (protocols[cid],))(m, Context(cid, data.clients[cid]))
                for cid, m in messages.items()
                if not (m.kind == "he.decrypt" and cid in silent)
            }
            messages = steps.send(replies)
    except StopIteration as done:
        return done.value, asked


def test_a_key_holder_that_does_not_answer_is_replaced_by_the_next(keys):
    result, asked = run_protocol_by_hand(keys, silent={"c0"})
    assert asked == ["c0", "c1"]
    assert result.state.params["w"] == pytest.approx([0.025, 0.14, -0.07], abs=1e-8)
    with pytest.raises(NotEnoughClientsError, match="no client decrypted the sum"):
        run_protocol_by_hand(keys, silent={"c0", "c1", "c2", "c3"})


def test_a_key_holder_decrypts_only_sums_under_its_own_key(keys):
    task, data = ShiftTask(), federation()
    strategy = PaillierAgg(FIT_ALL, public_key=keys.public)
    state = strategy.init(task.init_params(0))
    instructions = strategy.configure_fit(1, state, data.client_ids, np.random.default_rng(0))
    steps = strategy.fit_protocol(1, state, instructions)
    fit = next(steps)["c0"]
    train = lambda m: handle_instruction(task, data.clients["c0"], m, None)  # noqa: E731
    encrypted = answer_he(fit, train, keys)
    assert encrypted.kind == "he.encrypted"
    assert encrypted.params["ciphertexts"].dtype == np.uint8
    # A server asking a client to decrypt one update (to read it) is refused: the count says 1.
    one = Message("he.decrypt", Params({"sum": encrypted.params["ciphertexts"]}), {"round": 1, **fit.metadata})
    with pytest.raises(DecodeError, match="decrypts only sums"):
        answer_he(one, train, keys)
    with pytest.raises(DecodeError, match="another key"):
        answer_he(fit, train, KeyPair.generate(1024))
    with pytest.raises(ConfigError, match="no Paillier key"):
        ClientApp(task, (PaillierMod(),))(fit, Context("c0", data.clients["c0"]))


def test_what_paillier_cannot_wrap_or_run_is_refused(keys):
    with pytest.raises(ConfigError, match="robust aggregator"):
        PaillierAgg(FedAvg(aggregator=Median()))
    with pytest.raises(ConfigError, match="key_bits"):
        PaillierAgg(FIT_ALL, key_bits=1000)
    task, data = ShiftTask(), federation()
    with pytest.raises(ConfigError, match="no public key"):
        run_rounds(
            strategy=PaillierAgg(FIT_ALL),
            grid=InlineGrid(SimulatedClients.of(task, data)),
            initial_params=task.init_params(0),
            rounds=1,
            seed=0,
        )
