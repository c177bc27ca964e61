"""Simulated attacks: who attacks (seeded), poisoned training data, rewritten updates, and their effect on FedAvg.

The golden numbers are small enough to check by hand; see the comments."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

import fedloom as fl
from fedloom.cli.simulate import parse_attack
from fedloom.core import AttackConfig, ConfigError, EvalResult, FitConfig, FitResult, Message, Params, SimulationConfig
from fedloom.core.message import MessageKind
from fedloom.core.results import evaluate_message, fit_message
from fedloom.data.base import ArrayData, ClientData, FederatedData
from fedloom.data.lazy import LazyFederation
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler, hand_over
from fedloom.runtime.sim.attacks import (
    AttackGrid,
    add_trigger,
    attack_update,
    choose_attackers,
    describe_attackers,
    poison_federation,
)
from fedloom.runtime.sim.backends import open_backend
from fedloom.runtime.sim.common import SimulatedClients

IDS = [f"client-{k:03d}" for k in range(20)]
FIT = FitConfig(local_epochs=1, batch_size=1, lr=0.1)


# ---------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sybil", "fraction": 0.1}, "unknown attack kind 'sybil'; choose one of label_flip, scale"),
        ({"kind": "scale"}, "attack scale chooses nobody: give a fraction > 0 or clients"),
        ({"kind": "scale", "fraction": 1.5}, r"attack fraction must be in \[0, 1\], got 1.5"),
        ({"kind": "scale", "fraction": "0.2"}, "fraction must be a number"),
        ({"kind": "scale", "clients": ("a", "a")}, "attack clients name a client twice"),
        ({"kind": "scale", "clients": "client-001"}, "attack clients must be a tuple of client ids"),
        ({"kind": "scale", "fraction": 0.1, "scale": float("inf")}, "attack scale must be a finite number"),
        ({"kind": "noise", "fraction": 0.1, "sigma": -1.0}, "attack sigma must be >= 0"),
        ({"kind": "backdoor", "fraction": 0.1, "poison_fraction": 0.0}, r"poison_fraction must be in \(0, 1\]"),
        ({"kind": "backdoor", "fraction": 0.1, "trigger_size": 0}, "trigger_size must be >= 1"),
        ({"kind": "backdoor", "fraction": 0.1, "target_label": -1}, "target_label must be >= 0"),
        ({"kind": "scale", "fraction": 0.1, "sigma": 2.0}, "option sigma applies to kind noise, not to scale"),
        ({"kind": "noise", "fraction": 0.1, "boost": 3.0}, "option boost applies to kind backdoor, not to noise"),
    ],
)
def test_attack_config_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AttackConfig(**kwargs)


def test_simulation_config_takes_a_tuple_of_attacks_and_defaults_to_none():
    assert SimulationConfig().attacks == ()
    listed = SimulationConfig(attacks=[AttackConfig("scale", fraction=0.1)])  # type: ignore[arg-type]
    assert listed.attacks == (AttackConfig("scale", fraction=0.1),)
    with pytest.raises(ConfigError, match="attacks must be a tuple of AttackConfig"):
        SimulationConfig(attacks=("scale",))  # type: ignore[arg-type]
    assert AttackConfig("scale", clients=["client-001"]).clients == ("client-001",)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- who attacks


def test_the_same_seed_chooses_the_same_attackers_and_another_seed_others():
    attacks = (AttackConfig("scale", fraction=0.2),)
    first = choose_attackers(attacks, IDS, seed=3)
    assert len(first) == 4  # floor(0.2 * 20)
    assert set(first.values()) == {attacks[0]}
    assert choose_attackers(attacks, IDS, seed=3) == first
    assert set(choose_attackers(attacks, IDS, seed=4)) != set(first)


def test_explicit_clients_attack_and_fractions_draw_from_the_others():
    scale = AttackConfig("scale", fraction=0.25, clients=("client-007",))
    noise = AttackConfig("noise", fraction=0.5)
    chosen = choose_attackers((scale, noise), IDS, seed=0)
    by_kind = {kind: [c for c, a in chosen.items() if a.kind == kind] for kind in ("scale", "noise")}
    assert "client-007" in by_kind["scale"]
    assert len(by_kind["scale"]) == 1 + 5  # the named client, plus floor(0.25 * 20) others
    assert len(by_kind["noise"]) == 10
    assert len(chosen) == 16  # nobody twice


def test_an_unknown_explicit_client_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="attack scale: unknown client 'client-999'"):
        choose_attackers((AttackConfig("scale", clients=("client-999",)),), IDS, seed=0)


def test_a_client_named_by_two_attacks_is_a_config_error():
    attacks = (AttackConfig("scale", clients=("client-001",)), AttackConfig("noise", clients=("client-001",)))
    with pytest.raises(ConfigError, match=r"client 'client-001' is chosen by two attacks \(scale and noise\)"):
        choose_attackers(attacks, IDS, seed=0)


def test_fractions_that_choose_nobody_or_too_many_are_config_errors():
    with pytest.raises(ConfigError, match=r"fraction 0\.01 of 20 clients chooses nobody"):
        choose_attackers((AttackConfig("scale", fraction=0.01),), IDS, seed=0)
    attacks = (AttackConfig("scale", fraction=0.6), AttackConfig("noise", fraction=0.6))
    with pytest.raises(ConfigError, match=r"attack noise: fraction 0\.6 asks for 12 clients, but only 8 of 20"):
        choose_attackers(attacks, IDS, seed=0)


def test_the_log_line_counts_attackers_by_kind():
    chosen = choose_attackers((AttackConfig("scale", fraction=0.2), AttackConfig("label_flip", fraction=0.1)), IDS, 0)
    assert describe_attackers(chosen, 20) == "6 of 20 clients attack: 4 scale (scale -10), 2 label_flip"


# ---------------------------------------------------------------------------------------------- training data


def federation(x: np.ndarray | None = None) -> FederatedData:
    """Three clients whose training labels are 0..9 (and x = the label, one feature per column of ``x``)."""
    x = np.arange(10.0).reshape(10, 1) if x is None else x
    clients = {
        cid: ClientData(ArrayData(x.copy(), np.arange(10)), ArrayData(x[:2].copy(), np.array([3, 4])))
        for cid in ("a", "b", "c")
    }
    return FederatedData(clients, ArrayData(x[:3].copy(), np.array([0, 1, 2])), num_classes=10, name="toy")


def test_label_flip_maps_0_to_9_on_the_attackers_train_split_only():
    data = federation()
    attackers = {"b": AttackConfig("label_flip", clients=("b",))}
    poisoned = poison_federation(data, attackers, data.num_classes, seed=0)
    assert poisoned.clients["b"].train.y.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert poisoned.clients["b"].train.y.dtype == data.clients["b"].train.y.dtype
    assert poisoned.clients["b"].train.x is data.clients["b"].train.x
    assert poisoned.clients["b"].test is data.clients["b"].test  # evaluation data is never poisoned
    assert poisoned.clients["a"] is data.clients["a"]
    assert poisoned.clients["c"] is data.clients["c"]
    assert poisoned.central_test is data.central_test
    assert data.clients["b"].train.y.tolist() == list(range(10))  # the input is unchanged


def test_backdoor_sets_the_trigger_and_label_on_its_share_of_examples_only():
    # Ten examples of 2 x 3 features, values 0..59; the largest training feature is 59.
    x = np.arange(60.0).reshape(10, 2, 3)
    data = federation(x)
    attack = AttackConfig("backdoor", clients=("a",), target_label=7, poison_fraction=0.3, trigger_size=2)
    train = poison_federation(data, {"a": attack}, 10, seed=1).clients["a"].train
    # No example's last two features are both 59 already, so every triggered row shows: floor(0.3 * 10) of them.
    rows = np.flatnonzero((train.x != x).any(axis=(1, 2)))
    assert len(rows) == 3
    for row in rows:
        flat = train.x[row].reshape(-1)
        assert flat[-2:].tolist() == [59.0, 59.0]  # the last trigger_size features, in row-major order
        assert flat[:-2].tolist() == x[row].reshape(-1)[:-2].tolist()
        assert train.y[row] == 7
    others = np.setdiff1d(np.arange(10), rows)
    assert np.array_equal(train.x[others], x[others])
    assert np.array_equal(train.y[others], np.arange(10)[others])
    again = poison_federation(data, {"a": attack}, 10, seed=1).clients["a"].train
    assert np.array_equal(again.x, train.x)  # seeded


def test_add_trigger_builds_a_triggered_test_set():
    x = np.zeros((2, 4), np.float32)
    triggered = add_trigger(x, 3, 16.0)
    assert triggered.tolist() == [[0, 16, 16, 16], [0, 16, 16, 16]]
    assert triggered.dtype == np.float32
    assert not x.any()
    with pytest.raises(ConfigError, match="trigger_size 5 exceeds the 4 features of an example"):
        add_trigger(x, 5, 1.0)


def test_a_backdoor_target_that_is_not_a_class_is_a_config_error():
    data = federation()
    with pytest.raises(ConfigError, match="target_label 10 is not a class of 10"):
        poison_federation(data, {"a": AttackConfig("backdoor", clients=("a",), target_label=10)}, 10, 0)


def test_a_lazy_federation_takes_update_attacks_but_not_data_attacks():
    def make(k: int, rng: np.random.Generator) -> ClientData:
        return ClientData(ArrayData(np.ones((2, 1)), np.zeros(2, int)), ArrayData(np.ones((1, 1)), [0]))

    lazy = LazyFederation.from_generator("lazy", 5, make, num_classes=2)
    cid = lazy.client_ids[0]
    assert poison_federation(lazy, {cid: AttackConfig("scale", clients=(cid,))}, 2, 0) is lazy
    with pytest.raises(ConfigError, match="label_flip attack poisons training data held in memory; LazyFederation"):
        poison_federation(lazy, {cid: AttackConfig("label_flip", clients=(cid,))}, 2, 0)


# ---------------------------------------------------------------------------------------------- updates


def test_scale_sends_global_plus_scale_times_the_update():
    sent = Params({"w": np.array([1.0, 1.0], np.float32), "steps": np.array([0], np.int64)})
    trained = Params({"w": np.array([2.0, 0.5], np.float32), "steps": np.array([5], np.int64)})
    out = attack_update(sent, trained, AttackConfig("scale", fraction=0.1))
    # 1 + -10 * (2 - 1) = -9 and 1 + -10 * (0.5 - 1) = 6; the integer counter is left alone.
    assert out["w"].tolist() == [-9.0, 6.0]
    assert out["w"].dtype == np.float32
    assert out["steps"].tolist() == [5]
    assert trained["w"].tolist() == [2.0, 0.5]  # pure


def test_a_backdoor_boosts_its_update_and_without_boost_sends_it_as_trained():
    sent, trained = Params({"w": np.array([1.0])}), Params({"w": np.array([2.0])})
    assert attack_update(sent, trained, AttackConfig("backdoor", fraction=0.1, boost=5.0))["w"].tolist() == [6.0]
    assert attack_update(sent, trained, AttackConfig("backdoor", fraction=0.1)) is trained


def test_noise_is_seeded_and_has_the_asked_spread():
    trained = Params({"w": np.zeros(200_000, np.float32), "n": np.zeros(3, np.int32)})
    attack = AttackConfig("noise", fraction=0.1, sigma=2.0)
    out = attack_update(trained, trained, attack, np.random.default_rng(5))
    again = attack_update(trained, trained, attack, np.random.default_rng(5))
    other = attack_update(trained, trained, attack, np.random.default_rng(6))
    assert np.array_equal(out["w"], again["w"])
    assert not np.array_equal(out["w"], other["w"])
    assert out["w"].dtype == np.float32
    assert not out["n"].any()
    assert abs(float(out["w"].std()) - 2.0) < 0.02  # the std of 200,000 draws is within ~0.3% of sigma
    assert abs(float(out["w"].mean())) < 0.02


class EchoGrid:
    """Every client trains ``w -> w + 1`` and keeps an integer counter; evaluation answers loss 0.5."""

    def __init__(self) -> None:
        self.seen: list[Mapping[str, Message]] = []

    def client_ids(self) -> list[str]:
        return IDS[:3]

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        self.seen.append(messages)
        replies = {}
        for cid, message in messages.items():
            if message.kind == MessageKind.FIT:
                trained = Params({"w": message.params["w"] + 1, "count": np.array([7])})
                replies[cid] = Reply(FitResult(trained, 10, {"loss": 0.25}).to_message(), 0.5, 100, 200)
            else:
                replies[cid] = Reply(EvalResult(0.5, 4, {"accuracy": 1.0}).to_message())
        return hand_over(Exchange(replies), on_reply)


SENT = Params({"w": np.array([1.0, 3.0], np.float32)})


def attack_grid(seed: int = 0) -> AttackGrid:
    attackers = {
        "client-000": AttackConfig("scale", clients=("client-000",)),
        "client-001": AttackConfig("noise", clients=("client-001",), sigma=0.5),
    }
    return AttackGrid(EchoGrid(), attackers, seed=seed)


def fits(server_round: int) -> dict[str, Message]:
    return {cid: fit_message(server_round, SENT, FIT) for cid in IDS[:3]}


def test_the_grid_rewrites_attackers_fit_replies_and_nothing_else():
    grid = attack_grid()
    assert grid.client_ids() == IDS[:3]
    exchange = grid.send_and_receive(fits(1))
    scaled = exchange.replies["client-000"]
    # w: sent [1, 3], trained [2, 4]: 1 + -10 * 1 = -9, 3 + -10 * 1 = -7.
    assert scaled.message.params["w"].tolist() == [-9.0, -7.0]
    assert scaled.message.params["count"].tolist() == [7]
    assert FitResult.from_message(scaled.message).metrics == {"loss": 0.25}
    assert (scaled.seconds, scaled.bytes_down, scaled.bytes_up) == (0.5, 100, 200)
    noisy = exchange.replies["client-001"].message.params["w"]
    assert noisy.dtype == np.float32
    assert not np.array_equal(noisy, [2.0, 4.0])
    assert exchange.replies["client-002"].message.params["w"].tolist() == [2.0, 4.0]  # an honest client


def test_noise_depends_on_seed_round_and_client_alone():
    first = attack_grid(seed=1).send_and_receive(fits(1)).replies["client-001"].message.params["w"]
    alone = {"client-001": fit_message(1, SENT, FIT)}  # asked without the others: the same draw
    assert np.array_equal(attack_grid(seed=1).send_and_receive(alone).replies["client-001"].message.params["w"], first)
    later = attack_grid(seed=1).send_and_receive(fits(2)).replies["client-001"].message.params["w"]
    other = attack_grid(seed=2).send_and_receive(fits(1)).replies["client-001"].message.params["w"]
    assert not np.array_equal(later, first)
    assert not np.array_equal(other, first)


def test_attackers_answer_evaluation_honestly():
    inner = EchoGrid()
    grid = AttackGrid(inner, {"client-000": AttackConfig("scale", clients=("client-000",))})
    direct = EchoGrid().send_and_receive({"client-000": evaluate_message(1, SENT)})
    exchange = grid.send_and_receive({"client-000": evaluate_message(1, SENT)})
    assert exchange.replies["client-000"] == direct.replies["client-000"]
    assert inner.seen[0]["client-000"].kind == MessageKind.EVALUATE  # passed on as it was


def test_on_reply_sees_the_attacked_params_and_the_exchange_keeps_what_it_returns():
    seen: dict[str, list[float]] = {}

    def handler(cid: str, reply: Reply) -> Reply:
        seen[cid] = reply.message.params["w"].tolist()
        return dataclasses.replace(reply, seconds=9.0)

    exchange = attack_grid().send_and_receive(fits(1), on_reply=handler)
    assert seen["client-000"] == [-9.0, -7.0]
    assert seen["client-002"] == [2.0, 4.0]
    assert seen["client-001"] == exchange.replies["client-001"].message.params["w"].tolist()
    assert {r.seconds for r in exchange.replies.values()} == {9.0}


# ---------------------------------------------------------------------------------------------- end to end


def test_open_backend_poisons_wraps_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from fedloom.task import LogisticRegressionTask

    data = federation(np.arange(40.0).reshape(10, 4))
    config = SimulationConfig(
        backend=fl.BackendConfig(name="inline"),
        attacks=(AttackConfig("label_flip", clients=("a",)), AttackConfig("scale", clients=("b",))),
    )
    with (
        caplog.at_level(logging.INFO, logger="fedloom.run"),
        open_backend(SimulatedClients.of(LogisticRegressionTask(4, 10), data), config) as backend,
    ):
        assert isinstance(backend.grid, AttackGrid)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedloom.run"]
    assert lines[-1] == "2 of 3 clients attack: 1 label_flip, 1 scale (scale -10)"


@pytest.fixture(scope="module")
def digits_accuracy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The central accuracy of FedAvg on the digits job (20 clients, 3 rounds, inline), with and without 20%
    of the clients sending their updates scaled by -10."""
    job = fl.load_job("digits")
    base = dataclasses.replace(job.simulation, num_clients=20, rounds=3, backend=fl.BackendConfig(name="inline"))
    runs = tmp_path_factory.mktemp("attack_runs")
    accuracy = {}
    for name, attacks in (("clean", ()), ("scaled", (AttackConfig("scale", fraction=0.2, scale=-10.0),))):
        run = fl.simulate(job, simulation=dataclasses.replace(base, attacks=attacks), runs_dir=runs)
        accuracy[name] = run.final_metrics["central_accuracy"]
    return accuracy


@pytest.mark.integration  # two digits runs trained to an accuracy
def test_fedavg_with_scaling_attackers_ends_far_less_accurate(digits_accuracy: dict[str, float]) -> None:
    # 4 of 20 clients sending -10 times their update turn the average step around: 16/20 - 4 * 10/20 = -1.2.
    assert digits_accuracy["clean"] > 0.8
    assert digits_accuracy["scaled"] < digits_accuracy["clean"] - 0.4


# ---------------------------------------------------------------------------------------------- the CLI


def test_parse_attack_reads_kind_fraction_and_options():
    assert parse_attack("scale:0.2:scale=-10") == AttackConfig("scale", fraction=0.2, scale=-10.0)
    assert parse_attack("noise:0.1:sigma=2") == AttackConfig("noise", fraction=0.1, sigma=2.0)
    assert parse_attack(" label_flip : 0.3 ") == AttackConfig("label_flip", fraction=0.3)
    assert parse_attack("backdoor:0:clients=client-001+client-002,target_label=7,boost=3") == AttackConfig(
        "backdoor", clients=("client-001", "client-002"), target_label=7, boost=3.0
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("scale", r"--attack takes KIND:FRACTION\[:KEY=VALUE,...\], got 'scale'"),
        ("scale:lots", "--attack 'scale:lots': the fraction 'lots' is not a number"),
        ("scale:0.2:size=3", "'size=3' is not KEY=VALUE with KEY one of scale, boost, sigma"),
        ("scale:0.2:scale", "'scale' is not KEY=VALUE"),
        ("backdoor:0.2:trigger_size=2.5", "trigger_size must be a whole number, got '2.5'"),
        ("scale:0.2:sigma=3", "--attack 'scale:0.2:sigma=3': attack option sigma applies to kind noise"),
        ("sybil:0.2", "unknown attack kind 'sybil'"),
    ],
)
def test_parse_attack_refuses_bad_text_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_attack(spec)
    assert "\n" not in str(caught.value)


def fedloom_cli(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``fedloom ARGS`` in ``tmp_path``, offline (every proxy points at a closed port), started in the background."""
    beside = Path(sys.executable).with_name("fedloom")
    command = [str(beside)] if beside.is_file() else [sys.executable, "-c", "from fedloom.cli.main import main; main()"]
    env = {k: v for k, v in os.environ.items() if k not in ("FEDLOOM_DATA", "FORCE_COLOR")}
    env.update(FEDLOOM_CACHE=str(tmp_path / "cache"), COLUMNS="250", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    env.update(dict.fromkeys(("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"), "http://127.0.0.1:9"))
    return subprocess.Popen(
        [*command, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.integration
def test_the_attack_flag_runs_attackers_and_a_bad_spec_is_one_error_line(tmp_path: Path) -> None:
    small = ("simulate", "digits", "--clients", "5", "--rounds", "1", "--backend", "inline")
    good = fedloom_cli(tmp_path, *small, "--attack", "scale:0.2:scale=-10", "--attack", "noise:0.2", "--out", "runs")
    bad = fedloom_cli(tmp_path, *small, "--attack", "scale:0.2:scale=big", "--out", "runs_bad")
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    assert "2 of 5 clients attack: 1 scale (scale -10), 1 noise (sigma 1)" in out.splitlines()
    run_dir = next((tmp_path / "runs").iterdir())
    attacks = json.loads((run_dir / "summary.json").read_text())["config"]["simulation"]["attacks"]
    assert [(a["kind"], a["fraction"]) for a in attacks] == [("scale", 0.2), ("noise", 0.2)]
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert err.strip() == "error: --attack 'scale:0.2:scale=big': scale must be a number, got 'big'"
    assert not (tmp_path / "runs_bad").exists()
