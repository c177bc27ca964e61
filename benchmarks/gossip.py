"""Decentralized FL (gossip averaging, no server) against centralized FedAvg on the same data, seed and budget.

    python benchmarks/gossip.py [--clients 20] [--rounds 30] [--degree 4] [--seeds 3]

The ``digits`` job (its MLP, 5 local epochs of batch 16 at learning rate 0.1 per round) over 20 clients with
Dirichlet(0.5) label skew, every client training every round, for 30 rounds: gossip on a ring, a random
4-regular graph and a fully connected graph, and FedAvg with a server (``fl.simulate``, inline backend). Both
kinds of run use the same partition, the same initial model and the same local training; they differ in how
models are combined. Columns:

- mean client accuracy: the unweighted mean over clients of each client's model on its own test split
  (FedAvg: the global model on each client's test split);
- central accuracy: the average of the clients' models (FedAvg: the global model) on the digits test set;
- consensus distance: the mean over clients of ``||x_i - x_mean||^2`` after the last round (FedAvg: 0, one model);
- spectral gap of the Metropolis-Hastings mixing matrix (how fast gossip mixes; 1 = exact average each round);
- seconds: wall time of the whole run, writing its run store and checkpoints included (every run is recorded).

Every number is the mean ± std over seeds 0..N-1; a seed fixes the partition, the initial model, the local
training's shuffling and the random graph.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

import fedloom as fl
from fedloom.app.simulation import load_federation
from fedloom.core import PartitionConfig
from fedloom.data.base import Federation


def client_accuracy(job: fl.Job, data: Federation, params: fl.Params) -> float:
    """The unweighted mean over clients of ``params``' accuracy on each client's own test split."""
    scores = []
    for cid in data.client_ids:
        test = data.clients[cid].test
        if len(test):
            scores.append(job.task.evaluate(params, test).metrics["accuracy"])
    return float(np.mean(scores))


def one_seed(job: fl.Job, simulation: fl.SimulationConfig, degree: int) -> dict[str, list[float]]:
    """Each run's numbers for one seed: client accuracy, central accuracy, consensus distance, gap, seconds."""
    data, _ = load_federation(job, simulation)
    rows: dict[str, list[float]] = {}
    for topology, chosen in (("ring", None), ("regular", degree), ("full", None)):
        with tempfile.TemporaryDirectory() as runs:
            start = time.perf_counter()
            result = fl.simulate_gossip(job, topology=topology, degree=chosen, simulation=simulation, runs_dir=runs)
            seconds = time.perf_counter() - start
        final = result.final
        assert final.client_accuracy is not None
        assert final.central_accuracy is not None
        name = f"gossip, {topology}" + (f" (degree {chosen})" if chosen else "")
        rows[name] = [
            final.client_accuracy,
            final.central_accuracy,
            final.consensus_distance,
            result.spectral_gap,
            seconds,
        ]
        print(f"seed {simulation.seed}, {name}: done in {seconds:.1f}s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as runs:
        start = time.perf_counter()
        run = fl.simulate(job, simulation=simulation, runs_dir=runs)
        seconds = time.perf_counter() - start
    central = run.final_metrics["central_accuracy"]
    rows["FedAvg (server)"] = [client_accuracy(job, data, run.params), central, 0.0, float("nan"), seconds]
    print(f"seed {simulation.seed}, FedAvg: done in {seconds:.1f}s", file=sys.stderr)
    return rows


def cell(values: list[float], digits: str) -> str:
    """``mean ± std`` over seeds (just the value for one seed); ``-`` where undefined."""
    if any(np.isnan(values)):
        return "-"
    if len(values) == 1:
        return format(values[0], digits)
    return f"{format(float(np.mean(values)), digits)} ± {format(float(np.std(values)), digits)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--degree", type=int, default=4, help="degree of the random regular graph")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (data split, model, training, graph)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `fedloom simulate` does: small batches run faster on one thread

    job = fl.load_job("digits")
    simulation = replace(
        job.simulation,
        num_clients=args.clients,
        rounds=args.rounds,
        partition=PartitionConfig("dirichlet", alpha=0.5),
        backend=fl.BackendConfig("inline"),
    )
    by_seed = [one_seed(job, replace(simulation, seed=seed), args.degree) for seed in range(args.seeds)]

    print(
        f"### Decentralized FL (gossip) vs FedAvg: digits, {args.clients} clients, Dirichlet(0.5), "
        f"{args.rounds} rounds, seeds 0-{args.seeds - 1} (mean ± std)\n"
    )
    command = f"python benchmarks/gossip.py --clients {args.clients} --rounds {args.rounds} --degree {args.degree}"
    print(f"Command: `{command} --seeds {args.seeds}`\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} (1 thread), numpy {np.__version__}\n"
    )
    header = (
        "run",
        "mean client accuracy",
        "central accuracy (average model)",
        "consensus distance",
        "spectral gap",
        "seconds",
    )
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for name in by_seed[0]:
        columns = list(zip(*(rows[name] for rows in by_seed), strict=True))
        formats = (".4f", ".4f", ".4g", ".4f", ".1f")
        print(f"| {name} | " + " | ".join(cell(list(c), f) for c, f in zip(columns, formats, strict=True)) + " |")


if __name__ == "__main__":
    main()
