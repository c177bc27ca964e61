"""Fed-Heart-Disease: FedAvg across the 4 hospitals against pooled and local training, all computed by fedloom.

    python benchmarks/heart_disease.py [--data DIR] [--seeds 5] [--rounds R]

FedAvg is the built-in ``heart_disease`` example job, run once per seed with ``fedloom.simulate``. Every model
is scored on each hospital's own test split, and the headline number is FLamby's: the unweighted mean over
the 4 hospitals of the per-hospital test accuracy. Two baselines use the same task, batch size and learning
rate, with the SGD step budget of the FedAvg run:

- pooled: one model trained on the union of the 4 train splits for as many steps as all clients take
  together over the whole FedAvg run (``rounds * sum_k steps_k``);
- local k: a model trained on hospital k's train split alone for as many steps as client k takes over the
  whole run (``rounds * steps_k``), scored on every hospital's test split, like FLamby's "Local k" rows.

Each row reports mean and standard deviation over the seeds (the seed drives the minibatch shuffling).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

import fedloom as fl
from fedloom.data import ArrayData, ClientData, federate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("FEDLOOM_DATA") or str(REPO.parent / "shared" / "data" / "heart_disease")


def per_center_accuracy(task: fl.Task, params: fl.Params, clients: Mapping[str, ClientData]) -> list[float]:
    """Test accuracy of ``params`` on each client's own test split, in client order."""
    return [task.evaluate(params, client.test).metrics["accuracy"] for client in clients.values()]


def steps_per_round(num_examples: int, fit: fl.FitConfig) -> int:
    """How many SGD steps a client with ``num_examples`` training examples takes in one round."""
    if fit.local_steps is not None:
        return fit.local_steps
    assert fit.local_epochs is not None
    return fit.local_epochs * math.ceil(num_examples / fit.batch_size)


def train(task: fl.Task, data: ArrayData, fit: fl.FitConfig, steps: int, seed: int) -> fl.Params:
    """Train from the task's initial params for exactly ``steps`` SGD steps with ``fit``'s batch size and lr."""
    config = replace(fit, local_epochs=None, local_steps=steps, seed=seed)
    return task.fit(task.init_params(seed), data, config).params


def fedavg(job: fl.Job, data_dir: str, rounds: int, seed: int, runs_dir: str) -> fl.Params:
    """Final global params of the job's FedAvg run; checks that every client took part in the last round."""
    run = fl.simulate(
        job, simulation=replace(job.simulation, seed=seed, rounds=rounds, data_dir=data_dir), runs_dir=runs_dir
    )
    for phase in ("fit", "evaluate"):
        ok = [c for c in run.history[-1].clients if c.phase == phase and c.status == "ok"]
        if len(ok) != job.simulation.num_clients:
            raise RuntimeError(f"seed {seed}: only {len(ok)} clients completed {phase} in the final round")
    return run.params


def summarize(rows: npt.NDArray[np.float64]) -> list[str]:
    """``mean ± std`` over seeds (axis 0) of each center's accuracy, then of the mean over centers."""
    table = np.concatenate([rows, rows.mean(axis=1, keepdims=True)], axis=1)
    return [f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(axis=0), table.std(axis=0), strict=True)]


def markdown_table(names: Sequence[str], results: Mapping[str, npt.NDArray[np.float64]]) -> str:
    header = ["model", *names, "mean over centers"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join([label, *summarize(rows)]) + " |" for label, rows in results.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    job = fl.load_job("heart_disease")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with the 4 processed.*.data files")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--rounds", type=int, default=job.simulation.rounds, help="FedAvg rounds")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    task, fit = job.task, job.strategy.fit
    dataset = job.load_data(args.data)
    # The natural partition does not depend on the seed: client k is hospital k with its own splits.
    clients = federate(dataset, job.simulation.num_clients, job.simulation.partition, seed=0).clients
    names = list(clients)
    own_steps = [args.rounds * steps_per_round(len(c.train), fit) for c in clients.values()]

    seeds = range(args.seeds)
    results: dict[str, list[list[float]]] = {"FedAvg": [], "pooled": [], **{f"local {n}": [] for n in names}}
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in seeds:
            params = fedavg(job, args.data, args.rounds, seed, runs_dir)
            results["FedAvg"].append(per_center_accuracy(task, params, clients))
            pooled = train(task, dataset.train, fit, sum(own_steps), seed)
            results["pooled"].append(per_center_accuracy(task, pooled, clients))
            for name, steps in zip(names, own_steps, strict=True):
                local = train(task, clients[name].train, fit, steps, seed)
                results[f"local {name}"].append(per_center_accuracy(task, local, clients))
    arrays = {label: np.array(rows) for label, rows in results.items()}
    elapsed = time.perf_counter() - started

    by_seed = arrays["FedAvg"].mean(axis=1)
    own = {name: arrays[f"local {name}"][:, k].mean() for k, name in enumerate(names)}
    print("$ python benchmarks/heart_disease.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"data: {args.data}; seeds 0-{args.seeds - 1}; {args.rounds} rounds")
    print(f"task: {task}")
    print(f"FedAvg fit: {fit}")
    print(
        f"SGD steps: {dict(zip(names, own_steps, strict=True))} per client (and local model); pooled {sum(own_steps)}"
    )
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    print()
    print("Test accuracy per center (mean ± std over seeds):")
    print()
    print(markdown_table(names, arrays))
    print()
    print("Local models on their own center: " + ", ".join(f"{n} {a:.3f}" for n, a in own.items()))
    print("FedAvg mean per-center accuracy by seed: " + ", ".join(f"{a:.3f}" for a in by_seed))
    print(f"FedAvg mean per-center accuracy: {by_seed.mean():.3f} ± {by_seed.std():.3f} (min {by_seed.min():.3f})")
    print(f"runtime: {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
