"""Simulation speed: fedloom's backends against Flower's Ray simulation and centralized PyTorch, one workload.

    python benchmarks/sim_vs_flower.py                      # N = 10, 100, 1000 clients, R = 5 rounds
    python benchmarks/sim_vs_flower.py --long               # adds R = 50 for N = 10 and 100
    python benchmarks/sim_vs_flower.py --clients 10,100 --backends inline --skip-flower --json out.json
    python benchmarks/sim_vs_flower.py --device cuda --backends vectorized      # on a GPU machine (Flower: CPU)

The workload, the same for every system: scikit-learn's digits, standardized with the train split's
statistics, a stratified 80/20 split (``fedloom.data.load_digits``, seed 0); the 1,437 training examples are
split over N clients with fedloom's Dirichlet(0.5) label partitioner; the MLP 64-32-10 from
``torch.manual_seed(0)``; FedAvg with every client in every round, 1 local epoch, batch 16, plain SGD at
lr 0.05; central evaluation on the test split after every round, no federated evaluation. The parent process
writes the data, each client's indices and the initial weights to one ``.npz`` that every system reads, and
client k's minibatch order in round r comes from ``np.random.default_rng(client_seed(r, k))`` in every
system (fedloom's ``minibatches``), so Flower and fedloom train the same model on the same batches.

Each system runs in its own subprocess: Flower 1.41 (``flwr.simulation.run_simulation`` with the Ray
backend, 1 CPU per client, so 2 Ray actors on a 2-core machine), fedloom with each backend asked for
(``fedloom.simulate``), and centralized PyTorch training taking the same total SGD steps on the pooled
training data (``R * sum_k ceil(n_k / 16)``). A subprocess times itself from just before it builds its
federation (after the interpreter started and imported its libraries) to the final test accuracy; the parent
also times the whole subprocess and samples the summed RSS of its process tree (Ray's processes included)
every 50 ms (RSS summed over processes counts shared libraries once per process). Per case it prints: wall
seconds; steady seconds per round (mean of rounds 2..R; a round is training, aggregation and central
evaluation); client updates per second (N * R / the rounds' sum, and N / the steady round); final test
accuracy; peak RSS; the subprocess's seconds including interpreter start and imports; then each fedloom
backend's ratios to Flower and to centralized training, and PASS/FAIL lines for the acceptance checks
(accuracy within 1 point of Flower's; at N = 100 and 1000 with R = 5 a wall at least 20x shorter than
Flower's; at N = 1000 steady updates/s at least 10x Flower's and a wall at most 1.5x centralized training's),
one per fedloom backend. Torch's lazily imported ``torch._dynamo`` (``torch.optim`` and ``torch.func`` load
it, 1.5-2 s) is imported before the timers; Flower's Ray actors, fresh processes, import it in round 1.
Flower runs in its own virtualenv (``benchmarks/.flower-venv``, made on first use from
``benchmarks/requirements-flower.txt``; ``--flower-python`` uses another interpreter), since flwr needs
protobuf 6 and fedloom protobuf 7.

At N = 1000 the 1,437 training examples leave some client empty in every Dirichlet draw; fedloom's
partitioner then tops up its last draw (each empty client takes a random example from the largest one), as
``fedloom.data.partition.dirichlet`` documents.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fedloom as fl
    from fedloom.core.results import fit_message
except ImportError:  # Flower's virtualenv has no fedloom: there this file only runs the Flower worker
    fl = None

HERE = Path(__file__).resolve().parent
FLOWER_VENV = HERE / ".flower-venv"
FLOWER_REQUIREMENTS = HERE / "requirements-flower.txt"
TORCH_PIN = "torch==2.13.0"  # installed first: the CPU wheel that fedloom's environment also uses
WORKLOAD_ENV = "SIM_VS_FLOWER_WORKLOAD"

SEED = 0
ALPHA = 0.5
BATCH_SIZE = 16
LR = 0.05
LOCAL_EPOCHS = 1
LONG_ROUNDS = 50
# Flower took about 13 s a round at N = 1000 on 2 cores, so 50 rounds there would add some 11 minutes; run them
# with --clients 1000 --rounds 50 when wanted.
LONG_CLIENTS = (10, 100)
RSS_INTERVAL = 0.05


def client_seed(server_round: int, client: int) -> int:
    """The shuffling seed of client ``client`` (0-based) in round ``server_round``, the same in every system."""
    return server_round * 1_000_000 + client


def batch_order(num_examples: int, seed: int, epochs: int = LOCAL_EPOCHS) -> list[np.ndarray]:
    """The example indices of each local SGD step: what ``fedloom.task.batching.minibatches`` gives for
    ``FitConfig(local_epochs=epochs, batch_size=BATCH_SIZE, seed=seed)``, written out for Flower's client,
    which cannot import fedloom (a self-test checks that the two agree)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        batches += [order[start : start + BATCH_SIZE] for start in range(0, num_examples, BATCH_SIZE)]
    return batches


def mlp() -> Any:
    """64 pixels -> 32 hidden units -> 10 digit logits."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# -- the workload ------------------------------------------------------------------------------------------


def make_workload(num_clients: int, path: Path) -> dict[str, Any]:
    """Write the data, each example's client and the initial weights to ``path``; return a description."""
    import torch

    from fedloom.data import load_digits
    from fedloom.data.partition import dirichlet

    dataset = load_digits(test_fraction=0.2, seed=SEED)
    labels = dataset.train.y
    rng = np.random.default_rng(SEED)
    owner = np.empty(len(labels), dtype=np.int64)
    for client, part in enumerate(dirichlet(labels, num_clients, ALPHA, rng)):
        owner[part] = client
    torch.manual_seed(SEED)
    initial = {f"init/{name}": t.detach().numpy().copy() for name, t in mlp().state_dict().items()}
    np.savez(
        path,
        x_train=dataset.train.x,
        y_train=dataset.train.y,
        x_test=dataset.test.x,
        y_test=dataset.test.y,
        owner=owner,
        num_clients=np.int64(num_clients),
        **initial,
    )
    sizes = np.bincount(owner, minlength=num_clients)
    return {
        "num_clients": num_clients,
        "train_examples": len(labels),
        "test_examples": len(dataset.test),
        "client_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "steps_per_round": int(sum(math.ceil(n / BATCH_SIZE) for n in sizes)),
    }


@dataclass(frozen=True)
class Workload:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    clients: list[np.ndarray]  # client k's training indices, ascending
    initial: dict[str, np.ndarray]  # the MLP's state dict under torch.manual_seed(SEED)

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        with np.load(path) as f:
            owner = f["owner"]
            num_clients = int(f["num_clients"])
            order = np.argsort(owner, kind="stable")
            clients = np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])
            initial = {key.removeprefix("init/"): f[key] for key in f.files if key.startswith("init/")}
            return cls(f["x_train"], f["y_train"], f["x_test"], f["y_test"], clients, initial)

    def steps_per_round(self) -> int:
        return sum(math.ceil(len(c) / BATCH_SIZE) for c in self.clients)


# -- fedloom ------------------------------------------------------------------------------------------------


def benchmark_data() -> Any:
    """The workload as a fedloom ``Dataset`` whose natural groups are the clients: group k is client k, so the
    natural partition gives client k (``client-000`` ...) exactly client k's indices, in the same order."""
    workload = Workload.load(os.environ[WORKLOAD_ENV])
    train_groups = np.empty(len(workload.y_train), dtype=np.int64)
    for client, indices in enumerate(workload.clients):
        train_groups[indices] = client
    return fl.data.Dataset(
        name="digits-dirichlet",
        train=fl.data.ArrayData(workload.x_train, workload.y_train),
        test=fl.data.ArrayData(workload.x_test, workload.y_test),
        num_classes=10,
        train_groups=train_groups,
        # Client 0 holds the test rows too; nothing reads them, as there is no federated evaluation.
        test_groups=np.zeros(len(workload.y_test), dtype=np.int64),
    )


if fl is not None:
    from dataclasses import replace

    @dataclass(frozen=True)
    class SeededFedAvg(fl.FedAvg):
        """FedAvg whose client k shuffles with ``client_seed(round, k)``, as Flower's client does here."""

        def configure_fit(self, server_round: int, state: Any, clients: Sequence[str], rng: Any) -> dict[str, Any]:
            return {
                cid: fit_message(server_round, state.params, replace(self.fit, seed=client_seed(server_round, k)))
                for k, cid in enumerate(clients)
            }


def __getattr__(name: str) -> Any:
    # ``fl.load_job(this file)`` reads ``job``; it is built on demand for the workload in $SIM_VS_FLOWER_WORKLOAD,
    # so this file is a fedloom job file that worker processes can import (and it still runs without fedloom).
    if name != "job":
        raise AttributeError(name)
    with np.load(os.environ[WORKLOAD_ENV]) as f:
        num_clients = int(f["num_clients"])
    return fl.Job(
        name="sim-vs-flower",
        task=fl.TorchTask(model=mlp, loss="cross_entropy", optimizer="sgd"),
        data=benchmark_data,
        strategy=SeededFedAvg(
            fraction=1.0,
            min_clients=num_clients,
            fraction_evaluate=0.0,
            fit=fl.FitConfig(local_epochs=LOCAL_EPOCHS, batch_size=BATCH_SIZE, lr=LR),
        ),
    )


def import_torch() -> Any:
    """Import torch for a worker, on one thread, with the modules it loads lazily on first use.

    ``torch.optim`` (the first optimizer) and ``torch.func`` (the first ``vmap``) import ``torch._dynamo``,
    about 1.5-2 s; every worker imports it before its timer starts, as imports are not part of the timed run.
    Flower's Ray actors still import it in round 1 (each is a fresh process), as every Flower app's do.
    """
    import torch
    import torch._dynamo

    torch.set_num_threads(1)
    return torch


def run_fedloom(workload_path: str, rounds: int, backend: str, device: str) -> dict[str, Any]:
    import_torch()
    os.environ[WORKLOAD_ENV] = workload_path
    job = fl.load_job(__file__)
    workload = Workload.load(workload_path)
    initial = job.task.init_params(SEED)
    if any(not np.array_equal(initial[k], v) for k, v in workload.initial.items()):
        raise RuntimeError("fedloom's initial weights differ from the workload's")
    simulation = fl.SimulationConfig(
        num_clients=len(workload.clients),
        rounds=rounds,
        seed=SEED,
        holdout=0.0,
        partition=fl.PartitionConfig(scheme="natural"),
        backend=fl.BackendConfig(name=backend, device=None if device == "cpu" else device),
    )
    with tempfile.TemporaryDirectory() as runs_dir:
        started = time.perf_counter()
        ends = _RoundEnds()
        run = fl.simulate(job, simulation=simulation, runs_dir=runs_dir, observers=[ends])
        wall = time.perf_counter() - started
    trained = [c for c in run.history[-1].clients if c.phase == "fit" and c.status == "ok"]
    if len(trained) != len(workload.clients):
        raise RuntimeError(f"only {len(trained)} of {len(workload.clients)} clients trained in the last round")
    return {
        "wall": wall,
        # Round r > 1 runs from the end of round r - 1 to its own end, including the run store's writes (which
        # RoundRecord.seconds leaves out), as Flower's rounds are timed from one central evaluation to the next.
        "rounds": [run.history[0].seconds, *np.diff(ends.times).tolist()],
        "accuracy": run.final_metrics["central_accuracy"],
        "loss_by_round": [r.metrics["central_loss"] for r in run.history],
        "backend_used": getattr(run, "backend", "inline"),
    }


class _RoundEnds:
    """A round observer that notes when each round ended, after the run store has recorded it."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_round(self, record: Any, params: Any) -> None:
        self.times.append(time.perf_counter())


# -- centralized --------------------------------------------------------------------------------------------


def run_central(workload_path: str, rounds: int, device: str) -> dict[str, Any]:
    """Plain PyTorch on the pooled training data, as many SGD steps as the whole federation takes, on
    ``device`` (the same device the fedloom runs use)."""
    import torch.nn.functional as F

    torch = import_torch()
    started = time.perf_counter()
    workload = Workload.load(workload_path)
    steps = rounds * workload.steps_per_round()
    model = mlp()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in workload.initial.items()})
    model.to(device)
    x, y = torch.from_numpy(workload.x_train).to(device), torch.from_numpy(workload.y_train).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rng = np.random.default_rng(SEED)
    done = 0
    model.train()
    while done < steps:
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), BATCH_SIZE):
            if done == steps:
                break
            batch = order[start : start + BATCH_SIZE].to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            done += 1
    accuracy, _ = evaluate(model.cpu(), workload)
    return {"wall": time.perf_counter() - started, "rounds": [], "accuracy": accuracy, "steps": steps}


def evaluate(model: Any, workload: Workload) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy, as fedloom's central evaluation computes them."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(workload.x_test))
        y = torch.from_numpy(workload.y_test)
        loss = F.cross_entropy(logits, y, reduction="sum").item() / len(y)
        return float((logits.argmax(dim=1) == y).double().mean()), loss


# -- Flower -------------------------------------------------------------------------------------------------

_FLOWER_CACHE: dict[str, Any] = {}


def flower_train(msg: Any, context: Any) -> Any:
    """Flower ``ClientApp`` train function: one local epoch of plain SGD on client ``partition-id``'s data.

    It runs in Flower's Ray actors, which import this module by name and keep the workload and the model
    between calls, as a Flower app's task module would (``_FLOWER_CACHE``).
    """
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    path = str(config["workload"])
    if _FLOWER_CACHE.get("path") != path:
        torch.set_num_threads(1)
        workload = Workload.load(path)
        _FLOWER_CACHE.update(
            path=path,
            workload=workload,
            x=torch.from_numpy(workload.x_train),
            y=torch.from_numpy(workload.y_train),
            model=mlp(),
        )
    workload, x, y, model = (_FLOWER_CACHE[k] for k in ("workload", "x", "y", "model"))
    client = int(context.node_config["partition-id"])
    server_round = int(config["server-round"])
    indices = workload.clients[client]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    x_own, y_own = x[indices], y[indices]
    for batch in batch_order(len(indices), client_seed(server_round, client)):
        index = torch.from_numpy(batch)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_own[index]), y_own[index]).backward()
        optimizer.step()
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(indices)})}
    )
    return Message(content=content, reply_to=msg)


def run_flower(workload_path: str, rounds: int) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    # Ray's actors pickle flower_train by reference to this module, so import it by its name, not as __main__.
    sys.path.insert(0, str(HERE))
    import sim_vs_flower as bench

    torch = import_torch()
    with np.load(workload_path) as f:
        num_clients = int(f["num_clients"])
    evaluations: list[tuple[int, float, float, float]] = []  # (round, perf_counter after it, accuracy, loss)

    client_app = ClientApp()
    client_app.train()(bench.flower_train)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        workload = Workload.load(workload_path)
        model = mlp()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in workload.initial.items()})

        def evaluate_central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy, loss = evaluate(model, workload)
            evaluations.append((server_round, time.perf_counter(), accuracy, loss))
            return MetricRecord({"accuracy": accuracy})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"workload": workload_path}),
            evaluate_fn=evaluate_central,
        )

    # A Ray of its own (its own temporary folder), apart from any other Ray on a shared machine.
    ray_dir = tempfile.mkdtemp(prefix="svf-ray-")
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"_temp_dir": ray_dir}},
    )
    returned = time.perf_counter()
    shutil.rmtree(ray_dir, ignore_errors=True)
    if [e[0] for e in evaluations] != list(range(rounds + 1)):
        raise RuntimeError(f"Flower evaluated rounds {[e[0] for e in evaluations]}, expected 0..{rounds}")
    times = [e[1] for e in evaluations]
    return {
        "wall": times[-1] - started,
        "wall_with_shutdown": returned - started,
        "rounds": list(np.diff(times)),
        "accuracy": evaluations[-1][2],
        "loss_by_round": [e[3] for e in evaluations[1:]],
    }


# -- the parent: run each system in its own process tree ----------------------------------------------------


@dataclass
class Outcome:
    system: str
    report: dict[str, Any] | None
    process_wall: float
    peak_rss: int
    error: str | None = None

    def metric(self, name: str) -> float | None:
        if self.report is None:
            return None
        rounds = self.report["rounds"]
        n = self.report["num_clients"]
        if name == "wall":
            return float(self.report["wall"])
        if name == "accuracy":
            return float(self.report["accuracy"])
        if not rounds:
            return None
        steady = rounds[1:] or rounds
        if name == "steady_round":
            return float(np.mean(steady))
        if name == "updates":
            return n * len(rounds) / float(np.sum(rounds))
        if name == "steady_updates":
            return n / float(np.mean(steady))
        raise KeyError(name)


def _tree_rss(root: Any, seen: dict[int, float]) -> int:
    """The summed RSS of ``root`` and its descendants; records each one's pid and start time in ``seen``."""
    import psutil

    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
            seen.setdefault(process.pid, process.create_time())
        except psutil.Error:
            pass
    return total


def run_worker(system: str, argv: list[str], python: str, log_path: Path, timeout: float) -> Outcome:
    """Run this file as a worker under ``python``, sampling its process tree's RSS; read its JSON report."""
    import psutil

    report_path = log_path.with_suffix(".json")
    command = [python, str(Path(__file__).resolve()), *argv, "--report", str(report_path)]
    env = dict(os.environ, FLWR_LOG_LEVEL="WARNING", FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    peak = 0
    seen: dict[int, float] = {}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        root = psutil.Process(child.pid)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss(root, seen))
                stop.wait(RSS_INTERVAL)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        finally:
            stop.set()
            sampler.join()
    process_wall = time.perf_counter() - started
    seen.pop(child.pid, None)
    _end_leftovers(seen)
    if code != 0 or not report_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        why = f"timed out after {timeout:.0f} s" if code == -9 else f"exit {code}: {tail[0][:160]}"
        return Outcome(system, None, process_wall, peak, why)
    return Outcome(system, json.loads(report_path.read_text()), process_wall, peak)


def _end_leftovers(seen: dict[int, float]) -> None:
    """Stop processes of a finished worker's tree that outlived it (a Ray that was not shut down); a pid is
    only trusted together with its start time, as an exited process's pid may now be someone else's."""
    import psutil

    for pid, started in sorted(seen.items()):
        try:
            process = psutil.Process(pid)
            if process.create_time() != started:
                continue
            process.terminate()
            process.wait(3)
        except psutil.TimeoutExpired:
            process.kill()
        except psutil.Error:
            pass


def flower_python(given: str | None) -> str:
    """The interpreter for Flower's worker: ``given``, or the benchmark's own virtualenv (made on first use)."""
    if given:
        return given
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating Flower's virtualenv in {FLOWER_VENV} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, "-r", str(FLOWER_REQUIREMENTS)], check=True)
    return str(python)


def self_test() -> None:
    """The Flower client's batch order is fedloom's; the workload's init is fedloom's TorchTask init."""
    from fedloom.task.batching import minibatches

    for n, seed in ((1, 3), (16, 0), (37, client_seed(5, 999))):
        ours = batch_order(n, seed)
        theirs = list(minibatches(n, fl.FitConfig(local_epochs=LOCAL_EPOCHS, batch_size=BATCH_SIZE, seed=seed)))
        if len(ours) != len(theirs) or not all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)):
            raise RuntimeError(f"Flower's batch order differs from fedloom's minibatches (n={n}, seed={seed})")


# -- report -------------------------------------------------------------------------------------------------

COLUMNS = (
    ("system", "{}"),
    ("wall s", "{:.2f}"),
    ("steady s/round", "{:.3f}"),
    ("updates/s", "{:.0f}"),
    ("steady updates/s", "{:.0f}"),
    ("accuracy", "{:.4f}"),
    ("peak RSS MiB", "{:.0f}"),
    ("process s", "{:.1f}"),
)


def _row(outcome: Outcome) -> list[str]:
    if outcome.error is not None:
        return [outcome.system, f"failed: {outcome.error}"]
    values = [outcome.metric(name) for name in ("wall", "steady_round", "updates", "steady_updates", "accuracy")] + [
        outcome.peak_rss / 2**20,
        outcome.process_wall,
    ]
    cells = [outcome.system]
    for (_, fmt), value in zip(COLUMNS[1:], values, strict=True):
        cells.append("-" if value is None else fmt.format(value))
    return cells


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [[name for name, _ in COLUMNS], *(_row(o) for o in outcomes)]
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) == len(COLUMNS)) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        if len(row) != len(COLUMNS):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
            continue
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def comparisons(num_clients: int, rounds: int, outcomes: Sequence[Outcome]) -> tuple[list[str], list[str]]:
    """Ratio lines and acceptance lines for one (N, R) case."""
    by_name = {o.system: o for o in outcomes}
    flower, central = by_name.get("flower"), by_name.get("centralized")
    ratios: list[str] = []
    checks: list[str] = []
    for outcome in outcomes:
        if not outcome.system.startswith("fedloom") or outcome.error is not None:
            continue
        name = outcome.system
        wall = outcome.metric("wall")
        parts = []
        if flower is not None and flower.error is None:
            speedup = _ratio(flower.metric("wall"), wall)
            steady = _ratio(outcome.metric("steady_updates"), flower.metric("steady_updates"))
            gap = abs(outcome.metric("accuracy") - flower.metric("accuracy"))  # type: ignore[operator]
            parts.append(f"wall {speedup:.1f}x faster than Flower")
            if steady is not None:
                parts.append(f"steady updates/s {steady:.1f}x Flower's")
            parts.append(f"accuracy {100 * gap:.2f} points from Flower's")
            losses = [outcome.report["loss_by_round"], flower.report["loss_by_round"]]  # type: ignore[index]
            if len(losses[0]) == len(losses[1]):
                parts.append(f"test loss per round at most {np.max(np.abs(np.subtract(*losses))):.1e} from Flower's")
            checks.append(_check(gap <= 0.01, f"N={num_clients} R={rounds} {name}: accuracy within 1 point of Flower"))
            if num_clients in (100, 1000) and rounds == 5:
                checks.append(
                    _check(speedup >= 20, f"N={num_clients} R=5 {name}: end-to-end >= 20x faster than Flower")
                )
            if num_clients == 1000 and steady is not None:
                checks.append(_check(steady >= 10, f"N=1000 R={rounds} {name}: steady updates/s >= 10x Flower's"))
        if central is not None and central.error is None:
            to_central = _ratio(wall, central.metric("wall"))
            parts.append(f"wall {to_central:.2f}x centralized")
            if num_clients == 1000:
                checks.append(
                    _check(to_central <= 1.5, f"N=1000 R={rounds} {name}: wall <= 1.5x centralized training")  # type: ignore[operator]
                )
        ratios.append(f"  {name}: " + "; ".join(parts))
    return ratios, checks


def _check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


# -- main ---------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _worker_main(args: argparse.Namespace) -> int:
    if args.worker == "flower":
        report = run_flower(args.workload, args.rounds)
    elif args.worker == "central":
        report = run_central(args.workload, args.rounds, args.device)
    else:
        report = run_fedloom(args.workload, args.rounds, args.backend, args.device)
    with np.load(args.workload) as f:
        report["num_clients"] = int(f["num_clients"])
    Path(args.report).write_text(json.dumps(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=_ints, default=[10, 100, 1000], help="client counts (default 10,100,1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every case (default 5)")
    parser.add_argument("--long", action="store_true", help=f"also {LONG_ROUNDS} rounds for N in {LONG_CLIENTS}")
    parser.add_argument(
        "--backends",
        default="auto,inline,vectorized,process",
        help="fedloom backends (auto,inline,vectorized,process,ray); auto is what a user gets by default",
    )
    parser.add_argument("--skip-flower", action="store_true", help="leave Flower out")
    parser.add_argument("--flower-python", help="a Python with flwr[simulation]==1.41.0 and torch (default: own venv)")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument(
        "--device", default="cpu", help="torch device of fedloom and centralized training (cuda on a GPU machine)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per system run (default 3600)")
    parser.add_argument("--worker", choices=("fedloom", "flower", "central"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args)

    self_test()
    backends = [b for b in args.backends.split(",") if b]
    cases = [(n, args.rounds) for n in args.clients]
    if args.long:
        cases += [(n, LONG_ROUNDS) for n in LONG_CLIENTS if (n, LONG_ROUNDS) not in cases]
    flower = None if args.skip_flower else flower_python(args.flower_python)
    print("$ python benchmarks/sim_vs_flower.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(_machine(flower))
    print(
        f"workload: digits 80/20, Dirichlet({ALPHA}) over N clients, MLP 64-32-10, FedAvg all clients, "
        f"{LOCAL_EPOCHS} epoch, batch {BATCH_SIZE}, SGD lr {LR}, seed {SEED}",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    all_checks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sim-vs-flower-") as tmp:
        workloads: dict[int, dict[str, Any]] = {}
        for num_clients, rounds in cases:
            path = Path(tmp) / f"workload-{num_clients}.npz"
            if num_clients not in workloads:
                workloads[num_clients] = make_workload(num_clients, path)
            info = workloads[num_clients]
            print(
                f"\n== N={num_clients}, R={rounds}: client sizes {info['client_sizes']}, "
                f"{info['steps_per_round']} SGD steps per round",
                flush=True,
            )
            common = ["--workload", str(path), "--rounds", str(rounds), "--device", args.device]
            runs: list[tuple[str, list[str], str]] = [("centralized", ["--worker", "central"], sys.executable)]
            runs += [(f"fedloom {b}", ["--worker", "fedloom", "--backend", b], sys.executable) for b in backends]
            if flower is not None:
                runs.append(("flower", ["--worker", "flower"], flower))
            outcomes = []
            for system, extra, python in runs:
                print(f"  running {system} ...", end=" ", flush=True)
                log = Path(tmp) / f"{system.replace(' ', '-')}-{num_clients}-{rounds}.log"
                outcome = run_worker(system, [*extra, *common], python, log, args.timeout)
                status = outcome.error or f"{outcome.report['wall']:.2f} s"  # type: ignore[index]
                print(f"{status} (process {outcome.process_wall:.1f} s)", flush=True)
                outcomes.append(outcome)
            print()
            print(table(outcomes))
            ratios, checks = comparisons(num_clients, rounds, outcomes)
            print("\n".join(ratios))
            for outcome in outcomes:
                report = outcome.report or {}
                if report.get("backend_used") not in (None, outcome.system.split()[-1]):
                    print(f"  note: {outcome.system} ran on the {report['backend_used']} backend")
                if "wall_with_shutdown" in report:
                    print(
                        f"  note: flower's round 1 ({report['rounds'][0]:.1f} s) includes starting Ray and its "
                        f"actors; shutting Ray down after the last round takes "
                        f"{report['wall_with_shutdown'] - report['wall']:.1f} s more (not in its wall)"
                    )
            all_checks += checks
            results.append(
                {
                    "num_clients": num_clients,
                    "rounds": rounds,
                    "workload": info,
                    "systems": {
                        o.system: {
                            "error": o.error,
                            "process_wall": o.process_wall,
                            "peak_rss_bytes": o.peak_rss,
                            **(o.report or {}),
                        }
                        for o in outcomes
                    },
                }
            )
    print("\nacceptance:")
    print("\n".join(all_checks) if all_checks else "  (nothing to check: Flower or fedloom missing)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": _machine(flower), "cases": results}, indent=2))
    return 0


def _machine(flower: str | None) -> str:
    import torch

    versions = f"Python {platform.python_version()}, torch {torch.__version__}, fedloom {fl.__version__}"
    if flower is not None:
        probe = "import flwr, ray; print(flwr.__version__, ray.__version__)"
        out = subprocess.run([flower, "-c", probe], capture_output=True, text=True, check=False).stdout.split()
        if len(out) == 2:
            versions += f", flwr {out[0]} with ray {out[1]} (own venv)"
    return f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; {versions}"


if __name__ == "__main__":
    sys.exit(main())
