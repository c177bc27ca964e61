"""The privacy ledger: one hash-chained record per update a run used, and every kind of tampering caught."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import fedloom as fl
from fedloom.core import EvalResult, FitConfig, FitResult, Params
from fedloom.core.checkpoint import checkpoint_metadata
from fedloom.core.message import MessageKind
from fedloom.data.base import ArrayData, ClientData, FederatedData
from fedloom.privacy import DPFedAvg
from fedloom.privacy.ledger import LEDGER_FILE, LedgerError, chain, fit_digest, genesis, update_digest, verify
from fedloom.runtime import ClientStatus, InlineGrid, SimulatedClients, run_async, run_rounds
from fedloom.strategy import FedAvg, FedBuff
from fedloom.tracking import RunStore
from fedloom.tracking.recorder import LEDGER_HEAD_KEY, checkpoint_path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> fl.Run:
    """Digits, 4 clients, 3 rounds of DP-FedAvg (every client sampled: q = 1), in a runs folder of its own."""
    job = fl.load_job("digits")
    dp = DPFedAvg(FedAvg(fit=replace(job.strategy.fit, local_epochs=1)), num_clients=4, noise_multiplier=1.0, delta=0.1)
    simulation = replace(job.simulation, num_clients=4, rounds=3, seed=1)
    return fl.simulate(replace(job, strategy=dp), simulation=simulation, runs_dir=tmp_path_factory.mktemp("runs"))


def heads(run: fl.Run) -> dict[int, str]:
    return {r: checkpoint_metadata(checkpoint_path(run.run_dir, r))[LEDGER_HEAD_KEY] for r in (1, 2, 3)}


def tampered(run: fl.Run, tmp_path: Path, edit) -> Path:
    lines = (run.run_dir / LEDGER_FILE).read_text().splitlines()
    path = tmp_path / LEDGER_FILE
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def test_every_used_update_is_recorded_with_its_privacy(run: fl.Run):
    report = verify(run.run_dir / LEDGER_FILE, run.run_id, heads(run))
    used = sum(1 for r in run.history for c in r.clients if c.phase == "fit" and c.status == "ok")
    assert (report.records, report.rounds) == (used, 3)
    records = [json.loads(line) for line in (run.run_dir / LEDGER_FILE).read_text().splitlines()]
    assert [r["round"] for r in records] == sorted(r["round"] for r in records)
    last = records[-1]
    assert last["noise_multiplier"] == 1.0
    assert last["delta"] == 0.1
    assert last["epsilon"] == pytest.approx(run.history[-1].metrics["epsilon"])
    assert last["clip_norm"] == run.history[-1].metrics["dp_clip"]
    digests = {c.update_sha256 for r in run.history for c in r.clients if c.update_sha256}
    assert {r["update_sha256"] for r in records} == digests


def test_an_edited_record_is_caught(run: fl.Run, tmp_path: Path):
    def edit(lines: list[str]) -> list[str]:
        record = json.loads(lines[1])
        record["num_examples"] += 1
        return [lines[0], json.dumps(record), *lines[2:]]

    with pytest.raises(LedgerError, match="line 2: its hash does not match its contents"):
        verify(tampered(run, tmp_path, edit), run.run_id)


def test_an_edited_record_with_its_hash_made_again_breaks_the_chain_after_it(run: fl.Run, tmp_path: Path):
    def edit(lines: list[str]) -> list[str]:
        record = json.loads(lines[1])
        record["epsilon"] = 0.01
        (remade,), _ = chain(record["prev"], [record])
        return [lines[0], json.dumps(remade), *lines[2:]]

    with pytest.raises(LedgerError, match="line 3: does not chain to the record before it"):
        verify(tampered(run, tmp_path, edit), run.run_id)


def test_removed_records_and_another_runs_ledger_are_caught(run: fl.Run, tmp_path: Path):
    with pytest.raises(LedgerError, match="line 2: does not chain"):
        verify(tampered(run, tmp_path, lambda lines: [lines[0], *lines[2:]]), run.run_id)
    with pytest.raises(LedgerError, match="line 1: does not chain"):
        verify(run.run_dir / LEDGER_FILE, "another-run")


def test_records_cut_off_the_end_are_caught_by_the_checkpoints(run: fl.Run, tmp_path: Path):
    last_round = [json.loads(line)["round"] for line in (run.run_dir / LEDGER_FILE).read_text().splitlines()]
    keep = last_round.index(3)
    path = tampered(run, tmp_path, lambda lines: lines[:keep])
    verify(path, run.run_id)  # the chain alone is intact
    with pytest.raises(LedgerError, match="end of round 3 is not what that round's checkpoint recorded"):
        verify(path, run.run_id, heads(run))


def test_the_digest_covers_names_dtypes_shapes_and_values():
    base = Params({"w": np.arange(4, dtype=np.float32)})
    assert update_digest(base) == update_digest(Params({"w": np.arange(4, dtype=np.float32)}))
    for other in (
        Params({"v": np.arange(4, dtype=np.float32)}),
        Params({"w": np.arange(4, dtype=np.float64)}),
        Params({"w": np.arange(4, dtype=np.float32).reshape(2, 2)}),
        Params({"w": np.array([0, 1, 2, 3.5], dtype=np.float32)}),
    ):
        assert update_digest(other) != update_digest(base)
    assert genesis("a") != genesis("b")


def test_the_digest_is_pinned_and_independent_of_byte_order():
    update = Params({"w": np.arange(4, dtype=np.float32), "b": np.array([1.5, -2.0])})
    assert update_digest(update) == "0502fb08bfc9c406665c24c64021b6d8e7f44021b3fa200d440fbaed71b16798"
    assert update_digest(Params({"w": np.arange(4, dtype=">f4")})) == update_digest(
        Params({"w": np.arange(4, dtype="<f4")})
    )
    assert fit_digest(FitResult(update, 3, {"loss": 1.0})) == update_digest(update)


class MeanTask:
    """Fit adds the mean of the client's rows to the model: an update that differs by client and by round."""

    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(1)})

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult:
        return FitResult(Params({"w": params["w"] / 2 + data.x.mean() + 0.1}), len(data))

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        return EvalResult(0.0, len(data))


class SpyGrid:
    """A grid that notes the digest of every fit update as it arrives, before the loop folds it."""

    def __init__(self, grid: InlineGrid) -> None:
        self.grid = grid
        self.sent: list[str] = []

    def client_ids(self):
        return self.grid.client_ids()

    def send_and_receive(self, messages, timeout=None, on_reply=None):
        def spy(client_id, reply):
            if reply.message.kind == MessageKind.FIT_RESULT:
                self.sent.append(update_digest(reply.message.params))
            return reply if on_reply is None else on_reply(client_id, reply)

        return self.grid.send_and_receive(messages, timeout, spy)


@pytest.mark.parametrize("loop", ["synchronous", "asynchronous"])
def test_both_loops_record_the_digest_of_what_each_client_sent(loop: str):
    """FedAvg folds each update as it comes and lets its arrays go; the digest the ledger writes at round end
    is still that of the update the client sent."""
    clients = {f"c{i}": ClientData(ArrayData(np.full(i + 1, float(i)), np.zeros(i + 1)), None) for i in range(4)}
    grid = SpyGrid(InlineGrid(SimulatedClients.of(MeanTask(), FederatedData(clients, None, num_classes=1))))
    if loop == "synchronous":
        strategy = FedAvg(fraction_evaluate=0.0)
        result = run_rounds(strategy=strategy, grid=grid, initial_params=Params({"w": np.zeros(1)}), rounds=2, seed=0)
    else:
        strategy = FedBuff(buffer_size=2, concurrency=2, fraction_evaluate=0.0)
        result = run_async(strategy=strategy, grid=grid, initial_params=Params({"w": np.zeros(1)}), rounds=3, seed=0)
    recorded = [
        digest
        for r in result.history
        for c in r.clients
        if c.phase == "fit" and c.status == ClientStatus.OK
        for digest in (c.update_sha256 or "").split(",")
    ]
    assert len(set(recorded)) > 1
    if loop == "synchronous":
        assert len(set(recorded)) == len(recorded)  # each client once a round, on a model that moved: all differ
        assert sorted(recorded) == sorted(grid.sent)
    else:
        # The replies still in flight when the run ends are sent, never recorded. A client that FedBuff starts
        # again before the model moves (which the threads' timing decides) sends the same update again, and each
        # sending is recorded: every digest is recorded at most as often as it was sent.
        assert not Counter(recorded) - Counter(grid.sent)


@pytest.mark.integration
def test_fedloom_ledger_verify(run: fl.Run, tmp_path: Path):
    code = "from fedloom.cli.main import main; main()"
    runs = str(run.run_dir.parent)

    def ledger(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", code, "ledger", "verify", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    done = ledger(run.run_id, "--runs", runs)
    assert done.returncode == 0, done.stderr
    assert f"ledger of run {run.run_id}: " in done.stdout
    assert "intact (checked against 3 checkpoints)" in done.stdout
    path = run.run_dir / LEDGER_FILE
    original = path.read_text()
    try:
        path.write_text(original.replace('"num_examples": ', '"num_examples": 1', 1))
        broken = ledger(run.run_id, "--runs", runs)
        assert broken.returncode == 2
        assert broken.stderr.strip().endswith("line 1: its hash does not match its contents (edited?)")
    finally:
        path.write_text(original)
    assert RunStore(runs).info(run.run_id).status == "finished"
